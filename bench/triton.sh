#!/usr/bin/env bash
# The worker beside NVIDIA Triton on the same repository and dynamic-batching config, in one
# run: unary at concurrency 1/2/8/32 and one stream with 1/4/32 in flight; req/s, p50, p99 and
# server CPU per request. Writes bench/results/triton.md and triton.json.
#   TRITONSERVER=/path/to/tritonserver bench/triton.sh [--seconds-per-row N]
#   [--triton-ld-library-path P] [--triton-backend-dir D]   what that install needs
#   BENCH_OLD_BIN=dir       an older build's worker beside the new one
#   BENCH_BUILD=0           use the release binaries as they are
# shellcheck source=bench/prepare.sh
source "$(dirname "$0")/prepare.sh"
exec .venv/bin/python bench/triton.py "$@"
