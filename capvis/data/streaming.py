"""A streaming caption dataset over tar shards: split over ranks and workers, buffer-shuffled, resumable.

**Split.** The ``slots = world_size * num_workers`` readers (slot ``rank * num_workers + worker``)
divide every epoch disjointly. Each epoch permutes the shards with ``(seed, epoch)``; with at least
as many shards as slots, slot ``s`` reads shards ``perm[s::slots]`` (whole files, sequential I/O);
with fewer shards, every slot reads all shards in ``perm`` order and keeps the samples whose position
``g`` in that concatenation has ``g % slots == s`` (it reads only the tar headers of the others).
Either way no sample is read twice in an epoch. Epoch sizes come from ``manifest.json``.

**Shuffle.** Within its epoch a slot emits samples in a shuffle-buffer order (``shuffle_buffer``
items, seeded by ``(seed, epoch, slot)``). That order depends only on the number of samples, so it
is computed up front as a permutation (:func:`buffer_shuffle_order`); reading stays sequential and
at most about ``shuffle_buffer`` samples are held in memory.

**Resume.** The stream is a pure function of seed, epoch, rank, worker and worker count. A DataLoader
takes batch ``j`` from worker ``j % W``, so after ``t`` iterations reader ``r`` has delivered
:func:`batches_before` ``(t, r, W)`` batches. The resumed DataLoader starts again at worker 0, which
therefore continues reader ``t % W`` (worker ``w`` plays reader ``(w + t) % W``) and skips that
reader's delivered samples without reading their bytes (whole shards by the manifest counts, single
samples by tar header). Each sample's caption
choice and augmentation are seeded from ``(seed, epoch, key)`` as in :class:`CaptionDataset` (the
writer's key is the annotation index), so they do not depend on the worker count either.

**Bad samples** (an empty, truncated, oversized or undecodable image; no caption) are skipped,
logged with shard and key, and counted by a :class:`~capvis.data.robust.BadSampleBudget` per reading
process (each DataLoader worker has its own), which enforces ``data.max_bad_fraction`` as the folder
path does: the run stops with a one-line DataError naming the last culprit once a worker's bad share
exceeds it. Every sample carries its worker's running counts (``data_stats``); :func:`collate_stream`
puts the last of them in the batch, so the training loop sums the workers' counts, reports them and
stores them in checkpoints. A skipped bad sample shifts the rest of that worker's epoch by one, so a
resume after bad samples may repeat up to that many samples.

**Decoding** goes through :func:`capvis.data.decode.decode_image`, the decoder and pixel-count guard
of the folder path (torchvision for JPEG; PIL for the rest, since torchvision's PNG decoder crashes
the process on a short PNG). With ``draft=True`` a JPEG whose random crop (drawn from the header's
size before decoding) is at least ``4 * image_size`` pixels on its short side is decoded at 1/4 or
1/8 scale by libjpeg's DCT scaling (PIL ``draft``), which is cheaper to decode and to resize; the
crop is still a downscale to ``image_size``. Entropy decoding is not reduced, so the gain is modest
(docs/data_at_scale.md); at 1/2 there is none.

**Resume split.** :func:`stream_split` records what the stream position depends on (processes,
workers, per-process batch, shards); :func:`check_resume_split` refuses, in one line saying what to
set, a resume under a different split, which would silently give different data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from capvis.data.datasets import assemble_sample, choose_caption, collate_captions, encode_caption, sample_seed
from capvis.data.device_decode import PLAN_KEY, RAW_KEY, collate_deferred, defer_sample
from capvis.data.decode import checked_header, decode_image, decode_with_pil
from capvis.data.robust import BadSampleBudget
from capvis.data.shards import IMAGE_EXTENSIONS, TarSample, iter_tar_samples, shard_counts
from capvis.data.tokenizer import Tokenizer, normalize_caption
from capvis.data.transforms import PairTransform, TrainTransform
from capvis.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def buffer_shuffle_order(n: int, buffer: int, rng: random.Random) -> np.ndarray:
    """Output order of a shuffle buffer of ``buffer`` items fed ``0..n-1``: once full, each new item
    makes it emit a uniformly chosen held item; the remainder is drained at random."""
    out = np.empty(n, dtype=np.int64)
    held: list[int] = []
    k = 0
    for i in range(n):
        held.append(i)
        if len(held) >= buffer:
            j = rng.randrange(len(held))
            held[j], held[-1] = held[-1], held[j]
            out[k], k = held.pop(), k + 1
    rng.shuffle(held)
    out[k:] = held
    return out


def batches_before(iteration: int, worker: int, num_workers: int) -> int:
    """Batches worker ``worker`` delivered in the first ``iteration`` steps (round-robin over workers)."""
    return max(0, (iteration - worker + num_workers - 1) // num_workers)


@dataclass(frozen=True)
class SlotPlan:
    """What one slot reads in one epoch: shards (indices, in order), a position stride/offset, a length."""

    shards: tuple[int, ...]
    stride: int
    offset: int
    length: int


def slot_plan(counts: Sequence[int], epoch: int, slot: int, slots: int, seed: int, shuffle: bool) -> SlotPlan:
    order = list(range(len(counts)))
    if shuffle:
        random.Random(sample_seed(seed, epoch)).shuffle(order)
    if len(order) >= slots:
        mine = tuple(order[slot::slots])
        return SlotPlan(mine, 1, 0, sum(counts[i] for i in mine))
    total = sum(counts)
    return SlotPlan(tuple(order), slots, slot, max(0, (total - slot + slots - 1) // slots))


def key_number(key: str) -> int:
    """The writer's keys are annotation indices; other keys get a stable 63-bit hash."""
    if key.isdigit():
        return int(key)
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


