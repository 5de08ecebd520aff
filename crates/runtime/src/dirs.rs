//! Where gatevm keeps its data, its runtime bundle and its caches.
//!
//! | function        | environment override   | default                                             |
//! |-----------------|------------------------|-----------------------------------------------------|
//! | [`data_dir`]    | `GATEVM_DATA_DIR`      | `$XDG_DATA_HOME/gatevm`, else `~/.local/share/gatevm` |
//! | [`runtime_dir`] | `GATEVM_RUNTIME_DIR`   | `data_dir()/runtime/v1`                             |
//! | [`cache_dir`]   | `GATEVM_CACHE_DIR`     | `$XDG_CACHE_HOME/gatevm`, else `~/.cache/gatevm`    |
//!
//! The resolvers read nothing but the ownership of the directories the environment names;
//! [`ensure_dir`] creates a directory (and its missing parents) with mode 0700.
//!
//! A directory from the environment is used only when it belongs to the calling user (when it
//! does not exist yet: when its nearest existing ancestor belongs to the user or to root), so
//! that `sudo gatevm`, which keeps the caller's `XDG_*` variables, never writes root's files
//! into another user's directories or runs binaries from them. An `XDG_*` variable naming
//! someone else's directory is ignored with a warning (the next default applies); a
//! `GATEVM_*_DIR` one, which can only have been set on purpose, is an error naming the
//! variable ([`DirsError::NotOwned`]).

use std::ffi::OsString;
use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Version of the runtime bundle layout; part of the default [`runtime_dir`] path so that a
/// future incompatible layout lives next to this one instead of overwriting it.
pub(crate) const RUNTIME_LAYOUT_VERSION: u32 = 1;

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
    /// A `GATEVM_*_DIR` variable names a directory that belongs to another user.
    #[error("{var}={} is not owned by the calling user (uid {uid}): {why}; unset it or point it at your own directory", path.display())]
    NotOwned {
        /// The variable.
        var: &'static str,
        /// Its value.
        path: PathBuf,
        /// The calling user.
        uid: u32,
        /// Who owns what.
        why: String,
    },
    /// Creating a directory failed.
    #[error("cannot create directory {}", path.display())]
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

/// Whether `path` may be used as a directory of the calling user `uid`: it exists and belongs to
/// `uid`, or it does not exist and its nearest existing ancestor belongs to `uid` or to root.
/// The error says who owns what.
pub(crate) fn check_owner(path: &Path, uid: u32) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(m) if m.uid() == uid => return Ok(()),
        Ok(m) => return Err(format!("it belongs to uid {}", m.uid())),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("cannot check its owner: {e}"))
        }
        Err(_) => {}
    }
    let mut at = path.parent();
    while let Some(p) = at {
        match std::fs::metadata(p) {
            Ok(m) if m.uid() == uid || m.uid() == 0 => return Ok(()),
            Ok(m) => {
                return Err(format!(
                    "it does not exist and {} belongs to uid {}",
                    p.display(),
                    m.uid()
                ))
            }
            Err(_) => at = p.parent(),
        }
    }
    Ok(())
}

/// The effective uid of this process.
pub(crate) fn caller_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// An `XDG_*` directory variable through `get`, ignored (with a warning) when it names another
/// user's directory.
fn xdg_path(get: &dyn Fn(&str) -> Option<OsString>, var: &str) -> Option<PathBuf> {
    let p = var_path(get, var)?;
    match check_owner(&p, caller_uid()) {
        Ok(()) => Some(p),
        Err(why) => {
            tracing::warn!(
                "ignoring {var}={}: not owned by the calling user ({why})",
                p.display()
            );
            None
        }
    }
}

/// A `GATEVM_*_DIR` variable through `get`; an error when it names another user's directory.
fn gatevm_path(
    get: &dyn Fn(&str) -> Option<OsString>,
    var: &'static str,
) -> Result<Option<PathBuf>, DirsError> {
    let Some(p) = var_path(get, var) else {
        return Ok(None);
    };
    let uid = caller_uid();
    check_owner(&p, uid).map_err(|why| DirsError::NotOwned {
        var,
        path: p.clone(),
        uid,
        why,
    })?;
    Ok(Some(p))
}

