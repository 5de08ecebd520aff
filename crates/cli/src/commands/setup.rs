//! `gatevm setup`

use crate::output::{print_json, secs};
use gatevm_instance::runtime::{self, SetupAction, SetupOptions};

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
    /// As root, once per host: install the host packages and build the runtime and base rootfs
    /// into /var/lib/gatevm for every user (`sudo gatevm setup --system`).
    #[arg(long)]
    system: bool,
    /// Fetch the pinned k3s release (verified against its pinned sha256) and cache it;
    /// $GATEVM_K3S_URL with $GATEVM_K3S_SHA256 pins another file.
    #[arg(long, conflicts_with = "k3s")]
    fetch_k3s: bool,
}

pub(crate) fn run(a: Args) -> anyhow::Result<i32> {
    if a.system && !nix::unistd::geteuid().is_root() {
        // Before anything else (the k3s binary, the guest agent): nothing here is the user's.
        return Err(runtime::SetupError::SystemNeedsRoot {
            path: runtime::dirs::system_dir()?.path,
        }
        .into());
    }
    if let Some(f) = &a.k3s {
        super::k3s::cache_binary(f)?;
    }
    if a.fetch_k3s {
        super::k3s::fetch_and_cache()?;
    }
    // An ordinary user on the system runtime builds nothing (and needs no guest agent here).
    let guest = if !a.system && runtime::uses_system_runtime()? {
        None
    } else {
        Some(super::guest_bin()?)
    };
    let opts = SetupOptions {
        guest_bin: guest,
        skip_rootfs: a.skip_rootfs,
        refresh: a.refresh,
        install_host_packages: !a.no_install,
    };
    // One line per message, on a terminal too: a long step's line (what, why, how long it
    // usually takes) stays in sight while it runs, and its end comes with its time.
    let progress = |line: &str| eprintln!("setup: {line}");
    let report = if a.system {
        runtime::setup_system(&opts, &progress)?
    } else {
        runtime::setup(&opts, &progress)?
    };
    if a.json {
        print_json(&report)?;
        return Ok(0);
    }
    if report.uses_system_runtime {
        eprintln!(
            "setup: using the system runtime in {}; nothing to build",
            report.runtime_dir.display()
        );
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
