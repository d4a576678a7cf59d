#!/usr/bin/env bash
# Test-only stand-in for the images' base (python:3.11-slim-bookworm), which this
# machine cannot pull: a Debian bookworm root filesystem with Python 3.11, made with
# debootstrap and loaded with `docker import`. Built once per machine and cached by its
# tag; the deployment tests pass it with `--build-arg BASE_IMAGE=...`. Users' builds never
# see it: their default base stays python:3.11-slim-bookworm.
#
# The machine's CA bundle goes into the stand-in (with PIP_CERT pointing at it) so that pip
# inside a build trusts the same certificates as pip on this machine. It is in the
# stand-in only, so only in images built from the stand-in, never in a user's image.
#
# usage: tests/docker/standin_base.sh [TAG]      prints the tag on stdout
set -euo pipefail
TAG="${1:-${LIPSYNC_STANDIN_BASE:-lipsync-ci/standin-python:bookworm-3.11-v1}}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"

if docker image inspect "$TAG" >/dev/null 2>&1; then
  echo "$TAG"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "standin_base: debootstrap is not installed" >&2; exit 3; }
[ "$(id -u)" = 0 ] || { echo "standin_base: debootstrap needs root" >&2; exit 3; }

work="$(mktemp -d /tmp/lipsync-standin.XXXXXX)"
trap 'rm -rf "$work"' EXIT
echo "standin_base: debootstrap bookworm into $work (about a minute)" >&2
timeout 900 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
  || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
rootfs="$work/rootfs"
if [ -f "$CA_BUNDLE" ]; then
  cp "$CA_BUNDLE" "$rootfs/etc/ssl/certs/ca-certificates.crt"
fi
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
tar -C "$rootfs" -c . | docker import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
  --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
  --change 'CMD ["python3"]' \
  - "$TAG" >/dev/null
echo "$TAG"
