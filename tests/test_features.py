"""Feature cache: reused for the same weights, image files, transform and stage; recomputed if any changes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from capvis.config import load_config
from capvis.eval import features as F
from capvis.tasks import build_task

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = ["model.task=captioning", "model.backbone=resnet18", "model.small_stem=true",
        "model.textual.hidden=64"]


@pytest.fixture
def backbone():
    torch.manual_seed(0)
    return build_task(load_config(None, TINY), 16).visual.eval()


@pytest.fixture
def pictures(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        p = tmp_path / "img" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = F.extract_features

    def counting(*args, **kwargs):
        calls.append(kwargs.get("stage"))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "extract_features", counting)
    return calls


def test_reused_for_the_same_inputs_and_equal_to_extraction(backbone, pictures, counted, tmp_path):
    kw = dict(cache_dir=tmp_path / "c", source="run/a.pt", image_size=16, batch_size=2)
    first = F.cached_features(backbone, pictures, **kw)
    again = F.cached_features(backbone, pictures, **{**kw, "source": "another/name.pt", "batch_size": 5})
    assert len(counted) == 1  # second call read the cache (the name and batch size are not in the key)
    np.testing.assert_array_equal(first, again)
    assert first.shape == (5, 512) and len(list((tmp_path / "c").glob("*.json"))) == 1
    # resize=None is the protocol's default resize: the same transform, the same key
    F.cached_features(backbone, pictures, **{**kw, "resize": F.default_resize(16)})
    assert len(counted) == 1
    np.testing.assert_allclose(first, F.extract_features(backbone, pictures, image_size=16), atol=1e-6)


def test_key_changes_with_weights_files_transform_and_stage(backbone, pictures, tmp_path, monkeypatch):
    def key(model=backbone, paths=pictures, **kw):
        return F.feature_key(model, paths, **{"image_size": 16, **kw})[0]

    base = key()
    assert key() == base
    assert key(paths=pictures[::-1]) != base  # order of rows
    assert key(paths=pictures[:-1]) != base
    assert key(resize=24) != base and key(image_size=24) != base and key(stage="layer3") != base
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert key(device="cuda") != base  # bf16 features are other numbers
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert key() == base  # the suite keeps auto at fp32 (conftest)
    monkeypatch.delenv("CAPVIS_AUTO_CPU_BF16")
    assert key() == key(device="cuda") != base  # an AMX CPU extracts in bf16 as CUDA does
    monkeypatch.setenv("CAPVIS_AUTO_CPU_BF16", "0")
    other = type(backbone)  # same architecture, one weight nudged
    changed = build_task(load_config(None, TINY), 16).visual
    changed.load_state_dict(backbone.state_dict())
    assert isinstance(changed, other) and key(model=changed) == base
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1e-3
    assert key(model=changed) != base
    stat = pictures[0].stat()  # the same path, new contents
    Image.new("RGB", (24, 20), (9, 9, 9)).save(pictures[0])
    os.utime(pictures[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert key() != base


def test_unreadable_cache_is_recomputed(backbone, pictures, counted, tmp_path):
    kw = dict(cache_dir=tmp_path, image_size=16)
    good = F.cached_features(backbone, pictures, **kw)
    (cache,) = tmp_path.glob("features_*.npy")
    cache.write_bytes(b"not an npy file")
    np.testing.assert_array_equal(F.cached_features(backbone, pictures, **kw), good)
    assert len(counted) == 2
    assert F.cached_features(backbone, pictures, cache_dir=None, image_size=16).shape == good.shape
    assert len(counted) == 3  # no cache: always extracted


def test_compiled_extraction_gives_the_same_features(backbone, pictures, monkeypatch):
    """``compile=BACKEND`` runs the forward through torch.compile (aot_eager here: dynamo and AOT autograd
    without inductor's C++ build); the features are the eager ones, and an unavailable backend is eager."""
    calls = []
    real = torch.compile

    def counting(fn, **kwargs):
        calls.append(kwargs.get("backend"))
        return real(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", counting)
    eager = F.extract_features(backbone, pictures, image_size=16, batch_size=2)
    assert calls == []
    compiled = F.extract_features(backbone, pictures, image_size=16, batch_size=2, compile="aot_eager")
    assert calls[-1] == "aot_eager"  # the forward itself went through torch.compile (after the backend probe)
    np.testing.assert_allclose(compiled, eager, rtol=1e-5, atol=1e-6)
    fallback = F.extract_features(backbone, pictures, image_size=16, batch_size=2, compile="no_such_backend")
    np.testing.assert_array_equal(fallback, eager)


def test_an_amx_cpu_extracts_under_bf16_autocast(backbone, pictures, monkeypatch):
    fp32 = F.extract_features(backbone, pictures, image_size=16, batch_size=2)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.delenv("CAPVIS_AUTO_CPU_BF16")
    bf16 = F.extract_features(backbone, pictures, image_size=16, batch_size=2)
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
    assert not np.array_equal(bf16, fp32)  # other arithmetic ran
    np.testing.assert_allclose(bf16, fp32, rtol=0.1, atol=0.05 * float(np.abs(fp32).max()))
