"""Reading image files as 8-bit RGB arrays, the one way every part of apro reads images.

``Image.open(path).convert("RGB")`` alone gets two common inputs wrong: a 16-bit greyscale
PNG (mode ``I;16``) is clipped to almost all white, and a phone JPEG's EXIF orientation is
ignored, so the pixels apro sees are rotated against what every viewer shows (and box
coordinates read off a viewer land in the wrong place). :func:`read_rgb` applies the EXIF
orientation and scales high-bit-depth images to 8 bits.
"""
from __future__ import annotations

import os
import warnings

import numpy as np

__all__ = ["UnreadableImageError", "read_rgb"]

# Pillow's 16-bit greyscale modes; "I" (32-bit signed) is what older Pillow versions and some
# TIFF files give for 16-bit data.
_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class UnreadableImageError(OSError):
    """An image file exists but cannot be decoded, or holds values apro cannot map to 8-bit RGB."""


def _to_uint8(values: np.ndarray, full_scale: int) -> np.ndarray:
    """Integer array in ``[0, full_scale]`` -> uint8 by rounding ``v * 255 / full_scale``."""
    v = values.astype(np.int64)
    return ((v * 255 + full_scale // 2) // full_scale).astype(np.uint8)


def _grey_to_uint8(img, path: str) -> np.ndarray:
    """Single-channel high-bit-depth or float image -> ``(H, W)`` uint8."""
    values = np.asarray(img)
    if img.mode in _UINT16_MODES:
        return _to_uint8(values, 65535)
    if img.mode == "I":
        lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise UnreadableImageError(
                f"image file '{path}' is a 32-bit integer image with values in [{lo}, {hi}]; apro reads 8- and "
                "16-bit images only: rescale it to 0..255 or 0..65535 and save it as PNG"
            )
        return _to_uint8(values, 65535)
    # mode "F": 32-bit float
    values = values.astype(np.float64)
    if not np.all(np.isfinite(values)) or values.min(initial=0.0) < 0.0 or values.max(initial=0.0) > 1.0:
        raise UnreadableImageError(
            f"image file '{path}' is a floating-point image with values outside [0, 1]; save it as an 8- or "
            "16-bit PNG instead"
        )
    return np.round(values * 255.0).astype(np.uint8)


def read_rgb(path, *, exif_orientation: bool = True) -> np.ndarray:
    """Read an image file as ``(H, W, 3)`` uint8 RGB (C-contiguous, writable), the way image viewers show it.

    * EXIF orientation is applied (``PIL.ImageOps.exif_transpose``), so ``H`` and ``W`` are the
      height and width a viewer shows; pass ``exif_orientation=False`` for the stored pixel grid.
    * 16-bit greyscale (``I;16``, ``I;16B``, ``I`` with values in 0..65535) is scaled to 8 bits
      (``round(v * 255 / 65535)``), as is 48-bit RGB (Pillow decodes it to 8-bit RGB); float
      images (``F``) must hold values in [0, 1].
    * Greyscale (``L``, ``1``) is repeated over the three channels, palette images use their
      palette colours, CMYK/YCbCr are converted, and an alpha channel (``LA``, ``RGBA``, ``PA``)
      is dropped: the colour values are kept as stored, not composited onto a background.
    * For a multi-frame file (GIF, TIFF) the first frame is read.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
        UnreadableImageError: (an ``OSError``) the file is not an image Pillow can decode, is
            truncated, too large to decode safely, or holds values that do not map to 8 bits;
            the message names the file.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file '{path}' does not exist; check the path")
    if os.path.isdir(path):
        raise UnreadableImageError(f"image file '{path}' is a folder, not an image file")
    try:
        with warnings.catch_warnings():
            # Pillow warns (DecompressionBombWarning) above ~89 M pixels and raises above twice that.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                if exif_orientation:
                    img = ImageOps.exif_transpose(img)
                mode = img.mode
                if mode in _UINT16_MODES or mode in ("I", "F"):
                    grey = _grey_to_uint8(img, path)
                    return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
                if mode != "RGB":
                    # convert() maps palette colours, drops alpha (RGBA/LA/PA -> RGB keeps the
                    # colour values), repeats L over channels, converts CMYK/YCbCr.
                    if mode in ("P", "PA"):
                        img = img.convert("RGBA")
                    img = img.convert("RGB")
                rgb = np.array(img, dtype=np.uint8)  # a writable copy (torch.from_numpy needs one)
    except UnreadableImageError:
        raise
    except UnidentifiedImageError:
        raise UnreadableImageError(
            f"cannot read image file '{path}': not an image format Pillow recognises; give a PNG or JPEG file"
        ) from None
    except Image.DecompressionBombError as err:
        raise UnreadableImageError(f"cannot read image file '{path}': {err}") from None
    except (OSError, ValueError, SyntaxError) as err:
        # truncated or corrupt data (OSError "image file is truncated", broken chunks, bad EXIF)
        raise UnreadableImageError(
            f"cannot read image file '{path}': {err.__class__.__name__}: {err}; the file may be truncated or corrupt"
        ) from None
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise UnreadableImageError(f"image file '{path}' decoded to an array of shape {rgb.shape}, not (H, W, 3)")
    return rgb
