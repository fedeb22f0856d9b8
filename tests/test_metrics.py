"""The metrics sink writes JSONL rows, and a full disk does not stop training."""

from __future__ import annotations

import errno
import json

from capvis.train.metrics import MetricsSink


def test_rows_and_prefixes(tmp_path):
    sink = MetricsSink(tmp_path, total=10, progress=False)
    sink.log(1, {"loss": 2.5, "lr": 0.1, "images_per_s": 3.0})
    sink.log(1, {"loss": 2.0}, prefix="val")
    sink.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"iteration": 1, "loss": 2.5, "lr": 0.1, "images_per_s": 3.0},
                    {"iteration": 1, "val/loss": 2.0}]


def test_disk_full_warns_once_and_goes_on(tmp_path, caplog):
    sink = MetricsSink(tmp_path, total=10, progress=False)

    def full(_line):
        raise OSError(errno.ENOSPC, "No space left on device")

    sink._jsonl.write = full
    for i in range(3):
        sink.log(i, {"loss": 1.0})
    sink.close()
    warnings = [r for r in caplog.records if "metrics are not being recorded" in r.getMessage()]
    assert len(warnings) == 1 and "No space left" in warnings[0].getMessage()
