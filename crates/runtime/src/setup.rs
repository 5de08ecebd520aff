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
//! bin/passt                             built from Debian trixie's source package (crate::passt)
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
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

use crate::apt::{self, AptError, IndexKind, PackageEntry, PrivateApt};
use crate::cmd::{self, CommandError};
use crate::dirs::{self, DirsError};
use crate::host::{self, HostError};
use crate::initramfs::{self, InitramfsError};
use crate::kernel::{self, KernelError, KernelInfo};
use crate::passt::{self, PasstError, PASST_SOURCE_PACKAGE, PASST_SOURCE_SUITE};
use crate::provenance::{self, component, Component, Provenance, ProvenanceError, RootfsRecord};
use crate::qemu::{self, HostQemu, QemuError, QemuPlan, QemuVersion, RecordedQemu};
use crate::rootfs::{self, RootfsError, RootfsRecipe};
use crate::util;
use crate::virtiofsd::{self, VirtiofsdError, VIRTIOFSD_VERSION};

/// Debian suite the kernel and gvproxy come from.
pub const KERNEL_SUITE: &str = "trixie";
/// The kernel metapackage whose dependency names the real kernel package.
pub const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";
/// Debian suite libkrunfw comes from.
pub const LIBKRUNFW_SUITE: &str = "sid";
/// The libkrunfw package.
pub const LIBKRUNFW_PACKAGE: &str = "libkrunfw5";
/// The gvproxy package.
pub const GVPROXY_PACKAGE: &str = "gvproxy";

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
    #[error("{0}")]
    Dirs(#[from] DirsError),
    /// The setup lock could not be taken.
    #[error("cannot lock {}: {source}", path.display())]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Host packages are missing or could not be installed.
    #[error("host packages: {0}")]
    Host(#[from] HostError),
    /// Fetching a Debian package failed.
    #[error("{component}: {source}")]
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
    #[error("{component}: {action} {}: {source}", path.display())]
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
    #[error("{component}: {source}")]
    Command {
        /// The component.
        component: &'static str,
        /// The underlying error.
        #[source]
        source: CommandError,
    },
    /// Extracting the ELF kernel failed.
    #[error("kernel: {0}")]
    Kernel(#[from] KernelError),
    /// Building virtiofsd failed.
    #[error("virtiofsd: {0}")]
    Virtiofsd(#[from] VirtiofsdError),
    /// Building passt from its Debian source package failed.
    #[error("passt: {0}")]
    Passt(#[from] PasstError),
    /// Building the rootfs failed.
    #[error("rootfs: {0}")]
    Rootfs(#[from] RootfsError),
    /// Building the initramfs failed.
    #[error("initramfs: {0}")]
    Initramfs(#[from] InitramfsError),
    /// Reading or writing the provenance manifest failed.
    #[error("{0}")]
    Provenance(#[from] ProvenanceError),
    /// No QEMU that runs the guests reliably, or the fetched one does not work.
    #[error("qemu: {0}")]
    Qemu(#[from] QemuError),
}

/// Puts the tree `staging` in place of `final_dir` (the previous tree moved to `old` first and
/// removed after), each rename made durable.
fn swap_in(
    component: &'static str,
    staging: &Path,
    final_dir: &Path,
    old: &Path,
) -> Result<(), SetupError> {
    if old.exists() {
        std::fs::remove_dir_all(old).map_err(io(component, "cannot remove", old))?;
    }
    if final_dir.exists() {
        crate::fsutil::rename_durable(final_dir, old).map_err(io(
            component,
            "cannot move aside",
            final_dir,
        ))?;
    }
    crate::fsutil::rename_durable(staging, final_dir).map_err(io(
        component,
        "cannot install",
        final_dir,
    ))?;
    let _ = std::fs::remove_dir_all(old);
    Ok(())
}

fn io(
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

/// Paths of one setup run.
struct Ctx<'a> {
    runtime: PathBuf,
    cache: PathBuf,
    data: PathBuf,
    log: PathBuf,
    progress: &'a dyn Fn(&str),
    apt: Option<PrivateApt>,
    /// The private apt configuration for the host release's backports suite (kept apart from
    /// `apt`, so that a missing or failing backports suite cannot break the other lookups).
    backports_apt: Option<PrivateApt>,
    /// The private apt configuration with trixie's source index (for passt).
    source_apt: Option<PrivateApt>,
    steps: Vec<SetupStep>,
}

impl Ctx<'_> {
    /// Records a component acquired now (or replaced, when it `had` been there) in the
    /// provenance manifest, saves the manifest and reports the step.
    fn record(
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

    fn step(&mut self, component: &str, action: SetupAction, detail: String, started: Instant) {
        tracing::info!(component, ?action, %detail, "setup step");
        self.steps.push(SetupStep {
            component: component.to_string(),
            action,
            detail,
            elapsed_ms: started.elapsed().as_millis() as u64,
        });
    }

    /// The private apt configuration, created and updated on first use.
    fn apt(&mut self) -> Result<&PrivateApt, SetupError> {
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
    fn backports_apt(&mut self, suite: &str) -> Result<&PrivateApt, AptError> {
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
    fn source_apt(&mut self) -> Result<&PrivateApt, AptError> {
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

    fn work_dir(&self, component: &'static str) -> Result<tempfile::TempDir, SetupError> {
        let base = self.cache.join("work");
        std::fs::create_dir_all(&base).map_err(io(component, "cannot create", &base))?;
        tempfile::Builder::new()
            .prefix(&format!("{component}-"))
            .tempdir_in(&base)
            .map_err(io(component, "cannot create a work directory in", &base))
    }

    /// Downloads and unpacks a package; returns the unpack dir and the work dir guard.
    fn fetch(
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

    step_host(&mut ctx, opts)?;
    let kernel = step_kernel(&mut ctx, opts, &mut prov)?;
    // After the kernel: a fetched QEMU is checked by booting it.
    step_qemu(&mut ctx, opts, &kernel, &mut prov)?;
    step_gvproxy(&mut ctx, opts, &mut prov)?;
    step_libkrunfw(&mut ctx, opts, &mut prov)?;
    step_virtiofsd(&mut ctx, &mut prov)?;
    step_passt(&mut ctx, opts, &mut prov)?;
    if ctx.apt.is_none() && ctx.backports_apt.is_none() && ctx.source_apt.is_none() {
        ctx.step(
            "apt",
            SetupAction::AlreadyPresent,
            "not needed: every Debian package is installed".into(),
            Instant::now(),
        );
    }
    let (rootfs, old_rootfs) = step_rootfs(&mut ctx, opts, &kernel, &mut prov)?;
    if prov != loaded {
        prov.save(&runtime)?;
    }
    let initramfs = step_initramfs(&mut ctx, opts, &kernel)?;

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

fn step_host(ctx: &mut Ctx<'_>, opts: &SetupOptions) -> Result<(), SetupError> {
    let started = Instant::now();
    (ctx.progress)("checking host packages");
    let missing = host::check_host();
    if missing.is_empty() {
        ctx.step(
            "host-packages",
            SetupAction::AlreadyPresent,
            format!("{} present", host::required_packages().join(", ")),
            started,
        );
        return Ok(());
    }
    if !opts.install_host_packages {
        return Err(HostError::Missing { missing }.into());
    }
    let installed = host::ensure_host_packages(&ctx.log, ctx.progress)?;
    ctx.step(
        "host-packages",
        SetupAction::Installed,
        format!("apt-get install {}", installed.join(" ")),
        started,
    );
    Ok(())
}

/// Whether component `name` is recorded with at least one file and all its files exist.
fn present(prov: &Provenance, runtime: &Path, name: &str) -> bool {
    matches!(prov.missing_files(runtime, name), Some(m) if m.is_empty())
        && prov.component(name).is_some_and(|c| !c.files.is_empty())
}

fn kernel_info(runtime: &Path, release: &str) -> KernelInfo {
    KernelInfo {
        release: release.to_string(),
        vmlinux: runtime.join("kernel/vmlinux"),
        modules_dir: runtime.join("kernel/lib/modules").join(release),
    }
}

fn step_kernel(
    ctx: &mut Ctx<'_>,
    opts: &SetupOptions,
    prov: &mut Provenance,
) -> Result<KernelInfo, SetupError> {
    const C: &str = component::KERNEL;
    let started = Instant::now();
    (ctx.progress)("checking the guest kernel");
    let had = prov.component(C).is_some();
    let complete = present(prov, &ctx.runtime, C);
    let recorded_release = prov.kernel_release.clone();
    if complete && !opts.refresh {
        if let (Some(rel), Some(c)) = (recorded_release.as_deref(), prov.component(C)) {
            ctx.step(
                C,
                SetupAction::AlreadyPresent,
                format!("{rel} ({})", c.origin),
                started,
            );
            return Ok(kernel_info(&ctx.runtime, rel));
        }
    }

    let wrap = |source| SetupError::Apt {
        component: C,
        source,
    };
    let meta = ctx
        .apt()?
        .show(KERNEL_METAPACKAGE, KERNEL_SUITE)
        .map_err(wrap)?;
    let real = meta
        .depends
        .iter()
        .find(|d| d.starts_with("linux-image-") && *d != &meta.package)
        .cloned()
        .ok_or_else(|| SetupError::Package {
            component: C,
            problem: format!(
                "{KERNEL_METAPACKAGE} {} in Debian {KERNEL_SUITE} depends on no linux-image package (depends: {})",
                meta.version,
                meta.depends.join(", ")
            ),
        })?;
    let entry = ctx.apt()?.show(&real, KERNEL_SUITE).map_err(wrap)?;
    if complete && recorded_release.is_some() {
        if let Some(c) = prov.component(C) {
            if c.version == entry.version && c.origin.contains(&real) {
                let rel = recorded_release.unwrap_or_default();
                ctx.step(
                    C,
                    SetupAction::AlreadyPresent,
                    format!("{rel} ({}; up to date)", c.origin),
                    started,
                );
                return Ok(kernel_info(&ctx.runtime, &rel));
            }
        }
    }

    let (x, _work) = ctx.fetch(C, &entry, KERNEL_SUITE)?;
    let boot = x.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .map_err(io(C, "cannot read", &boot))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("vmlinuz-"))
        .ok_or_else(|| SetupError::Package {
            component: C,
            problem: format!("package {real} {} has no boot/vmlinuz-*", entry.version),
        })?;
    let release = vmlinuz.trim_start_matches("vmlinuz-").to_string();
    let modules_src = ["usr/lib/modules", "lib/modules"]
        .iter()
        .map(|d| x.join(d).join(&release))
        .find(|p| p.is_dir())
        .ok_or_else(|| SetupError::Package {
            component: C,
            problem: format!(
                "package {real} {} has no module tree for {release} (usr/lib/modules or lib/modules)",
                entry.version
            ),
        })?;

    (ctx.progress)(&format!("extracting vmlinux from vmlinuz-{release}"));
    let staging = ctx.runtime.join(".kernel-new");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io(C, "cannot remove", &staging))?;
    }
    std::fs::create_dir_all(&staging).map_err(io(C, "cannot create", &staging))?;
    let vmlinuz_dest = staging.join(&vmlinuz);
    util::copy_atomic(&boot.join(&vmlinuz), &vmlinuz_dest, 0o644).map_err(io(
        C,
        "cannot copy the kernel to",
        &vmlinuz_dest,
    ))?;
    let config = format!("config-{release}");
    if boot.join(&config).is_file() {
        util::copy_atomic(&boot.join(&config), &staging.join(&config), 0o644).map_err(io(
            C,
            "cannot copy the kernel config to",
            &staging,
        ))?;
    }
    let vmlinux_size = kernel::write_vmlinux(&vmlinuz_dest, &staging.join("vmlinux"))?;
    let modules_dest = staging.join("lib/modules").join(&release);
    std::fs::create_dir_all(staging.join("lib/modules")).map_err(io(
        C,
        "cannot create",
        &staging,
    ))?;
    util::copy_tree(&modules_src, &modules_dest).map_err(io(
        C,
        "cannot copy the module tree to",
        &modules_dest,
    ))?;
    (ctx.progress)(&format!("running depmod for {release}"));
    let depmod = cmd::find_program("depmod").unwrap_or_else(|| PathBuf::from("depmod"));
    let mut c = std::process::Command::new(depmod);
    c.arg("-b").arg(&staging).arg(&release);
    cmd::run_logged(&mut c, &ctx.log).map_err(|source| SetupError::Command {
        component: C,
        source,
    })?;
    if !modules_dest.join("modules.dep").is_file() {
        return Err(SetupError::Package {
            component: C,
            problem: format!(
                "depmod produced no modules.dep in {}",
                modules_dest.display()
            ),
        });
    }

    // Swap the new tree in.
    let final_dir = ctx.runtime.join("kernel");
    swap_in(C, &staging, &final_dir, &ctx.runtime.join(".kernel-old"))?;

    let rels: Vec<PathBuf> = util::list_files(&final_dir)
        .map_err(io(C, "cannot list", &final_dir))?
        .into_iter()
        .map(|p| PathBuf::from("kernel").join(p))
        .collect();
    let files = provenance::records_for(&ctx.runtime, &rels)?;
    let nfiles = files.len();
    let origin = format!(
        "debian {KERNEL_SUITE} package {real} {} (via {KERNEL_METAPACKAGE} {})",
        entry.version, meta.version
    );
    prov.kernel_release = Some(release.clone());
    ctx.record(
        prov,
        Component {
            name: C.into(),
            version: entry.version.clone(),
            origin: origin.clone(),
            installed_unix: util::now_unix(),
            files,
        },
        had,
        format!(
            "{release} from {origin}; vmlinux {} MiB; {nfiles} files incl. modules",
            vmlinux_size >> 20
        ),
        started,
    )?;
    Ok(kernel_info(&ctx.runtime, &release))
}

/// Finds the first regular file named `name` below `root`, preferring `preferred` paths.
fn find_file(root: &Path, preferred: &[&str], name: &str) -> Option<PathBuf> {
    for p in preferred {
        let c = root.join(p);
        if std::fs::symlink_metadata(&c).is_ok_and(|m| m.is_file()) {
            return Some(c);
        }
    }
    util::list_files(root)
        .ok()?
        .into_iter()
        .map(|rel| root.join(rel))
        .find(|p| {
            p.file_name().is_some_and(|n| n == name)
                && std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file())
        })
}

/// Common start of the "single Debian package" components: `Ok(None)` when the component is
/// present (and, with `refresh`, at the suite's current version) and the step is recorded;
/// otherwise `Some((had_before, entry to install))`.
fn apt_component_current(
    ctx: &mut Ctx<'_>,
    opts: &SetupOptions,
    prov: &Provenance,
    name: &'static str,
    package: &str,
    suite: &str,
    started: Instant,
) -> Result<Option<(bool, PackageEntry)>, SetupError> {
    let had = prov.component(name).is_some();
    let recorded = prov
        .component(name)
        .filter(|_| present(prov, &ctx.runtime, name));
    if let (Some(c), false) = (recorded, opts.refresh) {
        let detail = format!("{} ({})", c.version, c.origin);
        ctx.step(name, SetupAction::AlreadyPresent, detail, started);
        return Ok(None);
    }
    let entry = ctx
        .apt()?
        .show(package, suite)
        .map_err(|source| SetupError::Apt {
            component: name,
            source,
        })?;
    if let Some(c) = recorded.filter(|c| c.version == entry.version) {
        let detail = format!("{} ({}; up to date)", c.version, c.origin);
        ctx.step(name, SetupAction::AlreadyPresent, detail, started);
        return Ok(None);
    }
    Ok(Some((had, entry)))
}

fn step_gvproxy(
    ctx: &mut Ctx<'_>,
    opts: &SetupOptions,
    prov: &mut Provenance,
) -> Result<(), SetupError> {
    const C: &str = component::GVPROXY;
    let started = Instant::now();
    (ctx.progress)("checking gvproxy");
    let Some((had, entry)) =
        apt_component_current(ctx, opts, prov, C, GVPROXY_PACKAGE, KERNEL_SUITE, started)?
    else {
        return Ok(());
    };
    let (x, _work) = ctx.fetch(C, &entry, KERNEL_SUITE)?;
    let src = find_file(
        &x,
        &[
            "usr/libexec/podman/gvproxy",
            "usr/bin/gvproxy",
            "usr/lib/podman/gvproxy",
        ],
        "gvproxy",
    )
    .ok_or_else(|| SetupError::Package {
        component: C,
        problem: format!(
            "package gvproxy {} contains no gvproxy binary",
            entry.version
        ),
    })?;
    let dest = ctx.runtime.join("bin/gvproxy");
    util::copy_atomic(&src, &dest, 0o755).map_err(io(C, "cannot install", &dest))?;
    let out =
        cmd::run_captured(std::process::Command::new(&dest).arg("-version")).map_err(|source| {
            SetupError::Command {
                component: C,
                source,
            }
        })?;
    let reported = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let origin = format!(
        "debian {KERNEL_SUITE} package gvproxy {} ({})",
        entry.version,
        src.strip_prefix(&x).unwrap_or(&src).display()
    );
    let files = provenance::records_for(&ctx.runtime, &[PathBuf::from("bin/gvproxy")])?;
    ctx.record(
        prov,
        Component {
            name: C.into(),
            version: entry.version.clone(),
            origin: origin.clone(),
            installed_unix: util::now_unix(),
            files,
        },
        had,
        format!("{} from {origin}; runs: {reported}", dest.display()),
        started,
    )?;
    Ok(())
}

fn step_libkrunfw(
    ctx: &mut Ctx<'_>,
    opts: &SetupOptions,
    prov: &mut Provenance,
) -> Result<(), SetupError> {
    const C: &str = component::LIBKRUNFW;
    let started = Instant::now();
    (ctx.progress)("checking libkrunfw");
    let Some((had, entry)) = apt_component_current(
        ctx,
        opts,
        prov,
        C,
        LIBKRUNFW_PACKAGE,
        LIBKRUNFW_SUITE,
        started,
    )?
    else {
        return Ok(());
    };
    let (x, _work) = ctx.fetch(C, &entry, LIBKRUNFW_SUITE)?;
    let files = util::list_files(&x).map_err(io(C, "cannot list", &x))?;
    let real = files
        .iter()
        .map(|rel| x.join(rel))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libkrunfw.so.5"))
                && std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file())
        })
        .ok_or_else(|| SetupError::Package {
            component: C,
            problem: format!(
                "package {LIBKRUNFW_PACKAGE} {} contains no libkrunfw.so.5* file",
                entry.version
            ),
        })?;
    let real_name = real
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let lib = ctx.runtime.join("lib");
    std::fs::create_dir_all(&lib).map_err(io(C, "cannot create", &lib))?;
    let dest = lib.join(&real_name);
    util::copy_atomic(&real, &dest, 0o644).map_err(io(C, "cannot install", &dest))?;
    let link = lib.join("libkrunfw.so.5");
    if link != dest {
        let tmp_link = lib.join(".libkrunfw.so.5.tmp");
        let _ = std::fs::remove_file(&tmp_link);
        std::os::unix::fs::symlink(&real_name, &tmp_link).map_err(io(
            C,
            "cannot create symlink",
            &tmp_link,
        ))?;
        crate::fsutil::rename_durable(&tmp_link, &link).map_err(io(C, "cannot install", &link))?;
    }
    // Remove other versions' files.
    if let Ok(rd) = std::fs::read_dir(&lib) {
        for e in rd.filter_map(|e| e.ok()) {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("libkrunfw.so.5.") && n != real_name {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let mut rels = vec![PathBuf::from("lib").join(&real_name)];
    if link != dest {
        rels.push(PathBuf::from("lib/libkrunfw.so.5"));
    }
    let size = std::fs::metadata(&dest).map(|m| m.len()).unwrap_or(0);
    let records = provenance::records_for(&ctx.runtime, &rels)?;
    let origin = format!(
        "debian {LIBKRUNFW_SUITE} package {LIBKRUNFW_PACKAGE} {}",
        entry.version
    );
    ctx.record(
        prov,
        Component {
            name: C.into(),
            version: entry.version.clone(),
            origin: origin.clone(),
            installed_unix: util::now_unix(),
            files: records,
        },
        had,
        format!("{} ({} MiB) from {origin}", dest.display(), size >> 20),
        started,
    )?;
    Ok(())
}

fn step_virtiofsd(ctx: &mut Ctx<'_>, prov: &mut Provenance) -> Result<(), SetupError> {
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
    let bin = virtiofsd::build_virtiofsd(&build_dir, &ctx.log, ctx.progress)?;
    let dest = ctx.runtime.join("bin/virtiofsd");
    util::copy_atomic(&bin, &dest, 0o755).map_err(io(C, "cannot install", &dest))?;
    let files = provenance::records_for(&ctx.runtime, &[PathBuf::from("bin/virtiofsd")])?;
    let origin = format!("crates-io virtiofsd {VIRTIOFSD_VERSION} (cargo install --locked)");
    ctx.record(
        prov,
        Component {
            name: C.into(),
            version: VIRTIOFSD_VERSION.into(),
            origin: origin.clone(),
            installed_unix: util::now_unix(),
            files,
        },
        had,
        format!("{} from {origin}", dest.display()),
        started,
    )?;
    Ok(())
}

/// The `passt` step: passt built from [`PASST_SOURCE_SUITE`]'s source package (see
/// [`crate::passt`]). Left alone, without network access, when it is recorded and its binary is
/// there; with `refresh`, rebuilt when the suite has another version.
fn step_passt(
    ctx: &mut Ctx<'_>,
    opts: &SetupOptions,
    prov: &mut Provenance,
) -> Result<(), SetupError> {
    const C: &str = component::PASST;
    let started = Instant::now();
    (ctx.progress)("checking passt");
    let wrap = |source| SetupError::Apt {
        component: C,
        source,
    };
    let had = prov.component(C).is_some();
    let recorded = prov
        .component(C)
        .filter(|_| present(prov, &ctx.runtime, C))
        .cloned();
    if let (Some(c), false) = (&recorded, opts.refresh) {
        let detail = format!("{} ({})", c.version, c.origin);
        ctx.step(C, SetupAction::AlreadyPresent, detail, started);
        return Ok(());
    }
    let entry = ctx
        .source_apt()
        .and_then(|a| a.showsrc(PASST_SOURCE_PACKAGE))
        .map_err(wrap)?;
    if let Some(c) = recorded.filter(|c| c.version == entry.version) {
        let detail = format!("{} ({}; up to date)", c.version, c.origin);
        ctx.step(C, SetupAction::AlreadyPresent, detail, started);
        return Ok(());
    }

    let work = ctx.work_dir(C)?;
    (ctx.progress)(&format!(
        "downloading source package {PASST_SOURCE_PACKAGE} {} (Debian {PASST_SOURCE_SUITE})",
        entry.version
    ));
    let log = ctx.log.clone();
    let files = ctx
        .source_apt()
        .and_then(|a| a.download_source(&entry, &work.path().join("dl"), &log))
        .map_err(wrap)?;
    let bin = passt::build_passt(
        &work.path().join("build"),
        &files,
        &entry.version,
        &log,
        ctx.progress,
    )?;
    let dest = ctx.runtime.join(passt::PASST_BIN);
    util::copy_atomic(&bin, &dest, 0o755).map_err(io(C, "cannot install", &dest))?;
    let files = provenance::records_for(&ctx.runtime, &[PathBuf::from(passt::PASST_BIN)])?;
    let origin = format!(
        "Debian {PASST_SOURCE_SUITE} source package {PASST_SOURCE_PACKAGE} {} (built with make)",
        entry.version
    );
    ctx.record(
        prov,
        Component {
            name: C.into(),
            version: entry.version.clone(),
            origin: origin.clone(),
            installed_unix: util::now_unix(),
            files,
        },
        had,
        format!("{} from {origin}", dest.display()),
        started,
    )?;
    Ok(())
}

/// Why Debian's QEMU backport could not be used.
enum BackportFailure {
    /// Not to be had: no such suite or package, apt or network failures, too old a version.
    /// Falls back to the host's QEMU when hardware KVM works, else [`QemuError::HostTooOld`].
    Unavailable(String),
    /// Fetched, but it does not work here (missing libraries, a broken package). Reported as is,
    /// unless hardware KVM makes the host's QEMU fine.
    Broken(SetupError),
}

/// The `qemu` step: the host's QEMU when it is 8 or newer, else Debian's backport for the host's
/// release in `runtime/qemu/`, else the host's old QEMU where hardware KVM works (see
/// [`crate::qemu`]).
fn step_qemu(
    ctx: &mut Ctx<'_>,
    opts: &SetupOptions,
    kernel: &KernelInfo,
    prov: &mut Provenance,
) -> Result<(), SetupError> {
    const C: &str = component::QEMU;
    let started = Instant::now();
    (ctx.progress)("checking QEMU");
    let host = qemu::probe_host_qemu();
    let codename = qemu::host_codename();
    let recorded = prov.component(C).and_then(qemu::recorded_binary);
    let complete = present(prov, &ctx.runtime, C);
    // A bundle from an earlier layout (without a file now required) is installed again.
    let bundle_complete = complete
        && recorded == Some(RecordedQemu::Bundled)
        && qemu::BUNDLED_REQUIRED
            .iter()
            .all(|f| ctx.runtime.join(f).exists());

    let problem = match (
        qemu::plan(host.as_ref().map(|h| h.version), codename.as_deref()),
        &host,
    ) {
        (QemuPlan::UseHost, Some(h)) => return use_host_qemu(ctx, prov, h, None, started),
        (QemuPlan::UseHost, None) => format!("no usable {}", qemu::QEMU_PROGRAM),
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
            if let (Some(RecordedQemu::Host(path)), Some(h), false) =
                (&recorded, &host, opts.refresh)
            {
                let same = complete
                    && *path == h.path
                    && prov
                        .component(C)
                        .is_some_and(|c| c.version == h.version_string());
                if same && qemu::hardware_kvm().is_ok() {
                    let detail = format!(
                        "QEMU {} at {} (older than {}, accepted because hardware KVM works)",
                        h.version,
                        h.path.display(),
                        qemu::MIN_TCG_SAFE_MAJOR
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
                    if host.is_none() || qemu::hardware_kvm().is_err() {
                        return Err(e);
                    }
                    format!("{suite}: {e}")
                }
            }
        }
    };
    let (h, note) = qemu::accept_old_host(
        host.as_ref(),
        qemu::hardware_kvm(),
        codename.as_deref(),
        &problem,
    )?;
    use_host_qemu(ctx, prov, h, Some(note), started)
}

/// The report line of a bundled QEMU that is left as it is.
fn bundle_detail(runtime: &Path, c: &Component, suffix: &str) -> String {
    let version = QemuVersion::from_debian_version(&c.version)
        .map(|v| v.to_string())
        .unwrap_or_else(|| c.version.clone());
    format!(
        "QEMU {version} in {} ({}{suffix})",
        runtime.join(qemu::BUNDLE_DIR).display(),
        c.origin
    )
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
    let origin = format!("host package {} {version}", qemu::QEMU_HOST_PACKAGE);
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
    prov.set_component(Component {
        name: C.into(),
        version,
        origin,
        installed_unix: util::now_unix(),
        files,
    });
    prov.save(&ctx.runtime)?;
    let bundle = ctx.runtime.join(qemu::BUNDLE_DIR);
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

/// Fetches QEMU from Debian's `suite` (a `-backports` suite) into `runtime/qemu/`: the packages
/// of [`qemu::BACKPORT_PACKAGES`], unpacked, trimmed to the binary and the x86 firmware, checked
/// (`--version`, a boot of the guest kernel), swapped in and recorded.
fn install_backport(
    ctx: &mut Ctx<'_>,
    prov: &mut Provenance,
    kernel: &KernelInfo,
    suite: &str,
    bundle_complete: bool,
    started: Instant,
) -> Result<(), BackportFailure> {
    const C: &str = component::QEMU;
    let unavailable = |e: AptError| BackportFailure::Unavailable(e.to_string());
    let broken = |e: SetupError| BackportFailure::Broken(e);
    let mut entries: Vec<PackageEntry> = Vec::new();
    for pkg in qemu::BACKPORT_PACKAGES {
        let apt = ctx.backports_apt(suite).map_err(unavailable)?;
        entries.push(apt.show(pkg, suite).map_err(unavailable)?);
    }
    let (Some(main), Some(seabios)) = (entries.first(), entries.last()) else {
        return Err(BackportFailure::Unavailable("no packages".into()));
    };
    let upstream = QemuVersion::from_debian_version(&main.version).ok_or_else(|| {
        BackportFailure::Unavailable(format!(
            "cannot read a QEMU version in {} {}",
            main.package, main.version
        ))
    })?;
    if !upstream.tcg_safe() {
        return Err(BackportFailure::Unavailable(format!(
            "it has QEMU {upstream} ({} {}), older than {} too",
            main.package,
            main.version,
            qemu::MIN_TCG_SAFE_MAJOR
        )));
    }
    let origin = format!(
        "debian {suite} packages {} {}, {}, {}, {} {}",
        main.package,
        main.version,
        qemu::BACKPORT_PACKAGES[1],
        qemu::BACKPORT_PACKAGES[2],
        seabios.package,
        seabios.version
    );
    if bundle_complete {
        if let Some(c) = prov
            .component(C)
            .filter(|c| c.version == main.version && c.origin == origin)
        {
            let detail = bundle_detail(&ctx.runtime, c, "; up to date");
            ctx.step(C, SetupAction::AlreadyPresent, detail, started);
            return Ok(());
        }
    }

    let work = ctx.work_dir(C).map_err(broken)?;
    let x = work.path().join("x");
    let log = ctx.log.clone();
    for e in &entries {
        (ctx.progress)(&format!(
            "downloading {} {} (Debian {suite})",
            e.package, e.version
        ));
        let dl = work.path().join("dl").join(&e.package);
        let apt = ctx.backports_apt(suite).map_err(unavailable)?;
        let deb = apt
            .download(&e.package, &e.version, &dl, &log)
            .map_err(unavailable)?;
        apt::unpack_deb(&deb, &x, &log).map_err(|source| {
            broken(SetupError::Apt {
                component: C,
                source,
            })
        })?;
    }

    let staging = ctx.runtime.join(".qemu-new");
    let result = stage_backport(ctx, kernel, work.path(), &x, &staging, &entries, upstream);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    let version = result.map_err(broken)?;

    let final_dir = ctx.runtime.join(qemu::BUNDLE_DIR);
    swap_in(C, &staging, &final_dir, &ctx.runtime.join(".qemu-old")).map_err(broken)?;

    let had = prov.component(C).is_some();
    let nfiles =
        record_bundle(&ctx.runtime, prov, &final_dir, &main.version, &origin).map_err(broken)?;
    let size = dir_size(&final_dir);
    ctx.step(
        C,
        if had {
            SetupAction::Rebuilt
        } else {
            SetupAction::Installed
        },
        format!(
            "QEMU {version} in {} ({} MiB, {nfiles} files) from {origin}",
            final_dir.display(),
            size >> 20
        ),
        started,
    );
    Ok(())
}

/// Records the files of the bundle in `dir` as the `qemu` component; returns their number.
fn record_bundle(
    runtime: &Path,
    prov: &mut Provenance,
    dir: &Path,
    version: &str,
    origin: &str,
) -> Result<usize, SetupError> {
    const C: &str = component::QEMU;
    let rels: Vec<PathBuf> = util::list_files(dir)
        .map_err(io(C, "cannot list", dir))?
        .into_iter()
        .map(|p| PathBuf::from(qemu::BUNDLE_DIR).join(p))
        .collect();
    let files = provenance::records_for(runtime, &rels)?;
    let n = files.len();
    prov.set_component(Component {
        name: C.into(),
        version: version.to_string(),
        origin: origin.to_string(),
        installed_unix: util::now_unix(),
        files,
    });
    prov.save(runtime)?;
    Ok(n)
}

/// Builds the trimmed QEMU tree in `staging` from the unpacked packages in `x` and checks it;
/// returns the version the binary reports.
fn stage_backport(
    ctx: &Ctx<'_>,
    kernel: &KernelInfo,
    work: &Path,
    x: &Path,
    staging: &Path,
    entries: &[PackageEntry],
    expected: QemuVersion,
) -> Result<QemuVersion, SetupError> {
    const C: &str = component::QEMU;
    if staging.exists() {
        std::fs::remove_dir_all(staging).map_err(io(C, "cannot remove", staging))?;
    }
    let bin_dir = staging.join("usr/bin");
    let share = staging.join("usr/share");
    for d in [&bin_dir, &share] {
        std::fs::create_dir_all(d).map_err(io(C, "cannot create", d))?;
    }
    let packages = entries
        .iter()
        .map(|e| format!("{} {}", e.package, e.version))
        .collect::<Vec<_>>()
        .join(", ");
    let src_bin = x.join("usr/bin").join(qemu::QEMU_PROGRAM);
    if !src_bin.is_file() {
        return Err(SetupError::Package {
            component: C,
            problem: format!(
                "packages {packages} contain no usr/bin/{}",
                qemu::QEMU_PROGRAM
            ),
        });
    }
    let bin = bin_dir.join(qemu::QEMU_PROGRAM);
    util::copy_atomic(&src_bin, &bin, 0o755).map_err(io(C, "cannot copy QEMU to", &bin))?;
    let src_seabios = x.join("usr/share/seabios");
    let seabios = share.join("seabios");
    util::copy_tree(&src_seabios, &seabios).map_err(io(
        C,
        "cannot copy the firmware to",
        &seabios,
    ))?;
    // usr/share/qemu without other architectures' firmware.
    let src_data = x.join("usr/share/qemu");
    let data = share.join("qemu");
    std::fs::create_dir_all(&data).map_err(io(C, "cannot create", &data))?;
    let names = std::fs::read_dir(&src_data).map_err(io(C, "cannot read", &src_data))?;
    for e in names {
        let e = e.map_err(io(C, "cannot read", &src_data))?;
        let name = e.file_name();
        if qemu::is_non_x86_firmware(&name.to_string_lossy()) {
            continue;
        }
        let dest = data.join(&name);
        util::copy_tree(&e.path(), &dest).map_err(io(C, "cannot copy the firmware to", &dest))?;
    }
    let prefix = format!("{}/", qemu::BUNDLE_DIR);
    // The microvm machine's firmware is qboot (see qemu::MICROVM_FIRMWARE).
    let microvm_fw = data.join("bios-microvm.bin");
    if std::fs::symlink_metadata(&microvm_fw).is_err() && data.join("qboot.rom").is_file() {
        std::os::unix::fs::symlink("qboot.rom", &microvm_fw).map_err(io(
            C,
            "cannot create symlink",
            &microvm_fw,
        ))?;
    }
    for req in qemu::BUNDLED_REQUIRED {
        let rel = req.strip_prefix(&prefix).unwrap_or(req);
        if !staging.join(rel).exists() {
            return Err(SetupError::Package {
                component: C,
                problem: format!("packages {packages} contain no {rel}"),
            });
        }
    }

    (ctx.progress)("checking the fetched QEMU");
    let depends: Vec<String> = entries.iter().flat_map(|e| e.depends.clone()).collect();
    let (version, _) = qemu::check_binary(&bin, &depends)?;
    if (version.major, version.minor) != (expected.major, expected.minor) {
        return Err(SetupError::Package {
            component: C,
            problem: format!(
                "{} reports QEMU {version}, but the package is {expected}",
                bin.display()
            ),
        });
    }
    let dirs: Vec<PathBuf> = qemu::BUNDLED_DATA_DIRS
        .iter()
        .map(|d| staging.join(d.strip_prefix(&prefix).unwrap_or(d)))
        .collect();
    (ctx.progress)(&format!(
        "booting the guest kernel with QEMU {version} (TCG) to check it"
    ));
    let serial = work.join("boot-test-console.log");
    let took = qemu::boot_test(
        &bin,
        &dirs,
        &kernel.vmlinux,
        &serial,
        Duration::from_secs(180),
    )?;
    tracing::info!(?took, "bundled QEMU boots the guest kernel");
    Ok(version)
}

fn step_rootfs(
    ctx: &mut Ctx<'_>,
    opts: &SetupOptions,
    kernel: &KernelInfo,
    prov: &mut Provenance,
) -> Result<(Option<PathBuf>, Vec<PathBuf>), SetupError> {
    const C: &str = "rootfs";
    let started = Instant::now();
    let root = ctx.data.join("rootfs");
    let recipe = RootfsRecipe::for_kernel(&kernel.release);
    let id = recipe.id();
    let others = |root: &Path| -> Vec<PathBuf> {
        rootfs::list_rootfs(root)
            .into_iter()
            .filter(|e| e.id != id)
            .map(|e| e.path)
            .collect()
    };
    if opts.skip_rootfs {
        ctx.step(C, SetupAction::Skipped, "skipped as asked".into(), started);
        return Ok((rootfs::find_rootfs(&root, &recipe), others(&root)));
    }
    if let Some(p) = rootfs::find_rootfs(&root, &recipe) {
        if p.join("usr/bin/containerd").exists() {
            ctx.step(
                C,
                SetupAction::AlreadyPresent,
                format!("{} ({})", p.display(), recipe.describe()),
                started,
            );
            set_rootfs_record(prov, &recipe, &p);
            return Ok((Some(p), others(&root)));
        }
    }
    let previous = others(&root);
    (ctx.progress)(&format!(
        "building the base rootfs with mmdebstrap (Debian {} {}, about a minute)",
        recipe.suite, recipe.variant
    ));
    let p = rootfs::build_rootfs(&root, &recipe, kernel, &ctx.log)?;
    set_rootfs_record(prov, &recipe, &p);
    prov.save(&ctx.runtime)?;
    let size = dir_size(&p);
    ctx.step(
        C,
        if previous.is_empty() {
            SetupAction::Installed
        } else {
            SetupAction::Rebuilt
        },
        format!(
            "{} ({}; {} MiB)",
            p.display(),
            recipe.describe(),
            size >> 20
        ),
        started,
    );
    Ok((Some(p), previous))
}

fn set_rootfs_record(prov: &mut Provenance, recipe: &RootfsRecipe, path: &Path) {
    prov.rootfs = Some(RootfsRecord {
        id: recipe.id(),
        path: path.to_path_buf(),
        recipe: recipe.describe(),
    });
}

/// Apparent size of the regular files in a tree (for reports).
fn dir_size(root: &Path) -> u64 {
    util::list_files(root)
        .map(|files| {
            files
                .iter()
                .filter_map(|f| std::fs::symlink_metadata(root.join(f)).ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn step_initramfs(
    ctx: &mut Ctx<'_>,
    opts: &SetupOptions,
    kernel: &KernelInfo,
) -> Result<Option<PathBuf>, SetupError> {
    const C: &str = "initramfs";
    let started = Instant::now();
    let Some(guest) = &opts.guest_bin else {
        ctx.step(
            C,
            SetupAction::Skipped,
            "no guest binary given (GATEVM_GUEST_BIN or gatevm-guest next to gatevm)".into(),
            started,
        );
        return Ok(None);
    };
    (ctx.progress)("building the initramfs");
    let out_dir = ctx.runtime.join("initramfs");
    let before: Vec<PathBuf> = std::fs::read_dir(&out_dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    let p = initramfs::build_initramfs(guest, kernel, &out_dir)?;
    let size = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
    let modules = initramfs::initramfs_modules(kernel)?
        .iter()
        .map(|m| gatevm_kernel::kmod::module_name(m))
        .collect::<Vec<_>>()
        .join(" ");
    ctx.step(
        C,
        if before.contains(&p) {
            SetupAction::AlreadyPresent
        } else {
            SetupAction::Installed
        },
        format!(
            "{} ({} KiB; /init = {}; modules: {modules})",
            p.display(),
            size >> 10,
            guest.display()
        ),
        started,
    );
    Ok(Some(p))
}
