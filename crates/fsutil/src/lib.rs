//! Small file-system helpers used by every gatevm crate, host and guest alike (the guest agent is
//! linked statically, so this crate depends only on `libc` and the hash).
//!
//! - [`write_atomic`], [`copy_atomic`], [`rename_durable`]: a file is replaced whole or not at
//!   all, and the replacement survives a crash (the directory is synced after the rename);
//! - [`mkdir_private`]: directories only their owner can enter;
//! - [`mountinfo`]: the mount table, with its escapes decoded;
//! - [`sha256_file`].

mod atomic;
pub mod mountinfo;

pub use atomic::{
    copy_atomic, rename_durable, sync_dir, write_atomic, write_atomic_with, TMP_SUFFIX,
};

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

/// Creates a directory and its parents with mode 0700 (parents created here get 0700 too) and
/// tightens an existing one to 0700.
pub fn mkdir_private(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Creates a directory and its missing parents with mode 0700; an existing directory is left as
/// it is (for directories another program owns the modes of, such as k3s's).
pub fn create_dirs_private(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// SHA-256 of a file's contents, as lowercase hex.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn private_dirs_are_created_and_tightened() {
        let d = tempfile::tempdir().unwrap();
        let deep = d.path().join("a/b/c");
        mkdir_private(&deep).unwrap();
        for p in [d.path().join("a"), d.path().join("a/b"), deep.clone()] {
            assert_eq!(
                std::fs::metadata(&p).unwrap().mode() & 0o777,
                0o700,
                "{p:?}"
            );
        }
        std::fs::set_permissions(&deep, std::fs::Permissions::from_mode(0o755)).unwrap();
        mkdir_private(&deep).unwrap();
        assert_eq!(std::fs::metadata(&deep).unwrap().mode() & 0o777, 0o700);
        // A file in the way is an error, not a silent success.
        let f = d.path().join("file");
        std::fs::write(&f, b"x").unwrap();
        assert!(mkdir_private(&f).is_err());
    }

    #[test]
    fn create_dirs_private_leaves_existing_ones() {
        let d = tempfile::tempdir().unwrap();
        let deep = d.path().join("x/y");
        create_dirs_private(&deep).unwrap();
        assert_eq!(std::fs::metadata(&deep).unwrap().mode() & 0o777, 0o700);
        std::fs::set_permissions(&deep, std::fs::Permissions::from_mode(0o755)).unwrap();
        create_dirs_private(&deep).unwrap();
        assert_eq!(std::fs::metadata(&deep).unwrap().mode() & 0o777, 0o755);
    }

    #[test]
    fn sha256_of_a_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(sha256_file(&d.path().join("missing")).is_err());
    }
}
