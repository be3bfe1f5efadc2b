# Sourced by bench/peers.sh and bench/rest.sh (after bench/prepare.sh): the peers' venv
# (.cache/bench-peers, pinned by bench/peers-requirements.txt) in $venv, and wrk, h2load
# and nginx from Debian if missing.
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
command -v h2load >/dev/null || missing="$missing nghttp2-client"
if [ -n "$missing" ]; then
  export DEBIAN_FRONTEND=noninteractive
  # shellcheck disable=SC2086
  apt-get install -y -qq $missing >&2 || { apt-get update -qq && apt-get install -y -qq $missing >&2; }
fi

