//! Boot: a bare QEMU boot of the same kernel to userspace and power-off, beside `gatevm start`
//! of a new instance (cold) and of a stopped one (warm).

use super::{summary, Bench};
use crate::gatevm::need;
use crate::host::{self, bare_boot_args};
use crate::markdown::{num, times, Align, Section, Table, Target, Verdict};
use crate::runner::{self, ms};
use crate::stats::{ratio, Summary};
use anyhow::{bail, Context};
use gatevm_runtime::cpio::CpioWriter;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const BARE_TIMEOUT: Duration = Duration::from_secs(60);

/// The `/init` of the baseline: prints a marker on the console, then powers off at once.
pub const BASELINE_INIT: &str =
    "#!/bin/busybox sh\n/bin/busybox echo userspace\n/bin/busybox poweroff -f\n";

/// The baseline initramfs (cpio newc, gatevm's writer): `/bin/busybox` (static), `/init`, and
/// `/dev/console` so that init has a console even when the kernel's built-in initramfs lacks
/// one.
pub fn baseline_initramfs(busybox: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut w = CpioWriter::new(Vec::with_capacity(busybox.len() + 4096));
    w.dir("bin", 0o755)?;
    w.file("bin/busybox", 0o755, busybox)?;
    w.dir("dev", 0o755)?;
    w.char_device("dev/console", 0o600, 5, 1)?;
    w.file("init", 0o755, BASELINE_INIT.as_bytes())?;
    w.finish()
}
/// Where the baseline's busybox comes from (Debian's busybox-static).
pub const BUSYBOX: &str = "/bin/busybox";

/// Target: agent ready within this many bare boots.
pub const AGENT_TARGET: f64 = 1.3;
/// Target: containerd ready within this many bare boots.
pub const READY_TARGET: f64 = 2.0;

/// One start's measurements.
#[derive(Default)]
struct Starts {
    wall: Vec<f64>,
    agent: Vec<f64>,
    ready: Vec<f64>,
}

