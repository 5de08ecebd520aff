//! Which VMM runs an instance: `--vmm auto|krun|qemu`.
//!
//! `auto` takes libkrun when the host has usable hardware virtualization and libkrunfw (or an
//! external kernel) is there, and QEMU otherwise (with KVM where it works, else TCG). Forcing krun
//! where it cannot work is refused at once with the reason and the alternative, before anything
//! is started: a guest that dies 14 s later under `kvm_pvm` is worse than no guest.
//!
//! Which network helper runs it: [`choose_net`]. gvproxy NATs an address of its network to the
//! host's loopback and keeps the guest off it only inside the loopback guard, a cgroup BPF
//! program that only root can attach; passt with `--no-map-gw` maps nothing of the host's loopback
//! and needs no privilege for that. So where the guard cannot be attached passt is the default,
//! and gvproxy runs there only when the user accepts the exposure (`--allow-host-loopback`).

use crate::config::{NetBackend, VmmChoice};
use gatevm_abi::paths::GUEST_AGENT as GUEST_AGENT_PATH;
use gatevm_vmm::krun::{self, Krun, KrunKernel};
use gatevm_vmm::qemu::Qemu;
use gatevm_vmm::{Accel, HostCaps, Vmm};
use std::path::{Path, PathBuf};

/// The VMM backend chosen for a start, with its kernel (krun) or acceleration (QEMU).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmBackend {
    Krun(KrunKernel),
    Qemu(Accel),
}

impl VmmBackend {
    /// `krun/kvm`, `qemu/kvm` or `qemu/tcg`, as status shows it.
    pub fn label(&self) -> &'static str {
        match self {
            VmmBackend::Krun(_) => "krun/kvm",
            VmmBackend::Qemu(Accel::Kvm) => "qemu/kvm",
            VmmBackend::Qemu(Accel::Tcg) => "qemu/tcg",
        }
    }
}

/// The kernel the krun backend would boot.
pub fn krun_kernel(external: Option<&Path>) -> KrunKernel {
    match external {
        Some(p) => KrunKernel::External {
            path: p.to_path_buf(),
            initramfs: None,
            cmdline: String::new(),
        },
        None => KrunKernel::Libkrunfw,
    }
}

/// Picks the backend; an error is one line naming why krun cannot run and what to use instead.
pub fn choose(
    choice: VmmChoice,
    caps: &HostCaps,
    libkrunfw: &Path,
    krun_external_kernel: Option<&Path>,
) -> Result<VmmBackend, String> {
    let kernel = krun_kernel(krun_external_kernel);
    match choice {
        VmmChoice::Krun => match krun::unavailable(caps, libkrunfw, &kernel) {
            Some(why) => Err(why),
            None => Ok(VmmBackend::Krun(kernel)),
        },
        VmmChoice::Qemu => Ok(VmmBackend::Qemu(Accel::for_host(caps))),
        VmmChoice::Auto => match krun::unavailable(caps, libkrunfw, &kernel) {
            None => Ok(VmmBackend::Krun(kernel)),
            Some(_) => Ok(VmmBackend::Qemu(Accel::for_host(caps))),
        },
    }
}

/// Where krun failed to boot a guest on this machine: remembered (in the data directory) so that
/// `--vmm auto` takes QEMU at once until the runtime changes (another gatevm, libkrun or
/// libkrunfw); an explicit `--vmm krun` still tries krun, and a krun boot that works forgets it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KrunFailure {
    /// [`runtime_identity`] when it failed.
    pub runtime: String,
    /// Why, one line.
    pub reason: String,
    /// Unix time in milliseconds.
    pub at_ms: u64,
}

/// What the krun path is made of: gatevm's and libkrun's versions and libkrunfw's file (size and
/// modification time). A change of any of them is worth another krun attempt.
pub fn runtime_identity(libkrunfw: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let fw = std::fs::metadata(libkrunfw)
        .map(|m| {
            format!(
                "{} bytes, mtime {}.{:09}",
                m.len(),
                m.mtime(),
                m.mtime_nsec()
            )
        })
        .unwrap_or_else(|_| "missing".into());
    format!(
        "gatevm {}, libkrun {}, libkrunfw {fw}",
        env!("CARGO_PKG_VERSION"),
        krun::LIBKRUN_VERSION
    )
}

