"""A battery of bad inputs, each run the way users hit it (the CLI): a one-line error naming the culprit,
or a counted skip, never a traceback. The stream side (shards) is in test_reliability_stream.py."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from capvis.cli import main
from capvis.data.decode import load_image

from helpers_images import (TINY, bomb_png, good_jpeg, one_line_error, palette_png_with_transparency, rgb16_png,
                            short_png, write_jsonl)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, busy machine


def _pretrain(tmp_path: Path, *overrides: str) -> int:
    return main(["pretrain", "--config", "bicaptioning_R_50_L1_H2048", "--output", str(tmp_path / "run"),
                 "--no-progress", *TINY, *overrides])


# -- configs ------------------------------------------------------------------------------------


def test_yaml_syntax_error_and_directory_as_config(tmp_path, capfd):
    (tmp_path / "bad.yaml").write_text("train:\n  batch_size: [1, 2\n")
    assert main(["pretrain", "--config", str(tmp_path / "bad.yaml"), "--output", str(tmp_path / "r")]) == 2
    assert "bad.yaml: line 3, column 1 is not valid YAML" in one_line_error(capfd.readouterr().err)
    assert main(["pretrain", "--config", str(tmp_path), "--output", str(tmp_path / "r")]) == 2
    assert f"config {tmp_path} is a directory" in one_line_error(capfd.readouterr().err)


@pytest.mark.parametrize(("override", "expected"), [
    ("train.batch_size=0", "'train.batch_size' must be positive, got 0"),
    ("train.batch_size=-4", "'train.batch_size' must be positive, got -4"),
    ("train.lr_backbone=.nan", "'train.lr_backbone' must be a number, got NaN"),
    ("train.lr_textual=-0.001", "'train.lr_textual' must be a finite number >= 0, got -0.001"),
    ("train.lr_backbone=.inf", "'train.lr_backbone' must be a finite number >= 0, got inf"),
    ("train.iterations=0", "'train.iterations' must be positive, got 0"),
])
def test_impossible_numbers_fail_before_any_work(tmp_path, capfd, override, expected):
    assert _pretrain(tmp_path, override) == 2
    assert expected in one_line_error(capfd.readouterr().err)
    assert not (tmp_path / "run").exists()


# -- annotation files, vocabularies, label files ------------------------------------------------------


def test_malformed_jsonl_line_and_csv_without_columns(tmp_path, capfd):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"image": "x.jpg", "caption": "a dog"}\n{"image": "y.jpg", "caption": \n'
                     '{"image": "z.jpg", "caption": "a cat"}\n')
    assert main(["vocab", "--captions", str(jsonl), "--vocab-size", "40", "--output", str(tmp_path / "v")]) == 2
    assert f"{jsonl}:2: malformed JSON" in one_line_error(capfd.readouterr().err)
    csv = tmp_path / "a.csv"
    csv.write_text("file,text\nx.jpg,a dog\n")
    assert main(["vocab", "--captions", str(csv), "--vocab-size", "40", "--output", str(tmp_path / "v")]) == 2
    err = one_line_error(capfd.readouterr().err)
    assert "lacks column(s) caption, image" in err and "found ['file', 'text']" in err


@pytest.mark.parametrize("kind", ["empty", "truncated", "random"])
def test_corrupt_or_empty_vocabulary(tmp_path, capfd, coco_tokenizer_path, coco_fixture, kind):
    raw = Path(coco_tokenizer_path).read_bytes()
    data = {"empty": b"", "truncated": raw[: len(raw) // 2], "random": os.urandom(500)}[kind]
    vocab = tmp_path / "v.model"
    vocab.write_bytes(data)
    assert _pretrain(tmp_path, f"data.train={coco_fixture}", f"data.vocab={vocab}") == 2
    err = one_line_error(capfd.readouterr().err)  # capfd: sentencepiece's C++ logging would show here too
    assert str(vocab) in err and ("is empty" in err if kind == "empty" else "not a valid SentencePiece model" in err)


def test_random_bytes_as_checkpoint(tmp_path, capfd):
    ckpt = tmp_path / "weights.pt"
    ckpt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    image = good_jpeg(tmp_path / "x.jpg", 0)
    assert main(["caption", "--checkpoint", str(ckpt), str(image)]) == 2
    assert str(ckpt) in one_line_error(capfd.readouterr().err)


def test_label_index_out_of_range(tmp_path, capfd):
    labels = {"tasks": {"shape": {"classes": ["circle", "square"]}},
              "images": [{"file_name": "a.jpg", "labels": {"shape": [0]}},
                         {"file_name": "b.jpg", "labels": {"shape": [1, 5]}}]}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    np.save(tmp_path / "f.npy", np.zeros((2, 4), np.float32))
    args = ["eval", "svm", "--train", str(tmp_path / "labels.json"), "--test", str(tmp_path / "labels.json"),
            "--features-train", str(tmp_path / "f.npy"), "--features-test", str(tmp_path / "f.npy")]
    assert main(args) == 2
    assert "images[1] (b.jpg): label 5 of task 'shape' is not a class index in [0, 2)" in \
        one_line_error(capfd.readouterr().err)


def test_caption_on_an_empty_folder(tmp_path, capfd):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"\0" * 64)  # never read: the folder is judged first
    assert main(["caption", "--checkpoint", str(ckpt), str(tmp_path / "empty")]) == 2
    assert "no image files" in (err := one_line_error(capfd.readouterr().err)) and str(tmp_path / "empty") in err


# -- odd and broken images -------------------------------------------------------------------------


def test_odd_png_modes_decode_to_rgb_without_warnings(tmp_path):
    palette = palette_png_with_transparency(tmp_path / "p.png")
    values = (np.arange(4 * 5 * 3, dtype=np.uint16).reshape(4, 5, 3) * 1000)  # spans 0..59000
    (tmp_path / "rgb16.png").write_bytes(rgb16_png(values))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns on palette + transparency -> RGB unless it goes via RGBA
        image = load_image(palette)
        rgb16 = load_image(tmp_path / "rgb16.png")
    assert image.dtype == torch.uint8 and image[:, 0, 0].tolist() == [255, 0, 0]
    assert image[:, 1, 1].tolist() == [0, 255, 0]  # alpha dropped, colour kept
    assert torch.equal(rgb16.permute(1, 2, 0), torch.from_numpy((values >> 8).astype(np.uint8)))


def test_folder_dataset_with_broken_pngs_trains_and_counts_them(tmp_path, capfd, caplog, coco_tokenizer_path):
    odd = {"palette.png": palette_png_with_transparency(tmp_path / "x.png").read_bytes(),
           "rgb16.png": rgb16_png(np.full((40, 48, 3), 40000, np.uint16)),
           "bomb.png": bomb_png(), "short.png": short_png()}
    data = write_jsonl(tmp_path / "data", odd, good=4)
    with caplog.at_level(logging.WARNING):
        assert _pretrain(tmp_path, f"data.train={data}", f"data.vocab={coco_tokenizer_path}", "data.num_workers=0",
                         "train.iterations=4", "data.max_bad_fraction=0.5") == 0
    assert "Traceback" not in capfd.readouterr().err
    skipped = [r.getMessage() for r in caplog.records if "skipping bad sample" in r.getMessage()]
    assert any("bomb.png" in m and "too large to decode" in m for m in skipped), skipped
    assert any("short.png" in m and "cannot decode image" in m for m in skipped), skipped
    assert not any("palette.png" in m or "rgb16.png" in m for m in skipped)  # odd modes are not bad
    assert (tmp_path / "run" / "checkpoints" / "checkpoint_00000004.pt").is_file()


# -- releases ------------------------------------------------------------------------------------------


def _zip_bomb(path: Path, size: int) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("config.json", json.dumps({"format": "capvis-release", "format_version": 1}))
        with zf.open("model.safetensors", "w") as fh:
            for _ in range(size >> 20):
                fh.write(bytes(1 << 20))
    return path


def _tar_gz_bomb(path: Path, size: int) -> Path:
    import io
    import tarfile

    class Zeros(io.RawIOBase):
        def __init__(self, n: int) -> None:
            self.left = n

        def readinto(self, buffer) -> int:
            n = min(len(buffer), self.left)
            buffer[:n] = bytes(n)
            self.left -= n
            return n

    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo("config.json")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"{}"))
        info = tarfile.TarInfo("model.safetensors")
        info.size = size
        tf.addfile(info, Zeros(size))
    return path


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_release_bomb_is_refused_before_it_is_decompressed(tmp_path, capfd, kind):
    import tracemalloc

    from capvis.errors import CheckpointError
    from capvis.release import read_release

    size = 48 << 20
    bomb = (_zip_bomb if kind == "zip" else _tar_gz_bomb)(tmp_path / f"release.{kind}", size)
    assert bomb.stat().st_size < size // 200  # a compression ratio no real weights have
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=r"member model.safetensors would decompress to 50331648 bytes"):
            read_release(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20  # refused from the header: nothing near 48 MiB was held
    assert main(["caption", "--checkpoint", str(bomb), str(good_jpeg(tmp_path / "x.jpg", 0))]) == 2
    assert "(a zip bomb?)" in one_line_error(capfd.readouterr().err)


def test_release_member_that_understates_its_size_is_cut_at_the_cap(tmp_path, monkeypatch):
    """A header claiming fewer bytes than the member holds cannot slip past: the read stops at the cap."""
    import io

    from capvis import release
    from capvis.errors import CheckpointError

    monkeypatch.setattr(release, "MIN_CAP", 1000)
    assert release._read_capped(io.BytesIO(bytes(1000)), "config.json", 10, 10, tmp_path) == bytes(1000)
    with pytest.raises(CheckpointError, match=r"member config.json decompresses to more than the 1000 bytes"):
        release._read_capped(io.BytesIO(bytes(5000)), "config.json", 10, 10, tmp_path)
