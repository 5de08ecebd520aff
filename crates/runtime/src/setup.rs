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

pub(crate) mod phases;
use phases::Phases;

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
    /// The caller (not root, without a runtime of their own) uses the system runtime that
    /// `gatevm setup --system` installed in `runtime_dir`; nothing was built.
    pub uses_system_runtime: bool,
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
    /// `gatevm setup --system` run by someone other than root.
    #[error("setup --system installs host packages and writes {}: run it as root: `sudo gatevm setup --system`", path.display())]
    SystemNeedsRoot {
        /// The system directory.
        path: PathBuf,
    },
    /// An ordinary user's setup, with no system runtime to use.
    #[error("no system runtime in {}: as an ordinary user, setup cannot install host packages or build the base rootfs; run `sudo gatevm setup --system` once", path.display())]
    NoSystemRuntime {
        /// The system runtime directory.
        path: PathBuf,
    },
    /// An ordinary user's setup, with a system runtime that is incomplete or older than this
    /// gatevm.
    #[error("the system runtime in {} is not current ({why}): run `sudo gatevm setup --system`", path.display())]
    SystemRuntimeNotCurrent {
        /// The system runtime directory.
        path: PathBuf,
        /// What is missing or out of date.
        why: String,
    },
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
    /// Starts a phase ([`Phases::start`]): each message is one line.
    pub(crate) progress: &'a dyn Fn(&str),
    /// The phases, ended (with their time when long) as each step is reported.
    pub(crate) phases: &'a Phases<'a>,
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
        self.phases.end();
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
/// go to `progress`, one line each: a phase as it starts, and a long one again when it ends, with
/// its time (`<phase>: done in 1 min 12 s`); nothing is printed.
///
/// For a caller who is not root, has no complete runtime of their own and no
/// `GATEVM_RUNTIME_DIR`: uses the system runtime when it is complete and current (the report says
/// so in [`SetupReport::uses_system_runtime`]; nothing is built), and is an error naming `sudo
/// gatevm setup --system` otherwise.
pub fn setup(opts: &SetupOptions, progress: &dyn Fn(&str)) -> Result<SetupReport, SetupError> {
    let started = Instant::now();
    if !host::is_root() {
        let at = dirs::locate_runtime()?;
        if let Some(rt) = system_runtime_for_user(&at)? {
            return Ok(SetupReport {
                data_dir: dirs::data_dir()?,
                runtime_dir: at.runtime,
                cache_dir: dirs::cache_dir()?,
                steps: Vec::new(),
                kernel_release: rt.kernel_release().to_string(),
                rootfs: rt.rootfs().ok(),
                old_rootfs: Vec::new(),
                initramfs: None,
                log: dirs::cache_dir()?.join("logs/setup.log"),
                elapsed_ms: started.elapsed().as_millis() as u64,
                uses_system_runtime: true,
            });
        }
    }
    let data = dirs::data_dir()?;
    let runtime = dirs::own_runtime_dir()?;
    let cache = dirs::cache_dir()?;
    for d in [&data, &runtime, &cache] {
        dirs::ensure_dir(d)?;
    }
    setup_in(opts, progress, started, data, runtime, cache)
}

/// Whether [`setup`] for this caller uses the system runtime and builds nothing (a caller who
/// is not root, without a complete runtime of their own or `GATEVM_RUNTIME_DIR`); the error
/// [`setup`] would fail with when that system runtime is missing or not current.
pub fn uses_system_runtime() -> Result<bool, SetupError> {
    if host::is_root() {
        return Ok(false);
    }
    Ok(system_runtime_for_user(&dirs::locate_runtime()?)?.is_some())
}

