"""Per-image work spread over threads; the numba kernels and NumPy's sort release the GIL."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

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
