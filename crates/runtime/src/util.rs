//! Small file-system helpers shared by the modules of this crate.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Writes `data` to `path` atomically: a temporary file in the same directory, fsync, chmod,
/// rename over the target.
pub(crate) fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    tmp.write_all(data)?;
    tmp.as_file().sync_all()?;
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(mode))?;
    crate::fsutil::persist_durable(tmp, path)?;
    Ok(())
}

/// Copies a file to `dest` atomically (temporary file next to it, then rename), keeping `mode`.
pub(crate) fn copy_atomic(src: &Path, dest: &Path, mode: u32) -> io::Result<()> {
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    let mut input = File::open(src)?;
    let mut out = tmp.as_file();
    io::copy(&mut input, &mut out)?;
    out.sync_all()?;
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(mode))?;
    crate::fsutil::persist_durable(tmp, dest)?;
    Ok(())
}

/// SHA-256 of a file's contents, hex.
pub(crate) fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

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

/// Mount points at or below `path` (from /proc/self/mountinfo). Used to refuse deleting a
/// directory that still has something mounted inside it (a half-built chroot with /proc or /dev).
pub(crate) fn mounts_under(path: &Path) -> Vec<PathBuf> {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let canon = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|m| m.starts_with(&canon))
        .collect()
}

fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let oct = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(oct, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

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
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/x\\"), "/x\\");
        assert!(mounts_under(Path::new("/proc")).contains(&PathBuf::from("/proc")));
    }
}
