"""Run every benchmark script (benchmarks/bench_*.py) with the same arguments.

python benchmarks/run.py [--quick] [--device cpu|cuda] [--out DIR] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

HERE = Path(__file__).parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", default=None, help="op names, e.g. style_pool")
    args, rest = parser.parse_known_args(argv)
    sys.path.insert(0, str(HERE))
    names = sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    unknown = set(args.only or []) - set(names)
    if unknown:
        parser.error(f"unknown benchmark {sorted(unknown)}; have {names}")
    status = 0
    for name in args.only or names:
        status |= importlib.import_module(f"bench_{name}").main(rest)
    return status


if __name__ == "__main__":
    sys.exit(main())
