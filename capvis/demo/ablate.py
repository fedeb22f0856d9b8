"""``capvis ablate``: pretext tasks x seeds x data on the same budget, every labels task of the data
scored at 1/4, 1/2 and all of each run's budget: the paper's Figure 5a / Table 1 (tasks) and
Figure 4 (data efficiency) in miniature.

The data is CaptionWorld unless ``--data`` names another world-like directory (COCO-format
``annotations/captions_train.json`` plus ``labels_val.json`` / ``labels_test.json``). Each run's
frozen backbone is scored on every task of those label files by the protocol of its kind
(:func:`capvis.eval.downstream.evaluate_label_tasks`: multi-label -> VOC07 SVM mAP, single-label ->
linear probe top-1), trained on ``val`` and tested on ``test``; pretraining never sees either split.

A task entry may carry config overrides after colons, ``task:key=value[:key=value...]``, e.g.
``bicaptioning:model.textual.hidden=512``; a bare key (``bicaptioning:dropout=0``) names the one
config field of that name anywhere in the config (ambiguous or unknown names are an error). The
entry, as written, is the row's ``task``. A name may also be an alias of :data:`ALIASES`, a task with
fixed overrides that has no task class of its own: ``siglip`` is ``contrastive`` with
``model.contrastive.loss=siglip`` (options after it apply on top). Outputs are written by
:mod:`capvis.demo.ablate_report`.

Runs whose task embeds images and text or scores captions also get zero-shot and retrieval columns
(:mod:`capvis.demo.ablate_family`), on their final checkpoint.

``jobs`` > 1 runs that many grid cells at once, each in its own process with an equal share of the
intra-op threads: a small model's step scales poorly over threads (the demo's: 0.287 s a step on one
thread, 0.235 s on two), so two one-thread runs on two cores finish more work than one two-thread run.
Each run's result is the same as in a sequential ablation run with that many threads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import re
import time
import warnings
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from capvis.config import Config, apply_overrides, field_types
from capvis.demo.ablate_family import FAMILY_KEY, family_scores, with_family
from capvis.demo.ablate_report import write_outputs
from capvis.demo.stages import DemoSizes, demo_config, load_tokenizer, make_vocab, make_world, random_task
from capvis.errors import CheckpointError, ConfigError
from capvis.tasks import TASKS

log = logging.getLogger(__name__)
RANDOM = "random_init"
DEFAULT_TASKS = ("bicaptioning", "captioning", "token_classification", "multilabel_classification", "masked_lm",
                 "contrastive", RANDOM)
# the rest of the image-text family: in the default list of the largest budget only (two more runs, about
# 2/7 more time there), selectable with --tasks at any budget
FAMILY_TASKS = ("coca", "siglip")
# named task variants without a task class of their own: name -> (registered task, fixed overrides)
ALIASES: dict[str, tuple[str, dict[str, str]]] = {"siglip": ("contrastive", {"model.contrastive.loss": "siglip"})}
POINTS = (0.25, 0.5, 1.0)  # evaluated shares of each run's iterations

BUDGETS: dict[str, DemoSizes] = {
    # a few minutes per task on a 2-core CPU
    "small": DemoSizes(train_images=4000, svm_train_images=1000, svm_test_images=600, iterations=300,
                       caption_images=0, attention_images=0, overrides=("train.warmup=20",)),
    # the demo's budget per task
    "default": DemoSizes(caption_images=0, attention_images=0),
    # seconds per task: the test suite's
    "tiny": DemoSizes(train_images=48, svm_train_images=40, svm_test_images=24, iterations=4, vocab_size=120,
                      caption_images=0, attention_images=0,
                      overrides=("train.batch_size=8", "model.textual.hidden=64", "model.visual_width=16",
                                 "data.image_size=32", "train.warmup=1", "train.log_every=2", "data.num_workers=0")),
}


def default_tasks(budget: str) -> tuple[str, ...]:
    """The ``--tasks`` of a budget when none are given: :data:`DEFAULT_TASKS`, plus coca and siglip at the
    largest budget (``default``)."""
    return (*DEFAULT_TASKS[:-1], *FAMILY_TASKS, RANDOM) if budget == "default" else DEFAULT_TASKS


@dataclass(frozen=True)
class TaskSpec:
    """One entry of ``--tasks``: the task's name, its config overrides, and the entry as written."""

    label: str
    task: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunSpec:
    """One pretraining run of the grid (random init: no training, scored once)."""

    spec: TaskSpec
    seed: int
    fraction: float = 1.0
    captions_per_image: int = 0  # 0: every caption the data has

    @property
    def name(self) -> str:
        safe = re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.spec.label)
        extra = f"_f{self.fraction:g}_c{self.captions_per_image}" if self.fraction < 1 or self.captions_per_image \
            else ""
        return f"{safe}/seed{self.seed}{extra}"


