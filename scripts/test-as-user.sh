#!/usr/bin/env bash
# The end-to-end tests again, as an ordinary user (run by scripts/test.sh as root, after the
# tests as root): creates the user gatevm-ci (in the kvm group where there is one), sets up the
# system runtime every user finds (`gatevm setup --system`), copies the release binaries and the
# end-to-end test programs where that user can run them, and runs them as that user with no
# privilege at all. A test that needs root records itself as skipped there.
#
#   scripts/test-as-user.sh [LOG SKIPLOG] [TEST_FILE...]
#
# LOG gets cargo's output (for the caller's counts); SKIPLOG the skips, each test named
# `as-user: NAME`. TEST_FILE names test files of crates/cli/tests (default: every file whose tests
# boot VMs). The binaries under test are GATEVM_BIN, GATEVM_GUEST_BIN and GATEVM_FAKE_K3S where
# set (scripts/test.sh sets them), else the release builds in target/release.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "test-as-user: run it as root: it creates the user and sets up the system runtime" >&2
  exit 1
fi
log=${1:-/dev/null}
skiplog=${2:-/dev/null}
shift $(($# >= 2 ? 2 : $#))
files=("$@")
if [ ${#files[@]} -eq 0 ]; then
  mapfile -t files < <(grep -l 'enabled(' crates/cli/tests/*.rs | xargs -n1 basename | sed 's/\.rs$//')
fi
user=gatevm-ci
if ! id -u "$user" >/dev/null 2>&1; then
  useradd --create-home --shell /bin/sh "$user"
fi
if getent group kvm >/dev/null; then
  usermod -aG kvm "$user"
fi
home=$(getent passwd "$user" | cut -d: -f6)
gatevm_bin=${GATEVM_BIN:-$PWD/target/release/gatevm}
guest_bin=${GATEVM_GUEST_BIN:-$PWD/target/release/gatevm-guest}
fake_k3s=${GATEVM_FAKE_K3S:-$PWD/target/release/fake-k3s}
# The guest agent named, not the one next to GATEVM_BIN (a debug build's is not static).
GATEVM_GUEST_BIN="$guest_bin" "$gatevm_bin" setup --system
work=$(mktemp -d /tmp/gatevm-as-user.XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
cp "$gatevm_bin" "$work/gatevm"
cp "$guest_bin" "$work/gatevm-guest"
cp "$fake_k3s" "$work/fake-k3s"
if [ -n "${GATEVM_HOST_REGISTRY:-}" ]; then
  cp "$GATEVM_HOST_REGISTRY" "$work/docker-registry"
fi
if [ -n "${GATEVM_HOST_CTR:-}" ]; then
  cp "$GATEVM_HOST_CTR" "$work/ctr"
fi
# The test programs cargo built for the root run (same flags, so nothing is rebuilt).
mapfile -t built < <(cargo test --workspace --locked --all-targets --no-run 2>&1 \
  | sed -n 's|.*Executable tests/\([a-z0-9_]*\)\.rs (\(.*\))$|\1 \2|p')
for f in "${files[@]}"; do
  exe=$(printf '%s\n' "${built[@]}" | awk -v f="$f" '$1 == f { print $2 }')
  if [ -z "$exe" ]; then
    echo "test-as-user: no test program for crates/cli/tests/$f.rs" >&2
    exit 1
  fi
  cp "$exe" "$work/$f"
done
userskips="$work/skips"
: >"$userskips"
chown "$user" "$userskips"
rc=0
for f in "${files[@]}"; do
  echo "test-as-user: tests/$f.rs as $user"
  set +e
  (cd "$work" && runuser -u "$user" -- env -i HOME="$home" USER="$user" \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    GATEVM_E2E=1 GATEVM_BIN="$work/gatevm" GATEVM_GUEST_BIN="$work/gatevm-guest" \
    GATEVM_FAKE_K3S="$work/fake-k3s" ${GATEVM_K3S_BIN:+GATEVM_K3S_BIN="$GATEVM_K3S_BIN"} \
    ${GATEVM_HOST_CTR:+GATEVM_HOST_CTR="$work/ctr"} \
    ${GATEVM_HOST_REGISTRY:+GATEVM_HOST_REGISTRY="$work/docker-registry"} \
    GATEVM_SKIP_LOG="$userskips" RUST_BACKTRACE=1 "./$f" --test-threads=2) 2>&1 | tee -a "$log"
  test_rc=${PIPESTATUS[0]}
  set -e
  [ "$test_rc" -eq 0 ] || rc=1
done
# Every instance the user's tests made is gone.
# (A list that fails is a failure too, not "nothing left".)
if ! listing=$(runuser -u "$user" -- "$work/gatevm" list 2>"$work/list.err"); then
  echo "test-as-user: gatevm list as $user failed: $(cat "$work/list.err")" | tee -a "$log"
  echo "test result: FAILED. 0 passed; 1 failed (as-user: gatevm list failed)" | tee -a "$log"
  rc=1
fi
left=$(printf '%s\n' "$listing" | awk 'NR > 1 { print $1 }' | tr '\n' ' ')
if [ -n "$left" ]; then
  echo "test-as-user: instances left behind by $user: $left" | tee -a "$log"
  echo "test result: FAILED. 0 passed; 1 failed (as-user: instances left behind)" | tee -a "$log"
  rc=1
fi
awk -F'\t' 'BEGIN { OFS = "\t" } { $2 = "as-user: " $2; print }' "$userskips" >>"$skiplog"
exit "$rc"
