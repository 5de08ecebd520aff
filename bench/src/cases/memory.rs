//! Host memory: resident memory of the supervisor, its helpers and the VM process of a running
//! instance (root's, then an ordinary user's), idle and under exec load, beside the guest RAM
//! configured. Each process's VmRSS is shown with its own part (RssAnon + RssFile) and its
//! shared-memory part (RssShmem) apart: the guest RAM that a vhost-user back end (passt, and
//! virtiofsd before) and QEMU map shows in their VmRSS as shared memory.

use super::{summary, Bench};
use crate::gatevm::{need, Gatevm};
use crate::markdown::{num, Align, Section, Table, Target, Verdict};
use crate::previous::virtiofsd_before;
use crate::procs::{helpers_rss, snapshot, RealProc, Role, Rss, Snapshot};
use anyhow::Context;
use std::collections::BTreeMap;
use std::time::Duration;

/// Target: the supervisor's resident memory, MiB.
pub const SUPERVISOR_TARGET_MIB: f64 = 10.0;
/// Target: all helpers' (supervisor, network helper, any other helper; not the VM), MiB.
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

/// One instance's samples: root's or an ordinary user's.
struct SideMem {
    who: String,
    idle_runs: Vec<Peak>,
    load: Peak,
    memory_mib: Option<u64>,
    backend: Option<String>,
    net: Option<String>,
}

/// Samples a running instance `runs` times: idle, then under exec load.
fn measure(gv: &Gatevm, runs: usize) -> anyhow::Result<SideMem> {
    let mut m = SideMem {
        who: gv.who(),
        idle_runs: Vec::new(),
        load: Peak::default(),
        memory_mib: None,
        backend: None,
        net: None,
    };
    for i in 1..=runs {
        let st = gv.ensure_running()?;
        m.backend = st.backend.clone().or(m.backend.take());
        m.net = st.net.clone().or(m.net.take());
        let name = gv.name.clone();
        let sup = need(st.supervisor_pid, "supervisor_pid", &name)?;
        let vm = need(st.vm_pid, "vm_pid", &name)?;
        m.memory_mib = st.memory_mib.or(m.memory_mib);

        let mut idle = Peak::default();
        for _ in 0..IDLE_SAMPLES {
            crate::runner::check_interrupted()?;
            idle.add(&snapshot(&RealProc, sup, Some(vm)));
            std::thread::sleep(IDLE_GAP);
        }
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
            "memory {i}/{runs} ({}): helpers {} MiB VmRSS / {} MiB own idle, {} / {} MiB max under load; VM process {} MiB",
            m.who,
            num(mib(idle.helpers.vm)),
            num(own_mib(&idle.helpers)),
            num(mib(this_load.helpers.vm)),
            num(own_mib(&this_load.helpers)),
            num(mib(this_load.roles.get(&Role::Vm).map_or(0, |r| r.vm)))
        );
        m.load.merge(&this_load);
        m.idle_runs.push(idle);
    }
    Ok(m)
}

/// A row's name: `what` of `who` when two instances share the table.
pub fn row_name(what: &str, who: Option<&str>) -> String {
    match who {
        Some(w) => format!("{w}: {what}"),
        None => what.to_string(),
    }
}

impl SideMem {
    /// The median over runs of each run's idle value, MiB.
    fn idle_of(&self, f: &dyn Fn(&Peak) -> Option<u64>) -> f64 {
        let v: Vec<f64> = self.idle_runs.iter().filter_map(f).map(mib).collect();
        summary(&v).median
    }

