"""``run_demo``: the whole demo end to end, timed stage by stage, every number computed here."""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch

from capvis.data.annotations import read_records
from capvis.demo import report
from capvis.demo.caption_truth import caption_truth, shape_confusion, world_objects
from capvis.demo.stages import (
    DemoSizes,
    Timer,
    demo_config,
    label_evaluate,
    load_tokenizer,
    make_vocab,
    make_world,
    pretrain_backbone,
    random_task,
    write_json,
)
from capvis.eval.attention import save_attention, word_maps
from capvis.train.loop import read_metrics
from capvis.train.precision import resolve_precision

log = logging.getLogger(__name__)
DEMO_CONFIG = "demo"
INTRO = ("A ResNet-18 (half width, small stem) was trained from scratch on CaptionWorld only to caption its "
         "images in both directions (VirTex bicaptioning). Its frozen, global-average-pooled features are "
         "compared with the same network at random initialisation on downstream labels that pretraining "
         "never saw: presence tasks (several classes per image) with the VOC07 linear-SVM protocol (per-class "
         "linear SVMs, C in {0.01, 0.1, 1, 10} by 3-fold cross-validation, mAP in %), fine-grained single-label "
         "tasks (attributes bound to objects, relations) with a linear probe (multinomial logistic regression, "
         "weight decay chosen on held-out rows, top-1 %); trained on the val split, tested on the test split.")


def run_demo(output: str | Path = "runs/demo", *, seed: int = 0, quick: bool = False,
             config: str | Path = DEMO_CONFIG, overrides: Sequence[str] = ()) -> dict[str, Any]:
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    sizes = DemoSizes.quick() if quick else DemoSizes()
    timer = Timer()
    start = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    extra = tuple(overrides)
    base = demo_config(config, out, out, sizes, seed, extra)  # image size for the world
    world = timer.run("world", make_world, out / "world", sizes, seed, base.data.image_size)
    vocab = timer.run("vocabulary", make_vocab, world, out, sizes.vocab_size)
    cfg = demo_config(config, world, vocab, sizes, seed, extra)
    tokenizer = load_tokenizer(vocab)
    pretrained = timer.run("pretrain_bicaptioning", pretrain_backbone, cfg, out / "pretrain")
    baseline = random_task(cfg, tokenizer.vocab_size)
    scored = {
        "bicaptioning": timer.run("eval_bicaptioning", label_evaluate, pretrained.visual, world, cfg.data.image_size),
        "random init": timer.run("eval_random_init", label_evaluate, baseline.visual, world, cfg.data.image_size),
    }
    results = {m: {t: v for t, (_, v) in s.items()} for m, s in scored.items()}
    metrics = {t: metric for t, (metric, _) in scored["bicaptioning"].items()}
    captioner = pretrained.for_inference()  # backbone BatchNorms folded: the same captions, sooner
    pictures = timer.run("report", _pictures, out, captioner, tokenizer, world, cfg, sizes)
    truth, confusion = timer.run("caption_truth", _caption_truth, out, captioner, tokenizer, world, cfg, sizes)
    timer.seconds["total"] = round(time.perf_counter() - start, 2)
    precision = resolve_precision(cfg.train.precision, torch.device(cfg.train.device)).name
    rows = [{"method": m, "task": t, "metric": metrics[t], "value": v} for m, scores in results.items()
            for t, v in scores.items()]
    summary = {"seed": seed, "quick": quick, "results": rows, "caption_truth": truth,
               "shape_confusion": [{"shape": t, "said": s, "count": n} for (t, s), n in sorted(confusion.items())],
               "seconds": timer.seconds,
               "precision": precision, "config": cfg.to_dict(), "captions": pictures["captions"],
               "final_loss": pictures["final_loss"]}
    write_json(out / "results.json", summary)
    _write_report(out, results, metrics, pictures, truth, timer.seconds,
                  f"seed {seed}; {cfg.train.iterations:,} iterations of batch {cfg.train.batch_size} in {precision} "
                  f"(train.precision={cfg.train.precision})")
    header, table = report.results_table(results, metrics)
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
        words, merged = word_maps([tokenizer.id_to_piece(t) for t in tokens], maps)
        name = f"attention_{k}.png"
        save_attention(out / name, picture, words, merged)
        attention_files.append(name)
    losses = [r["loss"] for r in metrics if "loss" in r]
    return {"captions": [{"file_name": r.path.name, "caption": c, "reference": r.captions[0]}
                         for r, c in zip(records, captions)],
            "attention": attention_files, "final_loss": losses[-1] if losses else None,
            "first_loss": losses[0] if losses else None}