def split_list(text: str) -> list[str]:
    """Comma-separated items, commas inside brackets kept (``data.crop_scale=[0.5,1.0]``)."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "(": 1, "{": 1, "]": -1, ")": -1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    return [t.strip() for t in [*items, current] if t.strip()]


def _field_paths(cls: type = Config, prefix: str = "") -> dict[str, list[str]]:
    """Every leaf field name of the config -> its dotted paths."""
    paths: dict[str, list[str]] = {}
    for key, tp in field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            for name, found in _field_paths(tp, f"{prefix}{key}.").items():
                paths.setdefault(name, []).extend(found)
        else:
            paths.setdefault(key, []).append(f"{prefix}{key}")
    return paths


def resolve_key(key: str) -> str:
    """A dotted key as is; a bare field name -> the one dotted path that ends in it."""
    if "." in key:
        return key
    found = _field_paths().get(key, [])
    if len(found) != 1:
        why = f"is ambiguous ({', '.join(found)})" if found else "is not a config field"
        raise ConfigError(f"task option {key!r} {why}; write the dotted key, e.g. model.textual.hidden=512")
    return found[0]


def parse_task(entry: str) -> TaskSpec:
    """``"bicaptioning:dropout=0:train.lr_textual=0.002"`` -> TaskSpec (overrides as dotted key=value)."""
    name, *options = entry.split(":")
    name = name.strip()
    task, fixed = ALIASES.get(name, (name, {}))
    if task != RANDOM and task not in TASKS:
        raise ConfigError(f"unknown task {name!r}; known: {', '.join([*TASKS.names(), RANDOM])}; "
                          f"aliases: {', '.join(ALIASES)}")
    overrides = [f"{key}={value}" for key, value in fixed.items()]
    for option in options:
        key, eq, value = option.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"task option {option!r} of {entry!r} is not key=value")
        overrides.append(f"{resolve_key(key.strip())}={value.strip()}")
    if task == RANDOM and any(o.startswith(("train.", "data.")) for o in overrides):
        raise ConfigError(f"{entry!r}: random_init trains nothing; only model.* options apply")
    return TaskSpec(entry.strip(), task, tuple(overrides))


def parse_tasks(text: str) -> list[TaskSpec]:
    specs = [parse_task(t) for t in split_list(text)]
    if not specs:
        raise ConfigError("--tasks names no task")
    labels = Counter(s.label for s in specs)
    if max(labels.values()) > 1:
        raise ConfigError(f"--tasks lists {[k for k, n in labels.items() if n > 1]} twice")
    return specs


def parse_fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in split_list(text))
    except ValueError:
        raise ConfigError(f"--fractions {text!r} must be comma-separated numbers in (0, 1]") from None
    if not values or not all(0 < v <= 1 for v in values):
        raise ConfigError(f"--fractions {text!r} must be numbers in (0, 1]")
    return values


def parse_captions(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in split_list(text))
    except ValueError:
        raise ConfigError(f"--captions-per-image {text!r} must be comma-separated integers") from None
    if not values or min(values) < 1:
        raise ConfigError(f"--captions-per-image {text!r} must be integers >= 1")
    return values


def checkpoint_plan(iterations: int) -> tuple[int, list[int]]:
    """``(checkpoint_every, evaluated iterations)``: checkpoints every ~quarter, scored at 1/4, 1/2, all."""
    every = max(1, round(iterations * POINTS[0]))
    points = sorted({min(iterations, max(1, round(iterations * p / every)) * every) for p in POINTS[:-1]}
                    | {iterations})
    return every, points


def captions_per_image_of(world: Path) -> int:
    """Most captions any training image has (CaptionWorld: 5)."""
    data = json.loads((world / "annotations" / "captions_train.json").read_text())
    counts = Counter(a["image_id"] for a in data.get("annotations", []))
    return max(counts.values(), default=1)


def run_config(config: str, world: Path, vocab: Path, sizes: DemoSizes, run: RunSpec,
               available: int | None) -> Config:
    """The run's config: the budget's, the task and its options, the data share, and checkpoints at the
    evaluated iterations. ``available`` (captions per image of the data; None: not known yet) checks
    ``captions_per_image``."""
    if run.spec.task == RANDOM:
        return demo_config(config, world, vocab, sizes, run.seed, run.spec.overrides)
    if available is not None and run.captions_per_image not in (0, 1, available):
        raise ConfigError(f"--captions-per-image {run.captions_per_image}: only 1 (one seeded caption per image) "
                          f"or {available} (every caption of this data) are supported")
    one = run.captions_per_image == 1 and (available or 2) > 1
    cfg = demo_config(config, world, vocab, sizes, run.seed,
                      (f"model.task={run.spec.task}", *run.spec.overrides, f"data.fraction={run.fraction}",
                       f"data.one_caption_per_image={str(one).lower()}"))
    every, _ = checkpoint_plan(cfg.train.iterations)
    return apply_overrides(cfg, [f"train.checkpoint_every={every}",
                                 f"train.keep_checkpoints={cfg.train.iterations // every + 1}"])


def plan_runs(specs: Sequence[TaskSpec], seeds: Sequence[int], fractions: Sequence[float],
              captions: Sequence[int]) -> list[RunSpec]:
    """The grid: every trained task x fraction x captions x seed; random init once per seed."""
    runs = []
    for spec in specs:
        grid = [(1.0, 0)] if spec.task == RANDOM else [(f, c) for f in fractions for c in captions]
        runs += [RunSpec(spec, seed, f, c) for f, c in grid for seed in seeds]
    return runs


def score_backbone(backbone: Any, world: Path, image_size: int, *, workers: int = 2) -> list[dict[str, Any]]:
    """Every labels task of ``world`` by the protocol of its kind: ``val`` trains, ``test`` scores. Images
    are used whole (resize = crop = the world's size): a crop would cut off labelled objects."""
    from capvis.eval.downstream import evaluate_label_tasks

    with warnings.catch_warnings():  # rare classes without enough positives: logged once, not per class
        warnings.simplefilter("ignore")
        return evaluate_label_tasks(backbone, world / "annotations" / "labels_val.json",
                                    world / "annotations" / "labels_test.json", image_size=image_size,
                                    resize=image_size, batch_size=128, workers=workers)


def _trained_rows(cfg: Config, run_dir: Path, world: Path, progress: bool = True) -> list[dict[str, Any]]:
    """Pretrain (resuming a run already there), then score the checkpoints at the planned iterations."""
    from capvis.loading import load_pretrained
    from capvis.train import checkpoint as ckpt
    from capvis.train.loop import Trainer

    start = time.time()
    trainer = Trainer(cfg, run_dir, resume="auto", progress=progress)
    trainer.run()
    rows = []
    for iteration in checkpoint_plan(cfg.train.iterations)[1]:
        path = ckpt.checkpoint_path(run_dir / "checkpoints", iteration)
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (pruned by an interrupted ablation?); delete {run_dir} "
                                  "to rerun it")
        seconds = max(0.0, path.stat().st_mtime - start)  # pretraining wall time up to this checkpoint
        began = time.perf_counter()
        scores = score_backbone(load_pretrained(path).backbone, world, cfg.data.image_size)
        meta = {"iteration": iteration, "images_seen": iteration * cfg.train.batch_size,
                "seconds": round(seconds, 1), "eval_seconds": round(time.perf_counter() - began, 1)}
        rows += [{**meta, **s} for s in scores]
    return rows


