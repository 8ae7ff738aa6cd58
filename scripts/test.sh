#!/usr/bin/env bash
# Set everything up (see scripts/setup.sh), then run the whole test suite: lint and format
# checks (ruff, clang-format), the Triton compile check for sm_80 and sm_90, and pytest. Extra
# arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh

echo "== ruff"
ruff check .
ruff format --check .
# The lines of csrc/ changed since .clang-format was added: older code keeps its hand wrapping
# until it is touched (the same check as the pre-commit hook, .pre-commit-config.yaml).
echo "== clang-format"
format_base=$(git log -1 --diff-filter=A --format=%H -- .clang-format)
git-clang-format --diff "${format_base:-HEAD}" -- csrc
echo "== Triton compile check (sm_80, sm_90)"
env -u TRITON_INTERPRET python -m fusedset.tools.compile_check
echo "== pytest"
python -m pytest "$@"
