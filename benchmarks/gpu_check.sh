#!/usr/bin/env bash
# The GPU evidence script, for a lent H100/H200 with torch preinstalled and no network:
#   1. builds vlm_kernels._C for sm_90 against the torch already there (no downloads),
#   2. runs the `cuda`-marked tests (every GPU backend against the reference),
#   3. runs the GPU benchmarks (time, peak memory, ratios vs peers, fraction of copy bandwidth),
# and writes everything (device, versions, logs, every number) under $OUT (default benchmarks/out/gpu).
# Usage on the device machine, from the repository root:  bash benchmarks/gpu_check.sh [--quick]
# Commit the resulting bench_cuda*.json (and the logs) as benchmarks/results/<date>_<device>_<ops>.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export VLM_KERNELS_CUDA=1
status=0

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/device.txt"

echo "== build (sm_90) ==" | tee "$OUT/build.log"
t0=$(date +%s)
if ! "$PY" -m pip install --no-build-isolation --no-deps -e . >>"$OUT/build.log" 2>&1; then
  echo "pip install failed; trying an in-place build" | tee -a "$OUT/build.log"
  "$PY" setup.py build_ext --inplace >>"$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
fi
echo "build took $(( $(date +%s) - t0 )) s" | tee -a "$OUT/build.log"
"$PY" -m vlm_kernels info 2>&1 | tee "$OUT/info.txt"

echo "== cuda tests =="
"$PY" -m pytest tests -m cuda -q -p no:cacheprovider 2>&1 | tee "$OUT/cuda_tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== GPU benchmarks =="
"$PY" -m benchmarks.run --device cuda --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
