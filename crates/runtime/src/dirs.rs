//! Where gatevm keeps its data, its runtime bundle and its caches.
//!
//! | function        | environment override   | default                                             |
//! |-----------------|------------------------|-----------------------------------------------------|
//! | [`data_dir`]    | `GATEVM_DATA_DIR`      | `$XDG_DATA_HOME/gatevm`, else `~/.local/share/gatevm` |
//! | [`own_runtime_dir`] | `GATEVM_RUNTIME_DIR` | `data_dir()/runtime/v1`                          |
//! | [`runtime_dir`] | `GATEVM_RUNTIME_DIR`   | [`own_runtime_dir`] when complete, else the system one |
//! | [`cache_dir`]   | `GATEVM_CACHE_DIR`     | `$XDG_CACHE_HOME/gatevm`, else `~/.cache/gatevm`    |
//! | [`system_dir`]  | `GATEVM_SYSTEM_DIR`    | `/var/lib/gatevm` (written by `gatevm setup --system`) |
//!
//! The system directory holds a runtime (`runtime/v1`) and base rootfs trees (`rootfs/`) that root
//! built once for every user of the host. [`locate_runtime`] picks the runtime a command uses: the
//! caller's own when it is complete (or `GATEVM_RUNTIME_DIR`), otherwise the system one when it
//! is there, and only when it belongs to root and nobody else can write to it
//! ([`DirsError::SystemUntrusted`] says why not). For root that means its own data directory as
//! before, unless root set up only the system runtime.
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
    /// `GATEVM_SYSTEM_DIR` names a directory that belongs neither to root nor to the caller.
    #[error("GATEVM_SYSTEM_DIR={} belongs neither to root nor to the calling user (uid {uid}): {why}", path.display())]
    SystemNotOwned {
        /// Its value.
        path: PathBuf,
        /// The calling user.
        uid: u32,
        /// Who owns what.
        why: String,
    },
    /// The system runtime is there but is not used: it belongs to someone other than root, or
    /// others can write to it.
    #[error("the system runtime {} is not used: {why}; repair it with `sudo gatevm setup --system`", path.display())]
    SystemUntrusted {
        /// The system runtime directory.
        path: PathBuf,
        /// Which path is wrong and how.
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

/// The runtime bundle directory (kernel, modules, helper binaries, provenance) that commands
/// use: [`locate_runtime`]'s.
pub fn runtime_dir() -> Result<PathBuf, DirsError> {
    Ok(locate_runtime()?.runtime)
}

/// The caller's own runtime bundle directory, where `gatevm setup` (run by root, or with the
/// host packages at hand) installs and the k3s binary is cached: `$GATEVM_RUNTIME_DIR`, else
/// `data_dir()/runtime/v1`.
pub fn own_runtime_dir() -> Result<PathBuf, DirsError> {
    resolve_runtime(&process_env)
}

/// The cache directory (downloads, private apt state, build trees, logs): `$GATEVM_CACHE_DIR`,
/// else `$XDG_CACHE_HOME/gatevm`, else `$HOME/.cache/gatevm`. Everything in it can be deleted.
pub fn cache_dir() -> Result<PathBuf, DirsError> {
    resolve_cache(&process_env)
}

/// The directory holding the base root filesystems of the runtime in use: `data_dir()/rootfs`,
/// or the system directory's `rootfs` when [`locate_runtime`] picks the system runtime.
pub fn rootfs_root() -> Result<PathBuf, DirsError> {
    Ok(locate_runtime()?.rootfs_root)
}

/// Where `gatevm setup --system` puts the runtime and base rootfs trees for every user.
pub const DEFAULT_SYSTEM_DIR: &str = "/var/lib/gatevm";

/// The system directory ([`DEFAULT_SYSTEM_DIR`] or `GATEVM_SYSTEM_DIR`) and whom its contents may
/// belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemDir {
    /// The directory.
    pub path: PathBuf,
    /// Owners accepted for it and everything in it: root; with `GATEVM_SYSTEM_DIR` (for tests)
    /// also the calling user.
    pub owners: Vec<u32>,
}

impl SystemDir {
    /// The runtime bundle in it: `runtime/v1`.
    pub fn runtime(&self) -> PathBuf {
        self.path
            .join("runtime")
            .join(format!("v{RUNTIME_LAYOUT_VERSION}"))
    }

