#!/usr/bin/env bash
# gatevm's benchmarks, each beside a baseline measured in the same run (the gatevm-bench tool in
# bench/): boot against a bare QEMU boot of the same kernel, exec round trip against ssh into the
# same VM, host memory, image import throughput against a host copy, port-forward throughput and
# latency (gvproxy, passt) against QEMU's user networking, rootfs build against a minbase
# mmdebstrap. Prints the tables and writes docs/benchmarks.md.
# Usage: scripts/bench.sh [--only boot,exec,memory,import,net,rootfs] [--runs N] [--exec-runs N]
#                         [--import-mib N] [--net-mib N] [--net-pings N] [--rootfs-runs N]
#                         [--user USER] [--out FILE] [--gatevm PATH]   (--help for more)
# The boot and memory cases run gatevm as root and as an ordinary user (--user, default gatevm-ci,
# created here when missing) on the system runtime, so run it as root.
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
prev=
for a in "$@"; do
  case $prev in --user) user=$a ;; esac
  case $a in --user=*) user=${a#--user=} ;; esac
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
exec "$tool" "$@"
