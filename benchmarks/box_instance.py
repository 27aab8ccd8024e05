"""Box-supervised instance segmentation: mask AP per mask loss at a fixed CPU budget, and the
time the APro loss adds to a training step (issue 4; paper Tables 4, 5 and 7).

Data: a COCO-format set given with ``--data/--ann/--eval-ann``, else the first one found
under ``/work/shared/data`` (a folder holding ``annotations/instances_train*.json``,
``annotations/instances_val*.json`` and the images), else -- or with ``--synthetic`` -- a
synthetic set of textured shapes written by :func:`apro.data.make_synthetic_coco`.

Every variant trains the same model from the same seed for the same number of steps on the
same data; only the mask loss differs. Prints two markdown tables: mask AP (with the
filled-box baseline), and the cost of one training step with projection only vs with APro,
timed interleaved on the same batch. Example::

    python benchmarks/box_instance.py --synthetic --steps 300
"""
from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import tempfile
import time

import torch

from apro.data import CocoBoxDataset, collate_batch, make_synthetic_coco
from apro.evaluation import evaluate_masks, filled_box_predictions
from apro.engine import build_optimizer
from apro.tasks.box import BoxConfig as TrainConfig, build_model, evaluate_model, train

SHARED_DATA = "/work/shared/data"
DEFAULT_VARIANTS = ("projection", "pairwise", "treefilter", "crf", "apro", "gp", "lp")
# A small SOLOv2 for CPU budgets on small images: stride-4 mask features, two grid levels.
SMALL_MODEL = dict(fpn_channels=32, head_channels=64, mask_channels=16, mask_branch_channels=32,
                   mask_stride=4, grid_sizes=(12, 8), scale_ranges=((1, 32), (24, 4096)))


def find_shared_coco(root: str = SHARED_DATA):
    """(image_dir, train_ann, eval_ann) of a COCO-format set under ``root``, or None."""
    for ann_dir in sorted(glob.glob(os.path.join(root, "**", "annotations"), recursive=True)):
        train = sorted(glob.glob(os.path.join(ann_dir, "instances_train*.json")))
        val = sorted(glob.glob(os.path.join(ann_dir, "instances_val*.json")))
        if not (train and val):
            continue
        base = os.path.dirname(ann_dir)
        stem = os.path.basename(train[0])[len("instances_"):-len(".json")]
        for image_dir in (os.path.join(base, stem), os.path.join(base, "images", stem), os.path.join(base, "images")):
            if os.path.isdir(image_dir):
                return image_dir, train[0], val[0], base
    return None


def _fmt(x: float) -> str:
    return f"{x:.1f}"


