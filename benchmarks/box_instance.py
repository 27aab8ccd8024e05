"""Box-supervised instance segmentation on real photos: mask AP per (model, mask loss) with one
recipe, budget and seeds (issue 9; paper Tables 4, 5 and 7), the step cost of APro vs
projection at the recipe's resolution, and a qualitative grid.

Data: ``--data-root`` (default ``$APRO_DATA``, else ``../shared/data`` beside the repository)
holding the COCO-format sets ``pennfudan``, ``coco_person``, ``coco_mini20``. The recipe of a
set is ``configs/<set>.json`` (paths in it are relative to the data root).

Every run goes to ``<out>/<set>/<model>-<mask_loss>-s<seed>/``: it is checkpointed, resumed
when interrupted, and once evaluated leaves ``result.json`` (AP, AP50, AP75, seconds, the
commit that produced it, the command, the date), so re-running the same command only does
what is missing. The table is printed from every ``result.json`` found. A recipe with a
cached frozen backbone keeps its features in ``<out>/_features`` (``--feature-cache``), so only
the first run of a set computes them. Examples::

    python benchmarks/box_instance.py --set pennfudan --variants projection apro --seeds 0 1
    python benchmarks/box_instance.py --set pennfudan --table-only
    python benchmarks/box_instance.py --set pennfudan --cost --cost-pairs 10
    python benchmarks/box_instance.py --set pennfudan --grid docs/pennfudan_grid.png
    python benchmarks/box_instance.py --set coco_person --variants projection apro --thresholds 0.5 0.6 0.7
    python benchmarks/box_instance.py --set coco_person --targets runs/bench/coco_person/solov2-apro-s0
    python benchmarks/box_instance.py --set coco_person --target-quality runs/bench/coco_person/solov2-apro-s0
    python benchmarks/box_instance.py --synthetic --variants projection apro --seeds 0
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
SETS = ("pennfudan", "coco_person", "coco_mini20")
MASK_LOSSES = ("projection", "pairwise", "treefilter", "treefilter-local", "crf", "gp", "lp", "apro",
               "gp-lp-c", "lp-gp-c")
MODELS = ("solov2",)  # any name of apro.tasks.box.MODELS, e.g. mask2former
LABELS = {
    "projection": "projection only (unary)", "pairwise": "+ pairwise (BoxInst)", "treefilter": "+ tree filter",
    "treefilter-local": "+ tree filter + LP", "crf": "+ CRF (MAL)", "gp": "+ GP only", "lp": "+ LP only",
    "apro": "+ APro GP-LP-P", "gp-lp-c": "+ GP-LP-C (cascade)", "lp-gp-c": "+ LP-GP-C (cascade)",
}


# What a box run's result depends on (other helpers' uncommitted files elsewhere do not count).
_TRAINED_BY = ("apro/modeling", "apro/losses", "apro/tasks/box.py", "apro/engine", "apro/data", "apro/evaluation",
               "apro/propagation.py", "apro/tree.py", "apro/_kernels.py", "configs", "benchmarks/box_instance.py")


def default_data_root() -> str:
    return os.environ.get("APRO_DATA") or str(REPO.parent / "shared" / "data")


def git_commit() -> str:
    """HEAD's short hash, with ``+dirty`` when a tracked file the box runs depend on differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *_TRAINED_BY],
                               cwd=REPO, capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def load_recipe(path: Path, data_root: str) -> dict:
    """The recipe's :class:`~apro.tasks.box.BoxConfig` values, data paths under ``data_root``."""
    from apro.tasks.box import BoxConfig

    return BoxConfig.from_json(path, data_root=data_root).to_dict()


def synthetic_recipe(root: Path) -> dict:
    """A synthetic set of textured shapes (``--synthetic``: no real data needed) and a small
    recipe for it (64 x 64 images, 3 classes, 200 steps)."""
    from apro.data import make_synthetic_coco

    train = make_synthetic_coco(root / "train", 48, size=(64, 64), num_classes=3, seed=1)
    val = make_synthetic_coco(root / "val", 24, size=(64, 64), num_classes=3, seed=2)
    return dict(data=train.image_dir, ann=train.train_ann, eval_data=val.image_dir, eval_ann=val.eval_ann,
                short_sides=[64], max_size=64, steps=200, batch_size=4, optimizer="adamw", lr=0.002,
                weight_decay=0.05, schedule="cosine", warmup_steps=20, checkpoint_every=100, budget_minutes=5,
                model_options=dict(mask_stride=4, fpn_channels=32, head_channels=64, mask_channels=16,
                                   mask_branch_channels=32, grid_sizes=[12, 8], scale_ranges=[[1, 32], [24, 4096]]))


