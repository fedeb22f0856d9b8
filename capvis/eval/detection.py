"""Detection and instance segmentation transfer: torchvision Faster/Mask R-CNN with an FPN on the backbone.

The paper fine-tunes Mask R-CNN R50-FPN in Detectron2 (SyncBN, 2x schedule); this module is the
torchvision counterpart, for a single process:

* R-50 with BatchNorm is torchvision's own ``fasterrcnn_resnet50_fpn`` / ``maskrcnn_resnet50_fpn``
  (``weights=None, weights_backbone=None, trainable_backbone_layers=5``); any other capvis ResNet
  (or ``--norm frozen``) is built the same way through ``resnet_fpn_backbone`` (torchvision's
  ``BackboneWithFPN``), every stage trainable. ``backbone.body`` is loaded from the capvis
  backbone's ``cnn`` state dict; a missing or unexpected key is an error, never a silent skip.
* Norm: ``batch`` (default) trains BatchNorm with per-device batch statistics, the single-device
  stand-in for the paper's SyncBN (adequate with >= 8 images per device); ``frozen`` is
  ``FrozenBatchNorm2d`` (statistics and affine fixed from pretraining; what torchvision uses for
  ImageNet-initialised detectors, and the right choice for small per-device batches).
* Solver as Detectron2's: SGD momentum 0.9, LR 0.02 x batch/16, weight decay 1e-4 (none on norm
  parameters), linear warmup from 0.001x over 1000 iterations, x0.1 at 2/3 and 8/9 of the run
  (120k/160k of the 2x schedule's 180k). Train min-size sampled from 640-800, test 800, max 1333,
  random horizontal flip. Pixel normalisation (ImageNet mean/std) happens inside the model.
* Evaluation: COCO box AP (and mask AP for Mask R-CNN) from pycocotools ``COCOeval``, in percent.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from capvis.errors import CheckpointError, ConfigError, DataError
from capvis.tasks.base import TaskOutput

log = logging.getLogger(__name__)

ARCHS = ("fasterrcnn", "maskrcnn")
NORMS = ("batch", "frozen")
TRAIN_MIN_SIZES = (640, 672, 704, 736, 768, 800)
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def build_detector(backbone_name: str, num_classes: int, *, arch: str = "maskrcnn", norm: str = "batch",
                   small_stem: bool = False, min_size: tuple[int, ...] = TRAIN_MIN_SIZES,
                   max_size: int = 1333, rois_per_image: int = 512, detections_per_image: int = 100) -> nn.Module:
    """A randomly initialised detector whose ``backbone.body`` has the layout of capvis ``cnn``.

    ``num_classes`` includes the background class (COCO: 81). ``rois_per_image`` is the number of
    sampled RoIs per training image (Detectron2's ROI_HEADS.BATCH_SIZE_PER_IMAGE, 512).
    """
    from torchvision.models import detection as det
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d

    if arch not in ARCHS:
        raise ConfigError(f"unknown --arch {arch!r}; choose from {', '.join(ARCHS)}")
    if norm not in NORMS:
        raise ConfigError(f"unknown --norm {norm!r}; choose from {', '.join(NORMS)}")
    kwargs = dict(num_classes=num_classes, min_size=min_size, max_size=max_size,
                  box_batch_size_per_image=rois_per_image, box_detections_per_img=detections_per_image)
    if backbone_name == "resnet50" and norm == "batch":
        builder = det.maskrcnn_resnet50_fpn if arch == "maskrcnn" else det.fasterrcnn_resnet50_fpn
        with warnings.catch_warnings():  # "no effect if neither pretrained ...": 5 is what we ask for anyway
            warnings.filterwarnings("ignore", message="Changing trainable_backbone_layers")
            model = builder(weights=None, weights_backbone=None, trainable_backbone_layers=5, **kwargs)
    else:
        norm_layer = FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d
        try:
            fpn = resnet_fpn_backbone(backbone_name=backbone_name, weights=None, norm_layer=norm_layer,
                                      trainable_layers=5)
        except (KeyError, AttributeError, ValueError):
            raise ConfigError(f"backbone {backbone_name!r} has no ResNet-FPN counterpart in torchvision") from None
        model = (det.MaskRCNN if arch == "maskrcnn" else det.FasterRCNN)(fpn, **kwargs)
    if small_stem:  # capvis demo/test stem: 3x3 stride-1 conv, no max-pool (FPN levels 4x finer)
        body = model.backbone.body
        body.conv1 = nn.Conv2d(3, body.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        body.maxpool = nn.Identity()
    return model


def load_backbone_weights(detector: nn.Module, cnn_state: dict[str, Tensor]) -> None:
    """Copy a capvis ``cnn`` state dict into ``detector.backbone.body``; CheckpointError on any key mismatch."""
    state = {k: v for k, v in cnn_state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = detector.backbone.body.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        reason = str(exc).splitlines()[-1].strip()
        raise CheckpointError(f"backbone weights do not fit the detector ({reason})") from None
    if missing or unexpected:
        raise CheckpointError(f"backbone weights do not fit the detector: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]} (does model.visual_norm match --norm?)")


class CocoInstances(Dataset):
    """Images and targets of a COCO instances file, for torchvision detection models.

    Targets: ``boxes`` (N, 4) xyxy float, ``labels`` (N,) contiguous 1..K, ``masks`` (N, H, W) uint8
    when ``masks``; crowd and degenerate boxes are dropped. ``image_id`` is the COCO id.
    """

    def __init__(self, coco: Any, images_dir: Path, image_ids: list[int], cat_to_label: dict[int, int], *,
                 masks: bool, train: bool, seed: int = 0) -> None:
        self.coco, self.images_dir, self.ids = coco, images_dir, image_ids
        self.cat_to_label, self.masks, self.train, self.seed = cat_to_label, masks, train, seed

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: int) -> tuple[Tensor, dict[str, Tensor]]:
        from capvis.data.datasets import load_image

        epoch, i = divmod(key, len(self.ids))
        image_id = self.ids[i]
        info = self.coco.imgs[image_id]
        image = load_image(self.images_dir / info["file_name"]).float() / 255.0  # (3, H, W) in [0, 1]
        anns = [a for a in self.coco.imgToAnns.get(image_id, [])
                if not a.get("iscrowd", 0) and a["bbox"][2] > 1 and a["bbox"][3] > 1
                and a["category_id"] in self.cat_to_label]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                             dtype=torch.float32).reshape(-1, 4)
        target = {"boxes": boxes, "image_id": torch.tensor(image_id),
                  "labels": torch.tensor([self.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64)}
        if self.masks:
            h, w = image.shape[-2:]
            target["masks"] = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns])
                                               if anns else np.zeros((0, h, w), np.uint8))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 7_919 + i)
        if self.train and float(torch.rand((), generator=g)) < 0.5:  # horizontal flip
            width = image.shape[-1]
            image = image.flip(-1)
            target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
            if self.masks:
                target["masks"] = target["masks"].flip(-1)
        return image, target


def read_instances(annotation_file: str | Path, images_dir: str | Path | None = None) -> tuple[Any, Path]:
    """pycocotools ``COCO`` of an instances file and its image folder (default as for label files)."""
    from contextlib import redirect_stdout
    from io import StringIO

    from pycocotools.coco import COCO

    from capvis.eval.common import default_images_dir

    path = Path(annotation_file)
    if not path.is_file():
        raise DataError(f"instances file {path} not found")
    try:
        with redirect_stdout(StringIO()):  # pycocotools prints progress
            coco = COCO(str(path))
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise DataError(f"{path}: not a COCO instances file ({exc})") from None
    if not coco.getCatIds():
        raise DataError(f"{path}: no 'categories'")
    folder = Path(images_dir) if images_dir else default_images_dir(path)
    first = next(iter(coco.imgs.values()), None)
    if first is None or not (folder / first["file_name"]).is_file():
        raise DataError(f"{path}: images not found under {folder} (set the image folder explicitly)")
    return coco, folder


def _collate(batch: list) -> tuple[list, list]:
    return [b[0] for b in batch], [b[1] for b in batch]


def _batches(dataset: CocoInstances, batch_size: int, num_workers: int, seed: int) -> Iterator[tuple[list, list]]:
    """Endless shuffled batches; keys carry the epoch so flips differ between passes."""
    def keys() -> Iterator[int]:
        epoch = 0
        while True:
            perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch))
            yield from (epoch * len(dataset) + int(i) for i in perm)
            epoch += 1

    class _Keys(torch.utils.data.Sampler):
        def __iter__(self) -> Iterator[int]:
            return keys()

    yield from DataLoader(dataset, batch_size=batch_size, sampler=_Keys(), num_workers=num_workers,
                          collate_fn=_collate)


def solver(model: nn.Module, *, lr: float, iterations: int, warmup: int = 1000, weight_decay: float = 1e-4):
    """Detectron2's default solver: SGD, no decay on norm parameters, warmup, steps at 2/3 and 8/9."""
    norm_types = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)
    norm_params = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in norm_params], "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) in norm_params], "weight_decay": 0.0}]
    opt = torch.optim.SGD(groups, lr=lr, momentum=0.9)
    warmup = min(warmup, iterations)
    steps = (int(iterations * 2 / 3), int(iterations * 8 / 9))

    def factor(t: int) -> float:
        w = 0.001 + (1 - 0.001) * t / warmup if t < warmup else 1.0
        return w * 0.1 ** sum(t >= s for s in steps)

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


