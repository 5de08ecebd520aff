//! The components of the runtime bundle, one module each. A component's module owns both its
//! check (is it present, current and usable) and its acquisition (Debian package download and
//! unpack, or a build), and reports one setup step; [`crate::setup()`] only runs them in order:
//!
//! - [`host`]: the host packages setup and the VMs need;
//! - [`kernel`]: the guest kernel (trixie's cloud kernel) as an ELF `vmlinux` and its modules;
//! - [`qemu`]: which QEMU runs the guests (the host's, or Debian's backport in the bundle);
//! - [`gvproxy`], [`libkrunfw`]: single Debian packages;
//! - [`virtiofsd`]: built from crates.io; [`passt`]: built from Debian's source package;
//! - [`rootfs`]: the base root file system (mmdebstrap recipe);
//! - [`initramfs`]: the initramfs for a guest binary.
//!
//! This module holds what several of them share.

use std::path::Path;
use std::time::Instant;

use crate::apt::PackageEntry;
use crate::provenance::Provenance;
use crate::setup::{io, Ctx, SetupAction, SetupError, SetupOptions};
use crate::util;

pub(crate) mod gvproxy;
pub(crate) mod host;
pub mod initramfs;
pub(crate) mod kernel;
pub(crate) mod libkrunfw;
pub(crate) mod passt;
pub(crate) mod qemu;
pub mod rootfs;
pub(crate) mod virtiofsd;

/// Puts the tree `staging` in place of `final_dir` (the previous tree moved to `old` first and
/// removed after), each rename made durable.
pub(crate) fn swap_in(
    component: &'static str,
    staging: &Path,
    final_dir: &Path,
    old: &Path,
) -> Result<(), SetupError> {
    if old.exists() {
        std::fs::remove_dir_all(old).map_err(io(component, "cannot remove", old))?;
    }
    if final_dir.exists() {
        gatevm_fsutil::rename_durable(final_dir, old).map_err(io(
            component,
            "cannot move aside",
            final_dir,
        ))?;
    }
    gatevm_fsutil::rename_durable(staging, final_dir).map_err(io(
        component,
        "cannot install",
        final_dir,
    ))?;
    let _ = std::fs::remove_dir_all(old);
    Ok(())
}

/// Whether component `name` is recorded with at least one file and all its files exist.
pub(crate) fn present(prov: &Provenance, runtime: &Path, name: &str) -> bool {
    matches!(prov.missing_files(runtime, name), Some(m) if m.is_empty())
        && prov.component(name).is_some_and(|c| !c.files.is_empty())
}

/// Common start of the "single Debian package" components: `Ok(None)` when the component is
/// present (and, with `refresh`, at the suite's current version) and the step is recorded;
/// otherwise `Some((had_before, entry to install))`.
pub(crate) fn apt_component_current(
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

/// Apparent size of the regular files in a tree (for reports).
pub(crate) fn dir_size(root: &Path) -> u64 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provenance::{Component, FileRecord};

    fn component(name: &str, files: &[&str]) -> Component {
        Component {
            name: name.into(),
            version: "1".into(),
            origin: "test".into(),
            installed_unix: 0,
            files: files
                .iter()
                .map(|f| FileRecord {
                    path: f.to_string(),
                    sha256: String::new(),
                })
                .collect(),
        }
    }

    #[test]
    fn present_needs_every_recorded_file() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = tmp.path();
        let mut prov = Provenance::default();
        assert!(!present(&prov, rt, "gvproxy"));
        prov.set_component(component("gvproxy", &[]));
        assert!(!present(&prov, rt, "gvproxy"), "a record without files");
        prov.set_component(component("gvproxy", &["bin/gvproxy", "bin/other"]));
        std::fs::create_dir_all(rt.join("bin")).unwrap();
        std::fs::write(rt.join("bin/gvproxy"), "").unwrap();
        assert!(!present(&prov, rt, "gvproxy"));
        std::fs::write(rt.join("bin/other"), "").unwrap();
        assert!(present(&prov, rt, "gvproxy"));
    }

    #[test]
    fn swap_in_replaces_the_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let (staging, fin, old) = (
            tmp.path().join("new"),
            tmp.path().join("kernel"),
            tmp.path().join("old"),
        );
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::write(staging.join("a"), "1").unwrap();
        swap_in("kernel", &staging, &fin, &old).unwrap();
        assert_eq!(std::fs::read_to_string(fin.join("a")).unwrap(), "1");
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::write(staging.join("b"), "22").unwrap();
        std::fs::create_dir_all(&old).unwrap();
        swap_in("kernel", &staging, &fin, &old).unwrap();
        assert!(!fin.join("a").exists());
        assert!(!staging.exists() && !old.exists());
        assert_eq!(dir_size(&fin), 2);
        assert_eq!(dir_size(&tmp.path().join("missing")), 0);
    }
}
