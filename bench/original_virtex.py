"""The original VirTex's training step (kdexd/virtex, from a checkout given by ``--virtex DIR``), for
``bench/train_step.py --part original``: the same random batch and sizes as capvis' step, timed the same way.

Only the model, optimizer and scheduler modules of the checkout are imported (its ``virtex.data`` and
``virtex.models`` package ``__init__`` files pull in albumentations, OpenCV and LVIS, which the step does not
use). Two shims for today's libraries, neither of which changes the arithmetic: torchvision's model builders
take ``weights=`` instead of the positional ``pretrained``, and the scheduler's ``last_epoch`` warning is
silenced. The step is the loop body of the original's ``scripts/pretrain_virtex.py``: zero_grad, forward,
``GradScaler`` (disabled, as with ``AMP: false``) backward, unscale, clip_grad_norm_, step, update, scheduler.
"""

from __future__ import annotations

import importlib
import re
import sys
import types
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision

from capvis.tasks.captioning import reverse_captions


NO_DECAY = ".*textual.(embedding|transformer).*(norm.*|bias)"  # the original's OPTIM.NO_DECAY default


def _package(name: str, path: Path) -> None:
    """An empty package module for ``name``, so that importing one of its files skips its ``__init__``."""
    module = types.ModuleType(name)
    module.__path__ = [str(path)]
    sys.modules[name] = module


def import_original(root: str | Path) -> dict[str, Any]:
    """The original's modules from a checkout (the directory that holds ``virtex/``)."""
    pkg = Path(root) / "virtex"
    if not (pkg / "models" / "captioning.py").is_file():
        raise SystemExit(f"--virtex {root}: no virtex/models/captioning.py there (a kdexd/virtex checkout?)")
    for name in ("virtex", "virtex.data", "virtex.models", "virtex.modules", "virtex.optim"):
        _package(name, pkg.joinpath(*name.split(".")[1:]))
    return {name: importlib.import_module(f"virtex.{name}") for name in
            ("models.captioning", "modules.visual_backbones", "modules.textual_heads", "optim.lookahead",
             "optim.lr_scheduler")}


def _torchvision_builder(name: str) -> Callable[..., torch.nn.Module]:
    build = getattr(torchvision.models, name)
    return lambda pretrained=False, **kwargs: build(weights=None, **kwargs)


def build_original(cfg: Any, root: str | Path) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    """The original's bicaptioning model, SGD + Lookahead with its per-parameter groups, and its scheduler,
    sized from the capvis config (backbone, hidden, layers, heads, feed-forward, vocabulary, LRs)."""
    m = import_original(root)
    t, tr = cfg.model.textual, cfg.train
    name = cfg.model.backbone
    original_builder = getattr(torchvision.models, name)
    setattr(torchvision.models, name, _torchvision_builder(name))
    try:
        visual = m["modules.visual_backbones"].TorchvisionVisualBackbone(
            name, visual_feature_size=512 if name in ("resnet18", "resnet34") else 2048)
    finally:
        setattr(torchvision.models, name, original_builder)
    textual = m["modules.textual_heads"].TransformerDecoderTextualHead(
        visual.visual_feature_size, cfg.model.vocab_size, t.hidden, t.layers, t.heads, t.feedforward,
        dropout=t.dropout, norm_first=False, mask_future_positions=True,
        max_caption_length=cfg.data.max_caption_length, padding_idx=0)
    model = m["models.captioning"].BidirectionalCaptioningModel(visual, textual, sos_index=1, eos_index=2)
    groups = [{"params": [p], "lr": tr.lr_backbone if "cnn" in n else tr.lr_textual,
               "weight_decay": 0.0 if re.match(NO_DECAY, n) else tr.weight_decay}
              for n, p in model.named_parameters()]
    optimizer = m["optim.lookahead"].Lookahead(torch.optim.SGD(groups, momentum=0.9), k=5, alpha=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = m["optim.lr_scheduler"].LinearWarmupCosineAnnealingLR(
            optimizer, total_steps=max(tr.iterations, 2), warmup_steps=min(tr.warmup, max(tr.iterations, 2) - 1))
    return model, optimizer, scheduler


def original_step(cfg: Any, batch: dict[str, torch.Tensor], root: str | Path) -> tuple[Callable[[], torch.Tensor], dict]:
    """One step of the original's loop on ``batch`` (which gets its reversed captions, ``noitpac_tokens``)."""
    model, optimizer, scheduler = build_original(cfg, root)
    # the original's dataset flips each caption's tokens ([EOS] ... [SOS]), as capvis' backward head reads them
    batch = {**batch, "noitpac_tokens": reverse_captions(batch["caption_tokens"], batch["caption_lengths"])}
    scaler = torch.amp.GradScaler(enabled=False)
    model.train()

    def step() -> torch.Tensor:
        optimizer.zero_grad()
        loss = model(batch)["loss"]
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        return loss.detach()

    return step, {"implementation": "kdexd/virtex", "params": sum(p.numel() for p in model.parameters())}
