#!/usr/bin/env bash
# The CPU kernels on 64-bit Arm: cross-compiles csrc/ and the C++ unit tests with Debian's
# g++-aarch64-linux-gnu against an aarch64 libtorch (PyPI's CPU wheel, unpacked, not installed) and runs
# them under qemu-aarch64. Needs: g++-aarch64-linux-gnu, qemu-user, cmake, and pip/apt registry access
# (CI installs the Debian packages in .ci/run). Everything goes under build/aarch64/.
#   VLM_AARCH64_TORCH   torch version of the aarch64 wheel (default 2.9.1)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$ROOT/build/aarch64
TORCH_VERSION=${VLM_AARCH64_TORCH:-2.9.1}
PY=${PYTHON:-python3}
[ -x "$ROOT/.venv/bin/python" ] && PY=$ROOT/.venv/bin/python
for tool in aarch64-linux-gnu-g++ qemu-aarch64 cmake; do
  command -v "$tool" >/dev/null || { echo "test_aarch64: $tool not found (apt-get install g++-aarch64-linux-gnu qemu-user cmake)"; exit 1; }
done
mkdir -p "$WORK"
cd "$WORK"

if [ ! -d torch/torch/share/cmake ]; then
  echo "== aarch64 libtorch $TORCH_VERSION (PyPI wheel, unpacked) =="
  rm -rf wheel torch && mkdir -p wheel
  "$PY" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 --python-version 3.11 \
    --implementation cp -d wheel "torch==$TORCH_VERSION"
  "$PY" -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); [z.extract(n, 'torch') for n in z.namelist() if n.startswith(('torch/lib/', 'torch/include/', 'torch/share/', 'torch.libs/'))]" wheel/torch-*.whl
fi
if [ ! -e sysroot/lib/aarch64-linux-gnu/libz.so.1 ]; then
  echo "== aarch64 zlib (libtorch needs it; Debian package, unpacked) =="
  mkdir -p lists/partial debs && o=(-oAPT::Architecture=arm64 -oAPT::Architectures=arm64 -oDir::State::Lists="$WORK/lists")
  apt-get "${o[@]}" update >/dev/null
  (cd debs && apt-get "${o[@]}" download zlib1g >/dev/null)
  for f in debs/*.deb; do dpkg -x "$f" sysroot; done
fi

echo "== cross-compile (aarch64-linux-gnu-g++) =="
cmake -S "$ROOT" -B build -DCMAKE_TOOLCHAIN_FILE="$ROOT/cmake/aarch64-linux-gnu.cmake" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$WORK/torch/torch/share/cmake" -DCMAKE_EXE_LINKER_FLAGS="-Wl,-rpath-link,$WORK/torch/torch.libs" \
  >configure.log 2>&1 || { cat configure.log; exit 1; }
cmake --build build -j "${MAX_JOBS:-2}"
file build/test_gumbel_cpu | grep -q "ARM aarch64" || { echo "not an aarch64 binary"; exit 1; }

echo "== C++ unit tests under qemu-aarch64 =="
export LD_LIBRARY_PATH="$WORK/torch/torch/lib:$WORK/torch/torch.libs:$WORK/sysroot/lib/aarch64-linux-gnu"
(cd build && ctest --output-on-failure)
