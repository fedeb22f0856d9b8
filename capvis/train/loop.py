"""The pretraining loop: iteration-based, resumable, distributed, task-agnostic.

``pretrain(cfg, output)`` builds data, task, optimizer and schedule from the config, then runs
``train_step`` until ``train.iterations``, logging, validating and checkpointing on the way.
The task is a plug-in: this file never looks at its name.

Faults: SIGTERM/SIGINT finish the current step, write a checkpoint and return (``stopped_early``);
``train.max_bad_steps`` consecutive non-finite steps (each skipped, weights untouched) stop the run
with a CapvisError after saving the last good state. A *periodic* checkpoint that cannot be written
(disk full, read-only) is logged and training goes on (the next checkpoint retries, earlier ones stay
intact); a checkpoint that cannot be written at the end, on a stop request or after bad steps is an
error, since the run would otherwise end with its latest work unsaved.

Scale: ``train.accumulate`` micro-batches per step (``capvis.train.step``), ``train.strategy`` ddp|fsdp
(``capvis.train.fsdp``: how the task is spread and checkpointed), ``train.compile`` (the task through
``torch.compile``; checkpoints hold the uncompiled task's keys) and ``model.activation_checkpointing``.
The loop reads device values back only at the log cadence: skipped steps are counted, warned about
and checked against ``train.max_bad_steps`` there (with ``train.log_every=1``, at every step), and the
ranks agree on a stop request there too.

Shard streams: the checkpoint also records the stream's split (processes, loader workers, batch,
shards; :func:`capvis.data.streaming.stream_split`), and a resume under another split is refused at
start-up in one line, since it would silently read different data. The workers' bad-sample counts
arrive with the batches; their sums over workers and ranks go into the checkpoint, ``metrics.jsonl``
(a ``data/...`` row at the end) and the log, covering the whole run across resumes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from capvis.config import Config, dump_config
from capvis.data.robust import BadSampleTally, unwrap_worker_error
from capvis.data.shards import is_shard_pattern
from capvis.data.streaming import ShardStream, check_resume_split, stream_split
from capvis.data.device_decode import decode_on_device
from capvis.data.tokenizer import vocab_size_of
from capvis.errors import CapvisError, CheckpointError, ConfigError, DataError
from capvis.models.checkpointing import set_activation_checkpointing
from capvis.tasks import build_task
from capvis.train import checkpoint as ckpt
from capvis.train.distributed import DistInfo, all_reduce_mean, barrier, cleanup, init_distributed
from capvis.train.fsdp import build_strategy
from capvis.train.metrics import MetricsSink
from capvis.train.optim import build_optimizer, inner_optimizer
from capvis.train.precision import Precision, compile_model, resolve_precision, use_channels_last
from capvis.train.schedule import build_scheduler
from capvis.train.signals import StopRequest
from capvis.train.step import train_step

log = logging.getLogger(__name__)


def to_device(batch: dict[str, Any], device: torch.device, channels_last: bool) -> dict[str, Any]:
    batch = decode_on_device(batch, device)  # a stream's deferred JPEGs (data.decode_device): decoded there
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if channels_last and value.ndim == 4:
                value = value.contiguous(memory_format=torch.channels_last)
        out[key] = value
    return out


def resolve_resume(resume: str | None, output: Path) -> tuple[Path, dict[str, Any]] | None:
    """``None`` -> fresh run; ``auto`` -> newest valid checkpoint in the output (or fresh); a path."""
    if resume is None:
        return None
    if resume == "auto":
        found = ckpt.latest_valid_checkpoint(output / "checkpoints")
        if found is None:
            log.info("no checkpoint in %s: starting from scratch", output / "checkpoints")
        return found
    path = Path(resume)
    if path.is_dir():
        found = ckpt.latest_valid_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no valid checkpoint in {path}")
        return found
    return path, ckpt.load_checkpoint(path)


def preflight(cfg: Config, resume: str | None) -> None:
    """Cheap checks that must fail before any work (process group, model, data): paths and world size."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by the {world} processes "
                          "(WORLD_SIZE)")
    if (cfg.train.batch_size // world) % cfg.train.accumulate:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} over {world} processes gives "
                          f"{cfg.train.batch_size // world} per process, not divisible into "
                          f"train.accumulate={cfg.train.accumulate} micro-batches")
    if cfg.data.vocab and not Path(cfg.data.vocab).is_file():
        raise DataError(f"vocabulary not found: {cfg.data.vocab} (build one with `capvis vocab`)")
    for key in ("train", "val"):
        spec = getattr(cfg.data, key)
        if spec and not is_shard_pattern(spec) and not Path(spec).exists():  # shards: checked when expanded
            raise DataError(f"data.{key}: annotation file not found: {spec}")
        images = getattr(cfg.data, f"{key}_images")
        if images and not Path(images).is_dir():
            raise DataError(f"data.{key}_images: image folder not found: {images}")
    if resume not in (None, "auto") and not Path(resume).exists():
        raise CheckpointError(f"checkpoint not found: {resume}")


