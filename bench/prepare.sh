# Sourced by every bench/*.sh: work from the checkout, ONNX Runtime from its PyPI wheel,
# the test venv (.venv), and release builds of the three binaries (BENCH_BUILD=0 keeps
# them as they are).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
INFERMESH_ONNXRUNTIME_LIB=$(scripts/fetch-ort.sh | tail -n 1)
export INFERMESH_ONNXRUNTIME_LIB
scripts/pyenv.sh
if [ "${BENCH_BUILD:-1}" != 0 ]; then
  cargo build --release --locked -p infermesh-cli -p infermesh-worker -p infermesh-gateway >&2
fi
