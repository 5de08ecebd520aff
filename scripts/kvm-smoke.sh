#!/usr/bin/env bash
# The libkrun path for real, on a host with hardware virtualization (what this project's own
# machines lack: their /dev/kvm is kvm_pvm). Boots one instance per backend (krun, then QEMU on
# KVM), checks that the backend asked for is the one running, runs exec and containerd in the guest,
# sends a request through a host port forward, stops and deletes, and prints how long each step took.
# Exit codes: 0 every check passed, 1 a check failed, 77 not run here (no hardware virtualization).
# Usage: scripts/kvm-smoke.sh [krun|qemu]...   (default: krun qemu)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/build.sh
g=$PWD/target/release/gatevm
"$g" setup
doctor=$("$g" doctor --json)
if ! grep -Eq '"hardware_virtualization": *true' <<<"$doctor"; then
  flavour=$(sed -n 's/.*"kvm_flavour": *"\?\([^",]*\)"\?.*/\1/p' <<<"$doctor" | head -n 1)
  echo "kvm-smoke: NOT RUN: no hardware virtualization here (kvm flavour: ${flavour:-none}); gatevm doctor says why"
  exit 77
fi
backends=("$@")
[ ${#backends[@]} -gt 0 ] || backends=(krun qemu)
port=${GATEVM_SMOKE_PORT:-18181}
ms() { date +%s%3N; }
fail() { echo "kvm-smoke: FAILED ($vmm): $*" >&2; "$g" logs "$name" --console 2>/dev/null | tail -n 30 >&2 || true; exit 1; }
for vmm in "${backends[@]}"; do
  case "$vmm" in krun|qemu) ;; *) echo "kvm-smoke: unknown backend '$vmm' (krun or qemu)" >&2; exit 2 ;; esac
  name="kvm-smoke-$vmm"
  "$g" delete "$name" >/dev/null 2>&1 || true
  trap '"$g" delete "$name" >/dev/null 2>&1 || true' EXIT
  t0=$(ms)
  "$g" start "$name" --vmm "$vmm" -p "$port:8080" || fail "start"
  t_start=$(( $(ms) - t0 ))
  status=$("$g" status "$name" --json)
  grep -Eq "\"backend\": *\"$vmm/kvm\"" <<<"$status" || fail "status does not show backend $vmm/kvm: $status"
  grep -Eq '"healthy": *true' <<<"$status" || fail "not healthy after start: $status"
  t0=$(ms)
  [ "$("$g" exec "$name" -- echo ok)" = ok ] || fail "exec"
  t_exec=$(( $(ms) - t0 ))
  "$g" exec "$name" -- ctr version >/dev/null || fail "ctr version in the guest"
  "$g" exec "$name" -- sh -c 'nohup perl -MIO::Socket::INET -e '"'"'
    my $s = IO::Socket::INET->new(LocalPort => 8080, Listen => 5, ReuseAddr => 1) or die;
    while (my $c = $s->accept) { print $c "smoke\n"; close $c; }'"'"' >/dev/null 2>&1 &' || fail "guest listener"
  answer=""
  for _ in $(seq 1 50); do
    answer=$(exec 3<>"/dev/tcp/127.0.0.1/$port" && timeout 5 cat <&3) 2>/dev/null && [ -n "$answer" ] && break
    sleep 0.2
  done
  [ "$answer" = smoke ] || fail "the forward 127.0.0.1:$port did not answer"
  t0=$(ms)
  "$g" stop "$name" || fail "stop"
  t_stop=$(( $(ms) - t0 ))
  "$g" status "$name" --json | grep -Eq '"stop_reason": *"stopped on request"' || fail "stop_reason after stop"
  "$g" delete "$name" || fail "delete"
  trap - EXIT
  echo "kvm-smoke: $vmm ok: start to ready ${t_start} ms, exec ${t_exec} ms, stop ${t_stop} ms"
done
