#!/usr/bin/env bash
# gatevm's benchmarks, each beside a baseline measured in the same run (the gatevm-bench tool in
# bench/): boot against a bare QEMU boot of the same kernel, exec round trip against ssh into the
# same VM, host memory, image import throughput (gatevm image import, and the host's ctr through
# the instance's containerd socket) against a host copy, shared-directory (-v, virtio-fs) write and
# read throughput against the same dd on the host, port-forward throughput and latency (gvproxy,
# passt) against QEMU's user networking, rootfs build against a minbase mmdebstrap. Prints the
# tables and writes docs/benchmarks.md.
# Usage: scripts/bench.sh [--only boot,exec,memory,import,volume,net,rootfs] [--runs N]
#                         [--exec-runs N] [--import-mib N] [--volume-mib N] [--net-mib N]
#                         [--net-pings N] [--rootfs-runs N] [--host-ctr PATH] [--user USER]
#                         [--out FILE] [--gatevm PATH]   (--help for more)
# The boot and memory cases run gatevm as root and as an ordinary user (--user, default gatevm-ci,
# created here when missing) on the system runtime, and the volume case shares a directory of
# that user's (as root, gatevm refuses a writable share of a root-owned directory), so run it as
# root. The import case's ctr row uses the host ctr scripts/host-ctr.sh prints (unless --host-ctr
# is given); when there is none, the row is left out and the report says why.
# It boots VMs and, the first time, builds an ssh test rootfs (cached in ~/.cache/gatevm-bench):
# run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "bench: cargo is missing: install a Rust toolchain (rustup)" >&2; exit 1; }
# The tool is a cargo project of its own (not a member of the main workspace), built into
# bench/target whatever CARGO_TARGET_DIR says.
CARGO_TARGET_DIR="$PWD/bench/target" cargo build --release --locked --manifest-path bench/Cargo.toml
tool=bench/target/release/gatevm-bench
for a in "$@"; do
  case $a in -h|--help|-V|--version) exec "$tool" "$@" ;; esac
done
# The bare-boot baseline's initramfs holds a static busybox (the same check as scripts/test.sh).
if [ ! -x /bin/busybox ] || readelf -l /bin/busybox 2>/dev/null | grep -q 'program interpreter'; then
  echo "bench: installing busybox-static for the bare-boot baseline"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends busybox-static >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends busybox-static >/dev/null; }
fi
# The exec case's ssh baseline needs the ssh client and ssh-keygen on the host (the server runs
# in the guest).
if ! command -v ssh >/dev/null || ! command -v ssh-keygen >/dev/null; then
  echo "bench: installing openssh-client for the exec case's ssh baseline"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends openssh-client >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends openssh-client >/dev/null; }
fi
# (build.sh also makes sure of gcc and libc6-dev, which the net case's static test server needs.)
./scripts/build.sh
# The runtime (kernel, QEMU, root filesystem) the instance and the baseline boot: the system
# runtime every user finds (/var/lib/gatevm), then root's own.
if [ "$(id -u)" = 0 ]; then
  target/release/gatevm setup --system
fi
target/release/gatevm setup
# The ordinary user the boot and memory cases run gatevm as (in the kvm group where there is one);
# not as an ordinary user itself: the report then says why those rows are missing.
user=gatevm-ci
only=
host_ctr_given=
prev=
for a in "$@"; do
  case $prev in --user) user=$a ;; --only) only=$a ;; esac
  case $a in
    --user=*) user=${a#--user=} ;;
    --only=*) only=${a#--only=} ;;
    --host-ctr|--host-ctr=*) host_ctr_given=1 ;;
  esac
  prev=$a
done
if [ "$(id -u)" = 0 ]; then
  if ! id -u "$user" >/dev/null 2>&1; then
    echo "bench: creating the user $user for the runs as an ordinary user"
    useradd --create-home --shell /bin/sh "$user"
  fi
  if getent group kvm >/dev/null; then
    usermod -aG kvm "$user"
  fi
fi
# The host's own ctr (out of Debian's containerd package, not installed) for the import case's row
# through the instance's containerd socket.
extra=()
if [ -z "$host_ctr_given" ] && { [ -z "$only" ] || [[ ",$only," == *,import,* ]]; }; then
  if ctr=$(./scripts/host-ctr.sh) && [ -x "$ctr" ]; then
    extra=(--host-ctr "$ctr")
  else
    echo "bench: no host ctr (scripts/host-ctr.sh failed): the import case leaves its ctr row out" >&2
  fi
fi
exec "$tool" "${extra[@]}" "$@"
