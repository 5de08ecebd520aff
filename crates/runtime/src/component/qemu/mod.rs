//! Which QEMU runs the guests, and the pieces [`crate::setup()`] uses to decide and to check it:
//! [`choice`] (versions, the host facts, the plan), [`ldd`] (missing shared libraries),
//! [`boot_test`] (a boot of the guest kernel), [`backport`] (fetching and bundling Debian's
//! backport) and the setup step itself.
//!
//! QEMU 7.2 (Debian bookworm's) crashes the guest kernel under TCG now and then (double faults in
//! kmalloc, a general protection fault on IRET in `do_sync_core`, about one boot in ten). QEMU 8
//! and newer do not. So:
//!
//! 1. the host's `qemu-system-x86_64`, when its major version is at least [`MIN_TCG_SAFE_MAJOR`];
//! 2. otherwise Debian's backport for the host's release (`<codename>-backports`: packages
//!    [`BACKPORT_PACKAGES`]), unpacked into [`BUNDLE_DIR`] in the runtime directory. It is built for
//!    the host's release, and its shared libraries come with the host's own `qemu-system-x86`;
//! 3. otherwise the host's old QEMU only where hardware KVM works (the crashes are TCG's), else an
//!    error that says what to do ([`QemuError::HostTooOld`]).
//!
//! The bundled binary needs `-L` for each of [`crate::Runtime::qemu_data_dirs`]: Debian's QEMU is
//! not relocatable and would otherwise load the host's (older) firmware from `/usr/share/qemu`.
//! The bundle keeps only `usr/bin/qemu-system-x86_64` and the x86 firmware, and adds the
//! `bios-microvm.bin -> qboot.rom` link Debian's 10.0 packages lack ([`MICROVM_FIRMWARE`]).
//! Setup checks a fetched QEMU by booting the guest kernel with it ([`boot_test`]).

use std::path::PathBuf;
use std::time::Instant;

use gatevm_abi::error_chain;
use thiserror::Error;

use crate::cmd::CommandError;
use crate::component::kernel::KernelInfo;
use crate::component::present;
use crate::provenance::{self, component, Component, Provenance};
use crate::setup::{io, Ctx, SetupAction, SetupError, SetupOptions};

pub(crate) mod backport;
pub(crate) mod boot_test;
pub(crate) mod choice;
pub(crate) mod ldd;

pub(crate) use boot_test::boot_test;
pub(crate) use choice::*;
pub(crate) use ldd::{check_binary, MissingLibrary};

use backport::{bundle_detail, install_backport};
use ldd::{list_missing, missing_packages};

/// Errors of choosing and checking QEMU.
#[derive(Debug, Error)]
pub enum QemuError {
    /// The host's QEMU is too old for TCG, there is no hardware KVM and no backport could be had.
    #[error(
        "the host's QEMU {version} ({}) crashes guest kernels under TCG (software emulation, used \
         here because {why_no_kvm}), and no QEMU {MIN_TCG_SAFE_MAJOR}+ could be fetched ({backport}); \
         {advice}, or use a host with hardware KVM",
        path.display()
    )]
    HostTooOld {
        /// The host's binary.
        path: PathBuf,
        /// Its version.
        version: QemuVersion,
        /// Why hardware KVM is not usable.
        why_no_kvm: String,
        /// Why the backport could not be used.
        backport: String,
        /// What to do.
        advice: String,
    },
    /// There is no usable QEMU on the host and none could be fetched.
    #[error(
        "no usable {QEMU_PROGRAM} on the host and no QEMU could be fetched ({backport}); \
         install {QEMU_HOST_PACKAGE} (QEMU {MIN_TCG_SAFE_MAJOR} or newer)"
    )]
    NoQemu {
        /// Why the backport could not be used.
        backport: String,
    },
    /// The binary cannot start for want of shared libraries.
    #[error(
        "{} cannot start: missing shared librar{} {}; install as root: apt-get install {}",
        binary.display(),
        if missing.len() == 1 { "y" } else { "ies" },
        list_missing(missing),
        missing_packages(missing)
    )]
    MissingLibraries {
        /// The binary.
        binary: PathBuf,
        /// What it lacks.
        missing: Vec<MissingLibrary>,
    },
    /// The binary could not be run.
    #[error("cannot check {}", binary.display())]
    Run {
        /// The binary.
        binary: PathBuf,
        /// The underlying error.
        #[source]
        source: CommandError,
    },
    /// `--version` printed something else than a QEMU version.
    #[error("{} --version printed no QEMU version ({output:?})", binary.display())]
    BadVersion {
        /// The binary.
        binary: PathBuf,
        /// What it printed.
        output: String,
    },
    /// The binary runs but does not boot the guest kernel in the machine gatevm uses.
    #[error("{} does not boot the guest kernel in a microvm machine under TCG: {problem}", binary.display())]
    Boot {
        /// The binary.
        binary: PathBuf,
        /// What went wrong.
        problem: String,
    },
}

/// Why Debian's QEMU backport could not be used.
pub(crate) enum BackportFailure {
    /// Not to be had: no such suite or package, apt or network failures, too old a version.
    /// Falls back to the host's QEMU when hardware KVM works, else [`QemuError::HostTooOld`].
    Unavailable(String),
    /// Fetched, but it does not work here (missing libraries, a broken package). Reported as is,
    /// unless hardware KVM makes the host's QEMU fine.
    Broken(SetupError),
}

