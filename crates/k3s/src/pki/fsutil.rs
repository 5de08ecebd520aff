//! Private directories and atomic file writes.

use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use super::PkiError;

/// Mode of directories holding keys.
pub(crate) const DIR_MODE: u32 = 0o700;
/// Mode of private keys.
pub(crate) const KEY_MODE: u32 = 0o600;
/// Mode of certificates and other public files.
pub(crate) const PUBLIC_MODE: u32 = 0o644;

fn io_error(action: &'static str, path: &Path, source: io::Error) -> PkiError {
    PkiError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `dir` (and missing parents, 0700) unless it exists, then sets its mode to 0700.
pub(crate) fn ensure_private_dir(dir: &Path) -> Result<(), PkiError> {
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(PkiError::Invalid {
                path: dir.to_path_buf(),
                reason: "exists but is not a directory".into(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(|e| io_error("create directory", dir, e))?,
        Err(e) => return Err(io_error("inspect", dir, e)),
    }
    fs::set_permissions(dir, Permissions::from_mode(DIR_MODE))
        .map_err(|e| io_error("set the mode of", dir, e))
}

/// Whether anything (file, directory, dangling symlink) exists at `path`.
pub(crate) fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// Reads a text file; `None` when it does not exist.
pub(crate) fn read_optional(path: &Path) -> Result<Option<String>, PkiError> {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| PkiError::Invalid {
                path: path.to_path_buf(),
                reason: "is not a text (PEM) file".into(),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("read", path, e)),
    }
}

/// Sets the mode of `path` to `mode` when its permission bits are looser (more bits set for group
/// or others); returns whether it changed anything.
pub(crate) fn tighten_mode(path: &Path, mode: u32) -> Result<bool, PkiError> {
    let current = fs::metadata(path)
        .map_err(|e| io_error("inspect", path, e))?
        .permissions()
        .mode()
        & 0o777;
    if current & !mode & 0o077 == 0 {
        return Ok(false);
    }
    fs::set_permissions(path, Permissions::from_mode(mode))
        .map_err(|e| io_error("set the mode of", path, e))?;
    Ok(true)
}

/// Writes `contents` to `path` with `mode`: a temporary file in the same directory, created
/// with the final mode (so a key is never readable by others, whatever the umask), synced, then
/// renamed over `path`; the directory is synced afterwards. Readers see the old file or the new
/// one, never a part.
pub(crate) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| PkiError::Invalid {
            path: path.to_path_buf(),
            reason: "has no file name".into(),
        })?
        .to_string_lossy();
    let temp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)
            .map_err(|e| io_error("create", &temp, e))?;
        // The umask may have cleared bits of `mode` (0644 under umask 077): set it exactly.
        file.set_permissions(Permissions::from_mode(mode))
            .map_err(|e| io_error("set the mode of", &temp, e))?;
        file.write_all(contents)
            .and_then(|()| file.sync_all())
            .map_err(|e| io_error("write", &temp, e))?;
        gatevm_runtime::fsutil::rename_durable(&temp, path)
            .map_err(|e| io_error("replace", path, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
        return result;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn atomic_write_sets_mode_and_replaces() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        write_atomic(&path, b"one", KEY_MODE).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"one");
        assert_eq!(mode(&path), 0o600);
        write_atomic(&path, b"two", PUBLIC_MODE).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(mode(&path), 0o644);
        let names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("f")],
            "no temporary file is left"
        );
    }

    #[test]
    fn atomic_write_into_missing_dir_fails_cleanly() {
        let tmp = tempfile::tempdir().unwrap();
        let err = write_atomic(&tmp.path().join("missing/f"), b"x", KEY_MODE).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn private_dir_is_created_and_tightened() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        ensure_private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        fs::set_permissions(&dir, Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        let file = tmp.path().join("file");
        fs::write(&file, "").unwrap();
        assert!(ensure_private_dir(&file)
            .unwrap_err()
            .to_string()
            .contains("not a directory"));
    }

    #[test]
    fn tighten_only_when_looser() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("k");
        fs::write(&path, "").unwrap();
        fs::set_permissions(&path, Permissions::from_mode(0o400)).unwrap();
        assert!(!tighten_mode(&path, KEY_MODE).unwrap());
        assert_eq!(mode(&path), 0o400);
        fs::set_permissions(&path, Permissions::from_mode(0o640)).unwrap();
        assert!(tighten_mode(&path, KEY_MODE).unwrap());
        assert_eq!(mode(&path), 0o600);
    }
}
