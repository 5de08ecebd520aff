//! Host memory: resident memory of the supervisor, its helpers and the VM process of a running
//! instance, idle and under exec load, beside the guest RAM configured. Each process's VmRSS is
//! shown with its own part (RssAnon + RssFile) and its shared-memory part (RssShmem) apart: the
//! guest RAM that virtiofsd and QEMU map shows in their VmRSS as shared memory.

use super::{summary, Bench};
use crate::gatevm::need;
use crate::markdown::{num, Align, Section, Table, Target, Verdict};
use crate::procs::{helpers_rss, snapshot, RealProc, Role, Rss, Snapshot};
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

/// The largest resident memory seen per role (and of all helpers together) over snapshots, each
/// of VmRSS, RssAnon, RssFile and RssShmem on its own.
#[derive(Debug, Default, Clone)]
pub struct Peak {
    /// Per role.
    pub roles: BTreeMap<Role, Rss>,
    /// Processes per role in the last snapshot.
    pub count: BTreeMap<Role, usize>,
    /// All helpers together: the largest per-snapshot sums.
    pub helpers: Rss,
}

impl Peak {
    /// Takes a snapshot in.
    pub fn add(&mut self, s: &Snapshot) {
        for (role, u) in s {
            let v = self.roles.entry(role.clone()).or_default();
            *v = v.max(u.rss);
            self.count.insert(role.clone(), u.pids.len());
        }
        self.helpers = self.helpers.max(helpers_rss(s));
    }

    /// Takes another peak in (the larger of each).
    pub fn merge(&mut self, o: &Peak) {
        for (role, r) in &o.roles {
            let v = self.roles.entry(role.clone()).or_default();
            *v = v.max(*r);
        }
        self.count.extend(o.count.clone());
        self.helpers = self.helpers.max(o.helpers);
    }
}