    fn rows(&self, t: &mut Table, who: Option<&str>) {
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
                row_name(&what, who),
                count,
                num(self.idle_of(&|p| idle(p).map(|r| r.vm))),
                num(self.idle_of(&|p| idle(p).map(|r| r.own()))),
                num(self.idle_of(&|p| idle(p).map(|r| r.shmem))),
                load_cell(|r| r.vm),
                load_cell(Rss::own),
                load_cell(|r| r.shmem),
            ]);
        };
        let load = &self.load;
        for r in load.roles.keys().filter(|r| r.is_helper()) {
            row(
                t,
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
            t,
            "all helpers (supervisor + its helper processes, not the VM)".to_string(),
            helper_count.to_string(),
            &|p| Some(p.helpers),
            Some(load.helpers),
        );
        row(
            t,
            "VM process (QEMU)".to_string(),
            load.count.get(&Role::Vm).copied().unwrap_or(0).to_string(),
            &|p| p.roles.get(&Role::Vm).copied(),
            load.roles.get(&Role::Vm).copied(),
        );
    }

    /// (own, VmRSS) in MiB: the idle medians and the largest under load.
    fn pairs(&self, f: &dyn Fn(&Peak) -> Option<Rss>) -> ((f64, f64), (f64, f64)) {
        let idle = (
            self.idle_of(&|p| f(p).map(|r| r.own())),
            self.idle_of(&|p| f(p).map(|r| r.vm)),
        );
        let l = f(&self.load).unwrap_or_default();
        (idle, (own_mib(&l), mib(l.vm)))
    }

    fn has(&self, r: &Role) -> bool {
        self.load.roles.contains_key(r)
    }
}

