"""Point / scribble supervised semantic segmentation (issue 11; paper Table 2): the step cost of
each loss, and the training table.

``step`` (default): one full training step (forward, loss, backward, SGD update) of the
recipe's model on a real ``voc-sparse`` batch, timed *interleaved*: pce, apro, treeenergy,
pce, apro, ... on the same batch, so that machine load drifts hit every loss alike. Reports
the median step time per loss and the APro overhead as the median of per-round ratios
``apro / pce - 1``. One thread unless ``--threads``; ``--clock cpu`` times the process's CPU
time instead of wall time, which other jobs on a loaded machine disturb less.

``targets``: how good each propagation's pseudo label is, the offline measurement that chose
``SemanticConfig.zeta_g`` / ``zeta_gh``. For trained checkpoints, on the held-out part of the
training images (every 4th line of ``splits/train.txt``, the tuning split of docs/semantic.md;
no val image), at the resolution the loss runs at (logits' grid, image average-pooled): the
accuracy of ``argmax`` of the model's ``p`` and of each target ``y`` (GP on the image, one or
two stages, at several scales; LP; TEL's low-level and low+high-level tree filters) against
the dense ground truth on the pixels the loss applies to (unlabeled, not void), and the
fractions of those pixels each target fixes and breaks. Example::

    python benchmarks/semantic.py targets runs/semantic_long/points_pce_s0/checkpoint_00002000.pt --labels points

``grid``: a picture of the same val images (rows) with their sparse labels, the ground truth
and each run's prediction (columns), classes in VOC colours over the photo::

    python benchmarks/semantic.py grid pCE=runs/semantic_long/points_pce_s0 \
        TEL=runs/semantic_long/points_treeenergy_s0 APro=runs/semantic_long/points_apro-z2_s0 \
        --labels points --out docs/semantic_points_grid.png

``errors``: where each run's val errors go, from the confusion matrix ``apro eval semantic``
wrote (``eval_val.json``): of the ground-truth object pixels, the share predicted as the right
class, as another object class, and as background; of the background pixels, the share
predicted as an object. Separates recognition (which object) from delineation (object or not)::

    python benchmarks/semantic.py errors pCE=runs/semantic_long/points_pce_s1 APro=runs/semantic_long/points_apro_s1

``table``: runs ``apro train semantic`` then ``apro eval semantic`` for every (labels, loss,
seed) asked, one after another, and prints the markdown table of val mIoU. Example::

    python benchmarks/semantic.py step --rounds 10
    python benchmarks/semantic.py table --labels points scribbles --losses pce treeenergy apro \\
        --seeds 0 --steps 250 --crop 192 --long-side 256 --out runs/semantic
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch


def _batch(data, labels, crop, long_side, batch_size, seed=0):
    from apro.data.augmentation import SemanticAugmentation
    from apro.data.voc import VocSegmentation

    ds = VocSegmentation(data, "train", labels=labels,
                         transform=SemanticAugmentation(crop, (0.5, 1.5), long_side,
                                                        generator=torch.Generator().manual_seed(seed)))
    items = [ds[i] for i in range(batch_size)]
    return torch.stack([it["image"] for it in items]), torch.stack([it["label"] for it in items])


def step_cost(args) -> None:
    from apro.tasks.semantic import SemanticConfig, build_model, semantic_losses

    torch.set_num_threads(args.threads)
    image, labels = _batch(args.data, args.labels, args.crop, args.long_side, args.batch_size)
    model = build_model(SemanticConfig(), 21).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    configs = {name: SemanticConfig(loss=name) for name in args.losses}

    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    def one(cfg):
        t = clock()
        out = model(image)
        terms = semantic_losses(cfg, out["logits"], out["features"], image, labels)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        return clock() - t

    for cfg in configs.values():  # warm-up: numba compilation, allocator
        one(cfg)
    times = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, cfg in configs.items():
            times[name].append(one(cfg))
    base = times.get("pce")
    print(f"| loss | median step ({args.clock} s) | overhead vs pce (median of per-round ratios) |")
    print("| --- | --- | --- |")
    for name, ts in times.items():
        over = "" if base is None or name == "pce" else \
            f"{100 * statistics.median(t / b - 1 for t, b in zip(ts, base)):+.0f} %"
        print(f"| {name} | {statistics.median(ts):.3f} | {over} |")
    print(f"\nbatch {args.batch_size} x {args.crop}x{args.crop}, {args.labels}, {args.rounds} interleaved rounds, "
          f"{args.threads} thread(s), {args.clock} time, torch {torch.__version__}")


def _tuning_val_split(data) -> str:
    """Every 4th line of ``splits/train.txt`` written to a temporary list file (its path)."""
    import tempfile

    with open(os.path.join(data, "splits", "train.txt")) as f:
        names = [line.strip() for line in f if line.strip()]
    fd, path = tempfile.mkstemp(suffix=".txt", prefix="tune_val_")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(names[3::4]) + "\n")
    return path


@torch.no_grad()
def targets(args) -> None:
    import torch.nn.functional as F

    from apro.data.augmentation import resize_long_side
    from apro.data.voc import VocSegmentation
    from apro.losses._inputs import normalized_guide, raw_guide
    from apro.losses.box import two_stage_gp
    from apro.propagation import global_propagation, local_propagation, tree_filter
    from apro.tasks.semantic import load_trained_model
    from apro.tree import minimum_spanning_tree

    torch.set_num_threads(args.threads)
    split = args.split or _tuning_val_split(args.data)
    split_desc = args.split or "every 4th line of splits/train.txt"
    sparse = VocSegmentation(args.data, split, labels=args.labels)
    dense = VocSegmentation(args.data, split, labels="gt")
    for ckpt in args.checkpoints:
        model, config, _ = load_trained_model(ckpt)
        stats: dict = {}
        total = 0
        for i in range(len(sparse)):
            item, gt_item = sparse[i], dense[i]
            image, _ = resize_long_side(item["image"], [], config.long_side or max(item["image"].shape[-2:]))
            h, w = image.shape[-2:]
            padded = F.pad(image, (0, -(-w // 32) * 32 - w, 0, -(-h // 32) * 32 - h))[None]
            out = model(padded)
            hh, ww = h // 4, w // 4
            p = out["logits"][..., :hh, :ww].softmax(1)
            feats = out["features"][..., :hh, :ww]
            small = F.adaptive_avg_pool2d(image[None], (hh, ww))
            gt = F.interpolate(gt_item["gt"][None, None].float(), size=(hh, ww), mode="nearest")[0, 0].long()
            lab = F.interpolate(item["label"][None, None].float(), size=(hh, ww), mode="nearest")[0, 0].long()
            where = (gt != 255) & (lab == 255)
            right = p.argmax(1)[0] == gt
            guide = normalized_guide(small)
            tree = minimum_spanning_tree(guide)
            cands = {"p (no propagation)": p}
            for zg in args.zeta_g:
                cands[f"GP zeta_g {zg}"] = global_propagation(p, tree, zg)
                for zgh in args.zeta_gh:
                    cands[f"GP zeta_g {zg}, zeta_gh {zgh}"] = two_stage_gp(p, tree, zg, zgh)
            cands["LP 5x5 zeta_s 0.15, 20 it."] = local_propagation(p, guide, 5, 0.15, 20)
            low = tree_filter(p, minimum_spanning_tree(raw_guide(small)), config.sigma)
            cands["TEL low-level tree"] = low
            cands["TEL low + high-level trees"] = tree_filter(low, minimum_spanning_tree(feats), config.sigma_high)
            for name, y in cands.items():
                ok = y.argmax(1)[0] == gt
                s = stats.setdefault(name, [0, 0, 0])
                s[0] += int((ok & where).sum())
                s[1] += int((ok & ~right & where).sum())
                s[2] += int((~ok & right & where).sum())
            total += int(where.sum())
        print(f"\n{ckpt} ({args.labels}; {len(sparse)} images of {split_desc}; {total} unlabeled pixels with GT)\n")
        print("| target | argmax accuracy (%) | fixed (%) | broken (%) |")
        print("| --- | --- | --- | --- |")
        for name, (ok, fixed, broken) in stats.items():
            print(f"| {name} | {100 * ok / total:.2f} | {100 * fixed / total:.2f} | {100 * broken / total:.2f} |")
    if not args.split:
        os.unlink(split)


@torch.no_grad()
def grid(args) -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    from apro.data.voc import VocSegmentation, voc_palette
    from apro.tasks.semantic import load_trained_model, predict_image

    torch.set_num_threads(args.threads)
    runs = []
    for spec in args.runs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"grid: runs are NAME=RUN_DIR_OR_CKPT, got {spec!r}")
        runs.append((name, load_trained_model(path)))
    sparse = VocSegmentation(args.data, args.split, labels=args.labels)
    dense = VocSegmentation(args.data, args.split, labels="gt")
    step = max(1, len(sparse) // args.images)
    picks = [i * step for i in range(min(args.images, len(sparse)))]
    colours = np.array(voc_palette(), dtype=np.float32).reshape(256, 3)
    height = args.cell
    rows, titles = [], ["photo + " + args.labels, "ground truth"] + [name for name, _ in runs]
    for i in picks:
        item, gt_item = sparse[i], dense[i]
        rgb = (item["image"].permute(1, 2, 0).numpy() * 255).astype(np.float32)

        def tint(label, alpha=0.55, dots=False):
            lab = np.asarray(label)
            shown = lab != 255 if dots else (lab > 0) & (lab != 255)
            out = np.where(shown[..., None], rgb * (1 - alpha) + colours[lab] * alpha, rgb)
            if dots:  # clicks are single pixels: grow them so they show at cell size
                grown = torch.nn.functional.max_pool2d(torch.from_numpy(shown.astype(np.float32))[None], 7, 1, 3)[0]
                idx = torch.nn.functional.max_pool2d(torch.from_numpy(np.where(shown, lab, 0).astype(np.float32))[None],
                                                     7, 1, 3)[0].long().numpy()
                out = np.where(grown.numpy()[..., None] > 0, colours[idx], out)
            return out

        cells = [tint(item["label"], 1.0, dots=True), tint(gt_item["gt"])]
        for _, (model, config, _) in runs:
            cells.append(tint(predict_image(model, item["image"], config.long_side).numpy()))
        h, w = rgb.shape[:2]
        width = int(round(w * height / h))
        rows.append([Image.fromarray(c.clip(0, 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
                     for c in cells])
    pad, head = 4, 18
    col_w = [max(r[c].width for r in rows) for c in range(len(titles))]
    canvas = Image.new("RGB", (sum(col_w) + pad * (len(col_w) + 1), head + len(rows) * (height + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    x = pad
    for c, title in enumerate(titles):
        draw.text((x, 3), title, fill="black")
        for r, row in enumerate(rows):
            canvas.paste(row[c], (x, head + pad + r * (height + pad)))
        x += col_w[c] + pad
    canvas.save(args.out)
    print(f"wrote {args.out}: {len(rows)} {args.split} images x {len(titles)} columns")


def errors(args) -> None:
    print("| run | val mIoU | object px: right class | other object class | background | background px: as object |")
    print("| --- | --- | --- | --- | --- | --- |")
    for spec in args.runs:
        name, sep, path = spec.partition("=")  # split as `grid` does; a bare path names itself
        if not sep:
            name = path = spec
        scores_path = os.path.join(path, "eval_val.json") if os.path.isdir(path) else path
        if not os.path.exists(scores_path):
            raise SystemExit(f"{scores_path} not found: run `apro eval semantic {path} --split val` first")
        with open(scores_path) as f:
            scores = json.load(f)
        conf = torch.tensor(scores["confusion"], dtype=torch.float64)
        obj = conf[1:].sum()
        right = conf[1:, 1:].diagonal().sum()
        as_bg = conf[1:, 0].sum()
        other = obj - right - as_bg
        bg = conf[0].sum()
        bg_as_obj = bg - conf[0, 0]
        pct = lambda a, b: f"{100 * float(a) / float(b):.1f}" if float(b) else "n/a"
        print(f"| {name} | {100 * scores['miou']:.1f} | {pct(right, obj)} | {pct(other, obj)} | {pct(as_bg, obj)} "
              f"| {pct(bg_as_obj, bg)} |")


def table(args) -> None:
    rows = []
    for labels in args.labels:
        for loss in args.losses:
            for seed in args.seeds:
                out = os.path.join(args.out, f"{labels}_{loss}_s{seed}")
                cmd = ["apro", "train", "semantic", "--labels", labels, "--loss", loss, "--steps", str(args.steps),
                       "--crop", str(args.crop), "--long-side", str(args.long_side), "--seed", str(seed),
                       "--out", out, "--quiet"] + (["--data", args.data] if args.data else [])
                if not os.path.exists(os.path.join(out, "log.csv")):
                    t = time.time()
                    subprocess.run(cmd, check=True)
                    print(f"{out}: trained in {time.time() - t:.0f} s", file=sys.stderr)
                if not os.path.exists(os.path.join(out, "eval_val.json")):
                    subprocess.run(["apro", "eval", "semantic", out, "--split", "val", "--quiet"]
                                   + (["--data", args.data] if args.data else []), check=True,
                                   stdout=subprocess.DEVNULL)
                with open(os.path.join(out, "eval_val.json")) as f:
                    rows.append((labels, loss, seed, 100 * json.load(f)["miou"], " ".join(cmd)))
    print("| labels | loss | seed | val mIoU (%) |")
    print("| --- | --- | --- | --- |")
    for labels, loss, seed, miou, _ in rows:
        print(f"| {labels} | {loss} | {seed} | {miou:.1f} |")


def main(argv=None) -> None:
    from apro.tasks.semantic import default_data_root

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode")
    s = sub.add_parser("step", help="interleaved step cost per loss")
    s.add_argument("--rounds", type=int, default=10)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--losses", nargs="+", default=["pce", "apro", "treeenergy"])
    s.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or this process's CPU time (steadier on a loaded machine; one thread)")
    s.add_argument("--labels", default="points")
    t = sub.add_parser("table", help="train and score every run of the table")
    t.add_argument("--labels", nargs="+", default=["points", "scribbles"])
    t.add_argument("--losses", nargs="+", default=["pce", "treeenergy", "apro"])
    t.add_argument("--seeds", nargs="+", type=int, default=[0])
    t.add_argument("--steps", type=int, default=250)
    t.add_argument("--out", default="runs/semantic")
    g = sub.add_parser("targets", help="pseudo-label accuracy of each propagation on held-out training images")
    g.add_argument("checkpoints", nargs="+", help="semantic-task checkpoints (.pt)")
    g.add_argument("--labels", default="points", help="sparse labels that mark the pixels the loss applies to")
    g.add_argument("--split", help="list of image names (default: every 4th line of splits/train.txt)")
    g.add_argument("--zeta-g", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5])
    g.add_argument("--zeta-gh", type=float, nargs="+", default=[0.07, 0.2])
    g.add_argument("--threads", type=int, default=1)
    q = sub.add_parser("grid", help="picture: val images x (sparse labels, GT, each run's prediction)")
    q.add_argument("runs", nargs="+", help="NAME=RUN_DIR_OR_CKPT, one column each")
    q.add_argument("--labels", default="points", help="sparse labels drawn in the first column")
    q.add_argument("--split", default="val")
    q.add_argument("--images", type=int, default=5, help="rows (evenly spaced over the split)")
    q.add_argument("--cell", type=int, default=160, help="row height in pixels")
    q.add_argument("--out", required=True, help="PNG to write")
    q.add_argument("--threads", type=int, default=1)
    e = sub.add_parser("errors", help="where each run's val errors go (object vs background, which object)")
    e.add_argument("runs", nargs="+", help="NAME=RUN_DIR (with eval_val.json) or a scores JSON")
    for p in (s, t, g, q):
        p.add_argument("--data", default=None, help="voc-sparse directory (default $APRO_DATA/voc-sparse)")
        p.add_argument("--crop", type=int, default=192)
        p.add_argument("--long-side", type=int, default=256)
    args = parser.parse_args(argv)
    if args.mode in (None, "step"):
        if args.mode is None:
            args = parser.parse_args(["step", *(argv or [])])
        args.data = args.data or default_data_root()
        step_cost(args)
    elif args.mode == "grid":
        args.data = args.data or default_data_root()
        grid(args)
    elif args.mode == "errors":
        errors(args)
    elif args.mode == "targets":
        args.data = args.data or default_data_root()
        targets(args)
    else:
        table(args)


if __name__ == "__main__":
    main()
