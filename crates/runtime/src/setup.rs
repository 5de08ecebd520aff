//! `gatevm setup`: acquiring the runtime bundle, idempotently.
//!
//! Layout of the runtime directory ([`crate::dirs::runtime_dir`]):
//! ```text
//! provenance.json                       what came from where, sha256 of every file
//! kernel/vmlinux                        uncompressed ELF kernel (PVH entry), booted by QEMU
//! kernel/vmlinuz-<release>              the original bzImage
//! kernel/config-<release>               the kernel's build configuration
//! kernel/lib/modules/<release>/         module tree, depmod'ed
//! bin/gvproxy, bin/virtiofsd            helper binaries
//! bin/passt                             built from Debian trixie's source package (crate::component::passt)
//! qemu/usr/bin/qemu-system-x86_64       QEMU from Debian's <codename>-backports, when the host's
//! qemu/usr/share/{qemu,seabios}/        is older than 8 (its firmware: pass each dir with -L)
//! lib/libkrunfw.so.5 -> libkrunfw.so.5.x.y
//! initramfs/initramfs-<hash12>.cpio     per guest binary, built on demand
//! ```
//! Base root file systems live in `data_dir()/rootfs/<recipe-hash12>/`; downloads, the private
//! apt state (`apt/` for trixie and sid, `apt-backports/` for the host release's backports,
//! `apt-src/` for trixie's source index), build trees and the setup log in the cache directory.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use thiserror::Error;

use crate::apt::{self, AptError, IndexKind, PackageEntry, PrivateApt};
use crate::cmd::CommandError;
use crate::component::host::HostError;
use crate::component::initramfs::InitramfsError;
use crate::component::kernel::{KernelError, KERNEL_SUITE};
use crate::component::libkrunfw::LIBKRUNFW_SUITE;
use crate::component::passt::{PasstError, PASST_SOURCE_SUITE};
use crate::component::qemu::QemuError;
use crate::component::rootfs::RootfsError;
use crate::component::virtiofsd::VirtiofsdError;
use crate::component::{
    gvproxy, host, initramfs, kernel, libkrunfw, passt, qemu, rootfs, virtiofsd,
};
use crate::dirs::{self, DirsError};
use crate::provenance::{Component, Provenance, ProvenanceError};

/// What to do in [`setup`].
#[derive(Debug, Clone)]
pub struct SetupOptions {
    /// The `gatevm-guest` binary to build the initramfs for (the CLI passes
    /// `$GATEVM_GUEST_BIN` or the one next to the `gatevm` executable). `None` skips that step.
    pub guest_bin: Option<PathBuf>,
    /// Do not build the base rootfs.
    pub skip_rootfs: bool,
    /// Ask Debian for newer package versions and replace components that changed (otherwise a
    /// component that is present is left as it is, without network access).
    pub refresh: bool,
    /// Install missing host packages with apt-get when running as root (otherwise only report).
    pub install_host_packages: bool,
}

impl Default for SetupOptions {
    fn default() -> Self {
        SetupOptions {
            guest_bin: None,
            skip_rootfs: false,
            refresh: false,
            install_host_packages: true,
        }
    }
}

/// What a setup step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SetupAction {
    /// Acquired now; was not there before.
    Installed,
    /// Was there already; nothing done.
    AlreadyPresent,
    /// Was there, but replaced (newer version, changed recipe, files missing).
    Rebuilt,
    /// Not done, as asked (or nothing to do it for).
    Skipped,
}

/// One step of [`setup`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SetupStep {
    /// Component name: `host-packages`, `apt`, `kernel`, `qemu`, `gvproxy`, `libkrunfw`,
    /// `virtiofsd`, `passt`, `rootfs`, `initramfs`.
    pub component: String,
    /// What was done.
    pub action: SetupAction,
    /// One line for humans: version, origin, path.
    pub detail: String,
    /// Wall time of the step in milliseconds.
    pub elapsed_ms: u64,
}

