//! File-system helpers shared by the payload profiles (those of every crate are in
//! `gatevm-fsutil`). Nothing here knows a profile.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

pub(crate) use gatevm_fsutil::{write_atomic, write_atomic_with, TMP_SUFFIX};

/// Creates a directory and its parents, new ones with mode 0700 (existing ones keep theirs).
pub(crate) use gatevm_fsutil::create_dirs_private as mkdir_private;

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
