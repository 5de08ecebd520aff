//! Applying layer tarballs to the image root, with the overlay semantics of image layers
//! (whiteouts, opaque directories, later entries replacing earlier ones) and the safety rules of
//! [`super`]: entry paths are normalized and refused when they climb above the root; every
//! file-system operation goes through [`super::fs`], which never leaves the root.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{
    fchmod, fchmodat, futimens, mkdirat, utimensat, FchmodatFlags, Mode, SFlag, UtimensatFlags,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, linkat, mkfifoat, symlinkat, Gid, Uid};
use tar::EntryType;

use super::archive::{
    copy_sparse, peek, Budget, Capped, Compression, HashingReader, Sha256Digest, MAGIC_LEN,
};
use super::fs::{self, Name, Root, MAX_DEPTH};
use super::{OciError, UnpackLimits};

/// Longest entry path accepted (Linux `PATH_MAX`).
const MAX_PATH: usize = 4096;

/// Marks a directory whose lower-layer contents are hidden.
const OPAQUE: &[u8] = b".wh..wh..opq";
/// Prefix of a whiteout: `.wh.NAME` deletes `NAME` of lower layers.
const WHITEOUT: &[u8] = b".wh.";
/// Prefix of aufs metadata entries (`.wh..wh.plnk`, `.wh..wh.aufs`), which are skipped.
const AUFS_META: &[u8] = b".wh..wh.";

/// Splits an entry path into components: a leading `/` or `./` means the root, `.` and empty
/// components are dropped, `..` removes the previous component. A `..` that would climb
/// above the root is refused (the entry is an error), as are NUL bytes and paths longer than
/// `PATH_MAX`.
pub(super) fn normalize(path: &[u8]) -> Result<Vec<Name>, &'static str> {
    if path.len() > MAX_PATH {
        return Err("path is longer than 4096 bytes");
    }
    if path.contains(&0) {
        return Err("path contains a NUL byte");
    }
    let mut comps: Vec<Name> = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                if comps.pop().is_none() {
                    return Err("path climbs above the image root with '..'");
                }
            }
            c => comps.push(c.to_vec()),
        }
    }
    Ok(comps)
}

fn show(comps: &[Name]) -> String {
    String::from_utf8_lossy(&comps.join(&b'/')).into_owned()
}

/// The paths an entry of the current layer created or passed through: what whiteouts and
/// opaque markers of the same layer must leave alone.
#[derive(Default)]
struct Node {
    children: HashMap<Name, Node>,
}

impl Node {
    fn insert(&mut self, comps: &[Name]) {
        let mut node = self;
        for c in comps {
            node = node.children.entry(c.clone()).or_default();
        }
    }

    fn get(&self, comps: &[Name]) -> Option<&Node> {
        let mut node = self;
        for c in comps {
            node = node.children.get(c)?;
        }
        Some(node)
    }
}

/// State of one layer being applied.
#[derive(Default)]
struct LayerState {
    /// Entries of this layer so far.
    created: Node,
    /// Directory mtimes, set when the layer is done (creating entries inside changes them).
    dir_times: Vec<(Vec<Name>, i64)>,
}

/// Ownership, mode and time of an entry.
struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: i64,
}

/// Applies layers, in order, to one root.
pub(super) struct Unpacker {
    root: Root,
    /// Entries not created, with why.
    pub(super) skipped: Vec<String>,
    /// Paths of skipped device nodes (hardlinks to them are skipped too).
    skipped_paths: HashSet<Vec<u8>>,
    /// The last parent directory used, and its path: most entries share the previous one's.
    cache: Option<(Vec<Name>, OwnedFd)>,
    /// Something that may lie on a cached path was removed during the current entry.
    dirty: bool,
    /// Running as root: chown must work.
    is_root: bool,
    /// A chown was refused already (logged once).
    chown_refused: bool,
    /// The caps on what the layers may expand to.
    limits: UnpackLimits,
    /// Uncompressed tar bytes the remaining layers may still read, in all.
    budget: std::rc::Rc<Budget>,
    /// Entries of all layers so far.
    entries: u64,
}

