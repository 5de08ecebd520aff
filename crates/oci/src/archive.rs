//! The outer archive (a `docker save` or OCI layout tarball, possibly compressed), read in place:
//! one pass records where each member's data starts, then members are read with `pread` at
//! their offsets. A compressed outer archive is first decompressed into an anonymous temporary
//! file; nothing is ever extracted to a named path.
//!
//! Also the byte-level helpers shared with the layer code: a hashing reader, compression
//! detection and a multi-frame zstd reader.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use super::{OciError, UnpackLimits};

/// Largest JSON document (manifest, index, config) read into memory.
pub(super) const MAX_JSON: u64 = 4 << 20;

/// How many symlinks / hardlinks between members of the outer archive are followed.
const MAX_MEMBER_LINKS: usize = 16;

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0];
/// How many bytes [`Compression::detect`] looks at.
pub(super) const MAGIC_LEN: usize = 10;

/// What is left of a byte budget, shared between the reader that spends it and the code that
/// reports its exhaustion (the tar reader may wrap the reader's error in its own).
#[derive(Debug)]
pub(super) struct Budget {
    left: std::cell::Cell<u64>,
    exceeded: std::cell::Cell<bool>,
}

impl Budget {
    pub(super) fn new(bytes: u64) -> std::rc::Rc<Budget> {
        std::rc::Rc::new(Budget {
            left: std::cell::Cell::new(bytes),
            exceeded: std::cell::Cell::new(false),
        })
    }

    /// Whether a reader tried to go past the budget.
    pub(super) fn exceeded(&self) -> bool {
        self.exceeded.get()
    }
}

/// A reader that fails once it would yield more bytes than its [`Budget`] has left.
pub(super) struct Capped<R> {
    inner: R,
    budget: std::rc::Rc<Budget>,
}

impl<R> Capped<R> {
    pub(super) fn new(inner: R, budget: std::rc::Rc<Budget>) -> Self {
        Capped { inner, budget }
    }
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.budget.left.get();
        if buf.is_empty() {
            return Ok(0);
        }
        if left == 0 {
            // One byte more than the budget is one too many; the end of the stream is fine.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => {
                    self.budget.exceeded.set(true);
                    Err(io::Error::other("expands beyond its size limit"))
                }
            };
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.budget.left.set(left - n as u64);
        Ok(n)
    }
}

/// Block size for finding holes: runs of zero blocks this large are skipped, not written.
const HOLE_BLOCK: usize = 4096;

/// Copies `r` into `out` from its current position, writing runs of whole zero blocks as holes
/// (a sparse file takes no disk space for them), and sets the file's length to the end of
/// what was copied. Returns the number of bytes copied.
pub(super) fn copy_sparse<R: Read>(r: &mut R, out: &File) -> io::Result<u64> {
    let start = {
        let mut f = out;
        f.stream_position()?
    };
    let mut buf = vec![0u8; 256 * 1024];
    let mut pos = start;
    loop {
        // Fill the buffer (short reads would break block alignment).
        let mut got = 0;
        while got < buf.len() {
            match r.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if got == 0 {
            break;
        }
        let mut at = 0;
        while at < got {
            let end = (at + HOLE_BLOCK).min(got);
            let block = &buf[at..end];
            if !block.iter().all(|&b| b == 0) {
                // Write the run of data blocks starting here in one go.
                let mut run_end = end;
                while run_end < got {
                    let next = (run_end + HOLE_BLOCK).min(got);
                    if buf[run_end..next].iter().all(|&b| b == 0) {
                        break;
                    }
                    run_end = next;
                }
                out.write_all_at(&buf[at..run_end], pos + at as u64)?;
                at = run_end;
            } else {
                at = end;
            }
        }
        pos += got as u64;
        if got < buf.len() {
            break;
        }
    }
    // A trailing hole exists only once the length says so.
    if out.metadata()?.len() < pos {
        out.set_len(pos)?;
    }
    let mut f = out;
    f.seek(SeekFrom::Start(pos))?;
    Ok(pos - start)
}

/// Compression of a stream, told by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Compression {
    /// No known compression magic (a tar stream, or garbage the tar reader will reject).
    None,
    /// gzip (one or more members).
    Gzip,
    /// zstd (one or more frames, skippable frames allowed).
    Zstd,
    /// xz: recognised only to name it in the error.
    Xz,
    /// bzip2: recognised only to name it in the error.
    Bzip2,
}