def ap_table(args, image_dir, train_ann, eval_image_dir, eval_ann, size) -> list:
    rows = []
    box = evaluate_masks(filled_box_predictions(eval_ann), eval_ann)
    rows.append(("filled GT boxes (reference)", "-", "-", box))
    out_root = tempfile.mkdtemp(prefix="apro-bench-")
    for variant in args.variants:
        config = TrainConfig(
            data=image_dir, ann=train_ann, out=os.path.join(out_root, variant), mask_loss=variant,
            pretrained=not args.no_pretrained, model_options=dict(SMALL_MODEL) if args.small_model else {},
            steps=args.steps, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
            weight_decay=args.weight_decay, warmup_steps=min(20, args.steps // 5),
            short_sides=tuple(size), max_size=args.max_size, test_short_side=max(size), seed=args.seed,
            checkpoint_every=args.steps,
        )
        start = time.perf_counter()
        result = train(config, progress=not args.quiet)
        seconds = time.perf_counter() - start
        dataset = CocoBoxDataset(image_dir, train_ann, train=True)
        scores = evaluate_model(result.model, eval_image_dir, eval_ann, short_side=max(size), max_size=args.max_size,
                                category_ids=dataset.category_ids, progress=False)
        rows.append((variant, str(args.steps), f"{seconds:.0f}", scores))
        print(f"  {variant}: AP {scores['AP']:.1f} in {seconds:.0f} s", file=sys.stderr, flush=True)
    return rows


def _tiled_item(dataset, start: int, tiles: int) -> dict:
    """``tiles x tiles`` dataset items side by side in one image (boxes shifted): a synthetic
    image holds 1-3 objects, a tiled one several times more, closer to COCO's ~7 per image."""
    items = [dataset[(start + k) % len(dataset)] for k in range(tiles * tiles)]
    h, w = items[0]["image"].shape[-2:]
    rows, boxes, labels = [], [], []
    for r in range(tiles):
        rows.append(torch.cat([items[r * tiles + c]["image"] for c in range(tiles)], dim=2))
        for c in range(tiles):
            item = items[r * tiles + c]
            boxes.append(item["boxes"] + torch.tensor([c * w, r * h, c * w, r * h], dtype=torch.float32))
            labels.append(item["labels"])
    return {"image": torch.cat(rows, dim=1), "boxes": torch.cat(boxes), "labels": torch.cat(labels)}


def step_cost(args, image_dir, train_ann, size, mask_stride) -> dict:
    """Median seconds of one optimizer step (forward, backward, update) per mask loss, the
    variants timed round-robin on the same batch so load changes hit them alike."""
    tile_side = size // args.cost_tiles
    dataset = CocoBoxDataset(image_dir, train_ann, train=True, short_sides=(tile_side,), max_size=args.max_size,
                             flip=False)
    batch = collate_batch([_tiled_item(dataset, i * args.cost_tiles ** 2, args.cost_tiles)
                           for i in range(args.cost_batch)])
    models, optimizers = {}, {}
    for variant in ("projection", "apro"):
        torch.manual_seed(0)
        config = TrainConfig(mask_loss=variant, pretrained=False, model_options={"mask_stride": mask_stride})
        models[variant] = build_model(config, dataset.num_classes).train()
        optimizers[variant] = build_optimizer(models[variant], config)
    times = {v: [] for v in models}
    positives = 0
    for repeat in range(args.cost_repeats + 1):
        for variant, model in models.items():
            start = time.perf_counter()
            losses = model(batch["images"], valid=batch["valid"], targets=batch["targets"])
            optimizers[variant].zero_grad()
            losses["loss"].backward()
            optimizers[variant].step()
            positives = int(losses["num_positives"])
            if repeat:  # the first round warms up (numba compilation, allocator)
                times[variant].append(time.perf_counter() - start)
    mask_hw = tuple(s // mask_stride for s in batch["images"].shape[-2:])
    return {v: statistics.median(t) for v, t in times.items()} | {
        "mask": mask_hw, "image": tuple(batch["images"].shape[-2:]), "positives": positives}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="image folder of a COCO-format set")
    p.add_argument("--ann", help="training JSON (boxes)")
    p.add_argument("--eval-ann", help="evaluation JSON (masks); images in --eval-data or --data")
    p.add_argument("--eval-data", help="image folder of the evaluation JSON (default --data)")
    p.add_argument("--synthetic", action="store_true", help="use a synthetic set of textured shapes")
    p.add_argument("--synthetic-images", type=int, default=48, help="synthetic training images")
    p.add_argument("--synthetic-eval-images", type=int, default=24, help="synthetic evaluation images")
    p.add_argument("--synthetic-size", type=int, default=64, help="synthetic image side (square)")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per variant (the fixed budget)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"))
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--short-sides", type=int, nargs="+", help="training short sides (default: data size)")
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--no-pretrained", action="store_true", help="random backbone instead of ImageNet weights")
    p.add_argument("--full-model", dest="small_model", action="store_false",
                   help="the default SOLOv2 widths instead of the small CPU model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cost-size", type=int, default=512, help="image short side for the step-cost table")
    p.add_argument("--cost-repeats", type=int, default=5)
    p.add_argument("--cost-batch", type=int, default=2, help="batch size of the step-cost table")
    p.add_argument("--cost-tiles", type=int, default=2,
                   help="step-cost images are T x T tiles of dataset images (more objects per image)")
    p.add_argument("--skip-ap", action="store_true", help="only the step-cost table")
    p.add_argument("--skip-cost", action="store_true", help="only the mask AP table")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    if args.data and args.ann and args.eval_ann:
        image_dir, train_ann, eval_ann = args.data, args.ann, args.eval_ann
        eval_image_dir = args.eval_data or args.data
        source = f"{args.ann} (eval {args.eval_ann})"
        size = args.short_sides or [640, 800]
    else:
        found = None if args.synthetic else find_shared_coco()
        if found is not None:
            image_dir, train_ann, eval_ann, base = found
            eval_image_dir = image_dir.replace("train", "val") if os.path.isdir(image_dir.replace("train", "val")) else image_dir
            source = base
            size = args.short_sides or [640, 800]
        else:
            if not args.synthetic:
                print(f"no COCO-format set (annotations/instances_train*.json + instances_val*.json) under "
                      f"{SHARED_DATA}: falling back to --synthetic", file=sys.stderr)
            root = tempfile.mkdtemp(prefix="apro-synthetic-")
            s = args.synthetic_size
            tr = make_synthetic_coco(os.path.join(root, "train"), args.synthetic_images, size=(s, s), num_classes=3, seed=1)
            ev = make_synthetic_coco(os.path.join(root, "eval"), args.synthetic_eval_images, size=(s, s), num_classes=3, seed=2)
            image_dir, train_ann, eval_image_dir, eval_ann = tr.image_dir, tr.train_ann, ev.image_dir, ev.eval_ann
            source = (f"synthetic: {args.synthetic_images} train / {args.synthetic_eval_images} eval images of "
                      f"{s}x{s}, 3 classes")
            size = args.short_sides or [s]

    print(f"data: {source}")
    print(f"torch threads: {torch.get_num_threads()}\n")
    if not args.skip_ap:
        rows = ap_table(args, image_dir, train_ann, eval_image_dir, eval_ann, size)
        print(f"### Mask AP, {args.steps} steps x batch {args.batch_size} per variant, seed {args.seed}, "
              f"{'random' if args.no_pretrained else 'ImageNet'} EfficientNet-Lite0"
              f"{' (small heads)' if args.small_model else ''}\n")
        print("| mask loss | steps | train s | AP | AP50 | AP75 |")
        print("|---|---|---|---|---|---|")
        for name, steps, seconds, s in rows:
            print(f"| {name} | {steps} | {seconds} | {_fmt(s['AP'])} | {_fmt(s['AP50'])} | {_fmt(s['AP75'])} |")
        print()

    if args.skip_cost:
        return 0
    print(f"### Training-step cost, batch {args.cost_batch}, default SOLOv2 (random weights), "
          f"{args.cost_tiles}x{args.cost_tiles} tiled images, median of {args.cost_repeats}\n")
    print("| image | mask stride | mask size | positive cells | projection s/step | APro s/step | APro / projection |")
    print("|---|---|---|---|---|---|---|")
    for stride in (8, 4):
        c = step_cost(args, image_dir, train_ann, args.cost_size, stride)
        print(f"| {c['image'][0]}x{c['image'][1]} | {stride}{' (default)' if stride == 8 else ''} | "
              f"{c['mask'][0]}x{c['mask'][1]} | {c['positives']} | {c['projection']:.3f} | {c['apro']:.3f} | "
              f"{c['apro'] / c['projection']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
