#!/usr/bin/env bash
# Direct to a worker vs through the gateway (1 and 2 workers) vs nginx grpc_pass in front
# of the same 2 workers, driven by `infermesh bench`; plus gateway RSS with 1,000 open
# streams. Release builds; one run, one table. nginx comes from Debian (installed if
# missing).
# shellcheck source=bench/prepare.sh
source "$(dirname "$0")/prepare.sh"
if ! command -v nginx >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light || \
   DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx) >&2
fi
exec .venv/bin/python bench/gateway.py "$@"