impl Compression {
    /// Detects the compression from the first bytes of a stream (up to [`MAGIC_LEN`]). An
    /// uncompressed tar starts with a file name, so the checks are strict enough not to take
    /// a name like `BZhello` for bzip2.
    pub(super) fn detect(head: &[u8]) -> Self {
        if head.starts_with(GZIP_MAGIC) {
            Compression::Gzip
        } else if head.starts_with(ZSTD_MAGIC) {
            Compression::Zstd
        } else if head.starts_with(XZ_MAGIC) {
            Compression::Xz
        } else if head.len() >= MAGIC_LEN
            && head.starts_with(b"BZh")
            && (b'1'..=b'9').contains(&head[3])
            // A block header (pi) or the end-of-stream marker (sqrt(pi)).
            && (head[4..10] == *b"1AY&SY" || head[4..10] == [0x17, 0x72, 0x45, 0x38, 0x50, 0x90])
        {
            Compression::Bzip2
        } else {
            Compression::None
        }
    }

    /// Wraps `r` (positioned at the start of the stream) in the matching decoder. `Err` names
    /// a compression that is recognised but not supported.
    pub(super) fn decoder<'a, R: Read + 'a>(
        self,
        r: R,
    ) -> Result<Box<dyn Read + 'a>, &'static str> {
        match self {
            Compression::None => Ok(Box::new(r)),
            Compression::Gzip => Ok(Box::new(MultiGzDecoder::new(r))),
            Compression::Zstd => Ok(Box::new(ZstdReader::new(r))),
            Compression::Xz => Err("xz compression is not supported (use gzip or zstd)"),
            Compression::Bzip2 => Err("bzip2 compression is not supported (use gzip or zstd)"),
        }
    }
}

/// A stream whose first bytes were read ahead, put back in front.
pub(super) type Replay<R> = io::Chain<io::Cursor<Vec<u8>>, R>;

/// Reads up to `N` bytes from the start of `r` (fewer only at end of stream) and gives them
/// back together with a reader that replays them before the rest of `r`.
pub(super) fn peek<R: Read, const N: usize>(mut r: R) -> io::Result<([u8; N], usize, Replay<R>)> {
    let mut head = [0u8; N];
    let mut n = 0;
    while n < N {
        match r.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let replay = io::Cursor::new(head[..n].to_vec());
    Ok((head, n, replay.chain(r)))
}

/// A zstd decoder over all the frames of a stream (skippable frames are skipped), as written by
/// `zstd` for large inputs and by zstd:chunked layers. Built on ruzstd (pure Rust) because the
/// input is untrusted.
pub(super) struct ZstdReader<R: Read> {
    source: io::BufReader<R>,
    decoder: FrameDecoder,
    /// A frame is being decoded (its header has been read).
    in_frame: bool,
}

impl<R: Read> ZstdReader<R> {
    pub(super) fn new(source: R) -> Self {
        ZstdReader {
            source: io::BufReader::with_capacity(1 << 16, source),
            decoder: FrameDecoder::new(),
            in_frame: false,
        }
    }

    /// Starts the next frame. `Ok(false)` at the end of the stream.
    fn next_frame(&mut self) -> io::Result<bool> {
        use io::BufRead;
        loop {
            if self.source.fill_buf()?.is_empty() {
                return Ok(false);
            }
            match self.decoder.init(&mut self.source) {
                Ok(()) => return Ok(true),
                Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                    length,
                    ..
                })) => {
                    let skipped = io::copy(
                        &mut (&mut self.source).take(u64::from(length)),
                        &mut io::sink(),
                    )?;
                    if skipped != u64::from(length) {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "zstd stream ends inside a skippable frame",
                        ));
                    }
                }
                Err(e) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("zstd: {e}"),
                    ))
                }
            }
        }
    }
}

