//! An instance's host processes and their resident memory, from /proc.
//!
//! The supervisor and the VM process come from the status JSON; the helpers are the supervisor's
//! descendants (found through `/proc/PID/task/*/children`), named by `comm` or command line. A
//! child of a helper (virtiofsd may fork one) counts as that helper.

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

/// `VmRSS` of a /proc/PID/status text, in KiB.
pub fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
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
    /// Resident memory in KiB; `None` for a process that is gone (or a kernel thread).
    fn rss_kib(&self, pid: u32) -> Option<u64>;
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

    fn rss_kib(&self, pid: u32) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        parse_vm_rss_kib(&s)
    }
}

/// One role's processes and their summed resident memory at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// The pids.
    pub pids: Vec<u32>,
    /// Sum of their VmRSS, KiB.
    pub rss_kib: u64,
}

/// The instance's processes by role at one moment.
pub type Snapshot = BTreeMap<Role, Usage>;

/// Samples the supervisor's tree and the VM process.
pub fn snapshot(p: &dyn Procfs, supervisor: u32, vm: Option<u32>) -> Snapshot {
    let mut snap = Snapshot::new();
    let add = |role: Role, pid: u32, snap: &mut Snapshot| {
        if let Some(kib) = p.rss_kib(pid) {
            let u = snap.entry(role).or_default();
            u.pids.push(pid);
            u.rss_kib += kib;
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

/// Sum of the helpers' (not the VM's) memory in a snapshot, KiB.
pub fn helpers_kib(s: &Snapshot) -> u64 {
    s.iter()
        .filter(|(r, _)| r.is_helper())
        .map(|(_, u)| u.rss_kib)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Fake {
        procs: HashMap<u32, (Vec<u32>, &'static str, u64)>,
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
        fn rss_kib(&self, pid: u32) -> Option<u64> {
            self.procs.get(&pid).map(|p| p.2)
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
                rss_kib: 6000
            }
        );
        assert_eq!(s[&Role::Gvproxy].rss_kib, 20000);
        assert_eq!(
            s[&Role::Virtiofsd],
            Usage {
                pids: vec![12, 15],
                rss_kib: 6000
            }
        );
        assert_eq!(
            s[&Role::Vm],
            Usage {
                pids: vec![13, 16],
                rss_kib: 300100
            }
        );
        assert_eq!(s[&Role::Other("mkfs.ext4".into())].rss_kib, 700);
        assert_eq!(helpers_kib(&s), 6000 + 20000 + 6000 + 700);
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
    fn this_process_has_an_rss() {
        assert!(RealProc.rss_kib(std::process::id()).unwrap_or(0) > 0);
    }
}
