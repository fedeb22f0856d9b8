"""Fuzz: a few hundred garbled captions and images through annotations -> CaptionDataset -> collate ->
DataLoader (with workers) never crash; bad samples are skipped and every batch is well formed."""

from __future__ import annotations

import json
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from capvis.data.annotations import read_records
from capvis.data.datasets import BadSampleError, CaptionDataset, collate_captions, load_image
from capvis.data.tokenizer import SOS_ID, Tokenizer
from capvis.data.transforms import TrainTransform

N = 300


def _caption(rng: random.Random) -> str:
    kind = rng.randrange(8)
    if kind == 0:
        return rng.choice(["", " ", "\t\n", "\u3000"])
    if kind == 1:  # random code points, control characters and lone surrogates included
        return "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(1, 40)))
    if kind == 2:
        return "".join(chr(rng.randrange(32)) for _ in range(rng.randrange(1, 10)))
    if kind == 3:
        return "a dog " * rng.randrange(500, 2000)  # very long
    if kind == 4:
        return "\u0301" * rng.randrange(1, 5) + rng.choice(["", "cat"])  # combining marks
    if kind == 5:
        return "".join(rng.choice("\U0001f600\u2603\u4e2d\u0627\u05d0") for _ in range(rng.randrange(1, 12)))
    return rng.choice(["A dog runs on the LEFT.", "two cats, right side!", "Café near the window?"])


def _image_bytes(rng: random.Random, np_rng: np.random.Generator, path: Path) -> None:
    kind = rng.randrange(9)
    if kind == 0:
        path.write_bytes(b"")
    elif kind == 1:
        path.write_bytes(np_rng.bytes(rng.randrange(1, 2000)))
    elif kind == 2:  # truncated JPEG (or a bare JPEG header)
        Image.fromarray(np_rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(path, format="JPEG")
        data = path.read_bytes()
        path.write_bytes(data[: rng.randrange(2, len(data))])
    elif kind == 3:
        Image.new("RGB", (1, 1), (rng.randrange(256), 0, 0)).save(path, format="PNG")
    elif kind == 4:  # huge aspect ratios
        size = rng.choice([(300, 1), (1, 300), (400, 2)])
        Image.fromarray(np_rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)).save(path, format="PNG")
    elif kind == 5:
        Image.new("CMYK", (9, 7), (rng.randrange(256), 0, 0, 0)).save(path, format="JPEG")
    elif kind == 6:
        Image.fromarray(np_rng.integers(0, 65535, (5, 6), dtype=np.uint16)).save(path, format="PNG")
    elif kind == 8 and rng.random() < 0.5:  # a PNG header (sometimes claiming 50000 x 50000 pixels), no data
        path.write_bytes(_png_header_only(*rng.choice([(50_000, 50_000), (64, 64), (3, 3000)])))
    elif kind == 7:  # flipped bytes in the middle of a valid file
        Image.fromarray(np_rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path, format="JPEG")
        data = bytearray(path.read_bytes())
        for _ in range(10):
            data[rng.randrange(20, len(data))] = rng.randrange(256)
        path.write_bytes(bytes(data))
    else:
        pass  # missing file


def _png_header_only(width: int = 50_000, height: int = 50_000) -> bytes:
    """A valid PNG signature, header and end, with far too little image data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
            + chunk(b"IEND", b""))


def test_decompression_bomb_and_short_png_are_bad_samples(tmp_path: Path) -> None:
    (tmp_path / "bomb.png").write_bytes(_png_header_only())
    with pytest.raises(BadSampleError, match="bomb.png is too large to decode"):
        load_image(tmp_path / "bomb.png")
    (tmp_path / "short.png").write_bytes(_png_header_only(64, 64))  # torchvision's decoder segfaults on this
    with pytest.raises(BadSampleError, match="cannot decode image .*short.png"):
        load_image(tmp_path / "short.png")


def test_garbled_captions_and_images_never_crash(tmp_path: Path, coco_tokenizer_path: Path) -> None:
    rng, np_rng = random.Random(1234), np.random.default_rng(1234)
    lines: list[bytes] = []
    for k in range(N):
        name = f"img/{k}.{rng.choice(['jpg', 'png', 'bin'])}"
        (tmp_path / "img").mkdir(exist_ok=True)
        _image_bytes(rng, np_rng, tmp_path / name)
        captions = [_caption(rng) for _ in range(rng.randrange(1, 4))]
        lines.append(json.dumps({"image": name, "captions": captions}).encode())
    for k in (5, 50, 150):  # not UTF-8
        lines.insert(k, b'{"image": "img/0.jpg", "caption": "caf\xe9 \xff"}')
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")

    records = read_records(path, max_bad_fraction=1.0)
    assert 0 < len(records) <= N
    data = CaptionDataset(records, Tokenizer(coco_tokenizer_path), TrainTransform(size=16), 20, seed=0,
                          max_bad_fraction=0.95)
    loader = DataLoader(data, batch_size=16, num_workers=2, collate_fn=collate_captions,
                        sampler=range(2 * len(data)))  # two epochs
    seen = 0
    for batch in loader:
        b = batch["image"].shape[0]
        assert batch["image"].shape == (b, 3, 16, 16) and torch.isfinite(batch["image"]).all()
        tokens, lengths = batch["caption_tokens"], batch["caption_lengths"]
        assert (tokens[:, 0] == SOS_ID).all() and int(lengths.max()) <= 20
        assert int(tokens.max()) < data.tokenizer.vocab_size and int(tokens.min()) >= 0
        seen += b
    assert seen == 2 * len(data)
    data[0]  # the main-process copy works too
    assert data.budget.bad > 0 and data.budget.seen > data.budget.bad
