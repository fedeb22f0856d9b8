"""WebDataset tar shards: writing them from an annotation file, naming them, and indexing their members.

A shard is a plain (uncompressed) tar whose consecutive members ``KEY.jpg``, ``KEY.json``
(``{"captions": [...], "image_id": N}``) and ``KEY.txt`` (the first caption) form one sample, the
layout the field's large-scale codebases (webdataset, img2dataset, open_clip) share. Image bytes are
copied, never re-encoded. ``KEY`` is the sample's position in the annotation file (``%09d``), so a
shard sample and ``CaptionDataset[epoch * N + KEY]`` draw the same caption and augmentation.

Writing is deterministic (fixed mtime, uid, gid, owner names, member order) and atomic per shard
(temporary file, fsync, ``os.replace``): re-running on the same input gives byte-identical shards and
manifest. ``DIR/manifest.json`` lists every shard's sample count and byte size and the brace pattern
that names them all (``DIR/shard-{000000..000007}.tar``), so readers know the epoch size without
opening a tar.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

from capvis.data.annotations import ImageRecord, read_records
from capvis.errors import DataError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARD_NAME = "shard-{:06d}.tar"
_SHARD_FILE = re.compile(r"^shard-\d{6}\.tar$")
_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF8", "gif"), (b"RIFF", "webp"))
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif", "webp")


def is_shard_pattern(spec: str) -> bool:
    """``data.train`` values that name tar shards (a file, a list or a brace pattern) rather than annotations."""
    return ".tar" in str(spec)


def expand_pattern(spec: str) -> list[str]:
    """``DIR/shard-{000000..000003}.tar`` -> the four paths (zero padding kept); plain paths pass through."""
    from braceexpand import braceexpand  # a webdataset dependency

    paths = [p for part in str(spec).split("::") for p in braceexpand(part.strip()) if p]
    if not paths:
        raise DataError(f"shard pattern {spec!r} names no files")
    return paths


# ---------------------------------------------------------------------------------------------
# Reading: sample counts and member index


@dataclass(frozen=True)
class TarSample:
    """One sample of a shard: its key and, per extension, the (offset, size) of the member's bytes."""

    key: str
    members: dict[str, tuple[int, int]]


def iter_tar_samples(source: str | Path | BinaryIO) -> Iterator[TarSample]:
    """Samples of a shard (path or open binary file) in file order, from the tar headers alone: member
    data is seeked over, not read. Offsets stay valid for reading the same file after each yield."""
    path = getattr(source, "name", source)
    try:
        opened = tarfile.open(fileobj=source, mode="r:") if hasattr(source, "read") else tarfile.open(source, "r:")
        with opened as tar:
            key, members = None, {}
            while (info := tar.next()) is not None:
                tar.members.clear()  # tarfile keeps every header otherwise
                if not info.isfile():
                    continue
                name = info.name.rsplit("/", 1)[-1]
                if "." not in name:
                    continue
                k, ext = name.split(".", 1)
                if k != key and members:
                    yield TarSample(key, members)
                    members = {}
                key = k
                members[ext.lower()] = (info.offset_data, info.size)
            if members:
                yield TarSample(key, members)
    except (OSError, tarfile.TarError) as exc:
        raise DataError(f"cannot read shard {path}: {exc}") from None


def shard_counts(paths: Sequence[str]) -> list[int]:
    """Samples per shard, from ``manifest.json`` beside the shards when it covers them (and the byte
    sizes match), else by scanning tar headers (one pass over the headers, no image bytes)."""
    counts: dict[str, int] = {}
    for folder in sorted({str(Path(p).parent) for p in paths}):
        manifest = Path(folder) / MANIFEST
        if manifest.is_file():
            try:
                for entry in json.loads(manifest.read_text())["shards"]:
                    counts[str(Path(folder) / entry["name"])] = (int(entry["samples"]), int(entry["bytes"]))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring malformed %s (%s)", manifest, exc)
    out = []
    for p in paths:
        if not Path(p).is_file():
            raise DataError(f"shard not found: {p}")
        known = counts.get(str(Path(p)))
        if known is not None and known[1] == Path(p).stat().st_size:
            out.append(known[0])
        else:
            out.append(sum(1 for _ in iter_tar_samples(p)))
    return out


# ---------------------------------------------------------------------------------------------
# Writing


def _image_extension(data: bytes, path: Path) -> str:
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    return path.suffix.lower().lstrip(".") or "jpg"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _sample_bytes(index: int, record: ImageRecord) -> list[tuple[str, bytes]] | None:
    """The members of one sample, or None (with a warning) if its image cannot be read."""
    try:
        image = record.path.read_bytes()
    except OSError as exc:
        log.warning("skipping image %s: %s", record.path, exc.strerror or exc)
        return None
    if not image:
        log.warning("skipping empty image file %s", record.path)
        return None
    key = f"{index:09d}"
    meta = json.dumps({"captions": record.captions, "image_id": record.image_id}, ensure_ascii=False)
    return [(f"{key}.{_image_extension(image, record.path)}", image), (f"{key}.json", meta.encode()),
            (f"{key}.txt", record.captions[0].encode())]


def _write_shard(path: Path, samples: list[list[tuple[str, bytes]]]) -> int:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        with tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for members in samples:
                for name, data in members:
                    _add_member(tar, name, data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


def write_shards(records: Sequence[ImageRecord], output: str | Path, *, shard_size: int = 1000,
                 source: str = "") -> dict:
    """Write ``records`` as tar shards of ``shard_size`` samples plus ``manifest.json``; returns the manifest.

    Shards are rewritten atomically (same input -> same bytes); ``shard-NNNNNN.tar`` files of an earlier
    run that the new manifest does not list are removed, so the folder always matches its manifest.
    """
    if shard_size <= 0:
        raise DataError(f"shard size must be positive, got {shard_size}")
    if not records:
        raise DataError("no images to write")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    shards, pending, skipped = [], [], 0

    def flush() -> None:
        name = SHARD_NAME.format(len(shards))
        size = _write_shard(out / name, pending)
        shards.append({"name": name, "samples": len(pending), "bytes": size})
        pending.clear()

    for index, record in enumerate(records):
        members = _sample_bytes(index, record)
        if members is None:
            skipped += 1
            continue
        pending.append(members)
        if len(pending) == shard_size:
            flush()
    if pending:
        flush()
    if not shards:
        raise DataError(f"none of the {len(records)} images could be read")
    keep = {s["name"] for s in shards}
    for stale in sorted(p for p in out.iterdir() if _SHARD_FILE.match(p.name) and p.name not in keep):
        log.info("removing %s (not part of this set)", stale)
        stale.unlink()
    last = len(shards) - 1
    manifest = {"format": "capvis-shards/1", "source": source, "pattern": f"shard-{{000000..{last:06d}}}.tar",
                "samples": sum(s["samples"] for s in shards), "skipped": skipped, "shards": shards}
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out / MANIFEST)
    return manifest


def write_shards_from_annotations(annotations: str | Path, output: str | Path, *, images: str | Path | None = None,
                                  shard_size: int = 1000) -> dict:
    """``capvis shards``: read a COCO captions JSON / JSONL / CSV and write its shards."""
    records = read_records(annotations, images)
    return write_shards(records, output, shard_size=shard_size, source=Path(annotations).name)
