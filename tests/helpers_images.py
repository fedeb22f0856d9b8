"""Image files that break decoders, for the reliability tests: a PNG whose image data is cut short
(torchvision's PNG decoder SIGSEGVs on it), a 1-bit PNG the size of a decompression bomb (small on
disk, 400 megapixels), a palette PNG with a transparency table, a 16-bit RGB PNG; plus a tiny
JSONL dataset and tiny pretraining overrides."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

TINY = ["model.backbone=resnet18", "model.small_stem=true", "model.visual_width=16", "data.image_size=16",
        "model.textual.hidden=64", "model.textual.dropout=0", "train.batch_size=2", "train.warmup=1",
        "train.log_every=1", "train.checkpoint_every=100", "train.channels_last=false", "data.val="]
CAPTIONS = ["a dog runs on the grass.", "the cat sits left of a sofa.", "a man rides a bike down the street."]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, bit_depth: int, colour: int, rows: bytes | None) -> bytes:
    """A PNG from its parts; ``rows`` is the raw filtered scanlines (None: a short, 1000-zero stream)."""
    body = zlib.compress(rows if rows is not None else b"\0" * 1000)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def short_png() -> bytes:
    """A 64 x 64 RGB PNG with far too little image data (a truncated download)."""
    return png(64, 64, 8, 2, None)


def bomb_png(side: int = 20_000) -> bytes:
    """A valid 1-bit PNG of ``side`` x ``side`` black pixels: about 50 kB on disk, 400 megapixels."""
    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + (side + 7) // 8)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def rgb16_png(values: np.ndarray) -> bytes:
    """A 16-bit RGB PNG of ``values`` ((H, W, 3) uint16), which PIL cannot write itself."""
    height, width, _ = values.shape
    rows = b"".join(b"\0" + values[y].astype(">u2").tobytes() for y in range(height))
    return png(width, height, 16, 2, rows)


def palette_png_with_transparency(path: Path) -> Path:
    """An 8 x 6 palette PNG, red with one green pixel; red is fully transparent, green half (a tRNS table)."""
    im = Image.new("P", (8, 6), 0)
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.putpixel((1, 1), 1)
    im.save(path, transparency=b"\x00\x80")
    return path


def good_jpeg(path: Path, seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def write_jsonl(root: Path, images: dict[str, bytes | None], good: int) -> Path:
    """``root/data.jsonl`` over ``good`` random JPEGs plus ``images`` (name -> bytes, written as given)."""
    root.mkdir(parents=True, exist_ok=True)
    names = [good_jpeg(root / f"good{k}.jpg", k).name for k in range(good)]
    for name, data in images.items():
        (root / name).write_bytes(data or b"")
        names.append(name)
    lines = [json.dumps({"image": n, "caption": CAPTIONS[k % len(CAPTIONS)]}) for k, n in enumerate(names)]
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return root / "data.jsonl"


def one_line_error(err: str) -> str:
    """The single ``capvis: error: ...`` line a failing command must print (no traceback)."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("capvis: error: "), err
    return lines[0]

