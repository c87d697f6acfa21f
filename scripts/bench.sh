#!/usr/bin/env bash
# Sets up everything (scripts/setup.sh), then runs the benchmark suite on the default sizes: prints a
# table of time, peak memory and ratios against each peer, and writes a JSON record and a PNG plot
# under benchmarks/out/. Extra arguments go to the runner (python -m benchmarks.run --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python -m benchmarks.run "$@"
