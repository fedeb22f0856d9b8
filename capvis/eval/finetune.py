"""End-to-end classification fine-tuning (iNaturalist 2018 protocol of the VirTex paper, Section 4.3).

The whole backbone trains, BatchNorm in train mode, with a new ``Linear(C, classes)`` head
(N(0, 0.01), bias 0): SGD momentum 0.9, weight decay 1e-4 on *all* parameters, LR 0.025 multiplied
by 0.1 at 70% and 90% of the iterations (epochs 70 and 90 of 100), batch 256, no warmup, mixed
precision on CUDA (bf16 where supported; the original used fp16), random-resized-crop + flip views.
The result is saved under the backbone family's own names with the new head as its classifier (a
torchvision ResNet's ``fc``, a timm model's ``head``), so ``torchvision.models.<arch>(num_classes=K)`` or
``timm.create_model(name, num_classes=K, img_size=S)`` loads it as-is (standard stem for ResNets).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from capvis.eval.linear import Supervised, evaluate, image_folders, loader, new_head, supervised_epochs
from capvis.train.precision import resolve_precision

log = logging.getLogger(__name__)


class ClassifierNet(nn.Module):
    """A capvis VisualBackbone plus a linear head on its global-average-pooled features."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc = new_head(backbone.num_features, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.fc(self.backbone.pooled(images))  # (B, classes)

    def export_state_dict(self) -> dict[str, Tensor]:
        """The backbone family's own keys with this head as its classifier: a torchvision ResNet's
        ``conv1.* ... fc.*`` or a timm model's (``head.*``) with ``num_classes`` outputs."""
        state = {k: v.cpu() for k, v in self.backbone.export_state_dict(standard_only=False).items()}
        head = self.backbone.classifier_name
        state.update({f"{head}.{k}": v.detach().cpu() for k, v in self.fc.state_dict().items()})
        return state


def multistep_lambda(total: int, milestones: tuple[float, ...] = (0.7, 0.9), gamma: float = 0.1):
    """Multiplier ``gamma ** (number of milestones passed)``; milestones are fractions of ``total``."""
    steps = [int(round(m * total)) for m in milestones]
    return lambda t: gamma ** sum(t >= s for s in steps)


def finetune_classify(backbone: nn.Module, train_dir: str | Path, val_dir: str | Path, *, image_size: int = 224,
                      resize: int | None = None, epochs: int = 100, lr: float = 0.025, batch_size: int = 256,
                      momentum: float = 0.9, weight_decay: float = 1e-4, milestones: tuple[float, ...] = (0.7, 0.9),
                      num_workers: int = 4, device: str | torch.device = "cpu", seed: int = 0,
                      precision: str = "auto", clip_grad_norm: float = 0.0) -> tuple[ClassifierNet, dict[str, Any]]:
    """Fine-tune ``backbone`` (trained in place) with a new head; returns the net and val top-1/top-5.

    Each step is the trainer's :func:`~capvis.train.step.train_step` (autocast, scaler, clipping at
    ``clip_grad_norm`` when > 0, a non-finite loss or gradient skips the update); the paper's protocol
    does not clip (0, the default)."""
    device = torch.device(device)
    train, val = image_folders(train_dir, val_dir, image_size=image_size, resize=resize)
    torch.manual_seed(seed)
    net = ClassifierNet(backbone.requires_grad_(True), len(train.classes)).to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    prec = resolve_precision(precision, device)
    train_loader = loader(train, batch_size, shuffle=True, num_workers=num_workers, seed=seed)
    total = epochs * len(train_loader)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, multistep_lambda(total, milestones))
    # BatchNorm in train mode (Supervised.train): statistics adapt to the new data
    supervised_epochs(Supervised(net), train_loader, opt, sched, epochs=epochs, device=device,
                      precision=precision, clip_grad_norm=clip_grad_norm, name="finetune")
    net.eval()

    def predict(x: Tensor) -> Tensor:
        with prec.autocast():
            return net(x)

    metrics = evaluate(predict, loader(val, batch_size, shuffle=False, num_workers=num_workers), device)
    return net, {**metrics, "classes": len(train.classes), "class_names": list(train.classes),
                 "train_images": len(train), "val_images": len(val), "epochs": epochs, "iterations": total,
                 "precision": prec.name}


def save_finetuned(net: ClassifierNet, path: str | Path, *, metrics: dict[str, Any], config: dict[str, Any],
                   source: str) -> Path:
    """Write ``{"model": the family's state dict (torchvision or timm names), "classes", "metrics", "config", "source"}`` atomically."""
    from capvis import __version__
    from capvis.storage import atomic_save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": net.export_state_dict(), "classes": metrics.get("class_names", []),
             "metrics": {k: v for k, v in metrics.items() if k != "class_names"}, "config": config,
             "source": source, "capvis_version": __version__}
    return atomic_save(state, path)
