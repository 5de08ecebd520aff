//! `gatevm doctor`: what this host and the runtime bundle can do, as a [`Report`] (its JSON form
//! is `gatevm doctor --json`'s stable schema).

use gatevm_k3s::binary::K3sBinary;
use gatevm_kernel::kconfig;
pub use gatevm_kernel::kconfig::{Availability, Capability};
use gatevm_runtime::dirs::{RuntimeLocation, RuntimeSource};
use gatevm_runtime::Runtime;
use gatevm_vmm::HostCaps;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// One VMM backend and whether it can run here.
#[derive(Debug, Serialize)]
pub struct Backend {
    pub name: &'static str,
    pub available: bool,
    /// Acceleration it would use, when available.
    pub accel: Option<&'static str>,
    /// Why not, or what to know.
    pub note: String,
}

/// One component of the runtime bundle, as its provenance manifest records it.
#[derive(Debug, Serialize)]
pub struct RuntimeComponent {
    pub name: String,
    pub version: String,
    pub origin: String,
    pub files: usize,
}

/// A guest kernel gatevm can boot and what it offers the payloads.
#[derive(Debug, Serialize)]
pub struct GuestKernel {
    pub name: String,
    /// Where the answer comes from.
    pub source: String,
    /// Empty when it could not be read here (see `source`).
    pub capabilities: Vec<Capability>,
}

/// The doctor's report (field order is the JSON schema's).
#[derive(Debug, Serialize)]
pub struct Report {
    /// What is missing for the calling user, each with the command that fixes it (empty when
    /// nothing is).
    pub findings: Vec<Finding>,
    pub host: HostCaps,
    pub hardware_virtualization: bool,
    pub backends: Vec<Backend>,
    /// Null when `gatevm setup` has not run.
    pub runtime_dir: Option<String>,
    /// Whose runtime that is: `own`, `env` (GATEVM_RUNTIME_DIR), `system` (`gatevm setup
    /// --system`) or `not-set-up`; null when it could not be located.
    pub runtime_source: Option<RuntimeSource>,
    pub runtime_error: Option<String>,
    pub components: Vec<RuntimeComponent>,
    pub kernels: Vec<GuestKernel>,
    /// With --verify: files checked and problems found.
    pub verified_files: Option<usize>,
    pub verify_problems: Vec<String>,
    /// The k3s binary cached by `gatevm setup --k3s` (null when none).
    pub k3s: Option<K3sBinary>,
}

/// What this host and the runtime bundle can do; `verify` also re-hashes every runtime file
/// against the provenance manifest (a few seconds).
pub fn report(verify: bool) -> Report {
    let host = gatevm_vmm::probe();
    let hw = host.hardware_virt();
    // A bad environment (a relative GATEVM_DATA_DIR, no HOME) is the runtime's problem here.
    let location = match crate::preflight::check_env() {
        Ok(()) => gatevm_runtime::dirs::locate_runtime().map_err(|e| gatevm_abi::error_chain(&e)),
        Err(e) => Err(gatevm_abi::error_chain(&e)),
    };
    let runtime = location
        .clone()
        .and_then(|_| Runtime::load().map_err(|e| gatevm_abi::error_chain(&e)));
    // For the findings, the base rootfs is part of a usable runtime.
    let usable = runtime.as_ref().map_err(Clone::clone).and_then(|rt| {
        rt.rootfs()
            .map(|_| ())
            .map_err(|e| gatevm_abi::error_chain(&e))
    });
    let facts = UserFacts::probe(&host, &location, &usable);
    let mut report = Report {
        findings: findings(&facts),
        hardware_virtualization: hw,
        backends: backends(&host, runtime.as_ref()),
        runtime_dir: None,
        runtime_source: location.as_ref().ok().map(|at| at.source),
        runtime_error: None,
        components: vec![],
        kernels: vec![],
        verified_files: None,
        verify_problems: vec![],
        k3s: gatevm_runtime::dirs::own_runtime_dir()
            .ok()
            .and_then(|rt| gatevm_k3s::binary::cached(&rt)),
        host,
    };
    match &runtime {
        Ok(rt) => add_runtime(&mut report, rt, verify),
        Err(e) => report.runtime_error = Some(e.clone()),
    }
    report
}

