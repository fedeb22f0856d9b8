"""Resume hygiene: after a stop and a resume, metrics.jsonl and TensorBoard hold each iteration once;
a shard stream refuses, in one line saying what to set, to resume under another worker count,
process count or batch (its position would silently point at other data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capvis.cli import main
from capvis.config import load_config
from capvis.data.shards import write_shards_from_annotations
from capvis.data.streaming import check_resume_split
from capvis.errors import ConfigError
from capvis.train import checkpoint as ckpt
from capvis.train.loop import Trainer, read_metrics
from capvis.train.metrics import truncate_metrics

from helpers_images import TINY, one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, busy machine
CONFIG = "bicaptioning_R_50_L1_H2048"


def _pretrain(out: Path, *overrides: str, resume: bool = False) -> int:
    return main(["pretrain", "--config", CONFIG, "--output", str(out), "--no-progress",
                 *(["--resume", "auto"] if resume else []), *TINY, *overrides])


def _tensorboard_steps(run: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()  # applies the purge_step events the way TensorBoard does
    return [e.step for e in events.Scalars(tag)]


def test_each_iteration_once_after_stop_and_resume(tmp_path, coco_fixture, coco_tokenizer_path):
    overrides = [f"data.train={coco_fixture}", f"data.vocab={coco_tokenizer_path}", "data.num_workers=0",
                 "train.iterations=6", "train.checkpoint_every=2"]
    straight, parted = tmp_path / "straight", tmp_path / "parted"
    assert _pretrain(straight, *overrides) == 0
    Trainer(load_config(CONFIG, [*TINY, *overrides]), parted, progress=False).run(until=5)
    # as if killed after logging iteration 5 but before its checkpoint landed, mid-way through a row
    for stale in (parted / "checkpoints").glob("checkpoint_00000005.pt*"):
        stale.unlink()
    with (parted / "metrics.jsonl").open("a") as fh:
        fh.write('{"iteration": 6, "lo')
    assert len((parted / "metrics.jsonl").read_text().splitlines()) == 6  # rows 1-5 and the torn one
    assert _pretrain(parted, *overrides, resume=True) == 0  # resumes from checkpoint 4: re-runs 5 and 6
    rows = read_metrics(parted)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {r["iteration"]: r["loss"] for r in rows} == {r["iteration"]: r["loss"] for r in read_metrics(straight)}
    assert _tensorboard_steps(parted, "train/loss") == [1, 2, 3, 4, 5, 6]


def test_truncation_is_atomic_and_keeps_rows_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"iteration": 1, "loss": 3.0}, {"iteration": 2, "val/loss": 2.0}, {"iteration": 3, "loss": 1.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "garbage\n")
    path.chmod(0o640)
    assert truncate_metrics(path, 2) == 2
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:2]
    assert path.stat().st_mode & 0o777 == 0o640 and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert truncate_metrics(path, 2) == 0 and truncate_metrics(tmp_path / "absent.jsonl", 0) == 0


def test_stream_resume_under_another_split_is_refused_in_one_line(tmp_path, coco_fixture, coco_tokenizer_path,
                                                                  capfd):
    write_shards_from_annotations(coco_fixture, tmp_path / "shards", shard_size=1)
    overrides = [f"data.train={tmp_path / 'shards' / 'shard-{000000..000003}.tar'}",
                 f"data.vocab={coco_tokenizer_path}", "data.num_workers=2", "train.iterations=4"]
    run = tmp_path / "run"
    Trainer(load_config(CONFIG, [*TINY, *overrides]), run, progress=False).run(until=2)
    split = ckpt.load_checkpoint(run / "checkpoints" / "checkpoint_00000002.pt")["data_stream"]
    assert split == {"world_size": 1, "num_workers": 2, "batch_size": 2, "shards": 4, "samples": 4}
    assert _pretrain(run, *overrides, "data.num_workers=1", resume=True) == 2
    err = one_line_error(capfd.readouterr().err)
    assert "cannot resume the shard stream" in err and "it was read with num_workers=2" in err
    assert "resume with data.num_workers=2" in err
    assert _pretrain(run, *overrides, "train.batch_size=4", resume=True) == 2
    assert "resume with train.batch_size=2" in one_line_error(capfd.readouterr().err)
    assert _pretrain(run, *overrides, resume=True) == 0  # the same split resumes (exactly: test_shards.py)
    assert [r["iteration"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]


def test_split_check_names_processes_and_treats_zero_and_one_worker_alike():
    saved = {"world_size": 2, "num_workers": 4, "batch_size": 8, "shards": 16, "samples": 100}
    with pytest.raises(ConfigError, match=r"world_size=2, this run has world_size=1; resume with 2 processes"):
        check_resume_split(saved, {**saved, "world_size": 1}, "c.pt")
    with pytest.raises(ConfigError, match=r"naming the same 16 shards"):
        check_resume_split(saved, {**saved, "shards": 15, "samples": 90}, "c.pt")
    one = {**saved, "num_workers": 1}
    check_resume_split(one, {**one, "num_workers": 0}, "c.pt")  # 0 workers: the main process is the one reader
    check_resume_split(saved, dict(saved), "c.pt")
