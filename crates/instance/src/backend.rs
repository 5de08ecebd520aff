//! Which VMM runs an instance: `--vmm auto|krun|qemu`.
//!
//! `auto` takes libkrun when the host has usable hardware virtualization and libkrunfw (or an
//! external kernel) is there, and QEMU otherwise (with KVM where it works, else TCG). Forcing krun
//! where it cannot work is refused at once with the reason and the alternative, before anything
//! is started: a guest that dies 14 s later under `kvm_pvm` is worse than no guest.

use crate::config::VmmChoice;
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
    fn labels() {
        assert_eq!(VmmBackend::Krun(KrunKernel::Libkrunfw).label(), "krun/kvm");
        assert_eq!(VmmBackend::Qemu(Accel::Tcg).label(), "qemu/tcg");
    }
}
