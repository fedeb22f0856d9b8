"""Images/s of the training data loader alone: decode + augment + tokenize + collate, no model.

    python bench/dataloader.py --data ANNOTATIONS_OR_SHARDS --workers 2 --image-size 224 \
        [--batch-size 64] [--batches 20] [--vocab VOCAB.model] [--no-draft]
    python bench/dataloader.py --synthesize /tmp/bench_coco --count 500   # COCO-like 640x480 JPEGs
    python bench/dataloader.py --synthetic 256 --workers 8                # both: a temporary set, then the bench

``--data`` is an annotation file (COCO captions JSON, JSONL, CSV: the map-style folder loader) or a
shard pattern (``DIR/shard-{000000..000004}.tar``: the streaming loader). The loaders are built as
pretraining builds them (same transforms, prefetching, persistent workers). Without ``--vocab`` a
small vocabulary is trained on the captions first. Ends with one JSON line: images_per_s,
images_per_s_per_worker and the settings used.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from capvis.config import load_config
from capvis.data.device_decode import decode_on_device
from capvis.data.streaming import collate_stream
from capvis.data.shards import expand_pattern, is_shard_pattern, iter_tar_samples
from capvis.data.tokenizer import Tokenizer, train_tokenizer
from capvis.train.distributed import DistInfo

WORDS = ("dog", "cat", "man", "woman", "bus", "plate", "pizza", "street", "table", "field", "ball", "tree")


def synthesize(root: Path, count: int, size: tuple[int, int] = (640, 480), seed: int = 0) -> Path:
    """COCO-layout set of ``count`` smooth-plus-noise JPEGs (about COCO's 640x480 and ~100 KB each)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "train2017").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for k in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.int16) + rng.normal(0, 10, (size[1], size[0], 3)).astype(np.int16)
        name = f"{k:012d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / "train2017" / name, quality=90)
        images.append({"id": k, "file_name": name, "width": size[0], "height": size[1]})
        for _ in range(5):
            a, b, c = rng.choice(WORDS, 3)
            annotations.append({"id": len(annotations), "image_id": k, "caption": f"A {a} next to a {b} near the {c}."})
    path = root / "annotations" / "captions_train2017.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def caption_sample(data: str, limit: int = 5000) -> list[str]:
    if not is_shard_pattern(data):
        from capvis.data.annotations import read_caption_texts

        return read_caption_texts([data])[:limit]
    texts: list[str] = []
    for shard in expand_pattern(data):
        with open(shard, "rb") as fh:
            for sample in iter_tar_samples(fh):
                if "json" in sample.members:
                    offset, size = sample.members["json"]
                    fh.seek(offset)
                    texts += json.loads(fh.read(size))["captions"]
                if len(texts) >= limit:
                    return texts
    return texts


def build_loader(args: argparse.Namespace, tokenizer: Tokenizer):
    from capvis.data import pipeline
    from capvis.data.loader import make_stream_loader

    cfg = load_config(None, [f"data.train={args.data}", f"data.num_workers={args.workers}",
                             f"data.image_size={args.image_size}", f"train.batch_size={args.batch_size}",
                             f"data.decode_device={args.decode_device}",
                             *([f"data.train_images={args.images}"] if args.images else [])])
    if not is_shard_pattern(args.data):
        return pipeline.build_train_loader(cfg, tokenizer, DistInfo()), "folder"
    device = torch.device(args.decode_device)
    stream = pipeline.build_shard_stream(cfg, "train", tokenizer, DistInfo(device=device))
    stream.draft = not args.no_draft
    return make_stream_loader(stream, batch_size=args.batch_size, num_workers=args.workers,
                              collate=collate_stream), "shards"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="annotation file or shard pattern")
    p.add_argument("--images", default="", help="image folder (annotation files only)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=20, help="timed batches (after --warmup-batches)")
    p.add_argument("--warmup-batches", type=int, default=3)
    p.add_argument("--vocab", default="", help="SentencePiece .model (default: train a small one)")
    p.add_argument("--no-draft", action="store_true", help="shards: always decode JPEGs at full size")
    p.add_argument("--synthesize", metavar="DIR", help="write a COCO-like synthetic set to DIR and exit")
    p.add_argument("--count", type=int, default=500, help="images for --synthesize")
    p.add_argument("--synthetic", type=int, metavar="N", help="bench N synthesized images in a temporary folder")
    p.add_argument("--decode-device", default="cpu", choices=("cpu", "cuda"),
                   help="shards: data.decode_device (cuda: JPEGs decoded a batch at a time on the GPU; "
                        "--synthetic then writes shards)")
    args = p.parse_args(argv)
    if args.synthesize:
        print(synthesize(Path(args.synthesize), args.count))
        return 0
    if args.synthetic:
        with tempfile.TemporaryDirectory() as tmp:
            args.data = str(synthesize(Path(tmp), args.synthetic))
            if args.decode_device != "cpu":  # device decoding reads shards
                from capvis.data.shards import write_shards_from_annotations

                manifest = write_shards_from_annotations(args.data, Path(tmp) / "shards", shard_size=256)
                args.data = str(Path(tmp) / "shards" / manifest["pattern"])
            return bench(args)
    if not args.data:
        p.error("--data is required")
    return bench(args)


def bench(args: argparse.Namespace) -> int:
    if args.vocab:
        tokenizer = Tokenizer(args.vocab)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = Tokenizer.from_bytes(
                train_tokenizer(caption_sample(args.data), Path(tmp) / "bench", 1000).read_bytes())
    loader, source = build_loader(args, tokenizer)
    batches = iter(loader)
    for _ in range(args.warmup_batches):  # worker start-up and first prefetch are not throughput
        next(batches)
    start = time.perf_counter()
    device = torch.device(args.decode_device)
    images = sum(decode_on_device(next(batches), device)["image"].shape[0] for _ in range(args.batches))
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    rate = images / elapsed
    result = {"images_per_s": round(rate, 1), "images_per_s_per_worker": round(rate / max(args.workers, 1), 1),
              "source": source, "workers": args.workers, "image_size": args.image_size,
              "batch_size": args.batch_size, "batches": args.batches,
              "draft": source == "shards" and not args.no_draft, "decode_device": args.decode_device,
              "data": args.data}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