impl Bench<'_> {
    fn timed_start(&mut self, into: &mut Starts) -> anyhow::Result<()> {
        let wall = self.gv.start()?;
        let st = self.gv.status()?;
        let name = &self.gv.name;
        into.wall.push(ms(wall));
        into.agent
            .push(need(st.agent_ready_ms, "agent_ready_ms", name)? as f64);
        into.ready.push(need(st.ready_ms, "ready_ms", name)? as f64);
        if st.backend.is_some() {
            self.backend = st.backend;
        }
        Ok(())
    }

    /// Runs the boot case.
    pub fn boot(&mut self) -> anyhow::Result<Section> {
        let kernel = self.runtime.join("kernel/vmlinux");
        if !kernel.is_file() {
            bail!(
                "no kernel at {}: run `gatevm setup` first (or set GATEVM_RUNTIME_DIR)",
                kernel.display()
            );
        }
        let qemu = self.qemu.clone().map_err(anyhow::Error::msg)?;
        let busybox = host::static_busybox(Path::new(BUSYBOX))?;
        let initrd = self.scratch.path().join("baseline-initrd.cpio");
        std::fs::write(&initrd, baseline_initramfs(&busybox)?)
            .with_context(|| format!("cannot write {}", initrd.display()))?;
        let console = self.scratch.path().join("baseline-console.log");
        let accel = self.machine.accel.accel;

        let mut bare = Vec::new();
        let mut cold = Starts::default();
        let mut warm = Starts::default();
        for i in 1..=self.runs {
            let _ = std::fs::remove_file(&console);
            let mut cmd = Command::new(&qemu.bin);
            cmd.args(bare_boot_args(&qemu, accel, &kernel, &initrd, &console));
            let label = format!("{} (bare boot)", runner::label(&Command::new(&qemu.bin)));
            let f = runner::run_labeled(&mut cmd, &label, BARE_TIMEOUT, self.scratch)?.ok()?;
            let text =
                String::from_utf8_lossy(&std::fs::read(&console).unwrap_or_default()).into_owned();
            if !text.contains("userspace") {
                bail!(
                    "the bare QEMU boot did not reach userspace: its console ends with {:?}",
                    runner::last_line(&text).unwrap_or("(nothing)")
                );
            }
            bare.push(ms(f.elapsed));

            self.gv.delete()?;
            self.timed_start(&mut cold)?;
            self.gv.stop()?;
            self.timed_start(&mut warm)?;
            self.gv.stop()?;
            eprintln!(
                "boot {i}/{}: bare {} ms; cold start {} ms (agent {} / containerd {}); warm start {} ms (agent {} / containerd {})",
                self.runs,
                num(bare[i - 1]),
                num(cold.wall[i - 1]),
                num(cold.agent[i - 1]),
                num(cold.ready[i - 1]),
                num(warm.wall[i - 1]),
                num(warm.agent[i - 1]),
                num(warm.ready[i - 1]),
            );
        }

        let bare_s = summary(&bare);
        let mut t = Table::new(&[
            ("measurement", Align::Left),
            ("n", Align::Right),
            ("min (ms)", Align::Right),
            ("median (ms)", Align::Right),
            ("max (ms)", Align::Right),
            ("median / bare", Align::Right),
        ]);
        let mut row = |what: &str, s: &Summary| {
            t.row(&[
                what.to_string(),
                s.n.to_string(),
                num(s.min),
                num(s.median),
                num(s.max),
                times(ratio(s.median, bare_s.median)),
            ]);
        };
        row("baseline: bare QEMU boot to userspace + power-off", &bare_s);
        let sums = |s: &Starts| (summary(&s.wall), summary(&s.agent), summary(&s.ready));
        let (cw, ca, cr) = sums(&cold);
        let (ww, wa, wr) = sums(&warm);
        row("cold `gatevm start` (new instance): wall", &cw);
        row("cold: agent ready (agent_ready_ms)", &ca);
        row("cold: containerd ready (ready_ms)", &cr);
        row("warm `gatevm start` (stopped instance): wall", &ww);
        row("warm: agent ready (agent_ready_ms)", &wa);
        row("warm: containerd ready (ready_ms)", &wr);

        let target = |what: &str, s: &Summary, limit: f64| {
            let r = ratio(s.median, bare_s.median);
            Target {
                what: format!("{what} <= {limit}x bare boot"),
                measured: format!(
                    "{} ({} / {} ms, medians)",
                    times(r),
                    num(s.median),
                    num(bare_s.median)
                ),
                verdict: match r {
                    Some(r) => Verdict::of(r <= limit),
                    None => Verdict::NotMeasured("no bare boot time".into()),
                },
            }
        };
        let backend = self.backend.clone().unwrap_or_else(|| "unknown".into());
        let mut notes = vec![
            format!(
                "Bare boot: `{}` with the runtime's kernel ({}), `-M microvm,x-option-roms=off,rtc=on -global virtio-mmio.force-legacy=false -accel {} -smp 2 -m 2048`, and an initramfs of a static busybox whose /init prints `userspace` and powers off; wall time from spawn to QEMU's exit, the console checked for `userspace`.",
                qemu.bin.display(),
                kernel.display(),
                accel.name()
            ),
            "gatevm: wall time of `gatevm start bench`; agent ready and containerd ready are the supervisor's own `agent_ready_ms` and `ready_ms` from `gatevm status bench --json`, counted from the start of the boot. Cold: the instance is deleted first; warm: the same instance, stopped, started again.".to_string(),
        ];
        if !backend.starts_with("qemu") {
            notes.push(format!(
                "gatevm ran on the {backend} backend here, not QEMU: the baseline is still a bare QEMU boot."
            ));
        }
        Ok(Section {
            title: "Boot".into(),
            intro: vec![format!(
                "Runs: {}. gatevm backend `{backend}`, QEMU acceleration `{}`.",
                self.runs,
                accel.name()
            )],
            tables: vec![t],
            targets: vec![
                target("cold agent ready", &ca, AGENT_TARGET),
                target("warm agent ready", &wa, AGENT_TARGET),
                target("cold containerd ready", &cr, READY_TARGET),
                target("warm containerd ready", &wr, READY_TARGET),
            ],
            notes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatevm_runtime::cpio::{parse_newc, S_IFCHR, S_IFREG};

    #[test]
    fn baseline_initramfs_layout() {
        let e = parse_newc(&baseline_initramfs(b"\x7fELF fake busybox").unwrap()).unwrap();
        let get = |n: &str| e.iter().find(|p| p.name == n).unwrap();
        assert_eq!(get("bin/busybox").data, b"\x7fELF fake busybox");
        assert_eq!(get("bin/busybox").mode, S_IFREG | 0o755);
        assert_eq!(get("init").data, BASELINE_INIT.as_bytes());
        assert_eq!(get("init").mode, S_IFREG | 0o755);
        assert!(BASELINE_INIT.starts_with("#!/bin/busybox sh\n"));
        let console = get("dev/console");
        assert_eq!(console.mode, S_IFCHR | 0o600);
        assert_eq!((console.rdev_major, console.rdev_minor), (5, 1));
    }
}
