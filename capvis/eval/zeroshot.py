"""Zero-shot classification with prompt templates (CLIP, Radford et al. 2021, Section 3.1.4).

Each class name is put into every template ("a photo of a {}."), tokenized with the checkpoint's own
vocabulary and encoded by the model's text encoder; the normalised embeddings are averaged over
templates and renormalised, giving one classifier row per class. An image is assigned the class whose
row has the largest cosine similarity with its embedding. No label is used for training.

Scoring a label file (format: :mod:`capvis.data.labels`): top-1 accuracy. For a multi-label entry (a
CaptionWorld image with a circle and a star) the prediction counts as correct when it is *any* of the
entry's classes, so chance is not 1/K but the mean over images of ``|labels| / K`` (what a uniformly
random guess scores); it is reported beside top-1. Entries with no label for the task are skipped.

Images are resized (shorter side) to ``resize`` and center-cropped to ``image_size``; both default to
the model's ``data.image_size``, so a square image is used whole (synthetic scenes put objects near
the border, which the usual 8/7 crop would cut).

Models: any task with ``encode_image`` and ``encode_text`` (``contrastive``); others raise ConfigError.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from capvis.data.tokenizer import EOS_ID, PAD_ID, SOS_ID, Tokenizer, normalize_caption
from capvis.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
WORLD_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a picture with a {}.", "an image of a {}.")


def check_zeroshot_model(task: torch.nn.Module, tokenizer: Tokenizer | None) -> Tokenizer:
    """ConfigError unless ``task`` has a text encoder zero-shot can use and a tokenizer came with it."""
    if not (hasattr(task, "encode_image") and hasattr(task, "encode_text")):
        raise ConfigError(f"zero-shot classification needs an image-text embedding model (task 'contrastive'); "
                          f"this checkpoint's model is {type(task).__name__}, which has no text encoder")
    if tokenizer is None:
        raise ConfigError("the checkpoint carries no vocabulary, so class prompts cannot be tokenized")
    return tokenizer


def tokenize_prompts(tokenizer: Tokenizer, texts: Sequence[str], max_len: int) -> tuple[Tensor, Tensor]:
    """Texts -> right-padded (N, T) [SOS] ids [EOS] (cut to ``max_len``, as in training) and lengths (N,)."""
    rows = [[SOS_ID, *tokenizer.encode(normalize_caption(t)), EOS_ID][:max_len] for t in texts]
    lengths = torch.tensor([len(r) for r in rows])
    tokens = torch.full((len(rows), int(lengths.max())), PAD_ID, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    return tokens, lengths


@torch.no_grad()
def class_embeddings(task: torch.nn.Module, tokenizer: Tokenizer, classnames: Sequence[str],
                     templates: Sequence[str], *, max_len: int, device: torch.device | str = "cpu") -> Tensor:
    """(K, E) normalised classifier rows: the template-averaged text embedding of each class."""
    if not templates or any("{}" not in t for t in templates):
        raise ConfigError(f"every prompt template must contain '{{}}' for the class name, got {list(templates)}")
    prompts = [t.format(name) for name in classnames for t in templates]
    tokens, lengths = tokenize_prompts(tokenizer, prompts, max_len)
    text = task.encode_text(tokens.to(device), lengths.to(device)).float()  # (K*P, E)
    text = text.view(len(classnames), len(templates), -1).mean(dim=1)  # (K, E)
    return torch.nn.functional.normalize(text, dim=-1)


@torch.no_grad()
def image_embeddings(task: torch.nn.Module, paths: Sequence[str | Path], *, image_size: int, resize: int | None = None,
                     batch_size: int = 64, workers: int = 0, device: torch.device | str = "cpu") -> Tensor:
    """(N, E) normalised image embeddings of ``paths``, in order."""
    from capvis.eval.features import ImageListDataset

    loader = DataLoader(ImageListDataset(paths, image_size, resize or image_size), batch_size=batch_size,
                        num_workers=workers)
    out = [task.encode_image(images.to(device)).float().cpu() for images in loader]
    return torch.cat(out) if out else torch.zeros(0, 0)


def top1_any_label(scores: Tensor, labels: Sequence[Sequence[int]]) -> dict[str, float]:
    """Top-1 accuracy of (N, K) ``scores``, a hit when the argmax is among an entry's labels.

    Returns ``top1``, ``chance`` (mean of |labels|/K over scored entries), ``images`` (scored entries)
    and ``multi_label_images``. Entries without labels are skipped.
    """
    k = scores.shape[1]
    predicted = scores.argmax(dim=1).tolist()
    hits, chance, scored, multi = 0, 0.0, 0, 0
    for pred, labs in zip(predicted, labels):
        if not labs:
            continue
        scored += 1
        hits += int(pred in labs)
        chance += len(set(labs)) / k
        multi += int(len(set(labs)) > 1)
    if scored == 0:
        raise DataError("no image has a label for this task")
    return {"top1": hits / scored, "chance": chance / scored, "images": scored, "multi_label_images": multi}


def evaluate_zeroshot(task: torch.nn.Module, tokenizer: Tokenizer | None, label_file: str | Path, label_task: str, *,
                      max_len: int, image_size: int, resize: int | None = None, images_dir: str | Path | None = None,
                      templates: Sequence[str] = DEFAULT_TEMPLATES, batch_size: int = 64, workers: int = 0,
                      device: torch.device | str = "cpu") -> dict:
    """Zero-shot top-1 of ``task`` on one task of a label file; see the module docstring."""
    from capvis.eval.downstream import label_file_images

    tokenizer = check_zeroshot_model(task, tokenizer)
    tasks, entries, paths = label_file_images(label_file, images_dir)
    if label_task not in tasks:
        raise ConfigError(f"{label_file} has no task {label_task!r}; it has {', '.join(tasks)}")
    classnames = tasks[label_task]
    task = task.eval().to(device)
    classifier = class_embeddings(task, tokenizer, classnames, templates, max_len=max_len, device=device)
    images = image_embeddings(task, paths, image_size=image_size, resize=resize, batch_size=batch_size,
                              workers=workers, device=device)
    scores = images @ classifier.cpu().T  # (N, K) cosine similarities
    result = top1_any_label(scores, [e["labels"][label_task] for e in entries])
    predicted = np.bincount(scores.argmax(dim=1).numpy(), minlength=len(classnames))
    log.info("zero-shot %s: top-1 %.3f (chance %.3f) on %d images; predictions per class %s", label_task,
             result["top1"], result["chance"], result["images"], predicted.tolist())
    return {"label_task": label_task, "classes": len(classnames), **result, "templates": list(templates)}
