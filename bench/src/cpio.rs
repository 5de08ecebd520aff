//! A writer of the cpio "newc" format the Linux kernel unpacks as an initramfs, for the bare-boot
//! baseline (`Documentation/driver-api/early-userspace/buffer-format.rst`).
//!
//! Each entry is a 110-byte ASCII header (`070701` and 13 eight-digit hex fields: ino, mode, uid,
//! gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor, namesize, check), the
//! NUL-terminated name padded to a multiple of 4, then the data padded to a multiple of 4. The
//! archive ends with an entry named `TRAILER!!!`.

use std::io::{self, Write};

/// Directory type bits of `st_mode`.
pub const S_IFDIR: u32 = 0o040000;
/// Regular file type bits.
pub const S_IFREG: u32 = 0o100000;
/// Character device type bits.
pub const S_IFCHR: u32 = 0o020000;

/// Length of a newc header.
pub const HEADER_LEN: usize = 110;
/// Name of the closing entry.
pub const TRAILER: &str = "TRAILER!!!";

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// Streams newc entries into `out`; owner root, mtime 0.
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive.
    pub fn new(out: W) -> Self {
        CpioWriter { out, next_ino: 1 }
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        if name.is_empty() || name.starts_with('/') || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad cpio entry name {name:?}"),
            ));
        }
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name} is too large for cpio newc"),
            )
        })?;
        let ino = if name == TRAILER { 0 } else { self.next_ino };
        self.next_ino += 1;
        let namesize = name.len() + 1;
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
            check = 0,
        );
        debug_assert_eq!(header.len(), HEADER_LEN);
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.out.write_all(&[0; 3][..pad4(HEADER_LEN + namesize)])?;
        self.out.write_all(data)?;
        self.out.write_all(&[0; 3][..pad4(data.len())])?;
        Ok(())
    }

    /// Adds a directory.
    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, S_IFDIR | (perm & 0o7777), 2, (0, 0), &[])
    }

    /// Adds a regular file.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    /// Adds a character device node.
    pub fn char_device(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    /// Writes the trailer and hands back the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry(TRAILER, 0, 1, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// The `/init` of the baseline: prints a marker on the console, then powers off at once.
pub const BASELINE_INIT: &str =
    "#!/bin/busybox sh\n/bin/busybox echo userspace\n/bin/busybox poweroff -f\n";

/// The baseline initramfs: `/bin/busybox` (static), `/init`, and `/dev/console` so that init has
/// a console even when the kernel's built-in initramfs lacks one.
pub fn baseline_initramfs(busybox: &[u8]) -> io::Result<Vec<u8>> {
    let mut w = CpioWriter::new(Vec::with_capacity(busybox.len() + 4096));
    w.dir("bin", 0o755)?;
    w.file("bin/busybox", 0o755, busybox)?;
    w.dir("dev", 0o755)?;
    w.char_device("dev/console", 0o600, 5, 1)?;
    w.file("init", 0o755, BASELINE_INIT.as_bytes())?;
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One entry read back: the header fields by name, the name, the data.
    #[derive(Debug)]
    struct Parsed {
        ino: u32,
        mode: u32,
        uid: u32,
        gid: u32,
        nlink: u32,
        mtime: u32,
        rdev: (u32, u32),
        check: u32,
        name: String,
        data: Vec<u8>,
    }

    fn parse(archive: &[u8]) -> Vec<Parsed> {
        let mut out = Vec::new();
        let mut off = 0;
        loop {
            assert_eq!(off % 4, 0, "entry not 4-aligned at {off}");
            let h = &archive[off..off + HEADER_LEN];
            assert_eq!(&h[..6], b"070701", "magic at {off}");
            let f = |i: usize| {
                let s = std::str::from_utf8(&h[6 + i * 8..14 + i * 8]).unwrap();
                u32::from_str_radix(s, 16).unwrap()
            };
            let filesize = f(6) as usize;
            let namesize = f(11) as usize;
            let name_start = off + HEADER_LEN;
            let name_bytes = &archive[name_start..name_start + namesize];
            assert_eq!(name_bytes.last(), Some(&0), "name is NUL-terminated");
            let name = String::from_utf8(name_bytes[..namesize - 1].to_vec()).unwrap();
            let data_start = name_start + namesize + pad4(HEADER_LEN + namesize);
            let data = archive[data_start..data_start + filesize].to_vec();
            off = data_start + filesize + pad4(filesize);
            let done = name == TRAILER;
            out.push(Parsed {
                ino: f(0),
                mode: f(1),
                uid: f(2),
                gid: f(3),
                nlink: f(4),
                mtime: f(5),
                rdev: (f(9), f(10)),
                check: f(12),
                name,
                data,
            });
            if done {
                assert_eq!(off, archive.len(), "nothing after the trailer");
                return out;
            }
        }
    }

    #[test]
    fn round_trip_of_every_entry_kind() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin", 0o755).unwrap();
        w.file("bin/x", 0o644, b"hello").unwrap();
        w.file("odd-name", 0o700, b"").unwrap();
        w.char_device("dev/console", 0o600, 5, 1).unwrap();
        let bytes = w.finish().unwrap();
        let e = parse(&bytes);
        let names: Vec<&str> = e.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["bin", "bin/x", "odd-name", "dev/console", TRAILER]);
        assert_eq!(e[0].mode, S_IFDIR | 0o755);
        assert_eq!(e[0].nlink, 2);
        assert_eq!(e[1].mode, S_IFREG | 0o644);
        assert_eq!(e[1].data, b"hello");
        assert_eq!(e[2].mode, S_IFREG | 0o700);
        assert!(e[2].data.is_empty());
        assert_eq!(e[3].mode, S_IFCHR | 0o600);
        assert_eq!(e[3].rdev, (5, 1));
        for p in &e {
            assert_eq!((p.uid, p.gid, p.mtime, p.check), (0, 0, 0, 0));
        }
        let inos: Vec<u32> = e.iter().map(|p| p.ino).collect();
        assert_eq!(inos, [1, 2, 3, 4, 0]);
    }

    #[test]
    fn data_of_every_length_mod_four_round_trips() {
        for len in 0..9 {
            let data: Vec<u8> = (0..len as u8).collect();
            let mut w = CpioWriter::new(Vec::new());
            w.file("f", 0o644, &data).unwrap();
            let e = parse(&w.finish().unwrap());
            assert_eq!(e[0].data, data);
        }
    }

    #[test]
    fn bad_names_are_refused() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.file("", 0o644, b"").is_err());
        assert!(w.file("/abs", 0o644, b"").is_err());
        assert!(w.file("a\0b", 0o644, b"").is_err());
    }

    #[test]
    fn baseline_initramfs_layout() {
        let e = parse(&baseline_initramfs(b"\x7fELF fake busybox").unwrap());
        let get = |n: &str| e.iter().find(|p| p.name == n).unwrap();
        assert_eq!(get("bin/busybox").data, b"\x7fELF fake busybox");
        assert_eq!(get("bin/busybox").mode, S_IFREG | 0o755);
        assert_eq!(get("init").data, BASELINE_INIT.as_bytes());
        assert_eq!(get("init").mode, S_IFREG | 0o755);
        assert!(BASELINE_INIT.starts_with("#!/bin/busybox sh\n"));
        assert_eq!(get("dev/console").rdev, (5, 1));
    }
}
