//! `gatevm doctor`: what this host and the runtime bundle can do.

use crate::output::print_json;
use gatevm_kernel::kconfig::{self, Availability, Capability};
use gatevm_vmm::HostCaps;
use serde::Serialize;

#[derive(clap::Args)]
pub struct Args {
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Also re-hash every runtime file against the provenance manifest (a few seconds).
    #[arg(long)]
    verify: bool,
}

/// One VMM backend and whether it can run here.
#[derive(Serialize)]
struct Backend {
    name: &'static str,
    available: bool,
    /// Acceleration it would use, when available.
    accel: Option<&'static str>,
    /// Why not, or what to know.
    note: String,
}

#[derive(Serialize)]
struct RuntimeComponent {
    name: String,
    version: String,
    origin: String,
    files: usize,
}

/// A guest kernel gatevm can boot and what it offers the payloads.
#[derive(Serialize)]
struct GuestKernel {
    name: String,
    /// Where the answer comes from.
    source: String,
    /// Empty when it could not be read here (see `source`).
    capabilities: Vec<Capability>,
}

#[derive(Serialize)]
struct Report {
    host: HostCaps,
    hardware_virtualization: bool,
    backends: Vec<Backend>,
    /// Null when `gatevm setup` has not run.
    runtime_dir: Option<String>,
    runtime_error: Option<String>,
    components: Vec<RuntimeComponent>,
    kernels: Vec<GuestKernel>,
    /// With --verify: files checked and problems found.
    verified_files: Option<usize>,
    verify_problems: Vec<String>,
    /// The k3s binary cached by `gatevm setup --k3s` (null when none).
    k3s: Option<gatevm_k3s::binary::K3sBinary>,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let host = gatevm_vmm::probe();
    let hw = host.hardware_virt();
    // A bad environment (a relative GATEVM_DATA_DIR, no HOME) is the runtime's problem here.
    let runtime = match super::check_env() {
        Ok(()) => gatevm_runtime::Runtime::load().map_err(|e| gatevm_abi::error_chain(&e)),
        Err(e) => Err(crate::output::error_line(&e)),
    };
    let mut backends = Vec::new();
    match &runtime {
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
    let libkrunfw = runtime.as_ref().map(|rt| rt.libkrunfw()).ok();
    let krun_why = match &libkrunfw {
        Some(fw) => {
            gatevm_vmm::krun::unavailable(&host, fw, &gatevm_vmm::krun::KrunKernel::Libkrunfw)
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

    let mut report = Report {
        hardware_virtualization: hw,
        backends,
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
        Ok(rt) => {
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
            if a.verify {
                let v = rt.verify();
                report.verified_files = Some(v.checked);
                report.verify_problems = v.problems.iter().map(|p| format!("{p:?}")).collect();
            }
        }
        Err(e) => report.runtime_error = Some(e.clone()),
    }

    if a.json {
        print_json(&report)?;
    } else {
        print_human(&report);
    }
    Ok(if report.verify_problems.is_empty() {
        0
    } else {
        1
    })
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn print_human(r: &Report) {
    let h = &r.host;
    println!("host");
    println!(
        "  hardware virtualization  {}",
        yes(r.hardware_virtualization)
    );
    if let Some(why) = h.why_no_hardware_virt() {
        println!("    why not                {why}");
    }
    println!("  cpu vmx/svm              {}", yes(h.cpu_virt_flag));
    println!(
        "  /dev/kvm                 {} (accessible: {})",
        yes(h.kvm_device),
        yes(h.kvm_accessible)
    );
    println!(
        "  kvm module               {}",
        h.kvm_flavour.as_deref().unwrap_or("none")
    );
    println!("  /dev/vhost-vsock         {}", yes(h.vhost_vsock));
    println!("  /dev/vhost-net           {}", yes(h.vhost_net));
    println!("backends");
    for b in &r.backends {
        let state = match (b.available, b.accel) {
            (true, Some(acc)) => format!("available ({acc})"),
            (true, None) => "available".into(),
            (false, _) => "unavailable".into(),
        };
        println!("  {:<6} {state}: {}", b.name, b.note);
    }
    match (&r.runtime_dir, &r.runtime_error) {
        (Some(d), _) => println!("runtime {d}"),
        (None, Some(e)) => println!("runtime: {e}"),
        _ => {}
    }
    for c in &r.components {
        println!(
            "  {:<10} {:<32} {} ({} files)",
            c.name, c.version, c.origin, c.files
        );
    }
    match &r.k3s {
        Some(k) => println!(
            "  {:<10} {:<32} {} (sha256 {})",
            "k3s",
            k.version,
            k.path.display(),
            &k.sha256[..16.min(k.sha256.len())]
        ),
        None => println!(
            "  {:<10} {:<32} (for --profile k3s: gatevm setup --k3s FILE, or start --k3s PATH)",
            "k3s", "not cached"
        ),
    }
    if let Some(n) = r.verified_files {
        println!(
            "  verified {n} files: {}",
            if r.verify_problems.is_empty() {
                "all match"
            } else {
                "PROBLEMS"
            }
        );
        for p in &r.verify_problems {
            println!("    {p}");
        }
    }
    for k in &r.kernels {
        println!("guest kernel {}", k.name);
        println!("  source: {}", k.source);
        for c in &k.capabilities {
            let a = match c.availability {
                Availability::Builtin => "built in",
                Availability::Module => "module",
                Availability::Missing => "MISSING",
            };
            println!("  {:<14} {:<9} ({})", c.name, a, c.option);
        }
    }
}
