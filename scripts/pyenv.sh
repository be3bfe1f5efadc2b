#!/usr/bin/env bash
# Creates $ROOT/.venv with the pinned test and model-generation tools: real Triton
# clients (tritonclient, perf_analyzer), onnxruntime for reference outputs, grpcurl,
# protoc (grpcio-tools), Node.js and npm.
#   scripts/pyenv.sh          .venv
#   scripts/pyenv.sh checkov  .venv-checkov only: checkov for the deploy checks, in a venv
#                             of its own because its pins clash with .venv's (numpy 2,
#                             protobuf 5+); a few hundred MB, so only when asked.
# Idempotent: a stamp holding the requirements' hash skips pip when nothing changed,
# so test scripts can call this on every run at no cost.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

ensure() {
  local venv=$1 req=$2
  local stamp="$venv/.requirements.sha256" want
  want=$(sha256sum "$req" | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  # -q hides progress but pip still prints errors (to stderr); stdout stays clean for callers.
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req" >&2
  # Catch a set that installed but does not agree (pip only warns about conflicts).
  local check
  check=$("$venv/bin/python" -m pip check) || { echo "$check" >&2; exit 1; }
  # Written last, so a failed install is retried on the next run.
  echo "$want" > "$stamp"
}

case "${1:-}" in
  "") ensure "$root/.venv" "$root/scripts/requirements.txt" ;;
  checkov) ensure "$root/.venv-checkov" "$root/scripts/requirements-checkov.txt" ;;
  *) echo "usage: scripts/pyenv.sh [checkov]" >&2; exit 2 ;;
esac
