//! File-system operations confined to the image root.
//!
//! Every operation works on a directory file descriptor and a single path component, never on
//! a host path string. Directories are reached from the root descriptor one component at a
//! time with `O_NOFOLLOW`; a symlink met on the way is resolved *inside* the root, as `chroot`
//! would: an absolute target restarts at the root, `..` stops at the root. The last component
//! of an operation is never followed (`O_NOFOLLOW`, `AT_SYMLINK_NOFOLLOW`, `unlinkat`,
//! `linkat` without `AT_SYMLINK_FOLLOW`), so no host path outside the root can be created,
//! written, chmod-ed, chowned or removed, whatever the layers contain.
//!
//! This relies on nothing else changing the root while we work (the destination is a fresh
//! private directory); against a concurrent local attacker `openat2(RESOLVE_IN_ROOT)` would
//! be needed.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::path::Path;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat, readlinkat, AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, mkdirat, FileStat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};

/// One path component (bytes: Linux file names need not be UTF-8).
pub(super) type Name = Vec<u8>;

/// Symlinks followed while resolving one path (the kernel's limit).
const MAX_SYMLINKS: usize = 40;

/// Deepest directory tree removed or pruned: the recursion holds one descriptor per level,
/// which must stay well under the usual 1024-descriptor limit.
pub(super) const MAX_DEPTH: usize = 512;

/// `openat` returning an owned descriptor (always `O_CLOEXEC`).
pub(super) fn open_at(dir: RawFd, name: &[u8], flags: OFlag, mode: Mode) -> nix::Result<OwnedFd> {
    open_owned(Some(dir), name, flags, mode)
}

