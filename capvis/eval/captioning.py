"""Caption images with a trained model, and evaluate the captions against references.

:func:`caption_images` decodes any list of image files in batches (beam search, greedy or nucleus,
KV-cached; or parallel, one pass) and returns COCO results rows ``{"image_id", "caption", "file_name"}``.
It accepts any file names: the original VirTex parsed COCO ids out of names and failed on anything else. Here
``image_id`` is the integer stem when the stem is all digits (``000000139.jpg`` -> 139, so COCO
folders give COCO ids), else the first unused integer from 1. Unreadable files are skipped with a
warning. Images go through the downstream eval transform: shorter side to ``image_size * 256/224``,
center crop ``image_size``. :func:`evaluate_captioning` does this for the images of a COCO-format
(or JSONL/CSV) caption file and scores the result with CIDEr-D, BLEU-4 and SPICE when possible.
:func:`finetune_captioning` continues training a checkpoint on new captions with the pretraining
Trainer, optionally with a frozen backbone (weights and BatchNorm statistics) or a deeper head.
"""

from __future__ import annotations

import json
import logging
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from capvis.config import Config
from capvis.data.datasets import load_image
from capvis.data.tokenizer import Tokenizer
from capvis.errors import CheckpointError, ConfigError, DataError
from capvis.train.loop import Trainer

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


@dataclass(frozen=True)
class DecodeSettings:
    """How captions are decoded (defaults as in VirTex: beam 5, 30 steps; top-p 0.9 for nucleus)."""

    method: str = "beam"  # beam | greedy | nucleus | parallel (one pass, CapPa)
    beam_size: int = 5
    top_p: float = 0.9
    max_steps: int = 30
    seed: int = 0  # nucleus sampling only

    def kwargs(self, device: torch.device) -> dict[str, Any]:
        out: dict[str, Any] = {"max_steps": self.max_steps}
        if self.method == "beam":
            out["beam_size"] = self.beam_size
        elif self.method == "nucleus":
            out["top_p"] = self.top_p
            out["generator"] = torch.Generator(device=device).manual_seed(self.seed)
        return out


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named in ``inputs``: files as given (any suffix), folders' image files sorted by name."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(f for f in p.iterdir()
                            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."))
        elif p.is_file():
            paths.append(p)
        else:
            raise DataError(f"no such image file or folder: {p}")
    unique = list(dict.fromkeys(paths))
    if not unique:
        raise DataError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(map(str, inputs))}")
    return unique


def image_ids(paths: Sequence[Path]) -> list[int]:
    """Integer stems for all-digit names, else (or on a clash) the first unused integer from 1."""
    ids: list[int | None] = []
    used: set[int] = set()
    for p in paths:
        value = int(p.stem) if p.stem.isascii() and p.stem.isdigit() else None
        if value is not None and value in used:
            value = None
        ids.append(value)
        if value is not None:
            used.add(value)
    out, next_id = [], 1
    for value in ids:
        if value is None:
            while next_id in used:
                next_id += 1
            value = next_id
            used.add(value)
        out.append(value)
    return out