/// The file the failure is remembered in.
pub fn krun_failure_file() -> Option<PathBuf> {
    gatevm_runtime::dirs::data_dir()
        .ok()
        .map(|d| d.join("krun-failed.json"))
}

/// The remembered failure, if it is for the runtime `identity` (one for another runtime is
/// stale and ignored).
pub fn remembered_krun_failure(file: &Path, identity: &str) -> Option<KrunFailure> {
    let bytes = std::fs::read(file).ok()?;
    let f: KrunFailure = serde_json::from_slice(&bytes).ok()?;
    (f.runtime == identity).then_some(f)
}

/// Remembers a krun failure (0600, replaced whole).
pub fn remember_krun_failure(file: &Path, failure: &KrunFailure) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(failure).map_err(std::io::Error::other)?;
    gatevm_fsutil::write_atomic(file, &bytes, 0o600)
}

/// [`choose`], remembering: where `auto` would take krun but krun failed here before with the
/// same runtime, QEMU (with KVM where it works), and the note saying why.
pub fn choose_remembering(
    choice: VmmChoice,
    caps: &HostCaps,
    libkrunfw: &Path,
    krun_external_kernel: Option<&Path>,
    failed_before: Option<&KrunFailure>,
) -> Result<(VmmBackend, Option<String>), String> {
    let chosen = choose(choice, caps, libkrunfw, krun_external_kernel)?;
    match (choice, &chosen, failed_before) {
        (VmmChoice::Auto, VmmBackend::Krun(_), Some(f)) => Ok((
            VmmBackend::Qemu(Accel::for_host(caps)),
            Some(remembered_note(f)),
        )),
        _ => Ok((chosen, None)),
    }
}

/// What status says when `auto` takes QEMU because krun failed here before.
pub fn remembered_note(f: &KrunFailure) -> String {
    format!(
        "krun failed to boot a guest here before ({}); --vmm auto uses QEMU until the runtime \
         changes (--vmm krun tries it again)",
        f.reason
    )
}

/// A test hook: with `GATEVM_FAULT_KRUN=boot-fails`, `--vmm auto` acts as if krun were usable
/// here and its boot failed before the guest agent answered (this project's machines have no
/// hardware virtualization, so the fallback could not be exercised otherwise). Unset, nothing
/// changes.
pub const FAULT_KRUN_ENV: &str = "GATEVM_FAULT_KRUN";

/// The backend itself. `program` is the gatevm executable (the krun VM runs in a child process of
/// it).
pub fn build(
    chosen: &VmmBackend,
    runtime: &gatevm_runtime::Runtime,
    program: PathBuf,
) -> Box<dyn Vmm> {
    match chosen {
        VmmBackend::Krun(kernel) => Box::new(Krun {
            program,
            libkrunfw: runtime.libkrunfw(),
            kernel: kernel.clone(),
            guest_exec: GUEST_AGENT_PATH.into(),
        }),
        VmmBackend::Qemu(_) => Box::new(Qemu::for_host(
            runtime.qemu_binary(),
            runtime.qemu_data_dirs(),
        )),
    }
}

/// Why the network helper asked for (or saved) cannot run here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetChoiceError {
    /// `--net gvproxy` where the loopback guard cannot be attached.
    #[error("--net gvproxy cannot keep the guest off the host's loopback here: its guard is a cgroup BPF program, which only root (with cgroup v2) can attach; use --net passt, or --allow-host-loopback to accept the exposure")]
    GvproxyUnguarded,
    /// An instance saved with gvproxy, started where the loopback guard cannot be attached.
    #[error("instance {0:?} was saved with --net gvproxy, which cannot keep the guest off the host's loopback here: its guard is a cgroup BPF program, which only root (with cgroup v2) can attach; start it with --net passt, or --allow-host-loopback to accept the exposure")]
    SavedGvproxyUnguarded(String),
}

