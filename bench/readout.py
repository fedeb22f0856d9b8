"""Does a position-aware readout change the relational columns? Every labels task of a CaptionWorld-like
directory, scored on frozen features read out of the last grid three ways, for a trained run and for the
same network at random initialisation (issue 12's "Features" hypothesis):

    python bench/readout.py --run RUN/pretrain --world RUN/world [--readouts 1,2,4]

A readout of ``n`` averages the (C, h, w) grid over an n x n grid of cells and concatenates the cells
(``1``: global average pooling, the paper's protocol; ``4`` on the demo's 4x4 grid: every cell). Each
is scored exactly as ``capvis demo`` scores its columns (``capvis.eval.downstream``: multi-label tasks by
the VOC07 SVM protocol, single-label ones by the linear probe; trained on ``val``, scored on ``test``,
images whole). Prints one JSON line per (model, readout): the columns, the feature size and seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import capvis
from capvis.config import load_config
from capvis.demo.stages import random_task
from capvis.eval.downstream import check_same_tasks, evaluate_feature_tasks, label_file_images
from capvis.eval.features import extract_features


class CellReadout(nn.Module):
    """A backbone whose pooled features are the means of an ``cells`` x ``cells`` grid of regions."""

    def __init__(self, backbone: nn.Module, cells: int) -> None:
        super().__init__()
        self.backbone, self.cells = backbone, cells

    def for_inference(self) -> "CellReadout":
        return CellReadout(self.backbone.for_inference(), self.cells)

    def check_stage(self, stage: str | None) -> None:
        self.backbone.check_stage(stage)

    def pooled(self, images: Tensor, stage: str | None = None) -> Tensor:
        return F.adaptive_avg_pool2d(self.backbone(images), self.cells).flatten(1)  # (B, C * cells^2)


def score(backbone: nn.Module, world: Path, cells: int, image_size: int) -> dict:
    start = time.perf_counter()
    ann = world / "annotations"
    tasks, train_entries, train_paths = label_file_images(ann / "labels_val.json")
    test_tasks, test_entries, test_paths = label_file_images(ann / "labels_test.json")
    check_same_tasks(tasks, test_tasks)
    model = CellReadout(backbone, cells)
    options = dict(image_size=image_size, resize=image_size, batch_size=128)
    train_x, test_x = extract_features(model, train_paths, **options), extract_features(model, test_paths, **options)
    rows = evaluate_feature_tasks(train_x, train_entries, test_x, test_entries, tasks, workers=2)
    return {"readout": cells, "features": int(train_x.shape[1]),
            "columns": {r["eval_task"]: round(r["value"], 2) for r in rows},
            "metrics": {r["eval_task"]: r["metric"] for r in rows}, "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a pretraining run directory (config.yaml, checkpoints/)")
    p.add_argument("--world", required=True, help="a CaptionWorld-like directory (annotations/labels_*.json)")
    p.add_argument("--readouts", default="1,2,4", help="cells per side, comma-separated (default 1,2,4)")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise SystemExit(f"--run {run}: no config.yaml there (a `capvis pretrain` output directory?)")
    cfg = load_config(run / "config.yaml")
    model = capvis.load(run, "model")
    untrained = random_task(cfg, model.tokenizer.vocab_size).visual  # the demo's baseline: same seed
    for name, backbone in (("pretrained", model.visual), ("random init", untrained)):
        for cells in (int(c) for c in args.readouts.split(",")):
            row = score(backbone, Path(args.world), cells, cfg.data.image_size)
            print(json.dumps({"model": name, **row}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
