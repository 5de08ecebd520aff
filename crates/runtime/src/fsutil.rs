//! Durable persisting of the runtime's `tempfile` temporaries (every other durable rename is
//! [`gatevm_fsutil::rename_durable`]).

use std::io;
use std::path::Path;

use gatevm_fsutil::sync_dir;

/// Persists a named temporary file at `to` (atomically, as [`tempfile::NamedTempFile::persist`])
/// and fsyncs the directory.
pub(crate) fn persist_durable(tmp: tempfile::NamedTempFile, to: &Path) -> io::Result<()> {
    tmp.persist(to).map_err(|e| e.error)?;
    let dir = to
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persist_durable_replaces() {
        let d = tempfile::tempdir().unwrap();
        let to = d.path().join("out");
        std::fs::write(&to, b"old").unwrap();
        let mut tmp = tempfile::NamedTempFile::new_in(d.path()).unwrap();
        std::io::Write::write_all(&mut tmp, b"new").unwrap();
        persist_durable(tmp, &to).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"new");
    }
}
