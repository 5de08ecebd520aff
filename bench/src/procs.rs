//! An instance's host processes and their resident memory, from /proc.
//!
//! The supervisor and the VM process come from the status JSON; the helpers are the supervisor's
//! descendants (found through `/proc/PID/task/*/children`), named by `comm` or command line. A
//! child of a helper (virtiofsd may fork one) counts as that helper.
//!
//! Resident memory is read as `VmRSS` and as its three parts (`RssAnon`, `RssFile`,
//! `RssShmem`): virtiofsd and QEMU map guest RAM from shared memory, so the guest pages they touch
//! show in their `VmRSS` as `RssShmem` although they are the guest's memory, not the process's
//! own. A process's own memory is `RssAnon + RssFile`.

use std::collections::BTreeMap;
use std::path::Path;

/// What a process is to the instance.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// `gatevm supervise`.
    Supervisor,
    /// The gvproxy network helper.
    Gvproxy,
    /// The passt network helper.
    Passt,
    /// virtiofsd, serving the guest's root.
    Virtiofsd,
    /// Another descendant of the supervisor, by name.
    Other(String),
    /// The VM process (QEMU, or libkrun's).
    Vm,
}

impl Role {
    /// The name in the tables.
    pub fn label(&self) -> String {
        match self {
            Role::Supervisor => "supervisor".into(),
            Role::Gvproxy => "gvproxy".into(),
            Role::Passt => "passt".into(),
            Role::Virtiofsd => "virtiofsd".into(),
            Role::Other(n) => format!("other helper ({n})"),
            Role::Vm => "VM process".into(),
        }
    }

    /// Whether it counts as a helper (everything but the VM).
    pub fn is_helper(&self) -> bool {
        *self != Role::Vm
    }
}

/// The role a process's name and command line give it, if any.
pub fn classify(comm: &str, cmdline: &str) -> Option<Role> {
    let has = |w: &str| comm.contains(w) || cmdline.contains(w);
    if has("gvproxy") {
        Some(Role::Gvproxy)
    } else if has("virtiofsd") {
        Some(Role::Virtiofsd)
    } else if has("passt") {
        Some(Role::Passt)
    } else {
        None
    }
}

/// Resident memory of a process (or a sum of processes), KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rss {
    /// `VmRSS`: everything resident (anon + file + shmem).
    pub vm: u64,
    /// `RssAnon`: private anonymous pages (heap, stacks).
    pub anon: u64,
    /// `RssFile`: file-backed pages (the binary, libraries, mapped files).
    pub file: u64,
    /// `RssShmem`: shared memory (memfd, tmpfs, SysV), e.g. guest RAM mapped by virtiofsd.
    pub shmem: u64,
}

impl Rss {
    /// The process's own memory: `RssAnon + RssFile` (without shared memory).
    pub fn own(&self) -> u64 {
        self.anon + self.file
    }

    /// Field-wise sum.
    pub fn plus(self, o: Rss) -> Rss {
        Rss {
            vm: self.vm + o.vm,
            anon: self.anon + o.anon,
            file: self.file + o.file,
            shmem: self.shmem + o.shmem,
        }
    }

    /// Field-wise maximum.
    pub fn max(self, o: Rss) -> Rss {
        Rss {
            vm: self.vm.max(o.vm),
            anon: self.anon.max(o.anon),
            file: self.file.max(o.file),
            shmem: self.shmem.max(o.shmem),
        }
    }
}

/// A `Key:   123 kB` field of a /proc/PID/status text, in KiB.
fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// `VmRSS` of a /proc/PID/status text, in KiB.
pub fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    status_kib(status, "VmRSS")
}

/// `VmRSS`, `RssAnon`, `RssFile` and `RssShmem` of a /proc/PID/status text; `None` without a
/// `VmRSS` (a kernel thread). A missing part (kernels before 4.5) counts as 0.
pub fn parse_rss(status: &str) -> Option<Rss> {
    let vm = parse_vm_rss_kib(status)?;
    let part = |k| status_kib(status, k).unwrap_or(0);
    Some(Rss {
        vm,
        anon: part("RssAnon"),
        file: part("RssFile"),
        shmem: part("RssShmem"),
    })
}

