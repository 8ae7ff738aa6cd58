# Sourced by scripts/test.sh and scripts/bench.sh: a virtual environment in .venv with torch and
# an editable build of fusedset (C++ CPU kernels, and CUDA kernels when torch is a CUDA build and
# nvcc is found). Running it again reuses what is there and rebuilds only when the C++/CUDA
# sources, the build files or torch changed.
#   FUSEDSET_VENV    where the environment lives (default: .venv in the checkout)
#   FUSEDSET_TORCH   the torch to install (default: torch==2.14.1, the CUDA 13.0 build)
#   FUSEDSET_EXTRAS  the optional dependencies to install (default: test,bench,eval)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${FUSEDSET_VENV:-$ROOT/.venv}
TORCH_SPEC=${FUSEDSET_TORCH:-torch==2.14.1}
EXTRAS=${FUSEDSET_EXTRAS:-test,bench,eval}

# This machine's pip configuration lists local package folders that do not all exist; pip warns
# about each of them on every call. Drop only those lines.
quiet_pip() {
  python -m pip install --disable-pip-version-check "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

if [ ! -x "$VENV/bin/python" ]; then
  PYTHON=$(command -v python3.11 || command -v python3)
  echo "setup: creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

wanted_torch=${TORCH_SPEC#torch==}
if ! python -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$wanted_torch')" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC"
  quiet_pip -q "$TORCH_SPEC"
fi
if ! python -c "import setuptools, wheel, ninja" 2>/dev/null; then
  quiet_pip -q "setuptools>=64" wheel ninja
fi

fingerprint=$(
  cd "$ROOT"
  {
    cat setup.py pyproject.toml
    find csrc -type f | sort | xargs cat
    python -c "import torch; print(torch.__version__)"
    echo "${FUSEDSET_BUILD_CUDA:-auto} ${TORCH_CUDA_ARCH_LIST:-} $EXTRAS"
  } | sha256sum | cut -d' ' -f1
)
stamp="$VENV/.fusedset-build"
if [ "$(cat "$stamp" 2>/dev/null)" != "$fingerprint" ] || ! python -c "import fusedset._C" 2>/dev/null; then
  echo "setup: building fusedset (editable) with extras [$EXTRAS]"
  (cd "$ROOT" && quiet_pip -q --no-build-isolation -e ".[$EXTRAS]")
  echo "$fingerprint" > "$stamp"
fi
python -c "import fusedset; print('setup: fusedset backends', fusedset.backends())"