/// What an ordinary user's setup does with the runtime [`dirs::locate_runtime`] found: `None`
/// (set up as root would: their own, or `GATEVM_RUNTIME_DIR`), the system runtime when it is
/// complete and current, or an error naming `sudo gatevm setup --system`.
fn system_runtime_for_user(
    at: &dirs::RuntimeLocation,
) -> Result<Option<crate::Runtime>, SetupError> {
    match at.source {
        dirs::RuntimeSource::Env | dirs::RuntimeSource::Own => Ok(None),
        dirs::RuntimeSource::NotSetUp => Err(SetupError::NoSystemRuntime {
            path: at
                .system
                .as_ref()
                .map(|s| s.runtime())
                .unwrap_or_else(|| at.runtime.clone()),
        }),
        dirs::RuntimeSource::System => {
            let not_current = |why: String| SetupError::SystemRuntimeNotCurrent {
                path: at.runtime.clone(),
                why,
            };
            let rt = crate::Runtime::load_from(&at.runtime, &at.rootfs_root)
                .map_err(|e| not_current(why_not_current(&e)))?;
            rt.base_image()
                .map_err(|e| not_current(why_not_current(&e)))?;
            if !rt.passt().exists() {
                return Err(not_current(format!("{} is missing", rt.passt().display())));
            }
            Ok(Some(rt))
        }
    }
}

/// What is wrong with the system runtime, for [`SetupError::SystemRuntimeNotCurrent`] (without
/// the advice to run `gatevm setup`, which is not what an ordinary user can do).
fn why_not_current(e: &crate::RuntimeError) -> String {
    use crate::RuntimeError as E;
    match e {
        E::NotSetUp { path } => format!("{} not found", path.display()),
        E::Incomplete { what } => what.clone(),
        E::RootfsNotBuilt { path, kernel } => format!(
            "the base rootfs for kernel {kernel} is not built: {} not found",
            path.display()
        ),
        other => gatevm_abi::error_chain(other),
    }
}

/// `gatevm setup --system` (root only): installs the host packages and builds the runtime and
/// the base rootfs into the system directory ([`dirs::system_dir`]: `runtime/v1`, `rootfs/`),
/// then makes them root's and readable by all: directories 0755, files 0755 when executable,
/// else 0644 (the modes inside a rootfs tree are the guest's and stay). Every user's commands
/// then find it ([`dirs::locate_runtime`]). Downloads and build trees go to root's cache.
pub fn setup_system(
    opts: &SetupOptions,
    progress: &dyn Fn(&str),
) -> Result<SetupReport, SetupError> {
    let started = Instant::now();
    let sys = dirs::system_dir()?;
    if !host::is_root() {
        return Err(SetupError::SystemNeedsRoot { path: sys.path });
    }
    let runtime = sys.runtime();
    for d in [&sys.path, &runtime] {
        dirs::ensure_public_dir(d)?;
    }
    let cache = dirs::cache_dir()?;
    dirs::ensure_dir(&cache)?;
    let report = setup_in(opts, progress, started, sys.path.clone(), runtime, cache)?;
    publish_system(&sys.path, (0, 0))?;
    Ok(report)
}

/// Makes the system directory `sys` readable by all and writable only by `owner` (root's uid
/// and gid in [`setup_system`]): `sys` itself and the files in it, the whole runtime tree
/// (`runtime/`) and `rootfs/` with its entries, not the insides of its trees (whose modes are the
/// guest's). Directories get 0755, files 0755 when any execute bit is set and 0644 otherwise;
/// symbolic links keep theirs and are not followed.
pub(crate) fn publish_system(sys: &Path, owner: (u32, u32)) -> Result<(), SetupError> {
    publish_entry(sys, owner)?;
    for e in std::fs::read_dir(sys).map_err(io("setup", "cannot read", sys))? {
        let e = e.map_err(io("setup", "cannot read", sys))?;
        let path = e.path();
        match e.file_name().to_str() {
            Some("runtime") => publish_tree(&path, owner)?,
            Some("rootfs") => {
                publish_entry(&path, owner)?;
                for t in std::fs::read_dir(&path).map_err(io("setup", "cannot read", &path))? {
                    let t = t.map_err(io("setup", "cannot read", &path))?;
                    publish_entry(&t.path(), owner)?;
                }
            }
            _ => publish_entry(&path, owner)?,
        }
    }
    Ok(())
}

