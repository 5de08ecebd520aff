//! Writing into an instance root from the host. The root is not trusted (the guest writes its
//! upper layer; a `vm-run` image comes from anywhere), so no symlink in it is ever followed: a
//! directory on the way that is a symlink is refused, and a symlink at a file's own path is
//! replaced.

use std::path::{Path, PathBuf};

/// Why a path in an instance root could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum RootDirError {
    /// A relative path with `.` or `..` in it.
    #[error("bad path {0:?}")]
    BadPath(String),
    /// A component on the way is a symlink or a file.
    #[error("the instance root's /{} is not a directory (a symlink or a file)", .0.display())]
    NotADirectory(PathBuf),
    /// A file system operation failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done ("creating", "writing", ...).
        op: &'static str,
        /// On what.
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Maps an I/O error to [`RootDirError::Io`].
fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RootDirError {
    let path = path.to_path_buf();
    move |source| RootDirError::Io { op, path, source }
}

/// The directory `rel` under `root`, created as needed, refusing any symlink or non-directory on
/// the way.
pub fn dir_in_root(root: &Path, rel: &str) -> Result<PathBuf, RootDirError> {
    use std::os::unix::fs::PermissionsExt;
    let mut dir = root.to_path_buf();
    for comp in rel.split('/').filter(|c| !c.is_empty()) {
        if comp == ".." || comp == "." {
            return Err(RootDirError::BadPath(rel.to_string()));
        }
        dir.push(comp);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(RootDirError::NotADirectory(
                    dir.strip_prefix(root).unwrap_or(&dir).to_path_buf(),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&dir).map_err(io_err("creating", &dir))?;
                let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755));
            }
            Err(e) => return Err(io_err("inspecting", &dir)(e)),
        }
    }
    Ok(dir)
}

/// Writes a new file (replacing whatever is there, a symlink included, without following it).
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), RootDirError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let tmp = path.with_extension("gatevm-tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(io_err("creating", &tmp))?;
    f.write_all(bytes).map_err(io_err("writing", &tmp))?;
    drop(f);
    let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode));
    gatevm_fsutil::rename_durable(&tmp, path).map_err(io_err("installing", path))
}

/// Installs a host file at `dest` in the root unless an identical regular file is already there.
pub fn install(src: &Path, dest: &Path, mode: u32) -> Result<(), RootDirError> {
    let new = std::fs::read(src).map_err(io_err("reading", src))?;
    let same = std::fs::symlink_metadata(dest)
        .is_ok_and(|m| m.is_file() && m.len() == new.len() as u64)
        && std::fs::read(dest).ok().as_deref() == Some(&new[..]);
    if same {
        return Ok(());
    }
    write_new(dest, &new, mode)
}
