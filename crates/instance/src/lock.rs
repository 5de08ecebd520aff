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
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
}

/// Takes the lock without waiting; `Ok(None)` when someone else holds it.
pub fn try_lock(path: &Path) -> io::Result<Option<InstanceLock>> {
    let file = open(path)?;
    // SAFETY: flock on a valid, owned fd; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(Some(InstanceLock { _file: file }));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(err)
    }
}

/// Whether a live process holds the lock.
pub fn is_held(path: &Path) -> bool {
    if !path.exists() {
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
}