impl<R: Read> Read for ZstdReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if !self.in_frame {
                if !self.next_frame()? {
                    return Ok(0);
                }
                self.in_frame = true;
            }
            while self.decoder.can_collect() < buf.len() && !self.decoder.is_finished() {
                let want = buf.len() - self.decoder.can_collect();
                self.decoder
                    .decode_blocks(&mut self.source, BlockDecodingStrategy::UptoBytes(want))
                    .map_err(|e| {
                        io::Error::new(io::ErrorKind::InvalidData, format!("zstd: {e}"))
                    })?;
            }
            let n = self.decoder.read(buf)?;
            if n > 0 {
                return Ok(n);
            }
            if self.decoder.is_finished() {
                // Everything of the frame has been collected: its checksum (when it has one)
                // covers all of it.
                if let (Some(want), Some(got)) = (
                    self.decoder.get_checksum_from_data(),
                    self.decoder.get_calculated_checksum(),
                ) {
                    if want != got {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "zstd: frame checksum mismatch (corrupt data)",
                        ));
                    }
                }
                self.in_frame = false;
            }
        }
    }
}

/// Passes reads through and hashes (SHA-256) and counts every byte.
pub(super) struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    pub(super) fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Reads what is left of the stream, then returns (hex digest, byte count) of everything.
    pub(super) fn finish(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((hex::encode(self.hasher.finalize()), self.count))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// A content digest `sha256:<64 hex>`, checked so it can be used to name a blob.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Sha256Digest(String);

impl Sha256Digest {
    /// Parses `sha256:<hex>` (lower-case hex, 64 digits).
    pub(super) fn parse(digest: &str) -> Result<Self, OciError> {
        let hex = digest
            .strip_prefix("sha256:")
            .ok_or_else(|| OciError::UnsupportedDigest {
                digest: digest.to_owned(),
            })?;
        Self::from_hex(hex).ok_or_else(|| OciError::UnsupportedDigest {
            digest: digest.to_owned(),
        })
    }

    /// `Some` when `hex` is 64 lower-case hex digits.
    pub(super) fn from_hex(hex: &str) -> Option<Self> {
        (hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| Sha256Digest(hex.to_owned()))
    }

    pub(super) fn hex(&self) -> &str {
        &self.0
    }

    /// Path of the blob in an OCI image layout.
    pub(super) fn blob_path(&self) -> String {
        format!("blobs/sha256/{}", self.0)
    }

    /// `Err(DigestMismatch)` unless `actual_hex` is this digest.
    pub(super) fn check(&self, actual_hex: &str) -> Result<(), OciError> {
        if self.0 == actual_hex {
            Ok(())
        } else {
            Err(OciError::DigestMismatch {
                digest: self.to_string(),
                actual: actual_hex.to_owned(),
            })
        }
    }
}

impl std::fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.0)
    }
}

