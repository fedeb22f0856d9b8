"""Zero-shot classification: scoring rules, prompt classifier, errors; by likelihood, class scores equal to
``capvis score``'s NLL of each prompt; and models trained briefly on CaptionWorld that beat chance on the
shape task through ``capvis eval zeroshot`` (contrastive by embedding, bicaptioning by likelihood)."""

from __future__ import annotations

import json

import pytest
import torch

from capvis.cli import main
from capvis.config import load_config
from capvis.errors import ConfigError
from capvis.eval.zeroshot import class_embeddings, mean_average_precision, top1_any_label
from capvis.tasks import build_task

pytestmark = pytest.mark.usefixtures("one_thread")  # restored after each test (conftest)


def test_top1_counts_any_label_and_reports_chance() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.0, 0.0], [0.1, 0.2, 0.9, 0.0], [0.0, 0.0, 0.0, 1.0], [1.0, 0, 0, 0]])
    result = top1_any_label(scores, [[0], [1, 2], [0], []])  # the last entry has no label: skipped
    assert result["top1"] == pytest.approx(2 / 3)
    assert result["chance"] == pytest.approx((1 / 4 + 2 / 4 + 1 / 4) / 3)
    assert result["images"] == 3 and result["multi_label_images"] == 1


def test_class_embeddings_average_templates(coco_tokenizer_path) -> None:
    from capvis.data.tokenizer import Tokenizer

    tokenizer = Tokenizer(coco_tokenizer_path)
    cfg = load_config(None, ["model.task=contrastive", "model.backbone=resnet18", "model.textual.hidden=64",
                             "model.contrastive.embed_dim=16"])
    task = build_task(cfg, tokenizer.vocab_size).eval()
    both = class_embeddings(task, tokenizer, ["dog", "cat"], ["a photo of a {}.", "a {} on the left."], max_len=30)
    one = class_embeddings(task, tokenizer, ["dog", "cat"], ["a photo of a {}."], max_len=30)
    assert both.shape == (2, 16) and torch.allclose(both.norm(dim=1), torch.ones(2))
    assert not torch.allclose(both, one)
    with pytest.raises(ConfigError, match="must contain"):
        class_embeddings(task, tokenizer, ["dog"], ["a photo"], max_len=30)


@pytest.mark.parametrize("method, task_name, message", [
    ("embedding", "bicaptioning", "by embedding needs an image-text embedding model"),
    ("likelihood", "contrastive", "by likelihood needs a captioning model"),
    ("auto", "token_classification", "which is neither"),
])
def test_zeroshot_rejects_models_without_the_method(tmp_path, capsys, method, task_name, message) -> None:
    from capvis.world import write_world

    write_world(tmp_path / "world", {"test": 4}, seed=0, image_size=32, workers=1)
    code = main(["eval", "zeroshot", "--checkpoint", "random", "--config", "bicaptioning_R_50_L1_H2048",
                 "--labels", str(tmp_path / "world/annotations/labels_test.json"), "--task", "shape",
                 "--method", method, f"model.task={task_name}", "model.backbone=resnet18",
                 "model.textual.hidden=64", "data.vocab="])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_mean_average_precision_and_its_chance() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.8, 0.7, 0.5], [0.1, 0.9, 0.5], [0.2, 0.3, 0.5]])
    labels = [[0], [0, 1], [], [2]]  # class 0: AP 1; class 1: positive ranked 2nd -> AP 1/2; class 2: ties
    result = mean_average_precision(scores, labels)
    assert result["mAP_classes"] == 3
    ap2 = 0.25  # all four tied: one positive among four
    assert result["mAP"] == pytest.approx((1.0 + 0.5 + ap2) / 3)
    assert result["mAP_chance"] == pytest.approx((2 / 4 + 1 / 4 + 1 / 4) / 3)


def _labelled_images(tmp_path, coco_fixture):
    """A label file over the fixture's 4 COCO images, with class names of one and of several tokens."""
    from capvis.data.annotations import read_records
    from capvis.data.labels import write_label_file

    records = read_records(coco_fixture)
    classes = ["dog", "cat", "plate of food"]
    entries = [{"file_name": r.path.name, "image_id": r.image_id, "labels": {"animal": labels}}
               for r, labels in zip(records, ([0], [1], [], [2]))]
    return write_label_file(tmp_path / "labels.json", {"animal": classes}, entries), records, classes