class _DetectionObjective(nn.Module):
    """torchvision's detector loss dict as a TaskOutput, so detection steps with ``train_step``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> TaskOutput:
        losses = self.model(batch["images"], batch["targets"])
        return TaskOutput(loss=sum(losses.values()), logs={k: v.detach() for k, v in losses.items()})


def train_detector(model: nn.Module, dataset: CocoInstances, *, iterations: int, batch_size: int, lr: float,
                   device: torch.device, warmup: int = 1000, num_workers: int = 2, seed: int = 0) -> dict[str, float]:
    """Iteration-based training with the trainer's ``train_step`` (a non-finite loss or gradient skips
    its update); returns the last losses and the number of skipped steps."""
    from capvis.train.precision import resolve_precision
    from capvis.train.step import train_step

    objective = _DetectionObjective(model.to(device)).train()
    opt, sched = solver(model, lr=lr, iterations=iterations, warmup=warmup)
    prec = resolve_precision("fp32", device)
    scaler = prec.scaler()
    batches = _batches(dataset, batch_size, num_workers, seed)
    skipped = torch.zeros((), dtype=torch.long, device=device)
    for it in range(iterations):
        images, targets = next(batches)
        batch = {"images": [im.to(device, non_blocking=True) for im in images],
                 "targets": [{k: v.to(device) for k, v in t.items()} for t in targets]}
        step = train_step(objective, batch, opt, sched, scaler, prec)
        skipped += step.skipped
        if (it + 1) % 20 == 0 or it + 1 == iterations:
            log.info("detect iteration %d/%d: loss %.4f, lr %.4g", it + 1, iterations, float(step.loss),
                     sched.get_last_lr()[0])
    last = {k: float(v) for k, v in step.logs.items()} | {"loss": float(step.loss)}
    if int(skipped):
        log.warning("%d of %d iterations had a non-finite loss or gradient and were skipped", int(skipped), iterations)
    return last | {"skipped_steps": int(skipped)}


@torch.no_grad()
def predict_coco(model: nn.Module, dataset: CocoInstances, label_to_cat: dict[int, int], *, device: torch.device,
                 batch_size: int = 4, num_workers: int = 2) -> list[dict]:
    """COCO results (``bbox`` xywh in input-image pixels, ``score``, and RLE ``segmentation`` for masks)."""
    from pycocotools import mask as mask_utils

    model.to(device).eval()
    results = []
    for images, targets in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate):
        outputs = model([im.to(device) for im in images])
        for out, target in zip(outputs, targets):
            image_id = int(target["image_id"])
            boxes = out["boxes"].float().cpu()
            boxes[:, 2:] -= boxes[:, :2]  # xyxy -> xywh
            masks = (out["masks"][:, 0] > 0.5).cpu().numpy() if "masks" in out else None  # (N, H, W)
            for k in range(len(boxes)):
                r = {"image_id": image_id, "category_id": label_to_cat[int(out["labels"][k])],
                     "bbox": [round(float(v), 2) for v in boxes[k]], "score": float(out["scores"][k])}
                if masks is not None:
                    rle = mask_utils.encode(np.asfortranarray(masks[k].astype(np.uint8)))
                    r["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
                results.append(r)
    return results


def coco_ap(coco_gt: Any, results: list[dict], iou_type: str, image_ids: list[int]) -> dict[str, float]:
    """COCOeval's six summary numbers in percent (NaN where the split has no objects of that size)."""
    from contextlib import redirect_stdout
    from io import StringIO

    from pycocotools.cocoeval import COCOeval

    if not results:
        return {name: 0.0 for name in METRIC_NAMES}
    buffer = StringIO()
    with redirect_stdout(buffer):
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    log.info("COCO %s:\n%s", iou_type, buffer.getvalue().strip())
    return {name: (float(v) * 100.0 if v >= 0 else float("nan")) for name, v in zip(METRIC_NAMES, evaluator.stats)}


