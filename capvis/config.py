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
from typing import Any, Callable

import yaml

from capvis.config_checks import validate
from capvis.errors import ConfigError
from capvis.registry import Registry

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
    cache_images_mb: int = 1024  # decoded images kept in memory (map-style data; shared among the workers)
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
    label_smoothing: float = 0.0  # captioning: cross-entropy label smoothing (VirTex: none)


# ---------------------------------------------------------------------------------------------
# Task sections: each pretext task owns the dataclass of its options and registers it here, so adding a
# task never touches this file. Sections register when their package is imported; the first lookup of a
# section imports capvis.tasks and the packages with a ``capvis.plugins`` entry point (third-party tasks).

SECTIONS: Registry[type] = Registry("config section")
PLUGIN_GROUP = "capvis.plugins"
BUILTIN_PLUGINS = ("capvis.tasks",)
_plugins_loaded = False


def config_section(name: str) -> Callable[[type], type]:
    """Class decorator: ``model.<name>`` in YAML and overrides, ``cfg.model.<name>`` in code.

    A section may declare ``MOVED: ClassVar[dict[str, str]]`` (an old key of the section -> its new
    place, ``other_section.key``), so configs saved before a key moved still load."""
    def register(cls: type) -> type:
        if not dataclasses.is_dataclass(cls) or name in _MODEL_FIELDS:
            raise TypeError(f"config section {name!r}: a dataclass whose name is not a model field")
        return SECTIONS.register(name)(cls)
    return register


def _load_plugins() -> None:
    """Import the packages that register task sections: capvis's own tasks, then every package that
    declares a ``capvis.plugins`` entry point. Named here by string, as a plug-in to discover: this
    module depends on none of their code (they import it), and runs this only on a section lookup."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    import importlib
    from importlib.metadata import entry_points

    for name in BUILTIN_PLUGINS:
        importlib.import_module(name)
    for point in entry_points(group=PLUGIN_GROUP):
        point.load()


def section_class(name: str) -> type | None:
    """The dataclass registered for ``model.<name>``, or None (plugins are loaded on the first miss)."""
    if name not in SECTIONS:
        _load_plugins()
    return SECTIONS.get(name) if name in SECTIONS else None


def section_classes() -> dict[str, type]:
    """Every registered task section, name -> dataclass, in name order."""
    _load_plugins()
    return {name: SECTIONS.get(name) for name in SECTIONS.names()}


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
    # Task sections (model.masked_lm, model.contrastive, ...): owned and registered by their task modules
    # (config_section); read as attributes, ``cfg.model.<name>``. Every registered section is present.
    sections: tuple[tuple[str, Any], ...] = ()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        for key, value in object.__getattribute__(self, "sections"):
            if key == name:
                return value
        cls = section_class(name)
        if cls is None:
            raise AttributeError(f"ModelConfig has no field or task section {name!r}")
        return cls()


_MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name != "sections")


def field_types(cls: type) -> dict[str, Any]:
    """A config dataclass's keys -> their types, as YAML sees them (ModelConfig: its task sections too)."""
    hints = typing.get_type_hints(cls)
    keys = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name != "sections" or cls is not ModelConfig}
    return {**keys, **section_classes()} if cls is ModelConfig else keys


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
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (auto: bf16 on CUDA and AMX CPUs, else fp32)
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
    model: ModelConfig = field(default_factory=lambda: _build_model({}, "model."))  # every section
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict; task sections appear under ``model`` by name, as in YAML."""
        data = dataclasses.asdict(self)
        data["model"].pop("sections")
        for name in section_classes():
            data["model"][name] = dataclasses.asdict(getattr(self.model, name))
        return _to_plain(data)


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
    if cls is ModelConfig:
        return _build_model(data, prefix)
    return cls(**_build_fields(cls, data, prefix))


def _build_fields(cls: type, data: dict[str, Any], prefix: str, extra_names: tuple[str, ...] = ()
                  ) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            hint = difflib.get_close_matches(key, [*names, *extra_names], n=1)
            extra = f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""
            raise ConfigError(f"unknown config key '{full}'{extra}")
        kwargs[key] = _coerce(hints[key], value, full)
    return kwargs


def _build_model(data: dict[str, Any], prefix: str) -> "ModelConfig":
    """ModelConfig: its own fields, plus every registered task section (given values over defaults)."""
    if "sections" in data:
        raise ConfigError(f"unknown config key '{prefix}sections'")
    known = section_classes()
    own = {k: v for k, v in data.items() if k not in known}
    given = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items() if k in known}
    for name in list(given):
        if isinstance(given[name], dict):
            given[name] = _moved(known[name], given[name], given)
    kwargs = _build_fields(ModelConfig, own, prefix, tuple(known))
    sections = tuple((name, build(section, given.get(name, {}), f"{prefix}{name}."))
                     for name, section in known.items())
    return ModelConfig(**kwargs, sections=sections)


def _moved(section: type, value: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """Apply a section's ``MOVED`` keys (old key -> ``other_section.key``): a non-empty old value goes
    to its new place unless that is set; the old key is dropped either way."""
    for old, new in getattr(section, "MOVED", {}).items():
        if old not in value:
            continue
        moved = value.pop(old)
        head, _, leaf = new.partition(".")
        target = given.setdefault(head, {})
        if moved not in ("", None) and isinstance(target, dict) and not target.get(leaf):
            target[leaf] = moved
    return value


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


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