def _final_family(cfg: Config, run_dir: Path, world: Path) -> dict[str, Any]:
    """Zero-shot and retrieval scores of the run's final checkpoint (kept after pruning); {} if its task has
    neither capability."""
    from capvis.loading import load_pretrained
    from capvis.train import checkpoint as ckpt

    path = ckpt.checkpoint_path(run_dir / "checkpoints", cfg.train.iterations)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing, so its zero-shot and retrieval scores cannot be computed; "
                              f"delete {run_dir} to rerun it")
    model = load_pretrained(path)
    return family_scores(model.task, model.tokenizer, world, image_size=cfg.data.image_size,
                         max_len=cfg.data.max_caption_length)


def _run_rows(run: RunSpec, cfg: Config, out: Path, world: Path, vocab: Path,
              progress: bool = True) -> list[dict[str, Any]]:
    """Scores of one run, from ``scores.json`` when an earlier ablation in ``out`` finished it (its zero-shot
    and retrieval scores too, unless :data:`~capvis.demo.ablate_family.FAMILY_KEY` changed since: those are
    then recomputed from the kept final checkpoint, without pretraining again)."""
    run_dir = out / "runs" / run.name
    cache = run_dir / "scores.json"
    key = {"config": cfg.to_dict(), "points": checkpoint_plan(cfg.train.iterations)[1]}
    rows, family = None, None
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == json.loads(json.dumps(key)):
            log.info("ablation %s: scores from %s", run.name, cache)
            rows = saved["rows"]
            family = saved.get("family") if saved.get("family_key") == FAMILY_KEY else None
    if rows is None and run.spec.task == RANDOM:
        began = time.perf_counter()
        scores = score_backbone(random_task(cfg, load_tokenizer(vocab).vocab_size).visual, world, cfg.data.image_size)
        meta = {"iteration": 0, "images_seen": 0, "seconds": 0.0, "eval_seconds": round(time.perf_counter() - began, 1)}
        rows = [{**meta, **s} for s in scores]
    elif rows is None:
        rows = _trained_rows(cfg, run_dir, world, progress)
    if family is None:  # random init is no pretrained model: its text side never learnt anything to score
        family = {} if run.spec.task == RANDOM else _final_family(cfg, run_dir, world)
    run_dir.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "rows": rows, "family_key": FAMILY_KEY, "family": family},
                                default=float))
    if (run_dir / "checkpoints").is_dir():
        from capvis.train import checkpoint as ckpt

        ckpt.prune_checkpoints(run_dir / "checkpoints", 1)  # scored and recorded: keep the final one only
    return with_family(rows, family, cfg.train.iterations)


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _run_rows_here(*args: Any) -> tuple[int, list[dict[str, Any]]]:
    """:func:`_run_rows` and the id of the process that ran it (a pool worker's, for the log)."""
    return os.getpid(), _run_rows(*args)


