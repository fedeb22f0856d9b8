"""`capvis features`, `eval svm` and `eval voc07` in-process on a tiny CaptionWorld and pretraining run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers_eval import image_folder, run_cli, tiny_config, tiny_run, world  # noqa: F401 (fixtures)

from capvis.cli import main

FAST = ["--loader-workers", "0", "--workers", "1"]


def labels(world, split):
    return str(world / "annotations" / f"labels_{split}.json")


def test_features_from_labels_then_svm_equals_images_path(world, tiny_run, tmp_path, capsys):
    feats = {}
    for split in ("train", "test"):
        out = tmp_path / f"{split}.npy"
        res = run_cli(["features", "--checkpoint", str(tiny_run), "--labels", labels(world, split), "--output",
                       str(out), "--loader-workers", "0", "--batch-size", "8"], capsys)
        feats[split] = np.load(out)
        sidecar = json.loads(out.with_suffix(".json").read_text())
        names = [e["file_name"] for e in json.loads(open(labels(world, split)).read())["images"]]
        assert res["shape"] == [len(names), 512] and feats[split].shape == (len(names), 512)
        assert sidecar["files"] == names and sidecar["image_size"] == 32 and sidecar["resize"] == 37
    from_files = run_cli(["eval", "svm", "--train", labels(world, "train"), "--test", labels(world, "test"),
                          "--features-train", str(tmp_path / "train.npy"),
                          "--features-test", str(tmp_path / "test.npy"),
                          "--workers", "1", "--tasks", "count"], capsys)
    from_images = run_cli(["eval", "svm", "--checkpoint", str(tiny_run), "--train", labels(world, "train"),
                           "--test", labels(world, "test"), "--tasks", "count", *FAST], capsys)
    assert list(from_images["mAP"]) == ["count"] and 0 <= from_images["mAP"]["count"] <= 100
    assert from_files["mAP"] == from_images["mAP"] and from_files["ap"] == from_images["ap"]
    # swapped feature files: the sidecar names other images, so the rows cannot be these labels
    code = main(["eval", "svm", "--train", labels(world, "train"), "--test", labels(world, "test"),
                 "--features-train", str(tmp_path / "test.npy"), "--features-test", str(tmp_path / "test.npy")])
    assert code == 2 and "images" in capsys.readouterr().err


def test_svm_random_baseline_matches_library(world, tiny_config, capsys):
    from capvis.eval.downstream import svm_eval_label_files
    from capvis.loading import load_pretrained

    res = run_cli(["eval", "svm", "--checkpoint", "random", "--config", str(tiny_config), "--train",
                   labels(world, "train"), "--test", labels(world, "test"), "--tasks", "count", *FAST], capsys)
    assert res["checkpoint"] == "random" and list(res["mAP"]) == ["count"]
    backbone = load_pretrained("random", config=tiny_config).backbone
    lib = svm_eval_label_files(backbone, labels(world, "train"), labels(world, "test"), image_size=32, workers=1,
                               tasks=["count"])
    assert res["mAP"]["count"] == pytest.approx(lib["count"])


def test_features_of_a_folder_in_sorted_order(world, tiny_run, tmp_path, capsys):
    out = tmp_path / "f.npy"
    res = run_cli(["features", "--checkpoint", str(tiny_run), "--images", str(world / "test"), "--output",
                   str(out), "--stage", "layer3", "--loader-workers", "0"], capsys)
    files = json.loads(out.with_suffix(".json").read_text())["files"]
    assert files == sorted(p.name for p in (world / "test").iterdir()) and res["shape"] == [16, 256]
    compiled = tmp_path / "g.npy"  # --compile BACKEND: the same features through torch.compile
    run_cli(["features", "--checkpoint", str(tiny_run), "--images", str(world / "test"), "--output",
             str(compiled), "--stage", "layer3", "--loader-workers", "0", "--compile", "aot_eager"], capsys)
    np.testing.assert_allclose(np.load(compiled), np.load(out), rtol=1e-5, atol=1e-6)


def write_voc_from_world(root, world, difficult=False, num_classes=8):
    """VOCdevkit/VOC2007 (layout of tests/test_voc07.py): trainval = world train, test = world test, one
    class per shape; VOC codes 1 present, -1 absent, 0 difficult."""
    from capvis.data.labels import read_label_file

    voc = root / "VOCdevkit" / "VOC2007"
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    for split, voc_split in (("train", "trainval"), ("test", "test")):
        tasks, entries = read_label_file(world / "annotations" / f"labels_{split}.json")
        ids = [e["file_name"][:-4] for e in entries]
        for e in entries:
            shutil.copy(world / split / e["file_name"], voc / "JPEGImages" / e["file_name"])  # same bytes
        for k, cls in enumerate(tasks["shape"][:num_classes]):
            codes = [1 if k in e["labels"]["shape"] else -1 for e in entries]
            if difficult and voc_split == "test":
                codes[0] = 0
            (voc / "ImageSets" / "Main" / f"{cls}_{voc_split}.txt").write_text(
                "".join(f"{i} {c:2d}\n" for i, c in zip(ids, codes)))
    return voc


def test_voc07_matches_svm_on_the_same_images(world, tiny_run, tmp_path, capsys):
    voc = write_voc_from_world(tmp_path, world)
    res = run_cli(["eval", "voc07", "--checkpoint", str(tiny_run), "--voc-root", str(voc), "--image-size", "32",
                   *FAST], capsys)
    svm = run_cli(["eval", "svm", "--checkpoint", str(tiny_run), "--train", labels(world, "train"),
                   "--test", labels(world, "test"), "--tasks", "shape", *FAST], capsys)
    assert res["train_images"] == 24 and res["test_images"] == 16
    assert res["mAP"] == pytest.approx(svm["mAP"]["shape"])
    assert res["ap"] == pytest.approx(svm["ap"]["shape"])


def test_voc07_random_with_difficult_and_cache(world, tiny_config, tmp_path, capsys):
    voc = write_voc_from_world(tmp_path, world, difficult=True, num_classes=3)
    res = run_cli(["eval", "voc07", "--checkpoint", "random", "--config", str(tiny_config), "model.visual_norm=group",
                   "--voc-root", str(voc.parent), "--image-size", "32", "--cache-dir", str(tmp_path / "c"), *FAST],
                  capsys)
    assert res["checkpoint"] == "random" and 0 <= res["mAP"] <= 100
    assert set(res["ap"]) | set(res["skipped"]) == {p.name.split("_")[0]
                                                   for p in (voc / "ImageSets" / "Main").glob("*_trainval.txt")}


@pytest.mark.parametrize("argv, message", [
    (["eval", "svm", "--train", "a.json", "--test", "b.json", "--features-train", "x.npy"], "both --features"),
    (["eval", "svm", "--train", "a.json", "--test", "b.json"], "give --checkpoint"),
    (["eval", "svm", "--train", "a.json", "--test", "b.json", "--checkpoint", "random"], "--config"),
    (["eval", "voc07", "--checkpoint", "random", "--voc-root", "/nonexistent"], "not a directory"),
    (["features", "--checkpoint", "random", "--images", "/nonexistent", "--output", "x.npy"], "not a directory"),
])
def test_user_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_default_image_folder_and_strict_final_json(tmp_path, capsys):
    from capvis.eval.common import default_images_dir, print_final_json

    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").mkdir()
    assert default_images_dir(tmp_path / "annotations" / "instances_val2017.json") == tmp_path / "val2017"
    assert default_images_dir(tmp_path / "annotations" / "labels_test.json") == tmp_path / "annotations"
    assert default_images_dir(tmp_path / "mine.json") == tmp_path
    print_final_json({"mAP": float("nan"), "ap": {"a": np.float64(1.5)}, "path": tmp_path})
    assert json.loads(capsys.readouterr().out) == {"mAP": None, "ap": {"a": 1.5}, "path": str(tmp_path)}
