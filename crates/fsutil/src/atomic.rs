//! Durable atomic replacement of a file.
//!
//! An atomic write is a temporary file in the target's directory, created with its final mode
//! (never readable by others, whatever the umask), written and fsynced, then renamed over the
//! target. The rename itself lives in the directory: until the directory is fsynced too, a crash
//! can bring back the old name (or no name at all), so [`rename_durable`] syncs it. Every
//! gatevm crate replaces files through here; a test in this crate finds plain renames elsewhere.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The suffix of every temporary file [`write_atomic`] and [`copy_atomic`] create (they also
/// start with `.`), so a directory scan can tell them from real files.
pub const TMP_SUFFIX: &str = ".gatevm-tmp";

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
    fs::rename(from, to)?;
    let (a, b) = (parent_of(from), parent_of(to));
    sync_dir(b)?;
    if a != b {
        sync_dir(a)?;
    }
    Ok(())
}

/// A fresh temporary name next to `path`: `.NAME.PID.N.gatevm-tmp`.
fn temp_name(path: &Path) -> io::Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} has no file name", path.display()),
        )
    })?;
    Ok(parent_of(path).join(format!(
        ".{}.{}.{}{TMP_SUFFIX}",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )))
}

/// Creates a temporary file next to `path` with exactly `mode`, lets `fill` write it (and set
/// what else it wants, such as the modification time), syncs it and renames it over `path`
/// durably. An empty directory in the file's place (left by an accident, never by gatevm) gives
/// way; anything else is reported. The temporary file is removed on every failure. The parent
/// directory must exist.
pub fn write_atomic_with(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let tmp = temp_name(path)?;
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        // The umask may have cleared bits of `mode` (0644 under umask 077): set it exactly.
        f.set_permissions(Permissions::from_mode(mode))?;
        fill(&mut f)?;
        f.sync_all()?;
        drop(f);
        rename_durable(&tmp, path).or_else(|e| {
            let is_dir = fs::symlink_metadata(path).is_ok_and(|m| m.is_dir());
            if is_dir && fs::remove_dir(path).is_ok() {
                rename_durable(&tmp, path)
            } else {
                Err(e)
            }
        })
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes `data` to `path` atomically and durably with exactly `mode`: readers see the old file
/// or the new one, never a part, and a crash after the return keeps the new one.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    write_atomic_with(path, mode, |f| f.write_all(data))
}

/// Copies the file `src` to `dest` as [`write_atomic`] writes.
pub fn copy_atomic(src: &Path, dest: &Path, mode: u32) -> io::Result<()> {
    let mut input = File::open(src)?;
    write_atomic_with(dest, mode, |f| io::copy(&mut input, f).map(drop))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn rename_durable_replaces_and_reports_errors() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        let b = d.path().join("b");
        fs::write(&a, b"new").unwrap();
        fs::write(&b, b"old").unwrap();
        rename_durable(&a, &b).unwrap();
        assert_eq!(fs::read(&b).unwrap(), b"new");
        assert!(!a.exists());
        // Across directories; and a missing source is an error, not a silent success.
        let sub = d.path().join("sub");
        fs::create_dir(&sub).unwrap();
        rename_durable(&b, &sub.join("c")).unwrap();
        assert_eq!(fs::read(sub.join("c")).unwrap(), b"new");
        assert!(rename_durable(&a, &b).is_err());
        // A bare name resolves against the working directory's parent ".".
        assert_eq!(parent_of(Path::new("x")), Path::new("."));
    }

    #[test]
    fn write_atomic_sets_the_exact_mode_and_replaces() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("key.pem");
        write_atomic(&p, b"one", 0o600).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        write_atomic(&p, b"two", 0o644).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o644);
        // No temporary file is left behind.
        assert_eq!(names(d.path()), vec!["key.pem"]);
    }

    #[test]
    fn write_atomic_replaces_an_empty_directory_but_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.json");
        fs::create_dir(&p).unwrap();
        write_atomic(&p, b"{}", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"{}");
        let full = d.path().join("full");
        fs::create_dir(&full).unwrap();
        fs::write(full.join("keep"), b"x").unwrap();
        assert!(write_atomic(&full, b"{}", 0o600).is_err());
        assert_eq!(fs::read(full.join("keep")).unwrap(), b"x");
        assert_eq!(names(d.path()), vec!["full", "state.json"]);
    }

    #[test]
    fn write_atomic_fails_cleanly() {
        let d = tempfile::tempdir().unwrap();
        // A missing directory, and a path without a file name.
        assert!(write_atomic(&d.path().join("no/such/file"), b"x", 0o600).is_err());
        assert!(write_atomic(Path::new("/"), b"x", 0o600).is_err());
        assert!(names(d.path()).is_empty());
    }

    #[test]
    fn a_symlink_target_is_replaced_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("outside");
        fs::write(&outside, b"keep").unwrap();
        let link = d.path().join("config");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        write_atomic(&link, b"new", 0o644).unwrap();
        assert_eq!(fs::read(&outside).unwrap(), b"keep");
        assert!(fs::symlink_metadata(&link).unwrap().is_file());
    }

    #[test]
    fn copy_atomic_copies_with_the_mode() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::write(&src, b"payload").unwrap();
        let dest = d.path().join("dest");
        copy_atomic(&src, &dest, 0o755).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"payload");
        assert_eq!(fs::metadata(&dest).unwrap().mode() & 0o777, 0o755);
        assert!(copy_atomic(&d.path().join("missing"), &dest, 0o755).is_err());
        assert_eq!(fs::read(&dest).unwrap(), b"payload");
        assert_eq!(names(d.path()), vec!["dest", "src"]);
    }

    #[test]
    fn temporary_names_carry_the_suffix() {
        let t = temp_name(Path::new("/x/y.conf")).unwrap();
        let n = t.file_name().unwrap().to_string_lossy().into_owned();
        assert!(n.starts_with(".y.conf.") && n.ends_with(TMP_SUFFIX), "{n}");
        assert_ne!(t, temp_name(Path::new("/x/y.conf")).unwrap());
    }

    /// Every host-side rename goes through [`rename_durable`]: a plain `fs::rename` in the host
    /// crates (outside this module) is an atomic write whose directory is never synced.
    #[test]
    fn no_host_crate_renames_without_syncing() {
        let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut offenders = Vec::new();
        for krate in [
            "runtime", "oci", "kernel", "instance", "k3s", "net", "vmm", "cli",
        ] {
            let src = crates.join(krate).join("src");
            // A renamed crate must be renamed here too, or the guard covers nothing.
            assert!(src.is_dir(), "{} is not a crate's sources", src.display());
            let mut stack = vec![src];
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
                    if p.extension().is_none_or(|x| x != "rs")
                        || p.ends_with("runtime/src/fsutil.rs")
                    {
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
