#!/usr/bin/env bash
# The whole test suite: lint, Rust unit and end-to-end tests (real servers on loopback),
# then Triton's Python client, grpcurl and reflection against a real worker process.
# Fetches what it needs itself and installs nothing system-wide: ONNX Runtime from its
# PyPI wheel (.cache), the Python test tools, Node.js and npm into .venv and checkov into
# .venv-checkov (PyPI), dnsmasq and protoc plugins from Debian packages unpacked into
# .cache/debian (scripts/debian-local.sh).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

step() { printf '\n== %s\n' "$*"; }

step "fetch ONNX Runtime"
INFERMESH_ONNXRUNTIME_LIB=$(scripts/fetch-ort.sh | tail -n 1)
export INFERMESH_ONNXRUNTIME_LIB

step "python test tools, Node.js and npm (.venv)"
scripts/pyenv.sh

step "dnsmasq (Debian package, unpacked into .cache/debian) for the DNS discovery test"
scripts/dnsmasq.sh --version | sed -n 1p

step "iptables (Debian package, unpacked into .cache/debian) for the network-fault tests"
scripts/iptables.sh -V

step "protoc plugins for Go and C++ (Debian packages, unpacked into .cache/debian) for the proto checks"
scripts/debian-local.sh --no-deps protoc-gen-go
scripts/debian-local.sh --no-deps protoc-gen-go-grpc
scripts/debian-local.sh protobuf-compiler-grpc

step "wrk and h2load (Debian packages, unpacked into .cache/debian) for the benchmarks' smoke tests"
scripts/debian-local.sh wrk
scripts/debian-local.sh nghttp2-client

step "CRD schemas (npm from .venv, tests/crd) for the deploy checks"
(cd tests/crd && PATH="$root/.venv/bin:$PATH" npm ci --no-audit --no-fund --loglevel=error)

step "cargo fmt / clippy (CPU and --features cuda)"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy --workspace --all-targets --locked --features infermesh-cli/cuda -- -D warnings

step "cargo test"
cargo test --workspace --locked 2>&1 | tee target/cargo-test.log
rust_passed=$(grep -E '^test result:' target/cargo-test.log | awk '{s+=$4} END {print s+0}')

step "binaries for the Python tests"
cargo build --locked -p infermesh-worker -p infermesh-gateway -p infermesh-cli

step "checkov (.venv-checkov) for the deploy checks"
scripts/pyenv.sh checkov

step "real clients: tritonclient, perf_analyzer, grpcurl, reflection, Node.js, generated stubs; deploy checks"
PATH="$root/.venv/bin:$PATH" .venv/bin/python -m pytest -q tests/python

echo
echo "rust: $rust_passed passed"