/// Picks the network helper of a start: `asked` (`--net`), else what the instance `saved` last
/// ran with, else the default: gvproxy where the caller can attach the loopback guard
/// (`can_guard`: root with cgroup v2), passt where it cannot. gvproxy without the guard is refused
/// unless the guest may reach the host's loopback anyway (`allow_host_loopback`).
pub fn choose_net(
    name: &str,
    asked: Option<NetBackend>,
    saved: Option<NetBackend>,
    allow_host_loopback: bool,
    can_guard: bool,
) -> Result<NetBackend, NetChoiceError> {
    let default = if can_guard {
        NetBackend::Gvproxy
    } else {
        NetBackend::Passt
    };
    let chosen = asked.or(saved).unwrap_or(default);
    if chosen == NetBackend::Gvproxy && !can_guard && !allow_host_loopback {
        return Err(match asked {
            Some(_) => NetChoiceError::GvproxyUnguarded,
            None => NetChoiceError::SavedGvproxyUnguarded(name.to_string()),
        });
    }
    Ok(chosen)
}

/// Whether the network helper must run inside the loopback guard: gvproxy always unless the guest
/// may reach the host's loopback; passt (which maps nothing of it) where the guard can be attached
/// (`can_guard`, asked only for passt), as a second wall.
pub fn net_guarded(
    net: NetBackend,
    allow_host_loopback: bool,
    can_guard: impl FnOnce() -> bool,
) -> bool {
    !allow_host_loopback && (net == NetBackend::Gvproxy || can_guard())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(hw: bool, flavour: &str) -> HostCaps {
        HostCaps {
            cpu_virt_flag: hw,
            kvm_device: true,
            kvm_accessible: true,
            kvm_flavour: Some(flavour.into()),
            vhost_vsock: false,
            vhost_net: false,
        }
    }

    #[test]
    fn auto_prefers_krun_only_where_it_works() {
        let d = tempfile::tempdir().unwrap();
        let fw = d.path().join("libkrunfw.so.5");
        std::fs::write(&fw, b"").unwrap();
        let kvm = caps(true, "kvm_intel");
        assert_eq!(
            choose(VmmChoice::Auto, &kvm, &fw, None),
            Ok(VmmBackend::Krun(KrunKernel::Libkrunfw))
        );
        // No libkrunfw: QEMU with KVM.
        let missing = d.path().join("none");
        assert_eq!(
            choose(VmmChoice::Auto, &kvm, &missing, None),
            Ok(VmmBackend::Qemu(Accel::Kvm))
        );
        // kvm_pvm (this project's machines): QEMU under TCG.
        let pvm = caps(true, "kvm_pvm");
        assert_eq!(
            choose(VmmChoice::Auto, &pvm, &fw, None),
            Ok(VmmBackend::Qemu(Accel::Tcg))
        );
        assert_eq!(
            choose(VmmChoice::Qemu, &kvm, &fw, None),
            Ok(VmmBackend::Qemu(Accel::Kvm))
        );
    }

    #[test]
    fn a_krun_failure_is_remembered_until_the_runtime_changes() {
        let d = tempfile::tempdir().unwrap();
        let fw = d.path().join("libkrunfw.so.5");
        std::fs::write(&fw, b"one").unwrap();
        let kvm = caps(true, "kvm_intel");
        let file = d.path().join("krun-failed.json");
        let id = runtime_identity(&fw);
        assert!(remembered_krun_failure(&file, &id).is_none());
        let f = KrunFailure {
            runtime: id.clone(),
            reason: "the VM exited before the guest agent answered".into(),
            at_ms: 1,
        };
        remember_krun_failure(&file, &f).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let got = remembered_krun_failure(&file, &id);
        assert_eq!(got.as_ref(), Some(&f));
        let (b, note) = choose_remembering(VmmChoice::Auto, &kvm, &fw, None, got.as_ref()).unwrap();
        assert_eq!(b, VmmBackend::Qemu(Accel::Kvm));
        assert!(note.unwrap().contains("the VM exited before"));
        // --vmm krun still tries krun; without a failure auto takes krun.
        assert_eq!(
            choose_remembering(VmmChoice::Krun, &kvm, &fw, None, got.as_ref()).unwrap(),
            (VmmBackend::Krun(KrunKernel::Libkrunfw), None)
        );
        assert_eq!(
            choose_remembering(VmmChoice::Auto, &kvm, &fw, None, None).unwrap(),
            (VmmBackend::Krun(KrunKernel::Libkrunfw), None)
        );
        // Another libkrunfw: the old failure does not count.
        std::fs::write(&fw, b"another").unwrap();
        assert!(remembered_krun_failure(&file, &runtime_identity(&fw)).is_none());
        // A damaged file counts as none.
        std::fs::write(&file, b"{").unwrap();
        assert!(remembered_krun_failure(&file, &id).is_none());
    }

    #[test]
    fn forcing_krun_where_it_cannot_work_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let fw = d.path().join("libkrunfw.so.5");
        std::fs::write(&fw, b"").unwrap();
        let err = choose(VmmChoice::Krun, &caps(true, "kvm_pvm"), &fw, None).unwrap_err();
        assert!(
            err.contains("kvm_pvm") && err.contains("--vmm qemu"),
            "{err}"
        );
        let err = choose(VmmChoice::Krun, &caps(false, "kvm_intel"), &fw, None).unwrap_err();
        assert!(err.contains("vmx/svm"), "{err}");
        let err = choose(
            VmmChoice::Krun,
            &caps(true, "kvm_amd"),
            &d.path().join("x"),
            None,
        )
        .unwrap_err();
        assert!(err.contains("gatevm setup"), "{err}");
        // An external kernel stands in for libkrunfw.
        assert_eq!(
            choose(
                VmmChoice::Krun,
                &caps(true, "kvm_amd"),
                &d.path().join("x"),
                Some(&fw)
            ),
            Ok(VmmBackend::Krun(krun_kernel(Some(&fw))))
        );
    }

    #[test]
    fn labels_name_the_vmm_choice_that_gives_the_same_backend() {
        // Whatever `auto` picks on a host, status's label is "VMM/ACCEL": VMM is a `--vmm`
        // value that picks the same backend on that host, ACCEL says whether it runs on KVM or
        // under TCG, and different backends never share a label.
        let d = tempfile::tempdir().unwrap();
        let fw = d.path().join("libkrunfw.so.5");
        std::fs::write(&fw, b"").unwrap();
        let missing = d.path().join("none");
        let mut seen: Vec<(String, VmmBackend)> = Vec::new();
        for host in [
            caps(true, "kvm_intel"),
            caps(true, "kvm_pvm"),
            caps(false, "kvm_amd"),
        ] {
            for lib in [&fw, &missing] {
                let chosen = choose(VmmChoice::Auto, &host, lib, None).unwrap();
                let label = chosen.label();
                let (vmm, accel) = label.split_once('/').unwrap();
                let forced: VmmChoice = vmm.parse().unwrap();
                assert_eq!(forced.name(), vmm);
                assert_eq!(
                    choose(forced, &host, lib, None),
                    Ok(chosen.clone()),
                    "{label}"
                );
                let tcg = chosen == VmmBackend::Qemu(Accel::Tcg);
                assert_eq!(accel, if tcg { "tcg" } else { "kvm" }, "{chosen:?}");
                for (other, b) in &seen {
                    assert!(
                        other != label || *b == chosen,
                        "{b:?} and {chosen:?} both {label}"
                    );
                }
                seen.push((label.to_string(), chosen));
            }
        }
        // All three backends came up.
        let labels: std::collections::BTreeSet<_> = seen.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(labels.len(), 3, "{labels:?}");
    }

    const REFUSED_ASKED: &str = "--net gvproxy cannot keep the guest off the host's loopback here: its guard is a cgroup BPF program, which only root (with cgroup v2) can attach; use --net passt, or --allow-host-loopback to accept the exposure";

    fn refused_saved(name: &str) -> String {
        format!(
            "instance {name:?} was saved with --net gvproxy, which cannot keep the guest off the host's loopback here: its guard is a cgroup BPF program, which only root (with cgroup v2) can attach; start it with --net passt, or --allow-host-loopback to accept the exposure"
        )
    }

    #[test]
    fn the_default_helper_is_gvproxy_where_the_guard_attaches_and_passt_elsewhere() {
        use NetBackend::{Gvproxy, Passt};
        // Root (the guard attaches): today's default, whatever the loopback setting.
        assert_eq!(choose_net("a", None, None, false, true), Ok(Gvproxy));
        assert_eq!(choose_net("a", None, None, true, true), Ok(Gvproxy));
        // An ordinary user: passt, with or without the host's loopback.
        assert_eq!(choose_net("a", None, None, false, false), Ok(Passt));
        assert_eq!(choose_net("a", None, None, true, false), Ok(Passt));
        // What the instance last ran with is kept when it still keeps its guarantee.
        assert_eq!(choose_net("a", None, Some(Passt), false, true), Ok(Passt));
        assert_eq!(choose_net("a", None, Some(Passt), false, false), Ok(Passt));
        assert_eq!(
            choose_net("a", None, Some(Gvproxy), false, true),
            Ok(Gvproxy)
        );
        // --net wins over what was saved.
        assert_eq!(
            choose_net("a", Some(Passt), Some(Gvproxy), false, true),
            Ok(Passt)
        );
        assert_eq!(
            choose_net("a", Some(Gvproxy), Some(Passt), false, true),
            Ok(Gvproxy)
        );
        assert_eq!(
            choose_net("a", Some(Passt), Some(Gvproxy), false, false),
            Ok(Passt)
        );
    }

    #[test]
    fn gvproxy_without_its_guard_needs_the_exposure_accepted() {
        use NetBackend::{Gvproxy, Passt};
        // Asked for with --net.
        let asked = choose_net("a", Some(Gvproxy), None, false, false).unwrap_err();
        assert_eq!(asked, NetChoiceError::GvproxyUnguarded);
        assert_eq!(asked.to_string(), REFUSED_ASKED);
        let asked = choose_net("a", Some(Gvproxy), Some(Passt), false, false).unwrap_err();
        assert_eq!(asked.to_string(), REFUSED_ASKED);
        // Saved by an earlier start: the error says so and names the instance.
        let saved = choose_net("box-1", None, Some(Gvproxy), false, false).unwrap_err();
        assert_eq!(saved, NetChoiceError::SavedGvproxyUnguarded("box-1".into()));
        assert_eq!(saved.to_string(), refused_saved("box-1"));
        // With the exposure accepted gvproxy runs unguarded.
        assert_eq!(
            choose_net("a", Some(Gvproxy), None, true, false),
            Ok(Gvproxy)
        );
        assert_eq!(
            choose_net("a", None, Some(Gvproxy), true, false),
            Ok(Gvproxy)
        );
        // Root is never refused.
        assert_eq!(
            choose_net("a", Some(Gvproxy), None, false, true),
            Ok(Gvproxy)
        );
    }

    #[test]
    fn helpers_run_in_the_guard_unless_the_exposure_is_accepted() {
        use NetBackend::{Gvproxy, Passt};
        let asked = std::cell::Cell::new(0);
        let probe = |answer: bool| {
            let asked = &asked;
            move || {
                asked.set(asked.get() + 1);
                answer
            }
        };
        // gvproxy: always in the guard (where it cannot attach, starting fails), without asking.
        assert!(net_guarded(Gvproxy, false, probe(true)));
        assert!(net_guarded(Gvproxy, false, probe(false)));
        assert_eq!(asked.get(), 0);
        // passt: in the guard where it attaches, else on --no-map-gw alone.
        assert!(net_guarded(Passt, false, probe(true)));
        assert!(!net_guarded(Passt, false, probe(false)));
        assert_eq!(asked.get(), 2);
        // --allow-host-loopback: neither, without asking.
        assert!(!net_guarded(Gvproxy, true, probe(true)));
        assert!(!net_guarded(Passt, true, probe(true)));
        assert_eq!(asked.get(), 2);
    }
}
