"""The resumable sharded sampler: disjoint ranks, exact restart from a position."""

from __future__ import annotations

import itertools

import pytest

from capvis.data.loader import ResumableShardedSampler
from capvis.errors import ConfigError


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_ranks_are_disjoint_and_cover_an_epoch():
    size = 10
    r0 = take(ResumableShardedSampler(size, rank=0, world_size=2, seed=3), 5)
    r1 = take(ResumableShardedSampler(size, rank=1, world_size=2, seed=3), 5)
    assert sorted(k % size for k in r0 + r1) == list(range(size))
    assert all(k < size for k in r0 + r1)  # epoch 0 keys


def test_epochs_reshuffle_and_encode_the_epoch():
    s = ResumableShardedSampler(8, seed=1)
    keys = take(s, 16)
    assert sorted(keys[:8]) == list(range(8)) and sorted(k - 8 for k in keys[8:]) == list(range(8))
    assert [k % 8 for k in keys[:8]] != [k % 8 for k in keys[8:]]


def test_restart_from_position_continues_the_same_stream():
    full = take(ResumableShardedSampler(7, rank=1, world_size=2, seed=5), 20)
    resumed = take(ResumableShardedSampler(7, rank=1, world_size=2, seed=5, start=9), 11)
    assert resumed == full[9:]


def test_too_few_samples_for_the_world():
    with pytest.raises(ConfigError):
        ResumableShardedSampler(1, world_size=2)
