#!/usr/bin/env bash
# The fault table: requests through the gateway while one of two workers is killed or
# restarted; failures and latency during the fault. Release builds.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
INFERMESH_ONNXRUNTIME_LIB=$(scripts/fetch-ort.sh | tail -n 1)
export INFERMESH_ONNXRUNTIME_LIB
scripts/pyenv.sh
cargo build --release --locked -p infermesh-worker -p infermesh-gateway >&2
exec .venv/bin/python bench/faults.py "$@"