/// The result of [`setup`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SetupReport {
    /// The data directory.
    pub data_dir: PathBuf,
    /// The runtime bundle directory.
    pub runtime_dir: PathBuf,
    /// The cache directory.
    pub cache_dir: PathBuf,
    /// The steps, in order.
    pub steps: Vec<SetupStep>,
    /// Release of the installed kernel.
    pub kernel_release: String,
    /// The base rootfs for the current recipe, unless skipped.
    pub rootfs: Option<PathBuf>,
    /// Base rootfs trees of other (older) recipes, left in place.
    pub old_rootfs: Vec<PathBuf>,
    /// The initramfs for the given guest binary.
    pub initramfs: Option<PathBuf>,
    /// The log with the output of every command setup ran.
    pub log: PathBuf,
    /// Wall time of the whole setup in milliseconds.
    pub elapsed_ms: u64,
}

impl SetupReport {
    /// Whether any step installed or rebuilt something.
    pub fn changed(&self) -> bool {
        self.steps
            .iter()
            .any(|s| matches!(s.action, SetupAction::Installed | SetupAction::Rebuilt))
    }
}

/// Errors of [`setup`]; each names the step, what failed on what, and when known what to do.
#[derive(Debug, Error)]
pub enum SetupError {
    /// A directory could not be resolved or created.
    #[error(transparent)]
    Dirs(#[from] DirsError),
    /// The setup lock could not be taken.
    #[error("cannot lock {}", path.display())]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Host packages are missing or could not be installed.
    #[error("host packages")]
    Host(#[from] HostError),
    /// Fetching a Debian package failed.
    #[error("{component}")]
    Apt {
        /// The component.
        component: &'static str,
        /// The underlying error.
        #[source]
        source: AptError,
    },
    /// A package did not contain what we expected.
    #[error("{component}: {problem}")]
    Package {
        /// The component.
        component: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// A file operation failed.
    #[error("{component}: {action} {}", path.display())]
    Io {
        /// The component.
        component: &'static str,
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A command failed.
    #[error("{component}")]
    Command {
        /// The component.
        component: &'static str,
        /// The underlying error.
        #[source]
        source: CommandError,
    },
    /// Extracting the ELF kernel failed.
    #[error("kernel")]
    Kernel(#[from] KernelError),
    /// Building virtiofsd failed.
    #[error("virtiofsd")]
    Virtiofsd(#[from] VirtiofsdError),
    /// Building passt from its Debian source package failed.
    #[error("passt")]
    Passt(#[from] PasstError),
    /// Building the rootfs failed.
    #[error("rootfs")]
    Rootfs(#[from] RootfsError),
    /// Building the initramfs failed.
    #[error("initramfs")]
    Initramfs(#[from] InitramfsError),
    /// Reading or writing the provenance manifest failed.
    #[error(transparent)]
    Provenance(#[from] ProvenanceError),
    /// No QEMU that runs the guests reliably, or the fetched one does not work.
    #[error("qemu")]
    Qemu(#[from] QemuError),
}

pub(crate) fn io(
    component: &'static str,
    action: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> SetupError {
    let path = path.to_path_buf();
    move |source| SetupError::Io {
        component,
        action,
        path,
        source,
    }
}

/// Paths of one setup run, and what its steps share: the private apt configurations (made on
/// first use) and the steps reported so far.
pub(crate) struct Ctx<'a> {
    pub(crate) runtime: PathBuf,
    pub(crate) cache: PathBuf,
    pub(crate) data: PathBuf,
    pub(crate) log: PathBuf,
    pub(crate) progress: &'a dyn Fn(&str),
    pub(crate) apt: Option<PrivateApt>,
    /// The private apt configuration for the host release's backports suite (kept apart from
    /// `apt`, so that a missing or failing backports suite cannot break the other lookups).
    pub(crate) backports_apt: Option<PrivateApt>,
    /// The private apt configuration with trixie's source index (for passt).
    pub(crate) source_apt: Option<PrivateApt>,
    pub(crate) steps: Vec<SetupStep>,
}

impl Ctx<'_> {
    /// Records a component acquired now (or replaced, when it `had` been there) in the
    /// provenance manifest, saves the manifest and reports the step.
    pub(crate) fn record(
        &mut self,
        prov: &mut Provenance,
        component: Component,
        had: bool,
        detail: String,
        started: Instant,
    ) -> Result<(), SetupError> {
        let name = component.name.clone();
        prov.set_component(component);
        prov.save(&self.runtime)?;
        let action = if had {
            SetupAction::Rebuilt
        } else {
            SetupAction::Installed
        };
        self.step(&name, action, detail, started);
        Ok(())
    }

    pub(crate) fn step(
        &mut self,
        component: &str,
        action: SetupAction,
        detail: String,
        started: Instant,
    ) {
        tracing::info!(component, ?action, %detail, "setup step");
        self.steps.push(SetupStep {
            component: component.to_string(),
            action,
            detail,
            elapsed_ms: started.elapsed().as_millis() as u64,
        });
    }

    /// The private apt configuration, created and updated on first use.
    pub(crate) fn apt(&mut self) -> Result<&PrivateApt, SetupError> {
        match self.apt {
            Some(ref a) => Ok(a),
            None => {
                let a = self.new_apt()?;
                Ok(self.apt.insert(a))
            }
        }
    }

    fn new_apt(&mut self) -> Result<PrivateApt, SetupError> {
        self.open_apt("apt", &[KERNEL_SUITE, LIBKRUNFW_SUITE], IndexKind::Binary)
            .map_err(|source| SetupError::Apt {
                component: "apt",
                source,
            })
    }

    /// The private apt configuration for `suite` (a `-backports` suite), created and updated on
    /// first use.
    pub(crate) fn backports_apt(&mut self, suite: &str) -> Result<&PrivateApt, AptError> {
        if !self
            .backports_apt
            .as_ref()
            .is_some_and(|a| a.suites().iter().any(|s| s == suite))
        {
            self.backports_apt = None;
        }
        match self.backports_apt {
            Some(ref a) => Ok(a),
            None => {
                let a = self.new_backports_apt(suite)?;
                Ok(self.backports_apt.insert(a))
            }
        }
    }

    fn new_backports_apt(&mut self, suite: &str) -> Result<PrivateApt, AptError> {
        self.open_apt("apt-backports", &[suite], IndexKind::Binary)
    }

    /// The private apt configuration with [`PASST_SOURCE_SUITE`]'s source index, created and
    /// updated on first use.
    pub(crate) fn source_apt(&mut self) -> Result<&PrivateApt, AptError> {
        match self.source_apt {
            Some(ref a) => Ok(a),
            None => {
                let a = self.open_apt("apt-src", &[PASST_SOURCE_SUITE], IndexKind::Source)?;
                Ok(self.source_apt.insert(a))
            }
        }
    }

    /// Creates (or reuses) the private apt configuration in `cache/<dir>` for `suites` and
    /// `kind`'s indexes, updates its package lists and reports the step.
    fn open_apt(
        &mut self,
        dir: &str,
        suites: &[&str],
        kind: IndexKind,
    ) -> Result<PrivateApt, AptError> {
        let started = Instant::now();
        let mirrors = apt::system_debian_mirrors()?;
        let a = PrivateApt::with_kind(&self.cache.join(dir), &mirrors, suites, kind)?;
        let sources = match kind {
            IndexKind::Binary => "",
            IndexKind::Source => " (source packages)",
        };
        let what = format!("{}{sources} from {}", suites.join(", "), mirrors.join(", "));
        (self.progress)(&format!("updating package lists for Debian {what}"));
        let had_lists = a.lists_complete();
        a.update(&self.log)?;
        let action = if had_lists {
            SetupAction::Rebuilt
        } else {
            SetupAction::Installed
        };
        let detail = format!("private apt config in {} for {what}", a.root().display());
        self.step("apt", action, detail, started);
        Ok(a)
    }

    pub(crate) fn work_dir(
        &self,
        component: &'static str,
    ) -> Result<tempfile::TempDir, SetupError> {
        let base = self.cache.join("work");
        std::fs::create_dir_all(&base).map_err(io(component, "cannot create", &base))?;
        tempfile::Builder::new()
            .prefix(&format!("{component}-"))
            .tempdir_in(&base)
            .map_err(io(component, "cannot create a work directory in", &base))
    }

    /// Downloads and unpacks a package; returns the unpack dir and the work dir guard.
    pub(crate) fn fetch(
        &mut self,
        component: &'static str,
        entry: &PackageEntry,
        suite: &str,
    ) -> Result<(PathBuf, tempfile::TempDir), SetupError> {
        let wrap = |source| SetupError::Apt { component, source };
        let work = self.work_dir(component)?;
        (self.progress)(&format!(
            "downloading {} {} (Debian {suite})",
            entry.package, entry.version
        ));
        let log = self.log.clone();
        let apt = self.apt()?;
        let deb = apt
            .download(
                &entry.package,
                &entry.version,
                &work.path().join("dl"),
                &log,
            )
            .map_err(wrap)?;
        let x = work.path().join("x");
        apt::unpack_deb(&deb, &x, &log).map_err(wrap)?;
        Ok((x, work))
    }
}

/// Takes the exclusive setup lock (waits for another running setup).
fn lock(data: &Path, progress: &dyn Fn(&str)) -> Result<File, SetupError> {
    let path = data.join("setup.lock");
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| SetupError::Lock {
            path: path.clone(),
            source,
        })?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            progress("waiting for another gatevm setup to finish");
            f.lock().map_err(|source| SetupError::Lock {
                path: path.clone(),
                source,
            })?;
        }
        Err(std::fs::TryLockError::Error(source)) => {
            return Err(SetupError::Lock { path, source });
        }
    }
    Ok(f)
}

/// Acquires the runtime bundle into [`dirs::runtime_dir`] (see the module docs for the layout),
/// builds the base rootfs and the initramfs. Idempotent: components that are present are left
/// alone (their files' presence is checked; [`crate::verify`] re-hashes them), so a second run
/// reports every step as [`SetupAction::AlreadyPresent`] and needs no network. Progress messages
/// go to `progress`; nothing is printed.
pub fn setup(opts: &SetupOptions, progress: &dyn Fn(&str)) -> Result<SetupReport, SetupError> {
    let started = Instant::now();
    let data = dirs::data_dir()?;
    let runtime = dirs::runtime_dir()?;
    let cache = dirs::cache_dir()?;
    for d in [&data, &runtime, &cache] {
        dirs::ensure_dir(d)?;
    }
    let _lock = lock(&data, progress)?;
    let logs = cache.join("logs");
    dirs::ensure_dir(&logs)?;
    let log = logs.join("setup.log");
    // One log per run: start it fresh.
    std::fs::write(&log, "").map_err(io("setup", "cannot write", &log))?;

    let mut ctx = Ctx {
        runtime: runtime.clone(),
        cache: cache.clone(),
        data: data.clone(),
        log: log.clone(),
        progress,
        apt: None,
        backports_apt: None,
        source_apt: None,
        steps: Vec::new(),
    };
    let mut prov = Provenance::load(&runtime)?.unwrap_or_default();
    let loaded = prov.clone();

    host::ensure(&mut ctx, opts)?;
    let kernel = kernel::ensure(&mut ctx, opts, &mut prov)?;
    // After the kernel: a fetched QEMU is checked by booting it.
    qemu::ensure(&mut ctx, opts, &kernel, &mut prov)?;
    gvproxy::ensure(&mut ctx, opts, &mut prov)?;
    libkrunfw::ensure(&mut ctx, opts, &mut prov)?;
    virtiofsd::ensure(&mut ctx, &mut prov)?;
    passt::ensure(&mut ctx, opts, &mut prov)?;
    if ctx.apt.is_none() && ctx.backports_apt.is_none() && ctx.source_apt.is_none() {
        ctx.step(
            "apt",
            SetupAction::AlreadyPresent,
            "not needed: every Debian package is installed".into(),
            Instant::now(),
        );
    }
    let (rootfs, old_rootfs) = rootfs::ensure(&mut ctx, opts, &kernel, &mut prov)?;
    if prov != loaded {
        prov.save(&runtime)?;
    }
    let initramfs = initramfs::ensure(&mut ctx, opts, &kernel)?;

    Ok(SetupReport {
        data_dir: data,
        runtime_dir: runtime,
        cache_dir: cache,
        steps: ctx.steps,
        kernel_release: kernel.release,
        rootfs,
        old_rootfs,
        initramfs,
        log,
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}
