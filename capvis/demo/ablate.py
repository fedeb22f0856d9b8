"""``capvis ablate``: every pretext task on the same data and budget, evaluated with the same
frozen-feature SVM protocol: the paper's Figure 5a / Table 1 in miniature.

The data is CaptionWorld unless ``--data`` names another world-like directory (COCO-format
``annotations/captions_train.json`` plus ``labels_val.json`` / ``labels_test.json``).
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from capvis.demo import report  # noqa: E402
from capvis.demo.stages import (DemoSizes, demo_config, load_tokenizer, make_vocab, make_world,  # noqa: E402
                                pretrain_backbone, random_task, svm_evaluate)
from capvis.errors import ConfigError  # noqa: E402
from capvis.tasks import TASKS  # noqa: E402

log = logging.getLogger(__name__)
RANDOM = "random_init"
DEFAULT_TASKS = ("bicaptioning", "captioning", "token_classification", "multilabel_classification", "masked_lm",
                 "contrastive", RANDOM)

BUDGETS: dict[str, DemoSizes] = {
    # a few minutes per task on a 2-core CPU
    "small": DemoSizes(train_images=4000, svm_train_images=1000, svm_test_images=600, iterations=300,
                       caption_images=0, attention_images=0, overrides=("train.warmup=20",)),
    # the demo's budget per task
    "default": DemoSizes(caption_images=0, attention_images=0),
    # seconds per task: the test suite's
    "tiny": DemoSizes.quick(),
}


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t != RANDOM and t not in TASKS]
    if unknown or not tasks:
        raise ConfigError(f"unknown task(s) {', '.join(unknown) or '(none)'}; known: {', '.join([*TASKS.names(), RANDOM])}")
    return tasks


def run_ablation(tasks: Sequence[str], *, budget: str, output: str | Path, data: str | Path | None = None,
                 seed: int = 0, config: str = "demo") -> list[dict[str, Any]]:
    if budget not in BUDGETS:
        raise ConfigError(f"unknown budget {budget!r}; choose from {', '.join(BUDGETS)}")
    sizes, out = BUDGETS[budget], Path(output)
    out.mkdir(parents=True, exist_ok=True)
    base = demo_config(config, out, out, sizes, seed)
    world = Path(data) if data else make_world(out / "world", sizes, seed, base.data.image_size)
    if not (world / "annotations" / "captions_train.json").is_file():
        raise ConfigError(f"--data {world} has no annotations/captions_train.json")
    vocab = make_vocab(world, out, sizes.vocab_size)
    rows: list[dict[str, Any]] = []
    for task in tasks:
        start = time.perf_counter()
        cfg = demo_config(config, world, vocab, sizes, seed, () if task == RANDOM else (f"model.task={task}",))
        if task == RANDOM:
            model = random_task(cfg, load_tokenizer(vocab).vocab_size)
        else:
            model = pretrain_backbone(cfg, out / "runs" / task)
        scores = svm_evaluate(model.visual, world, cfg.data.image_size)
        seconds = round(time.perf_counter() - start, 1)
        rows += [{"task": task, "eval_task": k, "mAP": v, "seconds": seconds} for k, v in scores.items()]
        log.info("ablation %s: %s (%.0f s)", task, scores, seconds)
        write_outputs(rows, out)  # after every task, so a long run shows progress and loses nothing
    return rows


def write_outputs(rows: list[dict[str, Any]], out: Path) -> None:
    with (out / "ablation.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["task", "eval_task", "mAP", "seconds"])
        writer.writeheader()
        writer.writerows(rows)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    evals = list(dict.fromkeys(r["eval_task"] for r in rows))
    score = {(r["task"], r["eval_task"]): r["mAP"] for r in rows}
    seconds = {r["task"]: r["seconds"] for r in rows}
    header = ["pretext task", *[f"{report.TASK_TITLES.get(e, e)} mAP" for e in evals], "seconds"]
    table = [[t, *[f"{score[(t, e)]:.1f}" for e in evals], f"{seconds[t]:.0f}"] for t in tasks]
    (out / "ablation.md").write_text("# Pretext-task ablation (frozen features, VOC07 SVM protocol)\n\n"
                                     + report.markdown_table(header, table) + "\n")
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(tasks), 3.4), dpi=110)
    width = 0.8 / max(1, len(evals))
    for k, e in enumerate(evals):
        ax.bar([i + k * width for i in range(len(tasks))], [score[(t, e)] for t in tasks], width,
               label=report.TASK_TITLES.get(e, e))
    ax.set_xticks([i + width * (len(evals) - 1) / 2 for i in range(len(tasks))], tasks, rotation=25, ha="right",
                  fontsize=8)
    ax.set_ylabel("mAP (%)")
    ax.set_title("pretext tasks, same data and budget")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "ablation.png")
    plt.close(fig)
