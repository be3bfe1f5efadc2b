#!/usr/bin/env bash
# Runs a C load generator, wrk or h2load: the system's when installed, else Debian's
# package (wrk, nghttp2-client) unpacked into .cache/debian by scripts/debian-local.sh with
# the libraries this system lacks, so the benchmarks' smoke tests install nothing.
#   scripts/loadgen.sh wrk|h2load ARGS...
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tool=${1:?usage: scripts/loadgen.sh wrk|h2load ARGS...}
shift
case "$tool" in
  wrk) package=wrk ;;
  h2load) package=nghttp2-client ;;
  *) echo "scripts/loadgen.sh: expected wrk or h2load, found '$tool'" >&2; exit 2 ;;
esac
if command -v "$tool" >/dev/null; then
  exec "$tool" "$@"
fi
dir=$("$root/scripts/debian-local.sh" "$package")
libs=$(find "$dir" -name '*.so*' -printf '%h\n' | sort -u | paste -sd:)
# Only when there are some: an empty entry would mean the current directory.
if [ -n "$libs" ]; then
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
exec "$dir/usr/bin/$tool" "$@"
