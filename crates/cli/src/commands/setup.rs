//! `gatevm setup`

use crate::output::{print_json, secs};
use gatevm_instance::runtime::{self, SetupAction, SetupOptions};
use std::io::IsTerminal;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Don't build the base root filesystem.
    #[arg(long)]
    skip_rootfs: bool,
    /// Check Debian for newer component versions and replace what changed.
    #[arg(long)]
    refresh: bool,
    /// Only report missing host packages; don't install them.
    #[arg(long)]
    no_install: bool,
    /// Print the setup report as JSON.
    #[arg(long)]
    json: bool,
    /// Check a k3s binary and cache it in the runtime for `start --profile k3s`.
    #[arg(long, value_name = "FILE")]
    k3s: Option<std::path::PathBuf>,
    /// Fetch the pinned k3s release (verified against its pinned sha256) and cache it;
    /// $GATEVM_K3S_URL with $GATEVM_K3S_SHA256 pins another file.
    #[arg(long, conflicts_with = "k3s")]
    fetch_k3s: bool,
}

pub(crate) fn run(a: Args) -> anyhow::Result<i32> {
    if let Some(f) = &a.k3s {
        super::k3s::cache_binary(f)?;
    }
    if a.fetch_k3s {
        super::k3s::fetch_and_cache()?;
    }
    let guest = super::guest_bin()?;
    let opts = SetupOptions {
        guest_bin: Some(guest),
        skip_rootfs: a.skip_rootfs,
        refresh: a.refresh,
        install_host_packages: !a.no_install,
    };
    let tty = std::io::stderr().is_terminal();
    let progress = move |phase: &str| {
        if tty {
            eprint!("\r\x1b[2Ksetup: {phase}…");
        } else {
            eprintln!("setup: {phase}");
        }
    };
    let report = runtime::setup(&opts, &progress);
    if tty {
        eprint!("\r\x1b[2K");
    }
    let report = report?;
    if a.json {
        print_json(&report)?;
        return Ok(0);
    }
    for s in &report.steps {
        let what = match s.action {
            SetupAction::Installed => "installed",
            SetupAction::AlreadyPresent => "present",
            SetupAction::Rebuilt => "rebuilt",
            SetupAction::Skipped => "skipped",
        };
        eprintln!(
            "  {:<14} {:<9} {} ({})",
            s.component,
            what,
            s.detail,
            secs(s.elapsed_ms)
        );
    }
    if report.changed() {
        eprintln!(
            "setup done in {} (runtime in {})",
            secs(report.elapsed_ms),
            report.runtime_dir.display()
        );
    } else {
        eprintln!("setup: everything was already in place; nothing to do");
    }
    Ok(0)
}
