"""``capvis finetune classify``: end-to-end fine-tuning with a linear head (iNaturalist style, paper 4.3).

Defaults are the paper's: SGD momentum 0.9, weight decay 1e-4 on all parameters, LR 0.025 with
x0.1 steps at 70% and 90% of the iterations, batch 256, 100 epochs, BatchNorm in train mode.
Saves the fine-tuned network as a torchvision ResNet state dict (with ``fc``) to ``--output``.
"""

from __future__ import annotations

import argparse

from capvis.eval.common import add_image_arguments, add_model_arguments, add_runtime_arguments

COMMAND = ("finetune", "classify")
HELP = "fine-tune the backbone end to end with a linear classifier on ImageFolder data (top-1/top-5)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--train", required=True, help="training images, ImageFolder layout DIR/<class>/<image>")
    parser.add_argument("--val", required=True, help="validation images, same layout and class names")
    parser.add_argument("--output", default="finetuned_classifier.pt",
                        help="where to save the fine-tuned weights (default ./finetuned_classifier.pt)")
    parser.add_argument("--epochs", type=int, default=100, help="training epochs (default 100)")
    parser.add_argument("--lr", type=float, default=0.025, help="initial LR (default 0.025)")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="auto: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--clip-grad-norm", type=float, default=0.0,
                        help="clip the gradient norm at this value (default 0: off, the paper's protocol)")
    parser.add_argument("--seed", type=int, default=0)
    add_image_arguments(parser)
    add_runtime_arguments(parser, batch_size=256, workers=4)


def run(args: argparse.Namespace) -> int:
    from capvis.eval.common import check_positive, load_model, print_final_json, resolve_device
    from capvis.eval.finetune import finetune_classify, save_finetuned

    check_positive(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, image_size=args.image_size,
                   resize=args.resize)
    model = load_model(args)
    net, result = finetune_classify(
        model.backbone, args.train, args.val, image_size=args.image_size or model.config.data.image_size,
        resize=args.resize, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, momentum=args.momentum,
        weight_decay=args.weight_decay, num_workers=args.loader_workers, device=resolve_device(args.device),
        seed=args.seed, precision=args.precision, clip_grad_norm=args.clip_grad_norm)
    out = save_finetuned(net, args.output, metrics=result, config=model.config.to_dict(), source=model.source)
    result.pop("class_names")
    print(f"finetune classify: top-1 {result['top1']:.2f}, top-5 {result['top5']:.2f}; weights -> {out}")
    print_final_json({"command": "finetune classify", "checkpoint": model.source, "output": str(out), **result})
    return 0
