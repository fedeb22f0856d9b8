"""``capvis export --checkpoint C --output DIR [--formats torchvision,detectron2,onnx]``.

Writes ``DIR/backbone_torchvision.pth`` (a torchvision ResNet state dict that loads strictly; its
``fc`` is a fresh 1000-class layer, N(0, 0.01) weights and zero bias, with no learned content),
``DIR/backbone_detectron2.pkl`` (Detectron2 names, RGB input, see :mod:`capvis.interop.detectron2`)
and ``DIR/backbone.onnx`` (images (B, 3, H, W) -> layer4 grid, dynamic batch/height/width).
"""

from __future__ import annotations

import argparse

COMMAND = ("export",)
HELP = "export the backbone as a torchvision state dict, a Detectron2 .pkl and/or ONNX"
FORMATS = ("torchvision", "detectron2", "onnx")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="CKPT|RUN_DIR|RELEASE|random",
                        help="capvis checkpoint, run directory, release, or 'random' (needs --config)")
    parser.add_argument("--config", default=None, help="config (file or bundled name) for --checkpoint random")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated subset of {', '.join(FORMATS)}")
    parser.add_argument("--image-size", type=int, default=None,
                        help="ONNX example input size (default the checkpoint's data.image_size; H and W stay dynamic)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from capvis.errors import ConfigError

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ConfigError(f"--formats {args.formats!r}: choose from {', '.join(FORMATS)}")
    backbone, cfg = _backbone(args)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if "torchvision" in formats:
        from capvis.interop.torchvision import torchvision_state_dict

        torch.save(torchvision_state_dict(backbone), out / "backbone_torchvision.pth")
        written.append(out / "backbone_torchvision.pth")
    if "detectron2" in formats:
        from capvis.interop.detectron2 import save_detectron2

        written.append(save_detectron2(backbone, out / "backbone_detectron2.pkl"))
    if "onnx" in formats:
        from capvis.interop.onnx import export_onnx

        written.append(export_onnx(backbone, out / "backbone.onnx", image_size=args.image_size or cfg.data.image_size))
    print(f"export: wrote {', '.join(str(p) for p in written)}")
    return 0


def _backbone(args: argparse.Namespace):  # -> (VisualBackbone, Config)
    from capvis.loading import load_pretrained

    if args.checkpoint == "random":
        pre = load_pretrained("random", config=args.config, overrides=tuple(args.overrides))
        return pre.backbone.eval(), pre.config
    from capvis.hub import load

    backbone = load(args.checkpoint, "backbone", overrides=tuple(args.overrides))
    return backbone, backbone.config