/// `openat` (relative to the working directory with `None`) returning an owned descriptor.
fn open_owned<P: ?Sized + nix::NixPath>(
    dir: Option<RawFd>,
    path: &P,
    flags: OFlag,
    mode: Mode,
) -> nix::Result<OwnedFd> {
    let fd = openat(dir, path, flags | OFlag::O_CLOEXEC, mode)?;
    // SAFETY: `openat` just returned this descriptor; nothing else owns or closes it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The file type bits of a stat result.
pub(super) fn kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

/// `lstat` of `name` in `dir`; `None` when it does not exist.
pub(super) fn lstat_at(dir: RawFd, name: &[u8]) -> io::Result<Option<FileStat>> {
    match fstatat(Some(dir), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Opens `name` in `dir` for listing if it is a real directory (not a symlink to one).
/// `None` when it does not exist or is not a directory.
pub(super) fn open_subdir(dir: RawFd, name: &[u8]) -> io::Result<Option<Dir>> {
    match Dir::openat(
        Some(dir),
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(d) => Ok(Some(d)),
        Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The names in a directory, without `.` and `..`.
pub(super) fn list(dir: &mut Dir) -> io::Result<Vec<Name>> {
    let mut names = Vec::new();
    for entry in dir.iter() {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(name);
        }
    }
    Ok(names)
}

/// Removes `name` in `dir` and, if it is a directory, everything below it. Symlinks are
/// removed, never followed. A missing `name` is not an error.
pub(super) fn remove_all(dir: RawFd, name: &[u8], depth: usize) -> io::Result<()> {
    match unlinkat(Some(dir), name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => return Ok(()),
        Err(Errno::EISDIR) => {}
        Err(e) => return Err(e.into()),
    }
    if depth >= MAX_DEPTH {
        return Err(io::Error::other(format!(
            "directory tree deeper than {MAX_DEPTH} levels"
        )));
    }
    if let Some(mut sub) = open_subdir(dir, name)? {
        for child in list(&mut sub)? {
            remove_all(sub.as_raw_fd(), &child, depth + 1)?;
        }
    }
    match unlinkat(Some(dir), name, UnlinkatFlags::RemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Creates a new regular file `name` in `dir` (it must not exist), mode 0600 until the
/// caller sets the real one.
pub(super) fn create_file(dir: RawFd, name: &[u8]) -> io::Result<File> {
    let fd = open_at(
        dir,
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW,
        Mode::from_bits_truncate(0o600),
    )?;
    Ok(File::from(fd))
}

/// The image root: the destination directory, held open.
pub(super) struct Root {
    fd: OwnedFd,
}

impl Root {
    /// Opens the destination directory.
    pub(super) fn open(dest: &Path) -> io::Result<Root> {
        let fd = open_owned(
            None,
            dest,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            Mode::empty(),
        )?;
        Ok(Root { fd })
    }

    /// The root directory's descriptor.
    pub(super) fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// A fresh `O_PATH` descriptor of the root.
    fn top(&self) -> io::Result<OwnedFd> {
        Ok(open_at(
            self.raw(),
            b".",
            OFlag::O_PATH | OFlag::O_DIRECTORY,
            Mode::empty(),
        )?)
    }

    /// Re-opens the directory at physical path `stack` (components already resolved to real
    /// directories, so none is a symlink).
    fn walk(&self, stack: &[Name]) -> io::Result<OwnedFd> {
        let mut cur = self.top()?;
        for c in stack {
            cur = open_at(
                cur.as_raw_fd(),
                c,
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
                Mode::empty(),
            )?;
        }
        Ok(cur)
    }

    /// Opens the directory at `comps` (relative to the root), resolving symlinks inside the
    /// root. With `create`, missing directories are made (mode 0755); without, `Ok(None)` when
    /// something on the way is missing. A non-directory on the way is `ENOTDIR`; more than
    /// [`MAX_SYMLINKS`] symlinks `ELOOP`.
    pub(super) fn resolve_dir(&self, comps: &[Name], create: bool) -> io::Result<Option<OwnedFd>> {
        let mut stack: Vec<Name> = Vec::new();
        let mut cur = self.top()?;
        let mut pending: VecDeque<Name> = comps.iter().cloned().collect();
        let mut links = 0;
        while let Some(c) = pending.pop_front() {
            if c.is_empty() || c == b"." {
                continue;
            }
            if c == b".." {
                if stack.pop().is_some() {
                    cur = self.walk(&stack)?;
                }
                continue;
            }
            let fd = match open_at(
                cur.as_raw_fd(),
                &c,
                OFlag::O_PATH | OFlag::O_NOFOLLOW,
                Mode::empty(),
            ) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) if create => {
                    match mkdirat(
                        Some(cur.as_raw_fd()),
                        &c[..],
                        Mode::from_bits_truncate(0o755),
                    ) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(e.into()),
                    }
                    open_at(
                        cur.as_raw_fd(),
                        &c,
                        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_DIRECTORY,
                        Mode::empty(),
                    )?
                }
                Err(Errno::ENOENT) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let st = fstat(fd.as_raw_fd())?;
            let k = kind(&st);
            if k == SFlag::S_IFDIR {
                stack.push(c);
                cur = fd;
            } else if k == SFlag::S_IFLNK {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(io::Error::other(format!(
                        "more than {MAX_SYMLINKS} symbolic links on the way (a symlink loop?)"
                    )));
                }
                let target = readlinkat(Some(cur.as_raw_fd()), &c[..])?.into_vec();
                if target.first() == Some(&b'/') {
                    stack.clear();
                    cur = self.top()?;
                }
                for part in target.split(|&b| b == b'/').rev() {
                    pending.push_front(part.to_vec());
                }
            } else {
                return Err(io::Error::new(
                    io::ErrorKind::NotADirectory,
                    format!("{} is not a directory", String::from_utf8_lossy(&c)),
                ));
            }
        }
        Ok(Some(cur))
    }

    /// Opens the real directory at `comps` for listing (the root itself when `comps` is
    /// empty). `None` when it is missing or not a directory (a symlink there is not followed).
    pub(super) fn open_listing(&self, comps: &[Name]) -> io::Result<Option<Dir>> {
        match comps.split_last() {
            None => Ok(Some(Dir::openat(
                Some(self.raw()),
                ".",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )?)),
            Some((name, parent)) => match self.resolve_dir(parent, false) {
                Ok(Some(dir)) => open_subdir(dir.as_raw_fd(), name),
                Ok(None) => Ok(None),
                Err(e) if e.kind() == io::ErrorKind::NotADirectory => Ok(None),
                Err(e) => Err(e),
            },
        }
    }
}
