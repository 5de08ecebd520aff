//! Debian's QEMU backport for the host's release, fetched into the bundle (`runtime/qemu/`):
//! the packages unpacked, trimmed to the binary and the x86 firmware, checked (`--version`, a
//! boot of the guest kernel), swapped in and recorded.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{BackportFailure, QemuVersion};
use crate::apt::{self, AptError, PackageEntry};
use crate::component::kernel::KernelInfo;
use crate::component::{dir_size, qemu, swap_in};
use crate::provenance::{self, component, Component, Provenance};
use crate::setup::{io, Ctx, SetupAction, SetupError};
use crate::util;
use gatevm_abi::error_chain;

/// The report line of a bundled QEMU that is left as it is.
pub(crate) fn bundle_detail(runtime: &Path, c: &Component, suffix: &str) -> String {
    let version = QemuVersion::from_debian_version(&c.version)
        .map(|v| v.to_string())
        .unwrap_or_else(|| c.version.clone());
    format!(
        "QEMU {version} in {} ({}{suffix})",
        runtime.join(qemu::BUNDLE_DIR).display(),
        c.origin
    )
}

/// Records the files of the bundle in `dir` as the `qemu` component; returns their number.
pub(crate) fn record_bundle(
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
    prov.set_component(Component::installed_now(C, version, origin, files));
    prov.save(runtime)?;
    Ok(n)
}