    /// The directory of its base rootfs trees: `rootfs`.
    pub fn rootfs_root(&self) -> PathBuf {
        self.path.join("rootfs")
    }
}

fn resolve_system(
    get: &dyn Fn(&str) -> Option<OsString>,
    uid: u32,
) -> Result<SystemDir, DirsError> {
    let Some(path) = var_path(get, "GATEVM_SYSTEM_DIR") else {
        return Ok(SystemDir {
            path: PathBuf::from(DEFAULT_SYSTEM_DIR),
            owners: vec![0],
        });
    };
    let mut owners = vec![0];
    if uid != 0 {
        owners.push(uid);
    }
    // As for the other GATEVM_*_DIR variables, judged by the directory or its nearest existing
    // ancestor; root's directory is accepted too.
    if check_owner(&path, uid).is_err() {
        check_owner(&path, 0).map_err(|why| DirsError::SystemNotOwned {
            path: path.clone(),
            uid,
            why,
        })?;
    }
    Ok(SystemDir { path, owners })
}

/// The system directory: `$GATEVM_SYSTEM_DIR` (which must belong to root or to the caller),
/// else [`DEFAULT_SYSTEM_DIR`].
pub fn system_dir() -> Result<SystemDir, DirsError> {
    resolve_system(&process_env, caller_uid())
}

/// Which runtime [`locate_runtime`] picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuntimeSource {
    /// `GATEVM_RUNTIME_DIR`, used as it is.
    Env,
    /// The caller's own, complete.
    Own,
    /// The system one (`gatevm setup --system`).
    System,
    /// None is set up: the paths are the caller's own, where `gatevm setup` would install.
    NotSetUp,
}

/// The runtime a command uses and the base rootfs trees that go with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeLocation {
    /// The runtime bundle directory.
    pub runtime: PathBuf,
    /// The directory of its base rootfs trees.
    pub rootfs_root: PathBuf,
    /// Which one it is.
    pub source: RuntimeSource,
    /// The system directory that was considered (`None` with `GATEVM_RUNTIME_DIR`).
    pub system: Option<SystemDir>,
}

/// Whether `path` may be trusted as part of the system runtime: it belongs to one of `owners`
/// and neither its group nor others can write to it (a symbolic link: only its owner counts; its
/// target is judged where it lies). The error names the path and what is wrong with it.
pub(crate) fn check_trusted(path: &Path, owners: &[u32]) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path)
        .map_err(|e| format!("cannot check {}: {e}", path.display()))?;
    if !owners.contains(&m.uid()) {
        let whom = if owners == [0] {
            "root".to_string()
        } else {
            owners
                .iter()
                .map(|u| format!("uid {u}"))
                .collect::<Vec<_>>()
                .join(" or ")
        };
        return Err(format!(
            "{} belongs to uid {}, not to {whom}",
            path.display(),
            m.uid()
        ));
    }
    if m.file_type().is_symlink() {
        return Ok(());
    }
    let writable = match m.mode() & 0o022 {
        0 => return Ok(()),
        0o020 => "its group",
        0o002 => "others",
        _ => "its group and others",
    };
    Err(format!(
        "{} is writable by {writable} (mode {:04o})",
        path.display(),
        m.mode() & 0o7777
    ))
}

/// [`check_trusted`] on `path` and everything below it.
fn check_trusted_tree(path: &Path, owners: &[u32]) -> Result<(), String> {
    check_trusted(path, owners)?;
    let is_dir = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir());
    if is_dir {
        let rd =
            std::fs::read_dir(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        for e in rd {
            let e = e.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            check_trusted_tree(&e.path(), owners)?;
        }
    }
    Ok(())
}

/// Checks what a command would run or read from the system directory: the directory itself,
/// `runtime`, everything in `runtime/v1` (about 1,500 entries, a few milliseconds), and `rootfs`
/// with its entries (not the insides of its trees, whose modes are the guest's).
fn check_system_tree(sys: &SystemDir) -> Result<(), String> {
    check_trusted(&sys.path, &sys.owners)?;
    check_trusted(&sys.path.join("runtime"), &sys.owners)?;
    check_trusted_tree(&sys.runtime(), &sys.owners)?;
    let rootfs = sys.rootfs_root();
    if rootfs.exists() {
        check_trusted(&rootfs, &sys.owners)?;
        let rd = std::fs::read_dir(&rootfs)
            .map_err(|e| format!("cannot read {}: {e}", rootfs.display()))?;
        for e in rd {
            let e = e.map_err(|e| format!("cannot read {}: {e}", rootfs.display()))?;
            check_trusted(&e.path(), &sys.owners)?;
        }
    }
    Ok(())
}

