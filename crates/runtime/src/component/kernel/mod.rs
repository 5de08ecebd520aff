//! The guest kernel: Debian trixie's cloud kernel package, unpacked into `runtime/kernel/` as an
//! uncompressed ELF `vmlinux` (see [`vmlinux`]), the original bzImage, its build configuration
//! and its module tree (depmod'ed). Present when its provenance record's files all exist; with
//! `--refresh`, replaced when the metapackage points at another version.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::apt::PackageEntry;
use crate::cmd;
use crate::component::{present, swap_in};
use crate::provenance::{self, component, Component, FileRecord, Provenance};
use crate::setup::{io, Ctx, SetupAction, SetupError, SetupOptions};
use crate::util;

pub(crate) mod vmlinux;

pub(crate) use vmlinux::{write_vmlinux, KernelError};

/// Debian suite the kernel and gvproxy come from.
pub(crate) const KERNEL_SUITE: &str = "trixie";

/// The kernel metapackage whose dependency names the real kernel package.
pub(crate) const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";

/// A typed view of what gatevm knows about the guest kernel it installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelInfo {
    /// The kernel release (`uname -r` in the guest), e.g. `6.12.107+deb13-cloud-amd64`.
    pub release: String,
    /// The uncompressed ELF kernel to boot.
    pub vmlinux: PathBuf,
    /// The module tree of this release (the directory holding `modules.dep`).
    pub modules_dir: PathBuf,
}

fn kernel_info(runtime: &Path, release: &str) -> KernelInfo {
    KernelInfo {
        release: release.to_string(),
        vmlinux: runtime.join("kernel/vmlinux"),
        modules_dir: runtime.join("kernel/lib/modules").join(release),
    }
}

/// The `kernel` step: left alone, without network access, when it is recorded and its files are
/// there; with `refresh`, replaced when the metapackage points at another package version.
pub(crate) fn ensure(
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
    let real = real_package(&meta)?;
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

    install(ctx, prov, had, &meta, &real, &entry, started)
}

/// Fetches `real` (the package `meta` points at) as `entry` says, installs its kernel and
/// modules into `runtime/kernel` and records it.
fn install(
    ctx: &mut Ctx<'_>,
    prov: &mut Provenance,
    had: bool,
    meta: &PackageEntry,
    real: &str,
    entry: &PackageEntry,
    started: Instant,
) -> Result<KernelInfo, SetupError> {
    const C: &str = component::KERNEL;
    let (x, _work) = ctx.fetch(C, entry, KERNEL_SUITE)?;
    let found = find_in_package(&x, real, &entry.version)?;
    let staging = ctx.runtime.join(".kernel-new");
    let vmlinux_size = stage(ctx, &found, &staging)?;
    // Swap the new tree in.
    let final_dir = ctx.runtime.join("kernel");
    swap_in(C, &staging, &final_dir, &ctx.runtime.join(".kernel-old"))?;

    let files = installed_files(&ctx.runtime, &final_dir)?;
    let nfiles = files.len();
    let origin = format!(
        "debian {KERNEL_SUITE} package {real} {} (via {KERNEL_METAPACKAGE} {})",
        entry.version, meta.version
    );
    let release = found.release;
    prov.kernel_release = Some(release.clone());
    ctx.record(
        prov,
        Component::installed_now(C, &entry.version, &origin, files),
        had,
        format!(
            "{release} from {origin}; vmlinux {} MiB; {nfiles} files incl. modules",
            vmlinux_size >> 20
        ),
        started,
    )?;
    Ok(kernel_info(&ctx.runtime, &release))
}

/// The records of the files installed in `final_dir` (`runtime/kernel`).
fn installed_files(runtime: &Path, final_dir: &Path) -> Result<Vec<FileRecord>, SetupError> {
    let rels: Vec<PathBuf> = util::list_files(final_dir)
        .map_err(io(component::KERNEL, "cannot list", final_dir))?
        .into_iter()
        .map(|p| PathBuf::from("kernel").join(p))
        .collect();
    Ok(provenance::records_for(runtime, &rels)?)
}

/// The real kernel package [`KERNEL_METAPACKAGE`]'s entry depends on (the first `linux-image-*`
/// dependency other than itself).
fn real_package(meta: &PackageEntry) -> Result<String, SetupError> {
    meta.depends
        .iter()
        .find(|d| d.starts_with("linux-image-") && *d != &meta.package)
        .cloned()
        .ok_or_else(|| SetupError::Package {
            component: component::KERNEL,
            problem: format!(
                "{KERNEL_METAPACKAGE} {} in Debian {KERNEL_SUITE} depends on no linux-image package (depends: {})",
                meta.version,
                meta.depends.join(", ")
            ),
        })
}

/// What the unpacked kernel package holds.
#[derive(Debug)]
struct Unpacked {
    /// Its `boot/` directory.
    boot: PathBuf,
    /// The bzImage's file name in `boot/` (`vmlinuz-<release>`).
    vmlinuz: String,
    /// The kernel release.
    release: String,
    /// The module tree of the release.
    modules: PathBuf,
}