@pytest.mark.parametrize("task_name", ["bicaptioning", "captioning", "coca"])
def test_likelihood_class_scores_equal_the_score_nll_of_each_prompt(tmp_path, coco_fixture, coco_tokenizer_path,
                                                                     task_name, capsys) -> None:
    """Batched over classes on the KV cache, each class score is minus the summed NLL that ``capvis score``
    gives its prompt (forward plus backward for bicaptioning), averaged over templates."""
    from dataclasses import replace

    from capvis.eval.score import score_captions
    from capvis.eval.zeroshot import likelihood_scores
    from test_score import make_checkpoint

    task, tokenizer = make_checkpoint(tmp_path / "ckpt.pt", coco_tokenizer_path, task_name)  # 64 px, 12 tokens
    label_file, records, classes = _labelled_images(tmp_path, coco_fixture)
    templates = ("a photo of a {}.", "a {} on the left or the right.")
    scores = likelihood_scores(task, tokenizer, classes, templates, [r.path for r in records], max_len=12,
                               image_size=64, batch_size=3)
    assert scores.shape == (4, 3)
    for i, record in enumerate(records):
        for k, name in enumerate(classes):
            total = 0.0
            for template in templates:
                nll = score_captions(task, tokenizer, [replace(record, captions=[template.format(name)])],
                                     image_size=64, max_caption_length=12)
                total -= nll["tokens"] * (nll["nll_forward"] + nll.get("nll_backward", 0.0))
            assert scores[i, k].item() == pytest.approx(total / len(templates), rel=1e-4), (i, name)
    code = main(["eval", "zeroshot", "--checkpoint", str(tmp_path / "ckpt.pt"), "--labels", str(label_file),
                 "--task", "animal", "--method", "likelihood", "--images", str(records[0].path.parent),
                 "--templates", *templates, "--device", "cpu", "--batch-size", "2"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    hits = [int(scores[i].argmax()) in labels for i, labels in ((0, [0]), (1, [1]), (3, [2]))]
    assert result["method"] == "likelihood" and result["images"] == 3 and result["classes"] == 3
    assert result["top1"] == pytest.approx(sum(hits) / 3) and result["chance"] == pytest.approx(1 / 3)
    assert {"mAP", "mAP_chance", "mAP_classes"} <= result.keys()


@pytest.mark.slow
def test_contrastive_on_captionworld_beats_chance(tmp_path, capsys) -> None:
    """~80 s on one CPU thread: 700 steps of 16 images at 32 px (standard ResNet-18 stem), then zero-shot
    on 200 test images. Measured: top-1 0.46 against a chance of 0.28 (world/train seed 0) and 0.36
    against 0.27 (seed 1). Fewer steps are not reliable: contrastive training sits on a plateau for the
    first 200-300 steps (both towers collapse towards one direction) and learns colours and backgrounds
    before shapes; 400 steps gave 0.40 with seed 0 but 0.20 with seed 1."""
    from capvis.data.annotations import read_caption_texts
    from capvis.data.tokenizer import train_tokenizer
    from capvis.world import write_world
    from capvis.train.loop import Trainer

    world = tmp_path / "world"
    write_world(world, {"train": 512, "test": 200}, seed=0, image_size=32, workers=1)
    captions = world / "annotations" / "captions_train.json"
    vocab = train_tokenizer(read_caption_texts([captions]), tmp_path / "vocab", vocab_size=300)
    cfg = load_config("contrastive_R_50", [
        f"data.train={captions}", "data.val=", f"data.vocab={vocab}", "data.image_size=32", "data.num_workers=0",
        "data.crop_scale=[0.9,1.0]", "data.color_jitter_p=0", "model.backbone=resnet18", "model.textual.hidden=64",
        "model.textual.heads=4", "model.textual.dropout=0", "model.contrastive.embed_dim=64",
        "model.contrastive.text_pool=mean", "train.batch_size=16", "train.iterations=700", "train.warmup=0",
        "train.schedule=none", "train.optimizer=adamw", "train.lr_backbone=0.002", "train.lr_textual=0.002",
        "train.weight_decay=0", "train.lookahead=false", "train.log_every=100", "train.checkpoint_every=700",
        "train.channels_last=false", "train.device=cpu"])
    Trainer(cfg, tmp_path / "run", progress=False).run()
    capsys.readouterr()
    code = main(["eval", "zeroshot", "--checkpoint", str(tmp_path / "run"), "--labels",
                 str(world / "annotations" / "labels_test.json"), "--task", "shape", "--device", "cpu",
                 "--templates", "a photo of a {}.", "a picture with a {}.", "an image of a {}."])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["model_task"] == "contrastive" and result["classes"] == 8 and result["images"] == 200
    assert result["top1"] > result["chance"] + 0.05, result


@pytest.mark.slow
def test_bicaptioning_on_captionworld_beats_chance_by_likelihood(tmp_path, capsys) -> None:
    """1000 steps of 16 images at 32 px (a quarter-width ResNet-18 with the small stride-2 stem) on 2000
    CaptionWorld images, then likelihood zero-shot of the shape task on 200 test images with the default
    prompt; ~1 min on one idle CPU thread (~2 min on a slower 2-core machine). With the current grammar
    (synonyms: disc/circle, hoop/ring, which split the prior of those class words) 500 steps are not enough
    on every machine: on one, every image went to 'hexagon' (top-1 0.305 = the share of hexagon images,
    mAP 0.324), the same with three other templates. Measured at 1000 steps on that machine: top-1 0.355 vs
    chance 0.278, mAP 0.401 vs 0.278; on another (2026-12-04) top-1 0.25 and mAP 0.389. mAP (per-class rankings
    of p(class | image)) is the steadier signal, and the one asserted."""
    from capvis.data.annotations import read_caption_texts
    from capvis.data.tokenizer import train_tokenizer
    from capvis.world import write_world
    from capvis.train.loop import Trainer

    world = tmp_path / "world"
    write_world(world, {"train": 2000, "test": 200}, seed=0, image_size=32, workers=1)
    captions = world / "annotations" / "captions_train.json"
    vocab = train_tokenizer(read_caption_texts([captions]), tmp_path / "vocab", vocab_size=200)
    cfg = load_config("bicaptioning_R_50_L1_H2048", [
        f"data.train={captions}", "data.val=", f"data.vocab={vocab}", "data.image_size=32", "data.num_workers=0",
        "data.max_caption_length=20", "data.crop_scale=[0.9,1.0]", "data.color_jitter_p=0",
        "model.backbone=resnet18", "model.visual_width=16", "model.small_stem=true", "model.stem_stride=2",
        "model.textual.hidden=64", "model.textual.heads=4", "model.textual.dropout=0", "train.batch_size=16",
        "train.iterations=1000", "train.warmup=0", "train.schedule=none", "train.optimizer=adamw",
        "train.lr_backbone=0.002", "train.lr_textual=0.002", "train.weight_decay=0", "train.lookahead=false",
        "train.log_every=100", "train.checkpoint_every=1000", "train.channels_last=false", "train.device=cpu"])
    Trainer(cfg, tmp_path / "run", progress=False).run()
    capsys.readouterr()
    code = main(["eval", "zeroshot", "--checkpoint", str(tmp_path / "run"), "--labels",
                 str(world / "annotations" / "labels_test.json"), "--task", "shape", "--device", "cpu"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["method"] == "likelihood" and result["model_task"] == "bicaptioning"  # auto: no text encoder
    assert result["classes"] == 8 and result["images"] == 200
    # top-1 is not asserted: at this size the class words' prior decides it on some machines (2026-12-04:
    # top-1 0.25 vs chance 0.278 while mAP was 0.389, deterministic there); the per-class ranking is the
    # signal, and a model without one (the 500-step collapse: mAP 0.324) fails this bound
    assert result["mAP"] > result["mAP_chance"] + 0.06, result
