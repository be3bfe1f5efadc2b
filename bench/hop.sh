#!/usr/bin/env bash
# The gateway hop beside nginx grpc_pass (and an older gateway with --baseline-bin-dir),
# with TLS and auth variants, in one run (bench/hop.py). Release builds; nginx from Debian
# (installed if missing).
# shellcheck source=bench/prepare.sh
source "$(dirname "$0")/prepare.sh"
if ! command -v nginx >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light || \
   DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx) >&2
fi
exec .venv/bin/python bench/hop.py "$@"