impl Unpacker {
    pub(super) fn new(root: Root, limits: UnpackLimits) -> Self {
        Unpacker {
            limits,
            budget: Budget::new(limits.total_bytes),
            entries: 0,
            root,
            skipped: Vec::new(),
            skipped_paths: HashSet::new(),
            cache: None,
            dirty: false,
            is_root: nix::unistd::geteuid().is_root(),
            chown_refused: false,
        }
    }

    /// Applies one layer blob (compressed or not). With `digest`, the blob's SHA-256 is checked;
    /// with `diff_id`, that of the uncompressed tar. On error the root is left half-applied.
    pub(super) fn apply<R: Read>(
        &mut self,
        layer: &str,
        blob: R,
        digest: Option<&Sha256Digest>,
        diff_id: Option<&Sha256Digest>,
    ) -> Result<(), OciError> {
        let mut blob = HashingReader::new(blob);
        let extracted = self.extract(layer, &mut blob);
        self.cache = None;
        if let Some(digest) = digest {
            // Checked even when extraction failed: a corrupt blob is better reported as such.
            match blob.finish() {
                Ok((actual, _)) => digest.check(&actual)?,
                Err(e) => {
                    extracted?;
                    return Err(OciError::Layer {
                        layer: layer.to_owned(),
                        reason: e.to_string(),
                    });
                }
            }
        }
        let tar_digest = extracted?;
        if let Some(diff_id) = diff_id {
            if diff_id.hex() != tar_digest {
                return Err(OciError::DiffIdMismatch {
                    layer: layer.to_owned(),
                    expected: diff_id.to_string(),
                    actual: tar_digest,
                });
            }
        }
        Ok(())
    }

    /// Decompresses and applies the tar; returns the SHA-256 (hex) of the uncompressed tar.
    fn extract<R: Read>(&mut self, layer: &str, blob: R) -> Result<String, OciError> {
        let layer_err = |reason: String| OciError::Layer {
            layer: layer.to_owned(),
            reason,
        };
        let (head, n, stream) = peek::<_, MAGIC_LEN>(blob).map_err(|e| layer_err(e.to_string()))?;
        let compression = Compression::detect(&head[..n]);
        let decoder = compression
            .decoder(stream)
            .map_err(|r| layer_err(r.to_owned()))?;
        let budget = self.budget.clone();
        let limits = self.limits;
        // Whatever failed, going past the budget is what is reported.
        let over = |e: OciError| {
            if budget.exceeded() {
                limits.total_error(format!("the layers of the image (at layer {layer})"))
            } else {
                e
            }
        };
        let mut tar_stream = HashingReader::new(Capped::new(decoder, budget.clone()));
        let mut state = LayerState::default();
        {
            let mut archive = tar::Archive::new(&mut tar_stream);
            let entries = archive
                .entries()
                .map_err(|e| over(layer_err(e.to_string())))?;
            for entry in entries {
                let mut entry = entry.map_err(|e| over(layer_err(format!("bad tar data: {e}"))))?;
                let raw = entry.path_bytes().into_owned();
                self.entries += 1;
                if self.entries > self.limits.entries {
                    return Err(self
                        .limits
                        .entries_error(format!("the layers of the image (at layer {layer})")));
                }
                if entry.size() > self.limits.file_bytes {
                    return Err(self.limits.file_error(format!(
                        "layer {layer}: entry {}",
                        String::from_utf8_lossy(&raw)
                    )));
                }
                self.dirty = false;
                let result = self.entry(&mut state, &raw, &mut entry);
                if self.dirty {
                    self.cache = None;
                }
                result
                    .map_err(|reason| OciError::Entry {
                        layer: layer.to_owned(),
                        entry: String::from_utf8_lossy(&raw).into_owned(),
                        reason,
                    })
                    .map_err(over)?;
            }
        }
        self.cache = None;
        self.set_dir_times(&state);
        let (tar_digest, _) = tar_stream
            .finish()
            .map_err(|e| over(layer_err(format!("reading past the end of the tar: {e}"))))?;
        Ok(tar_digest)
    }

