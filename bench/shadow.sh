#!/usr/bin/env bash
# Shadow traffic's cost, in one run: no shadow, 25 % and 100 % (bench/shadow.py). Release
# builds.
# shellcheck source=bench/prepare.sh
source "$(dirname "$0")/prepare.sh"
exec .venv/bin/python bench/shadow.py "$@"