/// [`publish_entry`] on `root` and everything below it.
fn publish_tree(root: &Path, owner: (u32, u32)) -> Result<(), SetupError> {
    publish_entry(root, owner)?;
    let m = std::fs::symlink_metadata(root).map_err(io("setup", "cannot stat", root))?;
    if m.is_dir() {
        for e in std::fs::read_dir(root).map_err(io("setup", "cannot read", root))? {
            let e = e.map_err(io("setup", "cannot read", root))?;
            publish_tree(&e.path(), owner)?;
        }
    }
    Ok(())
}

/// Gives one path to `owner` with mode 0755 (a directory or an executable) or 0644; a symbolic
/// link only changes owner.
fn publish_entry(path: &Path, owner: (u32, u32)) -> Result<(), SetupError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let m = std::fs::symlink_metadata(path).map_err(io("setup", "cannot stat", path))?;
    if (m.uid(), m.gid()) != owner {
        std::os::unix::fs::lchown(path, Some(owner.0), Some(owner.1)).map_err(io(
            "setup",
            "cannot change the owner of",
            path,
        ))?;
    }
    if m.file_type().is_symlink() {
        return Ok(());
    }
    let mode = if m.is_dir() || m.mode() & 0o111 != 0 {
        0o755
    } else {
        0o644
    };
    if m.mode() & 0o7777 != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io(
            "setup",
            "cannot change the mode of",
            path,
        ))?;
    }
    Ok(())
}

