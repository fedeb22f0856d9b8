"""Shared fixtures: a tiny COCO-format captions dataset with real JPEGs, and a vocabulary trained on it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

# ``train.precision=auto`` stays fp32 on AMX CPUs too, here and in every subprocess a test starts: the suite's
# numerics (exact resume, compile == eager, FSDP == DDP) must not depend on the machine CI draws.
# tests/test_precision.py tests the AMX rule itself.
os.environ["CAPVIS_AUTO_CPU_BF16"] = "0"

COCO_CAPTIONS = [
    ["A dog runs on the grass.", "A brown dog is running left!", "The dog chases a ball?"],
    ["A cat sits on the right side of a sofa.", "Two cats, one white and one black."],
    ["A man rides a bicycle down the street.", "A person on a bike; bright sunny day."],
    ["A plate of food with broccoli and rice.", "Café table with a plate of food near the window."],
]


def write_coco(root: Path, captions: list[list[str]] = COCO_CAPTIONS, split: str = "train2017",
               size: tuple[int, int] = (48, 40)) -> Path:
    """Write ``root/annotations/captions_<split>.json`` and real JPEGs under ``root/<split>``."""
    from PIL import Image

    images_dir = root / split
    images_dir.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for k, caps in enumerate(captions):
        image_id = 1000 + 7 * k
        name = f"{image_id:012d}.jpg"
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images_dir / name, quality=95)
        images.append({"id": image_id, "file_name": name, "width": size[0], "height": size[1]})
        annotations += [{"id": len(annotations) + 1, "image_id": image_id, "caption": c} for c in caps]
    path = root / "annotations" / f"captions_{split}.json"
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return path


@pytest.fixture
def coco_fixture(tmp_path: Path) -> Path:
    """Path of a 4-image COCO captions JSON whose images exist beside it (COCO layout)."""
    return write_coco(tmp_path / "coco")


@pytest.fixture(scope="session")
def coco_tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small BPE vocabulary (.model) trained on the fixture captions plus a little filler text."""
    from capvis.data.tokenizer import train_tokenizer

    texts = [c for caps in COCO_CAPTIONS for c in caps] * 3
    texts += [f"a photo of {n} {w} on the left or the right." for n in ("one", "two", "three")
              for w in ("dogs", "cats", "people", "plates")]
    return train_tokenizer(texts, tmp_path_factory.mktemp("vocab") / "tiny", vocab_size=120)


# -- process-wide torch state ------------------------------------------------------------------
# A test that changes torch's global settings (thread count, default dtype, grad mode, deterministic
# kernels) must not change the numerics of the tests after it: the thread count, for one, changes the
# order of CPU reductions and so the 7th digit of a loss. Each test starts from the settings the
# session began with, and gets them back afterwards whatever it did.

def _torch_globals() -> dict:
    import torch

    return {"threads": torch.get_num_threads(), "dtype": torch.get_default_dtype(),
            "grad": torch.is_grad_enabled(), "deterministic": torch.are_deterministic_algorithms_enabled(),
            "anomaly": torch.is_anomaly_enabled()}


def _set_torch_globals(state: dict) -> None:
    import torch

    torch.set_num_threads(state["threads"])
    torch.set_default_dtype(state["dtype"])
    torch.set_grad_enabled(state["grad"])
    torch.use_deterministic_algorithms(state["deterministic"])
    torch.autograd.set_detect_anomaly(state["anomaly"])


_SESSION_TORCH = _torch_globals()  # read at conftest import, before any test module is imported


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    _set_torch_globals(_SESSION_TORCH)
    yield
    _set_torch_globals(_SESSION_TORCH)


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread (faster for tiny models on a busy machine); restored after."""
    import torch

    torch.set_num_threads(1)
    yield
