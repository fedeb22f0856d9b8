"""``capvis ablate`` over the image-text family: the siglip alias and coca rows, and the zero-shot /
retrieval columns, asked of the task's protocols (blank, not zero, for a task without them)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from capvis.cli import main
from capvis.config import load_config
from capvis.demo.ablate import (ALIASES, BUDGETS, DEFAULT_TASKS, RunSpec, default_tasks, parse_task, parse_tasks,
                                run_config)
from capvis.demo.ablate_family import FAMILY_COLUMNS, family_cells, family_method, family_scores, with_family
from capvis.demo.ablate_report import markdown, write_outputs
from capvis.errors import ConfigError
from capvis.tasks import TASKS, build_task

pytestmark = pytest.mark.usefixtures("one_thread")  # restored after each test (conftest)
TINY = ["model.textual.hidden=64", "model.visual_width=16", "data.image_size=32", "model.contrastive.embed_dim=16"]
MULTI_LABEL = {"shape", "color_shape"}


def test_siglip_alias_is_contrastive_with_the_siglip_loss(tmp_path):
    spec = parse_task("siglip")
    assert (spec.label, spec.task, spec.overrides) == ("siglip", "contrastive", ("model.contrastive.loss=siglip",))
    with_option = parse_task("siglip:dropout=0")  # options apply after the alias's own
    assert with_option.overrides == ("model.contrastive.loss=siglip", "model.textual.dropout=0")
    assert [(s.label, s.task) for s in parse_tasks("bicaptioning,siglip,coca,contrastive")] == [
        ("bicaptioning", "bicaptioning"), ("siglip", "contrastive"), ("coca", "coca"), ("contrastive", "contrastive")]
    run = RunSpec(spec, seed=0)
    cfg = run_config("demo", tmp_path, tmp_path / "v.model", BUDGETS["tiny"], run, available=5)
    assert (cfg.model.task, cfg.model.contrastive.loss, run.name) == ("contrastive", "siglip", "siglip/seed0")
    assert not set(ALIASES) & set(TASKS.names())  # an alias never hides a registered task
    assert {"coca", "siglip"} <= set(default_tasks("default")) and default_tasks("small") == DEFAULT_TASKS
    assert default_tasks("default")[-1] == "random_init" and all(parse_task(t) for t in default_tasks("default"))


def test_unknown_alias_is_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="aliases: siglip"):
        parse_tasks("bicaptioning,sigclip")
    assert main(["ablate", "--tasks", "sigclip", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "sigclip" in err and "siglip" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> tuple[Path, object]:
    """A CaptionWorld of a few 32 px images (val captions for retrieval, test labels for zero-shot) and its
    vocabulary."""
    from capvis.world import write_world
    from capvis.demo.stages import load_tokenizer, make_vocab

    root = tmp_path_factory.mktemp("family")
    world = root / "world"
    write_world(world, {"train": 16, "val": 6, "test": 10}, seed=0, image_size=32, workers=1)
    return world, load_tokenizer(make_vocab(world, root, 120))


def _task(name: str, tokenizer, *extra: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_task(load_config("demo", [f"model.task={name}", *TINY, *extra]), tokenizer.vocab_size).eval()


@pytest.mark.parametrize("name, extra, method", [
    ("contrastive", (), "embedding"), ("contrastive", ("model.contrastive.loss=siglip",), "embedding"),
    ("coca", (), "embedding"), ("captioning", (), "likelihood"), ("bicaptioning", (), "likelihood"),
    ("token_classification", (), None), ("multilabel_classification", (), None), ("masked_lm", (), None),
])
def test_the_method_is_asked_of_the_task(tiny_world, name, extra, method):
    assert family_method(_task(name, tiny_world[1], *extra)) == method


def _label_rows(task: str, world: Path) -> list[dict]:
    """Rows as the ablation writes them: two checkpoints x every label task of the world (values made up)."""
    names = json.loads((world / "annotations" / "labels_test.json").read_text())["tasks"]
    return [{"task": task, "seed": 0, "fraction": 1.0, "captions_per_image": 5, "iteration": it, "images_seen": 8 * it,
             "eval_task": n, "metric": "mAP" if n in MULTI_LABEL else "top1", "value": 40.0, "seconds": 1.0,
             "eval_seconds": 0.1} for it in (2, 4) for n in names]


def test_columns_filled_for_an_embedder_and_empty_for_token_classification(tiny_world, tmp_path):
    world, tokenizer = tiny_world
    options = {"image_size": 32, "max_len": 24}
    contrastive = family_scores(_task("contrastive", tokenizer), tokenizer, world, **options)
    assert contrastive["method"] == "embedding" and {"shape", "color_shape", "count"} <= set(contrastive["zeroshot"])
    assert (contrastive["retrieval"]["images"], contrastive["retrieval"]["captions"]) == (6, 30)
    assert family_scores(_task("token_classification", tokenizer), tokenizer, world, **options) == {}
    assert family_cells({}, "shape", "mAP") == {}

    rows = (with_family(_label_rows("contrastive", world), contrastive, 4)
            + with_family(_label_rows("token_classification", world), {}, 4))
    final = [r for r in rows if r["task"] == "contrastive" and r["iteration"] == 4]
    assert all(0 <= r["zeroshot_top1"] <= 100 and 0 <= r["i2t_r@5"] <= 100 and r["family_method"] == "embedding"
               for r in final if r["eval_task"] in contrastive["zeroshot"])
    assert all(("zeroshot_mAP" in r) == (r["metric"] == "mAP") for r in final if r["eval_task"] in contrastive["zeroshot"])
    assert not any(set(FAMILY_COLUMNS) & set(r) for r in rows if r["iteration"] == 2 or r["task"] != "contrastive")

    write_outputs(rows, tmp_path)
    written = list(csv.DictReader((tmp_path / "ablation.csv").open()))
    assert set(FAMILY_COLUMNS) <= set(written[0])
    empty = [r for r in written if r["task"] == "token_classification"]
    assert empty and all(r[c] == "" for r in empty for c in FAMILY_COLUMNS)  # empty, not 0
    shape = next(r for r in written if r["task"] == "contrastive" and r["iteration"] == "4" and r["eval_task"] == "shape")
    assert shape["family_method"] == "embedding" and float(shape["zeroshot_mAP"]) >= 0 and shape["t2i_r@1"] != ""
    md = markdown(rows)
    assert "## Zero-shot classification and retrieval" in md and "6 images and their 30 captions" in md
    blank = [line for line in md.split("## Zero-shot classification and retrieval")[1].splitlines() if line.startswith("| token_classification")]
    assert len(blank) == 2 and all(set(line.split("|")[2:-1]) == {"  "} for line in blank)
    assert "## Zero-shot" not in markdown(_label_rows("token_classification", world))  # no run has the columns


def test_tiny_ablation_siglip_row_and_family_cells_recomputed_from_the_final_checkpoint(tmp_path):
    out = tmp_path / "ablation"
    argv = ["ablate", "--tasks", "siglip,token_classification", "--budget", "tiny", "--output", str(out)]
    assert main(argv) == 0
    rows = list(csv.DictReader((out / "ablation.csv").open()))
    final = [r for r in rows if r["task"] == "siglip" and r["iteration"] == "4"]
    assert final and all(r["family_method"] == "embedding" and r["i2t_r@1"] != "" for r in final)
    assert all(r["family_method"] == "" for r in rows if r["task"] == "token_classification" or r["iteration"] != "4")
    assert "loss: siglip" in (out / "runs" / "siglip" / "seed0" / "config.yaml").read_text()
    # scores cached before these columns existed: recomputed from the kept final checkpoint, no retraining
    cache = out / "runs" / "siglip" / "seed0" / "scores.json"
    saved = json.loads(cache.read_text())
    cache.write_text(json.dumps({"key": saved["key"], "rows": saved["rows"]}))
    assert main(argv) == 0
    again = list(csv.DictReader((out / "ablation.csv").open()))
    strip = [{k: v for k, v in r.items() if k != "family_seconds"} for r in again]
    assert strip == [{k: v for k, v in r.items() if k != "family_seconds"} for r in rows]
    assert json.loads(cache.read_text())["family"]["method"] == "embedding"