def _config(values: dict, model: str, mask_loss: str, seed: int, out: Path, steps=None):
    from apro.tasks.box import BoxConfig

    v = dict(values, model=model, mask_loss=mask_loss, seed=seed, out=str(out))
    if steps is not None:
        v["steps"] = steps
    return BoxConfig.from_dict(v, source="recipe").validate()


def _test_short_side(config) -> int:
    return int(getattr(config, "test_short_side", None) or max(config.short_sides))


def _clear_unstarted(run_dir: Path) -> None:
    """Drop the logs of a run stopped before its first checkpoint: there is nothing to resume,
    and the trainer refuses a folder that already holds logs."""
    for name in ("log.csv", "log.jsonl", "train_seconds.json"):
        path = run_dir / name
        if path.exists():
            print(f"  {run_dir}: no checkpoint to resume; removing the stale {name} and starting again", flush=True)
            path.unlink()


def run_one(values, model, mask_loss, seed, run_dir: Path, args) -> dict:
    """Train (or resume) and evaluate one run; returns its result row (also written to disk)."""
    from apro.engine.checkpoint import list_checkpoints
    from apro.tasks.box import evaluate_model, train

    done = run_dir / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    config = _config(values, model, mask_loss, seed, run_dir, args.steps)
    found = list_checkpoints(run_dir) if run_dir.exists() else []
    seconds_before = 0.0
    timing = run_dir / "train_seconds.json"
    if timing.exists():
        seconds_before = json.loads(timing.read_text()).get("seconds", 0.0)
    started = run_dir / "started.json"
    if not found:
        run_dir.mkdir(parents=True, exist_ok=True)
        _clear_unstarted(run_dir)
        seconds_before = 0.0
        started.write_text(json.dumps({"commit": git_commit(), "date": _now()}) + "\n")
    start = time.perf_counter()
    if not found or int(found[-1].stem.split("_")[-1]) < config.steps:
        result = train(config, resume=found[-1] if found else None, progress=not args.quiet)
        model_ = result.model
    else:
        from apro.tasks.box import load_trained_model

        model_, _, _ = load_trained_model(found[-1])
    seconds = seconds_before + time.perf_counter() - start
    timing.write_text(json.dumps({"seconds": seconds}))
    from apro.data import CocoBoxDataset

    train_set = CocoBoxDataset(config.data, config.ann, train=True, check_files=False)
    start = time.perf_counter()
    scores = evaluate_model(model_, config.eval_data or config.data, config.eval_ann,
                            short_side=_test_short_side(config), max_size=config.max_size,
                            category_ids=train_set.category_ids, progress=False)
    row = {
        "model": model, "mask_loss": mask_loss, "seed": seed, "steps": config.steps,
        "batch_size": config.batch_size, "AP": scores["AP"], "AP50": scores["AP50"], "AP75": scores["AP75"],
        "train_seconds": round(seconds, 1), "eval_seconds": round(time.perf_counter() - start, 1),
        "test_short_side": _test_short_side(config), "commit": git_commit(),
        "trained_from": json.loads(started.read_text())["commit"] if started.exists() else None,
        "date": _now(),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "threads": torch.get_num_threads(),
    }
    done.write_text(json.dumps(row, indent=1) + "\n")
    return row


def threshold_scan(run_dir: Path, values: dict, thresholds, args) -> dict:
    """Mask AP of one finished run at each test mask threshold, on its training images (whose
    masks training never reads) and on val; the threshold a user may choose is the one best on
    the training images. Written to ``<run>/thresholds.json``; redone only for new thresholds."""
    from apro.data import CocoBoxDataset
    from apro.engine.checkpoint import list_checkpoints
    from apro.tasks.box import evaluate_thresholds, load_trained_model

    path = run_dir / "thresholds.json"
    done = json.loads(path.read_text()) if path.exists() else {"train": {}, "val": {}}
    found = list_checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"{run_dir} holds no checkpoint")
    model, config, _ = load_trained_model(found[-1])
    category_ids = CocoBoxDataset(config.data, config.ann, train=True, check_files=False).category_ids
    splits = {"train": (config.data, config.ann), "val": (config.eval_data or config.data, config.eval_ann)}
    for split, (images, ann) in splits.items():
        todo = [t for t in thresholds if f"{t:g}" not in done[split]]
        if not todo:
            continue
        # one forward pass per image for every threshold (evaluate_thresholds)
        scores = evaluate_thresholds(model, images, ann, todo, short_side=_test_short_side(config),
                                     max_size=config.max_size, category_ids=category_ids, progress=not args.quiet)
        for t, got in zip(todo, scores):
            done[split][f"{t:g}"] = {k: got[k] for k in ("AP", "AP50", "AP75")}
        done.update(checkpoint=found[-1].name, commit=git_commit(), date=_now(),
                    command="python " + " ".join(shlex.quote(a) for a in sys.argv))
        path.write_text(json.dumps(done, indent=1) + "\n")
    return done


