//! Host memory: resident memory of the supervisor, its helpers and the VM process of a running
//! instance, idle and under exec load, beside the guest RAM configured.

use super::{summary, Bench};
use crate::gatevm::need;
use crate::markdown::{num, Align, Section, Table, Target, Verdict};
use crate::procs::{helpers_kib, snapshot, RealProc, Role, Snapshot};
use std::collections::BTreeMap;
use std::time::Duration;

/// Target: the supervisor's resident memory, MiB.
pub const SUPERVISOR_TARGET_MIB: f64 = 10.0;
/// Target: all helpers' (supervisor, network helper, virtiofsd; not the VM), MiB.
pub const HELPERS_TARGET_MIB: f64 = 40.0;
/// Execs run while sampling under load.
pub const LOAD_EXECS: usize = 10;
const IDLE_SAMPLES: usize = 5;
const IDLE_GAP: Duration = Duration::from_millis(100);
const LOAD_GAP: Duration = Duration::from_millis(20);

/// The largest resident memory seen per role (and of all helpers together) over snapshots.
#[derive(Debug, Default, Clone)]
pub struct Peak {
    /// KiB per role.
    pub roles: BTreeMap<Role, u64>,
    /// Processes per role in the last snapshot.
    pub count: BTreeMap<Role, usize>,
    /// KiB of all helpers together, the largest per-snapshot sum.
    pub helpers: u64,
}

