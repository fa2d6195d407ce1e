#!/usr/bin/env bash
# Build Loom's CPU image on this machine, with no container registry needed:
#   deploy/docker/build_local.sh [-- DOCKER_BUILD_ARGS...]   daemon if needed, base image once, then the CPU image
#   deploy/docker/build_local.sh --daemon                    only make sure a daemon runs; print its DOCKER_HOST
#   deploy/docker/build_local.sh --stop                      stop the private daemon (started by an earlier call)
#
# 1. A Docker daemon: the one DOCKER_HOST or /var/run/docker.sock answers on, else a private dockerd (root only)
#    with its own data root, exec root and socket, and no bridge, iptables or forwarding of its own: it leaves the
#    host's network alone, so builds and containers use `--network host`.
# 2. The base: `debootstrap --variant=minbase` of this machine's Debian release from apt's own mirror, with Python,
#    its headers, pip, venv, g++ (Loom compiles its C++ kernels at first start) and this machine's CA certificates,
#    `docker import`ed. Built again only when what it is made of changes (a stamp label on the image).
# 3. The image: the repo's Dockerfile with TARGET=cpu on that base; pip inside the build uses this host's index
#    settings and local wheels (pip_mirror.py), so torch is the CPU build on this disk, not a CUDA download.
# Idempotent: a second run reuses the daemon, the base and Docker's layer cache.
# Environment: LOOM_IMAGE (default loom:cpu), LOOM_BASE_IMAGE, LOOM_DOCKER_DATA, LOOM_DOCKER_RUN (private daemon).
# Exit status 77: no Docker daemon can run here (the reason is printed); anything else non-zero is a failure.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
HERE="$ROOT/deploy/docker"
IMAGE="${LOOM_IMAGE:-loom:cpu}"
DATA="${LOOM_DOCKER_DATA:-/var/lib/loom-docker}"
RUN_DIR="${LOOM_DOCKER_RUN:-/run/loom-docker}"
PRIVATE="unix://$RUN_DIR/docker.sock"
DOCKER=/usr/bin/docker  # Debian's client, which has BuildKit built in (a newer client without buildx has not)
[ -x "$DOCKER" ] || DOCKER="$(command -v docker || true)"
BASE_PACKAGES="python3,python3-venv,python3-pip,python3-dev,g++,ca-certificates"
export DOCKER_BUILDKIT=1
STARTED=$SECONDS

say() { printf '[build_local +%ss] %s\n' "$((SECONDS - STARTED))" "$*" >&2; }
no_daemon() { say "NO DOCKER DAEMON CAN RUN HERE: $*"; exit 77; }
answers() { DOCKER_HOST="$1" "$DOCKER" info >/dev/null 2>&1; }

start_private_daemon() {
  [ "$(id -u)" = 0 ] || no_daemon "no daemon answers and only root can start one (dockerd)"
  command -v dockerd >/dev/null || no_daemon "no daemon answers and no dockerd to start (apt-get install docker.io)"
  mkdir -p "$DATA" "$RUN_DIR"
  say "starting a private dockerd: data $DATA, socket $PRIVATE, log $RUN_DIR/dockerd.log"
  setsid dockerd --data-root "$DATA" --exec-root "$RUN_DIR" --pidfile "$RUN_DIR/dockerd.pid" -H "$PRIVATE" \
    --bridge=none --iptables=false --ip-forward=false >"$RUN_DIR/dockerd.log" 2>&1 </dev/null &
  local pid=$!
  for _ in $(seq 120); do
    answers "$PRIVATE" && return 0
    kill -0 "$pid" 2>/dev/null || no_daemon "dockerd exited: $(tail -n 5 "$RUN_DIR/dockerd.log")"
    sleep 0.5
  done
  no_daemon "dockerd did not answer within 60 s: $(tail -n 5 "$RUN_DIR/dockerd.log")"
}

ensure_daemon() {
  [ -n "$DOCKER" ] || no_daemon "no docker client (apt-get install docker.io)"
  local host
  for host in ${DOCKER_HOST:-} unix:///var/run/docker.sock "$PRIVATE"; do
    if answers "$host"; then export DOCKER_HOST="$host"; return; fi
  done
  start_private_daemon
  export DOCKER_HOST="$PRIVATE"
}

stop_private_daemon() {
  local pid
  pid="$(cat "$RUN_DIR/dockerd.pid" 2>/dev/null || true)"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || { say "no private dockerd runs ($RUN_DIR)"; return 0; }
  say "stopping the private dockerd (pid $pid)"
  kill -TERM "$pid"
  for _ in $(seq 60); do
    if ! kill -0 "$pid" 2>/dev/null; then
      # dockerd leaves its network namespace bound under the exec root: unmounted, the folders can be removed
      awk -v d="$RUN_DIR/" 'index($2, d) == 1 { print $2 }' /proc/mounts | xargs -r -n 1 umount 2>/dev/null || true
      return 0
    fi
    sleep 0.5
  done
  say "dockerd (pid $pid) still runs after 30 s"
  return 1
}