class ShardStream(IterableDataset):
    """Samples (``image``, ``caption_tokens``, ``image_id``) streamed from tar shards; see the module doc.

    Args:
        shards: shard paths (see :func:`capvis.data.shards.expand_pattern`).
        transform: a :class:`PairTransform` (training) or a deterministic image transform (evaluation).
        start_iteration, batch_size: resume point; the per-process batch size the DataLoader uses.
        infinite: endless epochs (training); else one epoch in which every slot yields the same number
            of samples (the uneven tail is dropped), so DDP ranks see equally many batches.
        counts: samples per shard (default: from ``manifest.json`` or the tar headers).
        max_bad_fraction: share of the samples a process reads that may be bad (``data.max_bad_fraction``).
    """

    def __init__(self, shards: Sequence[str], tokenizer: Tokenizer,
                 transform: PairTransform | Callable[[Tensor], Tensor],
                 *, max_caption_length: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 shuffle_buffer: int = 1000, start_iteration: int = 0, batch_size: int = 1, infinite: bool = True,
                 one_caption_per_image: bool = False, draft: bool = True, counts: Sequence[int] | None = None,
                 max_bad_fraction: float = 0.01, decode_device: str = "cpu") -> None:
        self.shards = [str(s) for s in shards]
        self.counts = list(counts) if counts is not None else shard_counts(self.shards)
        if sum(self.counts) == 0:
            raise DataError(f"shards {self.shards[0]} ... hold no samples")
        self.tokenizer, self.transform = tokenizer, transform
        self.max_caption_length, self.seed = max_caption_length, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.shuffle_buffer = shuffle, max(1, shuffle_buffer)
        self.start_iteration, self.batch_size, self.infinite = start_iteration, batch_size, infinite
        self.one_caption_per_image, self.draft = one_caption_per_image, draft
        # data.decode_device: training samples carry bytes + plan, decoded a batch at a time on the device
        self.defer = decode_device != "cpu" and isinstance(transform, TrainTransform)
        self.budget = BadSampleBudget(max_bad_fraction)  # per process: each worker has its own copy
        self._worker = 0

    @property
    def bad_samples(self) -> int:
        """Bad samples this process has skipped."""
        return self.budget.bad

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def slot_length(self, epoch: int, slot: int, slots: int) -> int:
        if not self.infinite:  # one epoch, equal share per slot
            return min(slot_plan(self.counts, epoch, s, slots, self.seed, self.shuffle).length for s in range(slots))
        return slot_plan(self.counts, epoch, slot, slots, self.seed, self.shuffle).length

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self._worker = worker
        # a fresh DataLoader asks worker 0 first, but batch `start_iteration` belongs to reader
        # start_iteration % workers: worker w continues the stream of reader (w + start) % workers
        reader = (worker + self.start_iteration) % workers if self.infinite else worker
        slots = self.world_size * workers
        slot = self.rank * workers + reader
        if self.num_samples < slots:
            raise DataError(f"{self.num_samples} samples cannot feed {self.world_size} processes x {workers} workers")
        skip = batches_before(self.start_iteration, reader, workers) * self.batch_size if self.infinite else 0
        epoch = 0
        while True:
            length = self.slot_length(epoch, slot, slots)
            if skip >= length:
                skip -= length
            else:
                yield from self.epoch_samples(epoch, slot, slots, length, skip)
                skip = 0
            if not self.infinite:
                return
            epoch += 1

    def epoch_samples(self, epoch: int, slot: int, slots: int, length: int, skip: int) -> Iterator[dict[str, Any]]:
        """One slot's epoch in shuffled order, from output position ``skip`` on."""
        plan = slot_plan(self.counts, epoch, slot, slots, self.seed, self.shuffle)
        if self.shuffle:
            rng = random.Random(sample_seed(self.seed, epoch, slot))
            order = buffer_shuffle_order(length, self.shuffle_buffer, rng)
        else:
            order = np.arange(length)
        needed = np.zeros(length, dtype=bool)
        needed[order[skip:]] = True
        raw = self._read_inputs(plan, length, needed)
        pending: dict[int, tuple[str, str, dict[str, bytes]]] = {}
        good = 0
        for index in order[skip:].tolist():
            while index not in pending:
                j, item = next(raw)
                pending[j] = item
            shard, key, members = pending.pop(index)
            sample = self._decode(shard, key, members, epoch)
            if sample is not None:
                good += 1
                sample["data_stats"] = (self._worker, self.budget.bad, self.budget.seen)
                yield sample
        if good == 0 and length - skip > 0:
            raise DataError(f"no readable sample in {length - skip} samples of epoch {epoch} "
                            f"(shards {self.shards[0]} ...)")

    def _read_inputs(self, plan: SlotPlan, length: int, needed: np.ndarray) -> Iterator[tuple[int, tuple]]:
        """``(slot index, (shard, key, {ext: bytes}))`` of the needed samples, in file order."""
        first = int(np.argmax(needed)) if needed.any() else length
        position = 0  # position in the concatenation of the plan's shards
        for shard_index in plan.shards:
            path, count = self.shards[shard_index], self.counts[shard_index]
            if (position + count - 1 - plan.offset) // plan.stride < first:  # nothing needed in this shard
                position += count
                continue
            seen = 0
            with open(path, "rb") as fh:
                for sample in iter_tar_samples(fh):
                    g, seen = position + seen, seen + 1
                    if g % plan.stride != plan.offset:
                        continue
                    j = g // plan.stride
                    if j >= length:
                        return
                    if needed[j]:
                        yield j, (path, sample.key, _read_members(fh, sample))
            if seen != count:
                raise DataError(f"shard {path} holds {seen} samples, its manifest says {count} (rewrite the manifest)")
            position += count

    # -- one sample ----------------------------------------------------------------------------

    def _decode(self, shard: str, key: str, members: dict[str, bytes], epoch: int) -> dict[str, Any] | None:
        """The sample, or None for a bad one (counted; DataError once over ``max_bad_fraction``)."""
        try:
            sample = self._sample(key, members, epoch)
        except (DataError, RuntimeError, ValueError, OSError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.budget.record_bad(f"{shard}:{key}", reason)
            return None
        self.budget.good()
        return sample

    def _sample(self, key: str, members: dict[str, bytes], epoch: int) -> dict[str, Any]:
        captions, image_id = _captions(members)
        captions = [c for c in (normalize_caption(c) for c in captions) if c]
        if not captions:
            raise DataError("no caption")
        number = key_number(key)
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, number))
        caption = choose_caption(captions, seed=self.seed, epoch=epoch, index=number,
                                 one_per_image=self.one_caption_per_image, generator=generator)
        ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
        if ext is None:
            raise DataError(f"no image member (has {sorted(members)})")
        if self.defer:
            return self._deferred(members[ext], f"{key}.{ext}", caption, generator,
                                  image_id if image_id is not None else number)
        image = self._image(members[ext], f"{key}.{ext}", generator)
        return assemble_sample(image, caption, transform=self.transform, generator=generator,
                               tokenizer=self.tokenizer, max_caption_length=self.max_caption_length,
                               image_id=image_id if image_id is not None else number, culprit=f"{key}.{ext}")

    def _deferred(self, data: bytes, name: str, caption: str, generator: torch.Generator,
                  image_id: int) -> dict[str, Any]:
        """The sample with its image still to decode: bytes (or a CPU-decoded image) and the plan."""
        raw, (height, width) = defer_sample(data, name)
        plan, caption = self.transform.plan(height, width, caption, generator)
        return {RAW_KEY: raw, PLAN_KEY: plan, "image_id": image_id,
                "caption_tokens": encode_caption(caption, self.tokenizer, self.max_caption_length, name)}

    def _image(self, data: bytes, name: str, generator: torch.Generator) -> Tensor:
        if self.draft and data and name.endswith((".jpg", ".jpeg")) and isinstance(self.transform, TrainTransform):
            image = decode_draft(data, self.transform, generator, name)
            if image is not None:
                return image
        return decode_image(data, name)


