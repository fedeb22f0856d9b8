"""How well a captioning model explains a set of captions: token-weighted negative log-likelihood.

For every caption of every image, in eval mode: tokens = [SOS] caption [EOS] (cut to the model's
caption length, as in training), and the NLL of each token after [SOS] up to and including [EOS]
given the image and the tokens before it. The backward head of a bicaptioning model scores the
reversed caption (tokens after [EOS] up to and including [SOS]). As in the training loss, targets
with id 0 (``<unk>``, which is also padding) are not scored. Images go through the pretraining
validation pipeline: shorter side to ``image_size``, then a center crop.

The means are token-weighted: ``sum of NLL over all scored tokens / number of scored tokens``,
which is the validation loss of the original VirTex when every caption is used.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from capvis.data.annotations import ImageRecord
from capvis.data.datasets import load_image
from capvis.data.tokenizer import EOS_ID, PAD_ID, SOS_ID, Tokenizer, normalize_caption
from capvis.data.transforms import build_eval_transform


def caption_ids(tokenizer: Tokenizer, caption: str, max_len: int) -> list[int]:
    """[SOS] ids [EOS], cut from the right to ``max_len`` (a cut caption loses its [EOS], as in training)."""
    return [SOS_ID, *tokenizer.encode(normalize_caption(caption)), EOS_ID][:max_len]


class _ScoreDataset(Dataset):
    def __init__(self, records: Sequence[ImageRecord], tokenizer: Tokenizer, image_size: int, max_len: int) -> None:
        self.records = [r for r in records if r.captions]
        self.transform = build_eval_transform(image_size)  # resize shorter side to image_size, center crop
        self.tokens = [[caption_ids(tokenizer, c, max_len) for c in r.captions] for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[Tensor, list[list[int]]]:
        return self.transform(load_image(self.records[i].path)), self.tokens[i]


def _collate(items: list[tuple[Tensor, list[list[int]]]]) -> dict[str, Tensor]:
    rows = [(i, ids) for i, (_, caps) in enumerate(items) for ids in caps]
    lengths = torch.tensor([len(ids) for _, ids in rows], dtype=torch.long)
    tokens = torch.full((len(rows), int(lengths.max())), PAD_ID, dtype=torch.long)  # (N, T)
    for r, (_, ids) in enumerate(rows):
        tokens[r, : len(ids)] = torch.tensor(ids)
    return {"image": torch.stack([im for im, _ in items]), "owner": torch.tensor([i for i, _ in rows]),
            "caption_tokens": tokens, "caption_lengths": lengths}


def token_nll(logits: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Summed NLL of ``tokens[:, 1:]`` under ``logits[:, :-1]`` (N, T, V) and the number of scored targets."""
    targets = tokens[:, 1:]  # (N, T-1)
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none")
    keep = targets.flatten() != PAD_ID
    return (nll * keep).sum(dtype=torch.float64), keep.sum()


@torch.no_grad()
def score_captions(task: nn.Module, tokenizer: Tokenizer, records: Sequence[ImageRecord], *, image_size: int,
                   max_caption_length: int, batch_size: int = 32, num_workers: int = 0,
                   device: str | torch.device = "cpu", progress: bool = False,
                   source: str = "the checkpoint") -> dict[str, Any]:
    """``{"nll_forward", "nll_backward" (bicaptioning only), "tokens", "captions", "images"}``."""
    from capvis.tasks.captioning import reverse_captions
    from capvis.tasks.protocols import CaptionLikelihoodModel, require

    heads = require(task, CaptionLikelihoodModel, doing="capvis score", source=source).caption_heads()
    task = task.eval().to(device)
    data = _ScoreDataset(records, tokenizer, image_size, max_caption_length)
    loader = DataLoader(data, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    sums = {"forward": torch.zeros((), dtype=torch.float64), "backward": torch.zeros((), dtype=torch.float64)}
    counts = {"forward": 0, "backward": 0}
    captions = 0
    for batch in tqdm(loader, desc="score", disable=not progress):
        grid = task.visual(batch["image"].to(device))[batch["owner"].to(device)]  # (N, C, h, w), one per caption
        tokens, lengths = batch["caption_tokens"].to(device), batch["caption_lengths"].to(device)
        for head in heads:
            toks = reverse_captions(tokens, lengths) if head.reverse else tokens  # [EOS] .. [SOS] backward
            total, n = token_nll(head.module(grid, toks, lengths), toks)
            sums[head.name] += total.cpu()
            counts[head.name] += int(n)
        captions += len(tokens)
    result: dict[str, Any] = {"nll_forward": float(sums["forward"] / max(counts["forward"], 1))}
    if counts["backward"]:
        result["nll_backward"] = float(sums["backward"] / max(counts["backward"], 1))
    result.update(tokens=counts["forward"], captions=captions, images=len(data))
    return result
