#!/usr/bin/env bash
# Fetches ONNX Runtime's shared library from its PyPI wheel (the only registry this
# project may use) and prints the library's path as the last line. Idempotent.
#   ORT_GPU=1  fetch onnxruntime-gpu instead (CUDA 13 + cuDNN 9 provider libraries).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
version=1.31.1
if [ "${ORT_GPU:-0}" = 1 ]; then
  pkg=onnxruntime-gpu; dest="$root/.cache/onnxruntime-gpu/lib"
  files="libonnxruntime.so.$version libonnxruntime_providers_shared.so libonnxruntime_providers_cuda.so"
else
  pkg=onnxruntime; dest="$root/.cache/onnxruntime/lib"
  files="libonnxruntime.so.$version"
fi
lib="$dest/libonnxruntime.so.$version"
if [ -f "$lib" ]; then
  echo "$lib"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "downloading $pkg==$version from PyPI..." >&2
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  -d "$tmp" "$pkg==$version" >&2
mkdir -p "$dest"
for f in $files; do
  # The wheel is a zip; extract one member without needing unzip.
  python3 - "$tmp"/*.whl "onnxruntime/capi/$f" "$dest/$f" <<'PY'
import sys, zipfile, shutil
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
import os; os.replace(out + ".part", out)
PY
done
echo "$lib"