/// QEMU and krun, and whether each can run here.
fn backends(host: &HostCaps, runtime: Result<&Runtime, &String>) -> Vec<Backend> {
    let hw = host.hardware_virt();
    let mut backends = Vec::new();
    match runtime {
        Ok(rt) => backends.push(Backend {
            name: "qemu",
            available: true,
            accel: Some(if hw { "kvm" } else { "tcg" }),
            note: if hw {
                format!("{} with KVM", rt.qemu_binary().display())
            } else {
                format!(
                    "{} with software emulation (TCG): {}",
                    rt.qemu_binary().display(),
                    host.why_no_hardware_virt().unwrap_or_default()
                )
            },
        }),
        Err(e) => backends.push(Backend {
            name: "qemu",
            available: false,
            accel: None,
            note: e.clone(),
        }),
    }
    let libkrunfw = runtime.map(|rt| rt.libkrunfw()).ok();
    let krun_why = match &libkrunfw {
        Some(fw) => {
            gatevm_vmm::krun::unavailable(host, fw, &gatevm_vmm::krun::KrunKernel::Libkrunfw)
        }
        None => Some("needs the runtime: run `gatevm setup`".into()),
    };
    backends.push(Backend {
        name: "krun",
        available: krun_why.is_none(),
        accel: krun_why.is_none().then_some("kvm"),
        note: match krun_why {
            Some(why) => why,
            None => format!(
                "libkrun {} linked in, kernel from {}; `--vmm auto` picks it",
                gatevm_vmm::krun::LIBKRUN_VERSION,
                libkrunfw
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
        },
    });
    backends
}

/// The runtime bundle's part of the report: its components, its guest kernels and, with
/// `verify`, the re-hash of its files.
fn add_runtime(report: &mut Report, rt: &Runtime, verify: bool) {
    report.runtime_dir = Some(rt.dir().display().to_string());
    report.components = rt
        .provenance()
        .components
        .iter()
        .map(|c| RuntimeComponent {
            name: c.name.clone(),
            version: c.version.clone(),
            origin: c.origin.clone(),
            files: c.files.len(),
        })
        .collect();
    let cfg = rt.kernel_config();
    report.kernels.push(match kconfig::capabilities_of(&cfg) {
        Ok(caps) => GuestKernel {
            name: format!("debian {} (qemu)", rt.kernel_release()),
            source: format!("kernel config {}", cfg.display()),
            capabilities: caps,
        },
        Err(e) => GuestKernel {
            name: format!("debian {} (qemu)", rt.kernel_release()),
            source: format!("cannot read {}: {e}", cfg.display()),
            capabilities: vec![],
        },
    });
    let fw = rt.libkrunfw();
    report.kernels.push(
        match gatevm_kernel::libkrunfw::KrunfwKernel::of_library(&fw, std::env::consts::ARCH) {
            Ok(k) => GuestKernel {
                name: format!("libkrunfw {} (krun)", k.release.as_deref().unwrap_or("?")),
                source: k.source(),
                capabilities: k.capabilities(),
            },
            Err(e) => GuestKernel {
                name: "libkrunfw (krun)".into(),
                source: format!("cannot read {}: {e}", fw.display()),
                capabilities: vec![],
            },
        },
    );
    if verify {
        let v = rt.verify();
        report.verified_files = Some(v.checked);
        report.verify_problems = v.problems.iter().map(|p| format!("{p:?}")).collect();
    }
}

/// One thing the calling user lacks, and the one command that fixes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// What is missing or wrong.
    pub problem: String,
    /// The command that fixes it (or the action, where it is not a command).
    pub fix: String,
    /// What to know about the fix (that it needs a new login, that it lasts until a reboot).
    pub note: Option<String>,
}

/// `/dev/kvm` as the calling user sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmFacts {
    /// Its permission bits.
    pub mode: u32,
    /// The name of the group that owns it (its number when it has no name).
    pub group: String,
    /// It opens read-write for the caller.
    pub accessible: bool,
    /// The group the user needs: the owning group, or `kvm` when `/dev/kvm` belongs to root's.
    pub needed_group: String,
    /// The user is a member of `needed_group` in the group database.
    pub member: bool,
    /// This process has `needed_group` (false right after `usermod`, until a new login).
    pub in_session: bool,
}

