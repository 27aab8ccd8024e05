"""``apro pseudo-label``: annotation-free pseudo labels for semantic segmentation (paper Sec. 4.3).

``apro pseudo-label clip --checkpoint PATH --data DIR --out DIR [--refine apro|none]``: MaskCLIP
dense prediction from a local CLIP checkpoint (OpenAI ``.pt`` or a Hugging Face folder; the BPE
vocabulary from ``--vocab`` or the checkpoint's folder), refined by APro (or not).

``apro pseudo-label classifier --data DIR --out DIR [--refine apro|none]``: the same with the
EfficientNet-Lite0 ImageNet *classifier* applied densely and mapped to VOC (not CLIP; person
and other classes without an ImageNet counterpart are never predicted).

Output: ``OUT/NAME.png`` ('L', class 0..20, 255 = ignore) for ``apro train semantic --pseudo-labels OUT``.
"""
from __future__ import annotations

import os

from . import CommandError

_NAME = "pseudo-label"


def add_parser(subparsers) -> None:
    from ..tasks.zero_shot import PseudoLabelSettings, REFINE_CHOICES

    d = PseudoLabelSettings()
    p = subparsers.add_parser(
        _NAME, help="pseudo labels for semantic segmentation from a frozen model (no human label)",
        description="Dense unary (MaskCLIP on a CLIP checkpoint, or an ImageNet classifier) -> optional "
                    "APro refinement -> OUT/NAME.png per image.")
    sub = p.add_subparsers(dest="unary", metavar="UNARY", required=True)

    def common(q):
        q.add_argument("--data", default=None, metavar="DIR",
                       help="voc-sparse (or VOC 2012) folder (default $APRO_DATA/voc-sparse or ../shared/data/voc-sparse)")
        q.add_argument("--out", required=True, metavar="DIR", help="folder for NAME.png pseudo labels")
        q.add_argument("--split", default="train", help="split name or split file (default train)")
        q.add_argument("--refine", choices=REFINE_CHOICES, default=d.refine,
                       help="apro: GP (two-stage) then LP on the unary; none: the unary alone (default apro)")
        q.add_argument("--input-size", type=int, default=d.input_size, help=f"long side fed to the unary (default {d.input_size})")
        q.add_argument("--working-size", type=int, default=d.working_size,
                       help=f"long side of the GP/LP grid (default {d.working_size})")
        q.add_argument("--zeta-gl", type=float, default=d.zeta_gl, help=f"GP stage 1 (default {d.zeta_gl})")
        q.add_argument("--zeta-gh", type=float, default=d.zeta_gh, help="GP stage 2 on the first result (default off; the released two-stage GP uses 0.07)")
        q.add_argument("--lp-iterations", type=int, default=d.lp_iterations, help=f"LP steps (default {d.lp_iterations})")
        q.add_argument("--ignore-below", type=float, default=d.ignore_below,
                       help="label 255 where the top soft probability is below this (default 0: none)")
        q.add_argument("--save-soft", action="store_true", help="also write NAME.npz soft labels")
        q.add_argument("--quiet", action="store_true", help="no progress bar")

    c = sub.add_parser("clip", help="MaskCLIP from a local CLIP checkpoint",
                       description="MaskCLIP dense zero-shot prediction (VOC classes, 85 prompt templates).")
    c.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="OpenAI .pt file (e.g. ViT-B-16.pt) or Hugging Face CLIPModel folder")
    c.add_argument("--vocab", default=None, metavar="PATH",
                   help="bpe_simple_vocab_16e6.txt.gz, or a folder with vocab.json + merges.txt "
                        "(default: looked up in the checkpoint's folder)")
    c.add_argument("--classes", default=None, metavar="FILE",
                   help="text file: one class name per line (index = line), default VOC's 21")
    c.add_argument("--no-key-smoothing", action="store_true", help="skip MaskCLIP's key smoothing")
    c.add_argument("--no-prompt-denoising", action="store_true", help="skip MaskCLIP's prompt denoising")
    common(c)
    c.set_defaults(handler=_run)

    k = sub.add_parser("classifier", help="EfficientNet-Lite0 ImageNet classifier, densely (not CLIP)",
                       description="ImageNet classifier at every location, ImageNet classes summed per VOC class.")
    k.add_argument("--background-weight", type=float, default=0.5,
                   help="scale of the unmapped (background) mass (default 0.5, chosen on the train split)")
    common(k)
    k.set_defaults(handler=_run)


def _default_data() -> str:
    root = os.environ.get("APRO_DATA")
    if root:
        return os.path.join(root, "voc-sparse")
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(here, "..", "shared", "data", "voc-sparse")


def _clip_unary(args):
    from ..modeling.clip import MaskCLIP, VOC_PROMPT_NAMES, load_clip, load_tokenizer

    if not os.path.exists(args.checkpoint):
        raise CommandError(f"--checkpoint {args.checkpoint}: no such file or folder")
    vocab = args.vocab
    if vocab is None:
        vocab = args.checkpoint if os.path.isdir(args.checkpoint) else os.path.dirname(os.path.abspath(args.checkpoint))
    names = VOC_PROMPT_NAMES
    if args.classes:
        try:
            with open(args.classes, encoding="utf-8") as f:
                names = [line.strip() for line in f if line.strip()]
        except OSError as exc:
            raise CommandError(f"--classes {args.classes}: {exc.strerror}") from None
        if not names:
            raise CommandError(f"--classes {args.classes} lists no class")
    try:
        clip = load_clip(args.checkpoint)
        tokenizer = load_tokenizer(vocab)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        raise CommandError(str(exc)) from None
    return MaskCLIP(clip, tokenizer, names,
                    key_smoothing=None if args.no_key_smoothing else 1.0,
                    prompt_denoising=None if args.no_prompt_denoising else 0.5)


def _run(args) -> int:
    import torch

    from ..tasks.zero_shot import PseudoLabelSettings, pseudo_label_split

    try:
        settings = PseudoLabelSettings(
            refine=args.refine, input_size=args.input_size, working_size=args.working_size,
            zeta_gl=args.zeta_gl, zeta_gh=args.zeta_gh, lp_iterations=args.lp_iterations,
            ignore_below=args.ignore_below)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    data = args.data or _default_data()
    if args.unary == "clip":
        unary = _clip_unary(args)
    else:
        from ..modeling.classifier_unary import ClassifierUnary
        try:
            unary = ClassifierUnary(background_weight=args.background_weight)
        except (ValueError, ImportError) as exc:
            raise CommandError(str(exc)) from None
    from ..data.voc import VocDataError
    try:
        with torch.no_grad():
            result = pseudo_label_split(unary, data, args.out, settings, split=args.split,
                                        save_soft=args.save_soft, progress=not args.quiet)
    except (VocDataError, FileNotFoundError) as exc:
        raise CommandError(str(exc)) from None
    print(f"wrote {result['images']} pseudo labels ({args.unary} unary, refine={args.refine}) to {result['out']}")
    return 0
