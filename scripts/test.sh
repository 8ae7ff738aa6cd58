#!/usr/bin/env bash
# Set everything up (see scripts/setup.sh), then run the whole test suite: lint and format
# check, the Triton compile check for sm_80 and sm_90, and pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh

echo "== ruff"
ruff check .
ruff format --check .
echo "== Triton compile check (sm_80, sm_90)"
env -u TRITON_INTERPRET python -m fusedset.tools.compile_check
echo "== pytest"
python -m pytest "$@"
