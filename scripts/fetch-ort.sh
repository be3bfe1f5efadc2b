#!/usr/bin/env bash
# Fetches ONNX Runtime's shared library from its PyPI wheel and prints the library's
# absolute path as the last line of stdout (logs go to stderr). PyPI is the only source
# this project may use: ort's own download-binaries CDN is not reachable from every build machine.
# Idempotent, and needs only the system python3 (not the venv), so it can run first.
#   ORT_GPU=1  fetch onnxruntime-gpu instead: the CUDA provider needs CUDA 13 + cuDNN 9
#              (libcublas/libcudart .so.13) on the loader path at run time.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
version=1.31.1
if [ "${ORT_GPU:-0}" = 1 ]; then
  pkg=onnxruntime-gpu; dest="$root/.cache/onnxruntime-gpu/lib"
  # The CUDA provider is a plugin that libonnxruntime dlopens from its own directory,
  # through the providers_shared bridge; all three must sit side by side.
  files="libonnxruntime.so.$version libonnxruntime_providers_shared.so libonnxruntime_providers_cuda.so"
else
  pkg=onnxruntime; dest="$root/.cache/onnxruntime/lib"
  files="libonnxruntime.so.$version"
fi
lib="$dest/libonnxruntime.so.$version"

have_all=1
for f in $files; do [ -f "$dest/$f" ] || have_all=0; done
if [ "$have_all" = 1 ]; then
  echo "$lib"
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "downloading $pkg==$version from PyPI..." >&2
# --only-binary with no --platform: the wheel for this interpreter and machine.
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  -d "$tmp" "$pkg==$version" >&2
mkdir -p "$dest"
# Extract only the libraries (the GPU wheel is ~250 MB), each via a .part file and a
# rename, so an interrupted run never leaves a truncated library that looks complete.
python3 - "$dest" "$tmp"/*.whl $files <<'PY'
import os, shutil, sys, zipfile
dest, wheel, *names = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    for name in names:
        out = os.path.join(dest, name)
        with z.open("onnxruntime/capi/" + name) as src, open(out + ".part", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(out + ".part", out)
PY
echo "fetched $files into $dest" >&2
echo "$lib"
