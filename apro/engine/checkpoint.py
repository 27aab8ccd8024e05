"""Checkpoints: atomic writes, loading with clear errors, and the RNG states they carry.

A checkpoint is written atomically (temporary file in the same directory, fsync, rename), so
a crash while saving never leaves a truncated checkpoint behind.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from .._atomic import atomic_path
from .errors import CheckpointError

CHECKPOINT_PREFIX = "checkpoint_"
CHECKPOINT_SUFFIX = ".pt"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(state: dict, path) -> Path:
    """Write ``state`` with ``torch.save`` atomically: a temporary file in the same directory,
    flushed and fsynced, then renamed over ``path``. Whatever fails midway, ``path`` holds
    either its previous content or the complete new one, and no temporary file is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`apro.engine.train`; ``path`` may be a file or a run directory
    (its latest checkpoint is used). Raises :class:`CheckpointError` naming the file."""
    path = Path(path)
    if path.is_dir():
        found = list_checkpoints(path)
        if not found:
            raise CheckpointError(f"{path} contains no {CHECKPOINT_PREFIX}*{CHECKPOINT_SUFFIX} files to resume from")
        path = found[-1]
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for a damaged or foreign file
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"checkpoint {path} is not readable ({type(err).__name__}: {first})") from None
    missing = {"model", "step", "config"} - set(state if isinstance(state, dict) else ())
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(sorted(missing))}; it was not written by apro train")
    state["path"] = str(path)
    return state


def checkpoint_path(out_dir, step: int) -> Path:
    return Path(out_dir) / f"{CHECKPOINT_PREFIX}{step:08d}{CHECKPOINT_SUFFIX}"


def list_checkpoints(out_dir) -> list:
    """Complete checkpoints in ``out_dir`` ordered by step (temporary files are ignored)."""
    found = []
    for p in Path(out_dir).glob(f"{CHECKPOINT_PREFIX}*{CHECKPOINT_SUFFIX}"):
        stem = p.name[len(CHECKPOINT_PREFIX):-len(CHECKPOINT_SUFFIX)]
        if stem.isdigit():
            found.append((int(stem), p))
    return [p for _, p in sorted(found)]


def rng_state() -> dict:
    """This process's RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
