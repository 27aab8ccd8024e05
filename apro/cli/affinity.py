"""``apro affinity``: the paper's Fig. 3 for one pixel: tree filter, LP and GP affinity maps."""
from __future__ import annotations

import time

import torch.nn.functional as F

from .._atomic import atomic_path
from . import CommandError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "affinity",
        help="affinity map of one pixel under the tree filter, LP and GP (paper Fig. 3)",
        description="Draw the affinity of one pixel to all others under the tree filter, LP and GP.",
    )
    p.add_argument("image", metavar="IMAGE", help="RGB image file")
    p.add_argument("--pixel", nargs=2, type=int, required=True, metavar=("X", "Y"),
                   help="the pixel (column, row) in the original image")
    p.add_argument("-o", "--output", required=True, metavar="FIG.png", help="figure PNG to write")
    p.add_argument("--size", type=int, default=256,
                   help="longer side the image is resized to before computing (default 256; 0 = as is)")
    p.add_argument("--zeta-g", type=float, default=0.3, help="GP zeta_g (default 0.3 so the map is visible at 256 px; the released SOLOv2 stage-1 value is 0.01)")
    p.add_argument("--zeta-s", type=float, default=0.15, help="LP zeta_s (default 0.15)")
    p.add_argument("--sigma", type=float, default=0.1, help="tree filter sigma (default 0.1; TEL trains with 0.02)")
    p.add_argument("--iterations", type=int, default=20, help="LP steps (default 20)")
    p.add_argument("--kernel-size", type=int, default=5, help="LP window (default 5)")
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..figures import affinity_figure
    from .refine import check_output_path, image_tensor, load_image

    for name in ("zeta_g", "zeta_s", "sigma"):
        if not getattr(args, name) > 0:
            raise CommandError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.iterations < 0:
        raise CommandError(f"--iterations must be >= 0, got {args.iterations}")
    if args.kernel_size < 1 or args.kernel_size % 2 == 0:
        raise CommandError(f"--kernel-size must be odd and >= 1, got {args.kernel_size}")
    if args.size < 0:
        raise CommandError(f"--size must be >= 0, got {args.size}")
    check_output_path(args.output)
    rgb = load_image(args.image)
    h, w = rgb.shape[:2]
    x, y = args.pixel
    if not (0 <= x < w and 0 <= y < h):
        raise CommandError(f"--pixel {x} {y} is outside the {w}x{h} image; give X in [0, {w - 1}], Y in [0, {h - 1}]")
    image = image_tensor(rgb)
    scale = 1.0 if args.size == 0 else min(1.0, args.size / max(h, w))
    if scale < 1.0:
        hw = (max(2, round(h * scale)), max(2, round(w * scale)))
        image = F.interpolate(image[None], size=hw, mode="bilinear", align_corners=False, antialias=True)[0].clamp(0, 1)
        x, y = min(hw[1] - 1, int(x * hw[1] / w)), min(hw[0] - 1, int(y * hw[0] / h))
    start = time.perf_counter()
    with atomic_path(args.output, suffix=".png") as tmp:
        maps = affinity_figure(image, (x, y), tmp, zeta_g=args.zeta_g, zeta_s=args.zeta_s, sigma=args.sigma,
                               kernel_size=args.kernel_size, iterations=args.iterations)
    reach = ", ".join(f"{k} {float((v > 0.5).float().mean()) * 100:.1f}%" for k, v in maps.items())
    print(f"wrote {args.output} ({image.shape[2]}x{image.shape[1]} grid, pixel ({x}, {y}); "
          f"share of pixels with affinity > 0.5: {reach}; {time.perf_counter() - start:.1f} s)")
    return 0
