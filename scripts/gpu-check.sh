#!/usr/bin/env bash
# The GPU check, one command on a machine with a CUDA GPU (about 10 minutes on one H100):
#   bash scripts/gpu-check.sh [OUT_DIR]      (default OUT_DIR: gpu-check-results)
# 1. sets up and builds with the CUDA kernels required (scripts/setup.sh, FUSEDSET_BUILD_CUDA=1);
# 2. the test suite's CUDA tests, with the Triton kernels compiled (not interpreted): every op in
#    fp32, fp16 and bf16 against its reference (pytest -m cuda);
# 3. `fusedset bench --device cuda --quick`;
# 4. the GPU model (python -m fusedset.tools.gpu_model, run beside the tests: it is CPU work)
#    and its prediction beside each measured kernel time.
# Writes OUT_DIR/gpu-check.json and OUT_DIR/gpu-check.md (and the bench's and pytest's files).
# Exits 2 with one line on a machine without a CUDA device, 1 when a step fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:-gpu-check-results}

no_gpu() {
  echo "gpu-check: no CUDA device on this machine ($1); run it on a machine with an NVIDIA GPU" >&2
  exit 2
}
if ! command -v nvidia-smi >/dev/null 2>&1; then
  no_gpu "nvidia-smi not found"
fi
if ! nvidia-smi -L 2>/dev/null | grep -q "^GPU "; then
  no_gpu "nvidia-smi lists no GPU"
fi

export FUSEDSET_BUILD_CUDA=1
source scripts/setup.sh
if ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  no_gpu "torch.cuda.is_available() is False"
fi
unset TRITON_INTERPRET
mkdir -p "$OUT"
python -c "import json, fusedset, torch; print(json.dumps({'gpu': torch.cuda.get_device_name(), \
'torch': torch.__version__, 'backends': fusedset.backends()}))" > "$OUT/device.json"
cat "$OUT/device.json"

echo "== GPU model (in the background: CPU work)"
python -m fusedset.tools.gpu_model --json "$OUT/model.json" > "$OUT/model.txt" 2>&1 &
model=$!

echo "== CUDA tests, Triton compiled"
status=0
python -m pytest -q -m cuda --junitxml="$OUT/pytest.xml" tests || status=1

echo "== fusedset bench --device cuda --quick"
python -m fusedset bench --device cuda --quick --out "$OUT/bench" || status=1

echo "== model against measurement"
wait "$model" || status=1
cat "$OUT/model.txt"
python -m fusedset.tools.gpu_model --compare "$OUT/model.json" "$OUT/bench/results.json" \
  --report "$OUT/gpu-check" || status=1
echo "gpu-check: wrote $OUT/gpu-check.json and $OUT/gpu-check.md"
exit "$status"
