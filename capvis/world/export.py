"""Writing CaptionWorld to disk as a real COCO-style dataset, plus its downstream-label files.

Layout under ``DIR``::

    annotations/captions_<split>.json    COCO captions (5 per image)
    annotations/instances_<split>.json   COCO instances: boxes, polygon outlines, shape categories 1..8
    annotations/labels_<split>.json      downstream labels (format: :mod:`capvis.data.labels`)
    <split>/000000000001.jpg             JPEG, quality 90

Image ids are consecutive and unique across splits (in the order the splits are given), and the
file name is the zero-padded id, as in COCO. Images are made in worker processes in chunks; each is
a pure function of ``(seed, split, index)``, so the output is byte-identical for any worker count.
"""

from __future__ import annotations

import json
import logging
import os
import time
from multiprocessing import get_context
from pathlib import Path

from PIL import Image

from capvis.data.labels import write_label_file
from capvis.world.fine import FINE_TASKS, fine_labels
from capvis.world.grammar import captions
from capvis.world.render import render
from capvis.world.scene import caption_rng, generate_scene
from capvis.world.vocab import COLOR_NAMES, COUNT_CLASSES, SHAPES, color_shape_classes

log = logging.getLogger(__name__)

JPEG_QUALITY = 90
_CHUNK = 250
_SERIAL_BELOW = 400  # fewer images than this: no process pool (its start-up costs more than it saves)


def _make_chunk(job: tuple[int, str, int, int, int, int, str]) -> list[dict]:
    """Render, caption and save images ``start..stop`` of a split; returns their metadata."""
    seed, split, start, stop, first_id, image_size, folder = job
    records = []
    for index in range(start, stop):
        scene = generate_scene(seed, split, index, image_size)
        image_id = first_id + index
        file_name = f"{image_id:012d}.jpg"
        Image.fromarray(render(scene)).save(os.path.join(folder, file_name), quality=JPEG_QUALITY)
        objects = []
        for obj in scene.objects:
            outer = obj.polygons[0][:: max(1, len(obj.polygons[0]) // 24)]  # 24 points suffice at 64 px
            objects.append({"shape": obj.shape, "color": obj.color, "bbox": [round(v, 2) for v in obj.bbox],
                            "area": round(obj.area, 2),
                            "segmentation": [outer.clip(0, image_size).round(1).ravel().tolist()]})
        records.append({"image_id": image_id, "file_name": file_name, "objects": objects,
                        "fine": fine_labels(scene.objects, image_size),
                        "captions": captions(scene, caption_rng(seed, split, index))})
    return records


def _coco_files(records: list[dict], image_size: int, seed: int, split: str) -> tuple[dict, dict]:
    info = {"description": f"CaptionWorld {split} split (capvis), seed {seed}", "version": "1"}
    images = [{"id": r["image_id"], "file_name": r["file_name"], "width": image_size, "height": image_size}
              for r in records]
    caps, inst = [], []
    for r in records:
        # Annotation id = 10 * image id + k: unique across splits and readable.
        for k, text in enumerate(r["captions"]):
            caps.append({"id": 10 * r["image_id"] + k, "image_id": r["image_id"], "caption": text})
        for k, obj in enumerate(r["objects"]):
            inst.append({"id": 10 * r["image_id"] + k, "image_id": r["image_id"],
                         "category_id": SHAPES.index(obj["shape"]) + 1, "bbox": obj["bbox"],
                         "area": obj["area"],
                         "segmentation": obj["segmentation"], "iscrowd": 0, "color": obj["color"]})
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(SHAPES)]
    captions_json = {"info": info, "licenses": [], "images": images, "annotations": caps}
    instances_json = {"info": info, "licenses": [], "images": images, "annotations": inst,
                      "categories": categories}
    return captions_json, instances_json


def label_tasks() -> dict[str, list[str]]:
    """Class names of CaptionWorld's downstream tasks: multi-label ``shape`` (8) and ``color_shape`` (80),
    single-label ``count`` (4) and the fine-grained single-label tasks of :mod:`capvis.world.fine`."""
    tasks = {"shape": list(SHAPES), "color_shape": color_shape_classes(), "count": list(COUNT_CLASSES)}
    return {**tasks, **{name: list(task.classes) for name, task in FINE_TASKS.items()}}


def _label_entry(record: dict) -> dict:
    objs = record["objects"]
    shapes = sorted({SHAPES.index(o["shape"]) for o in objs})
    combos = sorted({COLOR_NAMES.index(o["color"]) * len(SHAPES) + SHAPES.index(o["shape"]) for o in objs})
    return {"image_id": record["image_id"], "file_name": record["file_name"],
            "labels": {"shape": shapes, "color_shape": combos, "count": [len(objs) - 1], **record["fine"]}}


def _generate(jobs: list[tuple], workers: int, total: int) -> list[dict]:
    if workers <= 1 or total < _SERIAL_BELOW:
        return [r for job in jobs for r in _make_chunk(job)]
    with get_context("fork" if os.name == "posix" else "spawn").Pool(workers) as pool:
        return [r for chunk in pool.imap(_make_chunk, jobs) for r in chunk]


def write_world(output: str | Path, splits: dict[str, int], seed: int = 0, image_size: int = 64,
                workers: int | None = None) -> dict:
    """Generate and write CaptionWorld splits (see module docstring); splits with 0 images are skipped.

    Returns:
        Summary: ``{"output", "seed", "image_size", "splits": {split: n}, "seconds"}``.
    """
    start_time = time.perf_counter()
    output = Path(output)
    (output / "annotations").mkdir(parents=True, exist_ok=True)
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    first_id, written = 1, {}
    for split, count in splits.items():
        if count <= 0:
            continue
        folder = output / split
        folder.mkdir(parents=True, exist_ok=True)
        jobs = [(seed, split, lo, min(lo + _CHUNK, count), first_id, image_size, str(folder))
                for lo in range(0, count, _CHUNK)]
        records = _generate(jobs, workers, count)
        captions_json, instances_json = _coco_files(records, image_size, seed, split)
        for name, data in (("captions", captions_json), ("instances", instances_json)):
            (output / "annotations" / f"{name}_{split}.json").write_text(json.dumps(data), encoding="utf-8")
        write_label_file(output / "annotations" / f"labels_{split}.json", label_tasks(),
                         [_label_entry(r) for r in records])
        log.info("CaptionWorld %s: %d images -> %s", split, count, folder)
        first_id += count
        written[split] = count
    return {"output": str(output), "seed": seed, "image_size": image_size, "splits": written,
            "seconds": round(time.perf_counter() - start_time, 2)}
