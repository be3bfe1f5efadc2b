#!/usr/bin/env bash
# Runs Triton's perf_analyzer (the binary inside the tritonclient 2.51 wheel, installed in
# .venv by scripts/pyenv.sh) with what it needs on Debian 12: libb64 (Debian package,
# unpacked into .cache without touching the system) and libcudart.so.12 (PyPI; no GPU used).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
libdir="$root/.cache/libb64"
if [ ! -e "$libdir/usr/lib/x86_64-linux-gnu/libb64.so.0d" ] && ! ldconfig -p | grep -q libb64.so.0d; then
  tmp=$(mktemp -d)
  (cd "$tmp" && { apt-get download libb64-0d >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get download libb64-0d >/dev/null; }; })
  mkdir -p "$libdir"
  dpkg-deb -x "$tmp"/libb64-0d_*.deb "$libdir"
  rm -rf "$tmp"
fi
cudart=$(echo "$root"/.venv/lib/python3*/site-packages/nvidia/cuda_runtime/lib)
export LD_LIBRARY_PATH="$libdir/usr/lib/x86_64-linux-gnu:$cudart${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$root/.venv/bin/perf_analyzer" "$@"
