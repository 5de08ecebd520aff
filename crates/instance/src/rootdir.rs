//! Writing into an instance root from the host. The root is not trusted (the guest writes its
//! upper layer; a `vm-run` image comes from anywhere), so no symlink in it is ever followed: a
//! directory on the way that is a symlink is refused, and a symlink at a file's own path is
//! replaced.

use std::path::{Path, PathBuf};

/// The directory `rel` under `root`, created as needed, refusing any symlink or non-directory on
/// the way.
pub fn dir_in_root(root: &Path, rel: &str) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let mut dir = root.to_path_buf();
    for comp in rel.split('/').filter(|c| !c.is_empty()) {
        if comp == ".." || comp == "." {
            return Err(format!("bad path {rel:?}"));
        }
        dir.push(comp);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(format!(
                    "the instance root's /{} is not a directory (a symlink or a file)",
                    dir.strip_prefix(root).unwrap_or(&dir).display()
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&dir)
                    .map_err(|e| format!("creating {}: {e}", dir.display()))?;
                let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755));
            }
            Err(e) => return Err(format!("inspecting {}: {e}", dir.display())),
        }
    }
    Ok(dir)
}

/// Writes a new file (replacing whatever is there, a symlink included, without following it).
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
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
        .map_err(|e| format!("creating {}: {e}", tmp.display()))?;
    f.write_all(bytes)
        .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    drop(f);
    let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode));
    gatevm_fsutil::rename_durable(&tmp, path)
        .map_err(|e| format!("installing {}: {e}", path.display()))
}

/// Installs a host file at `dest` in the root unless an identical regular file is already there.
pub fn install(src: &Path, dest: &Path, mode: u32) -> Result<(), String> {
    let new = std::fs::read(src).map_err(|e| format!("reading {}: {e}", src.display()))?;
    let same = std::fs::symlink_metadata(dest)
        .is_ok_and(|m| m.is_file() && m.len() == new.len() as u64)
        && std::fs::read(dest).ok().as_deref() == Some(&new[..]);
    if same {
        return Ok(());
    }
    write_new(dest, &new, mode)
}
