"""data.decode_device: the stream ships JPEG bytes + plans, decoded a batch at a time on the device.

On this CPU-only machine the device is the CPU: the batched ``decode_jpeg(list)`` path and the plan
application are the same code a GPU runs, and must give the worker path's pixels exactly.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capvis.config import load_config
from capvis.data.device_decode import PLAN_KEY, RAW_KEY, decode_on_device, plain_jpeg_size
from capvis.data.pipeline import build_shard_stream
from capvis.data.shards import expand_pattern, write_shards_from_annotations
from capvis.data.streaming import ShardStream, collate_stream
from capvis.data.tokenizer import Tokenizer
from capvis.data.transforms import TrainTransform
from capvis.distinfo import DistInfo
from capvis.errors import ConfigError, DataError
from helpers_images import write_jsonl


def png_bytes(seed: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (36, 30, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def shards(tmp_path: Path) -> list[str]:
    data = write_jsonl(tmp_path / "data", {"p.png": png_bytes(1)}, good=7)  # 7 JPEGs and a PNG
    manifest = write_shards_from_annotations(data, tmp_path / "shards", shard_size=4)
    return expand_pattern(str(tmp_path / "shards" / manifest["pattern"]))


def stream(paths: list[str], vocab: Path, decode_device: str) -> ShardStream:
    return ShardStream(paths, Tokenizer(vocab), TrainTransform(size=24), max_caption_length=12, seed=5,
                       shuffle_buffer=4, draft=False, decode_device=decode_device)


def test_deferred_batches_decode_to_the_worker_path_pixels(tmp_path: Path, coco_tokenizer_path: Path) -> None:
    paths = shards(tmp_path)
    plain, deferred = stream(paths, coco_tokenizer_path, "cpu"), stream(paths, coco_tokenizer_path, "cuda")
    a = [s for _, s in zip(range(16), plain)]
    b = [s for _, s in zip(range(16), deferred)]
    assert all(RAW_KEY in s and PLAN_KEY in s and "image" not in s for s in b)
    kinds = {s[RAW_KEY].ndim for s in b}
    assert kinds == {1, 3}  # JPEG bytes for the device, the PNG decoded by the worker
    for start in (0, 8):
        ref, batch = collate_stream(a[start:start + 8]), collate_stream(b[start:start + 8])
        assert "image" not in batch
        out = decode_on_device(batch, torch.device("cpu"))
        assert torch.equal(out["image"], ref["image"])  # same draws, same decoder, same pixels
        assert torch.equal(out["caption_tokens"], ref["caption_tokens"])  # the flip's left/right swap too
        assert RAW_KEY not in out and PLAN_KEY not in out


def test_plain_batches_pass_through_and_bad_bytes_are_one_line(tmp_path: Path, coco_tokenizer_path: Path) -> None:
    batch = {"image": torch.zeros(2, 3, 4, 4)}
    assert decode_on_device(batch, torch.device("cpu")) is batch
    paths = shards(tmp_path)
    samples = [s for _, s in zip(range(4), stream(paths, coco_tokenizer_path, "cuda"))]
    batch = collate_stream(samples)
    jpeg = next(i for i, r in enumerate(batch[RAW_KEY]) if r.ndim == 1)
    batch[RAW_KEY][jpeg] = batch[RAW_KEY][jpeg][:40].clone()  # header only: no decoder can finish it
    with pytest.raises(DataError, match=f"image id {int(batch['image_id'][jpeg])}: cannot be decoded"):
        decode_on_device(batch, torch.device("cpu"))


def test_exif_rotated_and_non_jpeg_are_decoded_by_the_worker(tmp_path: Path) -> None:
    assert plain_jpeg_size(png_bytes(0), "p.png") is None
    image = Image.fromarray(np.zeros((10, 20, 3), np.uint8))
    out = io.BytesIO()
    image.save(out, "JPEG")
    assert plain_jpeg_size(out.getvalue(), "a.jpg") == (10, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees on display
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif)
    assert plain_jpeg_size(out.getvalue(), "r.jpg") is None


def test_decode_device_must_match_the_training_device(tmp_path: Path, coco_tokenizer_path: Path) -> None:
    paths = shards(tmp_path)
    pattern = str(Path(paths[0]).parent / "*.tar")
    cfg = load_config(None, [f"data.train={pattern}", "data.decode_device=cuda"])
    with pytest.raises(ConfigError, match="data.decode_device=cuda needs training on cuda"):
        build_shard_stream(cfg, "train", Tokenizer(coco_tokenizer_path), DistInfo())
    with pytest.raises(ConfigError, match="data.decode_device"):
        load_config(None, ["data.decode_device=tpu"])
