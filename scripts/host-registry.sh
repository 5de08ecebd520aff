#!/usr/bin/env bash
# Prints the path of a container registry server (Debian's docker-registry) for the tests that
# pull from a registry on the host's loopback, and makes sure Debian's skopeo (which fills it) is
# installed. The registry package is not installed (on a systemd host that would start a registry
# listening on every address): it is downloaded and unpacked into the cache, once. The tests run
# their own registry on 127.0.0.1 with a configuration of their own.
set -euo pipefail
cache="${GATEVM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/gatevm}/host-tools"
if ! command -v skopeo >/dev/null; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "host-registry: skopeo is missing: apt-get install skopeo" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends skopeo >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends skopeo >/dev/null; }
fi
if [ -x "$cache/docker-registry" ]; then
  echo "$cache/docker-registry"
  exit 0
fi
mkdir -p "$cache"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && { apt-get download docker-registry >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get download docker-registry >/dev/null; }; })
dpkg-deb -x "$work"/docker-registry_*.deb "$work/root"
install -m 0755 "$work/root/usr/bin/docker-registry" "$cache/docker-registry.tmp"
mv "$cache/docker-registry.tmp" "$cache/docker-registry"
echo "$cache/docker-registry"
