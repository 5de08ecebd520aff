#!/usr/bin/env bash
# The main job: set up everything, boot the default gateway, show exec and a forwarded port working.
# Idempotent: a second run reuses the runtime, the rootfs and a running gateway.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/build.sh
gatevm=target/release/gatevm
"$gatevm" setup
port=${GATEVM_DEMO_PORT:-18080}
if ! "$gatevm" status default --json 2>/dev/null | grep -q '"state": "running"'; then
  "$gatevm" start default -p "$port:8080"
fi
"$gatevm" status default
echo
echo "\$ gatevm exec default -- uname -a"
"$gatevm" exec default -- uname -a
echo "\$ gatevm exec default -- ctr version"
"$gatevm" exec default -- ctr version
echo
echo "A TCP service in the guest on port 8080, reached from the host at 127.0.0.1:$port:"
"$gatevm" exec default -- sh -c 'nohup perl -MIO::Socket::INET -e '"'"'
  my $s = IO::Socket::INET->new(LocalPort => 8080, Listen => 5, ReuseAddr => 1) or die "listen: $!";
  while (my $c = $s->accept) { print $c "hello from the gatevm guest\n"; close $c; }
'"'"' >/dev/null 2>&1 &'
for _ in $(seq 1 50); do
  if answer=$(exec 3<>"/dev/tcp/127.0.0.1/$port" && timeout 5 cat <&3) && [ -n "$answer" ]; then
    echo "host got: $answer"
    echo
    echo "The gateway keeps running. Try: $gatevm shell default    Stop it: $gatevm stop default"
    exit 0
  fi
  sleep 0.2
done
echo "demo: the forwarded port did not answer" >&2
exit 1
