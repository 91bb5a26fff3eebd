#!/usr/bin/env bash
# GPU figures (bench_gpu.py): random weights in the real UNI, UNI2-h and GigaPath architectures, no network.
set -euo pipefail
cd "$(dirname "$0")/.."
test -x .venv/bin/python || make .venv/.installed
.venv/bin/python -m benchmarks.bench_gpu "$@"
