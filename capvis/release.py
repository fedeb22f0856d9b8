"""The release format: what a trained model is shared as (training checkpoints stay ``torch.save``).

A release is three files, in a directory or flat inside one ``.tar`` / ``.tar.gz`` / ``.zip`` archive:

- ``model.safetensors``: every tensor of the task's state dict (BatchNorm buffers included), tied
  tensors stored once under their first name; no pickle, so loading runs no code.
- ``config.json``: format name and version, capvis version, the full config, vocabulary size, the
  tied names (``{"alias": "stored name"}``), the SHA-256 of the weights file, iteration and source.
- ``vocab.model``: the SentencePiece model (absent only if the checkpoint had no vocabulary).

Reading never extracts an archive to disk and verifies the weights' checksum. Tensors are written
byte for byte, so a round trip checkpoint -> release -> model is bit-exact.

An archive is read into memory, so what a member may decompress to is capped before it is read: at
most :data:`MAX_RATIO` times the bytes it comes from (the member's compressed size in a zip, the
archive's size in a tar; at least :data:`MIN_CAP`), and at most :data:`MEMBER_CAPS` per file. Weights
compress by a few percent at best and a zip bomb by a factor of a thousand, so a bomb is refused in one
line from its header, before anything is decompressed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import capvis
from capvis.config import Config, config_from_dict
from capvis.data.tokenizer import Tokenizer, vocab_size_of
from capvis.errors import CheckpointError

FORMAT = "capvis-release"
FORMAT_VERSION = 1
WEIGHTS, CONFIG, VOCAB = "model.safetensors", "config.json", "vocab.model"
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member times: the same model gives the same archive bytes
MAX_RATIO = 20  # decompressed / compressed bytes a member may reach (float weights: about 1.1)
MIN_CAP = 1 << 20  # small members may always reach 1 MiB, whatever their ratio
MEMBER_CAPS = {CONFIG: 16 << 20, VOCAB: 64 << 20, WEIGHTS: 64 << 30}


@dataclass
class Release:
    config: Config
    tokenizer: Tokenizer | None
    state: dict[str, Tensor]  # every state-dict key (aliases resolved), or the requested prefix only
    meta: dict[str, Any] = field(default_factory=dict)  # the parsed config.json

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])


# ---------------------------------------------------------------------------------------------
# Writing


def tied_names(state: dict[str, Tensor]) -> dict[str, str]:
    """``{alias: first name}`` for state-dict entries that are views of the same tensor."""
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in first:
            aliases[name] = first[key]
        else:
            first.setdefault(key, name)
    return aliases


def release_files(task: nn.Module, cfg: Config, tokenizer: Tokenizer | None, *, vocab_size: int,
                  iteration: int = 0, source: str = "") -> dict[str, bytes]:
    """The release's files as ``{name: bytes}``."""
    from safetensors.torch import save

    state = task.state_dict()
    aliases = tied_names(state)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if k not in aliases}
    weights = save(tensors, metadata={"format": "pt", "capvis_version": capvis.__version__})
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "capvis_version": capvis.__version__,
        "task": cfg.model.task, "vocab_size": int(vocab_size), "iteration": int(iteration), "source": source,
        "weights": WEIGHTS, "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "vocab": VOCAB if tokenizer is not None else None, "tied": aliases, "config": cfg.to_dict(),
    }
    files = {CONFIG: (json.dumps(meta, indent=2) + "\n").encode(), WEIGHTS: weights}
    if tokenizer is not None:
        files[VOCAB] = tokenizer.model_bytes
    return files


