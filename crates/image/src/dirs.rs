//! Where gatevm keeps its data, its runtime bundle and its caches.
//!
//! | function        | environment override   | default                                             |
//! |-----------------|------------------------|-----------------------------------------------------|
//! | [`data_dir`]    | `GATEVM_DATA_DIR`      | `$XDG_DATA_HOME/gatevm`, else `~/.local/share/gatevm` |
//! | [`runtime_dir`] | `GATEVM_RUNTIME_DIR`   | `data_dir()/runtime/v1`                             |
//! | [`cache_dir`]   | `GATEVM_CACHE_DIR`     | `$XDG_CACHE_HOME/gatevm`, else `~/.cache/gatevm`    |
//!
//! The resolvers do no I/O; [`ensure_dir`] creates a directory (and its missing parents) with
//! mode 0700.

use std::ffi::OsString;
use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Version of the runtime bundle layout; part of the default [`runtime_dir`] path so that a
/// future incompatible layout lives next to this one instead of overwriting it.
pub const RUNTIME_LAYOUT_VERSION: u32 = 1;

/// Errors of directory resolution and creation.
#[derive(Debug, Error)]
pub enum DirsError {
    /// Neither the override variable, the XDG variable nor `HOME` is set.
    #[error("cannot find the {what} directory: set {var} or HOME")]
    NoHome {
        /// Which directory (data, cache).
        what: &'static str,
        /// The override variable the user can set.
        var: &'static str,
    },
    /// Creating a directory failed.
    #[error("cannot create directory {}: {source}", path.display())]
    Create {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Reads a variable through `get` as an absolute path; empty and relative values count as unset
/// (the XDG base directory spec says relative values are invalid and must be ignored).
fn var_path(get: &dyn Fn(&str) -> Option<OsString>, var: &str) -> Option<PathBuf> {
    let value = get(var)?;
    if value.is_empty() {
        return None;
    }
    let path = PathBuf::from(value);
    path.is_absolute().then_some(path)
}

fn process_env(var: &str) -> Option<OsString> {
    std::env::var_os(var)
}

fn resolve_data(get: &dyn Fn(&str) -> Option<OsString>) -> Result<PathBuf, DirsError> {
    if let Some(p) = var_path(get, "GATEVM_DATA_DIR") {
        return Ok(p);
    }
    if let Some(p) = var_path(get, "XDG_DATA_HOME") {
        return Ok(p.join("gatevm"));
    }
    var_path(get, "HOME")
        .map(|h| h.join(".local/share/gatevm"))
        .ok_or(DirsError::NoHome {
            what: "data",
            var: "GATEVM_DATA_DIR",
        })
}

fn resolve_runtime(get: &dyn Fn(&str) -> Option<OsString>) -> Result<PathBuf, DirsError> {
    if let Some(p) = var_path(get, "GATEVM_RUNTIME_DIR") {
        return Ok(p);
    }
    Ok(resolve_data(get)?
        .join("runtime")
        .join(format!("v{RUNTIME_LAYOUT_VERSION}")))
}

fn resolve_cache(get: &dyn Fn(&str) -> Option<OsString>) -> Result<PathBuf, DirsError> {
    if let Some(p) = var_path(get, "GATEVM_CACHE_DIR") {
        return Ok(p);
    }
    if let Some(p) = var_path(get, "XDG_CACHE_HOME") {
        return Ok(p.join("gatevm"));
    }
    var_path(get, "HOME")
        .map(|h| h.join(".cache/gatevm"))
        .ok_or(DirsError::NoHome {
            what: "cache",
            var: "GATEVM_CACHE_DIR",
        })
}

/// The data directory: `$GATEVM_DATA_DIR`, else `$XDG_DATA_HOME/gatevm`, else
/// `$HOME/.local/share/gatevm`. Instances, rootfs trees and the runtime bundle live below it.
pub fn data_dir() -> Result<PathBuf, DirsError> {
    resolve_data(&process_env)
}

/// The runtime bundle directory (kernel, modules, helper binaries, provenance):
/// `$GATEVM_RUNTIME_DIR`, else `data_dir()/runtime/v1`.
pub fn runtime_dir() -> Result<PathBuf, DirsError> {
    resolve_runtime(&process_env)
}

/// The cache directory (downloads, private apt state, build trees, logs): `$GATEVM_CACHE_DIR`,
/// else `$XDG_CACHE_HOME/gatevm`, else `$HOME/.cache/gatevm`. Everything in it can be deleted.
pub fn cache_dir() -> Result<PathBuf, DirsError> {
    resolve_cache(&process_env)
}

/// The directory holding the base root filesystems: `data_dir()/rootfs`.
pub fn rootfs_root() -> Result<PathBuf, DirsError> {
    Ok(data_dir()?.join("rootfs"))
}

/// Creates `path` and any missing parents with mode 0700. Existing directories keep their mode.
pub fn ensure_dir(path: &Path) -> Result<(), DirsError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| DirsError::Create {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_dir_creates_private_dirs() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("a/b/c");
        ensure_dir(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let mode = std::fs::metadata(tmp.path().join("a"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700);
        // idempotent
        ensure_dir(&p).unwrap();
    }

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<OsString> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn resolution_order() {
        let e = env(&[("HOME", "/home/u")]);
        assert_eq!(
            resolve_data(&e).unwrap(),
            Path::new("/home/u/.local/share/gatevm")
        );
        assert_eq!(
            resolve_cache(&e).unwrap(),
            Path::new("/home/u/.cache/gatevm")
        );
        assert_eq!(
            resolve_runtime(&e).unwrap(),
            Path::new("/home/u/.local/share/gatevm/runtime/v1")
        );
        let e = env(&[
            ("HOME", "/home/u"),
            ("XDG_DATA_HOME", "/x/data"),
            ("XDG_CACHE_HOME", "relative/ignored"),
        ]);
        assert_eq!(resolve_data(&e).unwrap(), Path::new("/x/data/gatevm"));
        assert_eq!(
            resolve_cache(&e).unwrap(),
            Path::new("/home/u/.cache/gatevm")
        );
        let e = env(&[
            ("GATEVM_DATA_DIR", "/d"),
            ("GATEVM_RUNTIME_DIR", "/r"),
            ("GATEVM_CACHE_DIR", "/c"),
            ("XDG_DATA_HOME", "/x/data"),
        ]);
        assert_eq!(resolve_data(&e).unwrap(), Path::new("/d"));
        assert_eq!(resolve_runtime(&e).unwrap(), Path::new("/r"));
        assert_eq!(resolve_cache(&e).unwrap(), Path::new("/c"));
        let e = env(&[("GATEVM_DATA_DIR", "")]);
        assert!(matches!(resolve_data(&e), Err(DirsError::NoHome { .. })));
    }
}
