"""``apro eval box``: COCO mask AP, AP50 and AP75 of a trained checkpoint (paper Sec. 4.1, pycocotools)."""
from __future__ import annotations

import json

from . import CommandError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="score a trained checkpoint on a labelled split",
        description="Score a checkpoint of `apro train TASK` on data with ground truth. Tasks: `box` (COCO mask AP).",
    )
    tasks = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    p = tasks.add_parser(
        "box", help="mask AP of a box-task checkpoint on a COCO JSON with masks",
        description="Predict every image of a COCO instances JSON (which must carry masks) with a checkpoint "
                    "of `apro train box` and print COCO mask AP, AP50 and AP75 (pycocotools).",
    )
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint file or run directory (latest checkpoint)")
    p.add_argument("--data", metavar="DIR", required=True, help="folder of the images")
    p.add_argument("--ann", metavar="EVAL.json", required=True, help="COCO instances JSON with segmentation")
    p.add_argument("--short-side", dest="short_side", type=int, metavar="PX",
                   help="resize images to this short side (default: the run's test_short_side)")
    p.add_argument("--mask-threshold", dest="mask_threshold", type=float, metavar="T",
                   help="binarise the soft masks at T instead of the run's model_options value")
    p.add_argument("--score-threshold", dest="score_threshold", type=float, metavar="S",
                   help="drop detections scored below S instead of the run's model_options value")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--box-baseline", dest="box_baseline", action="store_true",
                   help="also print the AP of the filled ground-truth boxes")
    p.add_argument("--json", metavar="FILE", help="also write the scores to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)
    from .semantic import add_eval_parser  # apro eval semantic
    add_eval_parser(tasks)


def run(args) -> int:
    import torch

    from ..evaluation import evaluate_masks, filled_box_predictions
    from ..engine import CheckpointError
    from ..tasks.box import evaluate_model, load_trained_model, set_test_thresholds
    from .train import format_scores

    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.short_side is not None and args.short_side < 1:
        raise CommandError(f"--short-side must be >= 1, got {args.short_side}")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model, config, meta = load_trained_model(args.checkpoint, device=device)
    except CheckpointError as err:
        raise CommandError(str(err)) from None
    if "category_ids" not in meta:
        raise CommandError(f"{args.checkpoint} does not record the COCO category ids of its classes")
    try:
        set_test_thresholds(model, mask_threshold=args.mask_threshold, score_threshold=args.score_threshold)
    except ValueError as err:
        raise CommandError(str(err).replace("mask_threshold", "--mask-threshold")
                           .replace("score_threshold", "--score-threshold")) from None
    short_side = args.short_side or config.test_short_side
    try:
        scores = evaluate_model(model, args.data, args.ann, short_side=short_side, max_size=config.max_size,
                                category_ids=meta["category_ids"], batch_size=args.batch_size,
                                progress=not args.quiet)
        print(format_scores(scores) + f" (mask threshold {model.mask_threshold:g}, "
              f"score threshold {model.score_threshold:g})")
        result = {"model": scores, "mask_threshold": model.mask_threshold,
                  "score_threshold": model.score_threshold}
        if args.box_baseline:
            box = evaluate_masks(filled_box_predictions(args.ann), args.ann)
            print("filled boxes: " + format_scores(box))
            result["filled_boxes"] = box
    except (FileNotFoundError, ValueError, OSError) as err:
        raise CommandError(str(err)) from None
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
