"""The ablation's image-text columns: zero-shot classification and retrieval, for the runs whose task can.

A linear probe reads only the backbone; these columns read what the rest of a pretrained model learnt,
so the CLIP / SigLIP / CoCa / captioning rows of ``capvis ablate`` can be compared on their own terms.
The capability is asked of the task (:mod:`capvis.tasks.protocols`), never of its name:

* an :class:`~capvis.tasks.protocols.ImageTextEmbedder` (``contrastive``, ``siglip``, ``coca``) is scored
  by **embedding** (cosine of image and text embeddings; CoCa too, as in its paper's zero-shot numbers);
* otherwise a :class:`~capvis.tasks.protocols.CaptionLikelihoodModel` (``captioning``, ``bicaptioning``)
  by **likelihood** (CapPa's scoring classifier; per-token mean log-likelihood for retrieval);
* any other task (and ``random_init``) gets no cells: empty in the CSV, blank in the markdown.

Zero-shot (:func:`capvis.eval.zeroshot.evaluate_zeroshot`, template ``"a photo of a {}."``) scores every
task of ``labels_test.json`` on its first :data:`ZEROSHOT_IMAGES` images (those with a label, per task):
top-1 for every task (a multi-label image counts when the prediction is any of its classes) and mAP for
the multi-label ones. Retrieval (:func:`capvis.eval.retrieval.evaluate_retrieval`, every pair scored)
ranks the first :data:`RETRIEVAL_IMAGES` images of ``captions_val.json`` and all their captions
(CaptionWorld: 5 each, so 250 captions and 12,500 pairs), recall@1/5 both ways. Both caps bound the
cost whatever the budget: at the demo's model size (64 px, H256) on 2 idle cores, about 20 s per run by
likelihood (bicaptioning: 11 s zero-shot, 9 s retrieval) and 2-4 s by embedding. All values are
percentages, computed once per run on its final checkpoint (earlier checkpoints' rows leave these cells
empty).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from capvis.data.tokenizer import Tokenizer
from capvis.errors import DataError
from capvis.tasks.protocols import CaptionLikelihoodModel, ImageTextEmbedder

log = logging.getLogger(__name__)
ZEROSHOT_IMAGES = 200  # first test images scored zero-shot, per label task
RETRIEVAL_IMAGES = 50  # first val images, with all their captions, in the retrieval pool
TEMPLATES = ("a photo of a {}.",)
RECALLS = ("i2t_r@1", "i2t_r@5", "t2i_r@1", "t2i_r@5")
FAMILY_COLUMNS = ["family_method", "zeroshot_top1", "zeroshot_chance", "zeroshot_mAP", "zeroshot_mAP_chance",
                  "zeroshot_images", *RECALLS, "retrieval_images", "retrieval_captions", "family_seconds"]
# what the cached family scores of a run depend on besides its checkpoint: change it and they are recomputed
FAMILY_KEY = {"version": 1, "zeroshot_images": ZEROSHOT_IMAGES, "retrieval_images": RETRIEVAL_IMAGES,
              "templates": list(TEMPLATES)}


def family_method(task: object) -> str | None:
    """``embedding`` for an image-text embedder (CoCa included), else ``likelihood`` for a captioner, else None."""
    if isinstance(task, ImageTextEmbedder):
        return "embedding"
    if isinstance(task, CaptionLikelihoodModel):
        return "likelihood"
    return None


def _capped_labels(label_file: Path, folder: Path, n: int) -> Path:
    """A copy of ``label_file`` with its first ``n`` images only, so zero-shot costs the same at any budget."""
    raw = json.loads(label_file.read_text())
    path = folder / label_file.name
    path.write_text(json.dumps({**raw, "images": raw["images"][:n]}))
    return path


def _zeroshot(task: torch.nn.Module, tokenizer: Tokenizer, world: Path, method: str, *, image_size: int,
              max_len: int, images: int) -> dict[str, dict[str, float]]:
    """``{label task: {top1, chance, mAP, mAP_chance, images}}`` (percentages); a task too small to score is
    left out (logged)."""
    from capvis.eval.common import default_images_dir
    from capvis.eval.zeroshot import evaluate_zeroshot

    source = world / "annotations" / "labels_test.json"
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        capped = _capped_labels(source, Path(tmp), images)
        for name in json.loads(source.read_text())["tasks"]:
            try:
                r = evaluate_zeroshot(task, tokenizer, capped, name, max_len=max_len, image_size=image_size,
                                      resize=image_size, images_dir=default_images_dir(source),
                                      templates=TEMPLATES, method=method)
            except DataError as exc:  # no labelled image, or no class with positives and negatives
                log.info("ablation zero-shot %s: not scored (%s)", name, exc)
                continue
            out[name] = {"top1": 100 * r["top1"], "chance": 100 * r["chance"], "mAP": 100 * r["mAP"],
                         "mAP_chance": 100 * r["mAP_chance"], "images": r["images"]}
    return out


def _retrieval(task: torch.nn.Module, tokenizer: Tokenizer, world: Path, method: str, *, image_size: int,
               max_len: int, images: int) -> dict[str, float]:
    """Recall@1/5 both ways on the first ``images`` val images and their captions; {} without val captions."""
    from capvis.data.annotations import read_records
    from capvis.eval.retrieval import evaluate_retrieval

    captions = world / "annotations" / "captions_val.json"
    if not captions.is_file():
        log.info("ablation retrieval: %s not found, retrieval cells left empty", captions)
        return {}
    records = [r for r in read_records(captions) if r.captions][:images]
    r = evaluate_retrieval(task, tokenizer, records, max_len=max_len, image_size=image_size, resize=image_size,
                           method=method, scoring="all", workers=0)
    return {**{k: r[k] for k in RECALLS}, "images": r["images"], "captions": r["captions"]}


def family_scores(task: torch.nn.Module, tokenizer: Tokenizer | None, world: Path, *, image_size: int, max_len: int,
                  zeroshot_images: int = ZEROSHOT_IMAGES, retrieval_images: int = RETRIEVAL_IMAGES
                  ) -> dict[str, Any]:
    """A run's image-text scores (JSON-able, cached with its label scores): ``{}`` when its task can do
    neither, else ``{"method", "zeroshot": {label task: {...}}, "retrieval": {...}, "seconds"}``."""
    method = family_method(task)
    if method is None or tokenizer is None:
        return {}
    began = time.perf_counter()
    task = task.eval()
    options = {"image_size": image_size, "max_len": max_len}
    with warnings.catch_warnings():  # sklearn's AP on a class without positives among the capped images
        warnings.simplefilter("ignore")
        zeroshot = _zeroshot(task, tokenizer, world, method, images=zeroshot_images, **options)
    retrieval = _retrieval(task, tokenizer, world, method, images=retrieval_images, **options)
    seconds = round(time.perf_counter() - began, 1)
    log.info("ablation image-text scores by %s in %.1f s", method, seconds)
    return {"method": method, "zeroshot": zeroshot, "retrieval": retrieval, "seconds": seconds}


def family_cells(family: dict[str, Any], eval_task: str, metric: str) -> dict[str, Any]:
    """The CSV cells of one label-task row: zero-shot of that task (mAP only for a multi-label one, whose
    probe metric is mAP) and the run's retrieval; ``{}`` (empty cells) when the run has no such scores."""
    if not family:
        return {}
    cells: dict[str, Any] = {"family_method": family["method"], "family_seconds": family["seconds"]}
    zs = family["zeroshot"].get(eval_task)
    if zs:
        cells.update(zeroshot_top1=zs["top1"], zeroshot_chance=zs["chance"], zeroshot_images=zs["images"])
        if metric == "mAP":
            cells.update(zeroshot_mAP=zs["mAP"], zeroshot_mAP_chance=zs["mAP_chance"])
    ret = family["retrieval"]
    if ret:
        cells.update({k: ret[k] for k in RECALLS}, retrieval_images=ret["images"], retrieval_captions=ret["captions"])
    return cells


def with_family(rows: list[dict[str, Any]], family: dict[str, Any], iteration: int) -> list[dict[str, Any]]:
    """``rows`` with the family cells added to those of checkpoint ``iteration`` (the run's final one)."""
    return [{**r, **family_cells(family, r["eval_task"], r["metric"])} if r["iteration"] == iteration else r
            for r in rows]
