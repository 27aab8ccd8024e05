"""Annotation-free pseudo labels on voc-sparse: the unary alone vs APro-refined (docs/zero_shot.md).

For each split, the classifier-guided unary (EfficientNet-Lite0's ImageNet classifier applied
densely, mapped to VOC; not CLIP) is computed once per image; its argmax (MaskCLIP+'s recipe:
the unrefined unary) and the APro pseudo label are written as PNG folders that
``apro train semantic --pseudo-labels DIR`` reads, and both are scored against the split's
dense ground truth (used for scoring only). Prints and writes the mIoU and per-class IoU.

    nice -n 10 python benchmarks/zero_shot.py --splits train val --out runs/zero_shot

``--figure PNG --predictions DIR --names A B C`` instead draws, for the named val images, the
image, the unary, the APro pseudo label, the target network's prediction (``DIR/NAME.png``, from
``apro eval semantic RUN --split val --save-predictions``) and the ground truth.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from apro.data.voc import read_image  # noqa: E402
from apro.evaluation.semantic import format_iou_table  # noqa: E402
from apro.modeling.classifier_unary import ClassifierUnary  # noqa: E402
from apro.modeling.clip.prompts import VOC_CLASSES  # noqa: E402
from apro.tasks.zero_shot import (PseudoLabelSettings, dense_unary, image_tensor, pseudo_label,  # noqa: E402
                                  score_labels, split_files, write_label_png)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def _colour(label):
    import numpy as np

    from apro.data.voc import voc_palette

    pal = np.array(voc_palette(), dtype=np.uint8).reshape(-1, 3)
    return pal[np.asarray(label)]


def figure(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    from apro.data.voc import read_label

    names, images, gts = split_files(args.data, "val")
    where = dict(zip(names, zip(images, gts)))
    cols = ["image", "unary (classifier)", "APro pseudo label", "target network (trained on APro)", "ground truth"]
    fig, axes = plt.subplots(len(args.names), len(cols), figsize=(3.0 * len(cols), 2.4 * len(args.names)))
    axes = np.atleast_2d(axes)
    for r, name in enumerate(args.names):
        image_path, gt_path = where[name]
        panels = [read_image(image_path),
                  _colour(np.asarray(Image.open(Path(args.out) / "val" / "unary" / f"{name}.png"))),
                  _colour(np.asarray(Image.open(Path(args.out) / "val" / "apro" / f"{name}.png"))),
                  _colour(np.asarray(Image.open(Path(args.predictions) / f"{name}.png"))),
                  _colour(read_label(gt_path))]
        for c, panel in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(panel)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=9)
        axes[r, 0].set_ylabel(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(args.figure, dpi=80)
    print(f"wrote {args.figure}")
    return 0


def main(argv=None) -> int:
    d = PseudoLabelSettings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(os.environ.get("APRO_DATA", str(ROOT / ".." / "shared" / "data")),
                                                  "voc-sparse"))
    p.add_argument("--splits", nargs="+", default=["val"])
    p.add_argument("--out", default=str(ROOT / "runs" / "zero_shot"))
    p.add_argument("--background-weight", type=float, default=0.5)
    p.add_argument("--input-size", type=int, default=d.input_size)
    p.add_argument("--working-size", type=int, default=d.working_size)
    p.add_argument("--zeta-gl", type=float, default=d.zeta_gl)
    p.add_argument("--zeta-gh", type=float, default=d.zeta_gh)
    p.add_argument("--lp-iterations", type=int, default=d.lp_iterations)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--figure", metavar="PNG", help="draw the figure instead (needs --predictions, --names)")
    p.add_argument("--predictions", metavar="DIR", help="target network's val predictions NAME.png")
    p.add_argument("--names", nargs="+", default=[])
    args = p.parse_args(argv)
    if args.figure:
        return figure(args)
    torch.set_num_threads(args.threads)

    unary = ClassifierUnary(background_weight=args.background_weight)
    plain = PseudoLabelSettings(refine="none", input_size=args.input_size)
    apro = PseudoLabelSettings(refine="apro", input_size=args.input_size, working_size=args.working_size,
                               zeta_gl=args.zeta_gl, zeta_gh=args.zeta_gh, lp_iterations=args.lp_iterations)
    from tqdm import tqdm

    report = {"date": time.strftime("%Y-%m-%d"), "commit": _commit(), "command": " ".join(sys.argv),
              "unary": "classifier (EfficientNet-Lite0 ImageNet, dense, mapped to VOC)",
              "background_weight": args.background_weight, "settings": asdict(apro), "splits": {}}
    for split in args.splits:
        names, images, _ = split_files(args.data, split)
        dirs = {k: Path(args.out) / split / k for k in ("unary", "apro")}
        for folder in dirs.values():
            folder.mkdir(parents=True, exist_ok=True)
        seconds = {"unary": 0.0, "apro": 0.0}
        for name, path in tqdm(list(zip(names, images)), desc=split, unit="img"):
            if all((dirs[k] / f"{name}.png").exists() for k in dirs):
                continue
            image = image_tensor(read_image(path))
            t = time.perf_counter()
            probs = dense_unary(unary, image, args.input_size)
            write_label_png(dirs["unary"] / f"{name}.png", pseudo_label(None, image, plain, probs=probs)["label"])
            seconds["unary"] += time.perf_counter() - t
            t = time.perf_counter()
            write_label_png(dirs["apro"] / f"{name}.png", pseudo_label(None, image, apro, probs=probs)["label"])
            seconds["apro"] += time.perf_counter() - t
        report["splits"][split] = {}
        for kind, folder in dirs.items():
            scores = score_labels(str(folder), args.data, split)
            scores["per_class_iou"] = dict(zip(VOC_CLASSES, scores["per_class_iou"].values()))
            scores.pop("confusion", None)
            scores["seconds"] = seconds[kind]
            report["splits"][split][kind] = scores
            print(f"== {split} / {kind}: mIoU {100 * scores['miou']:.2f}")
            print(format_iou_table(scores))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "scores.json", "w") as f:
        json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