/// Reads the start of a file, as much of `buf` as the file has.
fn read_full_at(file: &File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// One member of the outer tar.
#[derive(Debug, Clone)]
enum Member {
    /// A regular file: where its data starts and how long it is.
    File { offset: u64, size: u64 },
    /// A symlink or hardlink to another member (name already normalized).
    Link(String),
}

/// The outer archive, indexed.
pub(super) struct OuterArchive {
    /// The user's path, for messages.
    path: PathBuf,
    /// The tar itself (the user's file, or a decompressed anonymous copy).
    file: File,
    members: HashMap<String, Member>,
    /// The tar has no end-of-archive marker (its last member reaches the end of the file).
    unterminated: bool,
}

/// Normalizes a member name of the outer archive: no leading `/` or `./`, `.` dropped, `..`
/// applied (names that climb out are dropped: they cannot name anything we look up). These
/// names are only lookup keys; nothing is created from them.
fn member_key(name: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

impl OuterArchive {
    /// Opens and indexes the archive at `path`. A compressed archive may expand to at most
    /// `limits.total_bytes` (in an anonymous temporary file, holes kept sparse), and may hold
    /// at most `limits.entries` members.
    pub(super) fn open(path: &Path, limits: &UnpackLimits) -> Result<Self, OciError> {
        Self::open_in(path, limits, &std::env::temp_dir())
    }

    /// [`Self::open`], decompressing into an anonymous file in `tmp_dir`.
    pub(super) fn open_in(
        path: &Path,
        limits: &UnpackLimits,
        tmp_dir: &Path,
    ) -> Result<Self, OciError> {
        let open_err = |source| OciError::Open {
            path: path.to_owned(),
            source,
        };
        let read_err = |e: io::Error| OciError::Read {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        let mut file = File::open(path).map_err(open_err)?;
        if file.metadata().map_err(open_err)?.is_dir() {
            return Err(OciError::NotArchive {
                path: path.to_owned(),
                reason: "it is a directory".into(),
            });
        }
        let mut head = [0u8; MAGIC_LEN];
        let n = read_full_at(&file, &mut head).map_err(read_err)?;
        if n == 0 {
            return Err(OciError::NotArchive {
                path: path.to_owned(),
                reason: "the file is empty".into(),
            });
        }
        let compression = Compression::detect(&head[..n]);
        let file = if compression == Compression::None {
            file
        } else {
            let mut decoder =
                compression
                    .decoder(&mut file)
                    .map_err(|reason| OciError::NotArchive {
                        path: path.to_owned(),
                        reason: reason.into(),
                    })?;
            let mut tmp = tempfile::tempfile_in(tmp_dir).map_err(|e| OciError::Read {
                path: path.to_owned(),
                reason: format!("cannot create a temporary file to decompress it into: {e}"),
            })?;
            let budget = Budget::new(limits.total_bytes);
            let mut capped = Capped::new(&mut decoder, budget.clone());
            // The temporary file is anonymous: whatever happens, nothing stays behind.
            copy_sparse(&mut capped, &tmp).map_err(|e| {
                if budget.exceeded() {
                    limits.total_error(format!("image archive {}", path.display()))
                } else {
                    OciError::Read {
                        path: path.to_owned(),
                        reason: format!("decompressing ({compression:?}): {e}"),
                    }
                }
            })?;
            drop(decoder);
            tmp.seek(SeekFrom::Start(0)).map_err(read_err)?;
            tmp
        };
        let len = file.metadata().map_err(read_err)?.len();
        let (members, unterminated) = index(&file, path, len, limits)?;
        Ok(OuterArchive {
            path: path.to_owned(),
            file,
            members,
            unterminated,
        })
    }

    /// The user's path of the archive.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Added to "missing" errors: a tar without its end marker was probably cut short.
    pub(super) fn note(&self) -> &'static str {
        if self.unterminated {
            " (the archive has no end-of-archive marker: it is probably truncated)"
        } else {
            ""
        }
    }

    /// Whether a member exists (after following links).
    pub(super) fn contains(&self, name: &str) -> bool {
        self.locate(name).is_ok()
    }

    /// Offset and size of a member's data, following links between members.
    fn locate(&self, name: &str) -> Result<(u64, u64), OciError> {
        let missing = || OciError::MissingMember {
            path: self.path.clone(),
            member: name.to_owned(),
            note: self.note(),
        };
        let mut key = member_key(name).ok_or_else(missing)?;
        for _ in 0..=MAX_MEMBER_LINKS {
            match self.members.get(&key).ok_or_else(missing)? {
                Member::File { offset, size } => return Ok((*offset, *size)),
                Member::Link(target) => key = target.clone(),
            }
        }
        Err(OciError::Invalid {
            what: name.to_owned(),
            reason: format!("more than {MAX_MEMBER_LINKS} links between archive members"),
        })
    }

    /// A reader of a member's data, and its size.
    pub(super) fn member(&self, name: &str) -> Result<(MemberReader<'_>, u64), OciError> {
        let (offset, size) = self.locate(name)?;
        Ok((
            MemberReader {
                file: &self.file,
                pos: offset,
                end: offset + size,
            },
            size,
        ))
    }

    /// Reads a JSON member into memory (at most [`MAX_JSON`] bytes); with `digest`, checks it
    /// first. Returns the document and the raw bytes.
    pub(super) fn read_json<T: DeserializeOwned>(
        &self,
        name: &str,
        digest: Option<&Sha256Digest>,
    ) -> Result<T, OciError> {
        let (mut reader, size) = self.member(name)?;
        let what = || match digest {
            Some(d) => d.to_string(),
            None => name.to_owned(),
        };
        if size > MAX_JSON {
            return Err(OciError::TooLarge {
                what: what(),
                size,
                limit: MAX_JSON,
            });
        }
        let mut buf = Vec::with_capacity(size as usize);
        reader.read_to_end(&mut buf).map_err(|e| OciError::Read {
            path: self.path.clone(),
            reason: format!("reading {}: {e}", what()),
        })?;
        if let Some(d) = digest {
            d.check(&hex::encode(Sha256::digest(&buf)))?;
        }
        serde_json::from_slice(&buf).map_err(|e| OciError::Json {
            what: what(),
            source: crate::JsonError(e),
        })
    }
}

/// One pass over the tar: name -> data position, and whether the end-of-archive marker is
/// missing. Rejects non-tar input and members whose data would extend past the end of the file
/// (a truncated archive).
fn index(
    file: &File,
    path: &Path,
    len: u64,
    limits: &UnpackLimits,
) -> Result<(HashMap<String, Member>, bool), OciError> {
    let not_tar = |reason: String| OciError::NotArchive {
        path: path.to_owned(),
        reason,
    };
    let mut archive = tar::Archive::new(file);
    let entries = archive
        .entries_with_seek()
        .map_err(|e| not_tar(format!("not a tar archive: {e}")))?;
    let mut members = HashMap::new();
    let mut seen_any = false;
    // Where the data of the last member read ends (rounded up to the 512-byte block).
    let mut data_end = 0u64;
    let mut count = 0u64;
    for entry in entries {
        count += 1;
        if count > limits.entries {
            return Err(limits.entries_error(format!("image archive {}", path.display())));
        }
        let entry = entry.map_err(|e| {
            if seen_any && len & 511 != 0 {
                OciError::Truncated {
                    path: path.to_owned(),
                    what: "a tar header".into(),
                }
            } else if seen_any {
                OciError::Read {
                    path: path.to_owned(),
                    reason: format!("bad tar entry: {}", shorten(&e.to_string())),
                }
            } else if e.kind() == io::ErrorKind::Other {
                // The tar reader's complaint quotes the garbage it found; it says no more than
                // this.
                not_tar("its first 512 bytes are not a tar header".into())
            } else {
                not_tar(format!("not a tar archive: {e}"))
            }
        })?;
        seen_any = true;
        data_end = entry
            .raw_file_position()
            .saturating_add(entry.size().div_ceil(512) * 512);
        let Ok(name) = std::str::from_utf8(&entry.path_bytes()).map(str::to_owned) else {
            continue;
        };
        let Some(key) = member_key(&name) else {
            continue;
        };
        let kind = entry.header().entry_type();
        let member = if kind.is_file() || kind == tar::EntryType::Continuous {
            let offset = entry.raw_file_position();
            let size = entry.size();
            if offset.checked_add(size).is_none_or(|end| end > len) {
                return Err(OciError::Truncated {
                    path: path.to_owned(),
                    what: format!("member {key}"),
                });
            }
            Member::File { offset, size }
        } else if kind.is_symlink() || kind.is_hard_link() {
            let Some(target) = entry.link_name_bytes() else {
                continue;
            };
            let Ok(target) = std::str::from_utf8(&target) else {
                continue;
            };
            // Symlink targets are relative to the link's directory; hardlink targets (and
            // absolute symlink targets) to the archive root.
            let joined = match (kind.is_symlink(), key.rfind('/')) {
                (true, Some(slash)) if !target.starts_with('/') => {
                    format!("{}/{target}", &key[..slash])
                }
                _ => target.to_owned(),
            };
            let Some(target) = member_key(&joined) else {
                continue;
            };
            Member::Link(target)
        } else {
            continue;
        };
        members.insert(key, member);
    }
    if !seen_any {
        return Err(not_tar("it holds no tar entries".into()));
    }
    Ok((members, data_end >= len))
}

/// At most 200 characters of a tar reader's message (it may quote a whole header of garbage).
fn shorten(msg: &str) -> String {
    const MAX: usize = 200;
    match msg.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}...", &msg[..at]),
        None => msg.to_owned(),
    }
}

