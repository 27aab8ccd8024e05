"""Per-image cache of a frozen backbone's features (the ``cache_backbone`` option of the box models).

A frozen backbone gives an image the same features at every step, and on a CPU they are
a third to a half of a training step. Each image's features are computed on the image alone
(padded to a multiple of 32) and zero-padded to the batch, so batch padding never changes them.
With only the first ``k`` stages frozen (``frozen_stages=k``, 1 <= k < 4) the features of
stages 1..k are cached and the later, trained stages run on them at every step, per image.

With a cache folder the features also outlive the run: every run of an ablation (same frozen
backbone, same images, sizes and flips) then computes them once. A file is named by a hash of
the backbone's weights and of the exact input pixels, so a folder can be shared between
datasets, backbones and runs, and never serves features of other weights or pixels.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from .._atomic import atomic_path
from .backbones import STRIDES


def check_cacheable(backbone, cache_backbone: bool, frozen_stages) -> bool:
    """``cache_backbone`` as a bool, refused unless at least the stem and stage 1 are frozen."""
    if cache_backbone and getattr(backbone, "frozen_stages", 0) not in (1, 2, 3, 4):
        raise ValueError("cache_backbone=True needs a frozen backbone prefix: frozen_stages=4 (the whole "
                         f"backbone) or 1..3 (stem and first stages), got frozen_stages={frozen_stages!r}")
    if cache_backbone and backbone.frozen_stages < 4 and not hasattr(backbone, "forward_stages"):
        raise ValueError(f"cache_backbone with frozen_stages={frozen_stages} needs a backbone with "
                         f"forward_stages(); {type(backbone).__name__} has none")
    return bool(cache_backbone)


class FeatureFolder:
    """A folder of cached backbone features, one file per (backbone weights, input pixels)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._weights: str | None = None

    def file(self, backbone, pixels: torch.Tensor) -> Path:
        """The file of ``backbone``'s features of ``pixels`` ``(1, 3, h, w)`` (the weights are
        hashed once: the backbone is frozen)."""
        if self._weights is None:
            self._weights = _weights_digest(backbone)
        return _disk_path(self.path, self._weights, pixels)


def check_cache_dir(cache_dir, cache_backbone: bool) -> FeatureFolder | None:
    """``cache_dir`` as a :class:`FeatureFolder` (created), or None; refused without ``cache_backbone``."""
    if cache_dir is None:
        return None
    if not isinstance(cache_dir, (str, os.PathLike)) or not str(cache_dir):
        raise ValueError(f"cache_dir must be a folder path, got {cache_dir!r}")
    if not cache_backbone:
        raise ValueError("cache_dir needs cache_backbone=True (it keeps the cached backbone features on disk)")
    path = Path(cache_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"cache_dir {str(path)!r} exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)
    return FeatureFolder(path)


def _hash_tensor(digest, tensor: torch.Tensor, name: str = "") -> None:
    t = tensor.detach().cpu().contiguous()
    digest.update(f"{name + ':' if name else ''}{t.dtype}:{tuple(t.shape)}".encode())
    if t.numel():
        digest.update(t.view(torch.uint8).numpy().tobytes())


def _weights_digest(backbone) -> str:
    """Hash of the frozen part's weights: the whole backbone, or (``frozen_stages < 4``) the
    stem and frozen stages, tagged with their number (the trained stages change every step)."""
    stages = backbone.frozen_stages
    digest = hashlib.blake2b(type(backbone).__name__.encode(), digest_size=16)
    if stages == 4:
        state = backbone.state_dict()
    else:
        digest.update(f"frozen_stages={stages}".encode())
        state = {}
        for index, module in enumerate(backbone.stage_modules()[:stages + 1]):
            state.update({f"{index}.{k}": v for k, v in module.state_dict().items()})
    for name, tensor in state.items():
        _hash_tensor(digest, tensor, name)
    return digest.hexdigest()


def _disk_path(folder: Path, weights: str, pixels: torch.Tensor) -> Path:
    digest = hashlib.blake2b(weights.encode(), digest_size=20)
    _hash_tensor(digest, pixels)
    name = digest.hexdigest()
    return folder / name[:2] / f"{name}.pt"


def _load(path: Path, device) -> list[torch.Tensor] | None:
    try:
        feats = torch.load(path, map_location=device, weights_only=True)
    except Exception:  # missing, or damaged (the writes are atomic, so not partial): recompute it
        return None
    if not isinstance(feats, list) or not all(isinstance(f, torch.Tensor) for f in feats):
        return None
    return feats


def cached_backbone_features(backbone, x: torch.Tensor, targets, cache: dict,
                             folder: FeatureFolder | None = None) -> list[torch.Tensor]:
    """Backbone features ``[(B, C_l, H / s_l, W / s_l)]`` of the normalised batch ``x`` from ``cache``.

    ``cache`` maps ``(image_id, size, flipped)`` of a target to that image's features (float16)
    of the frozen stages; missing entries are read from ``folder`` when it holds them, else
    computed without gradient, and stored (in ``folder`` too when given). Trained later stages
    (``backbone.frozen_stages < 4``) then run on each image's cached features, with gradient.
    A dataset item must be a function of those three keys (true of ``CocoBoxDataset``: no
    photometric augmentation).
    """
    stages = backbone.frozen_stages
    per_image = []
    for b, target in enumerate(targets):
        try:
            key = (int(target["image_id"]), tuple(int(v) for v in target["size"]), bool(target.get("flipped", False)))
        except (KeyError, TypeError) as err:
            raise ValueError(f"cache_backbone needs targets[{b}] to hold 'image_id' and 'size' "
                             f"(as apro.data.CocoBoxDataset items do): {err}") from None
        cached = cache.get(key)
        if cached is None:
            h = -(-key[1][0] // 32) * 32
            w = -(-key[1][1] // 32) * 32
            pixels = x[b:b + 1, :, :h, :w]
            path = None
            if folder is not None:
                path = folder.file(backbone, pixels)
                cached = _load(path, x.device)
            if cached is None:
                with torch.no_grad():
                    frozen = backbone(pixels) if stages == 4 else backbone.forward_stages(pixels, 1, stages)
                    cached = [f.to(torch.float16) for f in frozen]
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_path(path) as tmp:
                        torch.save([f.cpu() for f in cached], tmp)
            cache[key] = cached
        if stages < 4:
            cached = list(cached) + backbone.forward_stages(cached[-1].to(x.dtype), stages + 1, 4)
        per_image.append(cached)
    out = []
    for level in range(len(per_image[0])):
        size = [-(-x.shape[-2] // STRIDES[level]), -(-x.shape[-1] // STRIDES[level])]
        batch = x.new_zeros((x.shape[0], per_image[0][level].shape[1], *size))
        for b, feats in enumerate(per_image):
            f = feats[level]
            batch[b, :, :f.shape[-2], :f.shape[-1]] = f[0].to(x.dtype)
        out.append(batch)
    return out
