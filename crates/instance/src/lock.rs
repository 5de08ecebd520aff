//! The instance lock: an exclusive `flock` held by the supervisor for its whole life. The kernel
//! drops it when the process dies, however it dies, so a held lock means a live supervisor.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// A held instance lock (released on drop or process exit).
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
}

fn open(path: &Path) -> io::Result<File> {
    let open = || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
    };
    match open() {
        // An empty directory in the lock's place (an accident; gatevm never makes one) gives
        // way; a directory with something in it is reported.
        Err(e) if e.raw_os_error() == Some(libc::EISDIR) => match std::fs::remove_dir(path) {
            Ok(()) => open(),
            Err(_) => Err(io::Error::new(
                e.kind(),
                format!(
                    "the lock {} is a directory, not a file: remove it",
                    path.display()
                ),
            )),
        },
        other => other,
    }
}

/// Takes the lock without waiting; `Ok(None)` when someone else holds it.
pub fn try_lock(path: &Path) -> io::Result<Option<InstanceLock>> {
    // A lock taken on a file that was removed (the instance deleted) or replaced meanwhile
    // locks nothing anyone else sees: take it again on the file now at the path.
    for _ in 0..5 {
        let file = open(path)?;
        // SAFETY: flock on a valid, owned fd; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            return if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                Ok(None)
            } else {
                Err(err)
            };
        }
        use std::os::unix::fs::MetadataExt;
        let same = match (file.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        if same {
            return Ok(Some(InstanceLock { _file: file }));
        }
    }
    Err(io::Error::other(format!(
        "the lock {} keeps being replaced",
        path.display()
    )))
}

/// Whether a live process holds the lock. Only asks: what is not a lock file (missing, a
/// directory) is not held, and is left as it is.
pub fn is_held(path: &Path) -> bool {
    if !std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
        return false;
    }
    matches!(try_lock(path), Ok(None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_and_released_on_drop() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("lock");
        assert!(!is_held(&p));
        let l = try_lock(&p).unwrap().unwrap();
        assert!(try_lock(&p).unwrap().is_none());
        assert!(is_held(&p));
        drop(l);
        assert!(!is_held(&p));
    }

    #[test]
    fn a_lock_on_a_removed_file_is_taken_again() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("lock");
        let old = try_lock(&p).unwrap().unwrap();
        // Removed while held (an instance deleted under a lock holder): a new taker gets the new
        // file, not a lock on the old one that nobody else can see.
        std::fs::remove_file(&p).unwrap();
        let new = try_lock(&p).unwrap().unwrap();
        assert!(try_lock(&p).unwrap().is_none());
        drop(old);
        assert!(try_lock(&p).unwrap().is_none());
        drop(new);
        // A missing directory is an error, not a lock.
        assert!(try_lock(&d.path().join("gone/lock")).is_err());
    }

    #[test]
    fn a_directory_in_the_locks_place() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("lock");
        std::fs::create_dir(&p).unwrap();
        // Asking leaves it alone.
        assert!(!is_held(&p));
        assert!(p.is_dir());
        // Locking replaces an empty one...
        let l = try_lock(&p).unwrap().unwrap();
        assert!(p.is_file());
        assert!(is_held(&p));
        drop(l);
        // ...and names one with content.
        let q = d.path().join("lock2");
        std::fs::create_dir(&q).unwrap();
        std::fs::write(q.join("x"), b"").unwrap();
        let e = try_lock(&q).unwrap_err();
        assert!(e.to_string().contains("is a directory"), "{e}");
        assert!(!is_held(&q));
    }
}
