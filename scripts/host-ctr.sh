#!/usr/bin/env bash
# Prints the path of a host `ctr` (containerd's own client) taken out of Debian's containerd
# package, for the tests that drive an instance with the host's own tools. The package is not
# installed (that would start a containerd service on the host): it is downloaded and unpacked
# into the cache, once.
set -euo pipefail
cache="${GATEVM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/gatevm}/host-tools"
if [ -x "$cache/ctr" ]; then
  echo "$cache/ctr"
  exit 0
fi
mkdir -p "$cache"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && { apt-get download containerd >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get download containerd >/dev/null; }; })
dpkg-deb -x "$work"/containerd_*.deb "$work/root"
install -m 0755 "$work/root/usr/bin/ctr" "$cache/ctr.tmp"
mv "$cache/ctr.tmp" "$cache/ctr"
echo "$cache/ctr"
