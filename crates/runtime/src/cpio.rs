//! A writer (and a reader, for checks and tests) of the cpio "newc" format that the Linux kernel
//! unpacks as an initramfs (`Documentation/driver-api/early-userspace/buffer-format.rst`).
//!
//! Each entry is a 110-byte ASCII header (`070701` and 13 eight-digit hex fields: ino, mode, uid,
//! gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor, namesize, check), the
//! NUL-terminated name padded to a multiple of 4, then the data padded to a multiple of 4. The
//! archive ends with an entry named `TRAILER!!!`. Names carry no leading `/`.

use std::io::{self, Write};

use thiserror::Error;

const MAGIC: &[u8; 6] = b"070701";
const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";

/// Mask of the file type bits of `st_mode`.
pub const S_IFMT: u32 = 0o170000;
/// Directory.
pub const S_IFDIR: u32 = 0o040000;
/// Regular file.
pub const S_IFREG: u32 = 0o100000;
/// Character device.
pub const S_IFCHR: u32 = 0o020000;
/// Symbolic link.
pub(crate) const S_IFLNK: u32 = 0o120000;

/// Errors of the newc reader.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CpioError {
    /// The archive ends inside an entry.
    #[error("cpio archive truncated at offset {0}")]
    Truncated(usize),
    /// An entry header does not start with the newc magic.
    #[error("bad cpio newc magic at offset {0}")]
    BadMagic(usize),
    /// A header field is not hexadecimal.
    #[error("bad cpio header field at offset {0}")]
    BadField(usize),
    /// A name is empty, not NUL-terminated or not UTF-8.
    #[error("bad cpio entry name at offset {0}")]
    BadName(usize),
    /// The archive has no trailer entry.
    #[error("cpio archive has no TRAILER!!! entry")]
    NoTrailer,
}

/// One entry read back from an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpioEntry {
    /// Path without leading `/`.
    pub name: String,
    /// `st_mode`: type and permission bits.
    pub mode: u32,
    /// Device number major, for device nodes.
    pub rdev_major: u32,
    /// Device number minor, for device nodes.
    pub rdev_minor: u32,
    /// Contents (link target for symlinks).
    pub data: Vec<u8>,
}

/// Streams newc entries into a writer. Owner is root, mtime 0 (reproducible output).
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
}

fn pad4(n: u64) -> usize {
    ((4 - (n % 4)) % 4) as usize
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive on `out`.
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            next_ino: 1,
            written: 0,
        }
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let name = name.trim_start_matches('/');
        if name.is_empty() || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad cpio entry name {name:?}"),
            ));
        }
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name} is too large for cpio newc (4 GiB limit)"),
            )
        })?;
        let ino = if name == TRAILER { 0 } else { self.next_ino };
        self.next_ino += 1;
        let namesize = name.len() as u32 + 1;
        let header = format!(
            "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}\
             {dmaj:08x}{dmin:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
            uid = 0,
            gid = 0,
            mtime = 0,
            dmaj = 0,
            dmin = 0,
            rmaj = rdev.0,
            rmin = rdev.1,
            check = 0
        );
        debug_assert_eq!(header.len(), HEADER_LEN);
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        let hlen = (HEADER_LEN + name.len() + 1) as u64;
        self.out.write_all(&[0u8; 3][..pad4(hlen)])?;
        self.out.write_all(data)?;
        self.out.write_all(&[0u8; 3][..pad4(data.len() as u64)])?;
        self.written +=
            hlen + pad4(hlen) as u64 + data.len() as u64 + pad4(data.len() as u64) as u64;
        Ok(())
    }

    /// Adds a directory with permission bits `perm`.
    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, S_IFDIR | (perm & 0o7777), 2, (0, 0), &[])
    }

    /// Adds a regular file with permission bits `perm`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    /// Adds a character device node.
    pub fn char_device(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    /// Adds a symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// Writes the trailer and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry(TRAILER, 0, 1, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }
}

