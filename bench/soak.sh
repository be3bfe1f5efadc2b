#!/usr/bin/env bash
# Soak: 10 minutes (or --seconds N) of mixed good and hostile traffic through a gateway in
# front of two workers; RSS and CPU over time, failed good requests (must be 0).
# Release builds. Writes the table to stdout; bench/results/soak.md keeps a run.
# shellcheck source=bench/prepare.sh
source "$(dirname "$0")/prepare.sh"
exec .venv/bin/python bench/soak.py "$@"
