//! Durable file replacement, shared by every crate of the host side.
//!
//! An atomic write is a temporary file in the target's directory, written and fsynced, then
//! renamed over the target. The rename itself lives in the directory: until the directory is
//! fsynced too, a host crash can bring back the old name (or no name at all). [`rename_durable`]
//! is the one place that renames and syncs; every host-side atomic write goes through it.

use std::fs::File;
use std::io;
use std::path::Path;

/// The directory holding `path` (`.` for a bare name).
fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Fsyncs a directory, so the names created, renamed or removed in it survive a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Renames `from` to `to` and fsyncs the directory of `to` (and of `from`, when it is another
/// one). The rename's error is returned as it is; a directory that cannot be synced afterwards
/// is reported too, since the caller asked for durability.
pub fn rename_durable(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::rename(from, to)?;
    let (a, b) = (parent_of(from), parent_of(to));
    sync_dir(b)?;
    if a != b {
        sync_dir(a)?;
    }
    Ok(())
}

/// Persists a named temporary file at `to` (atomically, as [`tempfile::NamedTempFile::persist`])
/// and fsyncs the directory.
pub fn persist_durable(tmp: tempfile::NamedTempFile, to: &Path) -> io::Result<()> {
    tmp.persist(to).map_err(|e| e.error)?;
    sync_dir(parent_of(to))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rename_durable_replaces_and_reports_errors() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        let b = d.path().join("b");
        std::fs::write(&a, b"new").unwrap();
        std::fs::write(&b, b"old").unwrap();
        rename_durable(&a, &b).unwrap();
        assert_eq!(std::fs::read(&b).unwrap(), b"new");
        assert!(!a.exists());
        // Across directories; and a missing source is an error, not a silent success.
        let sub = d.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        rename_durable(&b, &sub.join("c")).unwrap();
        assert_eq!(std::fs::read(sub.join("c")).unwrap(), b"new");
        assert!(rename_durable(&a, &b).is_err());
        // A bare name resolves against the working directory's parent ".".
        assert_eq!(parent_of(Path::new("x")), Path::new("."));
    }

    /// Every host-side rename goes through [`rename_durable`]: a plain `fs::rename` in the host
    /// crates (outside this module) is an atomic write whose directory is never synced.
    #[test]
    fn no_host_crate_renames_without_syncing() {
        let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut offenders = Vec::new();
        for krate in ["image", "instance", "k3s", "net", "vmm", "cli"] {
            let mut stack = vec![crates.join(krate).join("src")];
            while let Some(dir) = stack.pop() {
                let Ok(rd) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for e in rd.flatten() {
                    let p = e.path();
                    if p.is_dir() {
                        stack.push(p);
                        continue;
                    }
                    if p.extension().is_none_or(|x| x != "rs") || p.ends_with("fsutil.rs") {
                        continue;
                    }
                    let text = std::fs::read_to_string(&p).unwrap_or_default();
                    for (i, line) in text.lines().enumerate() {
                        let l = line.trim_start();
                        if l.starts_with("//") {
                            continue;
                        }
                        if l.contains("fs::rename(") || l.contains(".persist(") {
                            offenders.push(format!("{}:{}: {l}", p.display(), i + 1));
                        }
                    }
                }
            }
        }
        assert!(
            offenders.is_empty(),
            "renames without a directory sync:\n{}",
            offenders.join("\n")
        );
    }
}
