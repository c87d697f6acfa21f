#!/usr/bin/env bash
# The GPU evidence script: one command on a lent H200 (torch, Triton, timm preinstalled; no network;
# at most 10 minutes a command, at most 8 files back from $OUT). Stages, each with its own timeout and
# each writing its results under $OUT as it goes, so that a timeout still leaves numbers:
#   1. environment                                    -> env.txt
#   2. the extension build for sm_90, in the background -> build.log
#   3. the headline target timings (Triton ops while the build runs, then the rest)
#                                                      -> bench_cuda_headline.json
#   4. correctness of every op on every GPU backend against the reference (the `cuda`-marked tests),
#      one pytest process per test file, up to eight at a time -> tests.txt
#   5. the per-op runner, torch.compile / FlexAttention peers and whole blocks/models off
#                                                      -> bench_cuda_main.json
#   6. if time remains, the extended pass               -> bench_cuda_extended.json
# plus log.txt (everything printed). The whole script stays inside GPU_CHECK_BUDGET_S (default 530 s).
#
# Usage, from the repository root of the device machine:
#   bash benchmarks/gpu_check.sh              # stages 1-6
#   bash benchmarks/gpu_check.sh --extended   # a second run: build, then only what stage 5 leaves out
#                                             # (compile peers, FlexAttention, blocks, whole models)
#   bash benchmarks/gpu_check.sh --rehearse   # on a machine without a GPU: every stage on the CPU with
#                                             # --quick shapes, to check the plumbing and the timeouts
# Commit the JSON files as benchmarks/results/<date>_<device>_*.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-530}
MODE=main
DEVICE=cuda
QUICK=()
for arg in "$@"; do
  case "$arg" in
    --extended) MODE=extended ;;
    --rehearse) DEVICE=cpu; QUICK=(--quick) ;;
    *) echo "unknown argument $arg (expected --extended or --rehearse)"; exit 2 ;;
  esac
done
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
[ "$DEVICE" = cuda ] && export VLM_KERNELS_CUDA=${VLM_KERNELS_CUDA:-1}
START=$(date +%s)
LOG="$OUT/log.txt"
: >"$LOG"
status=0

say() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# A stage's timeout: what it asks for, capped by what is left of the budget (minus a reserve for the
# stages after it that must still run).
cap() {
  local want=$1 reserve=${2:-0} l
  l=$(( $(left) - reserve ))
  [ "$l" -lt "$want" ] && want=$l
  [ "$want" -lt 5 ] && want=0
  echo "$want"
}
runner() {  # runner <timeout> <args...>: the benchmark runner under a timeout; its JSON is rewritten per case
  local t=$1; shift
  if [ "$t" -le 0 ]; then say "skipped (no time left): benchmarks.run $*"; return 0; fi
  timeout -k 10 "$t" "$PY" -m benchmarks.run --device "$DEVICE" --out "$OUT" --no-plot "${QUICK[@]}" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 124 ] && say "timed out after ${t}s (the JSON keeps the cases measured): benchmarks.run $*"
  [ "$rc" -ne 0 ] && status=1
  return 0
}

say "== 1. environment =="
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv 2>&1 || true
  "$PY" - <<'EOF'
import platform, os, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cpus", os.cpu_count())
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton: not importable", exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "| SMs", p.multi_processor_count, "| memory GiB", round(p.total_memory / 2**30, 1),
          "| capability", f"{p.major}.{p.minor}")
