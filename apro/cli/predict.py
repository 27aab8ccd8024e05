"""``apro predict box``: instance masks of images with a trained checkpoint, written as PNGs.

For each ``IMAGE`` it writes into ``OUTDIR``: ``<name>_overlay.png`` (each instance tinted in
its own colour and outlined), ``<name>_masks.png`` (16-bit instance ids, 0 = background,
1 = highest score; where instances overlap the higher score wins) and ``<name>.json`` (one
record per instance: id, COCO category_id, score, box [x0, y0, x1, y1]).
"""
from __future__ import annotations

import json
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
        description="Segment images with a checkpoint of `apro train box`; writes overlay and mask PNGs.",
    )
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint file or run directory (latest checkpoint)")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files (PNG, JPEG, ...)")
    p.add_argument("-o", "--out", metavar="OUTDIR", required=True, help="folder for the PNGs (created)")
    p.add_argument("--score-threshold", dest="score_threshold", type=float, default=0.3,
                   help="keep instances scoring at least this (default 0.3)")
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
    """``image`` (H, W, 3) uint8 with each of ``masks`` (K, H, W) bool tinted and outlined,
    lowest score first so the best instance is drawn on top."""
    out = image.astype(np.float32)
    colours = _palette(len(masks))
    for k in range(len(masks) - 1, -1, -1):
        m = masks[k]
        out[m] = (1 - alpha) * out[m] + alpha * colours[k]
        padded = np.pad(m, 1)
        interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        out[m & ~interior] = colours[k]
    return out.round().astype(np.uint8)


def _load_rgb(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))
    except FileNotFoundError:
        raise CommandError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as err:
        raise CommandError(f"cannot read image {path}: {err}") from None


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


def run(args) -> int:
    import torch
    from PIL import Image

    from ..engine import CheckpointError
    from ..tasks.box import load_trained_model

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    paths = [Path(p) for p in args.images]
    for p in paths:
        if not p.is_file():
            raise CommandError(f"image {p} does not exist")
    try:
        model, config, meta = load_trained_model(args.checkpoint, device=device)
    except CheckpointError as err:
        raise CommandError(str(err)) from None
    category_ids = meta.get("category_ids") or list(range(meta["num_classes"]))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stems = [p.stem for p in paths]
    if len(set(stems)) != len(stems):  # same file name from different folders: keep them apart
        stems = [f"{i:04d}_{s}" for i, s in enumerate(stems)]
    short_side = args.short_side or config.test_short_side
    iterator = zip(paths, stems)
    if not args.quiet:
        from tqdm.auto import tqdm

        iterator = tqdm(list(iterator), desc="predict", unit="image", dynamic_ncols=True)
    for path, stem in iterator:
        rgb = _load_rgb(path)
        found = segment(model, rgb, short_side, config.max_size, args.score_threshold)
        ids = np.zeros(rgb.shape[:2], np.uint16)
        for k in range(len(found["masks"]) - 1, -1, -1):  # best instance written last, on top
            ids[found["masks"][k]] = k + 1
        records = []
        for k, (mask, label, score) in enumerate(zip(found["masks"], found["labels"], found["scores"])):
            ys, xs = np.nonzero(mask)
            box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] if len(xs) else None
            records.append({"id": k + 1, "category_id": int(category_ids[int(label)]), "score": float(score),
                            "box": box})
        Image.fromarray(_overlay_instances(rgb, found["masks"])).save(out_dir / f"{stem}_overlay.png")
        Image.fromarray(ids).save(out_dir / f"{stem}_masks.png")
        (out_dir / f"{stem}.json").write_text(json.dumps({"image": str(path), "instances": records}, indent=2) + "\n")
    print(f"wrote {len(paths)} overlay/mask PNG pairs to {out_dir}")
    return 0
