"""``apro demo``: refine a box on a photo bundled with scikit-image and write the overlay PNG.

Runs offline right after ``pip install``: the image is ``skimage.data.astronaut()`` (shipped
inside scikit-image), the box is built in.
"""
from __future__ import annotations

import os
import time

import numpy as np

from . import CommandError

# (x0, y0, x1, y1) of the astronaut's head and hair in skimage.data.astronaut() (512 x 512)
DEMO_BOX = (146, 10, 316, 208)


def add_parser(subparsers) -> None:
    from ..refine import RefineSettings

    p = subparsers.add_parser(
        "demo",
        help="refine a built-in box on a bundled photo and write the overlay PNG",
        description="Run `apro refine` (method apro) on scikit-image's astronaut photo with a built-in box.",
    )
    p.add_argument("-o", "--output", default="apro-demo.png", metavar="OUT.png",
                   help="overlay PNG to write (default ./apro-demo.png)")
    p.add_argument("--method", default="apro", help="box method (default apro; see `apro refine -h`)")
    p.add_argument("--steps", type=int, default=RefineSettings().steps, help="Adam steps")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def demo_image() -> np.ndarray:
    """The demo photo, ``(512, 512, 3)`` uint8 RGB, loaded from scikit-image's bundled data."""
    try:
        from skimage import data
    except ImportError:
        raise CommandError("apro demo needs scikit-image (pip install scikit-image)") from None
    return np.ascontiguousarray(data.astronaut())


def run(args) -> int:
    from ..figures import overlay
    from ..refine import BOX_METHODS, RefineSettings, refine_box
    from .refine import check_output_path, image_tensor, write_pngs

    if args.method not in BOX_METHODS:
        raise CommandError(f"unknown --method {args.method!r}; choose one of {', '.join(BOX_METHODS)}")
    if args.steps < 1:
        raise CommandError(f"--steps must be >= 1, got {args.steps}")
    check_output_path(args.output)
    start = time.perf_counter()
    rgb = demo_image()
    settings = RefineSettings(steps=args.steps)
    prob = refine_box(image_tensor(rgb), DEMO_BOX, args.method, settings, progress=not args.quiet)
    mask = (prob >= 0.5).numpy()
    write_pngs({args.output: overlay(rgb, mask, box=DEMO_BOX)})
    seconds = time.perf_counter() - start
    print(f"wrote {os.path.abspath(args.output)} (astronaut photo, box {DEMO_BOX}, method {args.method}) "
          f"in {seconds:.1f} s")
    return 0
