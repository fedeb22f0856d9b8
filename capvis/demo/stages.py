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

import torch

from capvis.config import Config, apply_overrides, load_config
from capvis.data.annotations import read_caption_texts
from capvis.data.tokenizer import Tokenizer, train_tokenizer
from capvis.world import write_world
from capvis.eval.downstream import evaluate_label_tasks
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
    truth_images: int = 200  # test images captioned to check their claims against the scenes
    overrides: tuple[str, ...] = ()

    @classmethod
    def quick(cls) -> "DemoSizes":
        return cls(train_images=48, svm_train_images=48, svm_test_images=32, iterations=6, vocab_size=120,
                   caption_images=4, attention_images=1, truth_images=8,
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
    """The config file with the sizes' overrides, the demo's data, seed and device, then ``extra`` (the
    user's or a task's overrides, which win: ``train.iterations=2400`` holds at every budget)."""
    cfg = load_config(config, list(sizes.overrides))
    overrides = [f"data.train={world / 'annotations' / 'captions_train.json'}", f"data.vocab={vocab}",
                 f"train.seed={seed}", "train.device=cpu"]
    if sizes.iterations is not None:
        overrides.append(f"train.iterations={sizes.iterations}")
    return apply_overrides(cfg, [*overrides, *extra])


def pretrain_backbone(cfg: Config, out: Path) -> torch.nn.Module:
    trainer = Trainer(cfg, out, resume="auto", progress=True)
    trainer.run()
    return trainer.task.eval()


def random_task(cfg: Config, vocab_size: int) -> torch.nn.Module:
    torch.manual_seed(cfg.train.seed)
    return build_task(cfg, vocab_size).eval()


def label_evaluate(backbone: torch.nn.Module, world: Path, image_size: int, *, workers: int = 2
                   ) -> dict[str, tuple[str, float]]:
    """Every downstream task of the world by the protocol of its kind (capvis.eval.downstream): the
    multi-label ones by the VOC07 SVM protocol (paper A.1, mAP), the single-label fine-grained ones by a
    linear probe (top-1 %), on frozen GAP features; trained on ``val``, scored on ``test``, neither seen
    in pretraining. Images are used whole (resize = crop = the world's size): a crop would cut off
    labelled objects. Returns ``{task: (metric, value)}``."""
    with warnings.catch_warnings():  # rare classes without enough positives: one line, not one per class
        warnings.simplefilter("ignore")
        rows = evaluate_label_tasks(backbone, world / "annotations" / "labels_val.json",
                                    world / "annotations" / "labels_test.json", image_size=image_size,
                                    resize=image_size, batch_size=128, workers=workers)
    return {r["eval_task"]: (r["metric"], round(float(r["value"]), 2)) for r in rows}


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def load_tokenizer(path: Path) -> Tokenizer:
    return Tokenizer(path)

