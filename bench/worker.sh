#!/usr/bin/env bash
# Worker vs ONNX Runtime alone on the benchmark MLP (release build, one run, one table).
#   bench/worker.sh [--seconds-per-row N]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
INFERMESH_ONNXRUNTIME_LIB=$(scripts/fetch-ort.sh | tail -n 1)
export INFERMESH_ONNXRUNTIME_LIB
scripts/pyenv.sh
cargo build --release --locked -p infermesh-cli -p infermesh-worker >&2
exec .venv/bin/python bench/worker_vs_ort.py "$@"