/// What [`locate_with`] asks about a runtime: whether the one at `(runtime, rootfs_root)` is
/// complete.
pub(crate) type Complete<'a> = &'a dyn Fn(&Path, &Path) -> bool;

/// [`locate_runtime`] with the environment, the caller and the completeness check injected.
pub(crate) fn locate_with(
    get: &dyn Fn(&str) -> Option<OsString>,
    uid: u32,
    complete: Complete<'_>,
) -> Result<RuntimeLocation, DirsError> {
    if let Some(p) = gatevm_path(get, "GATEVM_RUNTIME_DIR")? {
        return Ok(RuntimeLocation {
            runtime: p,
            rootfs_root: resolve_data(get)?.join("rootfs"),
            source: RuntimeSource::Env,
            system: None,
        });
    }
    let data = resolve_data(get)?;
    let own = resolve_runtime(get)?;
    let own_rootfs = data.join("rootfs");
    let sys = resolve_system(get, uid)?;
    if complete(&own, &own_rootfs) {
        return Ok(RuntimeLocation {
            runtime: own,
            rootfs_root: own_rootfs,
            source: RuntimeSource::Own,
            system: Some(sys),
        });
    }
    let sys_runtime = sys.runtime();
    if !sys_runtime
        .join(crate::provenance::PROVENANCE_FILE)
        .exists()
    {
        return Ok(RuntimeLocation {
            runtime: own,
            rootfs_root: own_rootfs,
            source: RuntimeSource::NotSetUp,
            system: Some(sys),
        });
    }
    check_system_tree(&sys).map_err(|why| DirsError::SystemUntrusted {
        path: sys_runtime.clone(),
        why,
    })?;
    Ok(RuntimeLocation {
        runtime: sys_runtime,
        rootfs_root: sys.rootfs_root(),
        source: RuntimeSource::System,
        system: Some(sys),
    })
}

/// The runtime commands use, as the module documentation says: `GATEVM_RUNTIME_DIR`; else the
/// caller's own when complete; else the system one when set up (an error when it belongs to
/// someone other than root or others can write to it); else the caller's own paths
/// ([`RuntimeSource::NotSetUp`]).
pub fn locate_runtime() -> Result<RuntimeLocation, DirsError> {
    locate_with(&process_env, caller_uid(), &|rt, rootfs| {
        crate::runtime::Runtime::load_from(rt, rootfs).is_ok()
    })
}