    /// Applies one entry. `Err` is the reason, for an [`OciError::Entry`].
    fn entry<R: Read>(
        &mut self,
        state: &mut LayerState,
        raw: &[u8],
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<(), String> {
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions()
            || kind.is_pax_local_extensions()
            || kind.is_gnu_longname()
            || kind.is_gnu_longlink()
        {
            return Ok(());
        }
        let comps = normalize(raw).map_err(str::to_owned)?;
        let Some((base, parent)) = comps.split_last() else {
            // The root itself: its owner and mode stay those the caller gave the destination.
            return if kind.is_dir() {
                Ok(())
            } else {
                Err("a non-directory entry cannot replace the image root".into())
            };
        };
        if parent.iter().any(|c| c.starts_with(AUFS_META))
            || (base.starts_with(AUFS_META) && base != OPAQUE)
        {
            self.skip(&comps, "aufs metadata".into());
            return Ok(());
        }
        if base == OPAQUE {
            return self
                .opaque(state, parent)
                .map_err(|e| format!("opaque directory: {e}"));
        }
        if let Some(name) = base.strip_prefix(WHITEOUT) {
            if name.is_empty() || name == b"." || name == b".." {
                return Err("whiteout does not name a file in its directory".into());
            }
            return self
                .whiteout(state, parent, name)
                .map_err(|e| format!("whiteout: {e}"));
        }
        state.created.insert(&comps);

        if kind == EntryType::Char || kind == EntryType::Block {
            let dir = self.parent_dir(parent).map_err(|e| e.to_string())?;
            self.replace(dir.as_raw_fd(), base, false)
                .map_err(|e| e.to_string())?;
            self.keep_parent(parent, dir);
            let what = if kind == EntryType::Char {
                "character"
            } else {
                "block"
            };
            let dev = match (entry.header().device_major(), entry.header().device_minor()) {
                (Ok(Some(major)), Ok(Some(minor))) => format!(" {major}:{minor}"),
                _ => String::new(),
            };
            self.skip(
                &comps,
                format!("{what} device{dev} (device nodes are never created on the host)"),
            );
            self.skipped_paths.insert(comps.join(&b'/'));
            return Ok(());
        }
        if kind.is_hard_link() {
            return self
                .hardlink(&comps, entry)
                .map_err(|e| format!("hardlink: {e}"));
        }
        let regular = kind.is_file() || kind == EntryType::Continuous || kind.is_gnu_sparse();
        if !(regular || kind.is_dir() || kind.is_symlink() || kind.is_fifo()) {
            self.skip(
                &comps,
                format!("unsupported tar entry type {:?}", kind.as_byte() as char),
            );
            return Ok(());
        }
        let meta = meta(entry).map_err(|e| format!("bad header: {e}"))?;

        let dir = self
            .parent_dir(parent)
            .map_err(|e| format!("parent directory: {e}"))?;
        let d = dir.as_raw_fd();
        let result = if regular {
            self.file(d, base, entry, &meta)
        } else if kind.is_dir() {
            let r = self.directory(d, base, &meta);
            state.dir_times.push((comps.clone(), meta.mtime));
            r
        } else if kind.is_symlink() {
            match entry.link_name_bytes() {
                Some(target) if !target.is_empty() => self.symlink(d, base, &target, &meta),
                _ => Err(io::Error::other("symlink without a target")),
            }
        } else {
            self.fifo(d, base, &meta)
        };
        self.keep_parent(parent, dir);
        result.map_err(|e| e.to_string())
    }

    /// Records an entry that was not created.
    fn skip(&mut self, comps: &[Name], why: String) {
        tracing::debug!(entry = %show(comps), %why, "image entry skipped");
        self.skipped.push(format!("{}: {why}", show(comps)));
    }

    /// The directory that will hold an entry, created (inside the root) if missing.
    fn parent_dir(&mut self, parent: &[Name]) -> io::Result<OwnedFd> {
        if let Some((path, fd)) = self.cache.take() {
            if path == parent {
                return Ok(fd);
            }
        }
        self.root
            .resolve_dir(parent, true)?
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }

    /// Returns the parent directory to the cache, unless the entry removed something that may
    /// have been on its path.
    fn keep_parent(&mut self, parent: &[Name], fd: OwnedFd) {
        if !self.dirty {
            self.cache = Some((parent.to_vec(), fd));
        }
    }

    /// Clears the way for a new entry `name` in `dir`: whatever is there is removed, except an
    /// existing directory when `keep_dir` (then `Ok(true)`).
    fn replace(&mut self, dir: RawFd, name: &[u8], keep_dir: bool) -> io::Result<bool> {
        let Some(st) = fs::lstat_at(dir, name)? else {
            return Ok(false);
        };
        let k = fs::kind(&st);
        if k == SFlag::S_IFDIR && keep_dir {
            return Ok(true);
        }
        if k != SFlag::S_IFREG {
            self.dirty = true;
        }
        fs::remove_all(dir, name, 0)?;
        Ok(false)
    }

    fn file<R: Read>(
        &mut self,
        dir: RawFd,
        name: &[u8],
        entry: &mut tar::Entry<'_, R>,
        meta: &Meta,
    ) -> io::Result<()> {
        self.replace(dir, name, false)?;
        let file = fs::create_file(dir, name)?;
        // Runs of zero blocks become holes: a sparse file in the image stays sparse.
        let copied = copy_sparse(entry, &file)?;
        if copied != entry.size() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "layer ends inside the file ({copied} of {} bytes)",
                    entry.size()
                ),
            ));
        }
        self.chown(fchown(
            file.as_raw_fd(),
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
        ))?;
        fchmod(file.as_raw_fd(), mode(meta))?;
        let t = TimeSpec::new(meta.mtime, 0);
        times(futimens(file.as_fd().as_raw_fd(), &t, &t))
    }

    fn directory(&mut self, dir: RawFd, name: &[u8], meta: &Meta) -> io::Result<()> {
        if !self.replace(dir, name, true)? {
            mkdirat(Some(dir), name, Mode::from_bits_truncate(0o700))?;
        }
        let fd = fs::open_at(
            dir,
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
            Mode::empty(),
        )?;
        self.chown(fchown(
            fd.as_raw_fd(),
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
        ))?;
        fchmod(fd.as_raw_fd(), mode(meta))?;
        Ok(())
    }

    fn symlink(&mut self, dir: RawFd, name: &[u8], target: &[u8], meta: &Meta) -> io::Result<()> {
        self.replace(dir, name, false)?;
        symlinkat(target, Some(dir), name)?;
        self.chown_at(dir, name, meta)?;
        times_at(dir, name, meta)
    }

    /// Gives `name` in `dir` the entry's owner, without following a symlink there.
    fn chown_at(&mut self, dir: RawFd, name: &[u8], meta: &Meta) -> io::Result<()> {
        self.chown(fchownat(
            Some(dir),
            name,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ))
    }

    fn fifo(&mut self, dir: RawFd, name: &[u8], meta: &Meta) -> io::Result<()> {
        self.replace(dir, name, false)?;
        mkfifoat(Some(dir), name, Mode::from_bits_truncate(0o600))?;
        self.chown_at(dir, name, meta)?;
        // `fchmodat` follows symlinks, but `name` is the FIFO just made (an open FIFO would
        // block, and `fchmod` refuses `O_PATH` descriptors).
        fchmodat(Some(dir), name, mode(meta), FchmodatFlags::FollowSymlink)?;
        times_at(dir, name, meta)
    }

    /// A hardlink to an earlier entry. The target is normalized like an entry path (refused
    /// if it climbs above the root) and its directory resolved inside the root, so the new
    /// link can only share an inode that is inside the root.
    fn hardlink<R: Read>(
        &mut self,
        comps: &[Name],
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<(), String> {
        let Some(raw_target) = entry.link_name_bytes().map(|t| t.into_owned()) else {
            return Err("no target".into());
        };
        let shown = String::from_utf8_lossy(&raw_target).into_owned();
        let target = normalize(&raw_target).map_err(|e| format!("target {shown}: {e}"))?;
        if target == comps {
            return Ok(());
        }
        if self.skipped_paths.contains(&target.join(&b'/')) {
            self.skip(comps, format!("hardlink to {shown}, which was skipped"));
            return Ok(());
        }
        let Some((tname, tparent)) = target.split_last() else {
            return Err("target is the image root".into());
        };
        let missing = || format!("target {shown} does not exist in the image");
        let tdir = match self.root.resolve_dir(tparent, false) {
            Ok(Some(d)) => d,
            Ok(None) => return Err(missing()),
            Err(e) if e.kind() == io::ErrorKind::NotADirectory => return Err(missing()),
            Err(e) => return Err(format!("target {shown}: {e}")),
        };
        match fs::lstat_at(tdir.as_raw_fd(), tname).map_err(|e| format!("target {shown}: {e}"))? {
            None => return Err(missing()),
            Some(st) if fs::kind(&st) == SFlag::S_IFDIR => {
                return Err(format!("target {shown} is a directory"))
            }
            Some(_) => {}
        }
        let (name, parent) = comps.split_last().ok_or("the image root")?;
        let dir = self
            .parent_dir(parent)
            .map_err(|e| format!("parent directory: {e}"))?;
        let result = self.replace(dir.as_raw_fd(), name, false).and_then(|_| {
            linkat(
                Some(tdir.as_raw_fd()),
                &tname[..],
                Some(dir.as_raw_fd()),
                &name[..],
                AtFlags::empty(),
            )
            .map_err(io::Error::from)
        });
        self.keep_parent(parent, dir);
        result.map_err(|e| format!("to {shown}: {e}"))
    }

    /// `.wh.NAME` in `parent`: removes `NAME` as lower layers left it. What this layer itself
    /// put there (before or after the whiteout in the tar) stays.
    fn whiteout(&mut self, state: &LayerState, parent: &[Name], name: &[u8]) -> io::Result<()> {
        self.cache = None;
        let dir = match self.root.resolve_dir(parent, false) {
            Ok(Some(dir)) => dir,
            Ok(None) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotADirectory => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut path = parent.to_vec();
        path.push(name.to_vec());
        prune(dir.as_raw_fd(), name, state.created.get(&path), 0)
    }

    /// `.wh..wh..opq` in `dir`: removes everything lower layers put in `dir`, keeping what this
    /// layer put there.
    fn opaque(&mut self, state: &LayerState, dir: &[Name]) -> io::Result<()> {
        self.cache = None;
        let Some(mut listing) = self.root.open_listing(dir)? else {
            return Ok(());
        };
        let node = state.created.get(dir);
        for child in fs::list(&mut listing)? {
            prune(
                listing.as_raw_fd(),
                &child,
                node.and_then(|n| n.children.get(&child)),
                0,
            )?;
        }
        Ok(())
    }

    /// Sets the mtimes of the layer's directories (deepest last-created first).
    fn set_dir_times(&self, state: &LayerState) {
        for (comps, mtime) in state.dir_times.iter().rev() {
            let t = TimeSpec::new(*mtime, 0);
            let result = self.root.open_listing(comps).and_then(|d| match d {
                Some(d) => futimens(d.as_raw_fd(), &t, &t).map_err(io::Error::from),
                None => Ok(()),
            });
            if let Err(e) = result {
                tracing::debug!(dir = %show(comps), error = %e, "cannot set directory mtime");
            }
        }
    }

    /// Tolerates a refused chown when not running as root (the owners are then the caller's).
    fn chown(&mut self, result: nix::Result<()>) -> io::Result<()> {
        match result {
            Ok(()) => Ok(()),
            Err(Errno::EPERM | Errno::EINVAL) if !self.is_root => {
                if !self.chown_refused {
                    self.chown_refused = true;
                    // Nothing for the user to act on: the image made of the tree for the
                    // guest says root's (erofs::Owners::AllRoot).
                    tracing::debug!("not running as root: unpacked files keep the caller's owner");
                }
                Ok(())
            }
            Err(e) => Err(io::Error::other(format!("chown: {e}"))),
        }
    }
}

/// Removes what lower layers put at `name` in `dir`: all of it when this layer created
/// nothing there (`node` is `None`), else, if it is a directory, recursively what this layer
/// did not create inside it.
fn prune(dir: RawFd, name: &[u8], node: Option<&Node>, depth: usize) -> io::Result<()> {
    let Some(node) = node else {
        return fs::remove_all(dir, name, 0);
    };
    if depth >= MAX_DEPTH {
        return Err(io::Error::other(format!(
            "directory tree deeper than {MAX_DEPTH} levels"
        )));
    }
    let Some(mut sub) = fs::open_subdir(dir, name)? else {
        return Ok(());
    };
    for child in fs::list(&mut sub)? {
        prune(
            sub.as_raw_fd(),
            &child,
            node.children.get(&child),
            depth + 1,
        )?;
    }
    Ok(())
}

/// Setting a time the kernel finds invalid is not worth failing the unpack for.
/// Sets the entry's mtime (and atime) on `name` in `dir`, without following a symlink there.
fn times_at(dir: RawFd, name: &[u8], meta: &Meta) -> io::Result<()> {
    let t = TimeSpec::new(meta.mtime, 0);
    times(utimensat(
        Some(dir),
        name,
        &t,
        &t,
        UtimensatFlags::NoFollowSymlink,
    ))
}

fn times(result: nix::Result<()>) -> io::Result<()> {
    match result {
        Ok(()) | Err(Errno::EINVAL | Errno::EOVERFLOW) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn mode(meta: &Meta) -> Mode {
    Mode::from_bits_truncate(meta.mode & 0o7777)
}

/// Owner, mode and mtime from the header, with pax overrides.
fn meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Meta> {
    let header = entry.header();
    let old = header.as_old();
    let mut uid = numeric(&old.uid, header.uid())?;
    let mut gid = numeric(&old.gid, header.gid())?;
    let mode = u32::try_from(numeric(&old.mode, header.mode().map(u64::from))?).unwrap_or(0);
    let mut mtime = i64::try_from(numeric(&old.mtime, header.mtime())?).unwrap_or(i64::MAX);
    if let Some(pax) = entry.pax_extensions()? {
        for ext in pax {
            let ext = ext?;
            let Ok(value) = ext.value() else { continue };
            match ext.key_bytes() {
                b"uid" => {
                    uid = value
                        .parse()
                        .map_err(|_| io::Error::other(format!("bad pax uid {value:?}")))?
                }
                b"gid" => {
                    gid = value
                        .parse()
                        .map_err(|_| io::Error::other(format!("bad pax gid {value:?}")))?
                }
                b"mtime" => {
                    // Seconds, possibly with a fraction.
                    let secs = value.split('.').next().unwrap_or_default();
                    mtime = secs
                        .parse()
                        .map_err(|_| io::Error::other(format!("bad pax mtime {value:?}")))?;
                }
                _ => {}
            }
        }
    }
    let uid =
        u32::try_from(uid).map_err(|_| io::Error::other(format!("uid {uid} out of range")))?;
    let gid =
        u32::try_from(gid).map_err(|_| io::Error::other(format!("gid {gid} out of range")))?;
    Ok(Meta {
        uid,
        gid,
        mode,
        mtime,
    })
}

/// A numeric header field: all NULs or spaces reads as 0 (as Go's archive/tar does), anything
/// else must parse.
fn numeric(field: &[u8], parsed: io::Result<u64>) -> io::Result<u64> {
    if field.iter().all(|&b| b == 0 || b == b' ') {
        Ok(0)
    } else {
        parsed
    }
}