/// Fetches QEMU from Debian's `suite` (a `-backports` suite) into `runtime/qemu/`: the packages
/// of [`qemu::BACKPORT_PACKAGES`], unpacked, trimmed to the binary and the x86 firmware, checked
/// (`--version`, a boot of the guest kernel), swapped in and recorded.
pub(crate) fn install_backport(
    ctx: &mut Ctx<'_>,
    prov: &mut Provenance,
    kernel: &KernelInfo,
    suite: &str,
    bundle_complete: bool,
    started: Instant,
) -> Result<(), BackportFailure> {
    const C: &str = component::QEMU;
    let broken = |e: SetupError| BackportFailure::Broken(e);
    let mut entries: Vec<PackageEntry> = Vec::new();
    for pkg in qemu::BACKPORT_PACKAGES {
        let apt = ctx.backports_apt(suite).map_err(unavailable)?;
        entries.push(apt.show(pkg, suite).map_err(unavailable)?);
    }
    let (upstream, origin) =
        judge_backport(suite, &entries).map_err(BackportFailure::Unavailable)?;
    let main_version = entries
        .first()
        .map(|e| e.version.clone())
        .unwrap_or_default();
    if bundle_complete {
        if let Some(c) = prov
            .component(C)
            .filter(|c| c.version == main_version && c.origin == origin)
        {
            let detail = bundle_detail(&ctx.runtime, c, "; up to date");
            ctx.step(C, SetupAction::AlreadyPresent, detail, started);
            return Ok(());
        }
    }

    let work = ctx.work_dir(C).map_err(broken)?;
    let x = download_backport(ctx, suite, &entries, work.path())?;
    let staging = ctx.runtime.join(".qemu-new");
    let result = stage_backport(&x, &staging, &entries)
        .and_then(|bin| check_staged(ctx, kernel, work.path(), &bin, &staging, &entries, upstream));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    let version = result.map_err(broken)?;

    let final_dir = ctx.runtime.join(qemu::BUNDLE_DIR);
    swap_in(C, &staging, &final_dir, &ctx.runtime.join(".qemu-old")).map_err(broken)?;

    let had = prov.component(C).is_some();
    let nfiles =
        record_bundle(&ctx.runtime, prov, &final_dir, &main_version, &origin).map_err(broken)?;
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

/// An apt failure while fetching the backport: it is not to be had.
fn unavailable(e: AptError) -> BackportFailure {
    BackportFailure::Unavailable(error_chain(&e))
}

/// Whether the backport's package entries (in [`qemu::BACKPORT_PACKAGES`] order) can be used:
/// the upstream QEMU version of the first, when it is TCG-safe, and the origin line recorded
/// for the bundle; `Err` says why not.
fn judge_backport(suite: &str, entries: &[PackageEntry]) -> Result<(QemuVersion, String), String> {
    let (Some(main), Some(seabios)) = (entries.first(), entries.last()) else {
        return Err("no packages".into());
    };
    let upstream = QemuVersion::from_debian_version(&main.version).ok_or_else(|| {
        format!(
            "cannot read a QEMU version in {} {}",
            main.package, main.version
        )
    })?;
    if !upstream.tcg_safe() {
        return Err(format!(
            "it has QEMU {upstream} ({} {}), older than {} too",
            main.package,
            main.version,
            qemu::MIN_TCG_SAFE_MAJOR
        ));
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
    Ok((upstream, origin))
}

/// Downloads the backport's packages into `work/dl` and unpacks them into `work/x` (returned).
fn download_backport(
    ctx: &mut Ctx<'_>,
    suite: &str,
    entries: &[PackageEntry],
    work: &Path,
) -> Result<PathBuf, BackportFailure> {
    let x = work.join("x");
    let log = ctx.log.clone();
    (ctx.progress)(&download_line(suite, entries));
    for e in entries {
        let dl = work.join("dl").join(&e.package);
        let apt = ctx.backports_apt(suite).map_err(unavailable)?;
        let deb = apt
            .download(&e.package, &e.version, &dl, &log)
            .map_err(unavailable)?;
        apt::unpack_deb(&deb, &x, &log).map_err(|source| {
            BackportFailure::Broken(SetupError::Apt {
                component: component::QEMU,
                source,
            })
        })?;
    }
    Ok(x)
}

/// The progress line of fetching the backport: what, from where, and why.
fn download_line(suite: &str, entries: &[PackageEntry]) -> String {
    let version = entries
        .first()
        .and_then(|e| QemuVersion::from_debian_version(&e.version))
        .map(|v| format!("QEMU {v}"))
        .unwrap_or_else(|| "QEMU".into());
    let packages: Vec<&str> = entries.iter().map(|e| e.package.as_str()).collect();
    format!(
        "downloading {version} from Debian {suite} (the host has no QEMU {}+, which guests \
         need under TCG; packages {})",
        qemu::MIN_TCG_SAFE_MAJOR,
        packages.join(", ")
    )
}

/// The progress line of the boot check: what, why and how long it takes.
fn boot_check_line(version: QemuVersion) -> String {
    format!(
        "booting the guest kernel with QEMU {version} to check it boots gatevm's TCG guests \
         (about 5 s, longer on a busy host)"
    )
}

/// Builds the trimmed QEMU tree in `staging` from the unpacked packages in `x`: the binary, the
/// SeaBIOS firmware, `usr/share/qemu` without other architectures' firmware, and the microvm
/// firmware link. Returns the binary's path.
pub(crate) fn stage_backport(
    x: &Path,
    staging: &Path,
    entries: &[PackageEntry],
) -> Result<PathBuf, SetupError> {
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
    stage_qemu_data(&x.join("usr/share/qemu"), &share.join("qemu"))?;
    let prefix = format!("{}/", qemu::BUNDLE_DIR);
    for req in qemu::BUNDLED_REQUIRED {
        let rel = req.strip_prefix(&prefix).unwrap_or(req);
        if !staging.join(rel).exists() {
            return Err(SetupError::Package {
                component: C,
                problem: format!("packages {packages} contain no {rel}"),
            });
        }
    }
    Ok(bin)
}

/// Copies `usr/share/qemu` from `src_data` to `data` without other architectures' firmware,
/// and adds the microvm firmware link where the package lacks it.
fn stage_qemu_data(src_data: &Path, data: &Path) -> Result<(), SetupError> {
    const C: &str = component::QEMU;
    std::fs::create_dir_all(data).map_err(io(C, "cannot create", data))?;
    let names = std::fs::read_dir(src_data).map_err(io(C, "cannot read", src_data))?;
    for e in names {
        let e = e.map_err(io(C, "cannot read", src_data))?;
        let name = e.file_name();
        if qemu::is_non_x86_firmware(&name.to_string_lossy()) {
            continue;
        }
        let dest = data.join(&name);
        util::copy_tree(&e.path(), &dest).map_err(io(C, "cannot copy the firmware to", &dest))?;
    }
    // The microvm machine's firmware is qboot (see qemu::MICROVM_FIRMWARE).
    let microvm_fw = data.join("bios-microvm.bin");
    if std::fs::symlink_metadata(&microvm_fw).is_err() && data.join("qboot.rom").is_file() {
        std::os::unix::fs::symlink("qboot.rom", &microvm_fw).map_err(io(
            C,
            "cannot create symlink",
            &microvm_fw,
        ))?;
    }
    Ok(())
}

/// Checks the staged binary `bin`: it starts (or says which libraries it lacks), reports the
/// packages' QEMU version (`expected`), and boots the guest kernel. Returns the version.
fn check_staged(
    ctx: &Ctx<'_>,
    kernel: &KernelInfo,
    work: &Path,
    bin: &Path,
    staging: &Path,
    entries: &[PackageEntry],
    expected: QemuVersion,
) -> Result<QemuVersion, SetupError> {
    (ctx.progress)("checking the fetched QEMU");
    let depends: Vec<String> = entries.iter().flat_map(|e| e.depends.clone()).collect();
    let (version, _) = qemu::check_binary(bin, &depends)?;
    if (version.major, version.minor) != (expected.major, expected.minor) {
        return Err(SetupError::Package {
            component: component::QEMU,
            problem: format!(
                "{} reports QEMU {version}, but the package is {expected}",
                bin.display()
            ),
        });
    }
    let prefix = format!("{}/", qemu::BUNDLE_DIR);
    let dirs: Vec<PathBuf> = qemu::BUNDLED_DATA_DIRS
        .iter()
        .map(|d| staging.join(d.strip_prefix(&prefix).unwrap_or(d)))
        .collect();
    (ctx.progress)(&boot_check_line(version));
    let serial = work.join("boot-test-console.log");
    let took = qemu::boot_test(
        bin,
        &dirs,
        &kernel.vmlinux,
        &serial,
        Duration::from_secs(180),
    )?;
    tracing::info!(?took, "bundled QEMU boots the guest kernel");
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(package: &str, version: &str) -> PackageEntry {
        PackageEntry {
            package: package.into(),
            version: version.into(),
            depends: Vec::new(),
            sha256: None,
        }
    }

    fn entries(qemu_version: &str) -> Vec<PackageEntry> {
        vec![
            entry("qemu-system-x86", qemu_version),
            entry("qemu-system-common", qemu_version),
            entry("qemu-system-data", qemu_version),
            entry("seabios", "1.16.2-1~bpo12+1"),
        ]
    }

    #[test]
    fn backport_is_judged_by_its_qemu_version() {
        let (v, origin) =
            judge_backport("bookworm-backports", &entries("1:10.0.2+ds-2~bpo12+1")).unwrap();
        assert_eq!(v.to_string(), "10.0.2");
        assert_eq!(
            origin,
            "debian bookworm-backports packages qemu-system-x86 1:10.0.2+ds-2~bpo12+1, \
             qemu-system-common, qemu-system-data, seabios 1.16.2-1~bpo12+1"
        );
        let e = judge_backport("bookworm-backports", &entries("1:7.2+dfsg-7")).unwrap_err();
        assert!(
            e.contains("QEMU 7.2.0") && e.contains("older than 8"),
            "{e}"
        );
        let e = judge_backport("x", &entries("garbage")).unwrap_err();
        assert!(e.contains("cannot read a QEMU version"), "{e}");
        assert_eq!(judge_backport("x", &[]).unwrap_err(), "no packages");
    }

    #[test]
    fn fetch_and_boot_check_say_what_and_why() {
        let line = download_line("bookworm-backports", &entries("1:10.0.2+ds-2~bpo12+1"));
        assert_eq!(
            line,
            "downloading QEMU 10.0.2 from Debian bookworm-backports (the host has no QEMU 8+, \
             which guests need under TCG; packages qemu-system-x86, qemu-system-common, \
             qemu-system-data, seabios)"
        );
        assert_eq!(
            crate::setup::phases::done_line(&line, Duration::from_millis(12_340)).as_deref(),
            Some("downloading QEMU 10.0.2 from Debian bookworm-backports: done in 12.3 s")
        );
        let v = QemuVersion::from_debian_version("1:10.0.2+ds-2~bpo12+1").unwrap();
        assert_eq!(
            boot_check_line(v),
            "booting the guest kernel with QEMU 10.0.2 to check it boots gatevm's TCG guests \
             (about 5 s, longer on a busy host)"
        );
    }

    #[test]
    fn bundle_is_trimmed_and_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let x = tmp.path().join("x");
        let staging = tmp.path().join("staging");
        let pkgs = entries("1:10.0.2+ds-2~bpo12+1");
        let e = stage_backport(&x, &staging, &pkgs).unwrap_err();
        assert!(
            e.to_string()
                .contains("contain no usr/bin/qemu-system-x86_64"),
            "{e}"
        );
        std::fs::create_dir_all(x.join("usr/bin")).unwrap();
        std::fs::write(x.join("usr/bin/qemu-system-x86_64"), "bin").unwrap();
        std::fs::create_dir_all(x.join("usr/share/seabios")).unwrap();
        std::fs::write(x.join("usr/share/seabios/bios.bin"), "").unwrap();
        std::fs::create_dir_all(x.join("usr/share/qemu")).unwrap();
        for f in ["qboot.rom", "openbios-ppc", "pvh.bin"] {
            std::fs::write(x.join("usr/share/qemu").join(f), "").unwrap();
        }
        let bin = stage_backport(&x, &staging, &pkgs).unwrap();
        assert_eq!(bin, staging.join("usr/bin/qemu-system-x86_64"));
        let data = staging.join("usr/share/qemu");
        assert!(data.join("pvh.bin").is_file());
        assert!(!data.join("openbios-ppc").exists());
        assert_eq!(
            std::fs::read_link(data.join("bios-microvm.bin")).unwrap(),
            PathBuf::from("qboot.rom")
        );
        assert!(staging.join("usr/share/seabios/bios.bin").is_file());
        // Staging again starts from a clean tree.
        std::fs::remove_file(x.join("usr/share/qemu/qboot.rom")).unwrap();
        let e = stage_backport(&x, &staging, &pkgs).unwrap_err();
        assert!(
            e.to_string()
                .contains("contain no usr/share/qemu/qboot.rom"),
            "{e}"
        );
    }
}
