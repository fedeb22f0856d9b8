"""``capvis finetune detect``: fine-tune torchvision Faster/Mask R-CNN (ResNet-FPN) from the backbone.

Trains on COCO-format instance annotations and reports COCO box AP (and mask AP for Mask R-CNN)
through pycocotools. Defaults follow the paper's COCO setting (2x schedule: 180k iterations,
batch 16, LR 0.02, train min-size 640-800, test 800); see :mod:`capvis.eval.detection`.
"""

from __future__ import annotations

import argparse

from capvis.eval.common import add_model_arguments, add_runtime_arguments

COMMAND = ("finetune", "detect")
HELP = "fine-tune Faster/Mask R-CNN (ResNet-FPN) initialised from the backbone; COCO box/mask AP"


ARCHS = ("fasterrcnn", "maskrcnn")  # as capvis.eval.detection (not imported here: it pulls in torch)
NORMS = ("batch", "frozen")
TRAIN_MIN_SIZES = (640, 672, 704, 736, 768, 800)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--train", required=True, help="COCO instances JSON for training")
    parser.add_argument("--val", required=True, help="COCO instances JSON to evaluate on")
    parser.add_argument("--images-train", default=None,
                        help="image folder of --train (default: DIR/<split> for "
                             "DIR/annotations/instances_<split>.json, else the annotation file's folder)")
    parser.add_argument("--images-val", default=None, help="image folder of --val (default as --images-train)")
    parser.add_argument("--arch", default="maskrcnn", choices=ARCHS, help="default maskrcnn (box and mask AP)")
    parser.add_argument("--norm", default="batch", choices=NORMS,
                        help="backbone norm: batch (trainable BN, per-device statistics; paper: SyncBN) or "
                             "frozen (FrozenBatchNorm2d, for small per-device batches)")
    parser.add_argument("--iterations", type=int, default=180_000, help="training iterations (default 180000, 2x)")
    parser.add_argument("--lr", type=float, default=None, help="base LR (default 0.02 * batch-size / 16)")
    parser.add_argument("--warmup", type=int, default=1000, help="linear warmup iterations (default 1000)")
    parser.add_argument("--min-size", type=int, nargs="+", default=list(TRAIN_MIN_SIZES),
                        help="train shorter-side sizes, one sampled per image (default 640 ... 800)")
    parser.add_argument("--test-size", type=int, default=800, help="test shorter side (default 800)")
    parser.add_argument("--max-size", type=int, default=1333, help="longer-side cap (default 1333)")
    parser.add_argument("--rois-per-image", type=int, default=512,
                        help="sampled RoIs per training image for the box/mask heads (default 512)")
    parser.add_argument("--detections-per-image", type=int, default=100, help="kept detections (default 100)")
    parser.add_argument("--output", default="finetuned_detector.pt",
                        help="where to save the fine-tuned detector (default ./finetuned_detector.pt)")
    parser.add_argument("--seed", type=int, default=0)
    add_runtime_arguments(parser, batch_size=16, workers=2)


def run(args: argparse.Namespace) -> int:
    from capvis import __version__
    from capvis.errors import ConfigError
    from capvis.eval.common import check_positive, load_model, print_final_json, resolve_device
    from capvis.eval.detection import finetune_detect
    from capvis.storage import atomic_save

    check_positive(iterations=args.iterations, batch_size=args.batch_size, lr=args.lr, test_size=args.test_size,
                   max_size=args.max_size, min_size=min(args.min_size), rois_per_image=args.rois_per_image,
                   detections_per_image=args.detections_per_image)
    model = load_model(args)
    cfg = model.config.model
    cnn = model.backbone.torchvision_resnet()
    if cnn is None:
        raise ConfigError(f"finetune detect builds torchvision Faster/Mask R-CNN on ResNets; backbone {cfg.backbone!r} "
                          "is not a torchvision ResNet")
    detector, result = finetune_detect(
        cfg.backbone, cnn.state_dict(), args.train, args.val, images_train=args.images_train,
        images_val=args.images_val, arch=args.arch, norm=args.norm, small_stem=cfg.small_stem,
        iterations=args.iterations, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
        min_size=tuple(args.min_size), test_size=args.test_size, max_size=args.max_size,
        rois_per_image=args.rois_per_image, detections_per_image=args.detections_per_image,
        device=resolve_device(args.device), num_workers=args.loader_workers, seed=args.seed)
    atomic_save({"model": {k: v.cpu() for k, v in detector.state_dict().items()}, "arch": args.arch,
                 "backbone": cfg.backbone, "metrics": result, "source": model.source,
                 "capvis_version": __version__}, args.output)
    line = f"box AP {result['bbox']['AP']:.2f}"
    if "segm" in result:
        line += f", mask AP {result['segm']['AP']:.2f}"
    print(f"finetune detect ({args.arch}, {args.iterations} iterations): {line}; weights -> {args.output}")
    print_final_json({"command": "finetune detect", "checkpoint": model.source, "output": args.output, **result})
    return 0
