"""The ``apro`` command line: one module per sub-command, each exposing ``add_parser(subparsers)``.

A sub-command's handler receives the parsed arguments; raising :class:`CommandError` prints a
one-line ``apro: error: ...`` to stderr and exits with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("demo", "refine", "affinity", "train", "predict", "eval")


class CommandError(Exception):
    """A user-facing error: bad input the user can fix. Exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apro", description="Label-efficient segmentation via affinity propagation (APro)."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"apro.cli.{name}").add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except CommandError as err:
        print(f"apro: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("apro: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
