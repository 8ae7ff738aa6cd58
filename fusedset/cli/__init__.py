"""The ``fusedset`` command. Each subcommand is a module of this package that defines
``register(subparsers)`` (adds its parser and sets ``func``); errors a user can fix are raised as
``UsageError`` and end the command with one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence


class UsageError(Exception):
    """A problem with the command's inputs, reported as one line and exit code 2."""


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusedset", description="Fast set-based face-recognition fusion."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{info.name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except UsageError as exc:
        print(f"fusedset {args.command}: {exc}", file=sys.stderr)
        return 2
