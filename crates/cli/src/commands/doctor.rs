//! `gatevm doctor`: what this host and the runtime bundle can do ([`gatevm_instance::doctor`]).

use crate::output::print_json;
use gatevm_instance::doctor::{self, Availability, Finding, Report};
use gatevm_instance::runtime::dirs::RuntimeSource;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Also re-hash every runtime file against the provenance manifest, and boot a tiny
    /// throwaway VM with each available backend to report which work (seconds; a minute under
    /// software emulation).
    #[arg(long)]
    verify: bool,
}

/// One backend's boot check of `doctor --verify`.
#[derive(serde::Serialize)]
struct BootCheck {
    /// `qemu` or `krun`.
    backend: &'static str,
    /// A throwaway VM booted and ran `true` in the guest.
    ok: bool,
    /// How long that took.
    ms: u64,
    /// Why not, when it failed.
    error: Option<String>,
}

/// The report with the boot checks (`doctor --verify --json`).
#[derive(serde::Serialize)]
struct Verified<'a> {
    #[serde(flatten)]
    report: &'a Report,
    boot_checks: &'a [BootCheck],
}

/// Boots a throwaway VM (gatevm's rootfs, `true` as the command) with each available backend.
fn boot_checks(r: &Report) -> Vec<BootCheck> {
    use gatevm_instance::config::Ephemeral;
    use gatevm_instance::ephemeral::{self, Image};
    use gatevm_instance::{preflight, InstanceConfig, VmmChoice};
    let mut out = Vec::new();
    for b in r.backends.iter().filter(|b| b.available) {
        let vmm = match b.name {
            "krun" => VmmChoice::Krun,
            _ => VmmChoice::Qemu,
        };
        let t = std::time::Instant::now();
        let result = (|| -> anyhow::Result<i32> {
            let name = ephemeral::fresh_name();
            let caller = preflight::Caller::probe();
            let net = preflight::choose_net(&name, None, None, false, caller)?;
            let config = InstanceConfig {
                cpus: 1,
                memory_mib: 512,
                vmm,
                net,
                disk_gib: 0,
                ephemeral: Some(Ephemeral { rootfs: None }),
                ..InstanceConfig::new(&name)
            };
            preflight::check_backend(&config)?;
            let req = gatevm_abi::ExecRequest {
                argv: vec!["true".into()],
                ..Default::default()
            };
            Ok(ephemeral::run(
                config,
                super::guest_bin()?,
                &Image::default(),
                req,
                |name, req| super::exec::run_exec(name, req).map_err(Into::into),
            )?)
        })();
        let ms = t.elapsed().as_millis() as u64;
        out.push(match result {
            Ok(0) => BootCheck {
                backend: b.name,
                ok: true,
                ms,
                error: None,
            },
            Ok(code) => BootCheck {
                backend: b.name,
                ok: false,
                ms,
                error: Some(format!("`true` in the guest exited with {code}")),
            },
            Err(e) => BootCheck {
                backend: b.name,
                ok: false,
                ms,
                error: Some(crate::output::error_line(&e)),
            },
        });
    }
    out
}

pub(crate) fn run(a: Args) -> anyhow::Result<i32> {
    let report = doctor::report(a.verify);
    let checks = if a.verify && report.runtime_dir.is_some() {
        boot_checks(&report)
    } else {
        Vec::new()
    };
    if a.json {
        if a.verify {
            print_json(&Verified {
                report: &report,
                boot_checks: &checks,
            })?;
        } else {
            print_json(&report)?;
        }
    } else {
        print_human(&report);
        for c in &checks {
            match &c.error {
                None => println!("boot check {:<5} ok ({} ms)", c.backend, c.ms),
                Some(e) => println!("boot check {:<5} FAILED: {e}", c.backend),
            }
        }
    }
    Ok(
        if report.verify_problems.is_empty() && checks.iter().all(|c| c.ok) {
            0
        } else {
            1
        },
    )
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn print_human(r: &Report) {
    print_findings(&r.findings);
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
        (Some(d), _) if r.runtime_source == Some(RuntimeSource::System) => {
            println!("runtime {d} (the system runtime)")
        }
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

/// What the user lacks, first: each problem with the command that fixes it.
fn print_findings(findings: &[Finding]) {
    if findings.is_empty() {
        println!("nothing missing for this user");
        return;
    }
    println!("missing for this user ({}):", findings.len());
    for f in findings {
        println!("  {}", f.problem);
        match &f.note {
            Some(n) => println!("    fix: {} ({n})", f.fix),
            None => println!("    fix: {}", f.fix),
        }
    }
}