def save_release(task: nn.Module, cfg: Config, tokenizer: Tokenizer | None, output: str | Path, *,
                 vocab_size: int | None = None, iteration: int = 0, source: str = "") -> Path:
    """Write ``task`` as a release directory, or an archive when ``output`` ends in .tar/.tar.gz/.tgz/.zip."""
    if vocab_size is None:
        vocab_size = vocab_size_of(tokenizer, cfg)
    files = release_files(task, cfg, tokenizer, vocab_size=vocab_size, iteration=iteration, source=source)
    output = Path(output)
    if is_archive_name(output):
        _atomic_write(_archive_bytes(files, output.name), output)
        return output
    if output.exists() and not output.is_dir():
        raise CheckpointError(f"release output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not (output / CONFIG).is_file():
        raise CheckpointError(f"release output directory {output} is not empty; choose a new directory")
    output.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS, VOCAB, CONFIG):  # config.json last: its presence marks a complete release
        if name in files:
            _atomic_write(files[name], output / name)
        elif (output / name).is_file():
            (output / name).unlink()
    return output


def is_archive_name(path: str | Path) -> bool:
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def _archive_bytes(files: dict[str, bytes], name: str) -> bytes:
    buffer = io.BytesIO()
    if name.lower().endswith(".zip"):
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for member, data in files.items():
                zf.writestr(zipfile.ZipInfo(member, date_time=_ZIP_TIME), data)
    else:
        mode = "w:gz" if name.lower().endswith((".tar.gz", ".tgz")) else "w"
        with tarfile.open(fileobj=buffer, mode=mode, **({"compresslevel": 6} if mode == "w:gz" else {})) as tf:
            for member, data in files.items():
                info = tarfile.TarInfo(member)
                info.size, info.mode = len(data), 0o644
                tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _atomic_write(data: bytes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise CheckpointError(f"could not write {path}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------------
# Reading


def is_release(path: str | Path) -> bool:
    """A directory holding ``config.json`` + ``model.safetensors``, or an archive file by its name."""
    path = Path(path)
    if path.is_dir():
        return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()
    return path.is_file() and is_archive_name(path)


def read_release(path: str | Path, *, prefix: str | None = None) -> Release:
    """Read a release; with ``prefix`` (e.g. ``"visual."``) only the tensors under it are kept."""
    path = Path(path)
    files = _read_files(path)
    try:
        meta = json.loads(files[CONFIG])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: {CONFIG} is missing or not JSON ({exc})") from None
    if meta.get("format") != FORMAT or int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a capvis release of format version <= {FORMAT_VERSION} "
                              f"(format {meta.get('format')!r} version {meta.get('format_version')!r}); "
                              "upgrade capvis")
    weights = files.get(WEIGHTS)
    if weights is None:
        raise CheckpointError(f"{path}: {WEIGHTS} is missing")
    if hashlib.sha256(weights).hexdigest() != meta.get("weights_sha256"):
        raise CheckpointError(f"{path}: {WEIGHTS} is corrupt (checksum mismatch)")
    tokenizer = Tokenizer.from_bytes(files[VOCAB]) if meta.get("vocab") else None
    return Release(config_from_dict(meta["config"]), tokenizer, _tensors(weights, meta["tied"], prefix, path), meta)


def _tensors(weights: bytes, tied: dict[str, str], prefix: str | None, path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load

    try:
        stored = load(weights)
    except Exception as exc:  # safetensors raises its own error types for a malformed header
        raise CheckpointError(f"{path}: {WEIGHTS} cannot be read ({exc})") from None
    state = dict(stored)
    for alias, name in tied.items():
        state[alias] = stored[name]
    if prefix is not None:
        state = {k: v for k, v in state.items() if k.startswith(prefix)}
    return state


def _read_files(path: Path) -> dict[str, bytes]:
    """``{CONFIG/WEIGHTS/VOCAB: bytes}`` from a directory or an archive (flat or one folder deep)."""
    wanted = (CONFIG, WEIGHTS, VOCAB)
    if path.is_dir():
        return {n: (path / n).read_bytes() for n in wanted if (path / n).is_file()}
    if not path.is_file():
        raise CheckpointError(f"release not found: {path}")
    try:
        if path.name.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as zf:
                infos = {i.filename: i for i in zf.infolist() if not i.is_dir()}
                names = _members(list(infos), path)
                return {n: _read_capped(zf.open(infos[m]), n, infos[m].file_size, infos[m].compress_size, path)
                        for n, m in names.items()}
        archive_size = path.stat().st_size
        with tarfile.open(path) as tf:
            infos = {}
            for info in tf:  # lazily: a bomb's header is refused before its data is decompressed to skip it
                if info.isfile():
                    _cap(info.name.rsplit("/", 1)[-1], info.size, archive_size, path)
                    infos[info.name] = info
            names = _members(list(infos), path)
            return {n: _read_capped(tf.extractfile(infos[m]), n, infos[m].size, archive_size, path)
                    for n, m in names.items()}
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        raise CheckpointError(f"release archive {path} cannot be read ({exc})") from None


def _cap(name: str, size: int, source_bytes: int, path: Path) -> int:
    """The most bytes member ``name`` may decompress to; CheckpointError if its header claims more."""
    limit = min(MEMBER_CAPS.get(name, max(MEMBER_CAPS.values())), max(MIN_CAP, MAX_RATIO * source_bytes))
    if size > limit:
        raise CheckpointError(f"release archive {path}: member {name} would decompress to {size} bytes from "
                              f"{source_bytes}, more than the {limit} allowed (a zip bomb?)")
    return limit


def _read_capped(fh: Any, name: str, size: int, source_bytes: int, path: Path) -> bytes:
    """The member's bytes, never more than its cap (a header that understates the size cannot slip past)."""
    limit = _cap(name, size, source_bytes, path)
    with fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise CheckpointError(f"release archive {path}: member {name} decompresses to more than the {limit} "
                              "bytes allowed (a zip bomb?)")
    return data


def _members(names: list[str], path: Path) -> dict[str, str]:
    configs = [n for n in names if n.rstrip("/").split("/")[-1] == CONFIG and n.count("/") <= 1]
    if len(configs) != 1:
        raise CheckpointError(f"{path} holds {len(configs)} {CONFIG} files; expected one (a capvis release)")
    root = configs[0][: -len(CONFIG)]
    return {n: root + n for n in (CONFIG, WEIGHTS, VOCAB) if root + n in names}


# ---------------------------------------------------------------------------------------------
# Building modules from weights without a wasted random init


def build_loaded_task(cfg: Config, vocab_size: int, state: dict[str, Tensor], *, where: str = "") -> nn.Module:
    """The task of ``cfg`` holding exactly ``state`` (strict), in eval mode.

    Built on the meta device and filled by assignment, so large heads skip their random init; tied
    parameters are re-tied afterwards. Falls back to an ordinary build if anything stays on meta.
    """
    from capvis.tasks import build_task

    return _build_loaded(lambda: build_task(cfg, vocab_size), state, where)


def build_loaded_backbone(cfg: Config, state: dict[str, Tensor], *, where: str = "") -> nn.Module:
    """The ``Backbone`` of ``cfg`` from a task state dict's ``visual.*`` tensors, in eval mode."""
    from capvis.models.backbones import build_visual_for

    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    return _build_loaded(lambda: build_visual_for(cfg), visual, where)


def _build_loaded(build: Any, state: dict[str, Tensor], where: str) -> nn.Module:
    with torch.device("meta"):
        module = build()
    groups = _tied_parameter_names(module)
    _load_strict(module, state, where, assign=True)
    for names in groups:
        owner, attr = _owner(module, names[0])
        shared = getattr(owner, attr)
        for name in names[1:]:
            setattr(*_owner(module, name), shared)
    if any(t.is_meta for t in (*module.parameters(), *module.buffers())):
        module = build()
        _load_strict(module, state, where, assign=False)
    return module.eval()


def _load_strict(module: nn.Module, state: dict[str, Tensor], where: str, *, assign: bool) -> None:
    try:
        module.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines()[1:])
        detail = detail if len(detail) <= 400 else detail[:400] + " ..."
        raise CheckpointError(f"{where or 'weights'} do not fit the model: {detail}") from None


def _tied_parameter_names(module: nn.Module) -> list[list[str]]:
    by_id: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (module.get_submodule(path) if path else module), attr
