#!/usr/bin/env bash
# Direct to a worker vs through the gateway (1 and 2 workers) vs nginx grpc_pass in front
# of the same 2 workers, driven by `infermesh bench`; plus gateway RSS with 1,000 open
# streams. Release builds; one run, one table. nginx comes from Debian (installed if
# missing).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
INFERMESH_ONNXRUNTIME_LIB=$(scripts/fetch-ort.sh | tail -n 1)
export INFERMESH_ONNXRUNTIME_LIB
scripts/pyenv.sh
if ! command -v nginx >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light || \
   DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx) >&2
fi
cargo build --release --locked -p infermesh-cli -p infermesh-worker -p infermesh-gateway >&2
exec .venv/bin/python bench/gateway.py "$@"
