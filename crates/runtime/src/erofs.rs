//! Read-only EROFS images made with `mkfs.erofs` (erofs-utils): the base root file system every
//! instance shares, a throwaway VM's root, the k3s profile's staging image. A VM gets them as
//! read-only disks, so nothing of a root is mounted on the host and the host never reads a file
//! system the guest wrote.

use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

/// The file system UUID every image gets (nothing identifies an image by it).
const UUID: &str = "00000000-0000-0000-0000-000000000000";

/// Errors of making an image.
#[derive(Debug, Error)]
pub enum ErofsError {
    /// `mkfs.erofs` is not installed.
    #[error("mkfs.erofs is not installed (Debian package erofs-utils; `sudo gatevm setup --system` installs it)")]
    Missing,
    /// It could not be run, or it failed.
    #[error("mkfs.erofs {} from {}: {why}", dest.display(), src.display())]
    Failed {
        /// The image.
        dest: PathBuf,
        /// The tree.
        src: PathBuf,
        /// What it said.
        why: String,
    },
}

/// The `mkfs.erofs` found on the host.
pub fn mkfs_erofs() -> Option<PathBuf> {
    crate::cmd::find_program("mkfs.erofs")
}

/// Whose files the image says they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owners {
    /// As on the host (a tree root built, with its owners).
    AsInTree,
    /// All root's (a tree an ordinary user unpacked or staged, whose files are that user's).
    AllRoot,
}

/// Writes an uncompressed EROFS image of the tree `src` to `dest`, through a temporary file next
/// to it renamed into place, so `dest` is always whole. Uncompressed: it builds in seconds and
/// reads with no decompression in the guest (measured in docs/benchmarks.md).
pub fn make_image(src: &Path, dest: &Path, owners: Owners) -> Result<(), ErofsError> {
    let prog = mkfs_erofs().ok_or(ErofsError::Missing)?;
    let fail = |why: String| ErofsError::Failed {
        dest: dest.to_path_buf(),
        src: src.to_path_buf(),
        why,
    };
    let mut tmp = dest.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut c = Command::new(prog);
    c.arg("--quiet").arg(format!("-U{UUID}"));
    if owners == Owners::AllRoot {
        c.arg("--all-root");
    }
    let out = c
        .arg(&tmp)
        .arg(src)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| fail(format!("cannot run it: {e}")))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        return Err(fail(format!("{}: {}", out.status, last.trim())));
    }
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644));
    }
    gatevm_fsutil::rename_durable(&tmp, dest).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        fail(format!("cannot rename it into place: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_is_made_whole_or_not_at_all() {
        if mkfs_erofs().is_none() {
            gatevm_testkit::skip(
                "an_image_is_made_whole_or_not_at_all",
                "mkfs.erofs is not installed (erofs-utils)",
            );
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("tree");
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::write(tree.join("etc/hostname"), "x\n").unwrap();
        let img = d.path().join("img.erofs");
        make_image(&tree, &img, Owners::AllRoot).unwrap();
        let bytes = std::fs::read(&img).unwrap();
        // The EROFS superblock magic (0xE0F5E1E2, little-endian) at offset 1024.
        assert_eq!(&bytes[1024..1028], &[0xe2, 0xe1, 0xf5, 0xe0]);
        // Made again over the old one: replaced whole.
        std::fs::write(tree.join("etc/hostname"), "y\n").unwrap();
        make_image(&tree, &img, Owners::AllRoot).unwrap();
        assert_ne!(std::fs::read(&img).unwrap(), bytes);
        // A missing tree fails with the tree named, and leaves no image or temporary file.
        let bad = d.path().join("bad.erofs");
        let e = make_image(&d.path().join("missing"), &bad, Owners::AsInTree).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        assert!(!bad.exists());
        let left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
