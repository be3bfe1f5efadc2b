#!/usr/bin/env bash
# infermesh side by side with its peers (ONNX Runtime in-process, nginx grpc_pass, FastAPI +
# uvicorn, KServe's Python server) on the MLP, one run, one table: bench/results/peers.md
# and the raw numbers in bench/results/peers.json.
#   bench/peers.sh [--seconds N] [--only worker,gateway1,...] [--concurrency 1,8,32]
#   BENCH_SECONDS=2 bench/peers.sh     # a quick pass (the default is 10 s per row)
#   BENCH_BUILD=0 bench/peers.sh       # use the release binaries as they are
# The peers install into a throwaway venv (.cache/bench-peers, pinned by
# bench/peers-requirements.txt); wrk and nginx come from Debian if missing.
# shellcheck source=bench/prepare.sh
source "$(dirname "$0")/prepare.sh"

# shellcheck source=bench/peers-setup.sh
source "$(dirname "$0")/peers-setup.sh"

# exec: the driver is the only process left to signal; it stops every server it started
# by PID on any exit (finally blocks, SIGTERM/SIGHUP handlers) and its servers carry
# PR_SET_PDEATHSIG, so even a SIGKILLed driver leaves none behind.
exec .venv/bin/python bench/peers.py --peers-python "$venv/bin/python" "$@"