def _train_choice(scan: dict, keys) -> str:
    """The mask threshold (a key of ``keys``) with the best AP on the training images."""
    return max(keys, key=lambda t: scan["train"].get(t, {}).get("AP", -1.0))


def threshold_table(rows: dict) -> str:
    """Per run: train and val AP at each mask threshold, and val AP at the train-chosen one."""
    keys = sorted({t for r in rows.values() for t in r["val"]}, key=float)
    lines = ["| run | " + " | ".join(f"train AP @{t}" for t in keys) + " | " + " | ".join(f"val AP @{t}" for t in keys)
             + " | chosen on train | val AP / AP50 / AP75 there |",
             "|---|" + "---|" * (2 * len(keys) + 2)]
    for name, r in rows.items():
        best = _train_choice(r, keys)
        v = r["val"][best]
        lines.append(f"| {name} | " + " | ".join(f"{r['train'][t]['AP']:.1f}" for t in keys) + " | "
                     + " | ".join(f"{r['val'][t]['AP']:.1f}" for t in keys)
                     + f" | {best} | {v['AP']:.1f} / {v['AP50']:.1f} / {v['AP75']:.1f} |")
    return "\n".join(lines)


def threshold_means(rows: dict) -> str:
    """Per model and loss, the mean over its seeds of val AP at each mask threshold, and of
    val AP / AP50 / AP75 at each run's train-chosen threshold."""
    keys = sorted({t for r in rows.values() for t in r["val"]}, key=float)
    groups: dict = {}
    for name, r in rows.items():
        base, _, seed = name.rpartition("-s")
        groups.setdefault(base, []).append((seed, r))
    lines = ["| run (mean over seeds) | seeds | " + " | ".join(f"val AP @{t}" for t in keys)
             + " | val AP / AP50 / AP75 at the train-chosen threshold |", "|---|---|" + "---|" * (len(keys) + 1)]

    def mean(values):
        return f"{statistics.mean(values):.2f}"

    for base, got in groups.items():
        chosen = [r["val"][_train_choice(r, keys)] for _, r in got]
        lines.append(f"| {base} | {','.join(seed for seed, _ in got)} | "
                     + " | ".join(mean([r["val"][t]["AP"] for _, r in got]) for t in keys) + " | "
                     + " / ".join(mean([c[k] for c in chosen]) for k in ("AP", "AP50", "AP75")) + " |")
    return "\n".join(lines)


def table(set_dir: Path, eval_ann: str, models, losses) -> str:
    from apro.evaluation import evaluate_masks, filled_box_predictions

    rows = [json.loads(p.read_text()) for p in sorted(set_dir.glob("*/result.json"))]
    box = evaluate_masks(filled_box_predictions(eval_ann), eval_ann)
    lines = ["| model | mask loss | seeds | AP | AP50 | AP75 | train min / run | commit |",
             "|---|---|---|---|---|---|---|---|",
             f"| - | filled GT boxes (reference) | - | {box['AP']:.1f} | {box['AP50']:.1f} | {box['AP75']:.1f} | - | - |"]
    for model in models:
        for loss in losses:
            got = sorted((r for r in rows if r["model"] == model and r["mask_loss"] == loss), key=lambda r: r["seed"])
            if not got:
                continue

            def cell(key):
                vals = [r[key] for r in got]
                if len(vals) == 1:
                    return f"{vals[0]:.1f}"
                return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}"

            seeds = ",".join(str(r["seed"]) for r in got)
            minutes = statistics.mean(r["train_seconds"] for r in got) / 60
            commits = ",".join(sorted({r.get("trained_from") or r["commit"] for r in got}))
            lines.append(f"| {model} | {LABELS.get(loss, loss)} | {seeds} | {cell('AP')} | {cell('AP50')} | "
                         f"{cell('AP75')} | {minutes:.0f} | {commits} |")
    per_seed = ["", "Per run (AP / AP50 / AP75):", ""]
    for r in sorted(rows, key=lambda r: (r["model"], MASK_LOSSES.index(r["mask_loss"]) if r["mask_loss"] in MASK_LOSSES else 99, r["seed"])):
        per_seed.append(f"- {r['model']} {r['mask_loss']} seed {r['seed']}: {r['AP']:.1f} / {r['AP50']:.1f} / "
                        f"{r['AP75']:.1f}, {r['steps']} steps x {r['batch_size']}, {r['train_seconds'] / 60:.0f} min, "
                        f"trained from {r.get('trained_from') or '?'}, evaluated at {r['commit']}, {r['date']}")
    return "\n".join(lines + per_seed)


