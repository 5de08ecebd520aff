//! Small file-system helpers shared by the modules of this crate.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Creates the parent directory of `path` as needed (the runtime directory's layout is made on
/// the fly).
fn create_parent(path: &Path) -> io::Result<()> {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => fs::create_dir_all(dir),
        None => Ok(()),
    }
}

/// [`gatevm_fsutil::write_atomic`], creating the parent directory first.
pub(crate) fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    create_parent(path)?;
    gatevm_fsutil::write_atomic(path, data, mode)
}

/// [`gatevm_fsutil::copy_atomic`], creating the parent directory first.
pub(crate) fn copy_atomic(src: &Path, dest: &Path, mode: u32) -> io::Result<()> {
    create_parent(dest)?;
    gatevm_fsutil::copy_atomic(src, dest, mode)
}

pub(crate) use gatevm_fsutil::sha256_file;

/// Recursively copies the tree at `src` to `dest` (which must not exist yet): directories,
/// regular files (with their permission bits) and symlinks.
pub(crate) fn copy_tree(src: &Path, dest: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(src)?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(src)?, dest)?;
    } else if ft.is_dir() {
        fs::create_dir(dest)?;
        for entry in fs::read_dir(src)? {
            let entry = entry?;
            copy_tree(&entry.path(), &dest.join(entry.file_name()))?;
        }
        fs::set_permissions(dest, fs::Permissions::from_mode(meta.permissions().mode()))?;
    } else if ft.is_file() {
        let mut input = File::open(src)?;
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(meta.permissions().mode() & 0o7777)
            .open(dest)?;
        io::copy(&mut input, &mut out)?;
    }
    // Other file types (sockets, devices) do not occur in the trees we copy; skip them.
    Ok(())
}

/// All regular files and symlinks below `root`, as paths relative to `root`, sorted.
pub(crate) fn list_files(root: &Path) -> io::Result<Vec<PathBuf>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let ft = entry.file_type()?;
            let path = entry.path();
            if ft.is_dir() {
                walk(root, &path, out)?;
            } else if ft.is_file() || ft.is_symlink() {
                if let Ok(rel) = path.strip_prefix(root) {
                    out.push(rel.to_path_buf());
                }
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(root, root, &mut out)?;
    out.sort();
    Ok(out)
}

use gatevm_fsutil::mountinfo::mounts_under;

/// Removes a directory tree unless something is mounted inside it; returns the mount points that
/// prevented removal.
pub(crate) fn remove_tree_safely(path: &Path) -> Result<(), Vec<PathBuf>> {
    let mounts = mounts_under(path);
    if !mounts.is_empty() {
        return Err(mounts);
    }
    let _ = fs::remove_dir_all(path);
    Ok(())
}

/// Seconds since the Unix epoch.
pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_and_hash() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("f");
        write_atomic(&p, b"abc", 0o640).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"abc");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn copy_and_list_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("a/b")).unwrap();
        fs::write(src.join("a/b/f"), "x").unwrap();
        fs::write(src.join("top"), "y").unwrap();
        std::os::unix::fs::symlink("top", src.join("link")).unwrap();
        copy_tree(&src, &tmp.path().join("dst")).unwrap();
        let files = list_files(&tmp.path().join("dst")).unwrap();
        assert_eq!(
            files,
            vec![
                PathBuf::from("a/b/f"),
                PathBuf::from("link"),
                PathBuf::from("top")
            ]
        );
        assert_eq!(
            fs::read_link(tmp.path().join("dst/link")).unwrap(),
            PathBuf::from("top")
        );
    }

    #[test]
    fn mountinfo_unescape() {
        use gatevm_fsutil::mountinfo::unescape;
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/x\\"), "/x\\");
        assert!(mounts_under(Path::new("/proc")).contains(&PathBuf::from("/proc")));
    }
}
