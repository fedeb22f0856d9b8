"""From config to DataLoader: vocabulary, records, transforms, sampler, workers.

This is the only place that turns ``cfg.data`` into loaders, so new sources (shards, other
annotation formats) plug in here and the trainer stays unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch.utils.data import DataLoader

from capvis.config import Config
from capvis.data.annotations import read_records
from capvis.data.datasets import CaptionDataset, collate_captions, subset_fraction
from capvis.data.loader import ResumableShardedSampler, local_batch_size, make_loader
from capvis.data.tokenizer import Tokenizer
from capvis.data.transforms import build_eval_transform, build_train_transform
from capvis.errors import ConfigError, DataError
from capvis.train.distributed import DistInfo

log = logging.getLogger(__name__)


def load_vocabulary(cfg: Config) -> Tokenizer | None:
    """The tokenizer named by ``data.vocab``; None when no vocabulary is configured."""
    if not cfg.data.vocab:
        return None
    path = Path(cfg.data.vocab)
    if not path.is_file():
        raise DataError(f"vocabulary not found: {path} (build one with `capvis vocab`)")
    return Tokenizer(path)


def _require_tokenizer(tokenizer: Tokenizer | None) -> Tokenizer:
    if tokenizer is None:
        raise ConfigError("data.vocab is required to train on captions (build one with `capvis vocab`)")
    return tokenizer


def build_caption_dataset(cfg: Config, split: str, tokenizer: Tokenizer) -> CaptionDataset:
    d = cfg.data
    annotations = d.train if split == "train" else d.val
    images = d.train_images if split == "train" else d.val_images
    if not annotations:
        raise ConfigError(f"data.{split} is not set")
    records = read_records(annotations, images or None)
    if split == "train" and d.fraction < 1.0:
        records = subset_fraction(records, d.fraction, cfg.train.seed)
    transform = build_train_transform(d) if split == "train" else build_eval_transform(d.image_size)
    return CaptionDataset(records, tokenizer, transform, d.max_caption_length, cfg.train.seed,
                          one_caption_per_image=d.one_caption_per_image)


def build_train_loader(cfg: Config, tokenizer: Tokenizer | None, info: DistInfo, *,
                       start_iteration: int = 0) -> DataLoader:
    """An endless loader; its stream restarts exactly at ``start_iteration``."""
    dataset = build_caption_dataset(cfg, "train", _require_tokenizer(tokenizer))
    batch = local_batch_size(cfg, info.world_size)
    sampler = ResumableShardedSampler(len(dataset), rank=info.rank, world_size=info.world_size,
                                      seed=cfg.train.seed, start=start_iteration * batch)
    log.info("train: %d images, %d per process and step", len(dataset), batch)
    return make_loader(dataset, batch_size=batch, sampler=sampler, num_workers=cfg.data.num_workers,
                       collate=collate_captions, pin_memory=info.device.type == "cuda")


def build_val_loader(cfg: Config, tokenizer: Tokenizer | None, info: DistInfo) -> DataLoader | None:
    if not cfg.data.val:
        return None
    dataset = build_caption_dataset(cfg, "val", _require_tokenizer(tokenizer))
    batch = local_batch_size(cfg, info.world_size)
    sampler = ResumableShardedSampler(len(dataset), rank=info.rank, world_size=info.world_size,
                                      seed=cfg.train.seed, shuffle=False, infinite=False)
    return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=min(cfg.data.num_workers, 2),
                      collate_fn=collate_captions)