def step_cost(values, args) -> dict:
    """Median seconds per optimizer step with projection only and with APro, the two models
    stepping alternately (order swapped every pair) on the same real training batches at the
    recipe's largest short side. Each batch is first stepped once untimed, so that a cached
    frozen backbone is timed in its steady state, as in training after the first epochs."""
    from apro.data import collate_batch
    from apro.engine import build_optimizer
    from apro.tasks.box import build_model, build_train_dataset

    model_name = args.models[0]
    config = _config(values, model_name, "apro", 0, Path(args.out) / "_cost")
    dataset = build_train_dataset(dataclasses.replace(config, short_sides=(max(config.short_sides),), flip=False))
    batches = [collate_batch([dataset[(k * config.batch_size + i) % len(dataset)] for i in range(config.batch_size)])
               for k in range(args.cost_batches)]
    models, optimizers = {}, {}
    for loss in ("projection", "apro"):
        torch.manual_seed(0)
        c = dataclasses.replace(config, mask_loss=loss)
        models[loss] = build_model(c, dataset.num_classes).train()
        optimizers[loss] = build_optimizer(models[loss], c)

    def step(loss, batch):
        start = time.perf_counter()
        losses = models[loss](batch["images"], valid=batch["valid"], targets=batch["targets"])
        optimizers[loss].zero_grad()
        losses["loss"].backward()
        optimizers[loss].step()
        return time.perf_counter() - start

    for batch in batches:  # warm-up: numba compilation, allocator, feature cache
        for loss in models:
            step(loss, batch)
    times = {k: [] for k in models}
    ratios = []
    for pair in range(args.cost_pairs):
        batch = batches[pair % len(batches)]
        order = ["projection", "apro"] if pair % 2 == 0 else ["apro", "projection"]
        got = {loss: step(loss, batch) for loss in order}
        for k, v in got.items():
            times[k].append(v)
        ratios.append(got["apro"] / got["projection"])
    return {"projection": statistics.median(times["projection"]), "apro": statistics.median(times["apro"]),
            "ratio": statistics.median(ratios), "pairs": args.cost_pairs, "model": model_name,
            "image": tuple(batches[0]["images"].shape[-2:]), "batch": config.batch_size,
            "mask_stride": config.model_options.get("mask_stride", 8)}


# box width bins (mask pixels): label, lowest, first width past the bin
_WIDTH_BINS = (("< 8", 0, 8), ("8-16", 8, 16), ("16-32", 16, 32), (">= 32", 32, float("inf")),
               ("all", 0, float("inf")))


def _captured_losses(run_dir, batches: int):
    """Load the last checkpoint of a trained SOLOv2 run and yield, for ``batches`` of its own
    training images (recipe's test short side, no flip), what its mask loss sees: a dict with
    ``logits`` (P, 1, h, w) of the positives, ``box_mask`` (P, 1, h, w), ``image`` (P, 3, h, w)
    RGB at mask resolution, ``boxes`` (P, 4) input pixels, ``image_index`` (P,), the ``batch`` and
    the ``dataset``. Runs that are not SOLOv2 are refused."""
    import apro.modeling.solov2 as solov2
    from apro.data import collate_batch
    from apro.engine.checkpoint import list_checkpoints
    from apro.tasks.box import build_train_dataset, load_trained_model

    checkpoints = list_checkpoints(Path(run_dir))
    if not checkpoints:
        raise SystemExit(f"error: no checkpoint in {run_dir}")
    model, config, _ = load_trained_model(checkpoints[-1])
    if not isinstance(model, solov2.SOLOv2):
        raise SystemExit(f"error: these diagnostics read SOLOv2 runs; {run_dir} holds a {type(model).__name__}")
    dataset = build_train_dataset(dataclasses.replace(config, short_sides=(_test_short_side(config),), flip=False))
    seen = {}
    real_loss, real_boxes, real_masks = solov2.box_mask_loss, solov2.box_masks, solov2._dynamic_masks

    def loss(name, logits, box_mask, image, tree=None, return_terms=False, options=None):
        seen.update(logits=logits.detach(), box_mask=box_mask, image=image)
        return real_loss(name, logits, box_mask, image, tree=tree, return_terms=return_terms, options=options)

    def boxes(b, size, stride):
        seen["boxes"] = b.detach()
        return real_boxes(b, size, stride)

    def masks(kernels, image_index, features):
        seen["image_index"] = image_index
        return real_masks(kernels, image_index, features)

    solov2.box_mask_loss, solov2.box_masks, solov2._dynamic_masks = loss, boxes, masks
    try:
        model.train()
        for k in range(batches):
            indices = [(k * config.batch_size + i) % len(dataset) for i in range(config.batch_size)]
            batch = collate_batch([dataset[i] for i in indices])
            seen.clear()
            with torch.no_grad():
                model(batch["images"], valid=batch["valid"], targets=batch["targets"])
            if "boxes" in seen:
                yield dict(seen, batch=batch, dataset=dataset, indices=indices)
    finally:
        solov2.box_mask_loss, solov2.box_masks, solov2._dynamic_masks = real_loss, real_boxes, real_masks