impl Bench<'_> {
    /// Runs the memory case: on root's running instance, then (when there is one) on the
    /// ordinary user's.
    pub fn memory(&mut self) -> anyhow::Result<Section> {
        let mut sides = vec![measure(&self.gv, self.runs)?];
        if let Some(b) = sides[0].backend.clone() {
            self.backend = Some(b);
        }
        match &self.user {
            Ok(u) => {
                // One VM at a time: root's stops while the user's runs.
                self.gv.stop_if_running()?;
                let m = measure(u, self.runs).with_context(|| format!("gatevm as {}", u.who()))?;
                u.stop_if_running()?;
                sides.push(m);
            }
            Err(why) => self
                .not_measured
                .push(format!("Host memory as an ordinary user: {why}.")),
        }
        let two = sides.len() > 1;

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
        let label = |m: &SideMem| match &m.net {
            Some(n) => format!("{} (net {n})", m.who),
            None => m.who.clone(),
        };
        for m in &sides {
            let l = label(m);
            m.rows(&mut t, two.then_some(l.as_str()));
        }
        let ram: Vec<String> = sides
            .iter()
            .map(|m| {
                m.memory_mib
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "n/a".into())
            })
            .collect();
        let mut ram_cells = ram.clone();
        ram_cells.dedup();
        let ram = ram_cells.join(" / ");
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

        let target = |what: String, (idle, max): ((f64, f64), (f64, f64)), limit: f64| {
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
        let mut targets = Vec::new();
        for m in &sides {
            let l = label(m);
            let who = two.then_some(l.as_str());
            targets.push(target(
                row_name("supervisor", who),
                m.pairs(&|p| p.roles.get(&Role::Supervisor).copied()),
                SUPERVISOR_TARGET_MIB,
            ));
            targets.push(target(
                row_name("all helpers (supervisor + network helper)", who),
                m.pairs(&|p| Some(p.helpers)),
                HELPERS_TARGET_MIB,
            ));
        }
        let mut notes = vec![
            format!(
                "All figures are MiB, from /proc/PID/status. Idle: the largest of {IDLE_SAMPLES} samples {} ms apart, the median over runs. Under load (`load`): sampled every {} ms while a thread runs {LOAD_EXECS} `gatevm exec bench -- true` in a row, the largest seen over all runs (each column on its own). A helper's own children count as that helper.",
                IDLE_GAP.as_millis(),
                LOAD_GAP.as_millis()
            ),
            "VmRSS is everything resident: own (RssAnon + RssFile: heap, stacks, the binary and libraries) plus shmem (RssShmem: shared memory). QEMU allocates guest RAM as shared memory (a memfd) and hands it to a vhost-user back end (passt under QEMU; virtiofsd before the root became disks), which maps it to read and write guest buffers; the guest pages it touches then count in its VmRSS as shmem although they are the guest's memory (part of the guest RAM configured, shared with QEMU), not memory the helper itself allocates. The targets are judged on own memory; the VmRSS-based figure is printed beside it.".to_string(),
            "The VM process's resident memory includes the guest pages it has touched: compare it with the guest RAM configured.".to_string(),
        ];
        if two {
            notes.push(format!(
                "Root's instance `bench` is measured first (then stopped), then the user's own instance `bench` ({}; gatevm run through `runuser`, as in the boot case), so one VM runs at a time.",
                sides[1].who
            ));
        }
        for m in &sides {
            if !m.has(&Role::Gvproxy) && !m.has(&Role::Passt) {
                notes.push(format!(
                    "{}: no gvproxy (or passt) process was found among the supervisor's children.",
                    m.who
                ));
            }
        }
        let with_vfs: Vec<&str> = sides
            .iter()
            .filter(|m| m.has(&Role::Virtiofsd))
            .map(|m| m.who.as_str())
            .collect();
        if with_vfs.is_empty() {
            notes.push("No virtiofsd runs: the instance's root is a read-only EROFS disk (the shared base rootfs) plus a writable disk, overlaid inside the guest; no virtiofsd process was found among any supervisor's children in any sample.".to_string());
        } else {
            notes.push(format!(
                "A virtiofsd process was found among the supervisor's children ({}).",
                with_vfs.join(", ")
            ));
        }
        if let Some(before) = self.previous.as_deref().and_then(virtiofsd_before) {
            notes.push(before);
        }
        let backends: Vec<String> = sides
            .iter()
            .map(|m| format!("{} `{}`", m.who, m.backend.as_deref().unwrap_or("unknown")))
            .collect();
        Ok(Section {
            title: "Host memory".into(),
            intro: vec![format!(
                "Runs: {}, on a running instance (backend: {}).",
                self.runs,
                backends.join("; ")
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

    #[test]
    fn rows_of_two_instances() {
        assert_eq!(row_name("supervisor", None), "supervisor");
        assert_eq!(
            row_name("passt", Some("user gatevm-ci (net passt)")),
            "user gatevm-ci (net passt): passt"
        );
        let mut load = Peak::default();
        load.add(&Snapshot::from([
            (Role::Supervisor, usage(1, 8 * 1024, 0)),
            (Role::Passt, usage(2, 6 * 1024, 4 * 1024)),
            (Role::Vm, usage(3, 200 * 1024, 100 * 1024)),
        ]));
        let m = SideMem {
            who: "user gatevm-ci".into(),
            idle_runs: vec![load.clone(), load.clone()],
            load,
            memory_mib: Some(2048),
            backend: None,
            net: Some("passt".into()),
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
        m.rows(&mut t, Some("user"));
        let md = t.render();
        let lines: Vec<&str> = md.lines().skip(2).collect();
        assert_eq!(lines.len(), 4);
        let cells = |l: &str| -> Vec<String> {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        };
        assert_eq!(
            cells(lines[0]),
            [
                "user: supervisor",
                "1",
                "8.00",
                "8.00",
                "0.00",
                "8.00",
                "8.00",
                "0.00"
            ]
        );
        assert_eq!(
            cells(lines[1]),
            [
                "user: passt",
                "1",
                "10.0",
                "6.00",
                "4.00",
                "10.0",
                "6.00",
                "4.00"
            ]
        );
        assert_eq!(
            cells(lines[2]),
            [
                "user: all helpers (supervisor + its helper processes, not the VM)",
                "2",
                "18.0",
                "14.0",
                "4.00",
                "18.0",
                "14.0",
                "4.00"
            ]
        );
        assert_eq!(cells(lines[3])[0], "user: VM process (QEMU)");
        assert_eq!(cells(lines[3])[2], "300");
        assert!(!m.has(&Role::Virtiofsd));
        assert!(m.has(&Role::Passt));
        let ((idle_own, idle_vm), (load_own, load_vm)) = m.pairs(&|p| Some(p.helpers));
        assert_eq!(
            (idle_own, idle_vm, load_own, load_vm),
            (14.0, 18.0, 14.0, 18.0)
        );
    }
}
