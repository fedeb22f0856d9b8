"""`capvis caption` and `capvis eval captioning` on a tiny model pretrained in-process on CaptionWorld."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from capvis.cli import main
from capvis.eval.captioning import image_ids

TINY = ["model.backbone=resnet18", "model.small_stem=true", "data.image_size=32", "model.textual.hidden=64",
        "train.batch_size=4", "data.num_workers=0", "train.log_every=5", "train.warmup=2",
        "train.channels_last=false", "train.optimizer=adamw", "train.lr_backbone=0.002", "train.lr_textual=0.002",
        "train.weight_decay=0", "train.val_batches=1"]


def make_tiny_run(root: Path, iterations: int = 20, *extra: str) -> dict[str, Path]:
    """CaptionWorld (40 train / 8 val at 32 px), a vocabulary on its captions, and a pretraining run."""
    from capvis.config import load_config
    from capvis.data.annotations import read_caption_texts
    from capvis.data.tokenizer import train_tokenizer
    from capvis.world import write_world
    from capvis.train.loop import Trainer

    world = root / "world"
    write_world(world, {"train": 40, "val": 8}, seed=0, image_size=32, workers=1)
    train, val = world / "annotations" / "captions_train.json", world / "annotations" / "captions_val.json"
    vocab = train_tokenizer(read_caption_texts([train]), root / "vocab", vocab_size=200)
    cfg = load_config("bicaptioning_R_50_L1_H2048", [f"data.train={train}", f"data.val={val}", f"data.vocab={vocab}",
                                                     *TINY, f"train.iterations={iterations}",
                                                     f"train.checkpoint_every={iterations}", *extra])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(cfg, root / "run", progress=False).run()
    finally:
        torch.set_num_threads(threads)
    return {"world": world, "train": train, "val": val, "vocab": vocab, "run": root / "run"}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_tiny_run(tmp_path_factory.mktemp("captioning"))


@pytest.fixture
def odd_folder(tiny_run: dict[str, Path], tmp_path: Path) -> Path:
    """World images under awkward names, a PNG, a corrupt .jpg and a non-image file."""
    from PIL import Image

    src = sorted((tiny_run["world"] / "val").iterdir())
    folder = tmp_path / "my photos"
    folder.mkdir()
    shutil.copy(src[0], folder / "holiday pic (1).JPG")
    shutil.copy(src[1], folder / "000000000042.jpg")
    shutil.copy(src[2], folder / "café_ünïcode.jpeg")
    Image.open(src[3]).save(folder / "screenshot.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_image_ids_use_digit_stems_and_fill_the_rest() -> None:
    paths = [Path("a.jpg"), Path("000000000002.jpg"), Path("b c.png"), Path("2.png"), Path("10.jpg")]
    assert image_ids(paths) == [1, 2, 3, 4, 10]


def test_caption_odd_folder_writes_coco_results(tiny_run, odd_folder, tmp_path, caplog) -> None:
    out = tmp_path / "captions.json"
    code = main(["caption", "--checkpoint", str(tiny_run["run"]), str(odd_folder), "--output", str(out),
                 "--batch-size", "3", "--device", "cpu"])
    assert code == 0
    rows = json.loads(out.read_text(encoding="utf-8"))
    assert sorted(r["file_name"] for r in rows) == sorted(
        ["holiday pic (1).JPG", "000000000042.jpg", "café_ünïcode.jpeg", "screenshot.png"])
    assert all(set(r) == {"image_id", "caption", "file_name"} for r in rows)
    assert all(isinstance(r["image_id"], int) and isinstance(r["caption"], str) for r in rows)
    assert len({r["image_id"] for r in rows}) == 4
    assert {r["file_name"]: r["image_id"] for r in rows}["000000000042.jpg"] == 42
    assert any(r["caption"] for r in rows)
    assert "broken.jpg" in caplog.text  # skipped with a warning


def test_caption_greedy_and_beam_print_and_attention(tiny_run, odd_folder, tmp_path, capsys) -> None:
    image = str(odd_folder / "screenshot.png")
    for method in (["--method", "greedy"], ["--method", "beam", "--beam-size", "1"]):
        assert main(["caption", "--checkpoint", str(tiny_run["run"]), image, "--max-steps", "8", *method]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("screenshot.png\t")
    assert lines[0] == lines[1]  # beam 1 == greedy
    attention = tmp_path / "attention"
    assert main(["caption", "--checkpoint", str(tiny_run["run"]), image, "--method", "nucleus", "--max-steps", "5",
                 "--attention", str(attention)]) == 0
    pngs = list(attention.glob("*.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_captioning_prints_final_json(tiny_run, tmp_path, capsys) -> None:
    preds = tmp_path / "preds.json"
    code = main(["eval", "captioning", "--checkpoint", str(tiny_run["run"]), "--annotations", str(tiny_run["val"]),
                 "--method", "greedy", "--max-steps", "12", "--output", str(preds)])
    assert code == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["images"] == 8 and 0 <= final["bleu4"] <= 1 and final["cider"] >= 0
    if final["spice"] is None:
        assert any("SPICE" in n for n in final["notes"])
    assert len(json.loads(preds.read_text())) == 8


def test_caption_errors_are_one_line(tiny_run, tmp_path, capsys) -> None:
    assert main(["caption", "--checkpoint", str(tiny_run["run"]), str(tmp_path / "missing")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["caption", "--checkpoint", str(tiny_run["run"]), str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no such image file or folder" in err[0] and "no image files" in err[1]