/// Reads one member's data with `pread`; a short file is an `UnexpectedEof` error.
pub(super) struct MemberReader<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for MemberReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end - self.pos;
        if left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "archive member is truncated",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_keys_are_normalized() {
        assert_eq!(
            member_key("./manifest.json").as_deref(),
            Some("manifest.json")
        );
        assert_eq!(member_key("/a//b/./c").as_deref(), Some("a/b/c"));
        assert_eq!(member_key("a/../b").as_deref(), Some("b"));
        assert_eq!(member_key("../etc/passwd"), None);
        assert_eq!(member_key("./"), None);
    }

    #[test]
    fn digests_are_checked() {
        let hex = "a".repeat(64);
        assert_eq!(
            Sha256Digest::parse(&format!("sha256:{hex}"))
                .unwrap()
                .blob_path(),
            format!("blobs/sha256/{hex}")
        );
        for bad in [
            "sha512:abc",
            "sha256:../../etc/passwd",
            "sha256:ABC",
            "",
            &format!("sha256:{hex}0"),
        ] {
            assert!(Sha256Digest::parse(bad).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 512, ..Default::default() })]

        /// Corrupt zstd and gzip streams are errors or short data, never panics. For zstd
        /// (written without a checksum, so damaged data can decode to other bytes) not
        /// panicking is the property; gzip's CRC makes a stronger one: whatever decodes without
        /// an error is exactly the original data.
        #[test]
        fn corrupt_compressed_streams_do_not_panic(
            flips in proptest::collection::vec((proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>()), 1..6),
            cut in proptest::prelude::any::<proptest::sample::Index>(),
        ) {
            let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            std::io::Write::write_all(&mut gz, &data).unwrap();
            for mut stream in [zstd::encode_all(&data[..], 3).unwrap(), gz.finish().unwrap()] {
                for (at, value) in &flips {
                    let i = at.index(stream.len());
                    stream[i] = *value;
                }
                stream.truncate(cut.index(stream.len()) + 1);
                let mut out = Vec::new();
                let z = Compression::detect(&stream);
                if let Ok(mut d) = z.decoder(&stream[..]) {
                    let read = d.read_to_end(&mut out);
                    if z == Compression::Gzip && read.is_ok() {
                        proptest::prop_assert!(out == data, "damaged gzip decoded to other bytes without an error");
                    }
                }
            }
        }

        /// A good stream cut short anywhere gives an error, never a shorter layer read as
        /// whole, and what comes out before the error is a beginning of the original data.
        #[test]
        fn cut_compressed_streams_are_errors(cut in proptest::prelude::any::<proptest::sample::Index>()) {
            let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            std::io::Write::write_all(&mut gz, &data).unwrap();
            for whole in [zstd::encode_all(&data[..], 3).unwrap(), gz.finish().unwrap()] {
                let z = Compression::detect(&whole);
                let mut out = Vec::new();
                z.decoder(&whole[..]).unwrap().read_to_end(&mut out).unwrap();
                proptest::prop_assert!(out == data, "{:?}: the whole stream does not give the data", z);
                // Keep at least the magic, so the decoder is the one under test.
                let at = 4 + cut.index(whole.len() - 4);
                let mut out = Vec::new();
                let read = z.decoder(&whole[..at]).unwrap().read_to_end(&mut out);
                proptest::prop_assert!(read.is_err(), "{:?} cut at {} of {} read as {} bytes", z, at, whole.len(), out.len());
                proptest::prop_assert!(data.starts_with(&out), "{:?}: not a beginning of the data", z);
            }
        }
    }

    #[test]
    fn compression_is_detected_strictly() {
        assert_eq!(Compression::detect(&[0x1f, 0x8b, 8, 0]), Compression::Gzip);
        assert_eq!(
            Compression::detect(&[0x28, 0xb5, 0x2f, 0xfd, 0]),
            Compression::Zstd
        );
        assert_eq!(Compression::detect(b"BZh91AY&SY"), Compression::Bzip2);
        assert_eq!(Compression::detect(b"BZhello.txt"), Compression::None);
        assert_eq!(Compression::detect(b"BZh9"), Compression::None);
        assert_eq!(Compression::detect(b""), Compression::None);
    }

    #[test]
    fn zstd_reader_reads_all_frames_and_skips_skippable_ones() {
        let mut stream = zstd::encode_all(&b"hello "[..], 3).unwrap();
        // A skippable frame: magic 0x184D2A5?, u32 LE length, payload.
        stream.extend_from_slice(&[0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3]);
        stream.extend(zstd::encode_all(&b"world"[..], 3).unwrap());
        let mut out = String::new();
        ZstdReader::new(&stream[..])
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, "hello world");
        // Truncated: an error, not a short read.
        let cut = &stream[..stream.len() - 3];
        assert!(ZstdReader::new(cut).read_to_end(&mut Vec::new()).is_err());
    }
}
