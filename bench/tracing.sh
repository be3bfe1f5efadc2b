#!/usr/bin/env bash
# What metrics and OpenTelemetry traces cost (sampling 0.01 and 1.0 vs off), one run, one
# table. Release builds.
# shellcheck source=bench/prepare.sh
source "$(dirname "$0")/prepare.sh"
exec .venv/bin/python bench/tracing.py "$@"
