"""Configs as data: nested frozen dataclasses, loaded from YAML with dotted ``key=value`` overrides.

A YAML file may name a ``_base_`` file (relative to itself) whose values it overrides. Unknown
keys and wrong types fail with one line naming the key, before any work starts; derived values
(attention heads, feed-forward width) are filled in at validation time, never as stale defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from capvis.errors import ConfigError

PACKAGE_CONFIGS = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class DataConfig:
    train: str = ""  # annotation file (COCO captions JSON, JSONL, CSV) or a shard pattern
    val: str = ""
    train_images: str = ""  # image folder; default derived from the annotation file
    val_images: str = ""
    vocab: str = ""  # SentencePiece .model; the model's vocab size is read from it
    image_size: int = 224
    max_caption_length: int = 30
    num_workers: int = 4
    one_caption_per_image: bool = False  # keep one seeded caption per image
    fraction: float = 1.0  # seeded fraction of training images (data-efficiency runs)
    crop_scale: tuple[float, float] = (0.2, 1.0)  # random-resized-crop area range
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # b, c, s, h
    color_jitter_p: float = 0.8
    hflip_p: float = 0.5
    max_bad_fraction: float = 0.01  # fail once more than this share of samples is unreadable
    shuffle_buffer: int = 1000  # streaming (shard) datasets only
    decode_device: str = "cpu"  # shards: cpu (loader workers) | cuda (JPEGs decoded a batch at a time on the GPU)


@dataclass(frozen=True)
class TextualConfig:
    layers: int = 1
    hidden: int = 2048
    heads: int = 0  # 0: hidden // 64, as in the paper
    feedforward: int = 0  # 0: 4 * hidden
    dropout: float = 0.1
    norm_first: bool = False  # the original VirTex is post-norm
    parallel_fraction: float = 0.0  # captioning: share of samples trained by parallel prediction (CapPa: 0.75)


@dataclass(frozen=True)
class MaskedLMConfig:
    mask_proportion: float = 0.15
    mask_probability: float = 0.80  # of the selected tokens, replaced by [MASK]
    replace_probability: float = 0.10  # of the selected tokens, replaced by a random token


@dataclass(frozen=True)
class ContrastiveConfig:
    embed_dim: int = 256
    loss: str = "infonce"  # contrastive, coca: infonce (CLIP's batch softmax) | siglip (pairwise sigmoid)
    init_temperature: float = 0.0  # 0: the loss's own (infonce 0.07 as CLIP; siglip 0.1, t' = log 10)
    init_bias: float = -10.0  # siglip: initial logit bias b (SigLIP's -10)
    text_encoder: str = ""  # icmlm: a capvis masked-LM checkpoint for the frozen text encoder
    text_pool: str = "mean"  # text feature: mean (over non-pad tokens) | eos (the [EOS] / last token's state)


@dataclass(frozen=True)
class CocaConfig:
    # coca: caption_weight * captioning + contrastive_weight * contrastive (open_clip's defaults 2 and 1);
    # the contrastive side takes its sizes and loss from model.contrastive.
    caption_weight: float = 2.0
    contrastive_weight: float = 1.0
    bidirectional: bool = False  # also a backward captioning head (VirTex's bicaptioning)
    image_pool: str = "attention"  # image embedding: attention (one learned query, CoCa's) | mean (GAP)


@dataclass(frozen=True)
class ICMLMConfig:
    # Checkpoint (masked_lm or contrastive, same vocabulary) whose text side becomes the frozen text
    # encoder; "" falls back to model.contrastive.text_encoder, then to a random frozen encoder.
    text_encoder: str = ""


@dataclass(frozen=True)
class ClassificationConfig:
    loss: str = "softmax"  # token_classification: softmax (CE on 1/K targets, as VirTex) | bce (one-vs-all)


@dataclass(frozen=True)
class ModelConfig:
    task: str = "bicaptioning"
    backbone: str = "resnet50"
    small_stem: bool = False  # 3x3 stem without max-pool, for small images
    stem_stride: int = 1  # stride of the small stem
    visual_width: int = 64  # base width of the ResNet (64: torchvision's; narrower is faster)
    zero_init_residual: bool = True
    visual_norm: str = "batch"  # batch | group | frozen
    pool: str = "avg"  # pooled features for frozen evaluations: avg (grid / patch-token mean) | token (a ViT's class token)
    activation_checkpointing: bool = False  # recompute backbone stages and textual layers in backward
    vocab_size: int = 10000  # used only when data.vocab is not given
    num_categories: int = 80  # multilabel_classification
    textual: TextualConfig = field(default_factory=TextualConfig)
    masked_lm: MaskedLMConfig = field(default_factory=MaskedLMConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    icmlm: ICMLMConfig = field(default_factory=ICMLMConfig)
    coca: CocaConfig = field(default_factory=CocaConfig)
    classification: ClassificationConfig = field(default_factory=ClassificationConfig)


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 256  # global, split evenly over processes
    iterations: int = 500_000
    warmup: int = 10_000
    lr_backbone: float = 0.2
    lr_textual: float = 1e-3
    optimizer: str = "sgd"  # sgd | adamw
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lookahead: bool = True
    lookahead_alpha: float = 0.5
    lookahead_k: int = 5
    schedule: str = "cosine"  # cosine | linear | none
    clip_grad_norm: float = 10.0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (auto: bf16 on CUDA, fp32 on CPU)
    channels_last: bool = True  # on CUDA only (slower on CPU, measured)
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    log_every: int = 20
    checkpoint_every: int = 2000
    val_every: int = 0  # 0: at each checkpoint
    val_batches: int = 50  # cap on validation batches (0: whole val set)
    keep_checkpoints: int = 5
    max_bad_steps: int = 10  # consecutive non-finite losses before the run stops
    accumulate: int = 1  # micro-batches per optimizer step; batch_size stays the global batch of a step
    compile: bool = False  # torch.compile the task (eager, with one warning, where the backend is missing)
    compile_backend: str = "inductor"  # torch.compile backend (inductor | aot_eager | eager | ...)
    strategy: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard; sharded checkpoints) for multi-process runs


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# Loading


def resolve_config_path(path: str | Path) -> Path:
    """A file path, or the name of a bundled config (``demo``, ``bicaptioning_R_50_L1_H2048``)."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        raise ConfigError(f"config {path} is a directory; give a YAML file or the name of a bundled config")
    for candidate in (PACKAGE_CONFIGS / p, PACKAGE_CONFIGS / f"{p}.yaml", PACKAGE_CONFIGS / p.name):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file not found: {path}")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path.resolve() in seen:
        raise ConfigError(f"{path}: _base_ chain loops back on itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping, not {type(data).__name__}")
    base = data.pop("_base_", None)
    if base is None:
        return data
    merged = _read_yaml((path.parent / base), seen + (path.resolve(),))
    return _deep_merge(merged, data)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["train.iterations=5", "model.textual.hidden=512"]`` -> a nested dict of typed values."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None), apply overrides, validate."""
    data = _read_yaml(resolve_config_path(path)) if path else {}
    data = _deep_merge(data, parse_overrides(overrides))
    return validate(build(Config, data))


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...] | dict[str, Any]) -> Config:
    """A new config with dotted overrides applied on top of ``cfg``."""
    extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    return validate(build(Config, _deep_merge(cfg.to_dict(), extra)))


