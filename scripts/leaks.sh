#!/usr/bin/env bash
# The long leak check: CYCLES (default 100) start/exec/stop cycles of one instance, checking after
# each that no process, mount, socket or cgroup is left, that the supervisor's file descriptors do
# not grow under exec load, and that the instance directory does not grow. CI runs 3 cycles as
# part of scripts/test.sh. Needs the set-up of scripts/test.sh (run that once first).
# Usage: scripts/leaks.sh [CYCLES]
set -euo pipefail
cd "$(dirname "$0")/.."
cycles="${1:-100}"
case "$cycles" in
  '' | *[!0-9]*) echo "usage: $0 [CYCLES]" >&2; exit 2 ;;
esac
./scripts/build.sh
export GATEVM_E2E=1 GATEVM_BIN="$PWD/target/release/gatevm" GATEVM_GUEST_BIN="$PWD/target/release/gatevm-guest"
export GATEVM_LEAK_CYCLES="$cycles"
cargo test --release --locked -p gatevm --test faults -- no_leaks_over_repeated_cycles --nocapture
