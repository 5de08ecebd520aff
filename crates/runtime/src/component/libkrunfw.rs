//! libkrunfw, the kernel library of the libkrun backend: Debian sid's `libkrunfw5` package,
//! installed as `runtime/lib/libkrunfw.so.5*`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::component::apt_component_current;
use crate::provenance::{self, component, Component, Provenance};
use crate::setup::{io, Ctx, SetupError, SetupOptions};
use crate::util;

/// Debian suite libkrunfw comes from.
pub(crate) const LIBKRUNFW_SUITE: &str = "sid";

/// The libkrunfw package.
pub(crate) const LIBKRUNFW_PACKAGE: &str = "libkrunfw5";

/// The `libkrunfw` step: left alone, without network access, when it is recorded and its files
/// are there; with `refresh`, replaced when the suite has another version.
pub(crate) fn ensure(
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
    let (dest, rels) = install_lib(&ctx.runtime, &real)?;
    let size = std::fs::metadata(&dest).map(|m| m.len()).unwrap_or(0);
    let records = provenance::records_for(&ctx.runtime, &rels)?;
    let origin = format!(
        "debian {LIBKRUNFW_SUITE} package {LIBKRUNFW_PACKAGE} {}",
        entry.version
    );
    ctx.record(
        prov,
        Component::installed_now(C, &entry.version, &origin, records),
        had,
        format!("{} ({} MiB) from {origin}", dest.display(), size >> 20),
        started,
    )?;
    Ok(())
}

/// Installs the library file `real` into `runtime/lib` under its own name, points the
/// `libkrunfw.so.5` link at it and removes other versions' files. Returns the installed file and
/// the runtime-relative paths to record.
fn install_lib(runtime: &Path, real: &Path) -> Result<(PathBuf, Vec<PathBuf>), SetupError> {
    const C: &str = component::LIBKRUNFW;
    let real_name = real
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let lib = runtime.join("lib");
    std::fs::create_dir_all(&lib).map_err(io(C, "cannot create", &lib))?;
    let dest = lib.join(&real_name);
    util::copy_atomic(real, &dest, 0o644).map_err(io(C, "cannot install", &dest))?;
    let link = lib.join("libkrunfw.so.5");
    if link != dest {
        let tmp_link = lib.join(".libkrunfw.so.5.tmp");
        let _ = std::fs::remove_file(&tmp_link);
        std::os::unix::fs::symlink(&real_name, &tmp_link).map_err(io(
            C,
            "cannot create symlink",
            &tmp_link,
        ))?;
        gatevm_fsutil::rename_durable(&tmp_link, &link).map_err(io(C, "cannot install", &link))?;
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
    Ok((dest, rels))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_is_linked_and_old_versions_go() {
        let tmp = tempfile::tempdir().unwrap();
        let runtime = tmp.path().join("rt");
        std::fs::create_dir_all(runtime.join("lib")).unwrap();
        std::fs::write(runtime.join("lib/libkrunfw.so.5.4.0"), "old").unwrap();
        let real = tmp.path().join("libkrunfw.so.5.5.0");
        std::fs::write(&real, "new").unwrap();
        let (dest, rels) = install_lib(&runtime, &real).unwrap();
        assert_eq!(dest, runtime.join("lib/libkrunfw.so.5.5.0"));
        assert_eq!(
            rels,
            vec![
                PathBuf::from("lib/libkrunfw.so.5.5.0"),
                PathBuf::from("lib/libkrunfw.so.5")
            ]
        );
        assert_eq!(
            std::fs::read_link(runtime.join("lib/libkrunfw.so.5")).unwrap(),
            PathBuf::from("libkrunfw.so.5.5.0")
        );
        assert!(!runtime.join("lib/libkrunfw.so.5.4.0").exists());
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "new");
    }
}
