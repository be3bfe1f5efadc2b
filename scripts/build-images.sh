#!/usr/bin/env bash
# Builds both images with podman where no registry can be reached: the base images the
# Dockerfiles name are made locally (debootstrap + `podman import`, tagged with those
# names; --pull=never), the binaries are built here and brought in through the
# Dockerfiles' `--build-arg BINARIES=prebuilt` stage (no Rust image, and Debian's rustc is
# too old). Then it starts the worker (CPU variant) and gateway images on the host
# network, bound to 127.0.0.1, and runs the gateway image's HEALTHCHECK. Containers run with
# runc and lowered rlimits: this VM refuses raising them, and crun refuses its hybrid
# cgroups; builds use chroot isolation for the same reason.
# Not part of scripts/test.sh: it installs podman and runc system-wide and takes minutes.
#
#   scripts/build-images.sh                 # builds the release binaries (a no-op when current)
#   INFERMESH_BIN_DIR=DIR scripts/build-images.sh   # packages the binaries in DIR as they are
#
# The binaries come from ${CARGO_TARGET_DIR:-target}/release unless INFERMESH_BIN_DIR names
# another folder.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
step() { printf '\n== %s\n' "$*"; }

step "podman and runc (Debian, system-wide), debootstrap (Debian, unpacked into .cache/debian)"
if ! command -v podman >/dev/null || ! command -v runc >/dev/null; then
  # A container engine cannot run from a project folder: podman needs its OCI runtime,
  # conmon, network helpers and /etc/containers policy installed where it looks for them.
  # runc, not the crun podman pulls in: crun cannot run containers on these machines.
  echo "installing system-wide with apt-get: podman and runc (and the conmon and configuration they depend on), to build and run the images"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq podman runc >/dev/null || \
    { apt-get update -qq && apt-get install -y -qq podman runc >/dev/null; }
fi
# A shell script with its data folder: runs from where it is unpacked (DEBOOTSTRAP_DIR).
debootstrap_root=$(scripts/debian-local.sh --no-deps debootstrap)
debootstrap() {
  DEBOOTSTRAP_DIR="$debootstrap_root/usr/share/debootstrap" "$debootstrap_root/usr/sbin/debootstrap" "$@"
}

step "local base images from debootstrap (Debian 12, as the real bases are)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
base() {  # base TAG [PACKAGES]: a minimal Debian 12 root filesystem imported as TAG
  local tag=$1 include=${2:-ca-certificates}
  if podman image exists "$tag"; then return; fi
  local fs="$work/rootfs-${include//,/-}"
  [ -d "$fs" ] || debootstrap --variant=minbase --include="$include" bookworm "$fs" http://deb.debian.org/debian >&2
  # This machine's CA bundle, so a build stage that downloads (pip) trusts what the host
  # trusts (here an egress proxy re-signs TLS).
  cp /etc/ssl/certs/ca-certificates.crt "$fs/etc/ssl/certs/ca-certificates.crt"
  tar -C "$fs" -c . | podman import - "$tag" >/dev/null
  echo "made $tag"
}
# The runtime bases: distroless cc and debian slim are both Debian 12 with glibc.
base gcr.io/distroless/cc-debian12:nonroot
base docker.io/library/debian:bookworm-slim
# The ONNX Runtime stage downloads the wheel with pip (Debian 12's Python is 3.11 too).
base docker.io/library/python:3.11-slim-bookworm ca-certificates,python3,python3-pip,python-is-python3
# Named by the builder stages, which BINARIES=prebuilt skips; tagged so nothing is pulled.
podman tag gcr.io/distroless/cc-debian12:nonroot docker.io/library/rust:1.92-slim-bookworm

rev=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if [ -n "${INFERMESH_BIN_DIR:-}" ]; then
  step "binaries: prebuilt, from $INFERMESH_BIN_DIR"
  bin=$INFERMESH_BIN_DIR
else
  step "binaries (release; a no-op when they are current)"
  cargo build --release --locked -p infermesh-gateway -p infermesh-worker -p infermesh-cli >&2
  bin=${CARGO_TARGET_DIR:-target}/release
fi
for b in infermesh-gateway infermesh-worker infermesh; do
  [ -x "$bin/$b" ] || { echo "$bin/$b: no such binary"; exit 1; }
done
"$bin/infermesh" --version
rm -rf dist && mkdir dist
cp "$bin/infermesh-gateway" "$bin/infermesh-worker" "$bin/infermesh" dist/

step "images"
podman build --pull=never --format docker --isolation chroot -q -f Dockerfile.gateway --build-arg BINARIES=prebuilt --build-arg INFERMESH_GIT_REV="$rev" -t infermesh-gateway:dev .
podman build --pull=never --format docker --isolation chroot -q -f Dockerfile.worker --build-arg BINARIES=prebuilt --build-arg INFERMESH_GIT_REV="$rev" --build-arg VARIANT=cpu \
  --build-arg RUNTIME_BASE=docker.io/library/debian:bookworm-slim --build-arg ORT_PACKAGE=onnxruntime \
  -t infermesh-worker:cpu-dev .
for image in infermesh-gateway:dev infermesh-worker:cpu-dev; do
  echo "$image: $(( $(podman image inspect --format '{{.Size}}' "$image") / 1000000 )) MB in all; its layers:"
  podman history --format '  {{.Size}}\t{{.CreatedBy}}' "$image" | cut -c1-110
done

step "run both images on 127.0.0.1 and each image's HEALTHCHECK"
# On the host network the two cannot both have 8003, the port each image's HEALTHCHECK
# calls: the gateway keeps it, and the worker's check is pointed at its own port.
wport=18301 gport=18300 hport=8003
if ss -ltn | grep -q ":$hport "; then echo "port $hport is taken on this machine"; exit 1; fi
worker=$(podman --runtime runc run -d --rm --network host --ulimit nofile=4096:4096 --ulimit nproc=4096:4096 --health-interval disable \
  --health-cmd '["/usr/local/bin/infermesh", "health", "--url", "127.0.0.1:18304"]' -v "$root/models:/models:ro" infermesh-worker:cpu-dev \
  --grpc-address 127.0.0.1 --grpc-port $wport --metrics-address 127.0.0.1 --metrics-port 18302 \
  --health-address 127.0.0.1 --health-port 18304)
gateway=$(podman --runtime runc run -d --rm --network host --ulimit nofile=4096:4096 --ulimit nproc=4096:4096 --health-interval disable infermesh-gateway:dev --workers 127.0.0.1:$wport \
  --grpc-address 127.0.0.1 --grpc-port $gport --metrics-address 127.0.0.1 --metrics-port 18303 \
  --health-address 127.0.0.1 --health-port $hport)
cleanup() { podman stop -t 5 "$gateway" "$worker" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
healthy=""
for _ in $(seq 1 60); do
  if podman healthcheck run "$gateway" >/dev/null 2>&1; then healthy=yes; break; fi
  sleep 1
done
[ -n "$healthy" ] || { podman logs "$gateway" | tail -20; podman logs "$worker" | tail -20; echo "gateway never healthy"; exit 1; }
echo "gateway image HEALTHCHECK: healthy"
podman healthcheck run "$worker" >/dev/null || { podman logs "$worker" | tail -20; echo "worker unhealthy"; exit 1; }
echo "worker image HEALTHCHECK (on its own health port): healthy"
"$bin/infermesh" infer --url 127.0.0.1:$gport --model digits --input input=@models/digits/example.json