/// Creates `path` and any missing parents with mode 0755 (for the system directory, which every
/// user reads). Existing directories keep their mode ([`crate::setup`] fixes them afterwards).
pub(crate) fn ensure_public_dir(path: &Path) -> Result<(), DirsError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(|source| DirsError::Create {
            path: path.to_path_buf(),
            source,
        })
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

    /// A system directory under `tmp` with a manifest and `bin/gvproxy`, modes as
    /// `setup --system` leaves them.
    fn system_tree(tmp: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let sys = tmp.join("sys");
        let rt = sys.join("runtime/v1");
        std::fs::create_dir_all(rt.join("bin")).unwrap();
        std::fs::create_dir_all(sys.join("rootfs")).unwrap();
        std::fs::write(rt.join("provenance.json"), b"{}").unwrap();
        std::fs::write(rt.join("bin/gvproxy"), b"x").unwrap();
        for d in ["", "runtime", "runtime/v1", "runtime/v1/bin", "rootfs"] {
            std::fs::set_permissions(sys.join(d), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        sys
    }

    /// Resolution between the caller's own runtime and the system one (`setup --system`): own
    /// when complete, else the system one when it is there and nobody but its owner can write to
    /// it, else the caller's own paths as "not set up".
    #[test]
    fn locate_prefers_own_then_trusted_system() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let sys = system_tree(tmp.path());
        let data = tmp.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let uid = caller_uid();
        let (sys_s, data_s) = (sys.clone().into_os_string(), data.clone().into_os_string());
        let get = move |k: &str| match k {
            "GATEVM_SYSTEM_DIR" => Some(sys_s.clone()),
            "GATEVM_DATA_DIR" => Some(data_s.clone()),
            _ => None,
        };
        let own = data.join("runtime/v1");
        let sys_rt = sys.join("runtime/v1");
        let own_complete = std::cell::Cell::new(false);
        let sys_complete = std::cell::Cell::new(true);
        let complete = |rt: &Path, _: &Path| -> bool {
            (rt == own && own_complete.get()) || (rt == sys_rt && sys_complete.get())
        };
        let expected_sys = SystemDir {
            path: sys.clone(),
            owners: if uid == 0 { vec![0] } else { vec![0, uid] },
        };

        // Own incomplete, system trusted: the system one, with its rootfs trees.
        let at = locate_with(&get, uid, &complete).unwrap();
        assert_eq!(
            at,
            RuntimeLocation {
                runtime: sys_rt.clone(),
                rootfs_root: sys.join("rootfs"),
                source: RuntimeSource::System,
                system: Some(expected_sys.clone()),
            }
        );

        // Own complete: own, whatever the system one is.
        own_complete.set(true);
        let at = locate_with(&get, uid, &complete).unwrap();
        assert_eq!(at.runtime, own);
        assert_eq!(at.rootfs_root, data.join("rootfs"));
        assert_eq!(at.source, RuntimeSource::Own);
        own_complete.set(false);

        // System incomplete: still the system one (loading it then says what is missing).
        sys_complete.set(false);
        let at = locate_with(&get, uid, &complete).unwrap();
        assert_eq!(at.source, RuntimeSource::System);
        sys_complete.set(true);

        // A file of the system runtime writable by others: refused, naming it and its mode.
        let gv = sys_rt.join("bin/gvproxy");
        std::fs::set_permissions(&gv, std::fs::Permissions::from_mode(0o646)).unwrap();
        let e = locate_with(&get, uid, &complete).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "the system runtime {} is not used: {} is writable by others (mode 0646); \
                 repair it with `sudo gatevm setup --system`",
                sys_rt.display(),
                gv.display()
            )
        );
        std::fs::set_permissions(&gv, std::fs::Permissions::from_mode(0o644)).unwrap();
        // A directory on the way, writable by its group and others.
        let bin = sys_rt.join("bin");
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = locate_with(&get, uid, &complete).unwrap_err();
        assert!(matches!(e, DirsError::SystemUntrusted { .. }), "{e}");
        assert!(
            e.to_string().contains(&format!(
                "{} is writable by its group and others (mode 0777)",
                bin.display()
            )),
            "{e}"
        );
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        // The system directory itself, group-writable.
        std::fs::set_permissions(&sys, std::fs::Permissions::from_mode(0o775)).unwrap();
        let e = locate_with(&get, uid, &complete).unwrap_err();
        assert!(
            e.to_string().contains(&format!(
                "{} is writable by its group (mode 0775)",
                sys.display()
            )),
            "{e}"
        );
        std::fs::set_permissions(&sys, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            locate_with(&get, uid, &complete).unwrap().source,
            RuntimeSource::System
        );
        // Any file of the runtime counts, however deep (a kernel module here).
        let ko = sys_rt.join("kernel/lib/modules/6.0/kernel/fs/erofs.ko.xz");
        std::fs::create_dir_all(ko.parent().unwrap()).unwrap();
        std::fs::write(&ko, b"x").unwrap();
        std::fs::set_permissions(&ko, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = locate_with(&get, uid, &complete).unwrap_err();
        assert!(
            e.to_string().contains(&format!(
                "{} is writable by its group and others (mode 0666)",
                ko.display()
            )),
            "{e}"
        );
        std::fs::set_permissions(&ko, std::fs::Permissions::from_mode(0o644)).unwrap();
        // A symbolic link's own mode (always 0777) does not count.
        std::os::unix::fs::symlink("gvproxy", sys_rt.join("bin/gvproxy-link")).unwrap();
        // In rootfs/: its entries count (an image), the insides of a tree do not (the guest's
        // /tmp is 1777).
        let tree_tmp = sys.join("rootfs/0123456789ab/tmp");
        std::fs::create_dir_all(&tree_tmp).unwrap();
        std::fs::set_permissions(&tree_tmp, std::fs::Permissions::from_mode(0o1777)).unwrap();
        std::fs::set_permissions(
            sys.join("rootfs/0123456789ab"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let image = sys.join("rootfs/0123456789ab.erofs");
        std::fs::write(&image, b"x").unwrap();
        std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(
            locate_with(&get, uid, &complete).unwrap().source,
            RuntimeSource::System
        );
        std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o664)).unwrap();
        let e = locate_with(&get, uid, &complete).unwrap_err();
        assert!(
            e.to_string().contains(&format!(
                "{} is writable by its group (mode 0664)",
                image.display()
            )),
            "{e}"
        );
        std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o644)).unwrap();

        // Wrong owner (needs root to give a file away).
        if uid == 0 {
            std::os::unix::fs::chown(&gv, Some(4242), None).unwrap();
            let e = locate_with(&get, uid, &complete).unwrap_err();
            assert!(
                e.to_string().contains(&format!(
                    "{} belongs to uid 4242, not to root",
                    gv.display()
                )),
                "{e}"
            );
            std::os::unix::fs::chown(&gv, Some(0), None).unwrap();
            // GATEVM_SYSTEM_DIR itself owned by another user: refused before anything else.
            std::os::unix::fs::chown(&sys, Some(4242), None).unwrap();
            let e = locate_with(&get, uid, &complete).unwrap_err();
            assert!(matches!(e, DirsError::SystemNotOwned { .. }), "{e}");
            assert!(
                e.to_string().starts_with(&format!(
                    "GATEVM_SYSTEM_DIR={} belongs neither to root nor to the calling user",
                    sys.display()
                )),
                "{e}"
            );
            std::os::unix::fs::chown(&sys, Some(0), None).unwrap();
        } else {
            gatevm_testkit::skip_part(
                "locate_prefers_own_then_trusted_system",
                "wrong owner",
                "giving a file to another user needs root",
            );
        }

        // No system runtime (no manifest): the caller's own paths, not set up.
        std::fs::remove_file(sys_rt.join("provenance.json")).unwrap();
        let at = locate_with(&get, uid, &complete).unwrap();
        assert_eq!(
            at,
            RuntimeLocation {
                runtime: own.clone(),
                rootfs_root: data.join("rootfs"),
                source: RuntimeSource::NotSetUp,
                system: Some(expected_sys),
            }
        );

        // GATEVM_RUNTIME_DIR wins, used as it is.
        let rt_s = own.clone().into_os_string();
        let data_s = data.clone().into_os_string();
        let get = move |k: &str| match k {
            "GATEVM_RUNTIME_DIR" => Some(rt_s.clone()),
            "GATEVM_DATA_DIR" => Some(data_s.clone()),
            _ => None,
        };
        let at = locate_with(&get, uid, &|_: &Path, _: &Path| false).unwrap();
        assert_eq!(at.source, RuntimeSource::Env);
        assert_eq!(at.runtime, own);
        assert_eq!(at.system, None);
    }

    /// Without GATEVM_SYSTEM_DIR the system directory is /var/lib/gatevm, root's only.
    #[test]
    fn system_dir_default_and_override() {
        let get = env(&[("HOME", "/home/u")]);
        let s = resolve_system(&get, 1000).unwrap();
        assert_eq!(
            s,
            SystemDir {
                path: PathBuf::from("/var/lib/gatevm"),
                owners: vec![0],
            }
        );
        assert_eq!(s.runtime(), Path::new("/var/lib/gatevm/runtime/v1"));
        assert_eq!(s.rootfs_root(), Path::new("/var/lib/gatevm/rootfs"));
        // An override that does not exist yet under a root-owned ancestor (/): accepted, and the
        // caller's own files count as trusted in it.
        let get = env(&[("GATEVM_SYSTEM_DIR", "/nonexistent-gatevm-test/sys")]);
        let s = resolve_system(&get, 1000).unwrap();
        assert_eq!(s.owners, vec![0, 1000]);
        assert_eq!(resolve_system(&get, 0).unwrap().owners, vec![0]);
    }
}
