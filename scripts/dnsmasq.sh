#!/usr/bin/env bash
# Runs dnsmasq from Debian's dnsmasq-base package unpacked into .cache/debian (by
# scripts/debian-local.sh, with any of its libraries this system lacks), so the DNS
# discovery test (tests/python/test_dns.py) needs nothing installed system-wide.
# exec keeps the process id, so signals sent to this script's process reach dnsmasq.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=$("$root/scripts/debian-local.sh" dnsmasq-base)
libs=$(find "$dir" -name '*.so*' -printf '%h\n' | sort -u | paste -sd:)
# Only when there are some: an empty entry would mean the current directory.
if [ -n "$libs" ]; then
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
exec "$dir/usr/sbin/dnsmasq" "$@"
