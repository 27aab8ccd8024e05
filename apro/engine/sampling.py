"""Data order and augmentation as functions of ``(seed, epoch, index)`` only.

That is what makes a mid-epoch resume exact whatever ``num_workers`` is: the resumed run
builds a new loader starting at the same position and every item draws the same randomness.
"""
from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def item_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729) % (2**31 - 1)


class EpochSampler(Sampler):
    """The samples of one epoch for one rank: a permutation seeded by ``(seed, epoch)``,
    split across ranks like ``DistributedSampler(drop_last=True)``, starting at ``start``.
    Yields ``(epoch, index)`` so that :class:`SeededItems` can seed each item."""

    def __init__(self, length, seed, epoch, rank, world_size, start=0):
        g = torch.Generator().manual_seed(seed + 1_000 * epoch)
        order = torch.randperm(length, generator=g).tolist()
        per_rank = length // world_size
        self.indices = order[rank * per_rank:(rank + 1) * per_rank][start:]
        self.epoch = epoch

    def __iter__(self):
        return ((self.epoch, i) for i in self.indices)

    def __len__(self):
        return len(self.indices)


@contextmanager
def _seeded_global_rng(seed: int):
    """Seed torch, NumPy and ``random`` for one item, restoring the caller's states after."""
    py, nps = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(nps)


class SeededItems(Dataset):
    """Wraps a dataset so item ``(epoch, index)`` draws its augmentation from an RNG seeded
    by ``(seed, epoch, index)``: the same sample whichever worker loads it, and when."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        with _seeded_global_rng(item_seed(self.seed, epoch, index)):
            return self.dataset[index]


def to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj
