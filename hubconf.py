"""torch.hub entry points: one per architecture of the VirTex paper, all offline.

    torch.hub.load(REPO_DIR, "bicaptioning_r50_l1_h2048", source="local", weights="release.tar")

Every entry is ``fn(weights=None, part="backbone", **overrides)``:

- ``weights``: a capvis release (directory or archive), training checkpoint, run directory, or the
  name of a release under ``$CAPVIS_HOME/releases``. Its architecture must be the entry's.
  ``weights=None`` gives a RANDOMLY INITIALISED model of that architecture (nothing is downloaded).
- ``part``: ``"backbone"`` (a ``VisualBackbone`` in eval mode; forward -> (B, C, h, w) grid) or
  ``"model"`` (the whole pretraining task, with ``.tokenizer`` when the weights carry one).
- ``overrides``: config values as keyword arguments, ``__`` for the dots:
  ``model__textual__dropout=0.0`` is ``model.textual.dropout=0.0``.

Entry ``bicaptioning_r50_l1_h2048`` is the bundled config ``bicaptioning_R_50_L1_H2048`` (and so on
for every pretraining config of the paper: widths, depths, captioning, R-101, R-50 W2X).
"""

dependencies = ["torch", "torchvision"]

_PAPER_CONFIGS = (
    "bicaptioning_R_50_L1_H512", "bicaptioning_R_50_L1_H768", "bicaptioning_R_50_L1_H1024",
    "bicaptioning_R_50_L1_H2048", "bicaptioning_R_50_L2_H1024", "bicaptioning_R_50_L3_H1024",
    "bicaptioning_R_50_L4_H1024", "captioning_R_50_L1_H2048", "bicaptioning_R_101_L1_H1024",
    "bicaptioning_R_50W2X_L1_H1024",
)


def _overrides(kwargs):
    return tuple(f"{key.replace('__', '.')}={value}" for key, value in kwargs.items())


def _architecture(cfg):
    m = cfg.model
    return {"model.task": m.task, "model.backbone": m.backbone, "model.small_stem": m.small_stem,
            "model.textual.layers": m.textual.layers, "model.textual.hidden": m.textual.hidden}


def _build(config_name, weights, part, overrides):
    from capvis.config import load_config
    from capvis.errors import CheckpointError, ConfigError
    from capvis.hub import PARTS, load

    if part not in PARTS:
        raise ConfigError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    entry = _entry_name(config_name)
    cfg = load_config(config_name, _overrides(overrides))
    if weights is None:
        from capvis.models.backbones import build_visual
        from capvis.tasks import build_task

        module = build_visual(cfg.model) if part == "backbone" else build_task(cfg, cfg.model.vocab_size)
        module.config = cfg
        if part == "model":
            module.tokenizer = None
        return module.eval()
    module = load(weights, part, overrides=_overrides(overrides))
    want, got = _architecture(cfg), _architecture(module.config)
    diffs = [f"{k}={got[k]!r} (entry: {want[k]!r})" for k in want if want[k] != got[k]]
    if diffs:
        raise CheckpointError(f"{weights} is not a {entry} model: {', '.join(diffs)}")
    return module


def _entry_name(config_name):
    return config_name.lower().replace("_r_", "_r")  # bicaptioning_R_50_L1_H2048 -> bicaptioning_r50_l1_h2048


def _entry(config_name):
    def entry(weights=None, part="backbone", **overrides):
        return _build(config_name, weights, part, overrides)

    entry.__name__ = entry.__qualname__ = _entry_name(config_name)
    entry.__doc__ = (f"VirTex {config_name} (capvis config {config_name!r}).\n\n"
                     "weights: release/checkpoint path or release name; None = RANDOM INIT (no download).\n"
                     "part: 'backbone' (eval-mode VisualBackbone) or 'model' (pretraining task + tokenizer).\n"
                     "overrides: config values as keywords, '__' for dots (model__textual__dropout=0.0).")
    return entry


for _name in _PAPER_CONFIGS:
    globals()[_entry_name(_name)] = _entry(_name)
del _name
