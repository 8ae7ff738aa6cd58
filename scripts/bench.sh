#!/usr/bin/env bash
# Set everything up (see scripts/setup.sh), then run the benchmark suite: `fusedset bench
# --quick` unless other arguments are given (see `fusedset bench --help`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh

if [ $# -eq 0 ]; then
  set -- --quick
fi
fusedset bench "$@"
