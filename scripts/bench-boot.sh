#!/usr/bin/env bash
# Boot time of gatevm beside a bare QEMU boot of the same kernel, measured in the same run.
#   baseline: qemu-system-x86_64 -M microvm with the runtime's kernel and a minimal static /init
#             that powers off at once (wall time from exec to QEMU exit)
#   gatevm:   `gatevm start` of a new instance until it reports ready (wall), plus the
#             supervisor's own agent-ready / containerd-ready times, cold (new instance) and warm
# Usage: scripts/bench-boot.sh [RUNS]   (after scripts/build.sh and gatevm setup)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
gatevm=target/release/gatevm
rt=${GATEVM_RUNTIME_DIR:-${GATEVM_DATA_DIR:-$HOME/.local/share/gatevm}/runtime/v1}
qemu=qemu-system-x86_64
qemu_l=()
if [ -x "$rt/qemu/usr/bin/qemu-system-x86_64" ]; then
  qemu=$rt/qemu/usr/bin/qemu-system-x86_64
  qemu_l=(-L "$rt/qemu/usr/share/qemu" -L "$rt/qemu/usr/share/seabios")
fi
command -v cpio >/dev/null || { apt-get install -y -qq cpio >/dev/null; }
work=$(mktemp -d); trap 'rm -rf "$work"; "$gatevm" delete bench-boot --force >/dev/null 2>&1 || true' EXIT
cat > "$work/init.c" <<'C'
#include <sys/reboot.h>
#include <unistd.h>
int main(void) { write(1, "userspace\n", 10); reboot(RB_POWER_OFF); return 0; }
C
gcc -O2 -static -o "$work/init" "$work/init.c"
(cd "$work" && mkdir -p root/dev && cp init root/init && cd root && find . | cpio -o -H newc --quiet > ../initrd)
accel=tcg; [ -w /dev/kvm ] && grep -qE 'vmx|svm' /proc/cpuinfo && [ ! -d /sys/module/kvm_pvm ] && accel=kvm
ms() { date +%s%3N; }
stats() { sort -n | awk '{a[NR]=$1} END {printf "min %d  median %d  max %d ms (n=%d)", a[1], a[int((NR+1)/2)], a[NR], NR}'; }
bare=(); cold=(); warm=(); agent=(); ready=()
for i in $(seq 1 "$runs"); do
  t=$(ms)
  "$qemu" "${qemu_l[@]}" -M microvm,x-option-roms=off,rtc=on -accel $accel -smp 2 -m 2048 -nodefaults -no-user-config \
    -nographic -no-reboot -serial file:"$work/console" -kernel "$rt/kernel/vmlinux" -initrd "$work/initrd" \
    -append "console=ttyS0 quiet panic=-1"
  bare+=($(( $(ms) - t )))
  grep -q userspace "$work/console" || { echo "bare boot did not reach userspace" >&2; exit 1; }
  "$gatevm" delete bench-boot --force >/dev/null 2>&1 || true
  t=$(ms); "$gatevm" start bench-boot >/dev/null 2>&1; cold+=($(( $(ms) - t )))
  "$gatevm" stop bench-boot >/dev/null 2>&1
  t=$(ms); "$gatevm" start bench-boot >/dev/null 2>&1; warm+=($(( $(ms) - t )))
  st=$("$gatevm" status bench-boot --json)
  agent+=($(echo "$st" | sed -n 's/.*"agent_ready_ms": \([0-9]*\).*/\1/p'))
  ready+=($(echo "$st" | sed -n 's/.*"ready_ms": \([0-9]*\).*/\1/p'))
  "$gatevm" stop bench-boot >/dev/null 2>&1
done
echo "host: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), accel $accel, $("$qemu" --version | head -1)"
echo "bare QEMU boot to userspace + power-off: $(printf '%s\n' "${bare[@]}" | stats)"
echo "gatevm start, new instance (cold):        $(printf '%s\n' "${cold[@]}" | stats)"
echo "gatevm start, existing instance (warm):   $(printf '%s\n' "${warm[@]}" | stats)"
echo "  warm: agent ready                       $(printf '%s\n' "${agent[@]}" | stats)"
echo "  warm: containerd ready                  $(printf '%s\n' "${ready[@]}" | stats)"
