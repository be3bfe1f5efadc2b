#!/usr/bin/env bash
# The fault table: requests through the gateway while one of two workers is killed or
# restarted; failures and latency during the fault. Release builds.
# shellcheck source=bench/prepare.sh
source "$(dirname "$0")/prepare.sh"
exec .venv/bin/python bench/faults.py "$@"
