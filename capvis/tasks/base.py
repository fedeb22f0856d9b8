"""The pretext-task plug-in interface: a task is an ``nn.Module`` that owns backbone, head and loss.

The trainer only calls ``task(batch) -> TaskOutput`` and ``task.param_groups(train_cfg)``; it never
branches on a task's name. New tasks subclass :class:`PretextTask` and register with ``@TASKS.register``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from capvis.config import Config
from capvis.data.pipeline import CAPTION_KEYS
from capvis.data.tokenizer import PAD_ID
from capvis.models.backbones import Backbone
from capvis.registry import Registry

TASKS: Registry[type["PretextTask"]] = Registry("task")

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class TaskOutput:
    loss: Tensor  # scalar to minimise
    logs: dict[str, Tensor]  # detached scalars for logging


class PretextTask(nn.Module):
    """Base class: ``visual`` is the transferable ConvNet every task has."""

    visual: Backbone
    batch_keys: ClassVar[frozenset[str]] = CAPTION_KEYS  # batch entries the task reads; the pipeline is told

    @classmethod
    def from_config(cls, cfg: Config, vocab_size: int) -> "PretextTask":
        raise NotImplementedError

    def forward(self, batch: dict[str, Tensor]) -> TaskOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def for_inference(self) -> "PretextTask":
        """An eval-mode view of this task whose backbone is :meth:`Backbone.for_inference` (a ResNet's
        BatchNorms folded): decoding and scoring run the backbone once per image, so they gain what
        feature extraction gains. The heads are shared, not copied (and left in eval mode)."""
        fast = copy.copy(self)
        fast._modules = dict(self._modules)  # a dict of its own: the original keeps its backbone
        fast.visual = self.visual.for_inference()
        return fast.eval()

    def param_groups(self, train_cfg: Any) -> list[dict[str, Any]]:
        """Four groups: visual and textual, each with and without weight decay.

        ``visual.*`` trains at ``lr_backbone`` with decay on every tensor but those the backbone lists in
        ``no_weight_decay()`` (none for ResNets, BatchNorm included, as in VirTex); the rest at ``lr_textual`` with no decay on normalisation weights/biases and on biases.
        VirTex decays the output and visual_projection biases; capvis does not decay any head bias.
        Shared (tied) tensors appear once, under their first name.
        """
        groups: dict[str, dict[str, Any]] = {}
        seen: set[int] = set()
        visual_no_decay = {f"visual.{n}" for n in self.visual.no_weight_decay()}
        for module_name, module in self.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                if not param.requires_grad or id(param) in seen:
                    continue
                seen.add(id(param))
                name = f"{module_name}.{param_name}" if module_name else param_name
                visual = name.startswith("visual.")
                if visual:  # the backbone's own rule: ResNets decay everything (VirTex), timm models not norms
                    decay = name not in visual_no_decay
                else:
                    decay = not (isinstance(module, _NORMS) or param_name.endswith("bias"))
                key = f"{'visual' if visual else 'textual'}/{'decay' if decay else 'no_decay'}"
                group = groups.setdefault(key, {
                    "name": key, "params": [], "param_names": [],
                    "lr": train_cfg.lr_backbone if visual else train_cfg.lr_textual,
                    "weight_decay": train_cfg.weight_decay if decay else 0.0})
                group["params"].append(param)
                group["param_names"].append(name)
        order = ("visual/decay", "visual/no_decay", "textual/decay", "textual/no_decay")
        return [groups[k] for k in order if k in groups]


def caption_lengths(batch: dict[str, Tensor]) -> Tensor:
    """Tokens a caption has, [SOS] and [EOS] included: the collate's ``caption_lengths`` when the batch
    carries them (computed once per batch), else the non-padding count of ``caption_tokens``."""
    if "caption_lengths" in batch:
        return batch["caption_lengths"]
    return (batch["caption_tokens"] != PAD_ID).sum(dim=1)


def head_sizes(t: Any, max_len: int) -> dict[str, Any]:
    """The Transformer sizes of a ``TextualConfig`` as keyword arguments: every textual head and text
    encoder of every task is built from this one place."""
    return {"hidden": t.hidden, "layers": t.layers, "heads": t.heads, "feedforward": t.feedforward,
            "dropout": t.dropout, "norm_first": t.norm_first, "max_len": max_len}


def build_task(cfg: Config, vocab_size: int) -> PretextTask:
    """The task named by ``cfg.model.task``, freshly initialised."""
    return TASKS.get(cfg.model.task).from_config(cfg, vocab_size)


def count_parameters(task: nn.Module) -> dict[str, int]:
    """Unique parameter elements (shared tensors counted once): ``total``, ``visual`` and ``textual``
    (``textual`` = everything outside ``visual.*``)."""
    counts = {"total": 0, "visual": 0, "textual": 0}
    for name, param in task.named_parameters():  # named_parameters already skips repeated tensors
        part = "visual" if name.startswith("visual.") else "textual"
        counts[part] += param.numel()
        counts["total"] += param.numel()
    return counts
