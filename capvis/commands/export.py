"""``capvis export --checkpoint C --output DIR [--formats auto|torchvision,timm,detectron2,onnx]``.

Writes ``DIR/backbone_torchvision.pth`` (torchvision ResNets: a state dict that loads strictly; its
``fc`` is a fresh 1000-class layer, N(0, 0.01) weights and zero bias, with no learned content),
``DIR/backbone_timm.pth`` (timm backbones: ``timm.create_model(name, num_classes=0, img_size=S)``
loads it strictly), ``DIR/backbone_detectron2.pkl`` (torchvision ResNets; Detectron2 names, RGB
input, see :mod:`capvis.interop.detectron2`) and ``DIR/backbone.onnx`` (every backbone: images
(B, 3, H, W) -> the visual-token grid, dynamic batch/height/width). ``auto`` (default): every format
the backbone can take. A format it cannot take is a one-line error.
"""

from __future__ import annotations

import argparse

COMMAND = ("export",)
HELP = "export the backbone as a torchvision or timm state dict, a Detectron2 .pkl and/or ONNX"
FORMATS = ("torchvision", "timm", "detectron2", "onnx")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="CKPT|RUN_DIR|RELEASE|random",
                        help="capvis checkpoint, run directory, release, or 'random' (needs --config)")
    parser.add_argument("--config", default=None, help="config (file or bundled name) for --checkpoint random")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--formats", default="auto",
                        help=f"comma-separated subset of {', '.join(FORMATS)}, or auto (default: all the backbone takes)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="ONNX example input size (default the checkpoint's data.image_size; H and W stay dynamic)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    backbone, cfg = _backbone(args)
    formats = _formats(args.formats, backbone)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if "torchvision" in formats:
        from capvis.interop.torchvision import torchvision_state_dict

        torch.save(torchvision_state_dict(backbone), out / "backbone_torchvision.pth")
        written.append(out / "backbone_torchvision.pth")
    if "timm" in formats:
        torch.save(backbone.export_state_dict(), out / "backbone_timm.pth")
        written.append(out / "backbone_timm.pth")
    if "detectron2" in formats:
        from capvis.interop.detectron2 import save_detectron2

        written.append(save_detectron2(backbone, out / "backbone_detectron2.pkl"))
    if "onnx" in formats:
        from capvis.interop.onnx import export_onnx

        written.append(export_onnx(backbone, out / "backbone.onnx", image_size=args.image_size or cfg.data.image_size))
    print(f"export: wrote {', '.join(str(p) for p in written)}")
    return 0


def _formats(text: str, backbone) -> list[str]:  # backbone: the contract's Backbone
    """The formats asked for, each one the backbone can take (one-line error otherwise)."""
    from capvis.errors import ConfigError

    takes = {backbone.export_format, "onnx"} | ({"detectron2"} if backbone.torchvision_resnet() is not None else set())
    if text.strip() == "auto":
        return [f for f in FORMATS if f in takes]
    formats = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ConfigError(f"--formats {text!r}: choose from {', '.join(FORMATS)} or auto")
    refused = [f for f in formats if f not in takes]
    if refused:
        raise ConfigError(f"--formats {refused[0]}: backbone {backbone.name!r} exports as "
                          f"{', '.join(f for f in FORMATS if f in takes)}")
    return formats


def _backbone(args: argparse.Namespace):  # -> (VisualBackbone, Config)
    from capvis.loading import load_pretrained

    if args.checkpoint == "random":
        pre = load_pretrained("random", config=args.config, overrides=tuple(args.overrides))
        return pre.backbone.eval(), pre.config
    from capvis.hub import load

    backbone = load(args.checkpoint, "backbone", overrides=tuple(args.overrides))
    return backbone, backbone.config
