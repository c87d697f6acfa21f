#!/usr/bin/env bash
# Sets up everything on a fresh machine: a virtualenv in .venv, torch, the test/benchmark
# dependencies, and the package with its compiled extension (CPU kernels always, CUDA kernels when a
# CUDA toolkit is present). Idempotent: a second run only rebuilds what changed.
#   VLM_TORCH_SPEC   pip spec for torch (default: torch==2.14.1 torchvision==0.29.1, or keep an installed torch)
#   VLM_KERNELS_CUDA, VLM_KERNELS_NO_EXT, TORCH_CUDA_ARCH_LIST, MAX_JOBS: see setup.py
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip

if ! python -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2086
  python -m pip install -q ${VLM_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
fi
python -m pip install -q -r requirements-dev.txt
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}
python -m pip install -q --no-build-isolation --no-deps -e .
python -m vlm_kernels info
