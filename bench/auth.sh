#!/usr/bin/env bash
# What auth (API keys, JWTs) costs on the gateway hop, against no auth, in one run
# (bench/auth.py). Release builds.
# shellcheck source=bench/prepare.sh
source "$(dirname "$0")/prepare.sh"
exec .venv/bin/python bench/auth.py "$@"