def _read_members(fh: BinaryIO, sample: TarSample) -> dict[str, bytes]:
    out = {}
    for ext, (offset, size) in sample.members.items():
        fh.seek(offset)
        out[ext] = fh.read(size)
    return out


def _captions(members: dict[str, bytes]) -> tuple[list[str], int | None]:
    if "json" in members:
        meta = json.loads(members["json"].decode("utf-8"))
        if not isinstance(meta, dict):
            raise DataError("json member is not an object")
        captions = meta.get("captions", meta.get("caption", []))
        captions = [captions] if isinstance(captions, str) else list(captions or [])
        image_id = meta.get("image_id")
        if captions:
            return [c for c in captions if isinstance(c, str)], int(image_id) if image_id is not None else None
    if "txt" in members:
        return [members["txt"].decode("utf-8")], None
    return [], None


def decode_draft(data: bytes, transform: TrainTransform, generator: torch.Generator,
                 name: str = "JPEG") -> Tensor | None:
    """Decode at 1/4 or 1/8 scale when this sample's random crop allows; None: decode at full size.

    The crop is previewed on a copy of ``generator`` with the header's size; the scale ``k`` is the
    largest with ``min(crop_h, crop_w) / k >= transform.size``. The transform then draws its crop again
    on the smaller image (same random numbers, so the same relative crop up to rounding). The
    pixel-count guard of :mod:`capvis.data.decode` runs first (BadSampleError for a bomb).
    """
    header = checked_header(data, name)  # the guard and the size, one header read
    if header is None or header[2] is None:
        return None
    width, height, orientation = header
    if orientation in (5, 6, 7, 8):  # rotated by 90 degrees on display
        width, height = height, width
    preview = torch.Generator()
    preview.set_state(generator.get_state())
    _, _, h, w = transform.crop_params(height, width, preview)
    scale = next((k for k in (8, 4) if min(h, w) >= k * transform.size), 1)
    if scale == 1:  # at 1/2, PIL's reduced decode is no faster than torchvision's full one (measured)
        return None
    return decode_with_pil(data, name, scale=scale)


