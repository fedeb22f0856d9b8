"""The one image decoder of capvis, shared by image folders and shard streams.

Every path that turns encoded image bytes into pixels (``CaptionDataset``, the evaluations' image
folders and :class:`~capvis.data.streaming.ShardStream`) goes through :func:`decode_image`, so they
accept and refuse the same files:

* **Pixel-count guard** first (:func:`checked_size`): the header alone is read, and an image that
  claims more than :data:`MAX_PIXELS` is refused before anything is allocated (a few hundred bytes
  of PNG can otherwise claim gigabytes: a decompression bomb).
* **JPEGs** (the bulk of caption data) go to torchvision's libjpeg-turbo decoder; JPEG variants it
  refuses (arithmetic coding, ...) fall back to PIL.
* **Everything else goes to PIL**: torchvision's PNG decoder crashes the whole process (SIGSEGV,
  "libpng error: Not enough image data") on a PNG whose image data is short, which no ``except``
  can catch.

Output is uint8 (3, H, W) RGB: EXIF orientation applied; grayscale, palette (with or without
transparency) and CMYK become RGB; alpha is dropped, not composited; 16-bit images keep their 8 most
significant bits. Every failure is a :class:`BadSampleError` naming the culprit, which the datasets
skip and count within ``data.max_bad_fraction`` (:mod:`capvis.data.robust`).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from capvis.errors import DataError

MAX_PIXELS = 2 * 89_478_485  # PIL's decompression-bomb error threshold (about 179 megapixels)
_JPEG_MAGIC = b"\xff\xd8\xff"
_WIDE_GRAY = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16/32-bit gray: convert("RGB") would clip


class BadSampleError(DataError):
    """An image or caption that cannot be used; datasets skip these within ``data.max_bad_fraction``."""


def load_image(path: str | Path) -> Tensor:
    """Read and decode an image file (see the module doc); BadSampleError naming the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BadSampleError(f"cannot read image {path}: {exc.strerror or exc}") from None
    return decode_image(raw, str(path))


def decode_image(raw: bytes, culprit: str) -> Tensor:
    """Encoded bytes -> uint8 (3, H, W) RGB; ``culprit`` (a path, ``shard:key``) names it in errors."""
    if not raw:
        raise BadSampleError(f"image file {culprit} is empty")
    checked_size(raw, culprit)
    if not raw.startswith(_JPEG_MAGIC):
        return decode_with_pil(raw, culprit)
    from torchvision.io import ImageReadMode, decode_image as tv_decode

    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    try:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
            warnings.simplefilter("ignore", DeprecationWarning)
            image = tv_decode(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except (RuntimeError, ValueError):
        return decode_with_pil(raw, culprit)  # JPEG variants libjpeg-turbo refuses (e.g. arithmetic coding)
    if image.dtype == torch.uint16:
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    return image


class DecodedImages:
    """Decoded images by key, kept in memory until ``budget`` bytes are held (later ones are decoded on each
    read). At small image sizes decoding is half the cost of a training sample (the demo at 64 px: 0.83 ->
    0.39 ms), and a map-style dataset reads every file once an epoch. The transforms never write into
    their input, so a kept image is the same pixels on every read."""

    def __init__(self, budget: int) -> None:
        self.budget, self.held = budget, 0
        self.images: dict[int, Tensor] = {}

    def load(self, key: int, path: str | Path) -> Tensor:
        image = self.images.get(key)
        if image is None:
            image = load_image(path)
            size = image.numel() * image.element_size()
            if self.held + size <= self.budget:
                self.images[key] = image
                self.held += size
        return image


def checked_header(raw: bytes, culprit: str) -> tuple[int, int, int | None] | None:
    """``(width, height, EXIF orientation)`` from one read of the header (orientation None when the
    EXIF block cannot be read), BadSampleError if it claims more than MAX_PIXELS; None when PIL cannot
    read the header (the decoder then judges the file)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: judged below
            with Image.open(io.BytesIO(raw)) as im:  # reads the header only
                width, height = im.size
                try:
                    orientation: int | None = int(im.getexif().get(0x0112, 1))
                except Exception:  # a broken EXIF block says nothing about the pixel count
                    orientation = None
    except Image.DecompressionBombError as exc:
        raise BadSampleError(f"image {culprit} is too large to decode ({exc})") from None
    except Exception:  # not a format PIL knows, or a broken header: the decoder will judge
        return None
    if width * height > MAX_PIXELS:
        raise BadSampleError(f"image {culprit} claims {width}x{height} pixels, more than {MAX_PIXELS} "
                             "(a decompression bomb?)")
    return width, height, orientation


def checked_size(raw: bytes, culprit: str) -> tuple[int, int] | None:
    """``(width, height)`` of :func:`checked_header` (the pixel-count guard), None when unreadable."""
    header = checked_header(raw, culprit)
    return None if header is None else header[:2]


def decode_with_pil(raw: bytes, culprit: str, *, scale: int | None = None) -> Tensor:
    """PIL decoding; ``scale`` (JPEG only) decodes at 1/scale with libjpeg's DCT scaling (``draft``)."""
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked_size judged it
            with Image.open(io.BytesIO(raw)) as im:
                if scale:
                    im.draft("RGB", (max(1, im.size[0] // scale), max(1, im.size[1] // scale)))
                if im.getexif().get(0x0112, 1) != 1:  # exif_transpose would copy even when upright
                    im = ImageOps.exif_transpose(im)
                if im.mode in _WIDE_GRAY:
                    im = Image.fromarray((np.asarray(im).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8))
                elif im.mode == "P" and "transparency" in im.info:
                    im = im.convert("RGBA")  # PIL warns on P -> RGB with a transparency table
                array = np.array(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise BadSampleError(f"cannot decode image {culprit}: {exc}") from None
    image = torch.from_numpy(array).permute(2, 0, 1)  # (3, H, W), channels-last in memory
    # the reduced-size path feeds a resize at once: skip the copy; full-size images leave contiguous
    return image if scale else image.contiguous()


__all__ = ["MAX_PIXELS", "BadSampleError", "checked_header", "checked_size", "decode_image", "decode_with_pil", "load_image"]
