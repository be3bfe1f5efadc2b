#!/usr/bin/env bash
# Hedging against one slow worker of three, hedging off and on, in one run (bench/hedge.py).
# Release builds.
# shellcheck source=bench/prepare.sh
source "$(dirname "$0")/prepare.sh"
exec .venv/bin/python bench/hedge.py "$@"
