"""``capvis features``: global-average-pooled backbone features of an image set, saved as ``.npy``.

Rows follow the image order: a folder's images sorted by relative path, or the ``images`` of a
downstream-label file. A ``.json`` sidecar beside the ``.npy`` lists the files and the settings, so
``capvis eval svm --features-train/--features-test`` can check that rows and labels line up.
Features are raw (not L2-normalised); the SVM protocol normalises them itself.
"""

from __future__ import annotations

import argparse

from capvis.eval.common import (
    add_feature_arguments,
    add_image_arguments,
    add_model_arguments,
    add_runtime_arguments,
)

COMMAND = ("features",)
HELP = "extract pooled backbone features of a folder or label file into a .npy file"

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of images (searched recursively, sorted by relative path)")
    source.add_argument("--labels", help="downstream-label file; rows follow its 'images'")
    parser.add_argument("--images-dir", default=None,
                        help="image folder of --labels (default: DIR/<split> for DIR/annotations/labels_<split>.json, "
                             "else the label file's folder)")
    parser.add_argument("--output", required=True, help="output .npy file (a .json sidecar is written beside it)")
    add_feature_arguments(parser)
    add_image_arguments(parser)
    add_runtime_arguments(parser, batch_size=128, workers=4)


def list_images(folder: str) -> tuple[list, list[str]]:
    from pathlib import Path

    from capvis.errors import DataError

    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"--images {root} is not a directory")
    paths = sorted((p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                   key=lambda p: p.relative_to(root).as_posix())
    if not paths:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return paths, [p.relative_to(root).as_posix() for p in paths]


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import numpy as np

    from capvis.eval.common import check_positive, load_model, print_final_json, resolve_device
    from capvis.eval.downstream import label_file_images
    from capvis.eval.features import default_resize, extract_features

    check_positive(image_size=args.image_size, resize=args.resize, batch_size=args.batch_size)
    device = resolve_device(args.device)
    if args.labels:
        _, entries, paths = label_file_images(args.labels, args.images_dir)
        names = [e["file_name"] for e in entries]
    else:
        paths, names = list_images(args.images)
    model = load_model(args)
    image_size = args.image_size or model.config.data.image_size
    resize = args.resize or default_resize(image_size)
    feats = extract_features(model.backbone, paths, image_size=image_size, resize=resize, stage=args.stage,
                             batch_size=args.batch_size, num_workers=args.loader_workers, device=device,
                             compile=args.compile, progress=True)
    out = Path(args.output)
    if out.suffix != ".npy":
        out = out.with_name(out.name + ".npy")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, feats)
    sidecar = out.with_suffix(".json")
    meta = {"checkpoint": model.source, "stage": args.stage, "image_size": image_size, "resize": resize,
            "shape": list(feats.shape), "source": args.labels or args.images, "files": names}
    sidecar.write_text(json.dumps(meta, indent=1))
    print_final_json({"command": "features", "output": str(out), "sidecar": str(sidecar),
                      "shape": list(feats.shape), "checkpoint": model.source})
    return 0
