"""Training checkpoints: a pure ``collect_state`` (model, optimizer, schedule, RNG streams) written by
the atomic, checksummed storage of :mod:`capvis.storage` (re-exported here for the trainer's callers).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

import capvis
from capvis.storage import (CHECKPOINT_RE, _write_error, atomic_write_bytes, atomic_save, load_checkpoint, safe_torch_load, checkpoint_path, list_checkpoints, latest_valid_checkpoint, prune_checkpoints)  # noqa: F401  (re-exported)


def _numpy_rng_state() -> dict[str, Any]:
    """numpy's global RNG state as a tensor and plain values (an ndarray would need numpy's pickle globals)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"bit_generator": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _set_numpy_rng_state(state: Any) -> None:
    if isinstance(state, dict):
        state = (state["bit_generator"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                 state["cached_gaussian"])
    np.random.set_state(state)  # a tuple: a checkpoint of capvis 0.1 (loaded through the numpy allow-list)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    _set_numpy_rng_state(state["numpy"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def collect_state(*, model: torch.nn.Module, optimizer: Any, scheduler: Any, scaler: Any, iteration: int,
                  config: dict[str, Any], vocab: bytes | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything needed to continue a run exactly, plus what a loader needs to rebuild the model."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "iteration": iteration,
        "rng": rng_state(),
        "config": config,
        "vocab": vocab,
        "capvis_version": capvis.__version__,
        **(extra or {}),
    }
