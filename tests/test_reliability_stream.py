"""The shard stream is as robust as the folder path: the same decoder and pixel-count guard (a short
PNG, which crashes torchvision's decoder, a zero-byte JPEG and a decompression bomb are counted skips),
and ``data.max_bad_fraction`` enforced per loader worker, the counts summed over workers and reported
at the end of the run, in metrics.jsonl and in the checkpoint."""

from __future__ import annotations

import io
import json
import logging
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from capvis.cli import main
from capvis.data.decode import load_image
from capvis.data.shards import expand_pattern, write_shards_from_annotations
from capvis.data.streaming import ShardStream
from capvis.data.tokenizer import Tokenizer
from capvis.data.transforms import TrainTransform
from capvis.train import checkpoint as ckpt
from capvis.train.loop import read_metrics

from helpers_images import (TINY, bomb_png, good_jpeg, one_line_error, palette_png_with_transparency, rgb16_png,
                            short_png, write_jsonl)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, busy machine
GOOD = 8  # + a short PNG and a bomb through `capvis shards`, + a zero-byte JPEG and one good image elsewhere


def _other_tool_shard(path: Path) -> Path:
    """A shard written by another tool: it keeps a zero-byte JPEG (``capvis shards`` skips empty files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    members = [("zero.jpg", b""), ("zero.json", b'{"captions": ["a dog runs on the grass."]}'),
               ("extra.jpg", good_jpeg(path.parent / "extra.jpg", 99).read_bytes()),
               ("extra.json", b'{"captions": ["the cat sits left of a sofa."]}')]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def bad_shards(tmp_path: Path) -> str:
    """``data.train`` naming 12 samples in 5 shards, 3 of them bad (a short PNG, a bomb, a zero-byte JPEG)."""
    data = write_jsonl(tmp_path / "data", {"short.png": short_png(), "bomb.png": bomb_png()}, good=GOOD)
    assert main(["shards", "--input", str(data), "--output", str(tmp_path / "shards"), "--shard-size", "3"]) == 0
    pattern = json.loads((tmp_path / "shards" / "manifest.json").read_text())["pattern"]
    return f"{tmp_path / 'shards' / pattern}::{_other_tool_shard(tmp_path / 'other' / 'extra.tar')}"


def _pretrain(out: Path, pattern: str, vocab: Path, *overrides: str) -> int:
    return main(["pretrain", "--config", "bicaptioning_R_50_L1_H2048", "--output", str(out), "--no-progress", *TINY,
                 f"data.train={pattern}", f"data.vocab={vocab}", *overrides])


def test_each_bad_sample_is_skipped_with_its_shard_key_and_reason(bad_shards, coco_tokenizer_path, caplog):
    shards = expand_pattern(bad_shards)
    ds = ShardStream(shards, Tokenizer(coco_tokenizer_path), TrainTransform(size=16), max_caption_length=12,
                     seed=0, infinite=False, max_bad_fraction=0.5)
    with caplog.at_level(logging.WARNING):
        samples = list(ds)  # the short PNG would kill this process if it reached torchvision's PNG decoder
    assert len(samples) == GOOD + 1 and ds.bad_samples == 3 and ds.budget.seen == GOOD + 4
    warned = [r.getMessage() for r in caplog.records if "skipping bad sample" in r.getMessage()]
    assert len(warned) == 3
    assert any("shard-000002.tar:000000008" in m and "cannot decode image 000000008.png" in m for m in warned)
    assert any("shard-000003.tar:000000009" in m and "too large to decode" in m for m in warned)
    assert any("extra.tar:zero" in m and "image file zero.jpg is empty" in m for m in warned)
    assert [s["data_stats"] for s in samples][-1] == (0, 3, GOOD + 4)  # (worker, bad, seen) ride with samples


def test_pretraining_finishes_with_the_bad_samples_counted(tmp_path, bad_shards, coco_tokenizer_path, caplog):
    out, iterations = tmp_path / "run", 20
    with caplog.at_level(logging.INFO, logger="capvis.train.loop"):
        assert _pretrain(out, bad_shards, coco_tokenizer_path, "data.num_workers=2", "data.max_bad_fraction=0.5",
                         f"train.iterations={iterations}") == 0
    (row,) = [r for r in read_metrics(out) if "data/bad_samples" in r]
    bad, seen = row["data/bad_samples"], row["data/samples_read"]
    # each worker read more than one epoch of its share, so met all 3 bad samples; the good ones read are
    # exactly those trained on (2 per step), summed over both workers
    assert row["iteration"] == iterations and bad >= 3 and seen - bad == 2 * iterations and bad / seen < 0.5
    assert f"data: {bad} of {seen} samples read were bad and skipped" in caplog.text
    state = ckpt.load_checkpoint(out / "checkpoints" / f"checkpoint_{iterations:08d}.pt")
    assert state["data_counts"] == {"bad": bad, "seen": seen}
    assert state["data_stream"] == {"world_size": 1, "num_workers": 2, "batch_size": 2, "shards": 5, "samples": 12}


def test_too_many_bad_samples_stop_the_run_in_one_line(tmp_path, bad_shards, coco_tokenizer_path, capfd):
    out = tmp_path / "run"
    # 3 bad in 12 (25%) > 20%: a worker stops once it has seen min_seen(0.2) = 50 samples
    assert _pretrain(out, bad_shards, coco_tokenizer_path, "data.num_workers=2", "data.max_bad_fraction=0.2",
                     "train.iterations=200") == 2
    err = one_line_error(capfd.readouterr().err)
    assert "too many bad samples" in err and "exceed data.max_bad_fraction=0.2" in err
    assert ".tar:" in err and "(in a DataLoader worker)" in err  # names the last culprit, shard and key
    assert not (out / "checkpoints" / "checkpoint_00000200.pt").exists()


def test_zero_tolerance_stops_at_the_first_bad_sample(tmp_path, bad_shards, coco_tokenizer_path, capfd):
    assert _pretrain(tmp_path / "run", bad_shards, coco_tokenizer_path, "data.num_workers=0",
                     "data.max_bad_fraction=0", "train.iterations=50") == 2
    err = one_line_error(capfd.readouterr().err)
    assert "too many bad samples: 1 of" in err and "exceed data.max_bad_fraction=0" in err and ".tar:" in err


def test_odd_pngs_in_a_shard_decode_as_in_a_folder(tmp_path, coco_tokenizer_path):
    odd = {"palette.png": palette_png_with_transparency(tmp_path / "x.png").read_bytes(),
           "rgb16.png": rgb16_png(np.arange(40 * 48 * 3, dtype=np.uint16).reshape(40, 48, 3) * 20)}
    data = write_jsonl(tmp_path / "data", odd, good=0)
    manifest = write_shards_from_annotations(data, tmp_path / "shards", shard_size=10)
    ds = ShardStream(expand_pattern(str(tmp_path / "shards" / manifest["pattern"])), Tokenizer(coco_tokenizer_path),
                     lambda image: image, max_caption_length=12, seed=0, shuffle=False, infinite=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PIL warning for the palette's transparency table either
        images = [s["image"] for s in ds]
    assert ds.bad_samples == 0
    assert all(torch.equal(a, load_image(tmp_path / "data" / n)) for a, n in zip(images, odd, strict=True))