/// An absolute directory from the environment variable `var` (`XDG_*` or `GATEVM_*_DIR`), used
/// only when it belongs to the calling user, as the module documentation says.
pub fn env_dir(var: &'static str) -> Result<Option<PathBuf>, DirsError> {
    if var.starts_with("XDG_") {
        Ok(xdg_path(&process_env, var))
    } else {
        gatevm_path(&process_env, var)
    }
}

fn process_env(var: &str) -> Option<OsString> {
    std::env::var_os(var)
}

fn resolve_data(get: &dyn Fn(&str) -> Option<OsString>) -> Result<PathBuf, DirsError> {
    if let Some(p) = gatevm_path(get, "GATEVM_DATA_DIR")? {
        return Ok(p);
    }
    if let Some(p) = xdg_path(get, "XDG_DATA_HOME") {
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
    if let Some(p) = gatevm_path(get, "GATEVM_RUNTIME_DIR")? {
        return Ok(p);
    }
    Ok(resolve_data(get)?
        .join("runtime")
        .join(format!("v{RUNTIME_LAYOUT_VERSION}")))
}

fn resolve_cache(get: &dyn Fn(&str) -> Option<OsString>) -> Result<PathBuf, DirsError> {
    if let Some(p) = gatevm_path(get, "GATEVM_CACHE_DIR")? {
        return Ok(p);
    }
    if let Some(p) = xdg_path(get, "XDG_CACHE_HOME") {
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
pub(crate) fn rootfs_root() -> Result<PathBuf, DirsError> {
    Ok(data_dir()?.join("rootfs"))
}

/// Creates `path` and any missing parents with mode 0700. Existing directories keep their mode.
pub(crate) fn ensure_dir(path: &Path) -> Result<(), DirsError> {
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

    /// Root (or anyone) ignores an XDG directory of another user and refuses a GATEVM_*_DIR one.
    #[test]
    fn other_users_directories_are_not_used() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let mine = tmp.path().join("mine");
        std::fs::create_dir(&mine).unwrap();
        let theirs = tmp.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        let uid = caller_uid();
        let other = if uid == 0 { 4242 } else { 0 };
        if uid == 0 {
            std::os::unix::fs::chown(&theirs, Some(other), Some(other)).unwrap();
        }
        let theirs = if uid == 0 { theirs } else { PathBuf::from("/") };
        assert_eq!(std::fs::metadata(&theirs).unwrap().uid(), other);
        assert_eq!(check_owner(&mine, uid), Ok(()));
        assert!(check_owner(&theirs, uid)
            .unwrap_err()
            .contains(&format!("uid {other}")));
        // Not there yet: judged by the nearest existing ancestor (another user's refuses).
        assert_eq!(check_owner(&mine.join("a/b"), uid), Ok(()));
        if uid == 0 {
            let e = check_owner(&theirs.join("a/b"), uid).unwrap_err();
            assert!(e.contains("does not exist"), "{e}");
        }
        let (mine_s, theirs_s) = (mine.into_os_string(), theirs.into_os_string());
        let get = move |k: &str| match k {
            "HOME" => Some(OsString::from("/home/u")),
            "XDG_DATA_HOME" | "XDG_CACHE_HOME" | "GATEVM_CACHE_DIR" => Some(theirs_s.clone()),
            "GATEVM_DATA_DIR" => None,
            "GATEVM_RUNTIME_DIR" => Some(mine_s.clone()),
            _ => None,
        };
        // XDG: ignored, the default applies.
        assert_eq!(
            resolve_data(&get).unwrap(),
            Path::new("/home/u/.local/share/gatevm")
        );
        // GATEVM_*_DIR: refused, naming the variable.
        let e = resolve_cache(&get).unwrap_err();
        assert!(
            matches!(
                e,
                DirsError::NotOwned {
                    var: "GATEVM_CACHE_DIR",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().starts_with("GATEVM_CACHE_DIR="), "{e}");
        // One's own is used.
        assert_eq!(
            resolve_runtime(&get).unwrap(),
            PathBuf::from(get("GATEVM_RUNTIME_DIR").unwrap())
        );
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
