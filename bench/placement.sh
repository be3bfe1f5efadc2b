#!/usr/bin/env bash
# Many models on one fleet: placement-mode workers under Zipf (s = 0.8, 1.0, 1.2) and
# cyclic traces, hit rate beside Belady's, warm/cold latency, bytes loaded, duplicate
# loads, and the preloaded baseline (bench/placement.py). Release builds.
#   bench/placement.sh [--models N] [--requests N] [--workers N] [--capacity-mib N]
#   BENCH_BUILD=0 bench/placement.sh       # use the release binaries as they are
# shellcheck source=bench/prepare.sh
source "$(dirname "$0")/prepare.sh"
exec .venv/bin/python bench/placement.py "$@"
