#!/usr/bin/env bash
# The whole test suite: set-up, unit tests, and end-to-end tests that boot real VMs.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/build.sh
target/release/gatevm setup
export GATEVM_E2E=1 GATEVM_BIN="$PWD/target/release/gatevm" GATEVM_GUEST_BIN="$PWD/target/release/gatevm-guest"
# End-to-end tests boot VMs; two cores fit two tests at a time.
cargo test --workspace --locked -- --test-threads=2