def _box_widths(box_mask: torch.Tensor) -> torch.Tensor:
    return box_mask.amax(dim=-2).sum(dim=(-1, -2)).flatten()  # box width in mask pixels


def target_drift(run_dirs, batches: int) -> list[dict]:
    """How far each pairwise target sits from the prediction ``p`` it is built from, on a trained
    model's own training batches (recipe's test short side, no flip): per positive, the mean of
    ``target - p`` over the box pixels with ``p > 0.5`` (negative = the target erodes the mask),
    pooled over the positives of each box-width bin (mask pixels). Targets: GP (two stages,
    released scales), LP (5 x 5, 20 steps, box-masked) and the tree filter (TEL's sigma 0.02),
    each computed as the loss computes it."""
    from apro import minimum_spanning_tree
    from apro.losses.box import two_stage_gp
    from apro.losses.registry import tree_guide
    from apro.propagation import local_propagation, tree_filter

    rows = []
    for run_dir in run_dirs:
        sums = {}
        for seen in _captured_losses(run_dir, batches):
            logits, box_mask, image = seen["logits"], seen["box_mask"], seen["image"]
            p = torch.sigmoid(logits)
            b = box_mask.to(p.dtype)
            guide = tree_guide("apro", image)
            targets = {
                "GP": two_stage_gp(p, minimum_spanning_tree(guide), 0.01, 0.07),
                "LP": local_propagation(p, guide, 5, 0.15, 20, mask=b),
                "tree filter": tree_filter(p, minimum_spanning_tree(tree_guide("treefilter", image)), 0.02),
            }
            cols = _box_widths(b)
            fg = (p > 0.5) & (b > 0)
            count = fg.sum(dim=(1, 2, 3))
            for name, t in targets.items():
                diff = ((t - p) * fg).sum(dim=(1, 2, 3))
                for width, lo, hi in _WIDTH_BINS:
                    sel = (cols >= lo) & (cols < hi)
                    acc = sums.setdefault((name, width), [0.0, 0, 0])
                    acc[0] += float(diff[sel].sum())
                    acc[1] += int(count[sel].sum())
                    acc[2] += int((sel & (count > 0)).sum())
        for (name, width), (total, count, instances) in sums.items():
            rows.append({"run": str(run_dir), "target": name, "width": width, "positives": instances,
                         "pixels": count, "mean": total / count if count else float("nan")})
    return rows


def _gt_masks(seen, coco) -> torch.Tensor:
    """The ground-truth instance mask of every captured positive, ``(P, 1, h, w)`` float: the
    annotation's polygon rasterised at the file's size, resized (nearest) as the image was, padded
    like the batch and average-pooled to the mask grid (a mask pixel counts as object when more
    than half of it is)."""
    import torch.nn.functional as F

    dataset, batch = seen["dataset"], seen["batch"]
    hp, wp = batch["images"].shape[-2:]
    h, w = seen["box_mask"].shape[-2:]
    stride = hp // h
    out = torch.zeros(seen["box_mask"].shape)
    for n, (b, box) in enumerate(zip(seen["image_index"].tolist(), seen["boxes"])):
        info = dataset.images[seen["indices"][b]]
        target = batch["targets"][b]
        k = int(torch.nonzero((target["boxes"] == box.cpu()).all(dim=1))[0])
        ann = coco.anns[info["ann_ids"][k]]
        full = torch.from_numpy(coco.annToMask(ann)).float()[None, None]
        nh, nw = target["size"]
        canvas = torch.zeros(1, 1, hp, wp)
        canvas[..., :nh, :nw] = F.interpolate(full, size=(nh, nw), mode="nearest")
        out[n] = (F.avg_pool2d(canvas, stride) > 0.5).float()[0]
    return out


# (label, kernel size, iterations) of the LP targets compared by target_quality
_LP_SETTINGS = (("LP 5x5 T20 (released)", 5, 20), ("LP 5x5 T10", 5, 10), ("LP 5x5 T5", 5, 5),
                ("LP 3x3 T20", 3, 20), ("LP 3x3 T10", 3, 10))


def _gp_label(zeta_gl: float, zeta_gh) -> str:
    return f"GP {zeta_gl:g} / {zeta_gh:g}" if zeta_gh is not None else f"GP {zeta_gl:g}, one stage"