class _CroppedImages(Dataset):
    """(index, uint8 (3, S, S) crop) per file, or (index, error message) when the file is unreadable."""

    def __init__(self, paths: Sequence[Path], image_size: int) -> None:
        from torchvision.transforms import v2

        from capvis.eval.features import default_resize

        self.paths = list(paths)
        self.crop = v2.Compose([v2.Resize(default_resize(image_size), antialias=True), v2.CenterCrop(image_size)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Tensor | str]:
        try:
            return i, self.crop(load_image(self.paths[i]))
        except DataError as exc:
            return i, str(exc)


def _collate(items: list[tuple[int, Tensor | str]]) -> tuple[list[int], Tensor | None, list[str]]:
    good = [(i, x) for i, x in items if isinstance(x, Tensor)]
    errors = [x for _, x in items if isinstance(x, str)]
    images = torch.stack([x for _, x in good]) if good else None  # (B, 3, S, S) uint8
    return [i for i, _ in good], images, errors


def inference_view(task: nn.Module) -> nn.Module:
    """The task in eval mode, on its backbone's inference copy when it is a pretext task (a ResNet's
    BatchNorms folded: the same captions, a faster backbone pass)."""
    from capvis.tasks.base import PretextTask

    return task.for_inference() if isinstance(task, PretextTask) else task.eval()


def _pieces(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    return [tokenizer.id_to_piece(i) for i in ids]


@torch.no_grad()
def caption_images(task: torch.nn.Module, tokenizer: Tokenizer, paths: Sequence[str | Path], *, image_size: int,
                   settings: DecodeSettings = DecodeSettings(), ids: Sequence[int] | None = None,
                   batch_size: int = 32, num_workers: int = 0, device: str | torch.device = "cpu",
                   attention_dir: str | Path | None = None, progress: bool = False) -> list[dict[str, Any]]:
    """Caption ``paths`` in batches; COCO results rows in input order, unreadable files left out.

    Args:
        task: a captioning task (``init_decoding`` / ``decode_step``), moved to ``device`` and eval mode.
        ids: image ids, one per path (default: :func:`image_ids`).
        attention_dir: also write ``<stem>.png`` per image, one attention panel per word.
    """
    from capvis.data.transforms import normalize
    from capvis.models.decoding import decode

    paths = [Path(p) for p in paths]
    ids = list(ids) if ids is not None else image_ids(paths)
    if len(ids) != len(paths):
        raise ValueError(f"{len(ids)} ids for {len(paths)} images")
    device = torch.device(device)
    task = inference_view(task.to(device))
    loader = DataLoader(_CroppedImages(paths, image_size), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate)
    kwargs = settings.kwargs(device)
    want_attention = attention_dir is not None
    results: list[dict[str, Any]] = []
    for index, crops, errors in tqdm(loader, desc="caption", disable=not progress):
        for message in errors:
            log.warning("skipped: %s", message)
        if crops is None:
            continue
        out = decode(task, normalize(crops.to(device)), method=settings.method, return_attention=want_attention,
                     **kwargs)
        for row, (i, tokens) in enumerate(zip(index, out.tokens)):
            results.append({"image_id": ids[i], "caption": tokenizer.decode(tokens), "file_name": paths[i].name})
            if want_attention:
                _save_overlay(Path(attention_dir), paths[i], ids[i], crops[row], _pieces(tokenizer, tokens),
                              out.attention[row])
    return results


def _save_overlay(folder: Path, path: Path, image_id: int, crop: Tensor, pieces: list[str], maps: Tensor) -> None:
    from capvis.eval.attention import save_attention, word_maps

    words, merged = word_maps(pieces, maps)
    save_attention(folder / f"{path.stem}.{image_id}.png", crop, words, merged)


# ----------------------------------------------------------------------------- evaluation


def evaluate_captioning(task: torch.nn.Module, tokenizer: Tokenizer, annotations: str | Path, *,
                        images_dir: str | Path | None = None, image_size: int,
                        settings: DecodeSettings = DecodeSettings(), spice: bool = True, **kwargs: Any) -> dict:
    """Caption every image of a caption file and score against its captions.

    ``annotations`` is a COCO captions JSON (or JSONL/CSV; see :func:`capvis.data.annotations.read_records`),
    ``images_dir`` its image folder (default: the COCO layout's). Images that cannot be read are
    skipped and counted in the notes. ``kwargs`` go to :func:`caption_images`.

    Returns:
        ``{"cider", "bleu4", "spice", "notes", "images", "settings", "predictions"}``; scores are raw
        (the paper's tables show x100).
    """
    from capvis.data.annotations import read_records
    from capvis.eval.caption_metrics import evaluate_captions

    records = read_records(annotations, images_dir)
    if not records:
        raise DataError(f"{annotations}: no images to caption")
    predictions = caption_images(task, tokenizer, [r.path for r in records], ids=[r.image_id for r in records],
                                 image_size=image_size, settings=settings, **kwargs)
    references = {r.image_id: r.captions for r in records}
    metrics = evaluate_captions({p["image_id"]: p["caption"] for p in predictions}, references, spice=spice)
    skipped = len(records) - len(predictions)
    if skipped:
        metrics["notes"].append(f"{skipped} of {len(records)} images could not be read and were skipped")
    return {**metrics, "images": len(predictions), "settings": asdict(settings), "predictions": predictions}


# ----------------------------------------------------------------------------- fine-tuning


def freeze(module: nn.Module) -> None:
    """No gradients for ``module`` and eval mode for good: later ``.train()`` calls (the loop's, after
    validation) leave it in eval mode, so BatchNorm keeps using and never updates its running stats."""
    module.requires_grad_(False)
    module.train = types.MethodType(_stay_in_eval, module)  # shadows nn.Module.train for this instance
    module.eval()


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def load_matching(task: nn.Module, state: dict[str, Tensor]) -> list[str]:
    """Load ``state`` into ``task`` where names match; returns the task's keys the state lacks (new weights,
    left at their fresh initialisation). Weights of another shape or unknown to the task are an error."""
    try:
        missing, unexpected = task.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        lines = [x.strip() for x in str(exc).splitlines() if "size mismatch" in x] or str(exc).splitlines()
        raise CheckpointError(f"checkpoint weights do not fit the new model: {lines[0]}") from None
    if unexpected:
        raise CheckpointError(f"{len(unexpected)} checkpoint weights have no place in the new model, "
                              f"first: {unexpected[0]}")
    return list(missing)


class CaptionFinetuner(Trainer):
    """The pretraining :class:`Trainer`, started from a checkpoint's weights, optionally with a frozen backbone.

    Weights and freezing happen in :meth:`prepare_task`, before the Trainer builds the optimizer (which
    then holds only trainable parameters), restores a resumed run over them, and wraps DDP.
    """

    def __init__(self, cfg: Config, output: str | Path, *, init_state: dict[str, Tensor] | None,
                 freeze_backbone: bool = False, resume: str | None = None, progress: bool = True) -> None:
        self._init_state, self._freeze_backbone = init_state, freeze_backbone
        self.new_keys: list[str] = []
        super().__init__(cfg, output, resume=resume, progress=progress)

    def prepare_task(self, task: torch.nn.Module) -> torch.nn.Module:
        if self._init_state is not None:
            self.new_keys = load_matching(task, self._init_state)
        if self._freeze_backbone:
            freeze(task.visual)
        return task


def finetune_captioning(checkpoint: str | Path, output: str | Path, *, train: str | Path,
                        train_images: str | Path | None = None, val: str | Path | None = None,
                        val_images: str | Path | None = None, layers: int | None = None,
                        freeze_backbone: bool = False, overrides: Sequence[str] = (), resume: str | None = None,
                        progress: bool = True) -> dict[str, Any]:
    """Continue training a captioning checkpoint on new image-caption data (any read_records format).

    The run keeps the checkpoint's config and vocabulary (written to ``output/vocab.model``), with the
    data keys replaced and ``overrides`` on top; set ``train.iterations``/``train.warmup`` for the new
    run. ``layers`` deeper than the checkpoint's adds freshly initialised Transformer layers on top.
    """
    from capvis.config import apply_overrides
    from capvis.loading import load_pretrained
    from capvis.train.distributed import cleanup

    pre = load_pretrained(checkpoint)
    from capvis.tasks.protocols import CaptionLikelihoodModel, require

    require(pre.task, CaptionLikelihoodModel, doing="caption fine-tuning", source=str(checkpoint))
    if pre.tokenizer is None:
        raise ConfigError(f"{checkpoint} carries no vocabulary; caption fine-tuning needs its tokenizer")
    base = pre.config.model.textual.layers
    if layers is not None and layers < base:
        raise ConfigError(f"--layers {layers} is fewer than the checkpoint's {base}; only deeper heads are supported")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    vocab = output / "vocab.model"
    vocab.write_bytes(pre.tokenizer.model_bytes)
    data = {"train": str(train), "train_images": str(train_images or ""), "val": str(val or ""),
            "val_images": str(val_images or ""), "vocab": str(vocab)}
    cfg = apply_overrides(pre.config, {"data": data, "model": {"textual": {"layers": layers or base}}})
    cfg = apply_overrides(cfg, list(overrides))
    trainer = CaptionFinetuner(cfg, output, init_state=pre.task.state_dict(), freeze_backbone=freeze_backbone,
                               resume=resume, progress=progress)
    if trainer.info.is_main and trainer.start == 0:
        note = {"source": pre.source, "source_iteration": pre.iteration, "freeze_backbone": freeze_backbone,
                "layers": [base, cfg.model.textual.layers], "new_weights": trainer.new_keys}
        (output / "finetune.json").write_text(json.dumps(note, indent=1))
    if trainer.new_keys:
        log.info("%d weights not in the checkpoint, freshly initialised (first: %s)", len(trainer.new_keys),
                 trainer.new_keys[0])
    try:
        summary = trainer.run()
    finally:
        cleanup(trainer.info)
    return {**summary, "new_weights": trainer.new_keys, "freeze_backbone": freeze_backbone}