/// What the calling user has and lacks, gathered by [`UserFacts::probe`] and judged by
/// [`findings`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserFacts {
    /// The caller is root.
    pub root: bool,
    /// The caller's user name (its uid when it has none).
    pub user: String,
    /// `/dev/kvm`, when the CPU has vmx/svm, the device exists and is not `kvm_pvm`'s (else
    /// there is no hardware KVM to give the user; TCG is used).
    pub kvm: Option<KvmFacts>,
    /// `kernel.unprivileged_userns_clone` (Debian's switch), when the kernel has it.
    pub userns_clone: Option<u64>,
    /// `user.max_user_namespaces`, when readable.
    pub max_user_namespaces: Option<u64>,
    /// The runtime in use.
    pub runtime: RuntimeFact,
    /// `mkfs.erofs` is on the host.
    pub mkfs_erofs: bool,
}

/// The runtime a command of the caller would use, for [`findings`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeFact {
    /// It loads and its base rootfs is built.
    Ready,
    /// Neither the caller's own nor the system runtime (`system`) is set up.
    NotSetUp {
        /// The caller's own runtime directory.
        own: PathBuf,
        /// The system runtime directory.
        system: Option<PathBuf>,
    },
    /// It cannot be used: `error` (one line). `system`: it is the system runtime, or the system
    /// runtime was refused.
    Broken {
        /// The system one (fixed by root), or the caller's own.
        system: bool,
        /// What is wrong.
        error: String,
    },
}

impl UserFacts {
    /// Reads the facts of this process and host; `location` and `runtime` are what the report
    /// found (`runtime`: whether the runtime loads and its base rootfs is built).
    pub fn probe(
        host: &HostCaps,
        location: &Result<RuntimeLocation, String>,
        runtime: &Result<(), String>,
    ) -> UserFacts {
        use nix::unistd::{Gid, Group, Uid, User};
        let uid = Uid::effective();
        let me = User::from_uid(uid).ok().flatten();
        let user = me
            .as_ref()
            .map(|u| u.name.clone())
            .unwrap_or_else(|| uid.to_string());
        let hw =
            host.cpu_virt_flag && host.kvm_device && host.kvm_flavour.as_deref() != Some("kvm_pvm");
        let entry = |g: Option<Group>| {
            g.map(|g| GroupEntry {
                gid: g.gid.as_raw(),
                name: g.name,
                members: g.mem,
            })
        };
        let mut session: Vec<u32> = nix::unistd::getgroups()
            .unwrap_or_default()
            .iter()
            .map(|g| g.as_raw())
            .collect();
        session.push(Gid::effective().as_raw());
        let kvm = hw
            .then(|| std::fs::metadata("/dev/kvm").ok())
            .flatten()
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                kvm_facts(
                    DevKvm {
                        mode: m.mode() & 0o7777,
                        gid: m.gid(),
                        accessible: host.kvm_accessible,
                    },
                    &user,
                    me.as_ref().map(|u| u.gid.as_raw()),
                    &session,
                    &|gid| entry(Group::from_gid(Gid::from_raw(gid)).ok().flatten()),
                    &|name| entry(Group::from_name(name).ok().flatten()),
                )
            });
        let sysctl =
            |p: &str| -> Option<u64> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
        UserFacts {
            root: uid.is_root(),
            user,
            kvm,
            userns_clone: sysctl("/proc/sys/kernel/unprivileged_userns_clone"),
            max_user_namespaces: sysctl("/proc/sys/user/max_user_namespaces"),
            runtime: runtime_fact(location, runtime),
            mkfs_erofs: find_program("mkfs.erofs").is_some(),
        }
    }
}

/// A group as the group database has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    /// Its number.
    pub gid: u32,
    /// Its name.
    pub name: String,
    /// The users listed as its members (not those for whom it is the primary group).
    pub members: Vec<String>,
}

/// `/dev/kvm`'s mode, group and whether the caller can open it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevKvm {
    /// Permission bits.
    pub mode: u32,
    /// Owning group.
    pub gid: u32,
    /// It opens read-write for the caller.
    pub accessible: bool,
}