def target_quality(run_dirs, batches: int, gp_scales=None, lp_settings=None) -> list[dict]:
    """How good each pairwise target is, measured against the ground-truth masks of the training
    images (which box supervision never reads; a diagnostic for tuning on the train split): per
    positive of a trained model's own training batches, inside its box, the IoU of ``target > 0.5``
    with the instance's mask and the mean ``|target - mask|`` (what the L1 term pulls ``p`` toward),
    averaged over the positives of each box-width bin. ``p`` and the filled box are the references; the targets
    are GP (released scales), LP box-masked with several kernel sizes and step counts (the
    released 5 x 5, 20 steps assume stride-4 masks), the tree filter, and the two cascades.

    ``gp_scales`` (``[(zeta_gl, zeta_gh or None), ...]``) and ``lp_settings`` (``[(kernel, zeta_s,
    iterations), ...]``), when given, replace those targets by a grid of GP and LP settings (a
    scale search on the training images; no cascades or tree filter then)."""
    from pycocotools.coco import COCO

    from apro import minimum_spanning_tree
    from apro.losses.box import two_stage_gp
    from apro.losses.registry import tree_guide
    from apro.propagation import local_propagation, tree_filter

    rows = []
    for run_dir in run_dirs:
        sums, coco = {}, None
        for seen in _captured_losses(run_dir, batches):
            if coco is None:
                coco = COCO(seen["dataset"].ann_file)
            gt = _gt_masks(seen, coco)
            p = torch.sigmoid(seen["logits"]).float()
            b = seen["box_mask"].float()
            guide = tree_guide("apro", seen["image"])
            tree = minimum_spanning_tree(guide)
            targets = {"filled box": b, "p": p}
            if gp_scales or lp_settings:
                for zeta_gl, zeta_gh in gp_scales or ():
                    targets[_gp_label(zeta_gl, zeta_gh)] = two_stage_gp(p, tree, zeta_gl, zeta_gh)
                for k, zeta_s, t in lp_settings or ():
                    targets[f"LP {k}x{k} zeta_s {zeta_s:g} T{t}"] = local_propagation(p, guide, k, zeta_s, t, mask=b)
            else:
                gp = two_stage_gp(p, tree, 0.01, 0.07)
                targets["GP"] = gp
                for label, k, t in _LP_SETTINGS:
                    targets[label] = local_propagation(p, guide, k, 0.15, t, mask=b)
                targets["GP-LP-C"] = local_propagation(gp, guide, 5, 0.15, 20, mask=b)
                targets["LP-GP-C"] = two_stage_gp(targets[_LP_SETTINGS[0][0]], tree, 0.01, 0.07)
                targets["tree filter"] = tree_filter(
                    p, minimum_spanning_tree(tree_guide("treefilter", seen["image"])), 0.02)
            cols = _box_widths(b)
            area = b.sum(dim=(1, 2, 3)).clamp_min(1)
            for name, t in targets.items():
                fg = (t > 0.5).float() * b
                inter = (fg * gt).sum(dim=(1, 2, 3))
                union = ((fg + gt * b) > 0).float().sum(dim=(1, 2, 3)).clamp_min(1)
                iou = inter / union
                l1 = ((t - gt).abs() * b).sum(dim=(1, 2, 3)) / area
                for width, lo, hi in _WIDTH_BINS:
                    sel = (cols >= lo) & (cols < hi)
                    acc = sums.setdefault((name, width), [0.0, 0.0, 0])
                    acc[0] += float(iou[sel].sum())
                    acc[1] += float(l1[sel].sum())
                    acc[2] += int(sel.sum())
        for (name, width), (iou, l1, n) in sums.items():
            rows.append({"run": str(run_dir), "target": name, "width": width, "positives": n,
                         "iou": 100 * iou / n if n else float("nan"), "l1": l1 / n if n else float("nan")})
    return rows


def _print_by_width(rows, what: str, cell) -> None:
    """One markdown table per run: a row per target, a column per box-width bin (positives in
    the header), ``cell(row)`` in each cell."""
    bins = [label for label, _, _ in _WIDTH_BINS]
    for run in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == run]
        count = {r["width"]: r["positives"] for r in mine}
        print(f"\n{Path(run).name}: {what}, by box width in mask pixels (positives)\n")
        print("| target | " + " | ".join(f"{b} ({count.get(b, 0)})" for b in bins) + " |")
        print("|---" * (len(bins) + 1) + "|")
        table = {(r["target"], r["width"]): r for r in mine}
        for target in dict.fromkeys(r["target"] for r in mine):
            print(f"| {target} | " + " | ".join(cell(table[(target, b)]) for b in bins) + " |")


