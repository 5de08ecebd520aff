//! A private temporary directory, removed when dropped.

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A directory under the system's temporary directory (`$TMPDIR` or /tmp), made with mode 0700.
#[derive(Debug)]
pub struct Scratch {
    dir: PathBuf,
    next: AtomicU64,
}

impl Scratch {
    /// Makes a new directory named after `prefix`, the process id and a counter.
    pub fn new(prefix: &str) -> anyhow::Result<Scratch> {
        use std::os::unix::fs::DirBuilderExt;
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let base = std::env::temp_dir();
        for _ in 0..100 {
            let n = SEQ.fetch_add(1, Ordering::Relaxed);
            let dir = base.join(format!("{prefix}-{}-{n}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {
                    return Ok(Scratch {
                        dir,
                        next: AtomicU64::new(0),
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create {}", dir.display()))
                }
            }
        }
        anyhow::bail!(
            "cannot create a temporary directory under {}",
            base.display()
        )
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// A fresh file name in the directory (`stem-N`), not yet created.
    pub fn unique(&self, stem: &str) -> PathBuf {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("{stem}-{n}"))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_private_and_removed_on_drop() {
        use std::os::unix::fs::PermissionsExt;
        let s = Scratch::new("gatevm-bench-test").unwrap();
        let dir = s.path().to_owned();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::write(s.unique("f"), b"x").unwrap();
        assert_ne!(s.unique("f"), s.unique("f"));
        drop(s);
        assert!(!dir.exists());
    }
}