/// The `qemu` step: the host's QEMU when it is 8 or newer, else Debian's backport for the host's
/// release in `runtime/qemu/`, else the host's old QEMU where hardware KVM works (see
/// [`crate::component::qemu`]).
pub(crate) fn ensure(
    ctx: &mut Ctx<'_>,
    opts: &SetupOptions,
    kernel: &KernelInfo,
    prov: &mut Provenance,
) -> Result<(), SetupError> {
    const C: &str = component::QEMU;
    let started = Instant::now();
    (ctx.progress)("checking QEMU");
    let host = probe_host_qemu();
    let codename = host_codename();
    let recorded = prov.component(C).and_then(recorded_binary);
    let complete = present(prov, &ctx.runtime, C);
    // A bundle from an earlier layout (without a file now required) is installed again.
    let bundle_complete = complete
        && recorded == Some(RecordedQemu::Bundled)
        && BUNDLED_REQUIRED
            .iter()
            .all(|f| ctx.runtime.join(f).exists());

    let problem = match (
        plan(host.as_ref().map(|h| h.version), codename.as_deref()),
        &host,
    ) {
        (QemuPlan::UseHost, Some(h)) => return use_host_qemu(ctx, prov, h, None, started),
        (QemuPlan::UseHost, None) => format!("no usable {}", QEMU_PROGRAM),
        (QemuPlan::NoBackport { reason }, _) => reason,
        (QemuPlan::FetchBackport { suite }, _) => {
            if bundle_complete && !opts.refresh {
                if let Some(c) = prov.component(C) {
                    let detail = bundle_detail(&ctx.runtime, c, "");
                    ctx.step(C, SetupAction::AlreadyPresent, detail, started);
                    return Ok(());
                }
            }
            // The host's old QEMU accepted earlier because of hardware KVM: still fine while
            // KVM works and the binary is the same version (`--refresh` tries the backport again).
            if let (Some(h), false) = (&host, opts.refresh) {
                if complete && old_host_still_accepted(prov, recorded.as_ref(), h) {
                    let detail = format!(
                        "QEMU {} at {} (older than {}, accepted because hardware KVM works)",
                        h.version,
                        h.path.display(),
                        MIN_TCG_SAFE_MAJOR
                    );
                    ctx.step(C, SetupAction::AlreadyPresent, detail, started);
                    return Ok(());
                }
            }
            match install_backport(ctx, prov, kernel, &suite, bundle_complete, started) {
                Ok(()) => return Ok(()),
                Err(BackportFailure::Unavailable(why)) if bundle_complete => {
                    // --refresh could not reach the backport: keep the working bundle.
                    if let Some(c) = prov.component(C) {
                        let detail = bundle_detail(
                            &ctx.runtime,
                            c,
                            &format!("; could not check for a newer version: {why}"),
                        );
                        ctx.step(C, SetupAction::AlreadyPresent, detail, started);
                    }
                    return Ok(());
                }
                Err(BackportFailure::Unavailable(why)) => format!("{suite}: {why}"),
                Err(BackportFailure::Broken(e)) => {
                    if host.is_none() || hardware_kvm().is_err() {
                        return Err(e);
                    }
                    format!("{suite}: {}", error_chain(&e))
                }
            }
        }
    };
    let (h, note) = accept_old_host(host.as_ref(), hardware_kvm(), codename.as_deref(), &problem)?;
    use_host_qemu(ctx, prov, h, Some(note), started)
}

/// Whether the recorded QEMU is the host's binary `h` at the same version, and hardware KVM
/// (which made the host's old QEMU acceptable) still works.
fn old_host_still_accepted(
    prov: &Provenance,
    recorded: Option<&RecordedQemu>,
    h: &HostQemu,
) -> bool {
    let Some(RecordedQemu::Host(path)) = recorded else {
        return false;
    };
    *path == h.path
        && prov
            .component(component::QEMU)
            .is_some_and(|c| c.version == h.version_string())
        && hardware_kvm().is_ok()
}

/// Records the host's QEMU as the `qemu` component (its binary by absolute path and hash) and
/// removes a bundled QEMU left from before.
fn use_host_qemu(
    ctx: &mut Ctx<'_>,
    prov: &mut Provenance,
    h: &HostQemu,
    note: Option<String>,
    started: Instant,
) -> Result<(), SetupError> {
    const C: &str = component::QEMU;
    let version = h.version_string();
    let origin = format!("host package {} {version}", QEMU_HOST_PACKAGE);
    let path = h.path.to_string_lossy().into_owned();
    let mut detail = format!("QEMU {} at {}", h.version, h.path.display());
    if let Some(n) = &note {
        detail.push_str(&format!(" ({n})"));
    }
    let same = present(prov, &ctx.runtime, C)
        && prov.component(C).is_some_and(|c| {
            c.version == version && c.origin == origin && c.files.iter().any(|f| f.path == path)
        });
    if same {
        ctx.step(C, SetupAction::AlreadyPresent, detail, started);
        return Ok(());
    }
    let had = prov.component(C).is_some();
    let files = provenance::records_for(&ctx.runtime, std::slice::from_ref(&h.path))?;
    prov.set_component(Component::installed_now(C, &version, &origin, files));
    prov.save(&ctx.runtime)?;
    let bundle = ctx.runtime.join(BUNDLE_DIR);
    if bundle.exists() {
        std::fs::remove_dir_all(&bundle).map_err(io(C, "cannot remove", &bundle))?;
    }
    ctx.step(
        C,
        if had {
            SetupAction::Rebuilt
        } else {
            SetupAction::Installed
        },
        detail,
        started,
    );
    Ok(())
}
