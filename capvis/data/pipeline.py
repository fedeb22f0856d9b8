"""From config to DataLoader: vocabulary, records, transforms, sampler, workers.

This is the only place that turns ``cfg.data`` into loaders, so new sources (shards, other
annotation formats) plug in here and the trainer stays unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch.utils.data import DataLoader, IterableDataset

from capvis.config import Config
from capvis.data.annotations import read_records
from capvis.data.datasets import CaptionDataset, collate_captions, subset_fraction
from capvis.data.loader import ResumableShardedSampler, local_batch_size, make_loader, make_stream_loader
from capvis.data.shards import expand_pattern, is_shard_pattern
from capvis.data.tokenizer import Tokenizer
from capvis.data.transforms import build_eval_transform, build_train_transform
from capvis.errors import ConfigError, DataError
from capvis.distinfo import DistInfo

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


CAPTION_KEYS = frozenset({"image", "caption_tokens", "caption_lengths", "image_id"})  # what every batch holds
CATEGORY_KEY = "categories"  # (B, K) instance categories from instances_<split>.json, for tasks that ask


def build_caption_dataset(cfg: Config, split: str, tokenizer: Tokenizer, *,
                          batch_keys: frozenset[str] = CAPTION_KEYS) -> CaptionDataset:
    """The map-style dataset of ``data.<split>``; ``batch_keys`` are the keys the task declares it reads."""
    d = cfg.data
    annotations = d.train if split == "train" else d.val
    images = d.train_images if split == "train" else d.val_images
    if not annotations:
        raise ConfigError(f"data.{split} is not set")
    records = read_records(annotations, images or None, max_bad_fraction=d.max_bad_fraction)
    if split == "train" and d.fraction < 1.0:
        records = subset_fraction(records, d.fraction, cfg.train.seed)
    num_categories = attach_task_categories(cfg, annotations, records) if CATEGORY_KEY in batch_keys else None
    transform = build_train_transform(d) if split == "train" else build_eval_transform(d.image_size)
    return CaptionDataset(records, tokenizer, transform, d.max_caption_length, cfg.train.seed,
                          one_caption_per_image=d.one_caption_per_image, num_categories=num_categories,
                          max_bad_fraction=d.max_bad_fraction,
                          cache_bytes=d.cache_images_mb * 2**20 // max(1, d.num_workers))


def build_shard_stream(cfg: Config, split: str, tokenizer: Tokenizer, info: DistInfo, *,
                       start_iteration: int = 0) -> IterableDataset:
    """A :class:`ShardStream` over the shard pattern in ``data.train`` / ``data.val`` (training: endless,
    shuffled, resumable; validation: one unshuffled epoch, equal share per process)."""
    from capvis.data.streaming import ShardStream

    d = cfg.data
    train = split == "train"
    if train and d.fraction < 1.0:
        raise ConfigError("data.fraction applies to annotation files; write the subset's shards instead")
    shards = expand_pattern(d.train if train else d.val)
    transform = build_train_transform(d) if train else build_eval_transform(d.image_size)
    return ShardStream(shards, tokenizer, transform, max_caption_length=d.max_caption_length, seed=cfg.train.seed,
                       rank=info.rank, world_size=info.world_size, shuffle=train, shuffle_buffer=d.shuffle_buffer,
                       start_iteration=start_iteration, batch_size=local_batch_size(cfg, info.world_size),
                       infinite=train, one_caption_per_image=d.one_caption_per_image,
                       max_bad_fraction=d.max_bad_fraction, decode_device=_decode_device(d.decode_device, info))


def _decode_device(name: str, info: DistInfo) -> str:
    """``data.decode_device``, checked against the training device in one line."""
    if name != "cpu" and info.device.type != name:
        raise ConfigError(f"data.decode_device={name} needs training on {name}; this process trains on "
                          f"{info.device.type} (set data.decode_device=cpu)")
    return name


def build_train_loader(cfg: Config, tokenizer: Tokenizer | None, info: DistInfo, *,
                       start_iteration: int = 0, batch_keys: frozenset[str] = CAPTION_KEYS) -> DataLoader:
    """An endless loader; its stream restarts exactly at ``start_iteration``."""
    batch = local_batch_size(cfg, info.world_size)
    if is_shard_pattern(cfg.data.train):
        from capvis.data.streaming import collate_stream

        stream = build_shard_stream(cfg, "train", _require_tokenizer(tokenizer), info, start_iteration=start_iteration)
        log.info("train: %d samples in %d shards, %d per process and step", stream.num_samples, len(stream.shards),
                 batch)
        return make_stream_loader(stream, batch_size=batch, num_workers=cfg.data.num_workers,
                                  collate=collate_stream, pin_memory=info.device.type == "cuda")
    dataset = build_caption_dataset(cfg, "train", _require_tokenizer(tokenizer), batch_keys=batch_keys)
    sampler = ResumableShardedSampler(len(dataset), rank=info.rank, world_size=info.world_size,
                                      seed=cfg.train.seed, start=start_iteration * batch)
    log.info("train: %d images, %d per process and step", len(dataset), batch)
    return make_loader(dataset, batch_size=batch, sampler=sampler, num_workers=cfg.data.num_workers,
                       collate=collate_captions, pin_memory=info.device.type == "cuda")


def build_val_loader(cfg: Config, tokenizer: Tokenizer | None, info: DistInfo, *,
                     batch_keys: frozenset[str] = CAPTION_KEYS) -> DataLoader | None:
    if not cfg.data.val:
        return None
    batch = local_batch_size(cfg, info.world_size)
    if is_shard_pattern(cfg.data.val):
        stream = build_shard_stream(cfg, "val", _require_tokenizer(tokenizer), info)
        return make_stream_loader(stream, batch_size=batch, num_workers=min(cfg.data.num_workers, 2),
                                  collate=collate_captions, persistent=False)
    dataset = build_caption_dataset(cfg, "val", _require_tokenizer(tokenizer), batch_keys=batch_keys)
    sampler = ResumableShardedSampler(len(dataset), rank=info.rank, world_size=info.world_size,
                                      seed=cfg.train.seed, shuffle=False, infinite=False)
    return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=min(cfg.data.num_workers, 2),
                      collate_fn=collate_captions)


def attach_task_categories(cfg: Config, annotation_file: str, records: list) -> int | None:
    """Set the records' instance categories from ``instances_<split>.json`` beside the captions file and
    return their number K (the batch then carries ``categories``): for a task whose ``batch_keys``
    include :data:`CATEGORY_KEY` (multilabel_classification)."""
    from capvis.data.annotations import attach_categories, instances_file_for

    _, names = attach_categories(records, instances_file_for(annotation_file))
    if len(names) > cfg.model.num_categories:
        raise ConfigError(f"{instances_file_for(annotation_file)} has {len(names)} categories, more than "
                          f"model.num_categories={cfg.model.num_categories}")
    return len(names)
