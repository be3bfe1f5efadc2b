#!/usr/bin/env bash
# The README's first command: fetch ONNX Runtime, build, start a local mesh on the bundled
# models, prove it answers a real request, and serve until Ctrl-C. Extra arguments go to
# `infermesh up` (e.g. --check to exit after the request). INFERMESH_INFERMESH_BIN runs an
# infermesh binary already built instead of building one.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
INFERMESH_ONNXRUNTIME_LIB=$(scripts/fetch-ort.sh | tail -n 1)
export INFERMESH_ONNXRUNTIME_LIB
if [ -n "${INFERMESH_INFERMESH_BIN:-}" ]; then
  exec "$INFERMESH_INFERMESH_BIN" up --model-repository "$root/models" "$@"
fi
exec cargo run --release --locked -p infermesh-cli -- up --model-repository "$root/models" "$@"
