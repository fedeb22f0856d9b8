"""Linear probe on a frozen backbone (ImageNet-1k protocol of the VirTex paper, Appendix A.1).

The backbone stays frozen in eval mode (BatchNorm statistics fixed); a new ``Linear(C, classes)``
initialised N(0, 0.01) with bias 0 is trained with cross-entropy, SGD (momentum 0.9, weight decay 0),
LR 0.3 with per-iteration cosine decay to 0 and no warmup, batch 256, 100 epochs, on
random-resized-crop (scale 0.08-1, ratio 3/4-4/3) + horizontal-flip views; evaluation is the
256 -> center-224 view, top-1/top-5 accuracy in percent. Data is a torchvision ImageFolder layout
(``DIR/<class>/<image>``); val uses the train class list.

:func:`linear_probe_cached` is a *fast path, not the protocol*: multinomial logistic regression on cached
center-crop features with no augmentation, a sweep of weight decays solved together and the best
chosen on a held-out split of train (:mod:`capvis.eval.probe`); seconds, not hours, but it reads
a little differently.
The ImageFolder data helpers and :func:`evaluate` here are shared with :mod:`capvis.eval.finetune`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.datasets.folder import IMG_EXTENSIONS, DatasetFolder
from torchvision.transforms import v2

from capvis.data.datasets import load_image
from capvis.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform
from capvis.errors import DataError
from capvis.eval.features import default_resize, stage_features
from capvis.eval.probe import WEIGHT_DECAYS, probe_accuracy
from capvis.tasks.base import TaskOutput

log = logging.getLogger(__name__)

EXTENSIONS = tuple(IMG_EXTENSIONS) + tuple(e.upper() for e in IMG_EXTENSIONS)


class ImageFolderSplit(DatasetFolder):
    """torchvision's ImageFolder decoding with capvis's loader; ``classes`` fixes the label order, so a
    val folder that lacks some classes still uses the train indices."""

    def __init__(self, root: str | Path, transform: Callable, classes: Sequence[str] | None = None) -> None:
        self._fixed = list(classes) if classes is not None else None
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"image folder {root} is not a directory")
        try:
            super().__init__(str(root), loader=load_image, extensions=EXTENSIONS, transform=transform,
                             allow_empty=classes is not None)
        except FileNotFoundError as exc:
            raise DataError(f"{root}: {exc} (expected the ImageFolder layout DIR/<class>/<image>)") from None
        if not self.samples:
            raise DataError(f"no images under {root} (expected DIR/<class>/<image>)")

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        if self._fixed is None:
            return super().find_classes(directory)
        extra = sorted(d.name for d in Path(directory).iterdir() if d.is_dir() and d.name not in self._fixed)
        if extra:
            raise DataError(f"{directory} has classes not in the training folder: {extra[:5]}")
        return self._fixed, {c: i for i, c in enumerate(self._fixed)}


def train_transform(image_size: int) -> v2.Compose:
    """The paper's downstream training view: random resized crop (0.08-1) + flip, ImageNet normalisation."""
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD)),
    ])


def image_folders(train_dir: str | Path, val_dir: str | Path, *, image_size: int, resize: int | None = None,
                  augment: bool = True) -> tuple[ImageFolderSplit, ImageFolderSplit]:
    """Train (augmented unless ``augment=False``) and val (resize, center crop) ImageFolder datasets."""
    eval_tf = build_eval_transform(image_size, resize or default_resize(image_size))
    train = ImageFolderSplit(train_dir, train_transform(image_size) if augment else eval_tf)
    return train, ImageFolderSplit(val_dir, eval_tf, classes=train.classes)


def new_head(in_features: int, num_classes: int) -> nn.Linear:
    """The classifier the original restores: weights N(0, 0.01), bias 0."""
    fc = nn.Linear(in_features, num_classes)
    nn.init.normal_(fc.weight, mean=0.0, std=0.01)
    nn.init.zeros_(fc.bias)
    return fc


def cosine_lambda(total: int) -> Callable[[int], float]:
    """Per-iteration half-cosine multiplier from 1 to 0 over ``total`` steps, no warmup."""
    return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / max(1, total)))