/// Pids in the text of `/proc/PID/task/TID/children` files.
pub fn parse_children(text: &str) -> Vec<u32> {
    text.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// A source of process facts: /proc, or a fake in tests.
pub trait Procfs {
    /// The direct children of `pid` (all its threads').
    fn children(&self, pid: u32) -> Vec<u32>;
    /// `comm` and the command line (arguments joined by spaces).
    fn names(&self, pid: u32) -> (String, String);
    /// Resident memory; `None` for a process that is gone (or a kernel thread).
    fn rss(&self, pid: u32) -> Option<Rss>;
}

/// The real /proc.
pub struct RealProc;

impl Procfs for RealProc {
    fn children(&self, pid: u32) -> Vec<u32> {
        let mut out = Vec::new();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return out;
        };
        for t in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
                for c in parse_children(&text) {
                    if !out.contains(&c) {
                        out.push(c);
                    }
                }
            }
        }
        out
    }

    fn names(&self, pid: u32) -> (String, String) {
        let base = Path::new("/proc").join(pid.to_string());
        let comm = std::fs::read_to_string(base.join("comm")).unwrap_or_default();
        let cmdline = std::fs::read(base.join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        (comm.trim().to_string(), cmdline.trim().to_string())
    }

    fn rss(&self, pid: u32) -> Option<Rss> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        parse_rss(&s)
    }
}

/// One role's processes and their summed resident memory at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// The pids.
    pub pids: Vec<u32>,
    /// Their summed resident memory.
    pub rss: Rss,
}

/// The instance's processes by role at one moment.
pub type Snapshot = BTreeMap<Role, Usage>;

/// Samples the supervisor's tree and the VM process.
pub fn snapshot(p: &dyn Procfs, supervisor: u32, vm: Option<u32>) -> Snapshot {
    let mut snap = Snapshot::new();
    let add = |role: Role, pid: u32, snap: &mut Snapshot| {
        if let Some(r) = p.rss(pid) {
            let u = snap.entry(role).or_default();
            u.pids.push(pid);
            u.rss = u.rss.plus(r);
        }
    };
    // Breadth first from the supervisor; a process inherits its parent's role unless its own
    // name gives one; the VM's subtree is counted apart.
    let mut queue: Vec<(u32, Role)> = vec![(supervisor, Role::Supervisor)];
    let mut seen = vec![supervisor];
    let mut i = 0;
    while i < queue.len() {
        let (pid, role) = queue[i].clone();
        i += 1;
        add(role.clone(), pid, &mut snap);
        for c in p.children(pid) {
            if seen.contains(&c) || Some(c) == vm {
                continue;
            }
            seen.push(c);
            let (comm, cmdline) = p.names(c);
            let own = classify(&comm, &cmdline);
            let child_role = match (own, &role) {
                (Some(r), _) => r,
                (None, Role::Supervisor) => {
                    Role::Other(if comm.is_empty() { c.to_string() } else { comm })
                }
                (None, parent) => parent.clone(),
            };
            queue.push((c, child_role));
        }
    }
    if let Some(vm) = vm {
        let mut stack = vec![vm];
        let mut seen_vm = Vec::new();
        while let Some(pid) = stack.pop() {
            if seen_vm.contains(&pid) {
                continue;
            }
            seen_vm.push(pid);
            add(Role::Vm, pid, &mut snap);
            stack.extend(p.children(pid));
        }
    }
    snap
}

