"""Pseudo-label quality of ``apro refine`` vs. the other losses and the classical peers (issue 3).

For boxes and for each scribble set: mean IoU and seconds per image of every method, printed
as a markdown table. IoU ignores ground-truth pixels of value 128 (GrabCut's uncertain band).

Data layout read under ``--data-root`` (default: env ``APRO_DATA``, else ``../shared/data``
relative to the repository root); every folder name is configurable and the script says what
it found or misses::

    DATA_ROOT/<grabcut set>/           first folder whose name contains "grabcut" (--grabcut)
        images/NAME.{jpg,png,bmp}      also accepted: img/, data/
        masks/NAME.png                 0 background, 255 object, 128 uncertain (not scored)
                                       also accepted: gt/, GT/, ground_truth/, labels/
        boxes/NAME.txt (optional)      "x0 y0 x1 y1"; else the tight box of the mask's 255s
        boxes-published/NAME.txt       optional loose boxes (a "loose boxes" column for those)
    DATA_ROOT/<scribble set>/          folders whose name contains "scribble" (--scribble-sets)
        NAME.png (or any subfolder)    palette PNG: 0 unlabeled, --object-index object,
                                       --background-index background; matched by NAME

``--synthetic N`` instead makes N textured scenes (object of two textured parts on a
patchwork background, GT with a 2-pixel 128 band, its tight box and two synthetic scribble
sets: "strokes" = long strokes, "dabs" = short sparse strokes), so the table can be produced
without the real data.

Examples::

    python benchmarks/pseudo_labels.py --synthetic 16
    python benchmarks/pseudo_labels.py --data-root ../shared/data --figure docs/refine_compare.png

Real data: every method runs on every image in one run; the tables are printed for the
held-out images (odd positions in the sorted names; the even ones were used for tuning) and
for all images. ``METHOD@PRESET`` runs a method with other refine settings (see PRESETS):
``@logits`` is the previous default (free logits, 150 steps, lr 0.1, margin 0.25, bilinear
upsampling).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from apro import classical
from apro.data.images import read_rgb
from apro.refine import RefineSettings, box_mask, mask_iou, refine_box, refine_sparse

BOX_ROWS = ["box", "lp@logits", "apro@logits", "lp", "apro", "grabcut", "densecrf"]
SPARSE_ROWS = ["lp@logits", "apro@logits", "lp", "apro", "densecrf"]
# METHOD@PRESET: refine settings other than the defaults
PRESETS = {
    "logits": dict(model="logits", steps=150, lr=0.1, margin=0.25, margin_pixels=0, final_lp=0, connected=False),
    "nofinal": dict(final_lp=0),
    "noconnect": dict(connected=False),
}
REPO = Path(__file__).resolve().parent.parent
ROW_NAMES = {
    "box": "box alone (filled box)",
    "pce": "labels alone (partial CE)",
    "projection": "projection loss only",
    "pairwise": "BoxInst pairwise",
    "treefilter": "tree filter (TEL)",
    "crf": "CRF loss (MAL)",
    "gp": "GP only",
    "lp": "LP only (features head)",
    "apro": "**APro GP+LP (P), default `apro refine`**",
    "gp-lp-c": "APro GP-LP-C",
    "lp-gp-c": "APro LP-GP-C",
    "lp@logits": "LP only (free logits, previous default)",
    "apro@logits": "APro GP+LP (free logits, previous default)",
    "grabcut": "OpenCV grabCut",
    "random_walker": "skimage random_walker",
    "densecrf": "DenseCRF (pydensecrf2)",
}
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


# ------------------------------------------------------------------------------ synthetic
def _smooth_noise(rng, h, w, scale):
    """Gaussian noise low-passed to blobs of about ``scale`` pixels, unit std."""
    import scipy.ndimage as ndi

    n = ndi.gaussian_filter(rng.standard_normal((h, w)), scale)
    return n / (n.std() + 1e-8)


def _texture(rng, h, w, colour, amplitude):
    """A textured colour field: smooth blotches, fine grain and (sometimes) stripes."""
    t = amplitude * (0.6 * _smooth_noise(rng, h, w, rng.uniform(2, 6)) + 0.4 * rng.standard_normal((h, w)))
    if rng.random() < 0.4:
        yy, xx = np.mgrid[0:h, 0:w]
        angle, period = rng.uniform(0, np.pi), rng.uniform(5, 14)
        t = t + amplitude * 1.2 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    return np.clip(np.asarray(colour)[None, None, :] + t[..., None] * rng.uniform(0.5, 1.0, 3), 0, 1)


def _polyline(shape, points, radius):
    """Mask of a polyline through ``points`` ((x, y) pairs) drawn ``2 * radius + 1`` thick."""
    h, w = shape
    out = np.zeros(shape, bool)
    yy, xx = np.mgrid[0:h, 0:w]
    for (xa, ya), (xb, yb) in zip(points[:-1], points[1:]):
        n = int(max(abs(xb - xa), abs(yb - ya))) + 1
        for t in np.linspace(0, 1, n):
            x, y = xa + t * (xb - xa), ya + t * (yb - ya)
            y0, y1, x0, x1 = int(max(0, y - radius)), int(min(h, y + radius + 1)), int(max(0, x - radius)), int(min(w, x + radius + 1))
            sub = (xx[y0:y1, x0:x1] - x) ** 2 + (yy[y0:y1, x0:x1] - y) ** 2 <= radius**2 + 0.5
            out[y0:y1, x0:x1] |= sub
    return out


def _random_points_in(rng, region, count):
    ys, xs = np.nonzero(region)
    if len(ys) == 0:
        return []
    pick = rng.choice(len(ys), size=min(count, len(ys)), replace=False)
    return [(float(xs[k]), float(ys[k])) for k in pick]


def synthetic_scene(rng: np.random.Generator, size=(192, 256)) -> dict:
    """One synthetic single-object scene: image (H, W, 3) uint8, gt (H, W) uint8 {0, 128, 255},
    box (x0, y0, x1, y1), scribbles {set name: (H, W) uint8 index map 0 unl / 1 obj / 2 bg}."""
    import scipy.ndimage as ndi

    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    # background: Voronoi patchwork of textured colours
    seeds = rng.uniform((0, 0), (h, w), size=(rng.integers(5, 10), 2))
    owner = np.argmin((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2, axis=-1)
    image = np.zeros((h, w, 3))
    palette = rng.uniform(0.1, 0.9, size=(len(seeds), 3))
    for k in range(len(seeds)):
        image[owner == k] = _texture(rng, h, w, palette[k], rng.uniform(0.03, 0.08))[owner == k]
    # object: a smooth star-shaped blob of two textured parts
    cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
    radius = rng.uniform(0.2, 0.32) * min(h, w)
    theta = np.arctan2(yy - cy, xx - cx)
    r = radius * np.ones_like(theta)
    for k in (2, 3, 5):
        r = r * (1 + rng.uniform(0, 0.35 / k * 2) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)))
    obj = np.hypot(yy - cy, xx - cx) <= r
    split_angle = rng.uniform(0, np.pi)
    part = ((xx - cx) * np.cos(split_angle) + (yy - cy) * np.sin(split_angle)) > rng.uniform(-0.3, 0.3) * radius
    for k, colour in enumerate(rng.uniform(0.1, 0.9, size=(2, 3))):
        region = obj & (part == bool(k))
        image[region] = _texture(rng, h, w, colour, rng.uniform(0.03, 0.08))[region]
    image = ndi.gaussian_filter(image, (0.7, 0.7, 0))  # a camera's slight blur at the edges
    image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)

    band = ndi.binary_dilation(obj, iterations=2) & ~ndi.binary_erosion(obj, iterations=2)
    gt = np.where(obj, 255, 0).astype(np.uint8)
    gt[band] = 128
    ys, xs = np.nonzero(obj)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)

    inner = ndi.binary_erosion(obj, iterations=6)
    if not inner.any():
        inner = ndi.binary_erosion(obj, iterations=2)
    outer = ~ndi.binary_dilation(obj, iterations=6)
    scribbles = {}
    # "strokes": a long object stroke through the centre, background strokes around and in the box
    s = np.zeros((h, w), np.uint8)
    pts = _random_points_in(rng, inner, 3)
    stroke = _polyline((h, w), [pts[0], (cx, cy), *pts[1:]], 1) & inner
    s[stroke] = 1
    x0, y0, x1, y1 = box
    ring = [(max(2, x0 - 8), max(2, y0 - 8)), (min(w - 3, x1 + 8), max(2, y0 - 8)),
            (min(w - 3, x1 + 8), min(h - 3, y1 + 8)), (max(2, x0 - 8), min(h - 3, y1 + 8)), (max(2, x0 - 8), max(2, y0 - 8))]
    bg = _polyline((h, w), ring, 1)
    inside_bg = outer & (box_mask(box, h, w).numpy() > 0)
    bg_pts = _random_points_in(rng, inside_bg, 2)
    if len(bg_pts) == 2:
        bg |= _polyline((h, w), bg_pts, 1)
    s[bg & outer] = 2
    scribbles["strokes"] = s
    # "dabs": three short object dabs and four short background dabs, 1 px thin
    s = np.zeros((h, w), np.uint8)
    for cls, region, count in ((1, inner, 3), (2, outer, 4)):
        for x, y in _random_points_in(rng, region, count):
            a = rng.uniform(0, 2 * np.pi)
            dab = _polyline((h, w), [(x, y), (x + 8 * np.cos(a), y + 8 * np.sin(a))], 0) & region
            s[dab] = cls
    scribbles["dabs"] = s
    return {"name": None, "image": image, "gt": gt, "box": box, "scribbles": scribbles}


def synthetic_set(count: int, seed: int = 0, size=(192, 256)) -> list:
    rng = np.random.default_rng(seed)
    items = []
    for k in range(count):
        item = synthetic_scene(rng, size)
        item["name"] = f"synthetic-{k:03d}"
        items.append(item)
    return items


# ------------------------------------------------------------------------------ real data
def _find_dir(root: Path, names) -> Path | None:
    for name in names:
        for cand in (root / name, root / name.upper(), root / name.capitalize()):
            if cand.is_dir():
                return cand
    return None


def _index_by_stem(folder: Path, exts=IMAGE_EXTS) -> dict:
    return {p.stem: p for p in sorted(folder.rglob("*")) if p.suffix.lower() in exts and p.is_file()}


def load_real_sets(data_root: Path, grabcut: str | None, scribble_sets, object_index: int, background_index: int):
    """Read the GrabCut-style set and its scribble sets; returns (items, scribble set names) or
    raises SystemExit with a message saying what is missing."""
    from PIL import Image

    if not data_root.is_dir():
        raise SystemExit(f"no data folder {data_root} (the real sets are absent); run with --synthetic N instead")
    if grabcut is None:
        cands = sorted(p for p in data_root.iterdir() if p.is_dir() and "grabcut" in p.name.lower())
        if not cands:
            raise SystemExit(f"no folder with 'grabcut' in its name under {data_root}; pass --grabcut DIR")
        gdir = cands[0]
    else:
        gdir = Path(grabcut) if os.path.isabs(grabcut) else data_root / grabcut
    img_dir = _find_dir(gdir, ("images", "img", "data"))
    mask_dir = _find_dir(gdir, ("masks", "gt", "ground_truth", "groundtruth", "labels"))
    if img_dir is None or mask_dir is None:
        raise SystemExit(f"{gdir} needs an images/ and a masks/ folder (found: {sorted(p.name for p in gdir.iterdir())})")
    images, masks = _index_by_stem(img_dir), _index_by_stem(mask_dir)
    box_dir = _find_dir(gdir, ("boxes", "bboxes", "box"))
    loose_dir = _find_dir(gdir, ("boxes-published",))
    names = sorted(set(images) & set(masks))
    if not names:
        raise SystemExit(f"no image in {img_dir} has a mask of the same name in {mask_dir}")
    if scribble_sets is None:
        sdirs = sorted(p for p in data_root.iterdir() if p.is_dir() and "scribble" in p.name.lower())
    else:
        sdirs = [Path(s) if os.path.isabs(s) else data_root / s for s in scribble_sets]
    sindex = {d.name: _index_by_stem(d, (".png",)) for d in sdirs}
    print(f"# data: {len(names)} images in {gdir}; scribble sets: "
          + (", ".join(f"{k} ({len(v)} files)" for k, v in sindex.items()) or "none found"), file=sys.stderr)
    items = []
    for name in names:
        image = read_rgb(images[name])
        gt = np.array(Image.open(masks[name]).convert("L"))
        if gt.shape != image.shape[:2]:
            raise SystemExit(f"mask {masks[name]} is {gt.shape} but image is {image.shape[:2]}")
        box = None
        if box_dir is not None and (box_dir / f"{name}.txt").is_file():
            box = tuple(float(v) for v in (box_dir / f"{name}.txt").read_text().split()[:4])
        if box is None:
            ys, xs = np.nonzero(gt == 255)
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        loose = None
        if loose_dir is not None and (loose_dir / f"{name}.txt").is_file():
            loose = tuple(float(v) for v in (loose_dir / f"{name}.txt").read_text().split()[:4])
        scr = {}
        for set_name, files in sindex.items():
            if name in files:
                idx = np.array(Image.open(files[name]))
                s = np.zeros(idx.shape, np.uint8)
                s[idx == object_index] = 1
                s[idx == background_index] = 2
                scr[set_name] = s
        items.append({"name": name, "image": image, "gt": gt, "box": box, "loose": loose, "scribbles": scr})
    return items, list(sindex)


# ---------------------------------------------------------------------------------- runs
def _to_labels(index_map: np.ndarray) -> np.ndarray:
    """Scribble index map (0 unl / 1 obj / 2 bg) -> refine labels (1 obj / 0 bg / 255 unl)."""
    labels = np.full(index_map.shape, 255, np.uint8)
    labels[index_map == 1] = 1
    labels[index_map == 2] = 0
    return labels


def _tuned_apro(method: str, task: str):
    """``"apro:zeta_gl=0.05,zeta_s=0.3"`` -> (base method, loss with those APro settings)."""
    from apro import losses

    base, _, spec = method.partition(":")
    options = {k: float(v) for k, v in (kv.split("=") for kv in spec.split(","))}
    variant = {"apro": "gp-lp-p"}.get(base, base)
    if task == "box":
        def loss(logits, box, image, tree):
            return losses.registry.PROJECTION_WEIGHT * losses.box_projection_loss(logits, box) + losses.apro_box_loss(
                logits, box, image, variant=variant, tree=tree, **options)
    else:
        def loss(logits, labels, image, tree):
            return losses.partial_cross_entropy(logits, labels) + losses.apro_sparse_loss(
                logits, labels, image, variant=variant, tree=tree, **options)
    return base, loss


def _settings(method: str, settings: RefineSettings):
    """``"apro@logits"`` -> ("apro", settings with the preset applied)."""
    import dataclasses

    base, _, preset = method.partition("@")
    if not preset:
        return base, settings
    if preset not in PRESETS:
        raise SystemExit(f"unknown preset @{preset}; choose one of {', '.join(PRESETS)}")
    return base, dataclasses.replace(settings, **PRESETS[preset])


def run_box(method: str, item: dict, settings: RefineSettings, box_key: str = "box") -> np.ndarray:
    image, box = item["image"], item[box_key]
    method, settings = _settings(method, settings)
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    if ":" in method:
        base, loss = _tuned_apro(method, "box")
        return (refine_box(tensor, box, base, settings, loss=loss) >= 0.5).numpy()
    if method == "grabcut":
        return classical.grabcut(image, box)
    if method == "densecrf":
        return classical.dense_crf_box(image, box)
    return (refine_box(tensor, box, method, settings) >= 0.5).numpy()


def run_sparse(method: str, item: dict, set_name: str, settings: RefineSettings) -> np.ndarray:
    image, labels = item["image"], _to_labels(item["scribbles"][set_name])
    method, settings = _settings(method, settings)
    if method == "random_walker":
        return classical.random_walker(image, labels)
    if method == "densecrf":
        return classical.dense_crf_labels(image, labels)
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    lab = torch.from_numpy(labels.astype(np.int64))
    if ":" in method:
        base, loss = _tuned_apro(method, "sparse")
        return (refine_sparse(tensor, lab, base, settings, loss=loss) >= 0.5).numpy()
    return (refine_sparse(tensor, lab, method, settings) >= 0.5).numpy()


def evaluate(items, task: str, methods, settings: RefineSettings, set_name=None, box_key="box", keep=()) -> dict:
    """``{method: {image name: (IoU, seconds)}}`` over the items that have the labels; the
    predictions of the images named in ``keep`` are stored under ``(method, name)`` in
    ``evaluate.kept``."""
    results = {}
    column = set_name or ("loose boxes" if box_key == "loose" else "boxes")
    for method in methods:
        scores = {}
        for item in tqdm(items, desc=f"{column}: {method}", leave=False):
            if task == "sparse" and set_name not in item["scribbles"]:
                continue
            if task == "box" and item.get(box_key) is None:
                continue
            start = time.perf_counter()
            try:
                pred = (run_box(method, item, settings, box_key) if task == "box"
                        else run_sparse(method, item, set_name, settings))
            except (ImportError, ValueError) as err:
                print(f"# {method} skipped on {item['name']}: {err}", file=sys.stderr)
                continue
            seconds = time.perf_counter() - start
            gt = item["gt"]
            iou = mask_iou(torch.from_numpy(pred), torch.from_numpy(gt == 255), torch.from_numpy(gt != 128))
            scores[item["name"]] = (iou, seconds)
            if item["name"] in keep:
                evaluate.kept[(column, method, item["name"])] = pred
        results[method] = scores
        if scores:
            ious, secs = zip(*scores.values())
            print(f"# {column} {method}: IoU {np.mean(ious) * 100:.1f}, {np.mean(secs):.2f} s/img, "
                  f"{len(scores)} images", file=sys.stderr, flush=True)
    return results


evaluate.kept = {}


def summarise(columns: dict, names=None) -> dict:
    """``{column: {method: {name: (iou, s)}}}`` -> ``{column: {method: (mean IoU, mean s, n)}}``
    over the images in ``names`` (all if None)."""
    out = {}
    for col, methods in columns.items():
        out[col] = {}
        for m, scores in methods.items():
            vals = [v for k, v in scores.items() if names is None or k in names]
            out[col][m] = ((float(np.mean([v[0] for v in vals])), float(np.mean([v[1] for v in vals])), len(vals))
                           if vals else (float("nan"), 0.0, 0))
    return out


def markdown_table(columns: dict, rows) -> str:
    """``columns``: {set name: {method: (iou, s/img, n)}} -> one markdown table."""
    head = "| method | " + " | ".join(f"{c} IoU | {c} s/img" for c in columns) + " |"
    sep = "|---|" + "---:|---:|" * len(columns)
    lines = [head, sep]
    for m in rows:
        cells = []
        for col in columns.values():
            if m in col and col[m][2] > 0:
                cells += [f"{col[m][0] * 100:.1f}", f"{col[m][1]:.2f}"]
            else:
                cells += ["-", "-"]
        name = ROW_NAMES.get(m, m) if ":" not in m else f"{ROW_NAMES.get(m.split(':')[0], m)} ({m.split(':')[1]})"
        if m not in ROW_NAMES and "@" in m:
            name = f"{ROW_NAMES.get(m.split('@')[0], m.split('@')[0])} (@{m.split('@')[1]})"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _default_data_root() -> str:
    return os.environ.get("APRO_DATA") or str(REPO.parent / "shared" / "data")


def held_out_names(names) -> set:
    """The held-out images: odd positions of the sorted names (the even ones tuned refine)."""
    return set(sorted(names)[1::2])


FIGURE_NAMES = ("banana1", "person7", "271008", "sheep")


def compare_figure(items, kept: dict, path: str, methods=("apro", "grabcut", "densecrf"), width: int = 240) -> None:
    """One PNG: a row per image (tight boxes), a column per method, overlays side by side."""
    from PIL import Image, ImageDraw

    from apro.cli.refine import draw_overlay

    rows = []
    for item in items:
        if not all(("boxes", m, item["name"]) in kept for m in methods):
            continue
        tiles = []
        for m in methods:
            tile = draw_overlay(item["image"], kept[("boxes", m, item["name"])], box=item["box"])
            h, w = tile.shape[:2]
            tiles.append(np.array(Image.fromarray(tile).resize((width, round(h * width / w)), Image.BILINEAR)))
        height = max(t.shape[0] for t in tiles)
        rows.append(np.concatenate([np.pad(t, ((0, height - t.shape[0]), (0, 4), (0, 0)), constant_values=255)
                                    for t in tiles], 1))
    if not rows:
        print(f"# figure {path}: none of {FIGURE_NAMES} was scored; not written", file=sys.stderr)
        return
    header = np.full((22, rows[0].shape[1], 3), 255, np.uint8)
    img = Image.fromarray(np.concatenate([header, *rows], 0))
    draw = ImageDraw.Draw(img)
    for k, m in enumerate(methods):
        draw.text((k * (width + 4) + 6, 5), ROW_NAMES.get(m, m).replace("*", "").split(",")[0], fill=(0, 0, 0))
    # an adaptive 256-colour palette keeps the figure small enough to commit (~1/2 the RGB size)
    img.convert("P", palette=Image.ADAPTIVE, colors=256).save(path, optimize=True)
    print(f"# wrote {path}", file=sys.stderr)


def main(argv=None) -> int:
    d = RefineSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=_default_data_root(),
                   help="folder holding the real sets (default: $APRO_DATA, else ../shared/data from the repository)")
    p.add_argument("--grabcut", default=None, help="GrabCut set folder (name under --data-root or absolute)")
    p.add_argument("--scribble-sets", nargs="*", default=None, help="scribble set folders (default: '*scribble*')")
    p.add_argument("--object-index", type=int, default=1, help="scribble PNG index of the object (default 1)")
    p.add_argument("--background-index", type=int, default=2, help="scribble PNG index of the background (default 2)")
    p.add_argument("--synthetic", type=int, default=0, metavar="N", help="use N synthetic scenes instead of real data")
    p.add_argument("--synthetic-size", type=int, nargs=2, default=(192, 256), metavar=("H", "W"))
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic scenes")
    p.add_argument("--limit", type=int, default=0, help="use only the first N images (0 = all)")
    p.add_argument("--tasks", nargs="+", default=["box", "loose", "sparse"], choices=["box", "loose", "sparse"])
    p.add_argument("--box-methods", nargs="+", default=BOX_ROWS)
    p.add_argument("--sparse-methods", nargs="+", default=SPARSE_ROWS)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--size", type=int, default=d.size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--model", default=d.model, choices=["features", "cnn", "logits"])
    p.add_argument("--margin", type=float, default=d.margin)
    p.add_argument("--figure", default=None, metavar="PNG",
                   help=f"write overlays (apro, grabCut, DenseCRF; tight boxes) of {', '.join(FIGURE_NAMES)} here")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: per-image grids are small, threads only add overhead)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))

    if args.synthetic > 0:
        items, set_names = synthetic_set(args.synthetic, args.seed, tuple(args.synthetic_size)), ["strokes", "dabs"]
        source = f"synthetic ({args.synthetic} scenes {args.synthetic_size[0]}x{args.synthetic_size[1]}, seed {args.seed})"
    else:
        items, set_names = load_real_sets(Path(args.data_root), args.grabcut, args.scribble_sets,
                                          args.object_index, args.background_index)
        source = os.path.relpath(args.data_root, REPO) if os.path.isabs(args.data_root) else str(args.data_root)
    if args.limit:
        items = items[: args.limit]
    settings = RefineSettings(steps=args.steps, size=args.size, lr=args.lr, model=args.model, margin=args.margin)
    torch.manual_seed(0)
    keep = FIGURE_NAMES if args.figure else ()
    columns = {}
    if "box" in args.tasks:
        columns["boxes"] = evaluate(items, "box", args.box_methods, settings, keep=keep)
    if "loose" in args.tasks and any(it.get("loose") is not None for it in items):
        columns["loose boxes"] = evaluate(items, "box", args.box_methods, settings, box_key="loose")
    if "sparse" in args.tasks:
        for s in set_names:
            columns[s] = evaluate(items, "sparse", args.sparse_methods, settings, s)
    rows = list(dict.fromkeys([*(args.box_methods if {"box", "loose"} & set(args.tasks) else []),
                               *(args.sparse_methods if "sparse" in args.tasks else [])]))
    print(f"Data: {source}, {len(items)} images. Defaults: model={settings.model} steps={settings.steps} "
          f"size={settings.size} lr={settings.learning_rate} margin={settings.margin}+{settings.margin_pixels}px "
          f"feature_size={settings.feature_size} final_lp={settings.final_lp}; --threads {args.threads}.\n")
    names = [it["name"] for it in items]
    if args.synthetic > 0:
        print(markdown_table(summarise(columns), rows))
    else:
        held = held_out_names(names)
        print(f"Held-out images ({len(held)}: {' '.join(sorted(held))}); loose boxes: the held-out ones among "
              "the 9 published.\n")
        print(markdown_table(summarise(columns, held), rows))
        print(f"\nAll {len(names)} images (the other {len(names) - len(held)} tuned the defaults); "
              "loose boxes: all 9 published.\n")
        print(markdown_table(summarise(columns), rows))
    if args.figure:
        compare_figure([it for it in items if it["name"] in FIGURE_NAMES], evaluate.kept, args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
