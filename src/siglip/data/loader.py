"""The training loader: global step k -> this rank's slice of samples [k*B, (k+1)*B) of the source's order.

Each item the DataLoader fetches is one whole local batch, named by its global step, so the order of batches
does not depend on the number of workers, and a loader started at `start_step` yields exactly the batches a
fresh loader yields from that step on. Rank r of D takes the contiguous slice [k*B + r*b, k*B + (r+1)*b) of
global batch k (b = local_batch, B = b*D): across ranks and steps every index is read once, none skipped.

Bad samples: a sample whose reading or transform raises BadSample is counted by kind (Batch.bad), logged with its
key (rate-limited), and its slot is refilled with the training sample at an index drawn from a generator seeded
by (seed, step, rank, slot, attempt). The draw depends on nothing else, so a refilled batch is the same in a
resumed run, each rank refills its own slots without talking to the others, and every batch stays full. The
refill repeats one sample of the stream (with rare bad samples, a negligible duplicate). With strict=True the
first bad sample is raised instead, with its key.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from siglip.data.sample import BadSample, BadSampleLog, Sample
from siglip.data.source import Source
from siglip.errors import UserError

MAX_REFILLS = 64
"""Consecutive bad draws for one slot before the loader gives up: the data is then mostly unreadable."""
ENDLESS_DRAW_RANGE = 2**53
"""Refill draws for an endless source come from [0, 2**53): any index is a valid sample there."""


@dataclass
class Batch:
    """One rank's share of one global batch."""

    tensors: dict[str, torch.Tensor]
    """The transform's outputs, stacked: each (local_batch, ...)."""
    positive_ids: torch.Tensor
    """(local_batch,) int64: pairs with equal ids are positives (see Sample.positive_id)."""
    bad: dict[str, int]
    """Bad samples met (and replaced) while filling this batch, by kind."""
    step: int
    """The global step this batch belongs to."""
    keys: list[str] = field(default_factory=list)
    """The keys of the local_batch samples, in order (for logs and checks)."""


class _Failure:
    """A BadSample caught in a worker under strict: carried to the main process, raised there as it was."""

    def __init__(self, error: BadSample):
        self.error = error


class _StepBatches(Dataset):
    """Map-style dataset: item `step` is this rank's local batch of global step `step`."""

    def __init__(self, source: Source, transform: Callable[[Sample], dict[str, torch.Tensor]], local_batch: int,
                 rank: int, world_size: int, seed: int, strict: bool):
        self.source, self.transform = source, transform
        self.local_batch, self.rank, self.world_size = local_batch, rank, world_size
        self.seed, self.strict = seed, strict
        self.log = BadSampleLog()
        size = source.__len__()
        self.draw_range = size if size is not None else ENDLESS_DRAW_RANGE

    def __getitem__(self, step: int) -> Batch | _Failure:
        first = (step * self.world_size + self.rank) * self.local_batch
        outputs, ids, keys, bad = [], [], [], Counter()
        for slot in range(self.local_batch):
            index = first + slot
            for attempt in range(MAX_REFILLS + 1):
                try:
                    sample = self.source.train_sample(index)
                    output = self.transform(sample)
                    break
                except BadSample as error:
                    if self.strict:
                        return _Failure(error)
                    bad[error.kind] += 1
                    self.log.record(error)
                    draw = np.random.default_rng([self.seed, step, self.rank, slot, attempt])
                    index = int(draw.integers(self.draw_range))
            else:
                raise UserError(f"{MAX_REFILLS + 1} bad samples in a row while filling step {step} "
                                f"(kinds: {dict(bad)}); the data source {self.source.name} is mostly unreadable")
            outputs.append(output)
            ids.append(sample.positive_id)
            keys.append(sample.key)
        tensors = {name: torch.stack([output[name] for output in outputs]) for name in outputs[0]}
        return Batch(tensors=tensors, positive_ids=torch.tensor(ids, dtype=torch.int64), bad=dict(bad), step=step,
                     keys=keys)


def _as_is(item):
    return item


def _one_thread(worker_id: int) -> None:
    # Workers each running torch with every core would fight the training process for the same cores.
    torch.set_num_threads(1)


def make_train_loader(source: Source, *, transform: Callable[[Sample], dict[str, torch.Tensor]], local_batch: int,
                      rank: int, world_size: int, start_step: int, seed: int, num_workers: int,
                      strict: bool = False) -> Iterator[Batch]:
    """Endless iterator of this rank's batches for global steps start_step, start_step + 1, ...

    transform: Sample -> {name: tensor}, run in the DataLoader workers; it must be picklable (a module-level
        function or an object of a module-level class) and deterministic for resume to be exact. It may raise
        BadSample to refuse a sample.
    local_batch: samples per rank per step (b); the global batch is B = b * world_size.
    rank, world_size: this process's place among the ranks; ranks share no state.
    start_step: the first global step to yield: resume from a checkpoint taken after start_step steps.
    seed: seeds the refill draws for bad samples (the source's order comes from the source's own seed).
    num_workers: DataLoader worker processes (0: read in this process).
    strict: raise the first BadSample (with its key) instead of skipping it.
    """
    for name, value, least in (("local_batch", local_batch, 1), ("world_size", world_size, 1),
                               ("start_step", start_step, 0), ("num_workers", num_workers, 0)):
        if not isinstance(value, int) or value < least:
            raise UserError(f"{name} must be an integer >= {least}, got {value!r}")
    if not 0 <= rank < world_size:
        raise UserError(f"rank must lie in 0 ... {world_size - 1} for world_size {world_size}, got {rank}")
    dataset = _StepBatches(source, transform, local_batch, rank, world_size, seed, strict)
    # Starting an iteration draws the workers' base seed from `generator`, or from torch's global generator when
    # there is none: that draw would put a resumed run (whose loader starts after the RNG is restored) one random
    # number ahead of an uninterrupted one. The loader's own generator leaves the global one alone.
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=None, sampler=itertools.count(start_step), num_workers=num_workers,
                        collate_fn=_as_is, worker_init_fn=_one_thread if num_workers else None, generator=generator)
    return _batches(loader)


def _batches(loader: DataLoader) -> Iterator[Batch]:
    # A generator: when the caller drops it, the DataLoader iterator goes too and its workers are shut down.
    for item in loader:
        if isinstance(item, _Failure):
            raise item.error
        yield item
