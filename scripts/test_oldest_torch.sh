#!/usr/bin/env bash
# The oldest supported torch (2.11, with its Triton 3.6: the H200 machine's stack): a second virtualenv in
# .venv-oldest with that pair from the registry, on Python 3.12 as there, the extension built against it
# (CPU kernels only: nvcc is not needed), then the test suite (Triton through its CPU interpreter).
# torch 2.6 / Triton 3.2 was the floor until 2026-11-30; under it the Triton 3.2 interpreter segfaults in
# the VQ lookup kernel and many Triton tests error, so the floor was raised (README, Install).
# Extra arguments go to pytest.
#   VLM_OLDEST_TORCH   pip spec of the oldest pair (default "torch==2.11.0 triton==3.6.0 torchvision==0.26.0")
#   PYTHON_OLDEST      its Python (default python3.12 where there is one: the extension's file name then
#                      differs from the main venv's, so both builds live side by side in vlm_kernels/)
set -euo pipefail
cd "$(dirname "$0")/.."
# A python3.12 that runs (a pyenv shim may exist for a version that is installed but not selected: then
# the version's own binary is used), else python3.
pick_python() {
  local c
  for c in "${PYTHON_OLDEST:-}" python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 python3; do
    if [ -n "$c" ] && "$c" -c "import sys" >/dev/null 2>&1; then
      command -v "$c" || echo "$c"
      return
    fi
  done
  echo "no runnable Python for the oldest-torch venv" >&2
  return 1
}
PYTHON=$(pick_python)
VENV=.venv-oldest
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
if ! python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.11.') else 1)" 2>/dev/null; then
  # shellcheck disable=SC2086
  python -m pip install -q ${VLM_OLDEST_TORCH:-torch==2.11.0 triton==3.6.0 torchvision==0.26.0}
fi
# The test dependencies (the peers that need a newer torch are left out: they skip).
# Pinned to the pair just installed: otherwise timm's torchvision dependency would pull the newest
# torchvision and, with it, the newest torch over the oldest one.
mkdir -p build
python -m pip freeze | grep -iE '^(torch|triton|torchvision)==' >build/oldest-constraints.txt
# numpy < 2.4: Triton 3.6's interpreter turns 1-element arrays into Python ints with int(array), which
# numpy 2.4 made an error (every Triton kernel with a runtime loop bound fails under TRITON_INTERPRET=1;
# compiled GPU kernels are not affected; fixed in Triton 3.7; vlm_kernels says so in its backend reasons).
python -m pip install -q -c build/oldest-constraints.txt "numpy<2.4" pybind11 ninja pytest scipy matplotlib timm \
  scikit-image tqdm hypothesis
python -c "import torch, triton; print('oldest pair: torch', torch.__version__, 'triton', triton.__version__)"
python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.11.') or '${VLM_OLDEST_TORCH:-}' else 'the oldest-torch venv holds torch ' + torch.__version__)"
# An in-place build lands in vlm_kernels/ under the Python's own file name; when that is the main venv's
# too, the main build is put aside and restored on exit.
SO=$(python -c "import sysconfig; print('vlm_kernels/_C' + sysconfig.get_config_var('EXT_SUFFIX'))")
if [ -e "$SO" ] && [ ! -e "$SO.main" ]; then
  mv "$SO" "$SO.main"
  trap 'rm -f "$SO"; mv "$SO.main" "$SO"' EXIT
fi
mkdir -p build
# build/oldest keeps these objects apart from the main build's (another torch).
VLM_KERNELS_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} python setup.py -q build_ext --inplace --build-temp build/oldest >build/oldest.log 2>&1 \
  || { tail -50 build/oldest.log; exit 1; }
python -m vlm_kernels info
export VLM_KERNELS_TEST_REQUIRE=${VLM_KERNELS_TEST_REQUIRE:-cpu,triton}
python -m pytest tests -q -p no:cacheprovider "$@"
