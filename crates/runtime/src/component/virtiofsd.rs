//! virtiofsd built from the crates-io registry at a pinned version (Debian trixie's build needs
//! a newer glibc than bookworm has).

use std::path::{Path, PathBuf};
use std::process::Command;

use gatevm_abi::error_chain;
use thiserror::Error;

use crate::cmd::{self, CommandError};
use std::time::Instant;

use crate::component::present;
use crate::provenance::{self, component, Component, Provenance};
use crate::setup::{io, Ctx, SetupAction, SetupError};
use crate::util;

/// The virtiofsd release gatevm builds (`cargo install virtiofsd --version =X --locked`).
/// 1.14.0 is the newest on crates-io and builds with Rust 1.95.
pub(crate) const VIRTIOFSD_VERSION: &str = "1.14.0";

/// Errors of building virtiofsd.
#[derive(Debug, Error)]
pub enum VirtiofsdError {
    /// No cargo to build with.
    #[error("cargo not found (looked at $CARGO, PATH and ~/.cargo/bin): virtiofsd {VIRTIOFSD_VERSION} is built from crates-io; install a Rust toolchain (rustup) and run setup again")]
    NoCargo,
    /// The build failed.
    #[error("building virtiofsd {VIRTIOFSD_VERSION} from crates-io failed")]
    Build(#[source] CommandError),
    /// The built binary does not run or reports another version.
    #[error("built virtiofsd at {} does not work: {problem}", path.display())]
    Broken {
        /// The binary.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

/// Finds cargo: `$CARGO` (set when running under cargo), `PATH`, `~/.cargo/bin/cargo`.
pub(crate) fn find_cargo() -> Option<PathBuf> {
    if let Some(c) = std::env::var_os("CARGO").map(PathBuf::from) {
        if c.is_absolute() && c.is_file() {
            return Some(c);
        }
    }
    if let Some(c) = cmd::find_program("cargo") {
        return Some(c);
    }
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    let c = home.join("bin/cargo");
    c.is_file().then_some(c)
}

/// The version a virtiofsd binary reports (`virtiofsd --version` prints `virtiofsd X.Y.Z`).
pub(crate) fn binary_version(bin: &Path) -> Result<String, String> {
    let out = cmd::run_captured(Command::new(bin).arg("--version")).map_err(|e| error_chain(&e))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(1)
        .map(str::to_string)
        .ok_or_else(|| format!("unexpected --version output {:?}", text.trim()))
}

/// Builds virtiofsd [`VIRTIOFSD_VERSION`] into `build_dir/virtiofsd-<version>` (reusing an
/// earlier build of the same version) and returns the binary's path. `build_dir/target` is the
/// cargo target directory; it is removed after a successful build.
pub(crate) fn build_virtiofsd(
    build_dir: &Path,
    log: &Path,
    progress: &dyn Fn(&str),
) -> Result<PathBuf, VirtiofsdError> {
    let root = build_dir.join(format!("virtiofsd-{VIRTIOFSD_VERSION}"));
    let bin = root.join("bin/virtiofsd");
    if bin.is_file() && binary_version(&bin).ok().as_deref() == Some(VIRTIOFSD_VERSION) {
        return Ok(bin);
    }
    let cargo = find_cargo().ok_or(VirtiofsdError::NoCargo)?;
    progress(&format!(
        "building virtiofsd {VIRTIOFSD_VERSION} from crates-io (a few minutes)"
    ));
    let target = build_dir.join("target");
    let mut c = Command::new(cargo);
    c.args(["install", "virtiofsd", "--locked", "--force", "--version"])
        .arg(format!("={VIRTIOFSD_VERSION}"))
        .arg("--root")
        .arg(&root)
        .env("CARGO_TARGET_DIR", &target)
        .env("CARGO_TERM_COLOR", "never")
        .env("CARGO_TERM_PROGRESS_WHEN", "never")
        .current_dir(build_dir);
    cmd::run_logged(&mut c, log).map_err(VirtiofsdError::Build)?;
    let _ = std::fs::remove_dir_all(&target);
    match binary_version(&bin) {
        Ok(v) if v == VIRTIOFSD_VERSION => Ok(bin),
        Ok(v) => Err(VirtiofsdError::Broken {
            path: bin,
            problem: format!("reports version {v}, expected {VIRTIOFSD_VERSION}"),
        }),
        Err(problem) => Err(VirtiofsdError::Broken { path: bin, problem }),
    }
}

/// The `virtiofsd` step: builds [`VIRTIOFSD_VERSION`] with cargo unless that version is installed.
pub(crate) fn ensure(ctx: &mut Ctx<'_>, prov: &mut Provenance) -> Result<(), SetupError> {
    const C: &str = component::VIRTIOFSD;
    let started = Instant::now();
    (ctx.progress)("checking virtiofsd");
    let had = prov.component(C).is_some();
    if present(prov, &ctx.runtime, C)
        && prov
            .component(C)
            .is_some_and(|c| c.version == VIRTIOFSD_VERSION)
    {
        ctx.step(
            C,
            SetupAction::AlreadyPresent,
            format!("{VIRTIOFSD_VERSION} (crates-io virtiofsd {VIRTIOFSD_VERSION})"),
            started,
        );
        return Ok(());
    }
    let build_dir = ctx.cache.join("build");
    std::fs::create_dir_all(&build_dir).map_err(io(C, "cannot create", &build_dir))?;
    let bin = build_virtiofsd(&build_dir, &ctx.log, ctx.progress)?;
    let dest = ctx.runtime.join("bin/virtiofsd");
    util::copy_atomic(&bin, &dest, 0o755).map_err(io(C, "cannot install", &dest))?;
    let files = provenance::records_for(&ctx.runtime, &[PathBuf::from("bin/virtiofsd")])?;
    let origin = format!("crates-io virtiofsd {VIRTIOFSD_VERSION} (cargo install --locked)");
    ctx.record(
        prov,
        Component::installed_now(C, VIRTIOFSD_VERSION, &origin, files),
        had,
        format!("{} from {origin}", dest.display()),
        started,
    )?;
    Ok(())
}
