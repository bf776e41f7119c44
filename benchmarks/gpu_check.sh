#!/usr/bin/env bash
# GPU readiness in one script (benchmarks/gpu_check.py says what it measures): sized for under 8 minutes on one
# H100/H200 (not yet run on a GPU).
#   benchmarks/gpu_check.sh [--smoke] [--out DIR]      (default DIR: results/gpu-check; --smoke: tiny, on the CPU)
# Writes DIR/gpu_check.json and DIR/gpu_check.md (the block for benchmarks/RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" benchmarks/gpu_check.py "$@"
