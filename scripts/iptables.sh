#!/usr/bin/env bash
# Runs iptables (the nf_tables variant) from Debian's package unpacked into .cache/debian
# (by scripts/debian-local.sh, with any of its libraries this system lacks), so the
# network-fault tests (tests/python/test_netns_faults.py) install nothing system-wide.
# They run it only inside network namespaces they created: `ip netns exec NS
# scripts/iptables.sh ...`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=$("$root/scripts/debian-local.sh" iptables)
libs=$(find "$dir" -name '*.so*' -printf '%h\n' | sort -u | paste -sd:)
if [ -n "$libs" ]; then
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
# Its match and target extensions, from the same unpacked package.
export XTABLES_LIBDIR="$dir/usr/lib/x86_64-linux-gnu/xtables"
exec "$dir/usr/sbin/xtables-nft-multi" iptables "$@"
