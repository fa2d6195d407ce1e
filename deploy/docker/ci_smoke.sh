#!/usr/bin/env bash
# CI's image check (.ci/run, after `make test`): build Loom's CPU image from nothing and run it
# (tests/deploy/test_docker_image.py: /ready, a chat request, a streamed one, /metrics, `docker stop`).
# The private dockerd gets a data root of its own, removed afterwards: CI machines keep no state, so the base and
# every layer are built cold each time (about 10-16 minutes on 2 cores, see README's Deploy section).
# Where a Docker daemon already answers (DOCKER_HOST, /var/run/docker.sock), that one is used instead.
set -euo pipefail
cd "$(dirname "$0")/../.."
OWN_DATA=""
if [ -z "${LOOM_DOCKER_DATA:-}" ]; then
  OWN_DATA="$(mktemp -d /var/tmp/loom-ci-docker.XXXXXX)"
  export LOOM_DOCKER_DATA="$OWN_DATA"
fi
export LOOM_DOCKER_RUN="${LOOM_DOCKER_RUN:-/run/loom-ci-docker}"
# As root a daemon can always be started here: a skip would hide a broken build, so it fails instead.
if [ "$(id -u)" = 0 ]; then export LOOM_REQUIRE_DOCKER="${LOOM_REQUIRE_DOCKER:-1}"; fi
cleanup() {
  deploy/docker/build_local.sh --stop >/dev/null 2>&1 || true
  if [ -n "$OWN_DATA" ]; then rm -rf "$OWN_DATA"; fi
}
trap cleanup EXIT
.venv/bin/python -m pytest -q -s -p no:xdist -p no:cacheprovider tests/deploy/test_docker_image.py
