"""Tar shards: idempotent writing, exactly-once streaming over ranks x workers, exact resume, bad samples,
reduced-size decoding, and pretraining on a shard pattern."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from capvis.cli import main
from capvis.data.annotations import read_records
from capvis.data.datasets import CaptionDataset, collate_captions
from capvis.data.shards import expand_pattern, shard_counts, write_shards, write_shards_from_annotations
from capvis.data.streaming import ShardStream, batches_before, buffer_shuffle_order, decode_draft
from capvis.data.tokenizer import Tokenizer
from capvis.data.transforms import TrainTransform
from capvis.train import checkpoint as ckpt
from capvis.train.loop import read_metrics

from conftest import write_coco

TEN = [[f"a dog number {k} runs on the grass.", f"the cat {k} sits left of a sofa."] for k in range(10)]


def make_shards(root: Path, shard_size: int, captions=TEN) -> list[str]:
    coco = write_coco(root / "coco", captions)
    manifest = write_shards_from_annotations(coco, root / "shards", shard_size=shard_size)
    return expand_pattern(str(root / "shards" / manifest["pattern"]))


def stream(shards, vocab, **kwargs) -> ShardStream:
    kwargs = {"max_caption_length": 12, "seed": 3, "shuffle_buffer": 4, **kwargs}
    return ShardStream(shards, Tokenizer(vocab), TrainTransform(size=16), **kwargs)


def test_shards_command_is_idempotent_and_webdataset_reads_it(tmp_path, coco_fixture, capsys):
    import webdataset as wds

    out = tmp_path / "shards"
    args = ["shards", "--input", str(coco_fixture), "--output", str(out), "--shard-size", "3"]
    assert main(args) == 0
    assert "data.train=" in capsys.readouterr().out
    first = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert sorted(first) == ["manifest.json", "shard-000000.tar", "shard-000001.tar"]
    assert main(args) == 0
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir())} == first  # byte-identical re-run
    manifest = json.loads(first["manifest.json"])
    assert manifest["pattern"] == "shard-{000000..000001}.tar" and manifest["samples"] == 4
    assert [s["samples"] for s in manifest["shards"]] == [3, 1]
    records = read_records(coco_fixture)
    samples = list(wds.WebDataset(str(out / manifest["pattern"]), shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [f"{k:09d}" for k in range(4)]
    for sample, record in zip(samples, records):
        assert sample["jpg"] == record.path.read_bytes()  # copied, not re-encoded
        assert json.loads(sample["json"]) == {"captions": record.captions, "image_id": record.image_id}
        assert sample["txt"].decode() == record.captions[0]
    assert main([*args[:-1], "4"]) == 0  # a new shard size: the stale second shard goes
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-000000.tar"]


@pytest.mark.parametrize("shard_size", [2, 4])  # 5 shards >= 4 slots (whole shards); 3 shards (striding)
def test_two_ranks_two_workers_see_every_sample_once_per_epoch(tmp_path, coco_tokenizer_path, shard_size):
    shards = make_shards(tmp_path, shard_size)
    assert shard_counts(shards) == [shard_size] * (10 // shard_size) + ([10 % shard_size] if 10 % shard_size else [])
    seen = {0: [], 1: []}
    for rank in range(2):
        ds = stream(shards, coco_tokenizer_path, rank=rank, world_size=2)
        loader = DataLoader(ds, batch_size=1, num_workers=2, collate_fn=collate_captions)
        batches = [b["image_id"].item() for _, b in zip(range(24), loader)]
        for worker in range(2):
            ids = batches[worker::2]  # batch j comes from worker j % 2
            slot = rank * 2 + worker
            n0, n1 = ds.slot_length(0, slot, 4), ds.slot_length(1, slot, 4)
            seen[0] += ids[:n0]
            seen[1] += ids[n0:n0 + n1]
    everything = sorted(r.image_id for r in read_records(tmp_path / "coco/annotations/captions_train2017.json"))
    assert sorted(seen[0]) == everything and sorted(seen[1]) == everything


def test_one_finite_epoch_gives_every_slot_the_same_count(tmp_path, coco_tokenizer_path):
    shards = make_shards(tmp_path, 2)  # 5 shards over 2 slots: 3 and 2 shards, the tail of the first dropped
    counts = [len(list(stream(shards, coco_tokenizer_path, rank=r, world_size=2, infinite=False))) for r in range(2)]
    assert counts == [4, 4]


def test_resume_mid_epoch_continues_the_uninterrupted_stream(tmp_path, coco_tokenizer_path):
    shards = make_shards(tmp_path, 3)

    def batches(start, n):
        ds = stream(shards, coco_tokenizer_path, start_iteration=start, batch_size=2)
        loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_captions)
        return [b for _, b in zip(range(n), loader)]

    full = batches(0, 9)  # 2 workers x 5 samples per epoch: crosses into epoch 1
    resumed = batches(3, 6)
    for a, b in zip(full[3:], resumed, strict=True):
        assert a["image_id"].tolist() == b["image_id"].tolist()
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["caption_tokens"], b["caption_tokens"])


def test_streamed_sample_equals_caption_dataset_sample(tmp_path, coco_tokenizer_path):
    shards = make_shards(tmp_path, 4)
    records = read_records(tmp_path / "coco/annotations/captions_train2017.json")
    transform = TrainTransform(size=16)
    reference = CaptionDataset(records, Tokenizer(coco_tokenizer_path), transform, max_caption_length=12, seed=3)
    by_id = {r.image_id: k for k, r in enumerate(records)}
    ds = stream(shards, coco_tokenizer_path, draft=False)  # draft decoding would change the pixels
    for position, sample in zip(range(20), ds):
        epoch = position // 10
        expected = reference[epoch * 10 + by_id[sample["image_id"]]]
        assert torch.equal(sample["image"], expected["image"])
        assert torch.equal(sample["caption_tokens"], expected["caption_tokens"])


def test_bad_samples_are_skipped_counted_and_logged(tmp_path, coco_tokenizer_path, caplog):
    coco = write_coco(tmp_path / "coco", TEN[:5])
    records = read_records(coco)
    records[1].path.write_bytes(b"\xff\xd8\xff" + b"not a jpeg" * 10)  # copied as is, fails to decode
    records[4].captions = ["   "]  # a shard written by another tool may hold an empty caption
    manifest = write_shards(records, tmp_path / "shards", shard_size=10)
    ds = stream(expand_pattern(str(tmp_path / "shards" / manifest["pattern"])), coco_tokenizer_path, infinite=False)
    with caplog.at_level(logging.WARNING, logger="capvis.data.streaming"):
        ids = sorted(s["image_id"] for s in ds)
    assert ids == [1000, 1014, 1021] and ds.bad_samples == 2
    assert "000000001" in caplog.text and "000000004" in caplog.text


def test_draft_decodes_large_crops_at_reduced_size(tmp_path):
    from io import BytesIO

    pixels = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    buf = BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    big = TrainTransform(size=64, crop_scale=(0.9, 1.0))
    image = decode_draft(buf.getvalue(), big, torch.Generator().manual_seed(0))
    assert image is not None and image.shape == (3, 120, 160)  # crop >= 4 x 64 px: decoded at 1/4
    assert decode_draft(buf.getvalue(), TrainTransform(size=224), torch.Generator().manual_seed(0)) is None


def test_shuffle_order_and_round_robin_arithmetic():
    order = buffer_shuffle_order(50, 8, random.Random(0))
    assert sorted(order.tolist()) == list(range(50)) and order.tolist() != list(range(50))
    assert all(order[p] < p + 8 for p in range(50))  # never waits for more than a buffer of input
    assert [batches_before(5, w, 2) for w in range(2)] == [3, 2]
    assert [batches_before(1, w, 3) for w in range(3)] == [1, 0, 0]


def test_pretrain_on_a_shard_pattern_resumes_exactly(tmp_path, coco_fixture, coco_tokenizer_path):
    from capvis.config import load_config
    from capvis.train.loop import Trainer

    write_shards_from_annotations(coco_fixture, tmp_path / "shards", shard_size=2)
    pattern = tmp_path / "shards" / "shard-{000000..000001}.tar"
    overrides = [f"data.train={pattern}", f"data.val={pattern}", f"data.vocab={coco_tokenizer_path}",
                 "model.backbone=resnet18", "model.small_stem=true", "data.image_size=32", "model.textual.hidden=64",
                 "data.num_workers=2", "train.batch_size=2", "train.warmup=1", "train.log_every=1",
                 "train.checkpoint_every=100", "train.val_every=5", "train.channels_last=false",
                 "train.iterations=5"]
    straight, parted = tmp_path / "straight", tmp_path / "parted"
    assert main(["pretrain", "--config", "bicaptioning_R_50_L1_H2048", "--output", str(straight), "--no-progress",
                 *overrides]) == 0
    cfg = load_config("bicaptioning_R_50_L1_H2048", overrides)
    Trainer(cfg, parted, progress=False).run(until=3)
    Trainer(cfg, parted, resume="auto", progress=False).run()
    a = {r["iteration"]: r["loss"] for r in read_metrics(straight) if "loss" in r}
    b = {r["iteration"]: r["loss"] for r in read_metrics(parted) if "loss" in r}
    assert list(b) == [1, 2, 3, 4, 5] and a == b  # the resumed run sees the batches the straight one saw
    assert any("val/loss" in r for r in read_metrics(straight))
    wa = ckpt.load_checkpoint(straight / "checkpoints/checkpoint_00000005.pt")["model"]
    wb = ckpt.load_checkpoint(parted / "checkpoints/checkpoint_00000005.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
