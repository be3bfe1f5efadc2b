#!/usr/bin/env bash
# The worker's response cache on and off at c=32 with a 90 % repeat rate, one run
# (bench/cache.py). Release builds.
#   bench/cache.sh [--seconds N] [--rounds N] [--concurrency 1,32] [--cache-bytes N]
#   BENCH_BUILD=0 bench/cache.sh       # use the release binaries as they are
# shellcheck source=bench/prepare.sh
source "$(dirname "$0")/prepare.sh"
exec .venv/bin/python bench/cache.py "$@"