# The mirror apt reads this release from (deb822 or one-line sources alike).
debian_mirror() {
  local codename="$1"
  # shellcheck disable=SC2016  # apt's own $(FIELD) placeholders, not the shell's
  apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Identifier: Packages' 2>/dev/null \
    | awk -v r="$codename" '$2 == r { print $1; exit }'
}

# Writes the base image's name to stdout; builds it unless one with the same stamp exists.
ensure_base() {
  local cert="$1" codename mirror base stamp have rootfs
  codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
  mirror="$(debian_mirror "$codename")"
  [ -n "$codename" ] && [ -n "$mirror" ] || { say "no Debian mirror for '$codename' in apt's sources"; exit 1; }
  base="${LOOM_BASE_IMAGE:-loom-base:$codename}"
  stamp="$( { echo "$codename $mirror $BASE_PACKAGES"; cat /usr/local/share/ca-certificates/* "$cert" 2>/dev/null
              sed -n '/^# BASE-RECIPE/,/^# END-BASE-RECIPE/p' "$0"; } | sha256sum | cut -c1-16)"
  have="$("$DOCKER" image inspect -f '{{ index .Config.Labels "org.loom.base-stamp" }}' "$base" 2>/dev/null || true)"
  if [ "$have" = "$stamp" ]; then say "base $base is current (stamp $stamp)"; echo "$base"; return; fi
  command -v debootstrap >/dev/null || { say "debootstrap is missing (apt-get install debootstrap)"; exit 1; }
  rootfs="$DATA/base-rootfs"
  rm -rf "$rootfs" && mkdir -p "$rootfs"
  say "building base $base: debootstrap $codename from $mirror (log $DATA/debootstrap.log)"
  # BASE-RECIPE
  debootstrap --variant=minbase --include="$BASE_PACKAGES" "$codename" "$rootfs" "$mirror" \
    >"$DATA/debootstrap.log" 2>&1 || { tail -n 20 "$DATA/debootstrap.log" >&2; exit 1; }
  cp -a /usr/local/share/ca-certificates/. "$rootfs/usr/local/share/ca-certificates/" 2>/dev/null || true
  chroot "$rootfs" update-ca-certificates >/dev/null
  # pip's CA bundle at the same path as on the host: the build passes PIP_CERT through unchanged
  if [ -n "$cert" ] && [ -f "$cert" ]; then mkdir -p "$rootfs$(dirname "$cert")" && cp -L "$cert" "$rootfs$cert"; fi
  chroot "$rootfs" apt-get clean
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/log/*.log
  # END-BASE-RECIPE
  say "importing the base ($(du -sh "$rootfs" | cut -f1))"
  tar -C "$rootfs" -c . | "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' --change 'ENV LANG=C.UTF-8' \
    --change "LABEL org.loom.base-stamp=$stamp" --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
  rm -rf "$rootfs"
  say "base $base built (stamp $stamp)"
  echo "$base"
}

# Starts pip_mirror.py in the background; fills BUILD_ARGS from what it wrote.
start_pip_mirror() {
  local file="$1" torch
  torch="$(sed -n 's/^ARG CPU_TORCH="\(.*\)"$/\1/p' "$ROOT/Dockerfile")"
  python3 "$HERE/pip_mirror.py" "$file" --torch "$torch" &
  MIRROR_PID=$!
  for _ in $(seq 100); do [ -f "$file" ] && break; kill -0 "$MIRROR_PID" 2>/dev/null || break; sleep 0.1; done
  [ -f "$file" ] || { say "pip_mirror.py failed"; exit 1; }
  mapfile -t BUILD_ARGS < "$file"
  say "pip settings for the build: ${BUILD_ARGS[*]:-none, pip defaults}"
}

build_image() {
  local base cert
  WORK="$(mktemp -d)" MIRROR_PID=""
  trap 'if [ -n "$MIRROR_PID" ]; then kill "$MIRROR_PID" 2>/dev/null || true; fi; rm -rf "$WORK"' EXIT
  start_pip_mirror "$WORK/build-args"
  cert="$(sed -n 's/^PIP_CERT=//p' "$WORK/build-args")"
  base="$(ensure_base "$cert")"
  local args=(--network host --progress plain --build-arg TARGET=cpu --build-arg "CPU_IMAGE=$base" -t "$IMAGE")
  local a; for a in "${BUILD_ARGS[@]}"; do args+=(--build-arg "$a"); done
  say "building $IMAGE (docker build ${args[*]} $*)"
  local began=$SECONDS
  "$DOCKER" build "${args[@]}" "$@" "$ROOT"
  local size
  size="$("$DOCKER" image inspect -f '{{ .Size }}' "$IMAGE")"
  say "built $IMAGE in $((SECONDS - began)) s: $((size / 1000000)) MB"
  say "run it:  DOCKER_HOST=$DOCKER_HOST $DOCKER run --rm --network host $IMAGE   (then http://127.0.0.1:8000)"
}

case "${1:-}" in
  --daemon) ensure_daemon; echo "$DOCKER_HOST" ;;
  --stop) stop_private_daemon ;;
  --) shift; ensure_daemon; build_image "$@" ;;
  "") ensure_daemon; build_image ;;
  *) echo "usage: $0 [--daemon | --stop | -- DOCKER_BUILD_ARGS...]" >&2; exit 2 ;;
esac
