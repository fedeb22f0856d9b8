"""``data.decode_device=cuda``: the shard stream's JPEGs decoded on the GPU, a batch at a time.

On a GPU the loader workers' JPEG decoding is what limits a ResNet-50's step rate. With a decode
device the workers only read the header and draw the sample's random decisions
(:meth:`~capvis.data.transforms.TrainTransform.plan`: crop, flip with its caption swap, colour jitter;
the same draws, in the same order, as on the CPU path); the batch carries the compressed bytes and the
plans, and :func:`decode_on_device` decodes every JPEG of the batch with one call to
``torchvision.io.decode_jpeg(list, device=...)`` (nvJPEG) and applies each plan there. Samples the
device cannot take (PNG and other formats, EXIF-rotated or header-less JPEGs) are decoded by the
worker as before and only transformed on the device. The CPU path (``data.decode_device=cpu``, the
default) is unchanged. A JPEG the device decoder refuses is decoded on the CPU instead; one that
nothing decodes is a one-line DataError naming its image id (the worker has already vetted its header,
so this is rare).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
from torch import Tensor

from capvis.data.decode import _JPEG_MAGIC, checked_header, decode_image
from capvis.data.transforms import apply_plan
from capvis.errors import DataError

DECODE_DEVICES = ("cpu", "cuda")
RAW_KEY, PLAN_KEY = "raw_image", "plan"  # a deferred sample's compressed bytes or decoded image, its plan


def plain_jpeg_size(data: bytes, culprit: str) -> tuple[int, int] | None:
    """``(height, width)`` of a JPEG the device can decode as stored (no EXIF rotation); None otherwise.
    The pixel-count guard runs first (BadSampleError for a bomb)."""
    if not data.startswith(_JPEG_MAGIC):
        return None
    header = checked_header(data, culprit)  # the guard, the size and the orientation, one header read
    if header is None or header[2] != 1:  # rotated or mirrored on display: the CPU decoder applies it
        return None
    return header[1], header[0]


def defer_sample(data: bytes, culprit: str) -> tuple[Tensor, tuple[int, int]]:
    """What a worker ships for ``data``: the bytes (1-d uint8) when the device can decode them, else the
    CPU-decoded image (3, H, W); and the image's (height, width) for the plan."""
    size = plain_jpeg_size(data, culprit)
    if size is not None:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), size
    image = decode_image(data, culprit)
    return image, (image.shape[-2], image.shape[-1])


def collate_deferred(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The deferred entries of a batch: ``raw_image`` a list (bytes or images), ``plan`` (B, 15)."""
    return {RAW_KEY: [s[RAW_KEY] for s in samples], PLAN_KEY: torch.stack([s[PLAN_KEY] for s in samples])}


def decode_on_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Replace a deferred batch's ``raw_image``/``plan`` by ``image`` (B, 3, S, S) on ``device``; a batch
    without them is returned as is (so callers need not know which path made it)."""
    if RAW_KEY not in batch:
        return batch
    from torchvision.io import ImageReadMode, decode_jpeg

    raw, plans = batch.pop(RAW_KEY), batch.pop(PLAN_KEY)
    jpegs = [i for i, r in enumerate(raw) if r.ndim == 1]
    images: list[Tensor | None] = [None if r.ndim == 1 else r.to(device, non_blocking=True) for r in raw]
    if jpegs:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                decoded = decode_jpeg([raw[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
            except RuntimeError:  # one bad stream fails the batched call: decode one by one
                decoded = [_decode_one(raw[i], device, batch, i) for i in jpegs]
        for i, image in zip(jpegs, decoded):
            images[i] = image
    batch["image"] = torch.stack([apply_plan(image, plan) for image, plan in zip(images, plans)])
    return batch


def _decode_one(data: Tensor, device: torch.device, batch: dict[str, Any], row: int) -> Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    image_id = int(batch["image_id"][row]) if "image_id" in batch else row
    try:
        return decode_image(bytes(data.numpy()), f"image id {image_id}").to(device)
    except Exception as exc:  # noqa: BLE001 - named in one line below
        raise DataError(f"image id {image_id}: cannot be decoded on {device} or the CPU ({exc})") from None


__all__ = ["DECODE_DEVICES", "collate_deferred", "decode_on_device", "defer_sample", "plain_jpeg_size"]
