"""The ``fusedset`` command. Each subcommand is a module of this package that defines
``register(subparsers)`` (adds its parser and sets ``func``); errors a user can fix are raised as
``UsageError`` and end the command with one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Iterable, Sequence
from typing import Any


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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends an option's default to its help, except a default that means "not given"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def add_command(
    subparsers: argparse._SubParsersAction, name: str, **kwargs: Any
) -> argparse.ArgumentParser:
    """A subcommand's parser, whose help shows every option's default."""
    return subparsers.add_parser(name, formatter_class=HelpFormatter, **kwargs)


def add_defaulted(parser: argparse.ArgumentParser, options: Iterable[tuple[str, Any, str]]) -> None:
    """Options given as (flag, default, help), each of its default's type: the numbers a
    configuration dataclass holds."""
    for flag, default, text in options:
        parser.add_argument(flag, type=type(default), default=default, help=text)


def add_threads(parser: argparse.ArgumentParser, why: str) -> None:
    parser.add_argument("--threads", type=int, default=1, help=f"torch intra-op threads ({why})")


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