def _results(runs: Sequence[RunSpec], configs: Sequence[Config], out: Path, world: Path, vocab: Path,
             jobs: int) -> Iterator[tuple[int, int, list[dict[str, Any]]]]:
    """``(index, process id, rows)`` of every run as it finishes: in order on this process (``jobs`` 1),
    else from ``jobs`` spawned processes with the threads shared out (no progress bars: they would
    interleave)."""
    if jobs == 1:
        for i, (run, cfg) in enumerate(zip(runs, configs)):
            yield i, *_run_rows_here(run, cfg, out, world, vocab)
        return
    import torch

    threads = max(1, torch.get_num_threads() // jobs)
    context = multiprocessing.get_context("spawn")  # no forked copy of this process's threads and locks
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_set_threads, initargs=(threads,)) as pool:
        pending: dict[Future, int] = {pool.submit(_run_rows_here, run, cfg, out, world, vocab, False): i
                                      for i, (run, cfg) in enumerate(zip(runs, configs))}
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield pending.pop(future), *future.result()  # a run's error ends the ablation here
        finally:
            for future in pending:
                future.cancel()


def run_ablation(tasks: Sequence[TaskSpec | str] | None, *, budget: str, output: str | Path, data: str | Path | None = None,
                 seeds: int = 1, seed: int = 0, config: str = "demo", fractions: Sequence[float] = (1.0,),
                 captions_per_image: Sequence[int] | None = None, jobs: int = 1) -> list[dict[str, Any]]:
    """Pretrain and score the whole grid (``tasks`` None: the budget's :func:`default_tasks`), ``jobs``
    runs at a time; returns the CSV rows in the grid's order (also written, after every run)."""
    if budget not in BUDGETS:
        raise ConfigError(f"unknown budget {budget!r}; choose from {', '.join(BUDGETS)}")
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    specs = [parse_task(t) if isinstance(t, str) else t for t in (default_tasks(budget) if tasks is None else tasks)]
    sizes, out = BUDGETS[budget], Path(output)
    runs = plan_runs(specs, range(seed, seed + seeds), fractions, captions_per_image or (0,))
    for run in runs:  # every config is built, and so checked, before any work starts
        run_config(config, out / "world", out / "vocab.model", sizes, run, None)
    out.mkdir(parents=True, exist_ok=True)
    base = demo_config(config, out, out, sizes, seed)
    world = Path(data) if data else make_world(out / "world", sizes, seed, base.data.image_size)
    if not (world / "annotations" / "captions_train.json").is_file():
        raise ConfigError(f"--data {world} has no annotations/captions_train.json")
    available = captions_per_image_of(world)
    vocab = make_vocab(world, out, sizes.vocab_size)
    configs = [run_config(config, world, vocab, sizes, run, available) for run in runs]
    done: dict[int, list[dict[str, Any]]] = {}
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for i, pid, run_rows in _results(runs, configs, out, world, vocab, jobs):
        run = runs[i]
        cpi = "" if run.spec.task == RANDOM else (run.captions_per_image or available)
        head = {"task": run.spec.label, "seed": run.seed, "fraction": "" if run.spec.task == RANDOM else run.fraction,
                "captions_per_image": cpi}
        done[i] = [{**head, **r} for r in run_rows]
        log.info("ablation %s: done (process %d), %d of %d runs, %.0f s in all", run.name, pid, len(done),
                 len(runs), time.perf_counter() - started)
        rows = [r for j in sorted(done) for r in done[j]]  # the grid's order, whatever finished first
        write_outputs(rows, out)  # after every run, so a long ablation shows progress and loses nothing
    return rows
