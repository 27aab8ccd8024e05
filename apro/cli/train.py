"""``apro train box``: train SOLOv2 from box annotations with a chosen mask loss (paper Sec. 4.1).

Options come from, in increasing priority: the defaults of :class:`apro.tasks.box.BoxConfig`,
``--config FILE.json``, and the command line. With ``--resume`` the checkpoint's own config is
used; only options that do not change what is computed (paths, the step budget, checkpoint
frequency, workers, device, progress) may be given alongside it.

Multi-process: ``torchrun --nproc_per_node=N -m apro train box ...`` (gloo on CPU, nccl on
CUDA); ``--batch-size`` is per process.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import CommandError

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
                   help="COCO JSON with masks: report mask AP after training (written to OUT/eval.json)")
    p.add_argument("--eval-data", dest="eval_data", metavar="DIR", help="images of --eval-ann (default --data)")
    p.add_argument("--mask-loss", dest="mask_loss", choices=MASK_LOSSES, help="mask loss (default apro)")
    p.add_argument("--model", choices=MODELS, help="network: solov2 (default) or mask2former (query head, docs/mask2former.md)")
    p.add_argument("--backbone", choices=BACKBONES, help="backbone (default efficientnet_lite0)")
    p.add_argument("--backbone-weights", dest="backbone_weights", metavar="PATH",
                   help="local backbone checkpoint (torchvision format for ResNet)")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                   help="start the backbone from random weights")
    p.add_argument("--model-option", dest="model_options", action="append", metavar="KEY=JSON",
                   help="extra SOLOv2 keyword, value as JSON (e.g. fpn_channels=32); repeatable")
    p.add_argument("--steps", type=int, help="optimizer steps in total")
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
    p.add_argument("--resume", metavar="CKPT", help="checkpoint file or run directory to continue")
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
    from ..engine import CheckpointError, load_checkpoint
    from ..tasks.box import BoxConfig

    given = {k: v for k, v in vars(args).items() if k not in ("handler", "command", "task", "config", "resume", "quiet")}
    if "model_options" in given:
        given["model_options"] = _model_options(given["model_options"])
    resume = getattr(args, "resume", None)
    if resume is not None:
        try:
            state = load_checkpoint(resume)
        except CheckpointError as err:
            raise CommandError(str(err)) from None
        values = dict(state["config"])
        for key, value in given.items():
            if key not in _RESUMABLE and _normalised(value) != _normalised(values.get(key)):
                raise CommandError(
                    f"--{key.replace('_', '-')} differs from the checkpoint's {key}={values.get(key)!r}; "
                    f"a resumed run keeps its settings (only {', '.join(sorted(_RESUMABLE))} may change)"
                )
        values.update(given)
        return _make(BoxConfig.from_dict, values, f"checkpoint {state['path']}"), state["path"]
    values = {}
    if getattr(args, "config", None) is not None:
        try:
            values = BoxConfig.from_json(args.config).to_dict()
        except (FileNotFoundError, ValueError, TypeError) as err:
            raise CommandError(str(err)) from None
    values.update(given)
    config = _make(BoxConfig.from_dict, values, "options")
    for key in ("data", "ann"):
        if not getattr(config, key):
            raise CommandError(f"--{key} is required (or set {key!r} in --config)")
    return config, None


def _normalised(value):
    return list(value) if isinstance(value, tuple) else value


def _make(factory, values, source):
    try:
        return factory(values, source=source).validate()
    except (TypeError, ValueError) as err:
        raise CommandError(str(err)) from None


def run(args) -> int:
    from ..engine import CheckpointError, DataError, TrainingError
    from ..tasks.box import build_train_dataset, evaluate_model, train

    config, resume = build_config(args)
    try:
        dataset = build_train_dataset(config)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise CommandError(str(err)) from None
    try:
        result = train(config, resume=resume, dataset=dataset, progress=not getattr(args, "quiet", False))
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
        except (FileNotFoundError, ValueError, OSError) as err:
            raise CommandError(f"evaluation failed: {err}") from None
        print(format_scores(scores))
        (Path(config.out) / "eval.json").write_text(json.dumps(scores, indent=2) + "\n")
    return 0


def format_scores(scores: dict) -> str:
    """One line: mask AP, AP50, AP75 in percent."""
    return "mask AP {AP:.1f}  AP50 {AP50:.1f}  AP75 {AP75:.1f}".format(**scores)


if __name__ == "__main__":  # pragma: no cover
    from . import main

    sys.exit(main(["train", *sys.argv[1:]]))
