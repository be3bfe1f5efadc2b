#!/usr/bin/env bash
# Runs Triton's perf_analyzer (the binary inside the tritonclient 2.51 wheel, installed in
# .venv by scripts/pyenv.sh) with what it needs on Debian 12: libb64 (Debian package,
# unpacked into .cache/debian by scripts/debian-local.sh without touching the system) and
# libcudart.so.12 (PyPI; no GPU used). .venv/bin/perf_analyzer alone cannot find them.
#   scripts/perf-analyzer.sh -m mlp -u localhost:8001 -i grpc
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
libs=""
# grep reads to the end: with -q it could exit first and fail the pipe (pipefail).
if ! ldconfig -p | grep libb64.so.0d >/dev/null; then
  libb64=$("$root/scripts/debian-local.sh" libb64-0d)
  libs="$libb64/usr/lib/x86_64-linux-gnu:"
fi
cudart=$(echo "$root"/.venv/lib/python3*/site-packages/nvidia/cuda_runtime/lib)
export LD_LIBRARY_PATH="$libs$cudart${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$root/.venv/bin/perf_analyzer" "$@"
