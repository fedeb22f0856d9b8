"""Bad data: broken images and captions are skipped with a counted warning within
``data.max_bad_fraction`` (deterministically replaced by the next sample), too many fail with a
DataError naming the culprit; odd image modes decode to correct RGB uint8."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from capvis.data.annotations import ImageRecord, read_caption_texts, read_records
from capvis.data.datasets import BadSampleError, CaptionDataset, _load_with_pil, collate_captions, load_image
from capvis.data.robust import BadSampleBudget, min_seen, unwrap_worker_error
from capvis.data.tokenizer import Tokenizer
from capvis.data.transforms import build_eval_transform
from capvis.errors import DataError

# -- image modes ------------------------------------------------------------------------------


def test_grayscale_rgba_palette_and_bilevel(tmp_path: Path) -> None:
    gray = np.arange(6 * 5, dtype=np.uint8).reshape(6, 5) * 8
    Image.fromarray(gray).save(tmp_path / "l.png")
    img = load_image(tmp_path / "l.png")
    assert img.dtype == torch.uint8 and img.shape == (3, 6, 5)
    assert all(torch.equal(img[c], torch.from_numpy(gray)) for c in range(3))
    Image.new("RGBA", (4, 3), (10, 20, 30, 0)).save(tmp_path / "a.png")  # alpha dropped, colour kept
    assert load_image(tmp_path / "a.png")[:, 0, 0].tolist() == [10, 20, 30]
    Image.new("LA", (4, 3), (77, 5)).save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png")[:, 2, 3].tolist() == [77, 77, 77]
    Image.new("RGB", (4, 3), (0, 0, 255)).convert("P").save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png")[:, 1, 1].tolist() == [0, 0, 255]
    Image.new("1", (4, 3), 1).save(tmp_path / "b.png")
    assert load_image(tmp_path / "b.png").unique().tolist() == [255]


def test_cmyk_jpeg(tmp_path: Path) -> None:
    Image.new("CMYK", (16, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)  # pure red in CMYK
    img = load_image(tmp_path / "c.jpg")
    assert img.dtype == torch.uint8 and img.shape == (3, 8, 16)
    r, g, b = img.float().mean(dim=(1, 2)).tolist()
    assert r > 240 and g < 15 and b < 15


def test_16_bit_png_keeps_the_high_byte(tmp_path: Path) -> None:
    values = (np.arange(4 * 6, dtype=np.uint16).reshape(4, 6) * 2731)  # spans 0..62813
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    for img in (load_image(tmp_path / "g16.png"), _load_with_pil(tmp_path / "g16.png")):
        assert img.dtype == torch.uint8 and img.shape == (3, 4, 6)
        assert torch.equal(img[1], torch.from_numpy((values >> 8).astype(np.uint8)))


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_exif_rotated_jpeg(tmp_path: Path, mode: str) -> None:
    pixels = np.zeros((8, 24), dtype=np.uint8)
    pixels[:, :8] = 255  # bright left third of a wide image
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: the bright part ends up at the top
    Image.fromarray(pixels).convert(mode).save(tmp_path / "r.jpg", exif=exif, quality=100)
    img = load_image(tmp_path / "r.jpg")
    assert img.shape == (3, 24, 8) and img.dtype == torch.uint8
    assert img[:, :6].float().mean() > 200 and img[:, -6:].float().mean() < 50


# -- bad images and captions in a dataset ------------------------------------------------------------


def _image(path: Path, value: int) -> Path:
    Image.new("RGB", (12, 10), (value, value, value)).save(path, quality=95)
    return path


def _broken_images(root: Path) -> dict[str, Path]:
    good = _image(root / "good.jpg", 100).read_bytes()
    (root / "zero.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "garbage.jpg").write_bytes(bytes(range(256)) * 4)
    return {"zero": root / "zero.jpg", "truncated": root / "truncated.jpg", "garbage": root / "garbage.jpg",
            "missing": root / "missing.jpg"}


def _dataset(records, tokenizer_path, fraction=0.5) -> CaptionDataset:
    return CaptionDataset(records, Tokenizer(tokenizer_path), build_eval_transform(8), 12, seed=0,
                          max_bad_fraction=fraction)


@pytest.mark.parametrize("kind", ["zero", "truncated", "garbage", "missing"])
def test_bad_image_is_replaced_by_the_next_sample_with_a_warning(tmp_path, coco_tokenizer_path, caplog, kind):
    bad = _broken_images(tmp_path)[kind]
    records = [ImageRecord(k, _image(tmp_path / f"{k}.jpg", 40 * k), ["a dog on the grass"]) for k in range(4)]
    records[1] = ImageRecord(1, bad, ["a cat"])
    data = _dataset(records, coco_tokenizer_path)
    with caplog.at_level(logging.WARNING):
        sample = data[1 + 2 * len(data)]  # epoch 2, image 1
    replacement = data.sample(2, 2)
    assert sample["image_id"] == 2 and torch.equal(sample["image"], replacement["image"])
    assert str(bad) in caplog.text and "skipping bad sample" in caplog.text
    assert (data.budget.bad, data.budget.seen) == (1, 2)
    with pytest.raises(BadSampleError, match=bad.name):
        load_image(bad)
    # a known-bad file counts again on every visit, but is neither re-read nor re-reported
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert data[1]["image_id"] == 2
    assert caplog.text == "" and data.budget.bad == 2


def test_bad_captions_are_skipped(tmp_path, coco_tokenizer_path, caplog):
    captions = ["   ", "\u2603\u2603 \u4e2d\u6587", "\x00\x01\x02", "\u0301\u0302", "a dog on the grass"]
    records = [ImageRecord(k, _image(tmp_path / f"{k}.jpg", 10 * k), [c]) for k, c in enumerate(captions)]
    data = _dataset(records, coco_tokenizer_path, fraction=1.0)
    with caplog.at_level(logging.WARNING):
        samples = [data[k] for k in range(len(captions))]
    assert [s["image_id"] for s in samples] == [4] * 5  # every bad one is replaced by the next good one
    assert "is empty" in caplog.text and "encodes to no known word" in caplog.text


def test_budget_exceeded_names_culprit_and_counts(tmp_path, coco_tokenizer_path):
    broken = _broken_images(tmp_path)
    good = [ImageRecord(k, _image(tmp_path / f"{k}.jpg", k), ["a dog"]) for k in range(10)]
    bad = [ImageRecord(10 + k, broken["missing"], ["a cat"]) for k in range(10)]
    data = _dataset([r for pair in zip(good, bad) for r in pair], coco_tokenizer_path, fraction=0.2)
    with pytest.raises(DataError, match=r"too many bad samples: \d+ of 50 seen .* exceed data.max_bad_fraction=0.2; "
                                        r"last: .*missing.jpg \(cannot read image"):
        for k in range(100):
            data[k]
    assert min_seen(0.2) == 50  # judged once 50 samples were seen: bad > 0.2 * 50


def test_whole_dataset_bad_and_zero_tolerance(tmp_path, coco_tokenizer_path):
    broken = _broken_images(tmp_path)
    records = [ImageRecord(k, path, ["a dog"]) for k, path in enumerate(broken.values())]
    with pytest.raises(DataError, match="all 4 samples of the dataset are unusable"):
        _dataset(records, coco_tokenizer_path, fraction=1.0)[0]
    with pytest.raises(DataError, match=r"1 of 1 seen .*zero.jpg"):
        _dataset(records, coco_tokenizer_path, fraction=0.0)[0]


def test_budget_rule() -> None:
    budget = BadSampleBudget(0.01)
    assert min_seen(0.01) == 1000 and min_seen(0.5) == 20 and min_seen(0.0) == 0
    for _ in range(5):
        budget.record_bad("x", "early bad samples are tolerated while the share is noisy")
    for _ in range(994):
        budget.good()
    budget.record_bad("y", "the 1000th sample: 6 bad <= 10")
    for _ in range(4):
        budget.record_bad("z", "10 of 1004: still within 1%")
    with pytest.raises(DataError, match=r"11 of 1005 seen"):
        budget.record_bad("w", "one too many")


def test_workers_skip_the_same_way_and_fail_in_one_line(tmp_path, coco_tokenizer_path):
    broken = _broken_images(tmp_path)
    records = [ImageRecord(k, _image(tmp_path / f"{k}.jpg", 20 * k), ["a dog"]) for k in range(6)]
    records[2] = ImageRecord(2, broken["truncated"], ["a dog"])
    data = _dataset(records, coco_tokenizer_path)
    inline = [b["image_id"].tolist() for b in DataLoader(data, batch_size=3, collate_fn=collate_captions)]
    workers = [b["image_id"].tolist() for b in DataLoader(data, batch_size=3, num_workers=2,
                                                          collate_fn=collate_captions)]
    assert inline == workers == [[0, 1, 3], [3, 4, 5]]
    all_bad = _dataset([ImageRecord(k, broken["missing"], ["a dog"]) for k in range(30)], coco_tokenizer_path)
    with pytest.raises(DataError) as info:
        next(iter(DataLoader(all_bad, batch_size=2, num_workers=1, collate_fn=collate_captions)))
    assert "\n" in str(info.value)  # torch wraps the worker's traceback into the message...
    message = str(unwrap_worker_error(info.value))
    assert "\n" not in message and message.startswith("too many bad samples: 20 of 20 seen")  # ...the loop unwraps


# -- annotation entries ---------------------------------------------------------------------------


def _jsonl_bytes(n: int, bad_lines: dict[int, bytes]) -> bytes:
    lines = [json.dumps({"image": f"{k}.jpg", "caption": f"a dog number {k}"}).encode() for k in range(n)]
    for k, raw in bad_lines.items():
        lines[k] = raw
    return b"\n".join(lines) + b"\n"


def test_non_utf8_and_empty_entries_skipped_within_budget(tmp_path, caplog):
    latin1 = '{"image": "x.jpg", "caption": "caf\u00e9"}'.encode("latin-1")
    path = tmp_path / "p.jsonl"
    path.write_bytes(_jsonl_bytes(200, {5: latin1}))
    with caplog.at_level(logging.WARNING):
        records = read_records(path)
    assert len(records) == 199 and "p.jsonl:6 (line is not valid UTF-8)" in caplog.text
    csv_path = tmp_path / "p.csv"
    rows = [b"image,caption"] + [f"{k}.jpg,a cat {k}".encode() for k in range(150)]
    rows[3] = b"2.jpg,caf\xe9 au lait"
    rows[7] = b"6.jpg,   "
    csv_path.write_bytes(b"\n".join(rows) + b"\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert len(read_records(csv_path, max_bad_fraction=0.02)) == 148
    assert "p.csv: line 4 (row is not valid UTF-8)" in caplog.text and "p.csv: line 8 (empty caption)" in caplog.text
    assert len(read_caption_texts([csv_path], max_bad_fraction=0.02)) == 148


def test_too_many_bad_entries_fail_at_start_naming_the_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(_jsonl_bytes(100, {k: b'{"image": "a.jpg", "caption": "\xff\xfe"}' for k in (1, 2)}))
    with pytest.raises(DataError, match=r"p\.jsonl: 2 of 100 entries are bad \(2.0%\), more than "
                                        r"data.max_bad_fraction=0.01"):
        read_records(path)
    coco = tmp_path / "captions_x.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                "annotations": [{"image_id": 1, "caption": " "}, {"image_id": 1, "caption": "ok"}]}))
    with pytest.raises(DataError, match=r"captions_x\.json: 1 of 2 entries are bad"):
        read_records(coco, tmp_path)
    assert read_records(coco, tmp_path, max_bad_fraction=0.5)[0].captions == ["ok"]