impl Peak {
    /// Takes a snapshot in.
    pub fn add(&mut self, s: &Snapshot) {
        for (role, u) in s {
            let v = self.roles.entry(role.clone()).or_default();
            *v = (*v).max(u.rss_kib);
            self.count.insert(role.clone(), u.pids.len());
        }
        self.helpers = self.helpers.max(helpers_kib(s));
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

impl Bench<'_> {
    /// Runs the memory case.
    pub fn memory(&mut self) -> anyhow::Result<Section> {
        let mut idle_runs: Vec<Peak> = Vec::new();
        let mut load = Peak::default();
        let mut memory_mib = None;
        for i in 1..=self.runs {
            let st = self.gv.ensure_running()?;
            if st.backend.is_some() {
                self.backend = st.backend.clone();
            }
            let name = self.gv.name.clone();
            let sup = need(st.supervisor_pid, "supervisor_pid", &name)?;
            let vm = need(st.vm_pid, "vm_pid", &name)?;
            memory_mib = st.memory_mib.or(memory_mib);

            let mut idle = Peak::default();
            for _ in 0..IDLE_SAMPLES {
                crate::runner::check_interrupted()?;
                idle.add(&snapshot(&RealProc, sup, Some(vm)));
                std::thread::sleep(IDLE_GAP);
            }
            let gv = &self.gv;
            let mut this_load = Peak::default();
            std::thread::scope(|s| {
                let worker = s.spawn(|| -> anyhow::Result<()> {
                    for _ in 0..LOAD_EXECS {
                        gv.exec_true()?;
                    }
                    Ok(())
                });
                while !worker.is_finished() {
                    this_load.add(&snapshot(&RealProc, sup, Some(vm)));
                    std::thread::sleep(LOAD_GAP);
                }
                this_load.add(&snapshot(&RealProc, sup, Some(vm)));
                worker
                    .join()
                    .map_err(|_| anyhow::anyhow!("the exec load thread panicked"))?
            })?;
            eprintln!(
                "memory {i}/{}: helpers {} MiB idle, {} MiB max under load; VM process {} MiB",
                self.runs,
                num(mib(idle.helpers)),
                num(mib(this_load.helpers)),
                num(mib(this_load.roles.get(&Role::Vm).copied().unwrap_or(0)))
            );
            load.helpers = load.helpers.max(this_load.helpers);
            for (r, v) in &this_load.roles {
                let e = load.roles.entry(r.clone()).or_default();
                *e = (*e).max(*v);
            }
            load.count.extend(this_load.count);
            idle_runs.push(idle);
        }

        // Idle: the median over runs of each run's idle value; load: the largest seen.
        let idle_of = |f: &dyn Fn(&Peak) -> Option<u64>| {
            let v: Vec<f64> = idle_runs.iter().filter_map(f).map(mib).collect();
            summary(&v).median
        };
        let mut t = Table::new(&[
            ("process", Align::Left),
            ("processes", Align::Right),
            ("idle RSS (MiB, median of runs)", Align::Right),
            ("max RSS under exec load (MiB)", Align::Right),
        ]);
        let roles: Vec<Role> = load.roles.keys().cloned().collect();
        for r in roles.iter().filter(|r| r.is_helper()) {
            t.row(&[
                r.label(),
                load.count.get(r).copied().unwrap_or(0).to_string(),
                num(idle_of(&|p| p.roles.get(r).copied())),
                num(mib(load.roles[r])),
            ]);
        }
        let helper_count: usize = load
            .count
            .iter()
            .filter(|(r, _)| r.is_helper())
            .map(|(_, n)| n)
            .sum();
        let idle_helpers = idle_of(&|p| Some(p.helpers));
        let load_helpers = mib(load.helpers);
        t.row(&[
            "all helpers (supervisor + network helper + virtiofsd, not the VM)".to_string(),
            helper_count.to_string(),
            num(idle_helpers),
            num(load_helpers),
        ]);
        let vm_load = load.roles.get(&Role::Vm).copied().map(mib);
        t.row(&[
            "VM process (QEMU)".to_string(),
            load.count.get(&Role::Vm).copied().unwrap_or(0).to_string(),
            num(idle_of(&|p| p.roles.get(&Role::Vm).copied())),
            vm_load.map(num).unwrap_or_else(|| "n/a".into()),
        ]);
        let ram = memory_mib
            .map(|m| m.to_string())
            .unwrap_or_else(|| "n/a".into());
        t.row(&[
            "baseline: guest RAM configured (`memory_mib`)".to_string(),
            "-".to_string(),
            ram.clone(),
            ram,
        ]);

        let sup_idle = idle_of(&|p| p.roles.get(&Role::Supervisor).copied());
        let sup_load = mib(load.roles.get(&Role::Supervisor).copied().unwrap_or(0));
        let target = |what: &str, idle: f64, max: f64, limit: f64| Target {
            what: format!("{what} <= {limit} MiB"),
            measured: format!("{} MiB max under load ({} MiB idle)", num(max), num(idle)),
            verdict: Verdict::of(max <= limit),
        };
        let mut notes = vec![
            format!(
                "Resident memory is VmRSS from /proc/PID/status. Idle: the largest of {IDLE_SAMPLES} samples {} ms apart, the median over runs. Under load: sampled every {} ms while a thread runs {LOAD_EXECS} `gatevm exec bench -- true` in a row, the largest seen over all runs. A helper's own children count as that helper.",
                IDLE_GAP.as_millis(),
                LOAD_GAP.as_millis()
            ),
            "The VM process's resident memory includes the guest pages it has touched: compare it with the guest RAM configured.".to_string(),
        ];
        if !roles.contains(&Role::Gvproxy) && !roles.contains(&Role::Passt) {
            notes.push(
                "No gvproxy (or passt) process was found among the supervisor's children.".into(),
            );
        }
        if !roles.contains(&Role::Virtiofsd) {
            notes.push("No virtiofsd process was found among the supervisor's children.".into());
        }
        Ok(Section {
            title: "Host memory".into(),
            intro: vec![format!(
                "Runs: {}, on a running instance (backend `{}`).",
                self.runs,
                self.backend.as_deref().unwrap_or("unknown")
            )],
            tables: vec![t],
            targets: vec![
                target("supervisor", sup_idle, sup_load, SUPERVISOR_TARGET_MIB),
                target(
                    "all helpers (supervisor + gvproxy + virtiofsd)",
                    idle_helpers,
                    load_helpers,
                    HELPERS_TARGET_MIB,
                ),
            ],
            notes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::procs::Usage;

    #[test]
    fn peak_keeps_the_largest() {
        let snap = |sup: u64, gv: u64, vm: u64| {
            Snapshot::from([
                (
                    Role::Supervisor,
                    Usage {
                        pids: vec![1],
                        rss_kib: sup,
                    },
                ),
                (
                    Role::Gvproxy,
                    Usage {
                        pids: vec![2],
                        rss_kib: gv,
                    },
                ),
                (
                    Role::Vm,
                    Usage {
                        pids: vec![3],
                        rss_kib: vm,
                    },
                ),
            ])
        };
        let mut p = Peak::default();
        p.add(&snap(100, 500, 9000));
        p.add(&snap(300, 100, 1000));
        assert_eq!(p.roles[&Role::Supervisor], 300);
        assert_eq!(p.roles[&Role::Gvproxy], 500);
        assert_eq!(p.roles[&Role::Vm], 9000);
        // The largest sum of one moment, not the sum of the largest.
        assert_eq!(p.helpers, 600);
    }
}
