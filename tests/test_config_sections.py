"""Task config sections: each task module owns and registers its section; config.py names none."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import capvis.config as config
from capvis.config import apply_overrides, config_from_dict, config_section, load_config, section_classes
from capvis.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_every_section_lives_in_its_task_module():
    sections = section_classes()
    assert {"masked_lm", "contrastive", "icmlm", "coca", "classification"} <= set(sections)
    for name, cls in sections.items():
        assert cls.__module__.startswith("capvis.tasks."), (name, cls.__module__)
    tree = ast.parse((ROOT / "capvis" / "config.py").read_text())
    classes = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    assert classes.isdisjoint(cls.__name__ for cls in sections.values())


def test_sections_load_override_and_round_trip():
    cfg = load_config("configs/coca_R_50.yaml", ["model.coca.caption_weight=3", "model.masked_lm.mask_proportion=0.2"])
    assert cfg.model.coca.caption_weight == 3.0 and cfg.model.masked_lm.mask_proportion == 0.2
    assert cfg.model.contrastive.loss == "infonce"  # default of a section the file does not name
    data = cfg.to_dict()
    assert set(section_classes()) <= set(data["model"]) and "sections" not in data["model"]
    assert config_from_dict(data) == cfg
    again = apply_overrides(cfg, ["model.coca.bidirectional=true"])
    assert again.model.coca.bidirectional and again.model.coca.caption_weight == 3.0


def test_section_errors_are_one_line():
    for override, message in (("model.cocoa.bidirectional=true", "did you mean 'model.coca'"),
                              ("model.coca.nope=1", "unknown config key 'model.coca.nope'"),
                              ("model.coca.caption_weight=abc", "model.coca.caption_weight"),
                              ("model.sections=1", "unknown config key 'model.sections'")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
    with pytest.raises(AttributeError, match="no field or task section 'nope'"):
        load_config(None).model.nope  # noqa: B018


def test_moved_key_keeps_old_configs_loading():
    """ICMLM's encoder used to live in model.contrastive.text_encoder; saved configs still load."""
    cfg = load_config(None)
    old = cfg.to_dict()
    old["model"]["contrastive"]["text_encoder"] = "masked.pt"
    assert config_from_dict(old).model.icmlm.text_encoder == "masked.pt"
    old["model"]["icmlm"]["text_encoder"] = "newer.pt"  # the new key wins
    assert config_from_dict(old).model.icmlm.text_encoder == "newer.pt"
    old["model"]["contrastive"]["text_encoder"] = ""
    old["model"]["icmlm"]["text_encoder"] = ""
    assert config_from_dict(old).model.icmlm.text_encoder == ""
    assert "text_encoder" not in config_from_dict(old).to_dict()["model"]["contrastive"]


@pytest.fixture
def extra_section():
    @config_section("test_extra")
    @dataclass(frozen=True)
    class ExtraConfig:
        width: int = 3

    yield ExtraConfig
    config.SECTIONS._items.pop("test_extra")


def test_a_new_task_registers_its_section_without_touching_config(extra_section):
    cfg = load_config(None, ["model.test_extra.width=7"])
    assert cfg.model.test_extra == extra_section(width=7)
    assert load_config(None).model.test_extra.width == 3
    assert config_from_dict(cfg.to_dict()).model.test_extra.width == 7
    with pytest.raises(TypeError):
        config_section("textual")(dataclasses.make_dataclass("T", [("a", int, 1)]))
    with pytest.raises(KeyError, match="registered twice"):
        config_section("test_extra")(dataclasses.make_dataclass("U", [("a", int, 1)]))


def test_sections_are_found_before_the_tasks_are_imported():
    code = ("import sys; from capvis.config import load_config; "
            "assert 'capvis.tasks' not in sys.modules; "
            "c = load_config('configs/masked_lm_R_50.yaml', ['model.masked_lm.mask_proportion=0.25']); "
            "print(c.model.masked_lm.mask_proportion)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0.25"
