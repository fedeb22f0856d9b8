"""``run_demo``: the whole demo end to end, timed stage by stage, every number computed here."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from capvis.data.annotations import read_records
from capvis.demo import report
from capvis.demo.stages import (DemoSizes, Timer, demo_config, load_tokenizer, make_vocab, make_world,
                                pretrain_backbone, random_task, svm_evaluate, write_json)
from capvis.train.loop import read_metrics

log = logging.getLogger(__name__)
DEMO_CONFIG = "demo"
INTRO = ("A ResNet-18 (half width, small stem) was trained from scratch on CaptionWorld only to caption its "
         "images in both directions (VirTex bicaptioning). Its frozen, global-average-pooled features are "
         "compared with the same network at random initialisation on downstream labels that pretraining "
         "never saw, with the VOC07 linear-SVM protocol (per-class linear SVMs, C in {0.01, 0.1, 1, 10} "
         "by 3-fold cross-validation, mAP in %), trained on the val split and tested on the test split.")


def run_demo(output: str | Path = "runs/demo", *, seed: int = 0, quick: bool = False,
             config: str | Path = DEMO_CONFIG) -> dict[str, Any]:
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    sizes = DemoSizes.quick() if quick else DemoSizes()
    timer = Timer()
    start = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = demo_config(config, out, out, sizes, seed)  # image size for the world
    world = timer.run("world", make_world, out / "world", sizes, seed, base.data.image_size)
    vocab = timer.run("vocabulary", make_vocab, world, out, sizes.vocab_size)
    cfg = demo_config(config, world, vocab, sizes, seed)
    tokenizer = load_tokenizer(vocab)
    pretrained = timer.run("pretrain_bicaptioning", pretrain_backbone, cfg, out / "pretrain")
    baseline = random_task(cfg, tokenizer.vocab_size)
    results = {
        "bicaptioning": timer.run("svm_bicaptioning", svm_evaluate, pretrained.visual, world, cfg.data.image_size),
        "random init": timer.run("svm_random_init", svm_evaluate, baseline.visual, world, cfg.data.image_size),
    }
    pictures = timer.run("report", _pictures, out, pretrained, tokenizer, world, cfg, sizes)
    timer.seconds["total"] = round(time.perf_counter() - start, 2)
    rows = [{"method": m, "task": t, "mAP": v} for m, scores in results.items() for t, v in scores.items()]
    summary = {"seed": seed, "quick": quick, "results": rows, "seconds": timer.seconds,
               "config": cfg.to_dict(), "captions": pictures["captions"],
               "final_loss": pictures["final_loss"]}
    write_json(out / "results.json", summary)
    _write_report(out, results, pictures, timer.seconds, seed)
    header, table = report.results_table(results)
    print(report.markdown_table(header, table))
    print(f"report: {out / 'report.html'} ({timer.seconds['total']:.0f} s)")
    return summary


def _pictures(out: Path, task: Any, tokenizer: Any, world: Path, cfg: Any, sizes: DemoSizes) -> dict[str, Any]:
    metrics = read_metrics(out / "pretrain")
    report.loss_curve(metrics, out / "loss_curve.png")
    records = read_records(world / "annotations" / "captions_test.json")[: sizes.caption_images]
    max_steps = cfg.data.max_caption_length - 1
    captions, _, pictures = report.caption_images(task, tokenizer, [r.path for r in records], cfg.data.image_size,
                                                  max_steps=max_steps)
    report.caption_grid(pictures, captions, [r.captions[0] for r in records], out / "captions.png")
    attention_files = []
    chosen = records[: sizes.attention_images]
    words_list, decoded, pictures = report.caption_images(task, tokenizer, [r.path for r in chosen],
                                                          cfg.data.image_size, max_steps=max_steps, attention=True)
    for k, (tokens, maps, picture) in enumerate(zip(decoded.tokens, decoded.attention or [], pictures)):
        words = [tokenizer.id_to_piece(t).replace("\u2581", "") or "_" for t in tokens]
        name = f"attention_{k}.png"
        report.attention_figure(picture, words, maps, out / name)
        attention_files.append(name)
    losses = [r["loss"] for r in metrics if "loss" in r]
    return {"captions": [{"file_name": r.path.name, "caption": c, "reference": r.captions[0]}
                         for r, c in zip(records, captions)],
            "attention": attention_files, "final_loss": losses[-1] if losses else None,
            "first_loss": losses[0] if losses else None}


def _write_report(out: Path, results: dict, pictures: dict, seconds: dict, seed: int) -> None:
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    sections = [
        ("Pretraining loss", f"Caption cross-entropy (forward + backward) fell from {pictures['first_loss']:.2f} to "
         f"{pictures['final_loss']:.2f}.", "loss_curve.png"),
        ("Captions of held-out test images", "Beam search (beam 5) with the forward head; one reference caption "
         "shown under each.", "captions.png"),
    ]
    for k, name in enumerate(pictures["attention"]):
        sections.append((f"Attention, test image {k + 1}", "Decoder cross-attention over the visual grid for each "
                         "generated word, averaged over heads and upsampled (paper Figure 6).", name))
    sections.append(("Run", f"seed {seed}; wall time per stage: {stages}. Every number above was computed in "
                     "this run; results.json holds them.", None))
    report.write_reports(out, title="capvis demo: captions teach a ConvNet", intro=INTRO,
                         table=report.results_table(results), sections=sections)


def results_json(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
