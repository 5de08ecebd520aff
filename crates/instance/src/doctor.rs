//! `gatevm doctor`: what this host and the runtime bundle can do, as a [`Report`] (its JSON form
//! is `gatevm doctor --json`'s stable schema).

use gatevm_k3s::binary::K3sBinary;
use gatevm_kernel::kconfig;
pub use gatevm_kernel::kconfig::{Availability, Capability};
use gatevm_runtime::Runtime;
use gatevm_vmm::HostCaps;
use serde::Serialize;

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
    pub host: HostCaps,
    pub hardware_virtualization: bool,
    pub backends: Vec<Backend>,
    /// Null when `gatevm setup` has not run.
    pub runtime_dir: Option<String>,
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
    let runtime = match crate::preflight::check_env() {
        Ok(()) => Runtime::load().map_err(|e| gatevm_abi::error_chain(&e)),
        Err(e) => Err(gatevm_abi::error_chain(&e)),
    };
    let mut report = Report {
        hardware_virtualization: hw,
        backends: backends(&host, runtime.as_ref()),
        runtime_dir: None,
        runtime_error: None,
        components: vec![],
        kernels: vec![],
        verified_files: None,
        verify_problems: vec![],
        k3s: gatevm_runtime::dirs::runtime_dir()
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
    report.kernels.push(GuestKernel {
        name: "libkrunfw (krun)".into(),
        source: "not read: libkrunfw ships no kernel config, and its kernel can only be asked by booting it with libkrun".into(),
        capabilities: vec![],
    });
    if verify {
        let v = rt.verify();
        report.verified_files = Some(v.checked);
        report.verify_problems = v.problems.iter().map(|p| format!("{p:?}")).collect();
    }
}
