"""``apro train|eval|predict semantic``: point / scribble supervised semantic segmentation (paper Sec. 4.2).

- ``apro train semantic --data DIR --labels points|scribbles --loss apro|treeenergy|pce
  [--config FILE] --steps N --out DIR``: the shared engine (checkpoints, ``--resume``,
  ``log.csv``, progress bar, ``torchrun``), as ``apro train box``.
- ``apro eval semantic RUN_OR_CKPT --data DIR --split val``: mIoU and a per-class IoU table;
  writes ``eval_SPLIT.json`` and ``confusion_SPLIT.png`` beside the checkpoint.
- ``apro predict semantic RUN_OR_CKPT IMAGE... --out DIR``: palette PNGs and overlays.

Options come from, in increasing priority: the defaults of
:class:`apro.tasks.semantic.SemanticConfig`, ``--config FILE.json``, and the command line.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from . import CommandError
from ._run_config import config_from_args

# options that may differ between a checkpoint's config and a resumed run
_RESUMABLE = {"data", "out", "steps", "checkpoint_every", "keep_checkpoints", "num_workers", "device",
              "backbone_weights", "pseudo_labels"}


def add_train_parser(tasks) -> None:
    """Register ``semantic`` under ``apro train``."""
    from ..engine import OPTIMIZERS, SCHEDULES
    from ..tasks.semantic import BACKBONES, LABELS, SEMANTIC_LOSSES

    p = tasks.add_parser(
        "semantic", help="point / scribble supervised semantic segmentation (DeepLabV3+ + APro)",
        description="Train a DeepLabV3+-style network on a VOC split from point or scribble labels (or dense "
                    "pseudo labels) with partial cross-entropy plus a pairwise term: apro (GP on the image "
                    "and on high-level features + LP), treeenergy (TEL) or none (pce). Options left out take "
                    "their value from --config, then from the built-in defaults (the CPU recipe).",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--data", metavar="DIR", help="voc-sparse or VOC2012 directory (default $APRO_DATA/voc-sparse "
                                                 "or ../shared/data/voc-sparse)")
    p.add_argument("--split", help="training split name or split file (default train)")
    p.add_argument("--labels", choices=LABELS, help="training labels (default points)")
    p.add_argument("--pseudo-labels", dest="pseudo_labels", metavar="DIR",
                   help="train on dense pseudo labels DIR/NAME.png ('L', 0..20, 255 ignore) instead")
    p.add_argument("--loss", choices=SEMANTIC_LOSSES, help="pairwise term (default apro)")
    p.add_argument("--config", metavar="FILE.json", help="JSON object of SemanticConfig options")
    p.add_argument("--backbone", choices=BACKBONES, help="backbone (default efficientnet_lite0)")
    p.add_argument("--backbone-weights", dest="backbone_weights", metavar="PATH",
                   help="local backbone checkpoint (torchvision format for ResNet)")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false", help="random backbone init")
    p.add_argument("--freeze-backbone", dest="freeze_backbone", action="store_true",
                   help="train the decoder only (the default CPU recipe)")
    p.add_argument("--train-backbone", dest="freeze_backbone", action="store_false",
                   help="fine-tune the backbone too (paper scale)")
    p.add_argument("--frozen-stages", dest="frozen_stages", type=int, choices=range(5), metavar="K",
                   help="freeze only the stem and the first K backbone stages (0..4; replaces "
                        "--freeze-backbone / --train-backbone)")
    p.add_argument("--crop", type=int, metavar="PX", help="square training crop (default 192; TEL 512)")
    p.add_argument("--long-side", dest="long_side", type=int, metavar="PX",
                   help="resize images to this long side before augmenting (default 256)")
    p.add_argument("--scale", type=float, nargs=2, metavar=("LO", "HI"), help="random scale range")
    p.add_argument("--steps", type=int, help="optimizer steps in total")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="images per step and process")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--optimizer", choices=OPTIMIZERS)
    p.add_argument("--schedule", choices=SCHEDULES, help="decay after warm-up")
    p.add_argument("--warmup-steps", dest="warmup_steps", type=int)
    p.add_argument("--weight-decay", dest="weight_decay", type=float)
    p.add_argument("--no-flip", dest="flip", action="store_false", help="no random horizontal flip")
    p.add_argument("--out", metavar="DIR", help="run directory: checkpoints, log.csv, log.jsonl")
    p.add_argument("--resume", metavar="CKPT", help="checkpoint file or run directory to continue")
    p.add_argument("--seed", type=int)
    p.add_argument("--num-workers", dest="num_workers", type=int, help="data loading processes")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, metavar="N")
    p.add_argument("--keep-checkpoints", dest="keep_checkpoints", type=int, metavar="N")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="no mixed precision on CUDA")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_train)


def build_config(args):
    """The run's SemanticConfig and the checkpoint to resume (or None) from parsed arguments."""
    from ..tasks.semantic import SemanticConfig, default_data_root

    def fill(values):
        if not values.get("data"):
            values["data"] = default_data_root()

    skip = ("handler", "command", "task", "config", "resume", "quiet")
    given = {k: v for k, v in vars(args).items() if k not in skip}
    return config_from_args(SemanticConfig, given, task="semantic", resume=getattr(args, "resume", None),
                            config_file=getattr(args, "config", None), resumable=_RESUMABLE, fill=fill)


