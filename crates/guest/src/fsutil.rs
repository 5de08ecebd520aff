//! File-system helpers shared by the payload profiles: private directories and files written
//! through a temporary file renamed over the target. Nothing here knows a profile.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Suffix of the temporary files written before they are renamed into place; a leftover one
/// (`.<name>.gatevm-tmp`) is what an interrupted write leaves behind.
pub(crate) const TMP_SUFFIX: &str = ".gatevm-tmp";

/// The temporary file a write of `path` goes through: `.<name>.gatevm-tmp` next to it.
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    dir.join(format!(".{}{TMP_SUFFIX}", name.unwrap_or_default()))
}

/// Creates a directory and its parents, new ones with mode 0700.
pub(crate) fn mkdir_private(p: &Path) -> io::Result<()> {
    if p.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new().recursive(true).mode(0o700).create(p)
}

/// Writes `data` to `path` through a temporary file renamed over it.
pub(crate) fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let tmp = tmp_path(path);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    let r = f.write_all(data).and_then(|_| f.sync_all());
    drop(f);
    if let Err(e) = r.and_then(|_| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(())
}

/// Writes a payload's configuration file (mode 0644) through a temporary file, creating its
/// directory (0755) as needed.
pub(crate) fn write_config(path: &Path, text: &str) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)?;
    }
    write_atomic(path, text.as_bytes(), 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_is_written_with_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/gatevm/containerd.toml");
        write_config(&path, "version = 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "version = 2\n");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        write_config(&path, "version = 2\nx = 1\n").unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().ends_with("x = 1\n"));
    }
}
