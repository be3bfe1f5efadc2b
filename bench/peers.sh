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

venv="$root/.cache/bench-peers/venv"
req="$root/bench/peers-requirements.txt"
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ "$(cat "$venv/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req" >&2
  echo "$want" > "$venv/.requirements.sha256"  # last, so a failed install is retried
fi

missing=""
command -v wrk >/dev/null || missing="$missing wrk"
command -v nginx >/dev/null || missing="$missing nginx-light"
if [ -n "$missing" ]; then
  export DEBIAN_FRONTEND=noninteractive
  # shellcheck disable=SC2086
  apt-get install -y -qq $missing >&2 || { apt-get update -qq && apt-get install -y -qq $missing >&2; }
fi

# exec: the driver is the only process left to signal; it stops every server it started
# by PID on any exit (finally blocks, SIGTERM/SIGHUP handlers) and its servers carry
# PR_SET_PDEATHSIG, so even a SIGKILLed driver leaves none behind.
exec .venv/bin/python bench/peers.py --peers-python "$venv/bin/python" "$@"