/// [`KvmFacts`] for `user` (primary group `primary_gid`, this process's groups `session`), with
/// the group database behind `by_gid` and `by_name`. When `/dev/kvm` belongs to root's group the
/// group to join is `kvm` (which [`findings`] gives it first).
pub fn kvm_facts(
    dev: DevKvm,
    user: &str,
    primary_gid: Option<u32>,
    session: &[u32],
    by_gid: &dyn Fn(u32) -> Option<GroupEntry>,
    by_name: &dyn Fn(&str) -> Option<GroupEntry>,
) -> KvmFacts {
    let owner = by_gid(dev.gid);
    let group = owner
        .as_ref()
        .map(|g| g.name.clone())
        .unwrap_or_else(|| dev.gid.to_string());
    let needed = if dev.gid == 0 {
        by_name("kvm")
    } else {
        owner.clone()
    };
    let needed_group = match (&needed, dev.gid) {
        (Some(g), _) => g.name.clone(),
        (None, 0) => "kvm".into(),
        (None, _) => group.clone(),
    };
    let member = needed
        .as_ref()
        .is_some_and(|g| g.members.iter().any(|m| m == user) || primary_gid == Some(g.gid));
    let in_session = needed.as_ref().is_some_and(|g| session.contains(&g.gid));
    KvmFacts {
        mode: dev.mode,
        group,
        accessible: dev.accessible,
        needed_group,
        member,
        in_session,
    }
}

fn runtime_fact(
    location: &Result<RuntimeLocation, String>,
    runtime: &Result<(), String>,
) -> RuntimeFact {
    match (location, runtime) {
        (Err(e), _) => RuntimeFact::Broken {
            // The one location error that is not the environment's: a refused system runtime.
            system: e.starts_with("the system runtime "),
            error: e.clone(),
        },
        (Ok(at), _) if at.source == RuntimeSource::NotSetUp => RuntimeFact::NotSetUp {
            own: at.runtime.clone(),
            system: at.system.as_ref().map(|s| s.runtime()),
        },
        (Ok(_), Ok(_)) => RuntimeFact::Ready,
        (Ok(at), Err(e)) => RuntimeFact::Broken {
            system: at.source == RuntimeSource::System,
            error: e.clone(),
        },
    }
}