def collate_stream(samples: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
    """:func:`collate_captions` plus ``data_stats``: (worker, bad, seen) counts of the worker that made
    the batch, as of its last sample (the training loop sums the latest counts of every worker)."""
    batch = collate_captions(samples)
    if PLAN_KEY in samples[0]:
        batch.update(collate_deferred(samples))
    batch["data_stats"] = torch.tensor(samples[-1]["data_stats"], dtype=torch.long)  # (3,)
    return batch


def stream_split(stream: ShardStream, num_workers: int) -> dict[str, int]:
    """What the resume position of a training stream depends on, as plain data for a checkpoint."""
    return {"world_size": stream.world_size, "num_workers": num_workers,
            "batch_size": stream.batch_size * stream.world_size,  # train.batch_size, the global batch
            "shards": len(stream.shards), "samples": stream.num_samples}


def check_resume_split(saved: dict[str, Any], current: dict[str, int], checkpoint: str) -> None:
    """ConfigError, in one line saying what to set, when a stream would resume under another split
    (the position arithmetic of the module doc assumes the same processes, workers and batch)."""
    want = {**saved, "num_workers": max(1, int(saved.get("num_workers", 1)))}
    have = {**current, "num_workers": max(1, int(current["num_workers"]))}  # 0 and 1 worker read alike
    fixes = {
        "num_workers": f"data.num_workers={saved.get('num_workers')}",
        "world_size": f"{saved.get('world_size')} processes (WORLD_SIZE / torchrun --nproc-per-node)",
        "batch_size": f"train.batch_size={saved.get('batch_size')}",
        "shards": f"data.train naming the same {saved.get('shards')} shards",
        "samples": f"data.train naming the same shards ({saved.get('samples')} samples)",
    }
    changed = [k for k in fixes if k in want and int(want[k]) != int(have[k])]
    if changed:
        was = ", ".join(f"{k}={saved.get(k)}" for k in changed)
        now = ", ".join(f"{k}={current[k]}" for k in changed)
        raise ConfigError(
            f"cannot resume the shard stream of {checkpoint} exactly: it was read with {was}, this run has {now}; "
            f"resume with {' and '.join(dict.fromkeys(fixes[k] for k in changed))}, or start a new run")


__all__ = ["ShardStream", "batches_before", "buffer_shuffle_order", "check_resume_split", "collate_stream",
           "decode_draft", "slot_plan", "stream_split"]
