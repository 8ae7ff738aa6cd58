"""``fusedset backends``: what this installation can run."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "backends", help="show the kernels this installation has (C++ CPU, CUDA, Triton)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import fusedset

    available = fusedset.backends()
    if args.json:
        print(json.dumps(available))
    else:
        print(f"fusedset {fusedset.__version__}, torch {torch.__version__}")
        for name, present in available.items():
            print(f"  {name:<17} {'yes' if present else 'no'}")
    return 0
