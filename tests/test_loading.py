"""``load_pretrained``: releases, the random baseline, and clear errors."""

from __future__ import annotations

import pytest
import torch

from capvis.errors import ConfigError
from capvis.loading import load_pretrained
from capvis.release import save_release

TINY = ("model.backbone=resnet18", "model.visual_width=16", "model.textual.hidden=64", "model.vocab_size=50")


def test_release_loads_through_load_pretrained(tmp_path):
    random = load_pretrained("random", config="demo", overrides=TINY, seed=1)
    path = save_release(random.task, random.config, None, tmp_path / "rel.tar")
    loaded = load_pretrained(path)
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded.backbone(images), random.backbone(images), rtol=0, atol=0)
    assert loaded.config.model.visual_width == 16 and not loaded.task.training


def test_random_baseline_is_seeded_and_needs_a_config():
    a = load_pretrained("random", config="demo", overrides=TINY, seed=3)
    b = load_pretrained("random", config="demo", overrides=TINY, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.task.state_dict().values(), b.task.state_dict().values()))
    with pytest.raises(ConfigError, match="--config"):
        load_pretrained("random")
