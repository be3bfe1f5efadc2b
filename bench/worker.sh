#!/usr/bin/env bash
# Worker vs ONNX Runtime alone on the benchmark MLP (release build, one run, one table).
#   bench/worker.sh [--seconds-per-row N]
# shellcheck source=bench/prepare.sh
source "$(dirname "$0")/prepare.sh"
exec .venv/bin/python bench/worker_vs_ort.py "$@"