def step_seed(seed: int, rank: int, iteration: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + iteration) % (2**63)


class Trainer:
    """Holds the pieces of one run; ``run()`` is the loop."""

    def __init__(self, cfg: Config, output: str | Path, *, resume: str | None = None, progress: bool = True,
                 info: DistInfo | None = None) -> None:
        from capvis.data.pipeline import build_train_loader, build_val_loader, load_vocabulary

        preflight(cfg, resume)
        self.cfg, self.output = cfg, Path(output)
        self.info = info or init_distributed(cfg.train.device)
        self.device = self.info.device
        self.tokenizer = load_vocabulary(cfg)
        vocab_size = vocab_size_of(self.tokenizer, cfg)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.task = self.prepare_task(build_task(cfg, vocab_size)).to(self.device)
        if cfg.model.activation_checkpointing and not set_activation_checkpointing(self.task, True):
            log.warning("model.activation_checkpointing: task %s has no backbone or textual head that supports it",
                        cfg.model.task)
        self.channels_last = use_channels_last(cfg.train.channels_last, self.device)
        if self.channels_last:
            self.task.to(memory_format=torch.channels_last)
        self.strategy = build_strategy(cfg.train.strategy, self.info)
        self.strategy.prepare(self.task)  # FSDP shards the parameters before the optimizer sees them
        self.optimizer = build_optimizer(self.task.param_groups(cfg.train), cfg.train)
        self.scheduler = build_scheduler(inner_optimizer(self.optimizer), cfg.train)
        self.precision: Precision = resolve_precision(cfg.train.precision, self.device)
        self.scaler = self.precision.scaler()
        self.start = 0
        self.saved_at: tuple[int, Path | None] | None = None  # (iteration, path) of the last written checkpoint
        self._resumed_data: dict[str, Any] | None = None  # the stream entries of the resumed checkpoint
        resumed = resolve_resume(resume, self.output)
        if resumed is not None:
            self._restore(*resumed)
        self.model = self.strategy.wrap(self.task)  # self.task stays the plain module that checkpoints save
        if cfg.train.compile:
            self.model = compile_model(self.model, backend=cfg.train.compile_backend, device=self.device)
        keys = self.task.batch_keys  # what the task reads; the pipeline adds nothing else
        self.train_loader = build_train_loader(cfg, self.tokenizer, self.info, start_iteration=self.start,
                                               batch_keys=keys)
        self.split = self._stream_split(resumed[0] if resumed is not None else None)
        self.tally = BadSampleTally((self._resumed_data or {}).get("data_counts"))
        self.val_loader = build_val_loader(cfg, self.tokenizer, self.info, batch_keys=keys)
        self.progress = progress

    def prepare_task(self, task: torch.nn.Module) -> torch.nn.Module:
        """Hook for subclasses (fine-tuning): load weights, freeze parts. Runs before the optimizer,
        the resume and DDP are set up, so all of them see the final parameters and flags."""
        return task

    def _restore(self, path: Path, state: dict[str, Any]) -> None:
        try:
            self.strategy.restore(task=self.task, optimizer=self.optimizer, path=path, state=state)
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path} does not match this config: {str(exc).splitlines()[0]}") \
                from None
        self.start = int(state["iteration"])
        self._resumed_data = {k: state[k] for k in ("data_stream", "data_counts") if k in state}
        ckpt.set_rng_state(state["rng"])
        log.info("resumed from %s at iteration %d", path, self.start)

    def _stream_split(self, resumed_from: Path | None) -> dict[str, int] | None:
        """The split of a shard stream (None for a folder dataset); refuses a resume under another one."""
        if not isinstance(self.train_loader.dataset, ShardStream):
            return None
        split = stream_split(self.train_loader.dataset, self.cfg.data.num_workers)
        if resumed_from is not None:
            saved = (self._resumed_data or {}).get("data_stream")
            if saved is None:
                log.warning("%s does not record the shard stream's split (written by an older capvis): "
                            "resuming assumes the same data.num_workers, processes and train.batch_size",
                            resumed_from)
            else:
                check_resume_split(saved, split, str(resumed_from))
        return split

    def data_totals(self) -> dict[str, int]:
        """Bad and seen samples of the stream, summed over workers and ranks (a collective under DDP)."""
        local = torch.tensor(self.tally.local(), dtype=torch.float64, device=self.device)
        summed = (all_reduce_mean(local, self.info) * self.info.world_size).round().long().tolist()
        return self.tally.totals((summed[0], summed[1]))

    # -- the loop -----------------------------------------------------------------------------

    def save_periodic(self, iteration: int) -> Path | None:
        """A periodic checkpoint: a failure is logged and training continues (the next one retries)."""
        try:
            return self.save(iteration)
        except CheckpointError as exc:
            log.warning("%s; training continues and retries at the next checkpoint", exc)
            return None

    def save(self, iteration: int) -> Path | None:
        extra = {"data_stream": self.split, "data_counts": self.data_totals()} if self.split is not None else {}
        directory = self.output / "checkpoints"

        def write(parts: dict[str, Any]) -> Path:  # rank 0; the strategy says what model/optimizer state is
            state = ckpt.collect_state(
                model=_Given(parts.pop("model")), optimizer=_Given(parts.pop("optimizer")), scheduler=self.scheduler,
                scaler=self.scaler, iteration=iteration, config=self.cfg.to_dict(),
                vocab=self.tokenizer.model_bytes if self.tokenizer is not None else None, extra={**extra, **parts})
            written = ckpt.atomic_save(state, ckpt.checkpoint_path(directory, iteration))
            ckpt.prune_checkpoints(directory, self.cfg.train.keep_checkpoints)
            return written

        path = self.strategy.save(task=self.task, optimizer=self.optimizer, keep=self.cfg.train.keep_checkpoints,
                                  path=ckpt.checkpoint_path(directory, iteration), write=write)
        barrier(self.info)
        self.saved_at = (iteration, path)
        return path

    def ensure_saved(self, iteration: int) -> Path | None:
        """Write a checkpoint of ``iteration`` unless one was just written; errors propagate."""
        if self.saved_at is not None and self.saved_at[0] == iteration:
            return self.saved_at[1]
        return self.save(iteration)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.task.eval()
        total, count = torch.zeros((), device=self.device), 0
        for i, batch in enumerate(self.val_loader):
            if self.cfg.train.val_batches and i >= self.cfg.train.val_batches:
                break
            with self.precision.autocast():
                total += self.task(to_device(batch, self.device, self.channels_last)).loss.float()
            count += 1
        self.task.train()
        mean = all_reduce_mean(total / max(count, 1), self.info)
        return {"loss": float(mean.item())}

    def _batches(self) -> Iterator[dict[str, Any]]:
        try:
            for batch in self.train_loader:
                stats = batch.pop("data_stats", None)  # a stream's (worker, bad, seen), on the CPU
                if stats is not None:
                    self.tally.update(stats.tolist())
                yield to_device(batch, self.device, self.channels_last)
        except CapvisError as exc:  # e.g. DataError (too many bad samples) from a worker: keep it one line
            raise unwrap_worker_error(exc) from None

    def run(self, *, until: int | None = None) -> dict[str, Any]:
        """Train to ``train.iterations`` (or stop early after iteration ``until``, with a checkpoint)."""
        cfg, t = self.cfg, self.cfg.train
        if self.info.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.output / "config.yaml")
        sink = MetricsSink(self.output, total=t.iterations, start=self.start, enabled=self.info.is_main,
                           progress=self.progress)
        self.task.train()
        batches = self._batches()
        bad_steps, last, stopped = 0, None, False
        pending: list[tuple[int, torch.Tensor]] = []  # (iteration, bad flag on the device), not yet read
        window_start, window_images = time.perf_counter(), 0
        iteration = self.start
        try:
            with StopRequest(self.info, every=t.log_every) as stop:
                while iteration < t.iterations:
                    batch = next(batches)
                    # dropout & co. draw from a stream that is a function of (seed, rank, iteration):
                    # exact resume on any number of ranks, without per-rank RNG files
                    torch.manual_seed(step_seed(t.seed, self.info.rank, iteration))
                    result = train_step(self.model, batch, self.optimizer, self.scheduler, self.scaler,
                                        self.precision, clip_grad_norm=t.clip_grad_norm, accumulate=t.accumulate,
                                        distributed=self.info.enabled)
                    iteration += 1
                    window_images += batch["image"].shape[0] * self.info.world_size
                    # under fp16 an overflowing gradient is the scaler's business; only a NaN/inf loss is bad
                    pending.append((iteration, result.loss_nonfinite if self.precision.uses_scaler else result.skipped))
                    sink.advance()
                    ending = iteration == t.iterations or (until is not None and iteration >= until)
                    if ending or iteration % t.log_every == 0 or iteration % t.checkpoint_every == 0:
                        bad_steps = self._read_bad_steps(pending, bad_steps, iteration)
                    if iteration % t.log_every == 0 or iteration == t.iterations:
                        elapsed = time.perf_counter() - window_start
                        last = self._log(sink, iteration, result, window_images / max(elapsed, 1e-9))
                        window_start, window_images = time.perf_counter(), 0
                    if self.val_loader is not None and iteration % (t.val_every or t.checkpoint_every) == 0:
                        sink.log(iteration, self.validate(), prefix="val")
                    if iteration == t.iterations:
                        self.save(iteration)
                    elif iteration % t.checkpoint_every == 0:
                        self.save_periodic(iteration)
                    if until is not None and iteration >= until and iteration < t.iterations:
                        self.ensure_saved(iteration)
                        break
                    if stop.requested() and iteration < t.iterations:
                        bad_steps = self._read_bad_steps(pending, bad_steps, iteration)
                        path = self.ensure_saved(iteration)  # a failed periodic save is retried here
                        log.warning("%s received: stopped early at iteration %d of %d, checkpoint %s; "
                                    "continue with --resume auto", stop.signal_name, iteration, t.iterations, path)
                        stopped = True
                        break
            data = self._report_data(sink, iteration)
        finally:
            sink.close()
        return {"iteration": iteration, "last": last, "output": str(self.output), "stopped_early": stopped,
                **({"data": data} if data is not None else {})}

    def _read_bad_steps(self, pending: list[tuple[int, torch.Tensor]], bad_steps: int, iteration: int) -> int:
        """Read the skipped-step flags since the last call (one host sync), warn about each, and stop the
        run once ``train.max_bad_steps`` came in a row; returns the current run of bad steps."""
        if not pending:
            return bad_steps
        flags = torch.stack([flag for _, flag in pending]).tolist()
        steps = [it for it, _ in pending]
        pending.clear()
        limit = self.cfg.train.max_bad_steps
        for step, bad in zip(steps, flags):
            bad_steps = bad_steps + 1 if bad else 0
            if not bad:
                continue
            log.warning("iteration %d: non-finite loss or gradient, update skipped (%d in a row, limit "
                        "train.max_bad_steps=%d)", step, bad_steps, limit)
            if bad_steps >= limit:
                path = self.ensure_saved(iteration)
                raise CapvisError(f"loss was non-finite for {bad_steps} consecutive steps (iteration {step}); "
                                  f"last good weights saved to {path}; lower the learning rate or use fp32")
        return bad_steps

    def _report_data(self, sink: MetricsSink, iteration: int) -> dict[str, int] | None:
        """A stream's bad-sample totals at the end of the run: a log line and a ``data/...`` metrics row."""
        if self.split is None or iteration == self.start:  # nothing read: the last row still holds
            return None
        totals = self.data_totals()
        share = 100 * totals["bad"] / max(totals["seen"], 1)
        (log.warning if totals["bad"] else log.info)(
            "data: %d of %d samples read were bad and skipped (%.2f%%; data.max_bad_fraction=%g applies per "
            "loader worker)", totals["bad"], totals["seen"], share, self.cfg.data.max_bad_fraction)
        sink.log(iteration, {"bad_samples": totals["bad"], "samples_read": totals["seen"]}, prefix="data")
        return totals

    def _log(self, sink: MetricsSink, iteration: int, result: Any, images_per_s: float) -> dict[str, Any]:
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        # losses are averaged over ranks (each rank saw a slice of the global batch)
        names = ["loss", *result.logs]
        stacked = all_reduce_mean(torch.stack([result.loss.float(), *[v.float() for v in result.logs.values()]]),
                                  self.info)
        stacked = torch.cat([stacked, result.grad_norm.float().reshape(1).to(stacked.device)]).tolist()  # one sync
        values = {"loss": stacked[0], "lr": float(max(lrs)), "images_per_s": images_per_s,
                  "grad_norm": stacked[-1]}
        values.update(dict(zip(names[1:], stacked[1:-1])))
        sink.log(iteration, values)
        return values


class _Given:
    """A state dict already in hand, for :func:`capvis.train.checkpoint.collect_state`."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def state_dict(self) -> Any:
        return self.state


def pretrain(cfg: Config, output: str | Path, *, resume: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or continue) pretraining; returns a summary with the last logged values."""
    trainer = Trainer(cfg, output, resume=resume, progress=progress)
    try:
        summary = trainer.run()
        barrier(trainer.info)  # no rank tears its process group down while another still has gloo work in flight
        return summary
    finally:
        cleanup(trainer.info)


def read_metrics(output: str | Path) -> list[dict[str, Any]]:
    path = Path(output) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
