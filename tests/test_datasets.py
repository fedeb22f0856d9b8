"""CaptionDataset + collate: COCO fixture through a DataLoader, reproducible keys, image loading edge cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from capvis.config import DataConfig
from capvis.data.annotations import ImageRecord, read_records
from capvis.data.datasets import CaptionDataset, collate_captions, load_image, subset_fraction
from capvis.data.tokenizer import EOS_ID, SOS_ID, Tokenizer, normalize_caption
from capvis.data.transforms import build_eval_transform, build_train_transform, swap_left_right
from capvis.errors import DataError

CFG = DataConfig(image_size=32, max_caption_length=12)


@pytest.fixture
def dataset(coco_fixture: Path, coco_tokenizer_path: Path) -> CaptionDataset:
    return CaptionDataset(read_records(coco_fixture), Tokenizer(coco_tokenizer_path), build_train_transform(CFG),
                          max_caption_length=CFG.max_caption_length, seed=5)


def test_coco_batch_through_dataloader(dataset: CaptionDataset) -> None:
    batch = next(iter(DataLoader(dataset, batch_size=4, collate_fn=collate_captions)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
    tokens, lengths = batch["caption_tokens"], batch["caption_lengths"]
    assert tokens.dtype == torch.long and tokens.shape == (4, int(lengths.max()))
    assert batch["image_id"].tolist() == [1000, 1007, 1014, 1021]
    for row, n in zip(tokens, lengths.tolist()):
        assert row[0] == SOS_ID and (row[n:] == 0).all() and (row[:n] != 0).all()
        assert row[n - 1] == EOS_ID or n == CFG.max_caption_length
    texts = [dataset.tokenizer.decode(row.tolist()) for row in tokens]
    for text, record in zip(texts, dataset.records):
        options = [normalize_caption(c) for c in record.captions]
        options += [swap_left_right(c) for c in options]
        assert any(c.startswith(text) for c in options), (text, options)


def test_same_key_identical_other_epoch_differs(dataset: CaptionDataset) -> None:
    a, b = dataset[1], dataset[1]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["caption_tokens"], b["caption_tokens"])
    later = dataset[1 + 3 * len(dataset)]  # epoch 3, same image
    assert later["image_id"] == a["image_id"] and not torch.equal(later["image"], a["image"])
    worker = next(iter(DataLoader(dataset, batch_size=2, num_workers=1, collate_fn=collate_captions)))
    assert torch.equal(worker["image"][1], a["image"])  # same sample in a worker process


def test_kept_decoded_images_change_no_sample(coco_fixture: Path, coco_tokenizer_path: Path) -> None:
    records = read_records(coco_fixture)
    tokenizer = Tokenizer(coco_tokenizer_path)

    def make(cache_bytes: int) -> CaptionDataset:
        return CaptionDataset(records, tokenizer, build_train_transform(CFG), CFG.max_caption_length, seed=5,
                              cache_bytes=cache_bytes)

    one = load_image(records[0].path).numel()  # uint8: one byte a value
    plain, kept, first_only = make(0), make(2**30), make(one)
    for key in range(3 * len(records)):  # three epochs: each kept image is read again after being augmented
        a, b, c = plain[key], kept[key], first_only[key]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["image"], c["image"])
        assert torch.equal(a["caption_tokens"], b["caption_tokens"])
    assert len(plain.decoded.images) == 0 and len(kept.decoded.images) == len(records)
    assert list(first_only.decoded.images) == [0] and first_only.decoded.held == one  # the budget is a ceiling


def test_caption_choice_per_visit_or_fixed(dataset: CaptionDataset) -> None:
    visits = {tuple(dataset[k * len(dataset)]["caption_tokens"].tolist()) for k in range(8)}
    assert len(visits) > 1  # image 0 has three captions; visits draw among them
    fixed = CaptionDataset(
        dataset.records, dataset.tokenizer, build_eval_transform(32), 30, seed=5, one_caption_per_image=True)
    assert len({tuple(fixed[k * len(fixed)]["caption_tokens"].tolist()) for k in range(6)}) == 1


def test_truncation_drops_eos_like_virtex(dataset: CaptionDataset) -> None:
    short = CaptionDataset(dataset.records, dataset.tokenizer, build_eval_transform(32), 4, seed=0)
    tokens = short[0]["caption_tokens"]
    assert len(tokens) == 4 and tokens[0] == SOS_ID and EOS_ID not in tokens.tolist()


def test_categories_multi_hot(tmp_path: Path, coco_fixture: Path, coco_tokenizer_path: Path) -> None:
    records = read_records(coco_fixture)[:2]
    records[0].categories, records[1].categories = [0, 2], [4]
    data = CaptionDataset(records, Tokenizer(coco_tokenizer_path), build_eval_transform(16), 10, seed=0,
                          num_categories=5)
    batch = collate_captions([data[0], data[1]])
    assert batch["categories"].tolist() == [[1, 0, 1, 0, 0], [0, 0, 0, 0, 1]]


def test_subset_fraction_seeded_and_nested() -> None:
    records = [ImageRecord(i, Path(f"{i}.jpg"), ["x"]) for i in range(100)]
    ten, twenty = subset_fraction(records, 0.1, seed=0), subset_fraction(records, 0.2, seed=0)
    assert len(ten) == 10 and len(twenty) == 20 and set(map(id, ten)) <= set(map(id, twenty))
    assert [r.image_id for r in ten] == sorted(r.image_id for r in ten)
    assert subset_fraction(records, 0.1, seed=0) == ten and subset_fraction(records, 0.1, seed=1) != ten
    assert subset_fraction(records, 1.0, seed=0) == records


def test_load_image_modes_exif_and_errors(tmp_path: Path) -> None:
    gray = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    Image.fromarray(gray).save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png")
    assert img.shape == (3, 12, 10) and img.dtype == torch.uint8 and torch.equal(img[0], img[2])
    Image.new("RGBA", (7, 5), (10, 20, 30, 40)).save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png").shape == (3, 5, 7)
    Image.new("RGB", (9, 4), (200, 0, 0)).save(tmp_path / "b.bmp")  # decoded by the PIL fallback
    assert load_image(tmp_path / "b.bmp")[:, 0, 0].tolist() == [200, 0, 0]
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise when shown
    Image.new("RGB", (20, 8), (0, 128, 0)).save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").shape == (3, 20, 8)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(DataError, match="bad.jpg"):
        load_image(tmp_path / "bad.jpg")
    with pytest.raises(DataError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")
