#!/usr/bin/env bash
# Builds gatevm (release) and the statically linked guest agent next to it.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "build: cargo is missing: install a Rust toolchain (rustup)" >&2; exit 1; }
if ! dpkg -s libc6-dev >/dev/null 2>&1 || ! command -v cc >/dev/null; then
  echo "build: installing gcc and libc6-dev (needed to link the static guest agent)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev >/dev/null
fi
cargo build --release --locked -p gatevm
# The guest agent is PID 1 of an initramfs: link it statically against glibc.
cargo rustc --release --locked -p gatevm-guest --bin gatevm-guest -- -C target-feature=+crt-static
if readelf -l target/release/gatevm-guest | grep -q INTERP; then
  echo "build: target/release/gatevm-guest is not static" >&2
  exit 1
fi
echo "build: target/release/gatevm and target/release/gatevm-guest are ready"
