#!/usr/bin/env bash
# Unpacks a Debian package into .cache/debian/PACKAGE without installing it: apt-get
# download + dpkg-deb -x, so nothing outside the project changes (apt's package lists
# aside, refreshed only when a download fails). The shared libraries it depends on that
# this system lacks are unpacked beside it; put the folders holding *.so* files on
# LD_LIBRARY_PATH to run its binaries (scripts/dnsmasq.sh does).
#   scripts/debian-local.sh [--no-deps] PACKAGE   prints the folder
# --no-deps: the package alone, for static binaries (Go programs) whose Depends name only
# what other uses of the package need.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

deps=yes
if [ "${1:-}" = "--no-deps" ]; then deps=no; shift; fi
[ $# -eq 1 ] || { echo "usage: scripts/debian-local.sh [--no-deps] PACKAGE" >&2; exit 2; }
package=$1
dest="$root/.cache/debian/$package"
# Written last, so a failed or interrupted unpack starts over on the next run.
stamp="$dest/.unpacked"
if [ -f "$stamp" ]; then
  echo "$dest"
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rm -rf "$dest"
mkdir -p "$dest"

fetch() {  # fetch PACKAGE: its .deb into $tmp, refreshing the package lists once if need be
  (cd "$tmp" && { apt-get download "$1" >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get download "$1" >/dev/null; }; })
  ls "$tmp/$1"_*.deb
}

installed() {
  [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

# Library dependencies (lib*, not -dev), first alternative, without versions or :any.
libraries() {
  { dpkg-deb -f "$1" Pre-Depends; dpkg-deb -f "$1" Depends; } | tr ',' '\n' |
    sed -E 's/\|.*//; s/\(.*\)//; s/:any//; s/[[:space:]]//g' | grep -E '^lib' | grep -v -- '-dev$' || true
}

queue=("$package")
seen=" $package "
unpacked=()
while [ ${#queue[@]} -gt 0 ]; do
  p=${queue[0]}
  queue=("${queue[@]:1}")
  deb=$(fetch "$p")
  dpkg-deb -x "$deb" "$dest"
  unpacked+=("$p")
  [ "$deps" = yes ] || continue
  for d in $(libraries "$deb"); do
    case "$seen" in *" $d "*) continue ;; esac
    seen="$seen$d "
    installed "$d" || queue+=("$d")
  done
done
printf '%s\n' "${unpacked[@]}" > "$stamp"
echo "$dest"
