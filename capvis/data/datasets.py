"""Map-style caption dataset whose every random choice is a pure function of ``(seed, epoch, index)``.

Keys beyond ``len(dataset)`` encode the epoch (``epoch, i = divmod(key, len)``), so a sampler that
hands out global positions gets fresh captions and augmentations each epoch, while the same key
always yields the bit-identical sample, whatever the number of workers and across a resume.

Images are decoded by :mod:`capvis.data.decode` (shared with the shard stream: one decoder, one
pixel-count guard). Bad samples (a missing, empty, truncated, oversized or undecodable image; a
caption that is empty or encodes to no known token) are skipped with a counted warning
(:mod:`capvis.data.robust`). Since batch sizes stay fixed, "skipping" key ``(epoch, i)`` means
returning the sample of ``(epoch, i + 1)`` (wrapping around), or the next good one after it: a pure
function of the key and the files, so still the same whatever the number of workers and across a
resume.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from capvis.data.annotations import ImageRecord
from capvis.data.decode import BadSampleError, DecodedImages, decode_with_pil, load_image  # the last two are re-exported
from capvis.data.robust import BadSampleBudget
from capvis.data.tokenizer import EOS_ID, PAD_ID, SOS_ID, Tokenizer, normalize_caption
from capvis.data.transforms import PairTransform
from capvis.errors import DataError


def _load_with_pil(path: str | Path, raw: bytes | None = None) -> Tensor:
    """PIL decoding of a file (kept for callers of the old name; see :mod:`capvis.data.decode`)."""
    return decode_with_pil(raw if raw is not None else Path(path).read_bytes(), str(path))


def sample_seed(seed: int, *parts: int) -> int:
    """A well-mixed 63-bit seed from integers; stable across processes and Python versions."""
    text = ":".join(str(int(p)) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def subset_fraction(records: Sequence[ImageRecord], fraction: float, seed: int) -> list[ImageRecord]:
    """A seeded ``fraction`` of the images for data-efficiency runs, in their original order.

    Subsets are nested for one seed (the 10% images lie inside the 20% ones), since all take a prefix
    of one seeded permutation.
    """
    if not 0 < fraction <= 1:
        raise DataError(f"data fraction must be in (0, 1], got {fraction}")
    if fraction >= 1:
        return list(records)
    order = list(range(len(records)))
    random.Random(sample_seed(seed, len(records))).shuffle(order)
    keep = sorted(order[: max(1, round(len(records) * fraction))])
    return [records[i] for i in keep]


def choose_caption(captions: Sequence[str], *, seed: int, epoch: int, index: int, one_per_image: bool,
                   generator: torch.Generator) -> str:
    """The caption of sample ``index`` in ``epoch``: seeded per visit; with ``one_per_image``, per image
    only (the same in every epoch). Shared by the map-style datasets and the shard stream."""
    if one_per_image:
        return captions[random.Random(sample_seed(seed, -1, index)).randrange(len(captions))]
    return captions[int(torch.randint(len(captions), (), generator=generator))]


def assemble_sample(image: Any, caption: str, *, transform: Callable, generator: torch.Generator,
                    tokenizer: Tokenizer, max_caption_length: int, image_id: int, culprit: str) -> dict[str, Any]:
    """Decoded image + chosen caption -> ``{"image", "caption_tokens", "image_id"}``, the one sample
    assembly of map-style datasets and the shard stream: the augmentation seeded from ``generator``
    (a :class:`PairTransform` sees the caption too), tokens [SOS] .. [EOS] truncated to the maximum.
    A caption of unknown pieces only is a BadSampleError naming ``culprit``."""
    if isinstance(transform, PairTransform):
        image, caption = transform(image, caption, generator)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (), generator=generator)))
            image = transform(image)
    tokens = encode_caption(caption, tokenizer, max_caption_length, culprit)
    return {"image": image, "caption_tokens": tokens, "image_id": image_id}


def encode_caption(caption: str, tokenizer: Tokenizer, max_caption_length: int, culprit: str) -> Tensor:
    """[SOS] ids [EOS] truncated to the maximum; a caption of unknown pieces only is a BadSampleError."""
    ids = [SOS_ID, *tokenizer.encode(caption), EOS_ID][:max_caption_length]
    if not tokenizer.decode(ids).strip():  # only <unk> and word-boundary pieces
        raise BadSampleError(f"{culprit}: caption {_short(caption)!r} encodes to no known word")
    return torch.tensor(ids, dtype=torch.long)


class CaptionDataset(Dataset):
    """One item per image: a (seeded) random caption of it, augmented jointly with the image.

    Args:
        transform: a :class:`PairTransform` (sees and may rewrite the caption) or a plain image
            transform, which then runs with the global RNG seeded inside a ``fork_rng`` block.
        max_caption_length: tokens kept, [SOS] and [EOS] included; as in VirTex, a truncated caption
            loses its [EOS] (the tail is cut from the right).
        num_categories: K for the multi-hot ``categories`` target of records that carry categories.
        max_bad_fraction: share of visited samples that may be bad before a DataError
            (``data.max_bad_fraction``; see :class:`~capvis.data.robust.BadSampleBudget`).
        cache_bytes: decoded images kept in memory, per process (``data.cache_images_mb``; 0: none).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        tokenizer: Tokenizer,
        transform: PairTransform | Callable[[Tensor], Tensor],
        max_caption_length: int,
        seed: int,
        one_caption_per_image: bool = False,
        *,
        num_categories: int | None = None,
        max_bad_fraction: float = 0.01,
        cache_bytes: int = 0,
    ) -> None:
        if not records:
            raise DataError("dataset has no images")
        self.records = list(records)
        self.tokenizer = tokenizer
        self.transform = transform
        self.max_caption_length = max_caption_length
        self.seed = seed
        self.one_caption_per_image = one_caption_per_image
        self.num_categories = num_categories
        self.budget = BadSampleBudget(max_bad_fraction)  # per process: each worker has its own copy
        self._bad_images: dict[int, str] = {}  # record index -> reason, to skip known-bad files fast
        self.decoded = DecodedImages(cache_bytes)  # per process: each worker fills its own

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int) -> dict[str, Any]:
        """The sample of ``key``, or of the next good index in the same epoch if it is bad."""
        n = len(self.records)
        epoch, i = divmod(int(key), n)
        last = ""
        for step in range(n):
            j = (i + step) % n
            try:
                sample = self.sample(epoch, j)
            except BadSampleError as exc:
                last = str(exc)
                self.budget.record_bad(str(self.records[j].path), last)  # DataError when over budget
                continue
            self.budget.good()
            return sample
        raise DataError(f"all {n} samples of the dataset are unusable; last: {last}")

    def sample(self, epoch: int, i: int) -> dict[str, Any]:
        """The sample of image ``i`` in ``epoch``; BadSampleError if its image or caption is unusable."""
        record = self.records[i]
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, i))
        raw = choose_caption(record.captions, seed=self.seed, epoch=epoch, index=i,
                             one_per_image=self.one_caption_per_image, generator=generator)
        caption = normalize_caption(raw)
        if not caption:
            raise BadSampleError(f"{record.path}: caption {_short(raw)!r} is empty")
        if i in self._bad_images:
            raise BadSampleError(self._bad_images[i])
        try:
            image = self.decoded.load(i, record.path)
        except BadSampleError as exc:
            self._bad_images[i] = str(exc)
            raise
        sample = assemble_sample(image, caption, transform=self.transform, generator=generator,
                                 tokenizer=self.tokenizer, max_caption_length=self.max_caption_length,
                                 image_id=record.image_id, culprit=str(record.path))
        if self.num_categories and record.categories is not None:
            sample["categories"] = self.multi_hot(record.categories, record.path)
        return sample

    def multi_hot(self, categories: Sequence[int], path: Path) -> Tensor:
        target = torch.zeros(int(self.num_categories or 0), dtype=torch.float32)
        for c in categories:
            if not 0 <= c < target.numel():
                raise DataError(f"{path}: category {c} outside [0, {target.numel()})")
            target[c] = 1.0
        return target


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def collate_captions(samples: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
    """Stack images, right-pad caption tokens with 0 to the batch max length, add ``caption_lengths``."""
    lengths = torch.tensor([len(s["caption_tokens"]) for s in samples], dtype=torch.long)
    tokens = torch.full((len(samples), int(lengths.max())), PAD_ID, dtype=torch.long)  # (B, T)
    for row, s in enumerate(samples):
        tokens[row, : len(s["caption_tokens"])] = s["caption_tokens"]
    batch = {
        "caption_tokens": tokens,
        "caption_lengths": lengths,
        "image_id": torch.tensor([int(s["image_id"]) for s in samples], dtype=torch.long),
    }
    if "image" in samples[0]:  # a stream with data.decode_device ships bytes instead (capvis.data.device_decode)
        batch["image"] = torch.stack([s["image"] for s in samples])  # (B, 3, S, S)
    if all("categories" in s for s in samples):
        batch["categories"] = torch.stack([s["categories"] for s in samples])  # (B, K)
    return batch
