#!/usr/bin/env bash
# The whole test suite: lint, Rust unit and end-to-end tests (real servers on loopback),
# then Triton's Python client, grpcurl and reflection against a real worker process.
# Fetches what it needs itself: ONNX Runtime from its PyPI wheel, the Python test tools
# into .venv.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

step() { printf '\n== %s\n' "$*"; }

step "fetch ONNX Runtime"
INFERMESH_ONNXRUNTIME_LIB=$(scripts/fetch-ort.sh | tail -n 1)
export INFERMESH_ONNXRUNTIME_LIB

step "python test tools (.venv), dnsmasq (Debian) for the DNS discovery test"
scripts/pyenv.sh
if ! command -v dnsmasq >/dev/null && [ ! -x /usr/sbin/dnsmasq ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq dnsmasq-base >/dev/null 2>&1 || \
    { apt-get update -qq >/dev/null && apt-get install -y -qq dnsmasq-base >/dev/null; }
fi

step "CRD schemas (npm, tests/crd) for the deploy checks"
command -v npm >/dev/null || { apt-get update -qq >/dev/null && apt-get install -y -qq nodejs npm >/dev/null; }
(cd tests/crd && npm ci --no-audit --no-fund --loglevel=error)

step "cargo fmt / clippy (CPU and --features cuda)"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy --workspace --all-targets --locked --features infermesh-cli/cuda -- -D warnings

step "cargo test"
cargo test --workspace --locked 2>&1 | tee target/cargo-test.log
rust_passed=$(grep -E '^test result:' target/cargo-test.log | awk '{s+=$4} END {print s+0}')

step "real clients: tritonclient, grpcurl, reflection"
cargo build --locked -p infermesh-worker -p infermesh-gateway -p infermesh-cli
PATH="$root/.venv/bin:$PATH" .venv/bin/python -m pytest -q tests/python

echo
echo "rust: $rust_passed passed"