def topk_correct(logits: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """Number of rows whose target is among the top-k logits, per k (k capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (B, kmax)
    hits = top == targets[:, None]
    return [int(hits[:, : min(k, logits.shape[1])].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def evaluate(predict: Callable[[Tensor], Tensor], loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Top-1/top-5 accuracy in percent of ``predict(images) -> logits`` over ``loader``."""
    correct, total = np.zeros(2, dtype=np.int64), 0
    for images, targets in loader:
        logits = predict(images.to(device, non_blocking=True)).float().cpu()
        correct += topk_correct(logits, targets)
        total += len(targets)
    return {"top1": 100.0 * int(correct[0]) / max(1, total), "top5": 100.0 * int(correct[1]) / max(1, total)}


def loader(dataset: Any, batch_size: int, *, shuffle: bool, num_workers: int, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, generator=g,
                      persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())


class Supervised(nn.Module):
    """A classifier's cross-entropy on ``{"image", "target"}`` as a TaskOutput, so the evaluation
    protocols that train (linear probe, fine-tuning) step with the trainer's ``train_step``: the same
    scaler, clipping and skipping of non-finite updates. ``frozen`` (with ``stage``): features are taken
    from it without gradients first (the linear probe)."""

    def __init__(self, net: nn.Module, frozen: nn.Module | None = None, stage: str | None = None) -> None:
        super().__init__()
        self.net, self.frozen, self.stage = net, frozen, stage

    def train(self, mode: bool = True) -> "Supervised":
        super().train(mode)
        if self.frozen is not None:
            self.frozen.eval()  # frozen means BatchNorm statistics too
        return self

    def forward(self, batch: dict[str, Tensor]) -> TaskOutput:
        x = batch["image"]
        if self.frozen is not None:
            with torch.no_grad():
                x = stage_features(self.frozen, x, self.stage)  # (B, C)
        return TaskOutput(loss=nn.functional.cross_entropy(self.net(x), batch["target"]), logs={})


def supervised_epochs(objective: nn.Module, train_loader: DataLoader, opt: torch.optim.Optimizer, sched: Any,
                      *, epochs: int, device: torch.device, precision: str = "fp32", clip_grad_norm: float = 0.0,
                      name: str = "train") -> None:
    """``epochs`` passes of ``train_step`` over (images, targets) batches; logs loss, LR and skipped steps."""
    from capvis.train.precision import resolve_precision
    from capvis.train.step import train_step

    prec = resolve_precision(precision, device)
    scaler = prec.scaler()
    skipped = torch.zeros((), dtype=torch.long, device=device)
    objective.train()
    for epoch in range(epochs):
        for images, targets in train_loader:
            batch = {"image": images.to(device, non_blocking=True), "target": targets.to(device, non_blocking=True)}
            step = train_step(objective, batch, opt, sched, scaler, prec, clip_grad_norm=clip_grad_norm)
            skipped += step.skipped
        log.info("%s epoch %d/%d: loss %.4f, lr %.4g, %d non-finite steps skipped", name, epoch + 1, epochs,
                 float(step.loss), sched.get_last_lr()[0], int(skipped))


def _sgd(fc: nn.Module, lr: float, momentum: float, weight_decay: float, total: int):
    opt = torch.optim.SGD(fc.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(total))


def linear_probe(backbone: nn.Module, train_dir: str | Path, val_dir: str | Path, *, image_size: int = 224,
                 resize: int | None = None, epochs: int = 100, lr: float = 0.3, batch_size: int = 256,
                 momentum: float = 0.9, weight_decay: float = 0.0, stage: str | None = None, num_workers: int = 4,
                 device: str | torch.device = "cpu", seed: int = 0) -> dict[str, Any]:
    """Train a linear head on augmented views through the frozen backbone; top-1/top-5 on val (percent)."""
    device = torch.device(device)
    train, val = image_folders(train_dir, val_dir, image_size=image_size, resize=resize)
    backbone = backbone.to(device).eval().requires_grad_(False)  # frozen, BN statistics fixed
    torch.manual_seed(seed)
    with torch.no_grad():
        dim = stage_features(backbone, val[0][0][None].to(device), stage).shape[1]
    fc = new_head(dim, len(train.classes)).to(device)
    train_loader = loader(train, batch_size, shuffle=True, num_workers=num_workers, seed=seed)
    total = epochs * len(train_loader)
    opt, sched = _sgd(fc, lr, momentum, weight_decay, total)
    supervised_epochs(Supervised(fc, frozen=backbone, stage=stage), train_loader, opt, sched, epochs=epochs,
                      device=device, name="linear probe")
    metrics = evaluate(lambda x: fc(stage_features(backbone, x, stage)),
                       loader(val, batch_size, shuffle=False, num_workers=num_workers), device)
    return {**metrics, "protocol": "linear probe on augmented views (paper A.1)", "classes": len(train.classes),
            "train_images": len(train), "val_images": len(val), "epochs": epochs, "iterations": total}


def linear_probe_cached(backbone: nn.Module, train_dir: str | Path, val_dir: str | Path, *, image_size: int = 224,
                        resize: int | None = None, stage: str | None = None, batch_size: int = 256, num_workers: int = 4,
                        device: str | torch.device = "cpu", seed: int = 0, cache_dir: str | Path | None = None,
                        source: str = "random", weight_decays: Sequence[float] = WEIGHT_DECAYS,
                        holdout: float = 0.2, compile: str | None = None) -> dict[str, Any]:
    """FAST PATH, not the paper protocol: multinomial logistic regression on cached center-crop features
    (no augmentation), a sweep of weight decays solved at once, the best on a held-out split of train."""
    from capvis.eval.features import cached_features

    train, val = image_folders(train_dir, val_dir, image_size=image_size, resize=resize, augment=False)
    kwargs = dict(image_size=image_size, resize=resize or default_resize(image_size), stage=stage,
                  batch_size=batch_size, num_workers=num_workers, device=device, compile=compile)
    feats = [cached_features(backbone, [p for p, _ in split.samples], cache_dir=cache_dir, source=source, **kwargs)
             for split in (train, val)]
    result = probe_accuracy(feats[0], np.array(train.targets), feats[1], np.array(val.targets), len(train.classes),
                            weight_decays=weight_decays, holdout=holdout, seed=seed, device=device)
    return {"top1": result.top1, "top5": result.top5,
            "protocol": "FAST PATH: logistic regression on cached center-crop features, no augmentation "
                        f"(weight decay by {holdout:.0%} held-out train images; not paper A.1)",
            "classes": len(train.classes), "train_images": len(train), "val_images": len(val),
            "weight_decay": result.weight_decay, "holdout_top1": result.to_dict()["holdout_top1"],
            "converged": result.converged}
