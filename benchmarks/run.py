"""The benchmark suite from a checkout: the same as ``fusedset bench`` (see benchmarks/suite.py)."""

import sys

from fusedset.bench.suite import main

if __name__ == "__main__":
    sys.exit(main())