/// KiB in MiB.
pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// A process's own memory (RssAnon + RssFile) of the larger of each part, MiB.
fn own_mib(r: &Rss) -> f64 {
    mib(r.own())
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
                "memory {i}/{}: helpers {} MiB VmRSS / {} MiB own idle, {} / {} MiB max under load; VM process {} MiB",
                self.runs,
                num(mib(idle.helpers.vm)),
                num(own_mib(&idle.helpers)),
                num(mib(this_load.helpers.vm)),
                num(own_mib(&this_load.helpers)),
                num(mib(this_load.roles.get(&Role::Vm).map_or(0, |r| r.vm)))
            );
            load.merge(&this_load);
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
            ("idle VmRSS", Align::Right),
            ("idle own (anon+file)", Align::Right),
            ("idle shmem", Align::Right),
            ("load VmRSS", Align::Right),
            ("load own (anon+file)", Align::Right),
            ("load shmem", Align::Right),
        ]);
        let row = |t: &mut Table,
                   what: String,
                   count: String,
                   idle: &dyn Fn(&Peak) -> Option<Rss>,
                   load: Option<Rss>| {
            let load_cell = |f: fn(&Rss) -> u64| {
                load.map(|r| num(mib(f(&r))))
                    .unwrap_or_else(|| "n/a".into())
            };
            t.row(&[
                what,
                count,
                num(idle_of(&|p| idle(p).map(|r| r.vm))),
                num(idle_of(&|p| idle(p).map(|r| r.own()))),
                num(idle_of(&|p| idle(p).map(|r| r.shmem))),
                load_cell(|r| r.vm),
                load_cell(Rss::own),
                load_cell(|r| r.shmem),
            ]);
        };
        let roles: Vec<Role> = load.roles.keys().cloned().collect();
        for r in roles.iter().filter(|r| r.is_helper()) {
            row(
                &mut t,
                r.label(),
                load.count.get(r).copied().unwrap_or(0).to_string(),
                &|p| p.roles.get(r).copied(),
                load.roles.get(r).copied(),
            );
        }
        let helper_count: usize = load
            .count
            .iter()
            .filter(|(r, _)| r.is_helper())
            .map(|(_, n)| n)
            .sum();
        row(
            &mut t,
            "all helpers (supervisor + network helper + virtiofsd, not the VM)".to_string(),
            helper_count.to_string(),
            &|p| Some(p.helpers),
            Some(load.helpers),
        );
        row(
            &mut t,
            "VM process (QEMU)".to_string(),
            load.count.get(&Role::Vm).copied().unwrap_or(0).to_string(),
            &|p| p.roles.get(&Role::Vm).copied(),
            load.roles.get(&Role::Vm).copied(),
        );
        let ram = memory_mib
            .map(|m| m.to_string())
            .unwrap_or_else(|| "n/a".into());
        t.row(&[
            "baseline: guest RAM configured (`memory_mib`)".to_string(),
            "-".to_string(),
            ram.clone(),
            "-".to_string(),
            "-".to_string(),
            ram,
            "-".to_string(),
            "-".to_string(),
        ]);

        // (own, VmRSS) in MiB: idle medians and the largest under load.
        let idle_pair = |f: &dyn Fn(&Peak) -> Option<Rss>| {
            (
                idle_of(&|p| f(p).map(|r| r.own())),
                idle_of(&|p| f(p).map(|r| r.vm)),
            )
        };
        let load_pair = |r: Rss| (own_mib(&r), mib(r.vm));
        let sup_idle = idle_pair(&|p| p.roles.get(&Role::Supervisor).copied());
        let sup_load = load_pair(
            load.roles
                .get(&Role::Supervisor)
                .copied()
                .unwrap_or_default(),
        );
        let helpers_idle = idle_pair(&|p| Some(p.helpers));
        let helpers_load = load_pair(load.helpers);
        let target = |what: &str, idle: (f64, f64), max: (f64, f64), limit: f64| {
            Target {
            what: format!("{what} <= {limit} MiB (own memory: RssAnon + RssFile)"),
            measured: format!(
                "{} MiB own max under load ({} MiB idle); VmRSS {} MiB max under load ({} MiB idle)",
                num(max.0),
                num(idle.0),
                num(max.1),
                num(idle.1)
            ),
            verdict: Verdict::of(max.0 <= limit),
        }
        };
        let mut notes = vec![
            format!(
                "All figures are MiB, from /proc/PID/status. Idle: the largest of {IDLE_SAMPLES} samples {} ms apart, the median over runs. Under load (`load`): sampled every {} ms while a thread runs {LOAD_EXECS} `gatevm exec bench -- true` in a row, the largest seen over all runs (each column on its own). A helper's own children count as that helper.",
                IDLE_GAP.as_millis(),
                LOAD_GAP.as_millis()
            ),
            "VmRSS is everything resident: own (RssAnon + RssFile: heap, stacks, the binary and libraries) plus shmem (RssShmem: shared memory). QEMU allocates guest RAM as shared memory (a memfd) and hands it to virtiofsd, which maps it to read and write guest buffers; the guest pages virtiofsd touches then count in its VmRSS as shmem although they are the guest's memory (part of the guest RAM configured, shared with QEMU), not memory the helper itself allocates. The targets are judged on own memory; the VmRSS-based figure is printed beside it.".to_string(),
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
                    "all helpers (supervisor + network helper + virtiofsd)",
                    helpers_idle,
                    helpers_load,
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

    fn usage(pid: u32, own: u64, shmem: u64) -> Usage {
        Usage {
            pids: vec![pid],
            rss: Rss {
                vm: own + shmem,
                anon: own,
                file: 0,
                shmem,
            },
        }
    }

    #[test]
    fn peak_keeps_the_largest() {
        let snap = |sup: u64, gv: u64, vfs_shmem: u64, vm: u64| {
            Snapshot::from([
                (Role::Supervisor, usage(1, sup, 0)),
                (Role::Gvproxy, usage(2, gv, 0)),
                (Role::Virtiofsd, usage(4, 10, vfs_shmem)),
                (Role::Vm, usage(3, 0, vm)),
            ])
        };
        let mut p = Peak::default();
        p.add(&snap(100, 500, 0, 9000));
        p.add(&snap(300, 100, 2000, 1000));
        assert_eq!(p.roles[&Role::Supervisor].vm, 300);
        assert_eq!(p.roles[&Role::Gvproxy].vm, 500);
        assert_eq!(p.roles[&Role::Vm].vm, 9000);
        assert_eq!(p.roles[&Role::Virtiofsd].own(), 10);
        assert_eq!(p.roles[&Role::Virtiofsd].shmem, 2000);
        // The largest sum of one moment, not the sum of the largest.
        assert_eq!(p.helpers.vm, 300 + 100 + 2010);
        assert_eq!(p.helpers.own(), 610);
        let mut q = Peak::default();
        q.add(&snap(50, 700, 0, 1));
        q.merge(&p);
        assert_eq!(q.roles[&Role::Gvproxy].vm, 700);
        assert_eq!(q.roles[&Role::Supervisor].vm, 300);
        assert_eq!(q.helpers.vm, 2410);
    }
}
