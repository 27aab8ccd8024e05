"""Checks at the public boundary: every message names the argument and what is expected."""
from __future__ import annotations

import math

import numpy as np
import torch


def check_float_tensor(x, name: str, ndim: int, layout: str) -> torch.Tensor:
    """Require a floating-point tensor with ``ndim`` dims and only finite values."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise TypeError(
            f"{name} must be a floating-point tensor of shape {layout}, got dtype {x.dtype}; "
            f"convert it with {name}.float()"
        )
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got shape {tuple(x.shape)}")
    if any(s == 0 for s in x.shape):
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    if not _all_finite(x):
        raise ValueError(f"{name} contains NaN or inf values; replace them before propagating")
    return x


def _all_finite(x: torch.Tensor) -> bool:
    # A NaN or inf anywhere makes the sum non-finite, so a finite sum settles it in one cheap
    # reduction; only a non-finite sum (which may also be overflow) needs the full check.
    # CPU float32/64 tensors are summed by NumPy: a torch reduction would wake torch's
    # OpenMP threads, whose spinning then slows the kernels that follow on small machines.
    x = x.detach()
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        a = x.numpy()
        return bool(np.isfinite(a.sum())) or bool(np.isfinite(a).all())
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def check_same_grid(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    """Require equal batch size and spatial size for two ``(B, *, H, W)`` tensors."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{b_name} has batch size {b.shape[0]} but {a_name} has {a.shape[0]}; they must match")
    if a.shape[-2:] != b.shape[-2:]:
        raise ValueError(
            f"{b_name} has spatial size {tuple(b.shape[-2:])} but {a_name} has {tuple(a.shape[-2:])}; "
            f"resize one to the other first"
        )


def check_positive(value, name: str) -> float:
    """Require a finite real number > 0."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def check_threshold(value, name: str) -> float:
    """Require a test threshold on a probability: a number strictly between 0 and 1 (NaN refused)."""
    v = float(value)
    if not 0.0 < v < 1.0:
        raise ValueError(f"{name} must be in (0, 1) (predictions are probabilities), got {value!r}")
    return v


def check_kernel_size(value, name: str = "kernel_size") -> int:
    """Require an odd integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an odd integer >= 1, got {value!r}")
    if value < 1 or value % 2 == 0:
        raise ValueError(f"{name} must be an odd integer >= 1 (e.g. 3 or 5), got {value}")
    return value


def check_count(value, name: str, minimum: int = 0) -> int:
    """Require an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return value
