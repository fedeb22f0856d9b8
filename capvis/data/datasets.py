"""Map-style caption dataset whose every random choice is a pure function of ``(seed, epoch, index)``.

Keys beyond ``len(dataset)`` encode the epoch (``epoch, i = divmod(key, len)``), so a sampler that
hands out global positions gets fresh captions and augmentations each epoch, while the same key
always yields the bit-identical sample, whatever the number of workers and across a resume.
"""

from __future__ import annotations

import hashlib
import random
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from capvis.data.annotations import ImageRecord
from capvis.data.tokenizer import EOS_ID, PAD_ID, SOS_ID, Tokenizer, normalize_caption
from capvis.data.transforms import PairTransform
from capvis.errors import DataError


def load_image(path: str | Path) -> Tensor:
    """Decode an image file to uint8 (3, H, W) RGB, honouring EXIF rotation; DataError naming the file."""
    from torchvision.io import ImageReadMode, decode_image

    path = Path(path)
    try:
        data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc.strerror or exc}") from None
    if data.numel() == 0:
        raise DataError(f"image file {path} is empty")
    try:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except (RuntimeError, ValueError):
        return _load_with_pil(path)  # formats torchvision cannot decode (e.g. some TIFF/BMP variants)


def _load_with_pil(path: Path) -> Tensor:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            rgb = ImageOps.exif_transpose(im).convert("RGB")
            array = np.asarray(rgb, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"cannot decode image {path}: {exc}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()  # (3, H, W)


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


class CaptionDataset(Dataset):
    """One item per image: a (seeded) random caption of it, augmented jointly with the image.

    Args:
        transform: a :class:`PairTransform` (sees and may rewrite the caption) or a plain image
            transform, which then runs with the global RNG seeded inside a ``fork_rng`` block.
        max_caption_length: tokens kept, [SOS] and [EOS] included; as in VirTex, a truncated caption
            loses its [EOS] (the tail is cut from the right).
        num_categories: K for the multi-hot ``categories`` target of records that carry categories.
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

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int) -> dict[str, Any]:
        epoch, i = divmod(int(key), len(self.records))
        record = self.records[i]
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, i))
        caption = normalize_caption(record.captions[self.caption_index(record, epoch, i, generator)])
        image = load_image(record.path)
        if isinstance(self.transform, PairTransform):
            image, caption = self.transform(image, caption, generator)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(2**62, (), generator=generator)))
                image = self.transform(image)
        sample: dict[str, Any] = {
            "image": image,
            "caption_tokens": self.tokens(caption),
            "image_id": record.image_id,
        }
        if self.num_categories and record.categories is not None:
            sample["categories"] = self.multi_hot(record.categories, record.path)
        return sample

    def caption_index(self, record: ImageRecord, epoch: int, i: int, generator: torch.Generator) -> int:
        """Seeded per visit; with ``one_caption_per_image``, seeded per image only (same in every epoch)."""
        n = len(record.captions)
        if self.one_caption_per_image:
            return random.Random(sample_seed(self.seed, -1, i)).randrange(n)
        return int(torch.randint(n, (), generator=generator))

    def tokens(self, caption: str) -> Tensor:
        ids = [SOS_ID, *self.tokenizer.encode(caption), EOS_ID][: self.max_caption_length]
        return torch.tensor(ids, dtype=torch.long)

    def multi_hot(self, categories: Sequence[int], path: Path) -> Tensor:
        target = torch.zeros(int(self.num_categories or 0), dtype=torch.float32)
        for c in categories:
            if not 0 <= c < target.numel():
                raise DataError(f"{path}: category {c} outside [0, {target.numel()})")
            target[c] = 1.0
        return target


def collate_captions(samples: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
    """Stack images, right-pad caption tokens with 0 to the batch max length, add ``caption_lengths``."""
    lengths = torch.tensor([len(s["caption_tokens"]) for s in samples], dtype=torch.long)
    tokens = torch.full((len(samples), int(lengths.max())), PAD_ID, dtype=torch.long)  # (B, T)
    for row, s in enumerate(samples):
        tokens[row, : len(s["caption_tokens"])] = s["caption_tokens"]
    batch = {
        "image": torch.stack([s["image"] for s in samples]),  # (B, 3, S, S)
        "caption_tokens": tokens,
        "caption_lengths": lengths,
        "image_id": torch.tensor([int(s["image_id"]) for s in samples], dtype=torch.long),
    }
    if all("categories" in s for s in samples):
        batch["categories"] = torch.stack([s["categories"] for s in samples])  # (B, K)
    return batch