def _caption_truth(out: Path, task: Any, tokenizer: Any, world: Path, cfg: Any, sizes: DemoSizes
                   ) -> tuple[dict[str, float], Counter[tuple[str, str]]]:
    """Beam-search captions of test images, their colour-shape claims checked against the scenes; and the
    shape confusion of the mentions whose colour names one object (drawn to ``shape_confusion.png``)."""
    records = read_records(world / "annotations" / "captions_test.json")[: sizes.truth_images]
    captions: dict[int, str] = {}
    for lo in range(0, len(records), 50):
        chunk = records[lo:lo + 50]
        texts, _, _ = report.caption_images(task, tokenizer, [r.path for r in chunk], cfg.data.image_size,
                                            max_steps=cfg.data.max_caption_length - 1)
        captions.update({r.image_id: text for r, text in zip(chunk, texts)})
    objects = world_objects(world / "annotations" / "instances_test.json")
    confusion = shape_confusion(captions, objects)
    report.confusion_figure(confusion, out / "shape_confusion.png")
    return caption_truth(captions, objects), confusion


def _write_report(out: Path, results: dict, metrics: dict, pictures: dict, truth: dict, seconds: dict,
                  run: str) -> None:
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    sections = [
        ("Pretraining loss", f"Caption cross-entropy (forward + backward) fell from {pictures['first_loss']:.2f} to "
         f"{pictures['final_loss']:.2f}.", "loss_curve.png"),
        ("Captions of held-out test images", "Beam search (beam 5) with the forward head; one reference caption "
         "shown under each.", "captions.png"),
    ]
    sections.append(("Are the captions true?", f"Of the colour-shape mentions in beam-search captions of "
                     f"{truth['captions']} test images ({truth['mentions_per_caption']:.1f} a caption), "
                     f"{truth['color_shape_precision']:.1f}% are true of the image (an object of that colour and "
                     f"shape is there); {truth['object_recall']:.1f}% of the images' objects are named by colour "
                     f"and shape; {truth['shape_precision']:.1f}% of shape nouns name a shape in the image; "
                     f"{truth['vague_captions']:.1f}% of captions name no shape at all. Checked against the "
                     "world's scene records, not against reference sentences.", None))
    sections.append(("How the false mentions are false", f"Of all colour-shape mentions, "
                     f"{truth['wrong_shape_mentions']:.1f}% name a shape that is in no object, "
                     f"{truth['wrong_colour_mentions']:.1f}% a colour that is in no object and "
                     f"{truth['misbound_mentions']:.1f}% a colour and a shape that are both there but on different "
                     "objects. The matrix counts, for the mentions whose colour belongs to one object only, that "
                     "object's shape (rows) against the shape the caption says (columns).", "shape_confusion.png"))
    for k, name in enumerate(pictures["attention"]):
        sections.append((f"Attention, test image {k + 1}", "Decoder cross-attention over the visual grid for each "
                         "generated word, averaged over heads and upsampled (paper Figure 6).", name))
    sections.append(("Run", f"{run}; wall time per stage: {stages}. Every number above was computed in "
                     "this run; results.json holds them.", None))
    report.write_reports(out, title="capvis demo: captions teach a ConvNet", intro=INTRO,
                         table=report.results_table(results, metrics), sections=sections)