def config_from_dict(data: dict[str, Any]) -> Config:
    return validate(build(Config, data))


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from ``data``, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            hint = difflib.get_close_matches(key, names, n=1)
            extra = f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""
            raise ConfigError(f"unknown config key '{full}'{extra}")
        kwargs[key] = _coerce(hints[key], value, full)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return build(tp, value, f"{key}.")
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key '{key}' must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, key) for a, v in zip(args, value))
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isnan(value):
                raise ConfigError(f"config key '{key}' must be a number, got NaN")
            return float(value)
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if value is None:
            return ""
    else:
        return value
    raise ConfigError(f"config key '{key}' must be {tp.__name__}, got {value!r}")


CHOICES = {
    "train.optimizer": ("sgd", "adamw"),
    "train.schedule": ("cosine", "linear", "none"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.strategy": ("ddp", "fsdp"),
    "data.decode_device": ("cpu", "cuda"),
}


def validate(cfg: Config) -> Config:
    """Reject impossible combinations and fill in derived values."""
    flat = {"train.optimizer": cfg.train.optimizer, "train.schedule": cfg.train.schedule,
            "train.precision": cfg.train.precision, "train.device": cfg.train.device,
            "train.strategy": cfg.train.strategy, "data.decode_device": cfg.data.decode_device}
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(allowed)}, got {flat[key]!r}")
    t = cfg.model.textual
    heads = t.heads or t.hidden // 64
    if t.hidden <= 0 or heads <= 0 or t.hidden % heads or (not t.heads and t.hidden % 64):
        raise ConfigError(
            f"model.textual.hidden={t.hidden} must be a positive multiple of 64 (heads = hidden/64) "
            f"or divisible by model.textual.heads={t.heads}")
    if not 0 <= t.parallel_fraction <= 1:
        raise ConfigError(f"model.textual.parallel_fraction must be in [0, 1], got {t.parallel_fraction}")
    textual = dataclasses.replace(t, heads=heads, feedforward=t.feedforward or 4 * t.hidden)
    positive = {"data.image_size": cfg.data.image_size, "data.max_caption_length": cfg.data.max_caption_length,
                "train.batch_size": cfg.train.batch_size, "train.iterations": cfg.train.iterations,
                "train.log_every": cfg.train.log_every, "train.checkpoint_every": cfg.train.checkpoint_every,
                "model.textual.layers": t.layers, "train.accumulate": cfg.train.accumulate}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {value}")
    rates = {"train.lr_backbone": cfg.train.lr_backbone, "train.lr_textual": cfg.train.lr_textual,
             "train.weight_decay": cfg.train.weight_decay, "train.momentum": cfg.train.momentum}
    for key, value in rates.items():
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"config key '{key}' must be a finite number >= 0, got {value}")
    if cfg.data.max_caption_length < 3:
        raise ConfigError("data.max_caption_length must be at least 3 ([SOS], a token, [EOS])")
    if not 0 < cfg.data.fraction <= 1:
        raise ConfigError(f"data.fraction must be in (0, 1], got {cfg.data.fraction}")
    if cfg.train.warmup < 0 or cfg.train.warmup > cfg.train.iterations:
        raise ConfigError(f"train.warmup={cfg.train.warmup} must lie in [0, train.iterations={cfg.train.iterations}]")
    lo, hi = cfg.data.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"data.crop_scale must satisfy 0 < min <= max <= 1, got {cfg.data.crop_scale}")
    model = dataclasses.replace(cfg.model, textual=textual)
    return dataclasses.replace(cfg, model=model)


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
