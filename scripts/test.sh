#!/usr/bin/env bash
# The whole test suite: set-up, unit tests, and end-to-end tests that boot real VMs.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/build.sh
# The gates: formatting and lints (the workspace's [workspace.lints] and clippy's defaults), before
# the long tests, so a style slip fails early. After build.sh, which installs the C toolchain.
for tool in rustfmt cargo-clippy; do
  command -v "$tool" >/dev/null || { echo "test: $tool is missing: rustup component add ${tool#cargo-}" >&2; exit 1; }
done
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
target/release/gatevm setup
# The vm-run tests build their root filesystems and image archives from a static busybox.
if [ ! -x /usr/bin/busybox ] || readelf -l /usr/bin/busybox 2>/dev/null | grep -q 'program interpreter'; then
  echo "test: installing busybox-static for the vm-run tests"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends busybox-static >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends busybox-static >/dev/null; }
fi
# The datastore recovery's unit test drives a real SQLite shell, as the guest's rootfs has one.
if ! command -v sqlite3 >/dev/null; then
  echo "test: installing sqlite3 for the k3s datastore recovery tests"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends sqlite3 >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends sqlite3 >/dev/null; }
fi
# The host's own ctr (out of Debian's containerd package, not installed) for the tests that drive
# an instance's containerd socket with it.
GATEVM_HOST_CTR=$(./scripts/host-ctr.sh)
export GATEVM_HOST_CTR
# A registry server (Debian's docker-registry, unpacked, not installed) and skopeo to fill it, for
# the image pull tests (a registry on 127.0.0.1 only).
GATEVM_HOST_REGISTRY=$(./scripts/host-registry.sh)
export GATEVM_HOST_REGISTRY
# A stand-in k3s for the k3s profile's plumbing test (k3s itself is not available here).
cargo build --release --locked -p gatevm-fake-k3s
# GATEVM_E2E=0 runs everything but the tests that boot VMs (they are then reported as skipped).
export GATEVM_E2E="${GATEVM_E2E:-1}" GATEVM_BIN="$PWD/target/release/gatevm" GATEVM_GUEST_BIN="$PWD/target/release/gatevm-guest"
export GATEVM_FAKE_K3S="$PWD/target/release/fake-k3s"
log=$(mktemp)
# Tests that cannot run here record themselves in this file (crates/testkit): cargo's runner hides
# what a passing test prints and counts one that returned early as passed, so the summary below
# reads this file instead of the output. The k3s end-to-end test needs a k3s binary, which no
# package registry here carries: it records itself unless GATEVM_K3S_BIN names one.
skiplog=$(mktemp)
export GATEVM_SKIP_LOG="$skiplog"
trap 'rm -f "$log" "$skiplog"' EXIT
# End-to-end tests boot VMs; two cores fit two tests at a time.
set +e
cargo test --workspace --locked --all-targets --no-fail-fast -- --test-threads=2 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
# The agent protocol's decoders under libFuzzer for a minute (scripts/fuzz.sh SECONDS for longer).
fuzz_rc=0
./scripts/fuzz.sh "${GATEVM_FUZZ_SECONDS:-60}" 2>&1 | tail -n 25 | tee -a "$log" || fuzz_rc=$?
if [ "$fuzz_rc" -ne 0 ]; then
  echo "test result: FAILED. 0 passed; 1 failed (fuzz: decode_frame)" | tee -a "$log"
  rc=1
else
  echo "test result: ok. 1 passed; 0 failed (fuzz: decode_frame, ${GATEVM_FUZZ_SECONDS:-60} s)" | tee -a "$log"
fi
# The end-to-end tests again, as an ordinary user: after the one privileged set-up, everything
# runs unprivileged (a test that needs root records itself as skipped there).
if [ "$GATEVM_E2E" = 1 ] && [ "$(id -u)" = 0 ]; then
  ./scripts/test-as-user.sh "$log" "$skiplog" || rc=1
fi
read -r passed failed < <(awk '/^test result:/ { for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } } END { print p+0, f+0 }' "$log")
# A skipped test returned early, so cargo counted it as passed: count it as skipped instead.
skipped=$(awk -F'\t' '$1 == "SKIP" && !seen[$2]++' "$skiplog" | wc -l)
passed=$((passed - skipped))
echo
if [ "$skipped" -gt 0 ]; then
  echo "skipped (did not run here):"
  awk -F'\t' '$1 == "SKIP" && !seen[$2]++ { printf "  %s: %s\n", $2, $3 }' "$skiplog"
fi
if grep -q '^PART' "$skiplog"; then
  echo "parts of passing tests not run here:"
  awk -F'\t' '$1 == "PART" && !seen[$2]++ { printf "  %s: %s\n", $2, $3 }' "$skiplog"
fi
echo "tests: $passed passed, $failed failed, $skipped skipped"
exit "$rc"