/// `name` in `PATH` or the sbin directories (where `mkfs.*` live, often outside a user's PATH).
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// What the user lacks, from `f`, each with its fix; in the order to fix them.
pub fn findings(f: &UserFacts) -> Vec<Finding> {
    // Root runs the fixes without sudo.
    let sudo = |c: String| if f.root { c } else { format!("sudo {c}") };
    let mut out = Vec::new();
    match &f.runtime {
        RuntimeFact::Ready => {}
        RuntimeFact::NotSetUp { own, system } => out.push(if f.root {
            Finding {
                problem: format!("no gatevm runtime: {} is not set up", own.display()),
                fix: "gatevm setup".into(),
                note: Some("or `gatevm setup --system` for every user of this host".into()),
            }
        } else {
            Finding {
                problem: format!(
                    "no gatevm runtime: the system runtime{} is not set up, and an ordinary user cannot build one",
                    system
                        .as_ref()
                        .map(|s| format!(" ({})", s.display()))
                        .unwrap_or_default()
                ),
                fix: "sudo gatevm setup --system".into(),
                note: Some("once per host; then `gatevm setup` as this user builds nothing".into()),
            }
        }),
        RuntimeFact::Broken { system, error } => out.push(Finding {
            problem: error.clone(),
            fix: if *system {
                sudo("gatevm setup --system".into())
            } else {
                "gatevm setup".into()
            },
            note: None,
        }),
    }
    if !f.mkfs_erofs {
        out.push(Finding {
            problem: "mkfs.erofs is not installed on the host (package erofs-utils)".into(),
            fix: sudo("apt-get install erofs-utils".into()),
            note: None,
        });
    }
    if f.root {
        return out;
    }
    if let Some(k) = f.kvm.as_ref().filter(|k| !k.accessible) {
        let group_rw = k.mode & 0o060 == 0o060;
        if k.group == "root" || k.group == "0" {
            out.push(Finding {
                problem: format!(
                    "/dev/kvm belongs to group {} with mode {:04o}: only root can use hardware KVM",
                    k.group, k.mode
                ),
                fix: format!(
                    "sudo sh -c 'chgrp {g} /dev/kvm && chmod 0660 /dev/kvm'",
                    g = k.needed_group
                ),
                note: Some("until the next boot; udev's rule for /dev/kvm sets group kvm and mode 0660 at boot".into()),
            });
        } else if !group_rw {
            out.push(Finding {
                problem: format!(
                    "/dev/kvm has mode {:04o}: its group {} cannot open it",
                    k.mode, k.group
                ),
                fix: "sudo chmod 0660 /dev/kvm".into(),
                note: Some(
                    "until the next boot; udev's rule for /dev/kvm sets mode 0660 at boot".into(),
                ),
            });
        }
        if !k.member {
            out.push(Finding {
                problem: format!(
                    "user {} is not in group {}, which hardware KVM (/dev/kvm) needs",
                    f.user, k.needed_group
                ),
                fix: format!("sudo usermod -aG {} {}", k.needed_group, f.user),
                note: Some("then log in again".into()),
            });
        } else if !k.in_session {
            out.push(Finding {
                problem: format!(
                    "user {} is in group {}, but this login session is not (it started before the user was added)",
                    f.user, k.needed_group
                ),
                fix: "log in again".into(),
                note: Some(format!("or `newgrp {}` in this shell", k.needed_group)),
            });
        }
    }
    if f.userns_clone == Some(0) {
        out.push(Finding {
            problem: "unprivileged user namespaces are off (kernel.unprivileged_userns_clone = 0)"
                .into(),
            fix: "sudo sysctl -w kernel.unprivileged_userns_clone=1".into(),
            note: Some("until the next boot; put the setting in /etc/sysctl.d/ to keep it".into()),
        });
    }
    if f.max_user_namespaces == Some(0) {
        out.push(Finding {
            problem: "user namespaces are off (user.max_user_namespaces = 0)".into(),
            fix: "sudo sysctl -w user.max_user_namespaces=15000".into(),
            note: Some("until the next boot; put the setting in /etc/sysctl.d/ to keep it".into()),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ordinary user on a host where everything is in place.
    fn fine() -> UserFacts {
        UserFacts {
            root: false,
            user: "alice".into(),
            kvm: Some(KvmFacts {
                mode: 0o660,
                group: "kvm".into(),
                accessible: true,
                needed_group: "kvm".into(),
                member: true,
                in_session: true,
            }),
            userns_clone: Some(1),
            max_user_namespaces: Some(63000),
            runtime: RuntimeFact::Ready,
            mkfs_erofs: true,
        }
    }

    fn kvm(f: &mut UserFacts) -> &mut KvmFacts {
        f.kvm.as_mut().unwrap()
    }

    fn finding(problem: &str, fix: &str, note: Option<&str>) -> Finding {
        Finding {
            problem: problem.into(),
            fix: fix.into(),
            note: note.map(Into::into),
        }
    }

    #[test]
    fn nothing_missing() {
        assert_eq!(findings(&fine()), vec![]);
        // No hardware KVM at all (TCG): nothing to fix for the user.
        let mut f = fine();
        f.kvm = None;
        assert_eq!(findings(&f), vec![]);
        // /dev/kvm usable through an ACL or mode 0666 without the group: fine too.
        let mut f = fine();
        kvm(&mut f).member = false;
        kvm(&mut f).in_session = false;
        assert_eq!(findings(&f), vec![]);
        // Debian's switch absent (a kernel without it) is not a problem.
        let mut f = fine();
        f.userns_clone = None;
        f.max_user_namespaces = None;
        assert_eq!(findings(&f), vec![]);
    }

    #[test]
    fn kvm_group_and_mode() {
        let mut f = fine();
        kvm(&mut f).accessible = false;
        kvm(&mut f).member = false;
        kvm(&mut f).in_session = false;
        assert_eq!(
            findings(&f),
            vec![finding(
                "user alice is not in group kvm, which hardware KVM (/dev/kvm) needs",
                "sudo usermod -aG kvm alice",
                Some("then log in again"),
            )]
        );
        // Added, but this session predates it.
        kvm(&mut f).member = true;
        assert_eq!(
            findings(&f),
            vec![finding(
                "user alice is in group kvm, but this login session is not (it started before the user was added)",
                "log in again",
                Some("or `newgrp kvm` in this shell"),
            )]
        );
        // In the group, but the group may not open it.
        kvm(&mut f).in_session = true;
        kvm(&mut f).mode = 0o600;
        assert_eq!(
            findings(&f),
            vec![finding(
                "/dev/kvm has mode 0600: its group kvm cannot open it",
                "sudo chmod 0660 /dev/kvm",
                Some("until the next boot; udev's rule for /dev/kvm sets mode 0660 at boot"),
            )]
        );
        // Root's group, as on this kind of host: give it to kvm, then join kvm.
        let k = kvm(&mut f);
        k.group = "root".into();
        k.member = false;
        k.in_session = false;
        assert_eq!(
            findings(&f),
            vec![
                finding(
                    "/dev/kvm belongs to group root with mode 0600: only root can use hardware KVM",
                    "sudo sh -c 'chgrp kvm /dev/kvm && chmod 0660 /dev/kvm'",
                    Some("until the next boot; udev's rule for /dev/kvm sets group kvm and mode 0660 at boot"),
                ),
                finding(
                    "user alice is not in group kvm, which hardware KVM (/dev/kvm) needs",
                    "sudo usermod -aG kvm alice",
                    Some("then log in again"),
                ),
            ]
        );
        // Root needs none of it.
        f.root = true;
        assert_eq!(findings(&f), vec![]);
    }

    #[test]
    fn user_namespaces() {
        let mut f = fine();
        f.userns_clone = Some(0);
        f.max_user_namespaces = Some(0);
        let note = Some("until the next boot; put the setting in /etc/sysctl.d/ to keep it");
        assert_eq!(
            findings(&f),
            vec![
                finding(
                    "unprivileged user namespaces are off (kernel.unprivileged_userns_clone = 0)",
                    "sudo sysctl -w kernel.unprivileged_userns_clone=1",
                    note,
                ),
                finding(
                    "user namespaces are off (user.max_user_namespaces = 0)",
                    "sudo sysctl -w user.max_user_namespaces=15000",
                    note,
                ),
            ]
        );
        f.root = true;
        assert_eq!(findings(&f), vec![]);
    }

    #[test]
    fn runtime_and_erofs() {
        let mut f = fine();
        f.runtime = RuntimeFact::NotSetUp {
            own: "/home/alice/.local/share/gatevm/runtime/v1".into(),
            system: Some("/var/lib/gatevm/runtime/v1".into()),
        };
        f.mkfs_erofs = false;
        assert_eq!(
            findings(&f),
            vec![
                finding(
                    "no gatevm runtime: the system runtime (/var/lib/gatevm/runtime/v1) is not set up, and an ordinary user cannot build one",
                    "sudo gatevm setup --system",
                    Some("once per host; then `gatevm setup` as this user builds nothing"),
                ),
                finding(
                    "mkfs.erofs is not installed on the host (package erofs-utils)",
                    "sudo apt-get install erofs-utils",
                    None,
                ),
            ]
        );
        // Root: its own set-up, and no sudo.
        f.root = true;
        f.runtime = RuntimeFact::NotSetUp {
            own: "/root/.local/share/gatevm/runtime/v1".into(),
            system: Some("/var/lib/gatevm/runtime/v1".into()),
        };
        assert_eq!(
            findings(&f),
            vec![
                finding(
                    "no gatevm runtime: /root/.local/share/gatevm/runtime/v1 is not set up",
                    "gatevm setup",
                    Some("or `gatevm setup --system` for every user of this host"),
                ),
                finding(
                    "mkfs.erofs is not installed on the host (package erofs-utils)",
                    "apt-get install erofs-utils",
                    None,
                ),
            ]
        );
        // A refused or outdated system runtime: root repairs it.
        let mut f = fine();
        let refused = "the system runtime /var/lib/gatevm/runtime/v1 is not used: /var/lib/gatevm/runtime/v1/bin is writable by others (mode 0757); repair it with `sudo gatevm setup --system`";
        f.runtime = RuntimeFact::Broken {
            system: true,
            error: refused.into(),
        };
        assert_eq!(
            findings(&f),
            vec![finding(refused, "sudo gatevm setup --system", None)]
        );
        // The user's own, broken: their own setup.
        f.runtime = RuntimeFact::Broken {
            system: false,
            error: "gatevm runtime is incomplete (qemu not installed): run `gatevm setup`".into(),
        };
        assert_eq!(findings(&f)[0].fix, "gatevm setup");
    }

    /// A refused system runtime (from locating) counts as the system's; a location that is not
    /// set up names both directories.
    #[test]
    fn runtime_fact_from_location() {
        let refused = Err("the system runtime /s/runtime/v1 is not used: x".to_string());
        assert_eq!(
            runtime_fact(&refused, &Ok(())),
            RuntimeFact::Broken {
                system: true,
                error: "the system runtime /s/runtime/v1 is not used: x".into()
            }
        );
        let env = Err("GATEVM_DATA_DIR=x is not owned by the calling user".to_string());
        assert!(matches!(
            runtime_fact(&env, &Ok(())),
            RuntimeFact::Broken { system: false, .. }
        ));
        let sys = gatevm_runtime::dirs::SystemDir {
            path: "/s".into(),
            owners: vec![0],
        };
        let at = |source| {
            Ok(RuntimeLocation {
                runtime: "/own/runtime/v1".into(),
                rootfs_root: "/own/rootfs".into(),
                source,
                system: Some(sys.clone()),
            })
        };
        assert_eq!(
            runtime_fact(&at(RuntimeSource::NotSetUp), &Err("not set up".into())),
            RuntimeFact::NotSetUp {
                own: "/own/runtime/v1".into(),
                system: Some("/s/runtime/v1".into()),
            }
        );
        assert_eq!(
            runtime_fact(&at(RuntimeSource::System), &Err("rootfs".into())),
            RuntimeFact::Broken {
                system: true,
                error: "rootfs".into()
            }
        );
        assert_eq!(
            runtime_fact(&at(RuntimeSource::Own), &Ok(())),
            RuntimeFact::Ready
        );
    }

    /// The group facts behind the KVM findings: the owning group, or kvm when /dev/kvm is
    /// root's; membership by the group list or the primary group; this session's groups.
    #[test]
    fn kvm_membership() {
        let kvm = |members: &[&str]| GroupEntry {
            gid: 993,
            name: "kvm".into(),
            members: members.iter().map(|m| m.to_string()).collect(),
        };
        let root = GroupEntry {
            gid: 0,
            name: "root".into(),
            members: vec![],
        };
        let db_kvm = kvm(&["bob", "alice"]);
        let by_gid = |g: u32| match g {
            0 => Some(root.clone()),
            993 => Some(db_kvm.clone()),
            _ => None,
        };
        let by_name = |n: &str| (n == "kvm").then(|| db_kvm.clone());
        let dev = DevKvm {
            mode: 0o660,
            gid: 993,
            accessible: false,
        };
        // Listed, and this session has it.
        assert_eq!(
            kvm_facts(dev, "alice", Some(1000), &[1000, 993], &by_gid, &by_name),
            KvmFacts {
                mode: 0o660,
                group: "kvm".into(),
                accessible: false,
                needed_group: "kvm".into(),
                member: true,
                in_session: true,
            }
        );
        // Listed, but the session predates it.
        let f = kvm_facts(dev, "alice", Some(1000), &[1000], &by_gid, &by_name);
        assert!(f.member && !f.in_session);
        // Not listed; kvm as the primary group counts.
        let f = kvm_facts(dev, "carol", Some(1000), &[1000], &by_gid, &by_name);
        assert!(!f.member);
        let f = kvm_facts(dev, "carol", Some(993), &[993], &by_gid, &by_name);
        assert!(f.member && f.in_session);
        // Root's /dev/kvm: the group to join is kvm.
        let root_dev = DevKvm {
            mode: 0o600,
            gid: 0,
            accessible: false,
        };
        let f = kvm_facts(root_dev, "alice", Some(1000), &[1000], &by_gid, &by_name);
        assert_eq!(
            (
                f.group.as_str(),
                f.needed_group.as_str(),
                f.member,
                f.in_session
            ),
            ("root", "kvm", true, false)
        );
        // ... even where no kvm group exists yet.
        let f = kvm_facts(root_dev, "alice", Some(1000), &[1000], &by_gid, &|_| None);
        assert_eq!(
            (f.needed_group.as_str(), f.member, f.in_session),
            ("kvm", false, false)
        );
        // A group without a name: its number.
        let f = kvm_facts(
            DevKvm {
                mode: 0o660,
                gid: 4242,
                accessible: false,
            },
            "alice",
            Some(1000),
            &[1000],
            &by_gid,
            &by_name,
        );
        assert_eq!(
            (f.group.as_str(), f.needed_group.as_str()),
            ("4242", "4242")
        );
    }
}
