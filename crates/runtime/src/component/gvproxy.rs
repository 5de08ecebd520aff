//! gvproxy, the user-mode network of the VMs: Debian trixie's `gvproxy` package, its binary
//! installed as `runtime/bin/gvproxy`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::kernel::KERNEL_SUITE;
use crate::cmd;
use crate::component::apt_component_current;
use crate::provenance::{self, component, Component, Provenance};
use crate::setup::{io, Ctx, SetupError, SetupOptions};
use crate::util;

/// The gvproxy package.
pub(crate) const GVPROXY_PACKAGE: &str = "gvproxy";

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

/// The `gvproxy` step: left alone, without network access, when it is recorded and its binary is
/// there; with `refresh`, replaced when the suite has another version.
pub(crate) fn ensure(
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
        Component::installed_now(C, &entry.version, &origin, files),
        had,
        format!("{} from {origin}; runs: {reported}", dest.display()),
        started,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_is_found_where_preferred_else_anywhere() {
        let tmp = tempfile::tempdir().unwrap();
        let x = tmp.path();
        assert_eq!(find_file(x, &["usr/bin/gvproxy"], "gvproxy"), None);
        std::fs::create_dir_all(x.join("usr/lib/other")).unwrap();
        std::fs::write(x.join("usr/lib/other/gvproxy"), "").unwrap();
        assert_eq!(
            find_file(x, &["usr/bin/gvproxy"], "gvproxy"),
            Some(x.join("usr/lib/other/gvproxy"))
        );
        std::fs::create_dir_all(x.join("usr/bin")).unwrap();
        std::fs::write(x.join("usr/bin/gvproxy"), "").unwrap();
        assert_eq!(
            find_file(x, &["usr/bin/gvproxy"], "gvproxy"),
            Some(x.join("usr/bin/gvproxy"))
        );
        // A directory of that name is not the binary.
        std::fs::create_dir_all(x.join("opt/gvproxy")).unwrap();
        std::fs::remove_file(x.join("usr/bin/gvproxy")).unwrap();
        std::fs::remove_file(x.join("usr/lib/other/gvproxy")).unwrap();
        assert_eq!(find_file(x, &[], "gvproxy"), None);
    }
}