for mod in ("timm", "numpy", "scipy", "matplotlib", "skimage", "vector_quantize_pytorch", "faiss", "hypothesis"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as exc:
        print(mod, "missing:", exc.__class__.__name__)
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tee -a "$LOG"

say "== 2. extension build (background) =="
(
  t0=$(date +%s)
  if ! "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
    echo "pip install failed; trying an in-place build" >>"$OUT/build.log"
    "$PY" setup.py build_ext --inplace >>"$OUT/build.log" 2>&1 || { echo "BUILD FAILED" >>"$OUT/build.log"; exit 1; }
  fi
  echo "build took $(( $(date +%s) - t0 )) s" >>"$OUT/build.log"
) &
BUILD_PID=$!
wait_build() {
  local t
  t=$(cap 240)
  local waited=0
  while kill -0 "$BUILD_PID" 2>/dev/null && [ "$waited" -lt "$t" ]; do sleep 2; waited=$((waited + 2)); done
  if kill -0 "$BUILD_PID" 2>/dev/null; then
    say "build still running after ${waited}s; going on without the compiled backends"; return 1
  fi
  if wait "$BUILD_PID"; then say "build done: $(tail -1 "$OUT/build.log")"; else say "BUILD FAILED (tail of build.log):"; tail -30 "$OUT/build.log" | tee -a "$LOG"; status=1; return 1; fi
  "$PY" -m vlm_kernels info 2>&1 | tee -a "$LOG"
}

if [ "$MODE" = extended ]; then
  wait_build
  say "== extended pass: torch.compile / FlexAttention peers, blocks, whole models =="
  runner "$(cap 600)" --mode extended
  say "done (status $status)"
  exit $status
fi

say "== 3. headline targets =="
# The Triton-only ops first, while the extension compiles (they do not need it).
runner "$(cap 200 300)" --mode headline --ops window_attention,vq
if [ "$DEVICE" = cuda ] && [ "$(left)" -gt 320 ]; then  # the VQ lookup's kernels timed apart, flagged rows
  timeout -k 5 45 "$PY" -c "from benchmarks.bench_vq import vq_breakdown_report; vq_breakdown_report()" 2>&1 | tail -3 | tee -a "$LOG"
fi
wait_build
runner "$(cap 120 240)" --mode headline --ops gumbel,overhead --append
if [ "$DEVICE" = cuda ] && [ "$(left)" -gt 250 ]; then  # did the split Gumbel plan's programs wait or give up?
  timeout -k 5 30 "$PY" -c "from benchmarks.bench_gumbel import split_plan_report; split_plan_report()" 2>&1 | tail -3 | tee -a "$LOG"
fi

say "== 4. correctness on the GPU (cuda-marked tests, one process per file) =="
TESTS_DIR=$(mktemp -d)
T4=$(cap 240 100)
MARK=(-m cuda)
[ "$DEVICE" = cpu ] && MARK=(-m cuda --collect-only)  # rehearsal: collect only (no device to run them on)
test_file() {
  local f=$1 n
  n=$(basename "$f" .py)
  timeout -k 5 "$T4" "$PY" -m pytest "$f" "${MARK[@]}" -q -p no:cacheprovider --no-header -rfE >"$TESTS_DIR/$n.txt" 2>&1
  echo "exit $?" >>"$TESTS_DIR/$n.txt"
}
if [ "$T4" -gt 0 ]; then
  pids=()
  for f in $(grep -l "pytest.mark.cuda" tests/test_*.py); do
    while [ "$(jobs -rp | wc -l)" -ge 8 ]; do sleep 1; done  # up to eight test processes on 16 cores
    test_file "$f" &
    pids+=($!)
  done
  wait "${pids[@]}" 2>/dev/null
else
  say "skipped (no time left)"
fi
: >"$OUT/tests.txt"
for f in "$TESTS_DIR"/*.txt; do
  [ -e "$f" ] || continue
  { echo "### $(basename "$f" .txt)"; cat "$f"; echo; } >>"$OUT/tests.txt"
  grep -q "^exit 0$\|^exit 5$" "$f" || status=1  # 5: no cuda-marked test in that file
done
grep -E "^### |passed|failed|error|^exit" "$OUT/tests.txt" | tee -a "$LOG"

say "== 5. per-op runner (no torch.compile / FlexAttention peers, no blocks or models) =="
runner "$(cap 600 20)" --mode main --ops gumbel,vq,window_attention

if [ "$(left)" -gt 60 ]; then
  say "== 6. extended pass with the time left =="
  runner "$(cap 600 10)" --mode extended
fi
say "done (status $status; $(( $(date +%s) - START ))s)"
exit $status