fn hex_field(data: &[u8], at: usize) -> Result<u32, CpioError> {
    let s = data
        .get(at..at + 8)
        .and_then(|b| std::str::from_utf8(b).ok())
        .ok_or(CpioError::BadField(at))?;
    u32::from_str_radix(s, 16).map_err(|_| CpioError::BadField(at))
}

/// Reads every entry of a newc archive up to its trailer.
pub fn parse_newc(data: &[u8]) -> Result<Vec<CpioEntry>, CpioError> {
    let mut entries = Vec::new();
    let mut off = 0usize;
    loop {
        let header = data
            .get(off..off + HEADER_LEN)
            .ok_or(CpioError::Truncated(off))?;
        if &header[..6] != MAGIC {
            return Err(CpioError::BadMagic(off));
        }
        let field = |i: usize| hex_field(data, off + 6 + i * 8);
        let mode = field(1)?;
        let filesize = field(6)? as usize;
        let rdev_major = field(9)?;
        let rdev_minor = field(10)?;
        let namesize = field(11)? as usize;
        if namesize == 0 {
            return Err(CpioError::BadName(off));
        }
        let name_start = off + HEADER_LEN;
        let name_bytes = name_start
            .checked_add(namesize)
            .and_then(|end| data.get(name_start..end))
            .ok_or(CpioError::Truncated(off))?;
        if name_bytes.last() != Some(&0) {
            return Err(CpioError::BadName(off));
        }
        let name = std::str::from_utf8(&name_bytes[..namesize - 1])
            .map_err(|_| CpioError::BadName(off))?
            .to_string();
        let hlen = HEADER_LEN + namesize;
        let data_start = off + hlen + pad4(hlen as u64);
        let body = data_start
            .checked_add(filesize)
            .and_then(|end| data.get(data_start..end))
            .ok_or(CpioError::Truncated(off))?;
        if name == TRAILER {
            return Ok(entries);
        }
        entries.push(CpioEntry {
            name,
            mode,
            rdev_major,
            rdev_minor,
            data: body.to_vec(),
        });
        off = data_start + filesize + pad4(filesize as u64);
        if off >= data.len() {
            return Err(CpioError::NoTrailer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("dev", 0o755).unwrap();
        w.char_device("/dev/console", 0o600, 5, 1).unwrap();
        w.file("init", 0o755, b"#!binary").unwrap();
        w.file("empty", 0o644, b"").unwrap();
        w.symlink("bin", "usr/bin").unwrap();
        let written = w.written();
        let data = w.finish().unwrap();
        assert!(data.len() as u64 > written);
        assert_eq!(data.len() % 4, 0);
        let e = parse_newc(&data).unwrap();
        assert_eq!(e.len(), 5);
        assert_eq!(e[0].name, "dev");
        assert_eq!(e[0].mode, S_IFDIR | 0o755);
        assert_eq!(e[1].name, "dev/console");
        assert_eq!(e[1].mode, S_IFCHR | 0o600);
        assert_eq!((e[1].rdev_major, e[1].rdev_minor), (5, 1));
        assert_eq!(e[2].data, b"#!binary");
        assert_eq!(e[2].mode, S_IFREG | 0o755);
        assert!(e[3].data.is_empty());
        assert_eq!(e[4].mode & S_IFMT, S_IFLNK);
        assert_eq!(e[4].data, b"usr/bin");
    }

    #[test]
    fn matches_reference_layout() {
        // Byte layout as produced by `cpio -o -H newc` for a single empty file named "a"
        // (fields other than ino/mode/nlink/mtime zeroed the same way).
        let mut w = CpioWriter::new(Vec::new());
        w.file("a", 0o644, b"").unwrap();
        let data = w.finish().unwrap();
        let first = std::str::from_utf8(&data[..110]).unwrap();
        let expected = [
            "070701", "00000001", "000081a4", "00000000", "00000000", "00000001", "00000000",
            "00000000", "00000000", "00000000", "00000000", "00000000", "00000002", "00000000",
        ]
        .concat();
        assert_eq!(first, expected);
        assert_eq!(&data[110..112], b"a\0");
        // header+name = 112, already aligned; next entry starts right there
        assert_eq!(&data[112..118], b"070701");
    }

    #[test]
    fn reader_rejects_garbage() {
        assert_eq!(parse_newc(b""), Err(CpioError::Truncated(0)));
        assert_eq!(parse_newc(&[b'x'; 200]), Err(CpioError::BadMagic(0)));
        let mut w = CpioWriter::new(Vec::new());
        w.file("f", 0o644, b"hello").unwrap();
        let data = w.finish().unwrap();
        assert!(parse_newc(&data[..120]).is_err());
        let mut no_trailer = data.clone();
        no_trailer.truncate(112 + 8);
        assert_eq!(parse_newc(&no_trailer), Err(CpioError::NoTrailer));
    }

    #[test]
    fn writer_rejects_bad_names() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.file("", 0o644, b"").is_err());
        assert!(w.file("a\0b", 0o644, b"").is_err());
    }

    proptest::proptest! {
        #[test]
        fn round_trip_any(files in proptest::collection::vec(
            ("[a-z][a-z0-9_./-]{0,40}", proptest::collection::vec(proptest::num::u8::ANY, 0..300), 0u32..0o7777),
            0..20))
        {
            let mut w = CpioWriter::new(Vec::new());
            for (n, d, m) in &files {
                w.file(n, *m, d).unwrap();
            }
            let data = w.finish().unwrap();
            let e = parse_newc(&data).unwrap();
            proptest::prop_assert_eq!(e.len(), files.len());
            for (entry, (n, d, m)) in e.iter().zip(files.iter()) {
                proptest::prop_assert_eq!(&entry.name, n);
                proptest::prop_assert_eq!(&entry.data, d);
                proptest::prop_assert_eq!(entry.mode, S_IFREG | m);
            }
        }

        /// Whatever the bytes: an error names an offset inside the input, and what is read
        /// is bounded by the input (each entry takes at least 112 bytes and its data is a part
        /// of the input). Random bytes are refused. (That nothing panics is checked as well.)
        #[test]
        fn reader_is_bounded_by_its_input(data in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            match parse_newc(&data) {
                Ok(entries) => {
                    proptest::prop_assert!(entries.len() * 112 <= data.len());
                    let body: usize = entries.iter().map(|e| e.data.len()).sum();
                    proptest::prop_assert!(body <= data.len());
                }
                Err(CpioError::Truncated(o) | CpioError::BadMagic(o) | CpioError::BadField(o) | CpioError::BadName(o)) => {
                    proptest::prop_assert!(o <= data.len(), "offset {} of {} bytes", o, data.len());
                }
                Err(CpioError::NoTrailer) => {}
            }
            // Random bytes: too short for a header, or no magic where it must be.
            let first = if data.len() < HEADER_LEN {
                Some(CpioError::Truncated(0))
            } else if !data.starts_with(MAGIC) {
                Some(CpioError::BadMagic(0))
            } else {
                None
            };
            if let Some(e) = first {
                proptest::prop_assert_eq!(parse_newc(&data), Err(e));
            }
        }

        /// A good archive cut short anywhere is refused, never read as a shorter archive.
        #[test]
        fn cut_archives_are_refused(
            files in proptest::collection::vec(("[a-z]{1,12}", proptest::collection::vec(proptest::num::u8::ANY, 0..40)), 1..5),
            cut in proptest::prelude::any::<proptest::sample::Index>(),
        ) {
            let mut w = CpioWriter::new(Vec::new());
            for (n, d) in &files {
                w.file(n, 0o644, d).unwrap();
            }
            let data = w.finish().unwrap();
            let cut = cut.index(data.len());
            proptest::prop_assert!(parse_newc(&data[..cut]).is_err(), "cut at {} of {}", cut, data.len());
        }
    }
}
