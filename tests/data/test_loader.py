"""The training loader: exact resume, ranks and workers splitting the global order, full batches despite bad data."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from data.builders import bad_shard, tensors
from siglip.data import make_train_loader, open_source
from siglip.errors import UserError


def take(source, steps, *, world_size, num_workers, start_step=0, seed=0, local_batch=3):
    """{rank: [batch for steps start_step ... steps - 1]}."""
    out = {}
    for rank in range(world_size):
        loader = make_train_loader(source, transform=tensors, local_batch=local_batch, rank=rank,
                                   world_size=world_size, start_step=start_step, seed=seed, num_workers=num_workers)
        out[rank] = list(itertools.islice(loader, steps - start_step))
        loader.close()                                           # shuts its workers down now
    return out


def same(a, b) -> bool:
    return (a.step == b.step and a.keys == b.keys and a.bad == b.bad and torch.equal(a.positive_ids, b.positive_ids)
            and a.tensors.keys() == b.tensors.keys()
            and all(torch.equal(a.tensors[name], b.tensors[name]) for name in a.tensors))


@pytest.fixture(scope="module")
def shard_source(tmp_path_factory):
    path = tmp_path_factory.mktemp("loader") / "shard.tar"
    expected, _ = bad_shard(path, good=random.randint(8, 14))
    return open_source(str(path), seed=random.randrange(10**6)), expected


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_digits_resume_and_coverage(world_size, num_workers):
    source = open_source("digits", image_size=8, seed=random.randrange(10**6))
    local_batch = 8 // world_size
    steps = -(-len(source) // 8)                                 # one epoch and a little of the next
    fresh = take(source, steps, world_size=world_size, num_workers=0, local_batch=local_batch)
    # Global order: step by step, rank by rank. It is the source's own index order, so one epoch visits every
    # training digit once (no sample twice, none skipped), whatever the world size.
    keys = [key for step in range(steps) for rank in range(world_size) for key in fresh[rank][step].keys]
    assert keys == [source.train_sample(index).key for index in range(steps * 8)]
    assert len(set(keys[:len(source)])) == len(source)
    assert all(batch.tensors["pixels"].shape == (local_batch, 8, 8, 3) for batch in fresh[0])
    start = random.randrange(1, steps - 2)
    resumed = take(source, steps, world_size=world_size, num_workers=num_workers, start_step=start,
                   local_batch=local_batch)
    for rank in range(world_size):
        assert all(same(a, b) for a, b in zip(resumed[rank], fresh[rank][start:], strict=True))


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_exact_with_bad_samples_refilled(shard_source, world_size, num_workers):
    source, expected = shard_source
    bad_records = {record for record in range(len(source)) if source.records[record][1] in expected}
    steps, seed = 12, random.randrange(10**6)
    fresh = take(source, steps, world_size=world_size, num_workers=0, seed=seed)
    start = random.randrange(1, steps - 1)
    resumed = take(source, steps, world_size=world_size, num_workers=num_workers, start_step=start, seed=seed)
    for rank in range(world_size):
        assert all(same(a, b) for a, b in zip(resumed[rank], fresh[rank][start:], strict=True))
    index = 0
    for step in range(steps):
        for rank in range(world_size):
            batch = fresh[rank][step]
            assert len(batch.keys) == 3                           # full, on every rank
            for key in batch.keys:
                record = source.record_of(index)
                if record in bad_records:
                    assert key.split(":")[-1] not in expected    # refilled with a good sample
                else:
                    assert key == f"{source.shards[0]}:{source.records[record][1]}"    # untouched
                index += 1
    met = sum(sum(fresh[rank][step].bad.values()) for rank in range(world_size) for step in range(steps))
    assert met >= sum(source.record_of(i) in bad_records for i in range(index))


def test_shapes_resume_across_ranks_and_workers():
    source, seed = open_source("shapes", image_size=16, seed=random.randrange(10**6)), random.randrange(10**6)
    fresh = take(source, 6, world_size=2, num_workers=0, seed=seed, local_batch=5)
    resumed = take(source, 6, world_size=2, num_workers=2, start_step=4, seed=seed, local_batch=5)
    assert all(same(a, b) for rank in range(2) for a, b in zip(resumed[rank], fresh[rank][4:], strict=True))
    keys = [key for step in range(6) for rank in range(2) for key in fresh[rank][step].keys]
    assert keys == [f"shapes/train/{index}" for index in range(60)]


def test_loader_arguments_are_checked():
    source = open_source("digits", image_size=8)
    for arguments, name in [({"rank": 2, "world_size": 2}, "rank"), ({"local_batch": 0}, "local_batch"),
                            ({"start_step": -1}, "start_step"), ({"num_workers": -1}, "num_workers")]:
        settings = {"transform": tensors, "local_batch": 4, "rank": 0, "world_size": 1, "start_step": 0, "seed": 0,
                    "num_workers": 0, **arguments}
        with pytest.raises(UserError, match=name):
            make_train_loader(source, **settings)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_the_loader_leaves_the_global_random_generator_alone(num_workers):
    # Training restores torch's global RNG from a checkpoint before its loader starts: a draw from that RNG when the
    # loader starts (the DataLoader's base seed, taken from the global generator unless it has its own) would put
    # a resumed run one random number ahead of an uninterrupted one.
    source = open_source("digits", image_size=8, seed=random.randrange(10**6))
    before = torch.get_rng_state()
    loader = make_train_loader(source, transform=tensors, local_batch=4, rank=0, world_size=1, start_step=0,
                               seed=random.randrange(10**6), num_workers=num_workers)
    next(loader)
    loader.close()
    assert torch.equal(torch.get_rng_state(), before)
