#!/usr/bin/env bash
# Set everything up (see scripts/setup.sh), then without arguments run the kernel benchmark
# suite (`fusedset bench --quick`), the GPU model of every GPU kernel (modeled, not measured:
# python -m fusedset.tools.gpu_model) and the synthetic accuracy benchmark end to end
# (`fusedset synthetic-benchmark`: generate, train both modules, evaluate every method). With
# arguments, run `fusedset bench` with them (see `fusedset bench --help`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh

if [ $# -gt 0 ]; then
  exec fusedset bench "$@"
fi
fusedset bench --quick
python -m fusedset.tools.gpu_model --json bench-results/gpu-model.json \
  --markdown bench-results/gpu-model.md
fusedset synthetic-benchmark --out bench-results/synthetic
