"""Checkpoint storage: atomic, checksummed writes and loads that never run code.

Below data, models and tasks (all of them read or write checkpoints); the training-state side
(``collect_state``, RNG capture) is :mod:`capvis.train.checkpoint`.

A checkpoint is written to a temporary file in the same directory, fsync'd, and renamed over
its final name, so a crash or a full disk never leaves a half-written file under a real name.
Its SHA-256 goes to a ``.sha256`` sidecar (written the same way), verified on load; a corrupt
newest checkpoint is reported and the previous good one is used. The last K are kept.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capvis.errors import CheckpointError

log = logging.getLogger(__name__)
CHECKPOINT_RE = re.compile(r"checkpoint_(\d+)\.pt$")


@functools.cache
def _umask() -> int:
    """The process umask, read once (os.umask can only read it by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(data: bytes, path: Path, *, mode: int | None = None) -> None:
    """Write ``path`` whole or not at all (temporary file, fsync, rename, directory fsync); ``mode``
    defaults to what a plain ``open`` would give (0666 less the umask), not mkstemp's 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask() if mode is None else mode)  # 0600 would hide files from a team
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_save(state: dict[str, Any], path: str | Path) -> Path:
    """Serialise ``state`` to ``path`` atomically, with a checksum sidecar.

    Raises CheckpointError (and leaves every earlier file intact) if the disk is full or read-only.
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    try:
        atomic_write_bytes(data, path)
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        atomic_write_bytes(f"{hashlib.sha256(data).hexdigest()}  {path.name}\n".encode(), _sidecar(path))
    except OSError as exc:  # an unverifiable checkpoint is not kept: all or nothing
        path.unlink(missing_ok=True)
        raise _write_error(path, exc) from None
    return path


def _write_error(path: Path, exc: OSError) -> CheckpointError:
    earlier = [p for p in list_checkpoints(path.parent) if p != path]
    kept = f"the newest earlier checkpoint {earlier[-1].name} is intact" if earlier else "no earlier checkpoint exists"
    return CheckpointError(f"could not write checkpoint {path}: {exc.strerror or exc}; {kept}")


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint, verifying its checksum when a sidecar exists."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    data = path.read_bytes()
    side = _sidecar(path)
    if side.is_file():
        expected = side.read_text().split()[0] if side.read_text().strip() else ""
        if hashlib.sha256(data).hexdigest() != expected:
            raise CheckpointError(f"checkpoint {path} is corrupt (checksum mismatch)")
    state = safe_torch_load(data, path, map_location=map_location)
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a capvis checkpoint (no 'model' entry)")
    return state


def _legacy_globals() -> list[Any]:
    """What checkpoints of capvis 0.1 need beyond tensors and plain containers: numpy's array
    reconstruction (its global RNG state was saved as an ndarray). These build arrays and run no code."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def safe_torch_load(data: bytes, path: str | Path, *, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``: tensors, plain containers, numbers, strings and bytes,
    plus the numpy arrays older checkpoints carry; anything else (a pickled function call, a class) is
    refused before it can run, with a one-line CheckpointError naming the file."""
    try:
        with torch.serialization.safe_globals(_legacy_globals()):
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        culprit = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if culprit is None:  # not a pickle of ours at all (random bytes, another format)
            raise CheckpointError(f"checkpoint {path} cannot be read (not a PyTorch checkpoint file)") from None
        raise CheckpointError(f"checkpoint {path} refused: it holds {culprit.group(1)}, a pickled call or object "
                              "outside tensors and plain data; capvis never runs code from a file") from None
    except Exception as exc:  # truncated zip, not a torch file, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {first[:200]})") from None


def checkpoint_path(directory: str | Path, iteration: int) -> Path:
    return Path(directory) / f"checkpoint_{iteration:08d}.pt"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_RE.search(p.name))]
    return [p for _, p in sorted(found)]


def latest_valid_checkpoint(directory: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads and verifies; corrupt ones are reported and skipped."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            log.warning("%s; falling back to the previous checkpoint", exc)
    return None


def prune_checkpoints(directory: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (0: keep all), and temporary files a crash left."""
    for tmp in Path(directory).glob(".checkpoint_*.tmp"):
        tmp.unlink(missing_ok=True)
    if keep <= 0:
        return
    for path in list_checkpoints(directory)[:-keep]:
        path.unlink(missing_ok=True)
        _sidecar(path).unlink(missing_ok=True)
