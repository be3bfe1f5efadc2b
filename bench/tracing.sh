#!/usr/bin/env bash
# What metrics and OpenTelemetry traces cost (sampling 0.01 and 1.0 vs off), one run, one
# table. Release builds.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
INFERMESH_ONNXRUNTIME_LIB=$(scripts/fetch-ort.sh | tail -n 1)
export INFERMESH_ONNXRUNTIME_LIB
scripts/pyenv.sh
cargo build --release --locked -p infermesh-cli -p infermesh-worker -p infermesh-gateway >&2
exec .venv/bin/python bench/tracing.py "$@"
