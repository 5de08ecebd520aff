#!/usr/bin/env bash
# The libkrun path for real, on a host with hardware virtualization (what this project's own
# machines lack: their /dev/kvm is kvm_pvm). For each backend asked for (krun, then QEMU on KVM):
# a throwaway `vm-run` on a tiny busybox root, then a containerd instance: the backend asked for
# is the one running, exec, containerd in the guest, a request through a host port forward, stop
# and delete. Every step is tried and printed (ok or FAILED, with how long it took).
# Exit codes: 0 every step passed, or not run here (it prints NOT RUN: no hardware
# virtualization); 1 a step failed; 2 a bad argument.
# Usage: scripts/kvm-smoke.sh [krun|qemu]...   (default: krun qemu)
set -euo pipefail
cd "$(dirname "$0")/.."
backends=("$@")
[ ${#backends[@]} -gt 0 ] || backends=(krun qemu)
for vmm in "${backends[@]}"; do
  case "$vmm" in krun|qemu) ;; *) echo "kvm-smoke: unknown backend '$vmm' (krun or qemu)" >&2; exit 2 ;; esac
done
./scripts/build.sh
g=$PWD/target/release/gatevm
"$g" setup
doctor=$("$g" doctor --json)
if ! grep -Eq '"hardware_virtualization": *true' <<<"$doctor"; then
  flavour=$(sed -n 's/.*"kvm_flavour": *"\?\([^",]*\)"\?.*/\1/p' <<<"$doctor" | head -n 1)
  echo "kvm-smoke: NOT RUN: no hardware virtualization here (kvm flavour: ${flavour:-none}); gatevm doctor says why"
  exit 0
fi
# The tiny root of the vm-run step: a static busybox.
if [ ! -x /usr/bin/busybox ] || readelf -l /usr/bin/busybox 2>/dev/null | grep -q 'program interpreter'; then
  echo "kvm-smoke: installing busybox-static for the tiny root"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends busybox-static >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends busybox-static >/dev/null; }
fi
work=$(mktemp -d)
mkdir -p "$work/root/bin"
cp /usr/bin/busybox "$work/root/bin/busybox"
for a in sh echo cat uname; do ln -s busybox "$work/root/bin/$a"; done
port=${GATEVM_SMOKE_PORT:-18181}
ms() { date +%s%3N; }
results=()
failed=0
# step NAME COMMAND...: runs it, records "ok (N ms)" or "FAILED".
step() {
  local what=$1 t0 rc=0
  shift
  t0=$(ms)
  "$@" || rc=$?
  if [ "$rc" -eq 0 ]; then
    results+=("$vmm: $what: ok ($(( $(ms) - t0 )) ms)")
  else
    results+=("$vmm: $what: FAILED (exit $rc)")
    failed=1
  fi
  return "$rc"
}
tiny_vm() {
  local out
  out=$("$g" vm-run --vmm "$vmm" --rootfs "$work/root" -- /bin/sh -c 'echo tiny-ok; uname -r') || return 1
  grep -qx tiny-ok <<<"$out" || { echo "kvm-smoke: vm-run printed: $out" >&2; return 1; }
}
backend_is() {
  local status
  status=$("$g" status "$name" --json)
  grep -Eq "\"backend\": *\"$vmm/kvm\"" <<<"$status" && grep -Eq '"healthy": *true' <<<"$status" \
    || { echo "kvm-smoke: status: $status" >&2; return 1; }
}
exec_echo() { [ "$("$g" exec "$name" -- echo ok)" = ok ]; }
guest_listener() {
  "$g" exec "$name" -- sh -c 'nohup perl -MIO::Socket::INET -e '"'"'
    my $s = IO::Socket::INET->new(LocalPort => 8080, Listen => 5, ReuseAddr => 1) or die;
    while (my $c = $s->accept) { print $c "smoke\n"; close $c; }'"'"' >/dev/null 2>&1 &'
}
forward_answers() {
  local answer=""
  for _ in $(seq 1 50); do
    answer=$(exec 3<>"/dev/tcp/127.0.0.1/$port" && timeout 5 cat <&3) 2>/dev/null && [ -n "$answer" ] && break
    sleep 0.2
  done
  [ "$answer" = smoke ]
}
forward() { guest_listener && forward_answers; }
stopped_on_request() {
  "$g" stop "$name" && "$g" status "$name" --json | grep -Eq '"stop_reason": *"stopped on request"'
}
cleanup() { [ -z "${name:-}" ] || "$g" delete "$name" --force >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
for vmm in "${backends[@]}"; do
  name="kvm-smoke-$vmm"
  "$g" delete "$name" --force >/dev/null 2>&1 || true
  step "vm-run on a tiny root" tiny_vm || true
  if step "start (containerd instance)" "$g" start "$name" --vmm "$vmm" -p "$port:8080"; then
    step "status shows $vmm/kvm, healthy" backend_is || true
    step "exec" exec_echo || true
    step "ctr version in the guest" "$g" exec "$name" -- ctr version || true
    step "forward 127.0.0.1:$port" forward || true
    step "stop" stopped_on_request || true
  else
    "$g" logs "$name" --console 2>/dev/null | tail -n 30 >&2 || true
  fi
  step "delete" "$g" delete "$name" --force || true
done
echo
printf 'kvm-smoke: %s\n' "${results[@]}"
exit "$failed"
