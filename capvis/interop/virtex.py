"""Import checkpoints of the original VirTex code (kdexd/virtex) as capvis checkpoints.

capvis's state-dict keys already mirror the original's (``visual.cnn.*``, ``textual.*``,
``backward_textual.*``, with ``torch.nn.TransformerDecoderLayer`` names inside), and its textual
head computes what the original's does: post-norm layers (``norm1(x + self_attn)``,
``norm2(x + cross_attn)``, ``norm3(x + ffn)``), GELU, learned positions, embedding LayerNorm eps 1e-8,
padding positions zeroed, output tied to the word embedding. So conversion is: unwrap the file
(``{"model": state_dict, ...}`` or a bare state dict, ``module.`` prefixes stripped), infer the
architecture from tensor shapes, check that tensors capvis ties hold equal values, and load strictly.

Inferred from shapes: backbone (any registered ResNet, matched on its full key/shape list), hidden
size, layers, feed-forward width, vocabulary size, caption length (positional rows), pre- or
post-norm (a final ``transformer.norm``), task (``backward_textual.*`` -> bicaptioning). Not
inferable: attention heads (the paper always uses hidden/64) and masked-LM vs captioning (same keys);
pass a config for those.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import capvis
from capvis.config import Config, apply_overrides, load_config
from capvis.data.tokenizer import Tokenizer
from capvis.errors import CheckpointError

log = logging.getLogger(__name__)
BASE_CONFIG = "bicaptioning_R_50_L1_H2048"  # the paper's recipe: data and train sections of a converted model
_LAYER = re.compile(r"^textual\.transformer\.layers\.(\d+)\.")


def read_original(path: str | Path) -> tuple[dict[str, Tensor], int]:
    """``(state_dict, iteration)`` of an original VirTex checkpoint file (tensors only, no pickle code)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors, truncated files, non-torch files
        raise CheckpointError(f"{path} cannot be read as a VirTex checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return unwrap(obj, str(path)), int(obj.get("iteration", 0)) if isinstance(obj, dict) else 0


def unwrap(obj: Any, where: str = "checkpoint") -> dict[str, Tensor]:
    """The model state dict inside ``obj``, without DDP's ``module.`` prefix."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{where} holds no model state dict (expected {{'model': state_dict, ...}} "
                              "or a bare state dict)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def convert_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Original key names -> capvis key names (identical today; kept as the one place to map)."""
    return dict(state)


# ---------------------------------------------------------------------------------------------
# Architecture from shapes


def infer_backbone(state: dict[str, Tensor]) -> tuple[str, bool]:
    """``(registry name, small_stem)`` of the ResNet whose key/shape list equals ``visual.cnn.*``."""
    from capvis.models.backbones.resnet import RESNETS

    cnn = {k[len("visual.cnn."):]: tuple(v.shape) for k, v in state.items() if k.startswith("visual.cnn.")}
    if not cnn:
        raise CheckpointError("the checkpoint has no visual.cnn.* tensors; is it a VirTex model?")
    small_stem = cnn.get("conv1.weight", (0, 0, 7, 7))[-1] == 3
    for name in RESNETS:  # VirTex trained torchvision ResNets only
        if _backbone_shapes(name, small_stem) == cnn:
            return name, small_stem
    raise CheckpointError(f"visual.cnn.* ({len(cnn)} tensors) matches none of the backbones {', '.join(RESNETS)}")


@functools.lru_cache(maxsize=None)
def _backbone_shapes(name: str, small_stem: bool) -> dict[str, tuple[int, ...]]:
    from capvis.models.backbones import build_backbone

    with torch.device("meta"):
        cnn = build_backbone(name, small_stem=small_stem).cnn
    return {k: tuple(v.shape) for k, v in cnn.state_dict().items()}


def infer_overrides(state: dict[str, Tensor]) -> dict[str, Any]:
    """Config values (nested dict) that the tensor shapes fix."""
    if "textual.visual_projection.weight" not in state or "textual.embedding.words.weight" not in state:
        raise CheckpointError("the checkpoint has no textual.visual_projection / textual.embedding tensors; "
                              "only captioning and bicaptioning (VirTex) checkpoints can be imported")
    backbone, small_stem = infer_backbone(state)
    hidden = state["textual.visual_projection.weight"].shape[0]
    layers = len({int(m.group(1)) for k in state if (m := _LAYER.match(k))})
    if layers == 0:
        raise CheckpointError("the checkpoint's textual head has no transformer layers (a linear head); "
                              "only Transformer textual heads can be imported")
    return {
        "data": {"max_caption_length": state["textual.embedding.positions.weight"].shape[0], "vocab": ""},
        "model": {
            "task": "bicaptioning" if any(k.startswith("backward_textual.") for k in state) else "captioning",
            "backbone": backbone, "small_stem": small_stem, "visual_norm": "batch",
            "vocab_size": state["textual.embedding.words.weight"].shape[0],
            "textual": {"hidden": hidden, "layers": layers,
                        "feedforward": state["textual.transformer.layers.0.linear1.weight"].shape[0],
                        "norm_first": "textual.transformer.norm.weight" in state},
        },
    }


def infer_config(state: dict[str, Tensor], config: str | Path | None = None) -> Config:
    """The capvis config of ``state``: shapes decide the architecture; ``config`` (a file or bundled
    name) supplies the rest (default: the paper's recipe) and must agree with the shapes."""
    shapes = infer_overrides(state)
    if config is None:
        shapes["model"]["textual"]["heads"] = 0  # re-derived as hidden / 64, the paper's convention
        return apply_overrides(load_config(BASE_CONFIG), shapes)
    given = load_config(config)
    merged = apply_overrides(given, shapes)
    diffs = [f"{k}: config {a!r} vs checkpoint {b!r}" for k, a, b in _arch(given, merged) if a != b]
    if diffs:
        raise CheckpointError(f"config {config} does not describe this checkpoint ({'; '.join(diffs)})")
    return merged


def _arch(a: Config, b: Config) -> list[tuple[str, Any, Any]]:
    keys = ("task", "backbone", "small_stem")
    tkeys = ("hidden", "layers", "feedforward", "norm_first")
    return ([(f"model.{k}", getattr(a.model, k), getattr(b.model, k)) for k in keys]
            + [(f"model.textual.{k}", getattr(a.model.textual, k), getattr(b.model.textual, k)) for k in tkeys]
            + [("data.max_caption_length", a.data.max_caption_length, b.data.max_caption_length)])


# ---------------------------------------------------------------------------------------------
# Conversion


def check_tied(task: torch.nn.Module, state: dict[str, Tensor]) -> None:
    """Tensors that capvis ties (one parameter, several names) must hold equal values in ``state``."""
    by_id: dict[int, list[str]] = {}
    for name, param in task.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    for names in by_id.values():
        present = [n for n in names if n in state]
        first = state[present[0]] if present else None
        for other in present[1:]:
            t = state[other]
            if t is first or (not t.is_meta and t.data_ptr() == first.data_ptr() and t.shape == first.shape):
                continue
            if t.is_meta or first.is_meta or not torch.equal(first, t):
                raise CheckpointError(f"{present[0]} and {other} are one tensor in VirTex but differ in this "
                                      "checkpoint; it was not written by the original code")


def convert(state: dict[str, Tensor], config: str | Path | None = None) -> tuple[Config, dict[str, Tensor]]:
    """``(config, capvis state dict)``; raises CheckpointError on any missing/unexpected key or shape."""
    from capvis.tasks import build_task

    state = convert_state_dict(state)
    cfg = infer_config(state, config)
    with torch.device("meta"):
        skeleton = build_task(cfg, cfg.model.vocab_size)
    expected = skeleton.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise CheckpointError(f"checkpoint does not map onto capvis {cfg.model.task}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")
    check_tied(skeleton, state)
    return cfg, {k: state[k] for k in expected}


def import_virtex(checkpoint: str | Path, vocab: str | Path, output: str | Path, *,
                  config: str | Path | None = None) -> Path:
    """Convert an original VirTex checkpoint into a capvis checkpoint that carries config and vocabulary.

    The result loads with :func:`capvis.loading.load_pretrained` / :func:`capvis.load`; it has no
    optimizer state (the original's per-parameter SGD groups do not map), so it starts fine-tuning
    or evaluation, not a resumed pretraining run.
    """
    from capvis.release import build_loaded_task
    from capvis.storage import atomic_save

    state, iteration = read_original(checkpoint)
    tokenizer = Tokenizer(vocab)
    cfg, converted = convert(state, config)
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise CheckpointError(f"vocabulary {vocab} has {tokenizer.vocab_size} pieces but the checkpoint's word "
                              f"embedding has {cfg.model.vocab_size} rows; pass the vocabulary it was trained with")
    task = build_loaded_task(cfg, cfg.model.vocab_size, converted, where=str(checkpoint))
    payload = {"model": task.state_dict(), "iteration": iteration, "config": cfg.to_dict(),
               "vocab": tokenizer.model_bytes, "capvis_version": capvis.__version__,
               "imported_from": {"format": "virtex", "file": Path(checkpoint).name}}
    log.info("converted %s (%s, %s, L%d H%d, iteration %d)", checkpoint, cfg.model.task, cfg.model.backbone,
             cfg.model.textual.layers, cfg.model.textual.hidden, iteration)
    return atomic_save(payload, output)