/// Finds the bzImage, the release and the module tree in package `real` `version` unpacked in `x`.
fn find_in_package(x: &Path, real: &str, version: &str) -> Result<Unpacked, SetupError> {
    const C: &str = component::KERNEL;
    let boot = x.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .map_err(io(C, "cannot read", &boot))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("vmlinuz-"))
        .ok_or_else(|| SetupError::Package {
            component: C,
            problem: format!("package {real} {version} has no boot/vmlinuz-*"),
        })?;
    let release = vmlinuz.trim_start_matches("vmlinuz-").to_string();
    let modules = ["usr/lib/modules", "lib/modules"]
        .iter()
        .map(|d| x.join(d).join(&release))
        .find(|p| p.is_dir())
        .ok_or_else(|| SetupError::Package {
            component: C,
            problem: format!(
                "package {real} {version} has no module tree for {release} (usr/lib/modules or lib/modules)"
            ),
        })?;
    Ok(Unpacked {
        boot,
        vmlinuz,
        release,
        modules,
    })
}

/// Builds the `kernel/` tree in `staging`: the bzImage, its configuration, the extracted
/// `vmlinux` and the module tree, depmod'ed. Returns the size of `vmlinux`.
fn stage(ctx: &Ctx<'_>, found: &Unpacked, staging: &Path) -> Result<u64, SetupError> {
    const C: &str = component::KERNEL;
    let Unpacked {
        boot,
        vmlinuz,
        release,
        modules,
    } = found;
    (ctx.progress)(&format!("extracting vmlinux from vmlinuz-{release}"));
    if staging.exists() {
        std::fs::remove_dir_all(staging).map_err(io(C, "cannot remove", staging))?;
    }
    std::fs::create_dir_all(staging).map_err(io(C, "cannot create", staging))?;
    let vmlinuz_dest = staging.join(vmlinuz);
    util::copy_atomic(&boot.join(vmlinuz), &vmlinuz_dest, 0o644).map_err(io(
        C,
        "cannot copy the kernel to",
        &vmlinuz_dest,
    ))?;
    let config = format!("config-{release}");
    if boot.join(&config).is_file() {
        util::copy_atomic(&boot.join(&config), &staging.join(&config), 0o644).map_err(io(
            C,
            "cannot copy the kernel config to",
            staging,
        ))?;
    }
    let vmlinux_size = write_vmlinux(&vmlinuz_dest, &staging.join("vmlinux"))?;
    let modules_dest = staging.join("lib/modules").join(release);
    std::fs::create_dir_all(staging.join("lib/modules")).map_err(io(
        C,
        "cannot create",
        staging,
    ))?;
    util::copy_tree(modules, &modules_dest).map_err(io(
        C,
        "cannot copy the module tree to",
        &modules_dest,
    ))?;
    depmod(ctx, staging, release, &modules_dest)?;
    Ok(vmlinux_size)
}

/// Runs depmod on the module tree of `release` under `staging` and checks it wrote `modules.dep`.
fn depmod(
    ctx: &Ctx<'_>,
    staging: &Path,
    release: &str,
    modules_dest: &Path,
) -> Result<(), SetupError> {
    const C: &str = component::KERNEL;
    (ctx.progress)(&format!("running depmod for {release}"));
    let depmod = cmd::find_program("depmod").unwrap_or_else(|| PathBuf::from("depmod"));
    let mut c = std::process::Command::new(depmod);
    c.arg("-b").arg(staging).arg(release);
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(package: &str, depends: &[&str]) -> PackageEntry {
        PackageEntry {
            package: package.into(),
            version: "6.12.107-1".into(),
            depends: depends.iter().map(|s| s.to_string()).collect(),
            sha256: None,
        }
    }

    #[test]
    fn the_metapackage_names_the_real_package() {
        let meta = entry(
            KERNEL_METAPACKAGE,
            &[
                KERNEL_METAPACKAGE,
                "initramfs-tools",
                "linux-image-6.12.107+deb13-cloud-amd64",
            ],
        );
        assert_eq!(
            real_package(&meta).unwrap(),
            "linux-image-6.12.107+deb13-cloud-amd64"
        );
        let e = real_package(&entry(KERNEL_METAPACKAGE, &["initramfs-tools"])).unwrap_err();
        let m = e.to_string();
        assert!(m.starts_with("kernel: "), "{m}");
        assert!(m.contains("depends on no linux-image package"), "{m}");
        assert!(m.contains("initramfs-tools"), "{m}");
    }

    #[test]
    fn the_package_layout_is_found() {
        let tmp = tempfile::tempdir().unwrap();
        let x = tmp.path();
        let e = find_in_package(x, "linux-image-x", "1").unwrap_err();
        assert!(e.to_string().contains("cannot read"), "{e}");
        std::fs::create_dir_all(x.join("boot")).unwrap();
        std::fs::write(x.join("boot/vmlinuz-6.12.1-cloud"), "").unwrap();
        let e = find_in_package(x, "linux-image-x", "1").unwrap_err();
        assert!(
            e.to_string().contains("no module tree for 6.12.1-cloud"),
            "{e}"
        );
        std::fs::create_dir_all(x.join("usr/lib/modules/6.12.1-cloud")).unwrap();
        let u = find_in_package(x, "linux-image-x", "1").unwrap();
        assert_eq!(u.release, "6.12.1-cloud");
        assert_eq!(u.vmlinuz, "vmlinuz-6.12.1-cloud");
        assert_eq!(u.modules, x.join("usr/lib/modules/6.12.1-cloud"));
    }
}
