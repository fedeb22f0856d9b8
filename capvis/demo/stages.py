"""The demo's stages as plain functions, reused by ``capvis ablate``.

Each stage reads what the previous one wrote; every number in the report comes from here.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from capvis.config import Config, apply_overrides, load_config
from capvis.data.annotations import read_caption_texts
from capvis.data.labels import label_matrix, read_label_file
from capvis.data.tokenizer import Tokenizer, train_tokenizer
from capvis.data.world import write_world
from capvis.eval.features import extract_features
from capvis.eval.svm import train_eval_svms
from capvis.tasks import build_task
from capvis.train.loop import Trainer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSizes:
    """How much of everything the demo makes and trains; ``quick`` is the test-suite version."""

    train_images: int = 8000
    svm_train_images: int = 2000
    svm_test_images: int = 1000
    iterations: int | None = None  # None: the config's
    vocab_size: int = 400
    caption_images: int = 12
    attention_images: int = 3
    overrides: tuple[str, ...] = ()

    @classmethod
    def quick(cls) -> "DemoSizes":
        return cls(train_images=48, svm_train_images=48, svm_test_images=32, iterations=6, vocab_size=120,
                   caption_images=4, attention_images=1,
                   overrides=("train.batch_size=8", "model.textual.hidden=64", "train.warmup=2",
                              "train.log_every=2", "train.checkpoint_every=6", "data.num_workers=0"))


@dataclass
class Timer:
    seconds: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        log.info("demo stage: %s", name)
        result = fn(*args, **kwargs)
        self.seconds[name] = round(time.perf_counter() - start, 2)
        return result


def make_world(root: Path, sizes: DemoSizes, seed: int, image_size: int) -> Path:
    splits = {"train": sizes.train_images, "val": sizes.svm_train_images, "test": sizes.svm_test_images}
    if not (root / "annotations" / "labels_test.json").is_file():
        write_world(root, splits, seed=seed, image_size=image_size)
    return root


def make_vocab(world: Path, out: Path, vocab_size: int) -> Path:
    texts = read_caption_texts([world / "annotations" / "captions_train.json"])
    return train_tokenizer(texts, out / "vocab", vocab_size=vocab_size)


def demo_config(config: str | Path, world: Path, vocab: Path, sizes: DemoSizes, seed: int,
                extra: tuple[str, ...] = ()) -> Config:
    cfg = load_config(config, [*sizes.overrides, *extra])
    overrides = [f"data.train={world / 'annotations' / 'captions_train.json'}", f"data.vocab={vocab}",
                 f"train.seed={seed}", "train.device=cpu"]
    if sizes.iterations is not None:
        overrides.append(f"train.iterations={sizes.iterations}")
    return apply_overrides(cfg, overrides)


def pretrain_backbone(cfg: Config, out: Path) -> torch.nn.Module:
    trainer = Trainer(cfg, out, resume="auto", progress=True)
    trainer.run()
    return trainer.task.eval()


def random_task(cfg: Config, vocab_size: int) -> torch.nn.Module:
    torch.manual_seed(cfg.train.seed)
    return build_task(cfg, vocab_size).eval()


def split_images(world: Path, split: str) -> tuple[list[Path], dict[str, list[str]], list[dict]]:
    tasks, entries = read_label_file(world / "annotations" / f"labels_{split}.json")
    return [world / split / e["file_name"] for e in entries], tasks, entries


def svm_evaluate(backbone: torch.nn.Module, world: Path, image_size: int, *, workers: int = 2) -> dict[str, float]:
    """VOC07 protocol (paper A.1) on CaptionWorld's downstream labels: SVMs on GAP features of
    the ``val`` images, mAP on the ``test`` images; neither split was seen in pretraining."""
    train_paths, tasks, train_entries = split_images(world, "val")
    test_paths, _, test_entries = split_images(world, "test")
    kwargs = {"image_size": image_size, "resize": image_size, "batch_size": 128}
    train_x = extract_features(backbone, train_paths, **kwargs)
    test_x = extract_features(backbone, test_paths, **kwargs)
    results = {}
    for task, classes in tasks.items():
        train_y = label_matrix(train_entries, task, len(classes))
        test_y = label_matrix(test_entries, task, len(classes))
        with warnings.catch_warnings():  # rare classes without enough positives: one line, not one per class
            warnings.simplefilter("ignore")
            result = train_eval_svms(train_x, train_y, test_x, test_y, workers=workers, class_names=classes)
        if result.skipped:
            log.info("%s: %d of %d classes have too few examples for 3-fold CV and are left out of mAP",
                     task, len(result.skipped), len(classes))
        results[task] = round(float(result.map), 2)
    return results


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def load_tokenizer(path: Path) -> Tokenizer:
    return Tokenizer(path)


def feature_stats(x: np.ndarray) -> dict[str, float]:
    return {"mean": float(x.mean()), "std": float(x.std())}
