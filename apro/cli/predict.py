"""``apro predict box``: instance masks of images with a trained checkpoint.

For each ``IMAGE`` (EXIF orientation applied, 16-bit images scaled; see
:func:`apro.data.read_rgb`) it writes into ``OUTDIR``:

* ``<name>_overlay.png``: the image with each instance tinted in its own colour and outlined
  (line width grows with the image size);
* ``<name>_instance_001.png``, ``..._002.png``, ...: one 0/255 mask PNG per instance at the
  image's size, numbered by descending score (overlapping instances each keep their pixels);
* ``<name>.json``: ``image``, ``width``, ``height``, ``score_threshold``, ``mask_threshold`` and
  ``instances``: one
  record per instance with ``id``, COCO ``category_id``, ``score``, ``box`` [x0, y0, x1, y1]
  (x1/y1 exclusive), ``area``, ``mask_png`` and ``segmentation`` (COCO RLE, ``counts`` a string).

Everything is checked first (score threshold, output folder, every input file readable, no
output overwriting an input); the files are written into a temporary folder and moved into
``OUTDIR`` only when every image succeeded, so a failure writes nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from . import CommandError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict", help="segment images with a trained checkpoint",
        description="Segment images with a checkpoint of `apro train TASK`. Tasks: `box` (instance masks).",
    )
    tasks = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    p = tasks.add_parser(
        "box", help="instance masks of images with a box-task checkpoint",
        description="Segment images with a checkpoint of `apro train box`. Writes into OUTDIR, per image: "
                    "NAME_overlay.png (instances tinted and outlined), NAME_instance_001.png ... (one 0/255 mask "
                    "per instance, by descending score) and NAME.json (category, score, box, mask file and COCO "
                    "RLE of every instance). Nothing is written unless every image succeeds.",
    )
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint file or run directory (latest checkpoint)")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files (PNG, JPEG, ...)")
    p.add_argument("-o", "--out", metavar="OUTDIR", required=True,
                   help="output folder (created if missing; files of the same names in it are replaced)")
    p.add_argument("--score-threshold", dest="score_threshold", type=float, default=0.3,
                   help="keep instances scoring at least this, in [0, 1] (default 0.3)")
    p.add_argument("--mask-threshold", dest="mask_threshold", type=float, metavar="T",
                   help="binarise the soft masks at T in (0, 1) (default: the run's model_options.mask_threshold); "
                        "choose it on training images, e.g. with benchmarks/box_instance.py --thresholds")
    p.add_argument("--short-side", dest="short_side", type=int, metavar="PX",
                   help="resize to this short side (default: the run's test_short_side)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)
    from .semantic import add_predict_parser  # apro predict semantic
    add_predict_parser(tasks)


def _palette(n: int) -> np.ndarray:
    """``n`` well separated RGB colours (golden-ratio hues)."""
    import colorsys

    return np.array([[round(255 * c) for c in colorsys.hsv_to_rgb((0.1 + i * 0.618034) % 1.0, 0.85, 0.95)]
                     for i in range(n)], dtype=np.float32).reshape(n, 3)


def _overlay_instances(image: np.ndarray, masks: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``image`` (H, W, 3) uint8 with each of ``masks`` (K, H, W) bool tinted and outlined
    (outline width from :func:`apro.figures.line_width`), lowest score first so the best
    instance is drawn on top."""
    from ..figures import line_width, outline

    out = image.astype(np.float32)
    colours = _palette(len(masks))
    width = line_width(*image.shape[:2])
    for k in range(len(masks) - 1, -1, -1):
        m = masks[k]
        out[m] = (1 - alpha) * out[m] + alpha * colours[k]
        out[outline(m, width) & m] = colours[k]
    return out.round().astype(np.uint8)


def _load_rgb(path: Path) -> np.ndarray:
    from ..data.images import read_rgb

    try:
        return read_rgb(path)
    except OSError as err:  # FileNotFoundError, UnreadableImageError: the message names the file
        raise CommandError(str(err)) from None


def _check_image(path: Path) -> None:
    """Cheap check before any work: the file exists and Pillow recognises it as an image."""
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise CommandError(f"image file '{path}' does not exist; check the path")
    if not path.is_file():
        raise CommandError(f"image file '{path}' is not a file")
    try:
        with Image.open(path):
            pass
    except (UnidentifiedImageError, OSError) as err:
        raise CommandError(f"cannot read image file '{path}' ({err.__class__.__name__}); give a PNG or JPEG file") from None