/// The steps of [`setup`] into `data` (lock, rootfs trees), `runtime` and `cache`, which exist.
fn setup_in(
    opts: &SetupOptions,
    progress: &dyn Fn(&str),
    started: Instant,
    data: PathBuf,
    runtime: PathBuf,
    cache: PathBuf,
) -> Result<SetupReport, SetupError> {
    let phases = Phases::new(progress);
    let progress = &|what: &str| phases.start(what);
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
        phases: &phases,
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
    phases.end();

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
        uses_system_runtime: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirs::{RuntimeLocation, RuntimeSource, SystemDir};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    fn write(p: &Path, m: u32) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"x").unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }

    fn chmod(p: &Path, m: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }

    /// `setup --system`'s last step on a small tree: everything root's (the caller's here when
    /// not root), directories 0755, executables 0755, other files 0644, links left alone, the
    /// insides of a rootfs tree untouched.
    #[test]
    fn publish_makes_the_system_dir_readable_by_all() {
        let tmp = tempfile::tempdir().unwrap();
        let sys = tmp.path().join("sys");
        let rt = sys.join("runtime/v1");
        write(&sys.join("setup.lock"), 0o600);
        write(&rt.join("provenance.json"), 0o600);
        write(&rt.join("bin/gvproxy"), 0o700);
        write(&rt.join("bin/virtiofsd"), 0o4775);
        write(&rt.join("lib/libkrunfw.so.5.5.0"), 0o664);
        std::os::unix::fs::symlink("libkrunfw.so.5.5.0", rt.join("lib/libkrunfw.so.5")).unwrap();
        write(&rt.join("kernel/lib/modules/6.0/modules.dep"), 0o600);
        let tree = sys.join("rootfs/0123456789ab");
        write(&tree.join("etc/shadow"), 0o640);
        std::fs::create_dir_all(tree.join("tmp")).unwrap();
        chmod(&tree.join("tmp"), 0o1777);
        write(&sys.join("rootfs/0123456789ab.erofs"), 0o600);
        for d in [
            sys.clone(),
            sys.join("runtime"),
            rt.clone(),
            rt.join("bin"),
            rt.join("kernel/lib/modules"),
            sys.join("rootfs"),
            tree.clone(),
        ] {
            chmod(&d, 0o700);
        }
        chmod(&rt.join("lib"), 0o777);
        let root = nix::unistd::geteuid().is_root();
        if root {
            std::os::unix::fs::lchown(rt.join("bin/gvproxy"), Some(4242), Some(4242)).unwrap();
            std::os::unix::fs::lchown(rt.join("lib/libkrunfw.so.5"), Some(4242), None).unwrap();
        }
        let owner = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        publish_system(&sys, owner).unwrap();

        for (p, m) in [
            (sys.clone(), 0o755),
            (sys.join("setup.lock"), 0o644),
            (sys.join("runtime"), 0o755),
            (rt.clone(), 0o755),
            (rt.join("provenance.json"), 0o644),
            (rt.join("bin"), 0o755),
            (rt.join("bin/gvproxy"), 0o755),
            (rt.join("bin/virtiofsd"), 0o755),
            (rt.join("lib"), 0o755),
            (rt.join("lib/libkrunfw.so.5.5.0"), 0o644),
            (rt.join("kernel/lib/modules"), 0o755),
            (rt.join("kernel/lib/modules/6.0"), 0o755),
            (rt.join("kernel/lib/modules/6.0/modules.dep"), 0o644),
            (sys.join("rootfs"), 0o755),
            (tree.clone(), 0o755),
            (sys.join("rootfs/0123456789ab.erofs"), 0o644),
            // The guest's own modes inside the tree stay.
            (tree.join("etc/shadow"), 0o640),
            (tree.join("tmp"), 0o1777),
        ] {
            assert_eq!(mode(&p), m, "{}", p.display());
            let md = std::fs::symlink_metadata(&p).unwrap();
            assert_eq!((md.uid(), md.gid()), owner, "{}", p.display());
        }
        let link = std::fs::symlink_metadata(rt.join("lib/libkrunfw.so.5")).unwrap();
        assert!(link.file_type().is_symlink());
        assert_eq!(link.uid(), owner.0);
        if !root {
            gatevm_testkit::skip_part(
                "publish_makes_the_system_dir_readable_by_all",
                "files of another user become root's",
                "giving a file to another user needs root",
            );
        }
        // What it leaves is what resolution trusts.
        let s = SystemDir {
            path: sys.clone(),
            owners: vec![0, owner.0],
        };
        crate::dirs::check_trusted(&rt.join("bin/gvproxy"), &s.owners).unwrap();
        crate::dirs::check_trusted(&s.rootfs_root(), &s.owners).unwrap();
    }

    /// A complete bundle (host QEMU, passt) in `rt` with its base rootfs built under `rootfs`.
    fn fake_bundle(tmp: &Path, rt: &Path, rootfs: &Path) {
        let rel = "6.0.0-test";
        for f in [
            "kernel/vmlinux".to_string(),
            format!("kernel/lib/modules/{rel}/modules.dep"),
            "bin/gvproxy".into(),
            "bin/virtiofsd".into(),
            "bin/passt".into(),
            "lib/libkrunfw.so.5".into(),
        ] {
            write(&rt.join(f), 0o755);
        }
        let host_qemu = tmp.join("host/usr/bin/qemu-system-x86_64");
        write(&host_qemu, 0o755);
        let mut p = Provenance {
            kernel_release: Some(rel.into()),
            ..Default::default()
        };
        for name in ["kernel", "gvproxy", "libkrunfw", "virtiofsd", "qemu"] {
            p.set_component(Component {
                name: name.into(),
                version: "1".into(),
                origin: "test".into(),
                installed_unix: 0,
                files: if name == "qemu" {
                    crate::provenance::records_for(rt, std::slice::from_ref(&host_qemu)).unwrap()
                } else {
                    vec![]
                },
            });
        }
        p.save(rt).unwrap();
        let recipe = crate::RootfsRecipe::for_kernel(rel);
        write(
            &rootfs
                .join(recipe.id())
                .join(crate::component::rootfs::RECIPE_FILE),
            0o644,
        );
        write(&crate::rootfs::image_path(rootfs, &recipe), 0o644);
    }

    /// An ordinary user's `gatevm setup` without a runtime of their own: the system runtime
    /// when complete and current, else a one-line error naming `sudo gatevm setup --system`.
    #[test]
    fn ordinary_user_setup_uses_or_asks_for_the_system_runtime() {
        let tmp = tempfile::tempdir().unwrap();
        let sys = SystemDir {
            path: tmp.path().join("sys"),
            owners: vec![0],
        };
        let at = |source| RuntimeLocation {
            runtime: if source == RuntimeSource::System {
                sys.runtime()
            } else {
                tmp.path().join("own/runtime/v1")
            },
            rootfs_root: if source == RuntimeSource::System {
                sys.rootfs_root()
            } else {
                tmp.path().join("own/rootfs")
            },
            source,
            system: Some(sys.clone()),
        };
        // Own or GATEVM_RUNTIME_DIR: set up as today.
        assert!(system_runtime_for_user(&at(RuntimeSource::Own))
            .unwrap()
            .is_none());
        assert!(system_runtime_for_user(&at(RuntimeSource::Env))
            .unwrap()
            .is_none());
        // Nothing anywhere.
        let e = system_runtime_for_user(&at(RuntimeSource::NotSetUp)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "no system runtime in {}: as an ordinary user, setup cannot install host \
                 packages or build the base rootfs; run `sudo gatevm setup --system` once",
                sys.runtime().display()
            )
        );
        // There but incomplete.
        std::fs::create_dir_all(sys.runtime()).unwrap();
        let e = system_runtime_for_user(&at(RuntimeSource::System)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "the system runtime in {} is not current ({} not found): run `sudo gatevm setup --system`",
                sys.runtime().display(),
                sys.runtime().join("provenance.json").display()
            )
        );
        // Complete and current: used.
        fake_bundle(tmp.path(), &sys.runtime(), &sys.rootfs_root());
        let rt = system_runtime_for_user(&at(RuntimeSource::System))
            .unwrap()
            .unwrap();
        assert_eq!(rt.dir(), sys.runtime());
        assert_eq!(rt.kernel_release(), "6.0.0-test");
        // Without passt (set up by an older gatevm): not current.
        std::fs::remove_file(sys.runtime().join("bin/passt")).unwrap();
        let e = system_runtime_for_user(&at(RuntimeSource::System)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "the system runtime in {} is not current ({} is missing): run `sudo gatevm setup --system`",
                sys.runtime().display(),
                sys.runtime().join("bin/passt").display()
            )
        );
        write(&sys.runtime().join("bin/passt"), 0o755);
        // The base rootfs's image missing (a runtime set up before the root became a disk).
        let img = crate::rootfs::image_path(
            &sys.rootfs_root(),
            &crate::RootfsRecipe::for_kernel("6.0.0-test"),
        );
        std::fs::remove_file(&img).unwrap();
        let e = system_runtime_for_user(&at(RuntimeSource::System)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "the system runtime in {} is not current (the base rootfs for kernel 6.0.0-test is not built: {} not found): run `sudo gatevm setup --system`",
                sys.runtime().display(),
                img.display()
            )
        );
        // The base rootfs of the current recipe missing.
        std::fs::remove_dir_all(sys.rootfs_root()).unwrap();
        let e = system_runtime_for_user(&at(RuntimeSource::System)).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("is not current (the base rootfs for kernel 6.0.0-test is not built: "),
            "{m}"
        );
        assert!(
            m.ends_with("not found): run `sudo gatevm setup --system`"),
            "{m}"
        );
    }

    /// `setup --system` by anyone but root: refused in one line, before touching anything.
    #[test]
    fn setup_system_refuses_non_root() {
        if nix::unistd::geteuid().is_root() {
            gatevm_testkit::skip(
                "setup_system_refuses_non_root",
                "runs as root here; the CLI test `setup_system_as_user_is_refused` covers it as user gvtest",
            );
            return;
        }
        let e = setup_system(&SetupOptions::default(), &|_| {}).unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, SetupError::SystemNeedsRoot { .. }), "{m}");
        assert!(
            m.ends_with("run it as root: `sudo gatevm setup --system`"),
            "{m}"
        );
        assert!(!m.contains('\n'));
    }
}
