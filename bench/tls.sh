#!/usr/bin/env bash
# What TLS and mTLS cost on the gateway hop, against plaintext, in one run (bench/tls.py).
# Release builds.
# shellcheck source=bench/prepare.sh
source "$(dirname "$0")/prepare.sh"
exec .venv/bin/python bench/tls.py "$@"
