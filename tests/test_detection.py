"""Detection transfer (`capvis finetune detect`): detector construction, weight loading, COCO AP on CaptionWorld."""

from __future__ import annotations

import pytest
import torch
from helpers_eval import run_cli, tiny_run, world  # noqa: F401 (fixtures)
from torchvision.ops import FrozenBatchNorm2d

from capvis.errors import CheckpointError
from capvis.eval.detection import build_detector, load_backbone_weights
from capvis.models.backbones import build_backbone

pytestmark = [pytest.mark.filterwarnings("ignore:Changing trainable_backbone_layers"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")]


def test_resnet50_is_torchvisions_builder_and_takes_the_capvis_backbone():
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    model = build_detector("resnet50", 9, arch="fasterrcnn")
    reference = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=9, trainable_backbone_layers=5)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in reference.state_dict().items()}
    assert all(p.requires_grad for p in model.backbone.body.parameters())  # every stage trains, stem included
    cnn = build_backbone("resnet50").cnn
    load_backbone_weights(model, cnn.state_dict())
    assert torch.equal(model.backbone.body.layer4[2].conv3.weight, cnn.layer4[2].conv3.weight)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_backbone_weights(model, build_backbone("resnet18").cnn.state_dict())


def test_other_depths_frozen_bn_and_small_stem():
    cnn = build_backbone("resnet18", small_stem=True).cnn
    model = build_detector("resnet18", 3, arch="maskrcnn", norm="frozen", small_stem=True, min_size=(48,), max_size=48)
    load_backbone_weights(model, cnn.state_dict())
    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)
    assert torch.equal(model.backbone.body.bn1.running_var, cnn.bn1.running_var)
    image = torch.rand(3, 48, 48)
    target = {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([2]),
              "masks": torch.zeros(1, 48, 48, dtype=torch.uint8)}
    target["masks"][0, 6:40, 4:30] = 1
    losses = model.train()([image], [target])
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())


def _check_ap(block):
    assert set(block) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert 0 <= block["AP"] <= 100 and all(v is None or 0 <= v <= 100 for v in block.values())


def test_finetune_detect_cli_reports_box_and_mask_ap(world, tiny_run, tmp_path, capsys):
    ann = world / "annotations"
    out = tmp_path / "det.pt"
    res = run_cli(["finetune", "detect", "--checkpoint", str(tiny_run), "--train", str(ann / "instances_train.json"),
                   "--val", str(ann / "instances_val.json"), "--arch", "maskrcnn", "--iterations", "2",
                   "--batch-size", "2", "--warmup", "1", "--min-size", "64", "--test-size", "64", "--max-size", "64",
                   "--rois-per-image", "64", "--detections-per-image", "20", "--loader-workers", "0",
                   "--output", str(out)], capsys)
    _check_ap(res["bbox"])
    _check_ap(res["segm"])
    assert res["train_images"] == 24 and res["val_images"] == 4 and res["detections"] <= 4 * 20
    assert res["lr"] == pytest.approx(0.02 * 2 / 16)
    state = torch.load(out, map_location="cpu", weights_only=False)
    assert any(k.startswith("roi_heads.mask_predictor") for k in state["model"])


def test_instances_dataset_flips_boxes_with_masks(world):
    from capvis.eval.detection import CocoInstances, read_instances

    coco, folder = read_instances(world / "annotations" / "instances_train.json")
    cats = {c: k + 1 for k, c in enumerate(sorted(coco.getCatIds()))}
    data = CocoInstances(coco, folder, sorted(coco.imgs)[:4], cats, masks=True, train=True)
    for key in range(8):  # two passes: each image seen flipped and unflipped at least once, seeded
        image, target = data[key]
        assert image.shape == (3, 64, 64) and 0 <= image.min() and image.max() <= 1
        for box, mask in zip(target["boxes"], target["masks"]):
            xs = mask.nonzero()[:, 1]
            assert abs(float(xs.min()) - float(box[0])) <= 2 and abs(float(xs.max()) + 1 - float(box[2])) <= 2
        assert target["labels"].min() >= 1 and target["labels"].max() <= len(cats)
    from capvis.data.datasets import load_image

    raw = [load_image(folder / coco.imgs[i]["file_name"]).float() / 255 for i in data.ids]
    flipped = [torch.equal(data[k][0], raw[k % 4].flip(-1)) for k in range(8)]
    assert all(f or torch.equal(data[k][0], raw[k % 4]) for k, f in enumerate(flipped))
    assert 0 < sum(flipped) < 8 and flipped == [torch.equal(data[k][0], raw[k % 4].flip(-1)) for k in range(8)]
