//! Boot: a bare QEMU boot of the same kernel to userspace and power-off, beside `gatevm start`
//! of a new instance (cold) and of a stopped one (warm), as root and as an ordinary user.

use super::{summary, Bench};
use crate::gatevm::{need, Gatevm};
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

/// One side's cold and warm starts: root's or an ordinary user's.
struct Side<'g, 'a> {
    gv: &'g Gatevm<'a>,
    cold: Starts,
    warm: Starts,
    backend: Option<String>,
    net: Option<String>,
}

impl Side<'_, '_> {
    fn timed_start(&mut self, warm: bool) -> anyhow::Result<()> {
        let wall = self.gv.start()?;
        let st = self.gv.status()?;
        let name = &self.gv.name;
        let into = if warm { &mut self.warm } else { &mut self.cold };
        into.wall.push(ms(wall));
        into.agent
            .push(need(st.agent_ready_ms, "agent_ready_ms", name)? as f64);
        into.ready.push(need(st.ready_ms, "ready_ms", name)? as f64);
        self.backend = st.backend.or(self.backend.take());
        self.net = st.net.or(self.net.take());
        Ok(())
    }

    /// Delete, cold start, stop, warm start, stop.
    fn round(&mut self) -> anyhow::Result<()> {
        self.gv.delete()?;
        self.timed_start(false)?;
        self.gv.stop()?;
        self.timed_start(true)?;
        self.gv.stop()
    }

    /// `root` or `user NAME`, with the network helper it ran with.
    fn label(&self) -> String {
        match &self.net {
            Some(n) => format!("{} (net {n})", self.gv.who()),
            None => self.gv.who(),
        }
    }

    fn progress(&self, i: usize) -> String {
        let (c, w) = (&self.cold, &self.warm);
        format!(
            "{}: cold {} ms (agent {} / containerd {}), warm {} ms (agent {} / containerd {})",
            self.gv.who(),
            num(c.wall[i]),
            num(c.agent[i]),
            num(c.ready[i]),
            num(w.wall[i]),
            num(w.agent[i]),
            num(w.ready[i]),
        )
    }
}

/// The order of the sides in run `i` (from 1): as given in odd runs, reversed in even ones.
pub fn run_order(sides: usize, i: usize) -> Vec<usize> {
    let mut o: Vec<usize> = (0..sides).collect();
    if i % 2 == 0 {
        o.reverse();
    }
    o
}

/// The rows of one side: `who` is `root` or `user NAME` (`None`: the only side, as before).
pub fn side_rows(who: Option<&str>) -> [String; 6] {
    let p = |what: &str| match who {
        Some(w) => format!("{w}: {what}"),
        None => what.to_string(),
    };
    [
        p("cold `gatevm start` (new instance): wall"),
        p("cold: agent ready (agent_ready_ms)"),
        p("cold: containerd ready (ready_ms)"),
        p("warm `gatevm start` (stopped instance): wall"),
        p("warm: agent ready (agent_ready_ms)"),
        p("warm: containerd ready (ready_ms)"),
    ]
}

impl Bench<'_> {
    /// Runs the boot case: per run, the bare boot, then root's cold and warm start, then (when
    /// there is one) the ordinary user's, interleaved so that drift hits all alike.
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
        let new_side = |gv| Side {
            gv,
            cold: Starts::default(),
            warm: Starts::default(),
            backend: None,
            net: None,
        };
        let mut sides = vec![new_side(&self.gv)];
        if let Ok(u) = &self.user {
            sides.push(new_side(u));
        }
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
            // Root first in odd runs, the user first in even ones: load that comes and goes
            // (the machine's other work) falls on neither side more than the other.
            for k in run_order(sides.len(), i) {
                let s = &mut sides[k];
                s.round()
                    .with_context(|| format!("gatevm as {}", s.gv.who()))?;
            }
            let each: Vec<String> = sides.iter().map(|s| s.progress(i - 1)).collect();
            eprintln!(
                "boot {i}/{}: bare {} ms; {}",
                self.runs,
                num(bare[i - 1]),
                each.join("; ")
            );
        }
        if let Some(b) = sides[0].backend.clone() {
            self.backend = Some(b);
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
        let two = sides.len() > 1;
        let mut targets = Vec::new();
        for s in &sides {
            let label = s.label();
            let names = side_rows(two.then_some(label.as_str()));
            let sums = [
                summary(&s.cold.wall),
                summary(&s.cold.agent),
                summary(&s.cold.ready),
                summary(&s.warm.wall),
                summary(&s.warm.agent),
                summary(&s.warm.ready),
            ];
            for (n, sum) in names.iter().zip(&sums) {
                row(n, sum);
            }
            let p = |w: &str| {
                if two {
                    format!("{}: {w}", s.gv.who())
                } else {
                    w.to_string()
                }
            };
            targets.push(target(&p("cold agent ready"), &sums[1], AGENT_TARGET));
            targets.push(target(&p("warm agent ready"), &sums[4], AGENT_TARGET));
            targets.push(target(&p("cold containerd ready"), &sums[2], READY_TARGET));
            targets.push(target(&p("warm containerd ready"), &sums[5], READY_TARGET));
        }

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
        match &self.user {
            Ok(u) => {
                let who = u.user().map(|u| u.name.as_str()).unwrap_or("?");
                notes.push(format!(
                    "Root and an ordinary user in the same run: each run is the bare boot, then root's delete / cold start / stop / warm start / stop of its instance `bench` and the same as the user `{who}` (no privileges{}) on the user's own instance `bench` in the user's own data directory, through `runuser -u {who} -- env -i HOME=... USER=... LOGNAME=... PATH=... gatevm ...` (root's environment does not reach it); root goes first in odd runs, the user in even ones. The user's wall times include starting `runuser` and `env` (a few ms). The user runs on the system runtime (`gatevm setup --system`) after an untimed `gatevm setup` of its own.",
                    ", a member of the kvm group where there is one"
                ));
                let helpers: Vec<String> = sides
                    .iter()
                    .map(|s| {
                        format!(
                            "{} `{}`, network helper `{}`",
                            s.gv.who(),
                            s.backend.as_deref().unwrap_or("unknown"),
                            s.net.as_deref().unwrap_or("unknown")
                        )
                    })
                    .collect();
                notes.push(format!("Backends: {}.", helpers.join("; ")));
            }
            Err(why) => {
                self.not_measured
                    .push(format!("Boot as an ordinary user: {why}."));
            }
        }
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
            targets,
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

    #[test]
    fn row_names_per_side() {
        assert_eq!(
            side_rows(None)[0],
            "cold `gatevm start` (new instance): wall"
        );
        let user = side_rows(Some("user gatevm-ci (net passt)"));
        assert_eq!(
            user[4],
            "user gatevm-ci (net passt): warm: agent ready (agent_ready_ms)"
        );
        assert_eq!(
            user[2],
            "user gatevm-ci (net passt): cold: containerd ready (ready_ms)"
        );
    }

    #[test]
    fn sides_alternate() {
        assert_eq!(run_order(2, 1), [0, 1]);
        assert_eq!(run_order(2, 2), [1, 0]);
        assert_eq!(run_order(2, 5), [0, 1]);
        assert_eq!(run_order(1, 2), [0]);
    }
}
