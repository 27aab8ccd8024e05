"""``apro refine``: one image + a box, points or scribbles -> a dense object mask (PNG 0/255).

Points file (``--points``): either a text file with one point per line, ``x y label``
(pixel coordinates, label ``1``/``object``/``fg`` or ``0``/``background``/``bg``; ``#`` starts a
comment), or JSON: a list of ``[x, y, label]`` or of ``{"x": .., "y": .., "label": ..}``,
optionally wrapped as ``{"points": [...]}``.

Scribbles (``--scribbles``): a PNG the size of the image holding label indices (a palette or
greyscale PNG): 0 = unlabeled, ``--object-index`` (default 1) = object, ``--background-index``
(default 2) = background.

Overlay (``--overlay``): the mask tinted blue with a yellow outline, the box green, object
scribbles/points red and background ones cyan; points are filled disks with a white ring.
Line widths grow with the image (about 1/250 of its longer side, at least 2 pixels).
"""
from __future__ import annotations

import json
import os
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from .._atomic import atomic_path
from . import CommandError

POINT_LABELS = {
    "1": 1, "object": 1, "obj": 1, "fg": 1, "foreground": 1,
    "0": 0, "background": 0, "bg": 0,
}


def add_parser(subparsers) -> None:
    from ..refine import BOX_METHODS, DEFAULT_LR, MODELS, RefineSettings

    d = RefineSettings()
    p = subparsers.add_parser(
        "refine",
        help="dense object mask of one image from a box, points or scribbles (no training data)",
        description="Fit a per-image prediction under a box or sparse-label loss and write the mask.",
    )
    p.add_argument("image", metavar="IMAGE", help="RGB image file (PNG, JPEG, ...)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--box", nargs=4, type=float, metavar=("X0", "Y0", "X1", "Y1"),
                   help="object box in pixels (x1, y1 exclusive)")
    g.add_argument("--points", metavar="FILE", help="points file: lines 'x y label' or JSON [[x, y, label], ...]")
    g.add_argument("--scribbles", metavar="PNG", help="label-index PNG: 0 unlabeled, object/background indices")
    p.add_argument("-o", "--output", required=True, metavar="MASK.png", help="output mask PNG (0 / 255)")
    p.add_argument("--overlay", metavar="OUT.png", help="also write the image with the mask drawn on it")
    p.add_argument("--method", default="apro",
                   help=f"loss: {', '.join(BOX_METHODS)} (boxes); points/scribbles: apro, gp, lp, gp-lp-c, "
                        f"lp-gp-c, treefilter, pce (default apro)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"Adam steps (default {d.steps})")
    p.add_argument("--size", type=int, default=d.size, help=f"longer side of the working grid (default {d.size})")
    p.add_argument("--lr", type=float, default=d.lr,
                   help="Adam learning rate (default: " + ", ".join(f"{v:g} for {k}" for k, v in DEFAULT_LR.items()) + ")")
    p.add_argument("--model", default=d.model, choices=MODELS,
                   help=f"per-image predictor: features (linear head over frozen EfficientNet-Lite0 features), "
                        f"logits (free per-pixel logits) or cnn (default {d.model})")
    p.add_argument("--device", default=d.device, help=f"torch device the prediction is fitted on, e.g. cuda (default {d.device})")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the predictor's initial weights (cnn)")
    p.add_argument("--object-index", type=int, default=1, help="scribble PNG index of the object (default 1)")
    p.add_argument("--background-index", type=int, default=2, help="scribble PNG index of the background (default 2)")
    p.add_argument("--point-radius", type=int, default=2, help="points are painted as disks of this radius (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


# ---------------------------------------------------------------------------------- inputs
def load_image(path: str) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB as a viewer shows it (EXIF orientation applied, 16-bit scaled;
    :func:`apro.data.images.read_rgb`), or CommandError saying what is wrong."""
    from ..data.images import read_rgb

    try:
        return read_rgb(path)
    except FileNotFoundError:
        raise CommandError(f"image file '{path}' does not exist; check the path") from None
    except OSError as err:  # UnreadableImageError and other read failures
        message = str(err).splitlines()[0] if str(err) else err.__class__.__name__
        raise CommandError(f"cannot read '{path}' as an image: {message}") from None


def image_tensor(rgb: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> ``(3, H, W)`` float32 in [0, 1]."""
    return torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0


def _parse_label(value, where: str) -> int:
    key = str(value).strip().lower()
    if key not in POINT_LABELS:
        raise CommandError(f"{where}: label {value!r} is not one of 1/object/fg or 0/background/bg")
    return POINT_LABELS[key]


def read_points(path: str) -> list:
    """``[(x, y, label), ...]`` (label 1 object / 0 background) from a points file."""
    if not os.path.isfile(path):
        raise CommandError(f"points file '{path}' does not exist; check the path")
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    points = []
    stripped = text.strip()
    if stripped.startswith("[") or stripped.startswith("{"):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise CommandError(f"points file '{path}' is not valid JSON ({err.msg} at line {err.lineno})") from None
        if isinstance(data, dict):
            data = data.get("points", [])
        if not isinstance(data, list):
            raise CommandError(f"points file '{path}': expected a list of [x, y, label]")
        for k, item in enumerate(data):
            where = f"points file '{path}', point {k}"
            try:
                x, y, lab = (item["x"], item["y"], item["label"]) if isinstance(item, dict) else item
                points.append((float(x), float(y), _parse_label(lab, where)))
            except (KeyError, TypeError, ValueError):
                raise CommandError(f"{where}: expected [x, y, label] or {{\"x\", \"y\", \"label\"}}, got {item!r}") from None
    else:
        for n, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.replace(",", " ").split()
            where = f"points file '{path}', line {n}"
            if len(parts) != 3:
                raise CommandError(f"{where}: expected 'x y label', got {line!r}")
            try:
                points.append((float(parts[0]), float(parts[1]), _parse_label(parts[2], where)))
            except ValueError:
                raise CommandError(f"{where}: x and y must be numbers, got {line!r}") from None
    if not points:
        raise CommandError(f"points file '{path}' holds no points; add lines 'x y label'")
    return points


def load_points(path: str, height: int, width: int, radius: int = 2) -> np.ndarray:
    """Sparse label map ``(H, W)`` uint8 (1 object, 0 background, 255 unlabeled) from a points file."""
    points = read_points(path)
    labels = np.full((height, width), 255, np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    for x, y, lab in points:
        if not (0 <= x < width and 0 <= y < height):
            raise CommandError(f"point ({x:g}, {y:g}) in '{path}' is outside the {width}x{height} image")
        labels[(xx - x) ** 2 + (yy - y) ** 2 <= max(radius, 0) ** 2 + 0.5] = lab
        labels[int(y), int(x)] = lab
    _require_both_classes(labels, f"points file '{path}'")
    return labels


def load_scribbles(path: str, height: int, width: int, object_index: int = 1, background_index: int = 2) -> np.ndarray:
    """Sparse label map ``(H, W)`` uint8 (1 object, 0 background, 255 unlabeled) from an index PNG."""
    from PIL import Image, UnidentifiedImageError

    if object_index == background_index or 0 in (object_index, background_index):
        raise CommandError("--object-index and --background-index must differ and not be 0 (0 means unlabeled)")
    if not os.path.isfile(path):
        raise CommandError(f"scribble file '{path}' does not exist; check the path")
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise CommandError(
                    f"scribble file '{path}' is a {im.mode} image; save it as a palette or greyscale PNG of "
                    f"label indices (0 unlabeled, {object_index} object, {background_index} background)"
                )
            idx = np.array(im)
    except (UnidentifiedImageError, OSError) as err:
        raise CommandError(f"cannot read scribble file '{path}' as an image ({err.__class__.__name__})") from None
    if idx.shape != (height, width):
        raise CommandError(
            f"scribble file '{path}' is {idx.shape[1]}x{idx.shape[0]} but the image is {width}x{height}; "
            f"draw the scribbles on an image of the same size"
        )
    known = np.isin(idx, (0, object_index, background_index))
    if not known.all():
        extra = sorted(set(np.unique(idx[~known]).tolist()))[:5]
        raise CommandError(
            f"scribble file '{path}' holds indices {extra} besides 0 (unlabeled), {object_index} (object) and "
            f"{background_index} (background); set --object-index/--background-index"
        )
    labels = np.full((height, width), 255, np.uint8)
    labels[idx == object_index] = 1
    labels[idx == background_index] = 0
    _require_both_classes(labels, f"scribble file '{path}'")
    return labels


def _require_both_classes(labels: np.ndarray, what: str) -> None:
    if not (labels == 1).any() and not (labels == 0).any():
        raise CommandError(f"{what} labels no pixel; mark object and background pixels")
    if not (labels == 1).any():
        raise CommandError(f"{what} marks no object pixel; add at least one object label")
    if not (labels == 0).any():
        raise CommandError(f"{what} marks no background pixel; add at least one background label")


# --------------------------------------------------------------------------------- outputs
def check_output_path(path: str, what: str = "output", inputs=()) -> None:
    """Refuse an output path in a missing folder, a folder, a name not ending in ``.png`` (the
    file holds PNG bytes) or one of the ``inputs`` (it would be overwritten)."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CommandError(f"{what} folder '{parent}' does not exist; create it or choose another path")
    if os.path.isdir(path):
        raise CommandError(f"{what} path '{path}' is a folder; give a file name ending in .png")
    if not path.lower().endswith(".png"):
        raise CommandError(f"{what} path '{path}' must end in .png (the file is written as PNG)")
    for source in inputs:
        if source and (os.path.abspath(source) == os.path.abspath(path)
                       or (os.path.exists(path) and os.path.exists(source) and os.path.samefile(source, path))):
            raise CommandError(f"{what} path '{path}' is the input file '{source}'; choose another name")


def write_pngs(outputs: dict) -> None:
    """Write ``{path: uint8 array}`` atomically: every file goes to a temp file in its target
    folder first and all are moved into place only after all were written."""
    from PIL import Image

    with ExitStack() as stack:
        for path, array in outputs.items():
            Image.fromarray(array).save(stack.enter_context(atomic_path(path, suffix=".png")), format="PNG")


def settings_from_args(args):
    from ..refine import MODELS, RefineSettings

    if args.steps < 1:
        raise CommandError(f"--steps must be >= 1, got {args.steps}")
    if args.size < 8:
        raise CommandError(f"--size must be >= 8 pixels, got {args.size}")
    if args.lr is not None and not args.lr > 0:
        raise CommandError(f"--lr must be > 0, got {args.lr}")
    if args.model not in MODELS:
        raise CommandError(f"unknown --model {args.model!r}; choose one of {', '.join(MODELS)}")
    device = getattr(args, "device", "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise CommandError(f"unknown --device {device!r}; give cpu or cuda (or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {device}: torch sees no CUDA device here; use --device cpu")
    return RefineSettings(steps=args.steps, size=args.size, lr=args.lr, model=args.model, seed=args.seed,
                          device=device)


# ------------------------------------------------------------------------------------ overlay
def line_width(height: int, width: int) -> int:
    """Overlay line width in pixels for an image: about 1/250 of its longer side, at least 2."""
    return max(2, round(max(height, width) / 250))


def draw_overlay(rgb: np.ndarray, mask: np.ndarray, box=None, labels=None, points=()) -> np.ndarray:
    """The ``--overlay`` picture ``(H, W, 3)`` uint8: mask tinted with an outline, box, scribbles,
    points (filled disks with a white ring), all drawn :func:`line_width` thick."""
    from scipy import ndimage

    from ..figures import BACKGROUND_LABEL_COLOUR, BOX_COLOUR, CONTOUR_COLOUR, OBJECT_LABEL_COLOUR, overlay

    h, w = mask.shape
    lw = line_width(h, w)
    out = overlay(rgb, mask)
    if mask.any():
        out[mask & ~ndimage.binary_erosion(mask, iterations=max(1, lw // 2), border_value=1)] = CONTOUR_COLOUR
    colours = {1: OBJECT_LABEL_COLOUR, 0: BACKGROUND_LABEL_COLOUR}
    if labels is not None and not points:
        for value, colour in colours.items():
            marked = labels == value
            if lw > 2 and marked.any():
                marked = ndimage.binary_dilation(marked, iterations=lw // 2 - 1)
            out[marked] = colour
    yy, xx = np.mgrid[0:h, 0:w]
    radius = 2 * lw + 1
    for x, y, value in points:
        d2 = (xx - x) ** 2 + (yy - y) ** 2
        out[d2 <= (radius + max(1, lw // 2)) ** 2] = (255, 255, 255)
        out[d2 <= radius**2] = colours[value]
    if box is not None:
        x0, y0 = int(np.clip(round(box[0]), 0, w - 1)), int(np.clip(round(box[1]), 0, h - 1))
        x1, y1 = int(np.clip(round(box[2]), 1, w)), int(np.clip(round(box[3]), 1, h))
        t = min(lw, max(1, (x1 - x0) // 2), max(1, (y1 - y0) // 2))
        out[y0 : y0 + t, x0:x1] = BOX_COLOUR
        out[y1 - t : y1, x0:x1] = BOX_COLOUR
        out[y0:y1, x0 : x0 + t] = BOX_COLOUR
        out[y0:y1, x1 - t : x1] = BOX_COLOUR
    return out


# ------------------------------------------------------------------------------------- run
def run(args) -> int:
    from ..refine import BOX_METHODS, SPARSE_METHODS, check_box, refine_box, refine_sparse

    settings = settings_from_args(args)
    sparse = args.box is None
    methods = SPARSE_METHODS if sparse else BOX_METHODS
    if args.method not in methods:
        kind = "points/scribbles" if sparse else "boxes"
        raise CommandError(f"unknown --method {args.method!r} for {kind}; choose one of {', '.join(methods)}")
    inputs = (args.image, args.points, args.scribbles)
    check_output_path(args.output, inputs=inputs)
    if args.overlay:
        check_output_path(args.overlay, "overlay", inputs=inputs)
        if os.path.abspath(args.overlay) == os.path.abspath(args.output):
            raise CommandError(f"--overlay and -o are the same file '{args.output}'; give two names")
    rgb = load_image(args.image)
    h, w = rgb.shape[:2]
    image = image_tensor(rgb)
    labels = box = None
    points = ()
    start = time.perf_counter()
    if sparse:
        if args.points:
            points = read_points(args.points)
            labels = load_points(args.points, h, w, args.point_radius)
        else:
            labels = load_scribbles(args.scribbles, h, w, args.object_index, args.background_index)
        try:
            prob = refine_sparse(image, torch.from_numpy(labels.astype(np.int64)), args.method, settings,
                                 progress=not args.quiet)
        except ValueError as err:
            raise CommandError(str(err)) from None
    else:
        try:
            box = check_box(args.box, h, w)
        except ValueError as err:
            raise CommandError(f"--box: {err}; give X0 Y0 X1 Y1 inside the image") from None
        prob = refine_box(image, box, args.method, settings, progress=not args.quiet)
    mask = (prob >= 0.5).numpy()
    outputs = {args.output: (mask * 255).astype(np.uint8)}
    if args.overlay:
        outputs[args.overlay] = draw_overlay(rgb, mask, box=box, labels=labels, points=points)
    write_pngs(outputs)
    seconds = time.perf_counter() - start
    print(
        f"wrote {args.output} ({mask.mean() * 100:.1f}% object, method {args.method}, model {settings.model}, "
        f"{settings.steps} steps, {seconds:.1f} s)" + (f" and overlay {args.overlay}" if args.overlay else "")
    )
    return 0
