"""Data order that is a pure function of (seed, step): resumable mid-epoch and world-size aware.

The training sampler draws each epoch's permutation from (seed, epoch), cuts it into global
batches and hands each rank its slice. Every sample comes with an augmentation seed derived from
(seed, epoch, index), which ``SegmentationDataset`` uses to seed its transform; so a resumed run,
a run with a different number of workers, and an uninterrupted run see the same pixels.
"""

from __future__ import annotations

import functools
import os

import torch
from torch.utils.data import DataLoader

from ctxseg.engine.distributed import DistInfo


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_033 + index)
    return int(torch.randint(0, 2**62, (1,), generator=g))


class TrainBatchSampler:
    """Yields lists of ``(index, augmentation_seed)``: this rank's part of each global batch.

    Args:
        n: dataset length.
        batch_size: global batch size (divisible by the world size).
        seed: run seed.
        dist: rank and world size.
    """

    def __init__(self, n: int, batch_size: int, seed: int, dist: DistInfo = DistInfo()):
        if batch_size % dist.world_size:
            raise ValueError(
                f"batch_size {batch_size} must be divisible by the number of processes "
                f"({dist.world_size})"
            )
        if n < batch_size:
            raise ValueError(f"the training set has {n} images, fewer than batch_size {batch_size}")
        self.n, self.batch_size, self.seed, self.dist = n, batch_size, seed, dist
        self.per_rank = batch_size // dist.world_size
        self.epoch, self.start = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.batch_size  # drop the last, partial batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch, and how many of its batches were already consumed (for resume)."""
        self.epoch, self.start = epoch, start_batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start

    def order(self, g: torch.Generator) -> torch.Tensor:
        """This epoch's sample order (a permutation of range(n)), drawn from ``g``."""
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        perm = self.order(g).tolist()
        lo = self.dist.rank * self.per_rank
        for b in range(self.start, self.batches_per_epoch):
            chunk = perm[b * self.batch_size : (b + 1) * self.batch_size][lo : lo + self.per_rank]
            yield [(i, augmentation_seed(self.seed, self.epoch, i)) for i in chunk]


class ClassAwareBatchSampler(TrainBatchSampler):
    """Batches in which images share classes, for contrast between images of the same class.

    Each epoch every image draws one *key class* at random from its tags (the dataset's
    background class excluded), images are grouped by key class in random order, the groups are
    cut into runs of ``group_size`` consecutive images and the runs are shuffled into batches. So
    every image is seen once per epoch, as with ``TrainBatchSampler``, and all but at most one
    run per key class hold ``group_size`` images that share their key class. Images without a
    tag form their own group. Like ``TrainBatchSampler`` the order is a pure function of
    (seed, epoch): resumable and the same for any world size.

    Args:
        tags: (n, C) multi-hot image-level tags of the training set.
        batch_size, seed, dist: as for ``TrainBatchSampler``.
        group_size: images per run that share a key class (2 pairs every image with another).
        background: index of the background class, never a key class (None: no such class).
    """

    def __init__(self, tags: torch.Tensor, batch_size: int, seed: int, dist: DistInfo = DistInfo(),
                 group_size: int = 2, background: int | None = None):
        super().__init__(len(tags), batch_size, seed, dist)
        if group_size < 1:
            raise ValueError(f"class_group_size must be >= 1, got {group_size}")
        self.tags = tags.bool().clone()
        if background is not None:
            self.tags[:, background] = False
        self.group_size = group_size

    def order(self, g: torch.Generator) -> torch.Tensor:
        n, c = self.tags.shape
        # Key class: the tag with the largest random key; untagged images get key class c.
        noise = torch.rand(n, c, generator=g)
        key = torch.where(self.tags, noise, -1.0).argmax(1)
        key = torch.where(self.tags.any(1), key, c)
        class_rank = torch.randperm(c + 1, generator=g)[key]  # classes in random order
        within = torch.randperm(n, generator=g)
        grouped = within[torch.argsort(class_rank[within], stable=True)]
        # Runs of group_size consecutive images of one key class; shuffle the runs.
        k = class_rank[grouped]
        position = torch.arange(n)
        new_group = torch.ones(n, dtype=torch.bool)
        new_group[1:] = k[1:] != k[:-1]
        group_begin = torch.cummax(torch.where(new_group, position, 0), 0).values
        run_id = torch.cumsum(((position - group_begin) % self.group_size == 0).long(), 0) - 1
        run_order = torch.randperm(int(run_id[-1]) + 1, generator=g)
        return grouped[torch.argsort(run_order[run_id], stable=True)]


def train_loader(dataset, sampler: TrainBatchSampler, num_workers: int, pin_memory: bool,
                 worker_nice: int = 19) -> DataLoader:
    """The training loader. It gets a generator of its own: a DataLoader draws a seed for its
    workers from the global RNG each time an iterator starts (each epoch), and a resumed run
    starts one mid-epoch, which would shift the global random stream that methods sample anchors
    from. Our augmentation seeds come from the sampler, so the workers' seed does not matter."""
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=functools.partial(_lower_priority, nice=worker_nice) if num_workers > 0 else None,
    )


def _lower_priority(worker_id: int, nice: int = 19) -> None:
    """Run a loader worker ``nice`` steps lower in CPU priority (19, the lowest, by default): it
    then loads in the time the training step leaves idle, instead of taking cores from the step's
    threads. On 2 cores (CamVid, 180x240 crops, batch 8, 2 torch threads, 2 workers) the step took
    21 % longer than on a batch held in memory with workers at normal priority, 6-9 % with them at
    nice 19, and waited for data 5-7 % of its time (``benchmarks/bench_loader.py --train-step
    --step-nice 0 19``)."""
    if nice and hasattr(os, "nice"):
        os.nice(nice)


def eval_loader(dataset, batch_size: int, num_workers: int, dist: DistInfo = DistInfo()) -> DataLoader:
    """Each rank evaluates a disjoint strided share (no padding duplicates, so the all-reduced
    confusion matrix counts every image exactly once)."""
    indices = list(range(dist.rank, len(dataset), dist.world_size))
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                      worker_init_fn=_lower_priority if num_workers > 0 else None)
