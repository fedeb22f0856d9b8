"""Rebuild a pretrained model from a checkpoint alone, or a random one from a config.

Every evaluator starts here: ``load_pretrained(CKPT)`` reads the config and vocabulary that the
checkpoint carries, builds the task and loads its weights; ``load_pretrained("random", config=...)``
gives the randomly initialised baseline that every table needs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from capvis.config import Config, apply_overrides, config_from_dict, load_config
from capvis.data.tokenizer import Tokenizer, tokenizer_of_config, vocab_size_of
from capvis.errors import CheckpointError, ConfigError
from capvis.release import build_loaded_task, is_release, read_release, save_release
from capvis.tasks import build_task
from capvis.tasks.base import PretextTask

log = logging.getLogger(__name__)


@dataclass
class Pretrained:
    task: PretextTask  # eval mode
    config: Config
    tokenizer: Tokenizer | None
    source: str  # checkpoint path or "random"
    iteration: int = 0

    @property
    def backbone(self) -> torch.nn.Module:
        return self.task.visual


def load_pretrained(checkpoint: str | Path, *, config: str | Path | None = None, overrides: tuple[str, ...] = (),
                    map_location: str | torch.device = "cpu", seed: int = 0) -> Pretrained:
    """A task rebuilt from ``checkpoint`` (a release, a training checkpoint, or a run directory, whose
    newest valid checkpoint is used), or ``"random"`` with ``config`` for the random-init baseline."""
    from capvis import storage as ckpt

    if str(checkpoint) == "random":
        if config is None:
            raise ConfigError("--checkpoint random needs --config FILE to define the model")
        cfg = load_config(config, overrides)
        tokenizer = tokenizer_of_config(cfg)
        torch.manual_seed(seed)
        return Pretrained(build_task(cfg, vocab_size_of(tokenizer, cfg)).eval(), cfg, tokenizer, "random")
    path = Path(checkpoint)
    if is_release(path):  # safetensors + config.json + vocab.model, a directory or an archive
        release = read_release(path)
        cfg = apply_overrides(release.config, overrides) if overrides else release.config
        task = build_loaded_task(cfg, release.vocab_size, release.state, where=str(path))
        return Pretrained(task.eval(), cfg, release.tokenizer, str(path))
    if path.is_dir():
        found = ckpt.latest_valid_checkpoint(path / "checkpoints" if (path / "checkpoints").is_dir() else path)
        if found is None:
            raise CheckpointError(f"no valid checkpoint in {path}")
        path, state = found
    else:
        state = ckpt.load_checkpoint(path, map_location=map_location)
    if "config" not in state:
        raise CheckpointError(f"{path} carries no config; was it written by capvis?")
    cfg = config_from_dict(state["config"])
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    tokenizer = Tokenizer.from_bytes(state["vocab"]) if state.get("vocab") else None
    vocab_size = vocab_size_of(tokenizer, cfg)
    task = build_task(cfg, vocab_size)
    try:
        task.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model ({str(exc).splitlines()[0]})") from None
    return Pretrained(task.eval(), cfg, tokenizer, str(path), int(state.get("iteration", 0)))


def release_from_checkpoint(checkpoint: str | Path, output: str | Path) -> Path:
    """A training checkpoint (or run directory) -> release at ``output``."""
    pre = load_pretrained(checkpoint)
    return save_release(pre.task, pre.config, pre.tokenizer, output, iteration=pre.iteration,
                        source=Path(pre.source).name)
