"""Per-image work spread over threads; the numba kernels and NumPy's sort release the GIL."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch


def default_workers() -> int:
    """Threads used for per-image kernels: torch's intra-op thread count."""
    return max(1, torch.get_num_threads())


def map_images(fn, count: int, num_workers: int | None):
    """Run ``fn(i)`` for each image index, on a thread pool (the kernels release the GIL)."""
    workers = min(count, num_workers or default_workers())
    if workers <= 1:
        return [fn(i) for i in range(count)]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, range(count)))


@contextmanager
def parallel_calls(workers: int):
    """``with parallel_calls(k) as run: run(fn, items)`` applies ``fn`` to the items on
    ``k`` threads (one pool for every ``run`` of the block), in order, and returns the list."""
    if workers <= 1:
        yield lambda fn, items: [fn(x) for x in items]
        return
    with ThreadPoolExecutor(workers) as pool:
        yield lambda fn, items: list(pool.map(fn, items))
