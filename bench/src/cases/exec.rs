//! Exec round trip: `gatevm exec bench -- true` on a running instance, beside spawning `true` on
//! the host (a floor, not the ssh baseline).

use super::{summary, Bench};
use crate::markdown::{num, times, Align, Section, Table, Target, Verdict};
use crate::runner::{self, ms};
use crate::stats::ratio;
use std::process::Command;
use std::time::Duration;

const HOST_TIMEOUT: Duration = Duration::from_secs(10);
/// Round trips before the measured ones (connections, caches).
const WARMUP: usize = 2;

impl Bench<'_> {
    /// Runs the exec case.
    pub fn exec(&mut self) -> anyhow::Result<Section> {
        let st = self.gv.ensure_running()?;
        if st.backend.is_some() {
            self.backend = st.backend;
        }
        for _ in 0..WARMUP {
            self.gv.exec_true()?;
        }
        let mut guest = Vec::with_capacity(self.exec_runs);
        for _ in 0..self.exec_runs {
            guest.push(ms(self.gv.exec_true()?));
        }
        let mut host = Vec::with_capacity(self.exec_runs);
        for _ in 0..self.exec_runs {
            let f = runner::run(&mut Command::new("true"), HOST_TIMEOUT, self.scratch)?.ok()?;
            host.push(ms(f.elapsed));
        }
        let (g, h) = (summary(&guest), summary(&host));
        eprintln!(
            "exec: {} round trips: p50 {} ms, p95 {} ms; host `true`: p50 {} ms",
            g.n,
            num(g.p50),
            num(g.p95),
            num(h.p50)
        );
        let mut t = Table::new(&[
            ("measurement", Align::Left),
            ("n", Align::Right),
            ("min (ms)", Align::Right),
            ("median (ms)", Align::Right),
            ("p50 (ms)", Align::Right),
            ("p95 (ms)", Align::Right),
            ("max (ms)", Align::Right),
            ("p50 / host floor", Align::Right),
        ]);
        for (what, s) in [
            ("`gatevm exec bench -- true` round trip", &g),
            (
                "host-side floor: spawn `true` on the host (fork/exec + wait)",
                &h,
            ),
        ] {
            t.row(&[
                what.to_string(),
                s.n.to_string(),
                num(s.min),
                num(s.median),
                num(s.p50),
                num(s.p95),
                num(s.max),
                times(ratio(s.p50, h.p50)),
            ]);
        }
        Ok(Section {
            title: "Exec round trip".into(),
            intro: vec![format!(
                "{} round trips of `gatevm exec bench -- true` on a running instance (after {WARMUP} unmeasured ones), wall time of the command; beside it, as many spawns of `true` on the host, measured the same way.",
                self.exec_runs
            )],
            tables: vec![t],
            targets: vec![Target {
                what: "exec <= 0.25x ssh".into(),
                measured: "-".into(),
                verdict: Verdict::NotMeasured("no ssh baseline".into()),
            }],
            notes: vec![
                "The host-side floor is the cost of starting a process on the host: no exec into a VM can beat it. It is not the issue's baseline.".into(),
                "The issue's baseline, ssh into the guest (openssh-server in a test rootfs), is not measured yet.".into(),
            ],
        })
    }
}
