#!/usr/bin/env bash
# The HTTP/REST door beside gRPC and FastAPI on the MLP, one run (bench/rest.py): the worker
# and the gateway through gRPC (h2load), HTTP/JSON and HTTP binary data (wrk), and FastAPI +
# uvicorn + ONNX Runtime (wrk). Release builds.
#   bench/rest.sh [--seconds N] [--concurrency 1,32]
#   BENCH_BUILD=0 bench/rest.sh       # use the release binaries as they are
# shellcheck source=bench/prepare.sh
source "$(dirname "$0")/prepare.sh"
# shellcheck source=bench/peers-setup.sh
source "$(dirname "$0")/peers-setup.sh"
exec .venv/bin/python bench/rest.py --peers-python "$venv/bin/python" "$@"
