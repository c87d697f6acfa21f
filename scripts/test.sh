#!/usr/bin/env bash
# Sets up everything (scripts/setup.sh), then runs the Python tests (pytest; Triton kernels through
# TRITON_INTERPRET=1 when no GPU is present) and the C++ unit tests (CMake + ctest against libtorch).
# Extra arguments go to pytest. Exits non-zero when any test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate

# The compiled CPU kernels and Triton must run here: a broken build fails the tests instead of skipping them.
export VLM_KERNELS_TEST_REQUIRE=${VLM_KERNELS_TEST_REQUIRE:-cpu,triton}

echo "== C++ unit tests (ctest) =="
mkdir -p build
TORCH_PREFIX=$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')
cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" >build/cmake-configure.log 2>&1 \
  || { cat build/cmake-configure.log; exit 1; }
cmake --build build/cmake -j "${MAX_JOBS:-2}"
(cd build/cmake && ctest --output-on-failure)

echo "== Python tests (pytest) =="
python -m pytest tests -q "$@"