def qualitative_grid(values, set_dir: Path, models, losses, path: Path, images: int, seed: int) -> Path:
    """PNG: columns = the first ``images`` val images; first row the photo with its ground-truth
    boxes, then one row per trained variant of ``seed`` (its detections scored >= 0.3, masks
    tinted and outlined over the photo)."""
    from PIL import Image, ImageDraw

    from apro.data import CocoBoxDataset, collate_batch
    from apro.engine.checkpoint import list_checkpoints
    from apro.figures import overlay
    from apro.tasks.box import load_trained_model

    config = _config(values, "solov2", "apro", seed, set_dir / "_grid")
    dataset = CocoBoxDataset(config.eval_data or config.data, config.eval_ann, train=False,
                             short_sides=(_test_short_side(config),), max_size=config.max_size, flip=False)
    items = [dataset[i] for i in range(min(images, len(dataset)))]
    cell_h = 200
    rows = []
    names = []
    photo = []
    for item in items:
        img = (item["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        photo.append(img)
    boxes_row = []
    for item, img in zip(items, photo):
        canvas = img
        for box in item["boxes"].tolist():
            canvas = overlay(canvas, np.zeros(img.shape[:2], bool), box=box)
        boxes_row.append(canvas)
    rows.append(boxes_row)
    names.append("photo + GT boxes (the supervision)")
    for model in models:
        for loss in losses:
            run = set_dir / f"{model}-{loss}-s{seed}"
            found = list_checkpoints(run) if run.exists() else []
            if not found:
                continue
            net, _, _ = load_trained_model(found[-1])
            row = []
            with torch.no_grad():
                for item, img in zip(items, photo):
                    batch = collate_batch([item])
                    out = net(batch["images"], valid=batch["valid"])[0]
                    h, w = img.shape[:2]
                    canvas = img
                    keep = out["scores"] >= 0.3
                    for m in out["masks"][keep]:
                        canvas = overlay(canvas, m[:h, :w].numpy())
                    row.append(canvas)
            rows.append(row)
            names.append(f"{model} {LABELS.get(loss, loss)}")
    if len(rows) == 1:
        raise SystemExit(f"no trained run of seed {seed} under {set_dir}: nothing to draw")
    tiles = []
    for row in rows:
        resized = [Image.fromarray(t).resize((max(1, round(t.shape[1] * cell_h / t.shape[0])), cell_h)) for t in row]
        tiles.append(resized)
    widths = [t.width for t in tiles[0]]
    label_w = 190
    sheet = Image.new("RGB", (label_w + sum(widths) + 4 * len(widths), len(tiles) * (cell_h + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (name, row) in enumerate(zip(names, tiles)):
        y = r * (cell_h + 4)
        draw.text((4, y + cell_h // 2 - 6), name, fill="black")
        x = label_w
        for t in row:
            sheet.paste(t, (x, y))
            x += t.width + 4
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _gp_scale(text: str):
    """``ZGL,ZGH`` (ZGH ``none`` for one stage) -> ``(zeta_gl, zeta_gh or None)``, each checked as the loss does."""
    from apro._validation import check_positive

    try:
        lo, hi = text.split(",")
        return check_positive(lo, "ZGL"), None if hi.strip().lower() == "none" else check_positive(hi, "ZGH")
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"expected ZGL,ZGH with scales > 0 (e.g. 0.01,0.07 or 0.1,none), "
                                         f"got {text!r}: {err}") from None


def _lp_setting(text: str):
    """``K,ZS,T`` -> ``(kernel size, zeta_s, iterations)``, each checked as the loss does (and T >= 1)."""
    from apro._validation import check_count, check_kernel_size, check_positive

    try:
        k, zs, t = text.split(",")
        return check_kernel_size(int(k)), check_positive(zs, "zeta_s"), check_count(int(t), "iterations", 1)
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"expected K,ZS,T: an odd window >= 1, zeta_s > 0, iterations >= 1 "
                                         f"(e.g. 5,0.15,20), got {text!r}: {err}") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=None, help="folder of the sets (default $APRO_DATA or ../shared/data)")
    p.add_argument("--set", default="pennfudan", choices=SETS)
    p.add_argument("--config", help="recipe JSON (default configs/<set>.json)")
    p.add_argument("--synthetic", action="store_true", help="a synthetic set and small recipe instead of --set")
    p.add_argument("--models", nargs="+", default=list(MODELS), help="model names of apro.tasks.box")
    p.add_argument("--variants", nargs="+", default=list(MASK_LOSSES), help="mask losses")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, help="override the recipe's steps (quick checks only)")
    p.add_argument("--out", default=str(REPO / "runs" / "bench"), help="runs folder (resumable)")
    p.add_argument("--table-only", action="store_true", help="print the table of finished runs")
    p.add_argument("--cost", action="store_true", help="measure the APro / projection step cost and stop")
    p.add_argument("--cost-pairs", type=int, default=10)
    p.add_argument("--cost-batches", type=int, default=3, help="distinct batches the cost pairs cycle through")
    p.add_argument("--grid", help="write the qualitative grid PNG here and stop")
    p.add_argument("--grid-images", type=int, default=4)
    p.add_argument("--targets", nargs="+", metavar="RUN_DIR",
                   help="print how far GP, LP and tree-filter targets sit from p on these trained runs' "
                        "training batches, by box width, and stop")
    p.add_argument("--target-quality", nargs="+", metavar="RUN_DIR",
                   help="print how close p and each pairwise target (GP, LP settings, cascades, tree filter) "
                        "are to the ground-truth masks of these trained runs' training batches, by box width, "
                        "and stop")
    p.add_argument("--target-batches", type=int, default=8)
    p.add_argument("--gp-scales", nargs="+", type=_gp_scale, metavar="ZGL,ZGH",
                   help="with --target-quality: GP settings to compare instead of the default targets "
                        "(ZGH 'none' for one stage), e.g. 0.01,0.07 0.05,0.1 0.1,none")
    p.add_argument("--lp-settings", nargs="+", type=_lp_setting, metavar="K,ZS,T",
                   help="with --target-quality: LP settings (window, zeta_s, iterations) to compare, e.g. 5,0.15,20 3,0.3,10")
    p.add_argument("--thresholds", nargs="+", type=float, metavar="T",
                   help="score every finished run of --models/--variants/--seeds at these test mask thresholds "
                        "on its training images and on val, print the table and stop")
    p.add_argument("--feature-cache", default=None,
                   help="folder keeping a cached frozen backbone's features for every run (default "
                        "<out>/_features; 'none': in memory only, per run)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    data_root = args.data_root or default_data_root()
    if args.synthetic:
        args.set = "synthetic"
        values = synthetic_recipe(Path(args.out) / "_synthetic_data")
        recipe_name = "built-in synthetic recipe"
    else:
        recipe = Path(args.config) if args.config else REPO / "configs" / f"{args.set}.json"
        try:
            values = load_recipe(recipe, data_root)
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        recipe_name = recipe.name
        for key in ("ann", "eval_ann"):
            if not os.path.isfile(values.get(key) or ""):
                print(f"error: {key} {values.get(key)!r} of {recipe} not found (--data-root {data_root})",
                      file=sys.stderr)
                return 2
    options = values.get("model_options") or {}
    if options.get("cache_backbone") and args.feature_cache != "none" and "cache_dir" not in options:
        # the same frozen features for every variant and seed: computed by the first run only
        values["model_options"] = dict(options, cache_dir=args.feature_cache or str(Path(args.out) / "_features"))
    meta = values
    set_dir = Path(args.out) / args.set
    set_dir.mkdir(parents=True, exist_ok=True)
    print(f"set {args.set}, recipe {recipe_name} (budget {meta.get('budget_minutes', '?')} min per run), "
          f"torch threads {torch.get_num_threads()}", flush=True)

    if args.cost:
        c = step_cost(values, args)
        print(f"| model | image | mask stride | batch | projection s/step | APro s/step | APro / projection "
              f"(median of {c['pairs']} pairs) |")
        print("|---|---|---|---|---|---|---|")
        print(f"| {c['model']} | {c['image'][0]}x{c['image'][1]} | {c['mask_stride']} | {c['batch']} | "
              f"{c['projection']:.3f} | {c['apro']:.3f} | {c['ratio']:.2f} |")
        return 0
    if args.targets:
        _print_by_width(target_drift(args.targets, args.target_batches),
                        "mean target - p over the box pixels where p > 0.5", lambda r: f"{r['mean']:+.3f}")
        return 0
    if args.target_quality:
        _print_by_width(target_quality(args.target_quality, args.target_batches, args.gp_scales, args.lp_settings),
                        "IoU (%) of target > 0.5 with the GT mask in the box (mean |target - mask|)",
                        lambda r: f"{r['iou']:.1f} ({r['l1']:.3f})")
        return 0
    if args.thresholds:
        rows = {}
        for model in args.models:
            for loss in args.variants:
                for seed in args.seeds:
                    run_dir = set_dir / f"{model}-{loss}-s{seed}"
                    if (run_dir / "result.json").exists():
                        rows[run_dir.name] = threshold_scan(run_dir, values, args.thresholds, args)
        if not rows:
            print(f"error: no finished run under {set_dir} for these models, variants and seeds", file=sys.stderr)
            return 2
        print(threshold_table(rows))
        print()
        print(threshold_means(rows))
        return 0
    if args.grid:
        path = qualitative_grid(values, set_dir, args.models, args.variants, Path(args.grid), args.grid_images,
                                args.seeds[0])
        print(f"wrote {path}")
        return 0
    if not args.table_only:
        for seed in args.seeds:
            for model in args.models:
                for loss in args.variants:
                    run_dir = set_dir / f"{model}-{loss}-s{seed}"
                    row = run_one(values, model, loss, seed, run_dir, args)
                    print(f"  {model} {loss} seed {seed}: AP {row['AP']:.1f} AP50 {row['AP50']:.1f} "
                          f"AP75 {row['AP75']:.1f} ({row['train_seconds'] / 60:.1f} min train)", flush=True)
    print()
    print(table(set_dir, values["eval_ann"], args.models, args.variants))
    return 0


if __name__ == "__main__":
    sys.exit(main())
