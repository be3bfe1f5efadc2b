#!/usr/bin/env bash
# The fault tables. First: requests through the gateway while one of two workers is killed
# or restarted. Then network faults on separate network stacks, with nginx grpc_pass in
# front of the same workers as the reference (bench/netns_faults.py; needs root for
# ip netns, skipped with a note otherwise). Release builds.
#   bench/faults.sh [--process-only | --network-only] [netns_faults.py flags]
# shellcheck source=bench/prepare.sh
source "$(dirname "$0")/prepare.sh"
which=both
case "${1:-}" in
  --process-only) which=process; shift ;;
  --network-only) which=network; shift ;;
esac
if [ "$which" != network ]; then
  .venv/bin/python bench/faults.py
fi
if [ "$which" != process ]; then
  if ip netns add "infermesh-probe-$$" 2>/dev/null; then
    ip netns del "infermesh-probe-$$"
    echo
    exec .venv/bin/python bench/netns_faults.py "$@"
  fi
  echo "network faults skipped: creating a network namespace is not permitted here (needs root)" >&2
fi