def _rle(mask: np.ndarray) -> dict:
    """COCO run-length encoding of a (H, W) bool mask, ``counts`` as a string (JSON-ready)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def segment(model, rgb: np.ndarray, short_side: int, max_size, score_threshold: float) -> dict:
    """Instances of one ``(H, W, 3)`` uint8 image: dict masks (K, H, W) bool at the image's
    size, labels (K,) contiguous classes, scores (K,), sorted by descending score."""
    import torch
    import torch.nn.functional as F

    from ..data import collate_batch
    from ..evaluation import masks_to_original_size

    h, w = rgb.shape[:2]
    scale = short_side / min(h, w)
    if max_size is not None and max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    image = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255)
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    batch = collate_batch([{"image": image.clamp(0, 1)}])
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(batch["images"].to(device), valid=batch["valid"].to(device))[0]
    keep = out["scores"] >= score_threshold
    order = torch.argsort(out["scores"][keep], descending=True)
    masks = out["masks"][keep][order]
    return {"masks": masks_to_original_size(masks, size, (h, w)).cpu().numpy(),
            "labels": out["labels"][keep][order].cpu().numpy(),
            "scores": out["scores"][keep][order].float().cpu().numpy()}


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CommandError(f"-o {out} is a file; -o names the output folder (it is created if missing)")
    if not out.exists() and out.suffix.lower() in (".png", ".jpg", ".jpeg", ".json", ".tif", ".tiff"):
        raise CommandError(f"-o {out} looks like a file name; -o names the output folder, e.g. -o predictions")
    parent = out.resolve().parent
    if not out.exists() and not parent.is_dir():
        raise CommandError(f"the folder of -o {out} ({parent}) does not exist; create it or choose another -o")


def run(args) -> int:
    import torch
    from PIL import Image

    from ..engine import CheckpointError
    from ..tasks.box import load_trained_model, set_test_thresholds

    if not 0.0 <= args.score_threshold <= 1.0:
        raise CommandError(f"--score-threshold must be in [0, 1] (scores are probabilities), got {args.score_threshold}")
    if args.mask_threshold is not None and not 0.0 < args.mask_threshold < 1.0:  # NaN fails too
        raise CommandError(f"--mask-threshold must be in (0, 1) (masks are probabilities), got {args.mask_threshold}")
    if args.short_side is not None and args.short_side < 1:
        raise CommandError(f"--short-side must be >= 1, got {args.short_side}")
    if not Path(args.checkpoint).exists():
        raise CommandError(f"checkpoint {args.checkpoint} does not exist; give a checkpoint file or run directory")
    paths = [Path(p) for p in args.images]
    for p in paths:
        _check_image(p)
    out_dir = Path(args.out)
    _check_out_dir(out_dir)
    stems = [p.stem for p in paths]
    if len(set(stems)) != len(stems):  # same file name from different folders: keep them apart
        stems = [f"{i:04d}_{s}" for i, s in enumerate(stems)]
    inputs = {p.resolve() for p in paths}
    for stem in stems:
        for name in (f"{stem}_overlay.png", f"{stem}.json"):
            if (out_dir / name).resolve() in inputs:
                raise CommandError(f"output {out_dir / name} would overwrite an input image; choose another -o")
        if out_dir.is_dir():
            clash = [q for q in out_dir.glob(f"{stem}_instance_*.png") if q.resolve() in inputs]
            if clash:
                raise CommandError(f"output {clash[0]} would overwrite an input image; choose another -o")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model, config, meta = load_trained_model(args.checkpoint, device=device)
    except CheckpointError as err:
        raise CommandError(str(err)) from None
    if args.mask_threshold is not None:
        set_test_thresholds(model, mask_threshold=args.mask_threshold)
    mask_threshold = float(model.mask_threshold)
    category_ids = meta.get("category_ids") or list(range(meta["num_classes"]))
    short_side = args.short_side or config.test_short_side
    iterator = zip(paths, stems)
    if not args.quiet:
        from tqdm.auto import tqdm

        iterator = tqdm(list(iterator), desc="predict", unit="image", dynamic_ncols=True)
    parent = out_dir.resolve().parent if not out_dir.exists() else out_dir.resolve()
    staging = Path(tempfile.mkdtemp(prefix=".apro-predict-", dir=parent))
    total, empty = 0, 0
    try:
        for path, stem in iterator:
            rgb = _load_rgb(path)
            found = segment(model, rgb, short_side, config.max_size, args.score_threshold)
            records = []
            for k, (mask, label, score) in enumerate(zip(found["masks"], found["labels"], found["scores"]), start=1):
                ys, xs = np.nonzero(mask)
                box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] if len(xs) else None
                name = f"{stem}_instance_{k:03d}.png"
                Image.fromarray(mask.astype(np.uint8) * 255).save(staging / name)
                records.append({"id": k, "category_id": int(category_ids[int(label)]), "score": float(score),
                                "box": box, "area": int(mask.sum()), "mask_png": name, "segmentation": _rle(mask)})
            Image.fromarray(_overlay_instances(rgb, found["masks"])).save(staging / f"{stem}_overlay.png")
            h, w = rgb.shape[:2]
            (staging / f"{stem}.json").write_text(json.dumps(
                {"image": str(path), "width": w, "height": h, "score_threshold": args.score_threshold,
                 "mask_threshold": mask_threshold, "instances": records}, indent=2) + "\n")
            total += len(records)
            empty += not records
        if not out_dir.exists():
            os.replace(staging, out_dir)
        else:
            for stem in stems:  # instance files of an earlier run with more instances would mislead
                for old in out_dir.glob(f"{stem}_instance_*.png"):
                    old.unlink()
            for item in staging.iterdir():
                os.replace(item, out_dir / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    line = (f"wrote {len(paths)} image(s) to {out_dir}: {total} instance(s) with score >= {args.score_threshold:g} "
            "(per image: NAME_overlay.png, NAME_instance_NNN.png, NAME.json)")
    if empty:
        line += f"; {empty} image(s) with no instance at that threshold"
    print(line)
    return 0
