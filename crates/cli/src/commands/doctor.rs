//! `gatevm doctor`: what this host and the runtime bundle can do ([`gatevm_instance::doctor`]).

use crate::output::print_json;
use gatevm_instance::doctor::{self, Availability, Finding, Report};
use gatevm_instance::runtime::dirs::RuntimeSource;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Also re-hash every runtime file against the provenance manifest (a few seconds).
    #[arg(long)]
    verify: bool,
}

pub(crate) fn run(a: Args) -> anyhow::Result<i32> {
    let report = doctor::report(a.verify);
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
