#!/usr/bin/env bash
# Stateful sequences: 64 concurrent sequences at batch 1 per request, the sequence
# batcher's `oldest` beside `direct`, on one worker and through a gateway, driven by
# Triton's perf_analyzer (bench/sequences.py). Release builds.
#   bench/sequences.sh [--sequences N] [--length N] [--window-ms N]
#   BENCH_BUILD=0 bench/sequences.sh       # use the release binaries as they are
# shellcheck source=bench/prepare.sh
source "$(dirname "$0")/prepare.sh"
exec .venv/bin/python bench/sequences.py "$@"