/// Sum of the helpers' (not the VM's) memory in a snapshot.
pub fn helpers_rss(s: &Snapshot) -> Rss {
    s.iter()
        .filter(|(r, _)| r.is_helper())
        .fold(Rss::default(), |acc, (_, u)| acc.plus(u.rss))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Fake {
        procs: HashMap<u32, (Vec<u32>, &'static str, u64)>,
    }

    /// A fake process of `kib` resident: half anonymous, an eighth file-backed, the rest shared.
    fn rss_of(kib: u64) -> Rss {
        Rss {
            vm: kib,
            anon: kib / 2,
            file: kib / 8,
            shmem: kib - kib / 2 - kib / 8,
        }
    }

    impl Procfs for Fake {
        fn children(&self, pid: u32) -> Vec<u32> {
            self.procs
                .get(&pid)
                .map(|p| p.0.clone())
                .unwrap_or_default()
        }
        fn names(&self, pid: u32) -> (String, String) {
            let n = self.procs.get(&pid).map(|p| p.1).unwrap_or("");
            (
                n.chars().take(15).collect(),
                format!("/usr/libexec/{n} --flag"),
            )
        }
        fn rss(&self, pid: u32) -> Option<Rss> {
            self.procs.get(&pid).map(|p| rss_of(p.2))
        }
    }

    #[test]
    fn roles_of_an_instance_tree() {
        let fake = Fake {
            procs: HashMap::from([
                (10, (vec![11, 12, 13, 14], "gatevm", 6000)),
                (11, (vec![], "gvproxy", 20000)),
                (12, (vec![15], "virtiofsd", 5000)),
                (15, (vec![], "sandbox-child", 1000)),
                (13, (vec![16], "qemu-system-x86_64", 300000)),
                (16, (vec![], "qemu-helper", 100)),
                (14, (vec![], "mkfs.ext4", 700)),
            ]),
        };
        let s = snapshot(&fake, 10, Some(13));
        assert_eq!(
            s[&Role::Supervisor],
            Usage {
                pids: vec![10],
                rss: rss_of(6000)
            }
        );
        assert_eq!(s[&Role::Gvproxy].rss.vm, 20000);
        assert_eq!(s[&Role::Virtiofsd].pids, vec![12, 15]);
        assert_eq!(s[&Role::Virtiofsd].rss, rss_of(5000).plus(rss_of(1000)));
        assert_eq!(s[&Role::Vm].pids, vec![13, 16]);
        assert_eq!(s[&Role::Vm].rss.vm, 300100);
        assert_eq!(s[&Role::Other("mkfs.ext4".into())].rss.vm, 700);
        let h = helpers_rss(&s);
        assert_eq!(h.vm, 6000 + 20000 + 6000 + 700);
        assert_eq!(h.own() + h.shmem, h.vm);
        assert_eq!(h.anon, 3000 + 10000 + 2500 + 500 + 350);
    }

    #[test]
    fn a_gone_process_is_left_out() {
        let fake = Fake {
            procs: HashMap::from([
                (10, (vec![11, 99], "gatevm", 6000)),
                (11, (vec![], "gvproxy", 1)),
            ]),
        };
        let s = snapshot(&fake, 10, None);
        assert_eq!(s.len(), 2);
        assert!(!s.contains_key(&Role::Vm));
    }

    #[test]
    fn parsers() {
        assert_eq!(
            parse_vm_rss_kib("Name:\tx\nVmHWM:\t  9 kB\nVmRSS:\t    6140 kB\n"),
            Some(6140)
        );
        assert_eq!(parse_vm_rss_kib("Name:\tkthreadd\n"), None);
        assert_eq!(parse_children("12 13 \n"), vec![12, 13]);
        assert_eq!(parse_children(""), Vec::<u32>::new());
        assert_eq!(classify("gvproxy", ""), Some(Role::Gvproxy));
        assert_eq!(classify("virtiofsd", ""), Some(Role::Virtiofsd));
        assert_eq!(
            classify("x", "/rt/bin/virtiofsd --socket-path=/s"),
            Some(Role::Virtiofsd)
        );
        assert_eq!(classify("passt.avx2", ""), Some(Role::Passt));
        assert_eq!(classify("gatevm", "gatevm supervise bench"), None);
    }

    #[test]
    fn rss_parts() {
        // A virtiofsd that has touched guest RAM: most of its VmRSS is shared memory.
        let status = "Name:\tvirtiofsd\nVmHWM:\t   60000 kB\nVmRSS:\t   55900 kB\n\
                      RssAnon:\t    3000 kB\nRssFile:\t    2900 kB\nRssShmem:\t   50000 kB\n\
                      VmData:\t 9 kB\n";
        let r = parse_rss(status).unwrap();
        assert_eq!(
            r,
            Rss {
                vm: 55900,
                anon: 3000,
                file: 2900,
                shmem: 50000
            }
        );
        assert_eq!(r.own(), 5900);
        // No VmRSS: a kernel thread; no parts: an old kernel.
        assert_eq!(parse_rss("Name:\tkthreadd\n"), None);
        assert_eq!(
            parse_rss("VmRSS:\t 10 kB\n"),
            Some(Rss {
                vm: 10,
                ..Rss::default()
            })
        );
        // A key that merely starts like another is not taken for it.
        assert_eq!(
            status_kib("RssFileX:\t 5 kB\nRssFile:\t 7 kB\n", "RssFile"),
            Some(7)
        );
        let a = Rss {
            vm: 10,
            anon: 5,
            file: 3,
            shmem: 2,
        };
        let b = Rss {
            vm: 4,
            anon: 1,
            file: 1,
            shmem: 9,
        };
        assert_eq!(
            a.plus(b),
            Rss {
                vm: 14,
                anon: 6,
                file: 4,
                shmem: 11
            }
        );
        assert_eq!(
            a.max(b),
            Rss {
                vm: 10,
                anon: 5,
                file: 3,
                shmem: 9
            }
        );
    }

    #[test]
    fn this_process_has_an_rss() {
        let r = RealProc.rss(std::process::id()).unwrap();
        assert!(r.vm > 0);
        assert!(r.anon + r.file <= r.vm);
    }
}
