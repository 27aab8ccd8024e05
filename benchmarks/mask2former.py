"""The Mask2Former-style head trained from boxes on a real COCO-format set: mask AP per mask loss
and the cost of a training step with APro vs projection only (issue 13; paper Table 1).

``train`` trains one run (one mask loss, one seed) through the box task of the engine
(checkpointed, resumable: run the same command again to continue an interrupted run) and
evaluates mask AP on the val split, writing ``OUT/eval.json``. ``cost`` times training steps
of the two losses interleaved on the same batches (same initial weights) and prints the
median per-pair ratio. ``table`` prints the markdown table of finished runs.

    python benchmarks/mask2former.py train --mask-loss apro --seed 0 --out runs/m2f/apro_s0
    python benchmarks/mask2former.py cost --pairs 10
    python benchmarks/mask2former.py table runs/m2f/*

Data: ``--data-root`` (default ``$APRO_DATA`` or ``../shared/data`` relative to the repository
root) and ``--set`` (default ``pennfudan``): ``images/``, ``annotations/instances_train.json``
(only boxes and categories are read for training), ``annotations/instances_val.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

# The CPU recipe (docs/mask2former.md): frozen ImageNet EfficientNet-Lite0, 64-wide head.
# Recipe D of the docs (= configs/pennfudan_mask2former.json); recipe C is D without the mask
# head's coordinate channels (coord_features=False); recipe B: C with --steps 400 --batch-size 2
# and no feature cache; recipe A: B with --lr 5e-4 --queries 50.
MODEL = dict(hidden_dim=64, num_queries=25, num_heads=4, feedforward_dim=256, decoder_layers=3, mask_dim=64,
             mask_stride=4, gp_size=96, zeta_gl=0.025, zeta_gh=0.03, frozen_stages=4, cache_backbone=True,
             coord_features=True)
RECIPE = dict(short_sides=(224, 256), max_size=416, test_short_side=256, steps=2000, batch_size=4,
              optimizer="adamw", lr=1e-3, weight_decay=0.05, schedule="cosine", warmup_steps=30, grad_clip=1.0,
              checkpoint_every=100, keep_checkpoints=2, amp=False)


def _data(args):
    root = Path(args.data_root or os.environ.get("APRO_DATA") or REPO.parent / "shared" / "data") / args.set
    paths = (root / "images", root / "annotations" / "instances_train.json", root / "annotations" / "instances_val.json")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        sys.exit(f"mask2former benchmark: missing {', '.join(missing)} (set --data-root or APRO_DATA)")
    return tuple(str(p) for p in paths)


def _config(args, out):
    from apro.tasks.box import BoxConfig

    images, train_ann, val_ann = _data(args)
    recipe = {**RECIPE, **{k: getattr(args, k) for k in ("steps", "lr", "batch_size") if getattr(args, k)}}
    model = {**MODEL, **({"num_queries": args.queries} if args.queries else {})}
    return BoxConfig(model="mask2former", data=images, ann=train_ann, eval_ann=val_ann, out=str(out),
                     mask_loss=args.mask_loss, seed=args.seed, model_options=model, **recipe)


def run_train(args) -> None:
    from apro.engine import list_checkpoints, load_checkpoint
    from apro.tasks.box import BoxConfig, evaluate_model, load_trained_model, train

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    config = _config(args, out)
    resume = None
    if out.is_dir() and list_checkpoints(out):
        resume = out
        config = BoxConfig.from_dict({**load_checkpoint(out)["config"], "steps": config.steps})
    start = time.time()
    if resume is None or load_checkpoint(out)["step"] < config.steps:
        result = train(config, resume=resume, progress=not args.quiet)
        checkpoint = result.checkpoint
    else:
        checkpoint = list_checkpoints(out)[-1]
    train_s = time.time() - start
    model, config, meta = load_trained_model(checkpoint)
    start = time.time()
    scores = evaluate_model(model, config.eval_data or config.data, config.eval_ann, short_side=config.test_short_side,
                            max_size=config.max_size, category_ids=meta["category_ids"], progress=not args.quiet)
    record = {"mask_loss": config.mask_loss, "seed": config.seed, "steps": config.steps, "checkpoint": str(checkpoint),
              "train_wall_s_this_call": round(train_s, 1), "eval_wall_s": round(time.time() - start, 1),
              "threads": args.threads, **scores}
    (out / "eval.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


def run_cost(args) -> None:
    """Median of per-pair ratios of step times, APro / projection, timed alternately."""
    from apro.data import CocoBoxDataset, collate_batch
    from apro.engine import build_optimizer
    from apro.tasks.box import build_model

    torch.set_num_threads(args.threads)
    config = _config(args, "unused")
    size = config.test_short_side
    dataset = CocoBoxDataset(config.data, config.ann, train=True, short_sides=(size,), max_size=config.max_size,
                             flip=False, seed=0)
    n = config.batch_size
    batches = [collate_batch([dataset[(n * i + j) % len(dataset)] for j in range(n)]) for i in range(args.pairs)]
    runs = {}
    for name in ("projection", "apro"):
        torch.manual_seed(0)
        config.mask_loss = name
        model = build_model(config, dataset.num_classes)
        runs[name] = (model, build_optimizer(model, config))

    def step(name, batch):
        model, opt = runs[name]
        start = time.perf_counter()
        losses = model(batch["images"], valid=batch["valid"], targets=batch["targets"])
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        return time.perf_counter() - start

    for batch in batches:  # warm-up: numba kernels, allocator, the frozen backbone's feature cache
        step("projection", batch), step("apro", batch)
    times = {"projection": [], "apro": []}
    for i, batch in enumerate(batches):
        order = ("projection", "apro") if i % 2 == 0 else ("apro", "projection")
        for name in order:
            times[name].append(step(name, batch))
    ratios = [a / p for a, p in zip(times["apro"], times["projection"])]
    print(f"| short side {size}, batch {n}, {args.pairs} pairs | projection s/step | APro s/step | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| median | {statistics.median(times['projection']):.3f} | {statistics.median(times['apro']):.3f} | "
          f"{statistics.median(ratios):.3f} |")


def run_table(args) -> None:
    rows = []
    for d in args.runs:
        f = Path(d) / "eval.json"
        if f.is_file():
            rows.append(json.loads(f.read_text()))
    print("| mask loss | seed | steps | mask AP | AP50 | AP75 |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["mask_loss"], r["seed"])):
        print(f"| {r['mask_loss']} | {r['seed']} | {r['steps']} | {r['AP']:.1f} | {r['AP50']:.1f} | {r['AP75']:.1f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("train", "cost"):
        p = sub.add_parser(name)
        p.add_argument("--data-root", default=None)
        p.add_argument("--set", default="pennfudan")
        p.add_argument("--mask-loss", default="apro")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--steps", type=int, default=None, help=f"default {RECIPE['steps']}")
        p.add_argument("--batch-size", type=int, default=None, help=f"default {RECIPE['batch_size']}")
        p.add_argument("--lr", type=float, default=None, help=f"default {RECIPE['lr']}")
        p.add_argument("--queries", type=int, default=None, help=f"default {MODEL['num_queries']}")
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--quiet", action="store_true")
        if name == "train":
            p.add_argument("--out", required=True)
        else:
            p.add_argument("--pairs", type=int, default=10)
    p = sub.add_parser("table")
    p.add_argument("runs", nargs="+")
    args = parser.parse_args(argv)
    {"train": run_train, "cost": run_cost, "table": run_table}[args.command](args)


if __name__ == "__main__":
    main()
