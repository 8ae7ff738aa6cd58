"""``fusedset bench``: time every op and module against eager PyTorch (benchmarks/suite.py)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from fusedset.bench import suite

    parser = subparsers.add_parser(
        "bench", help="benchmark the kernels and modules against eager PyTorch"
    )
    suite.add_arguments(parser)
    parser.set_defaults(func=suite.main_with)