def finetune_detect(backbone_name: str, cnn_state: dict[str, Tensor], train_file: str | Path, val_file: str | Path, *,
                    images_train: str | Path | None = None, images_val: str | Path | None = None,
                    arch: str = "maskrcnn", norm: str = "batch", small_stem: bool = False,
                    iterations: int = 180_000, batch_size: int = 16, lr: float | None = None, warmup: int = 1000,
                    min_size: tuple[int, ...] = TRAIN_MIN_SIZES, test_size: int = 800, max_size: int = 1333,
                    rois_per_image: int = 512, detections_per_image: int = 100,
                    device: str | torch.device = "cpu", num_workers: int = 2, seed: int = 0
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """Build, initialise from ``cnn_state``, fine-tune on ``train_file`` and COCO-evaluate on ``val_file``.

    Returns the trained detector and ``{"bbox": {AP...}, "segm": {AP...} (maskrcnn), ...}`` in percent.
    """
    device = torch.device(device)
    train_coco, train_dir = read_instances(train_file, images_train)
    val_coco, val_dir = read_instances(val_file, images_val)
    cat_ids = sorted(train_coco.getCatIds())
    cat_to_label = {c: k + 1 for k, c in enumerate(cat_ids)}  # 0 is background
    masks = arch == "maskrcnn"
    train_ids = sorted(i for i in train_coco.imgs if any(not a.get("iscrowd", 0)
                                                         for a in train_coco.imgToAnns.get(i, [])))
    if not train_ids:
        raise DataError(f"{train_file}: no image has a (non-crowd) annotation")
    torch.manual_seed(seed)
    model = build_detector(backbone_name, len(cat_ids) + 1, arch=arch, norm=norm, small_stem=small_stem,
                           min_size=tuple(min_size), max_size=max_size, rois_per_image=rois_per_image,
                           detections_per_image=detections_per_image)
    load_backbone_weights(model, cnn_state)
    train = CocoInstances(train_coco, train_dir, train_ids, cat_to_label, masks=masks, train=True, seed=seed)
    lr = lr if lr is not None else 0.02 * batch_size / 16
    last = train_detector(model, train, iterations=iterations, batch_size=batch_size, lr=lr, device=device,
                          warmup=warmup, num_workers=num_workers, seed=seed)
    model.transform.min_size = (test_size,)
    val_ids = sorted(val_coco.imgs)
    val = CocoInstances(val_coco, val_dir, val_ids, cat_to_label, masks=masks, train=False)
    results = predict_coco(model, val, {v: k for k, v in cat_to_label.items()}, device=device,
                           num_workers=num_workers)
    metrics: dict[str, Any] = {"bbox": coco_ap(val_coco, [{k: v for k, v in r.items() if k != "segmentation"}
                                                          for r in results], "bbox", val_ids)}
    if masks:
        metrics["segm"] = coco_ap(val_coco, results, "segm", val_ids)
    return model, {**metrics, "arch": arch, "norm": norm, "iterations": iterations, "batch_size": batch_size,
                   "lr": lr, "train_images": len(train_ids), "val_images": len(val_ids),
                   "detections": len(results), "last_losses": last}