def run_train(args) -> int:
    from ..data.voc import VocDataError
    from ..engine import CheckpointError, DataError, TrainingError
    from ..tasks.semantic import build_train_dataset, train

    config, resume = build_config(args)
    try:
        dataset = build_train_dataset(config)
    except (FileNotFoundError, ValueError, OSError, VocDataError) as err:
        raise CommandError(str(err)) from None
    try:
        result = train(config, resume=resume, dataset=dataset, progress=not getattr(args, "quiet", False))
    except (CheckpointError, DataError, TrainingError, FileExistsError, VocDataError) as err:
        raise CommandError(str(err)) from None
    if result.checkpoint is None:  # not rank 0 under torchrun
        return 0
    print(f"trained {result.step} steps; checkpoint {result.checkpoint}; losses in {Path(config.out) / 'log.csv'}")
    return 0


def _load(path):
    from ..engine import CheckpointError
    from ..engine.checkpoint import list_checkpoints
    from ..tasks.semantic import load_trained_model

    try:
        model, config, meta = load_trained_model(path)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        raise CommandError(str(err)) from None
    p = Path(path)
    ckpt = list_checkpoints(p)[-1] if p.is_dir() else p
    return model, config, meta, ckpt


def add_eval_parser(tasks) -> None:
    """Register ``semantic`` under ``apro eval``."""
    p = tasks.add_parser(
        "semantic", help="mIoU of a semantic segmentation checkpoint on a VOC split",
        description="Score a checkpoint (or a run directory's latest) on a split: one confusion matrix over the "
                    "split, void ignored, mIoU over the 21 classes as the VOC devkit computes it. Prints a "
                    "per-class IoU table; writes eval_SPLIT.json and confusion_SPLIT.png beside the checkpoint.",
    )
    p.add_argument("checkpoint", metavar="RUN_OR_CKPT")
    p.add_argument("--data", metavar="DIR", default=None, help="voc-sparse or VOC2012 directory (default: the run's)")
    p.add_argument("--split", default="val", help="split name or file (default val)")
    p.add_argument("--long-side", dest="long_side", type=int, default=None,
                   help="inference long side (default: the run's training long side)")
    p.add_argument("--out", metavar="DIR", default=None, help="where to write the JSON and PNG (default beside the checkpoint)")
    p.add_argument("--save-predictions", dest="save_predictions", action="store_true",
                   help="also write each prediction as a palette PNG under OUT/pred_SPLIT/")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_eval)


def run_eval(args) -> int:
    import torch

    from ..data.voc import VocDataError
    from ..evaluation.semantic import format_iou_table, save_confusion_png, write_scores_json
    from ..tasks.semantic import default_data_root, evaluate_model

    model, config, meta, ckpt = _load(args.checkpoint)
    data = args.data or config.data or default_data_root()
    long_side = args.long_side if args.long_side is not None else config.long_side
    out = Path(args.out) if args.out else ckpt.parent
    out.mkdir(parents=True, exist_ok=True)
    split_tag = Path(args.split).stem
    pred_dir = None
    if args.save_predictions:
        pred_dir = out / f"pred_{split_tag}"
        pred_dir.mkdir(exist_ok=True)
    try:
        scores = evaluate_model(model, data, args.split, long_side=long_side, progress=not args.quiet,
                                predictions_dir=pred_dir)
    except (VocDataError, ValueError, OSError) as err:
        raise CommandError(str(err)) from None
    print(format_iou_table(scores))
    json_path = out / f"eval_{split_tag}.json"
    write_scores_json(scores, str(json_path), checkpoint=str(ckpt), data=str(data), split=args.split,
                      long_side=long_side, loss=config.loss, labels=config.labels)
    png_path = out / f"confusion_{split_tag}.png"
    save_confusion_png(torch.tensor(scores["confusion"]), str(png_path),
                       list(scores["per_class_iou"]), title=f"{ckpt.name} on {args.split}: mIoU {100 * scores['miou']:.1f}")
    print(f"wrote {json_path} and {png_path}")
    return 0


def add_predict_parser(tasks) -> None:
    """Register ``semantic`` under ``apro predict``."""
    p = tasks.add_parser(
        "semantic", help="semantic segmentation of images with a trained checkpoint",
        description="Write OUT/NAME.png (palette PNG of class indices, VOC colours) and OUT/NAME_overlay.jpg "
                    "for each image.",
    )
    p.add_argument("checkpoint", metavar="RUN_OR_CKPT")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--out", metavar="DIR", required=True, help="output directory")
    p.add_argument("--long-side", dest="long_side", type=int, default=None,
                   help="inference long side (default: the run's training long side)")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (default 0.5)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_predict)


def run_predict(args) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from ..data.voc import VocDataError, read_image, voc_palette, write_label
    from ..tasks.semantic import predict_image

    if not 0 <= args.alpha <= 1:
        raise CommandError(f"--alpha must be in [0, 1], got {args.alpha}")
    model, config, meta, _ = _load(args.checkpoint)
    long_side = args.long_side if args.long_side is not None else config.long_side
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    colours = np.array(voc_palette(), dtype=np.float32).reshape(256, 3)
    paths = args.images
    if not args.quiet:
        from tqdm.auto import tqdm

        paths = tqdm(paths, desc="predict", unit="img", dynamic_ncols=True)
    for path in paths:
        try:
            rgb = read_image(path)
        except VocDataError as err:
            raise CommandError(str(err)) from None
        image = torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)
        pred = predict_image(model, image, long_side)
        stem = Path(path).stem
        write_label(out / f"{stem}.png", pred)
        blend = rgb.astype(np.float32) * (1 - args.alpha) + colours[pred.numpy()] * args.alpha
        fg = (pred.numpy() > 0)[..., None]
        overlay = np.where(fg, blend, rgb.astype(np.float32)).clip(0, 255).astype(np.uint8)
        Image.fromarray(overlay).save(out / f"{stem}_overlay.jpg", quality=90)
    print(f"wrote {len(args.images)} prediction(s) to {os.fspath(out)}")
    return 0
