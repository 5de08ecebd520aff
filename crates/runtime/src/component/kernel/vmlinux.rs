//! The guest kernel: turning Debian's bzImage into an uncompressed ELF `vmlinux` that QEMU (and
//! libkrun) boot directly through the Xen PVH entry point, skipping in-guest decompression.
//!
//! Layout of a bzImage (Linux x86 boot protocol, `Documentation/arch/x86/boot.rst`):
//! the real-mode setup code fills `setup_sects + 1` 512-byte sectors (`setup_sects` is the byte at
//! 0x1f1; 0 means 4), followed by the protected-mode part. Inside that part the compressed kernel
//! ("payload", protocol 2.08+) starts at `payload_offset` (u32 LE at 0x248) and is
//! `payload_length` (u32 LE at 0x24c) bytes long. With `CONFIG_KERNEL_ZSTD` the payload is a zstd
//! frame followed by the uncompressed size as a 4-byte little-endian trailer.

use std::path::Path;

use thiserror::Error;

use crate::error::IoError;

/// The boot-sector signature at 0x1fe.
const BOOT_FLAG: u16 = 0xaa55;
/// "HdrS" at 0x202.
const HEADER_MAGIC: &[u8; 4] = b"HdrS";
/// First boot protocol version with `payload_offset`/`payload_length`.
const MIN_PROTOCOL: u16 = 0x0208;
/// zstd frame magic.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// The largest kernel image we accept after decompression (sanity bound against bad trailers).
const MAX_VMLINUX: u64 = 1 << 30;
/// ELF note type of the PVH 32-bit entry point in the "Xen" namespace.
pub(crate) const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const PT_NOTE: u32 = 4;

/// Errors of bzImage parsing and vmlinux extraction.
#[derive(Debug, Error)]
pub enum KernelError {
    /// The file is shorter than the structure being read.
    #[error("bzImage too short: need {need} bytes for {what}, file has {len}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes needed.
        need: u64,
        /// File length.
        len: usize,
    },
    /// The file is not an x86 bzImage.
    #[error("not an x86 bzImage: {0}")]
    NotBzImage(&'static str),
    /// The boot protocol is too old to say where the payload is.
    #[error("bzImage boot protocol {major}.{minor:02} is older than 2.08 (no payload fields)")]
    OldProtocol {
        /// Major version.
        major: u8,
        /// Minor version.
        minor: u8,
    },
    /// The payload is not zstd-compressed.
    #[error("bzImage payload is not zstd-compressed (starts with {magic}); only CONFIG_KERNEL_ZSTD kernels are supported")]
    UnsupportedCompression {
        /// The first bytes of the payload, hex.
        magic: String,
    },
    /// The payload does not decompress.
    #[error("cannot decompress the bzImage payload")]
    Decompress(#[source] std::io::Error),
    /// The decompressed size does not match the size trailer.
    #[error("decompressed kernel is {actual} bytes, the bzImage trailer says {expected}")]
    SizeMismatch {
        /// Size from the trailer.
        expected: u64,
        /// Size actually produced.
        actual: u64,
    },
    /// The decompressed kernel is not a 64-bit little-endian ELF file.
    #[error("decompressed kernel is not a 64-bit little-endian ELF file: {0}")]
    NotElf(&'static str),
    /// The ELF kernel has no PVH entry note, so QEMU cannot boot it with `-kernel`.
    #[error("ELF kernel has no Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); the kernel needs CONFIG_PVH=y")]
    NoPvhNote,
    /// Reading or writing a kernel file failed.
    #[error(transparent)]
    Io(#[from] IoError),
}

/// The bzImage header fields gatevm uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BzImageHeader {
    /// Number of 512-byte setup sectors after the boot sector (0 in the file already mapped to 4).
    pub setup_sects: u32,
    /// Boot protocol version, e.g. 0x020f.
    pub protocol: u16,
    /// Offset of the payload from the start of the protected-mode code.
    pub payload_offset: u32,
    /// Length of the payload, including the 4-byte size trailer.
    pub payload_length: u32,
}

impl BzImageHeader {
    /// Byte offset of the payload from the start of the file.
    pub(crate) fn payload_start(&self) -> u64 {
        (u64::from(self.setup_sects) + 1) * 512 + u64::from(self.payload_offset)
    }
}

fn read_u16(data: &[u8], at: usize, what: &'static str) -> Result<u16, KernelError> {
    data.get(at..at + 2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .ok_or(KernelError::Truncated {
            what,
            need: at as u64 + 2,
            len: data.len(),
        })
}

fn read_u32(data: &[u8], at: usize, what: &'static str) -> Result<u32, KernelError> {
    data.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(KernelError::Truncated {
            what,
            need: at as u64 + 4,
            len: data.len(),
        })
}

/// Parses and checks the header of a bzImage.
pub(crate) fn parse_bzimage_header(data: &[u8]) -> Result<BzImageHeader, KernelError> {
    if data.len() < 0x250 {
        return Err(KernelError::Truncated {
            what: "the setup header",
            need: 0x250,
            len: data.len(),
        });
    }
    if read_u16(data, 0x1fe, "boot flag")? != BOOT_FLAG {
        return Err(KernelError::NotBzImage("no 0xAA55 boot flag at 0x1fe"));
    }
    if &data[0x202..0x206] != HEADER_MAGIC {
        return Err(KernelError::NotBzImage("no \"HdrS\" magic at 0x202"));
    }
    let protocol = read_u16(data, 0x206, "protocol version")?;
    if protocol < MIN_PROTOCOL {
        return Err(KernelError::OldProtocol {
            major: (protocol >> 8) as u8,
            minor: (protocol & 0xff) as u8,
        });
    }
    let setup_sects = match data[0x1f1] {
        0 => 4,
        n => u32::from(n),
    };
    Ok(BzImageHeader {
        setup_sects,
        protocol,
        payload_offset: read_u32(data, 0x248, "payload_offset")?,
        payload_length: read_u32(data, 0x24c, "payload_length")?,
    })
}

/// Returns the payload bytes (compressed kernel plus size trailer) of a bzImage.
pub(crate) fn bzimage_payload(data: &[u8]) -> Result<&[u8], KernelError> {
    let h = parse_bzimage_header(data)?;
    let start = h.payload_start();
    let end = start + u64::from(h.payload_length);
    if end > data.len() as u64 {
        return Err(KernelError::Truncated {
            what: "the payload",
            need: end,
            len: data.len(),
        });
    }
    // Both bounds fit in usize: they are at most data.len().
    Ok(&data[start as usize..end as usize])
}

/// Decompresses the kernel inside a zstd bzImage and checks that the result is a bootable
/// PVH ELF (see [`check_pvh_elf`]). Returns the `vmlinux` bytes.
pub(crate) fn extract_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>, KernelError> {
    use std::io::Read;
    let payload = bzimage_payload(bzimage)?;
    if payload.len() < 8 || payload[..4] != ZSTD_MAGIC {
        return Err(KernelError::UnsupportedCompression {
            magic: hex::encode(&payload[..payload.len().min(4)]),
        });
    }
    let (frame, trailer) = payload.split_at(payload.len() - 4);
    let expected = u64::from(u32::from_le_bytes([
        trailer[0], trailer[1], trailer[2], trailer[3],
    ]));
    if expected == 0 || expected > MAX_VMLINUX {
        return Err(KernelError::SizeMismatch {
            expected,
            actual: 0,
        });
    }
    let mut decoder =
        zstd::stream::read::Decoder::with_buffer(frame).map_err(KernelError::Decompress)?;
    decoder
        .window_log_max(31)
        .map_err(KernelError::Decompress)?;
    let mut out = Vec::with_capacity(expected as usize);
    // Read at most one byte more than announced, so a lying trailer cannot make us allocate
    // without bound, and an overlong result is still detected.
    decoder
        .take(expected + 1)
        .read_to_end(&mut out)
        .map_err(KernelError::Decompress)?;
    if out.len() as u64 != expected {
        return Err(KernelError::SizeMismatch {
            expected,
            actual: out.len() as u64,
        });
    }
    check_pvh_elf(&out)?;
    Ok(out)
}

/// Checks that `elf` is a 64-bit little-endian ELF file with a `PT_NOTE` segment holding the Xen
/// PVH entry note; returns the PVH entry address.
pub(crate) fn check_pvh_elf(elf: &[u8]) -> Result<u64, KernelError> {
    if elf.len() < 64 || elf[..4] != [0x7f, b'E', b'L', b'F'] {
        return Err(KernelError::NotElf("no ELF magic"));
    }
    if elf[4] != 2 {
        return Err(KernelError::NotElf("not ELFCLASS64"));
    }
    if elf[5] != 1 {
        return Err(KernelError::NotElf("not little-endian"));
    }
    let u16_at = |at: usize| {
        elf.get(at..at.checked_add(2)?)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        elf.get(at..at.checked_add(4)?)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |at: usize| {
        elf.get(at..at.checked_add(8)?).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    };
    let bad_ph = KernelError::NotElf("program headers out of bounds");
    let phoff = u64_at(0x20).ok_or(KernelError::NotElf("truncated header"))?;
    let phentsize = u16_at(0x36).ok_or(KernelError::NotElf("truncated header"))? as usize;
    let phnum = u16_at(0x38).ok_or(KernelError::NotElf("truncated header"))? as usize;
    if phentsize < 56 {
        return Err(KernelError::NotElf("program header entries too small"));
    }
    let phoff = usize::try_from(phoff).map_err(|_| KernelError::NotElf("bad e_phoff"))?;
    for i in 0..phnum {
        let base = i
            .checked_mul(phentsize)
            .and_then(|o| o.checked_add(phoff))
            .ok_or(KernelError::NotElf("program headers out of bounds"))?;
        let p_type = match u32_at(base) {
            Some(t) => t,
            None => return Err(bad_ph),
        };
        if p_type != PT_NOTE {
            continue;
        }
        let (Some(off), Some(size)) = (u64_at(base + 8), u64_at(base + 0x20)) else {
            return Err(bad_ph);
        };
        let start = usize::try_from(off).map_err(|_| KernelError::NotElf("bad p_offset"))?;
        let len = usize::try_from(size).map_err(|_| KernelError::NotElf("bad p_filesz"))?;
        let notes = start
            .checked_add(len)
            .and_then(|end| elf.get(start..end))
            .ok_or(KernelError::NotElf("note segment out of bounds"))?;
        if let Some(entry) = find_pvh_note(notes) {
            return Ok(entry);
        }
    }
    Err(KernelError::NoPvhNote)
}

/// Walks an ELF note segment looking for ("Xen", XEN_ELFNOTE_PHYS32_ENTRY).
fn find_pvh_note(mut notes: &[u8]) -> Option<u64> {
    let align4 = |n: usize| n.checked_add(3).map(|v| v & !3);
    while notes.len() >= 12 {
        let namesz = u32::from_le_bytes([notes[0], notes[1], notes[2], notes[3]]) as usize;
        let descsz = u32::from_le_bytes([notes[4], notes[5], notes[6], notes[7]]) as usize;
        let ntype = u32::from_le_bytes([notes[8], notes[9], notes[10], notes[11]]);
        let name_end = 12usize.checked_add(align4(namesz)?)?;
        let desc_end = name_end.checked_add(align4(descsz)?)?;
        if desc_end > notes.len() {
            return None;
        }
        let name = &notes[12..12 + namesz];
        let desc = &notes[name_end..name_end + descsz];
        if name == b"Xen\0" && ntype == XEN_ELFNOTE_PHYS32_ENTRY {
            return match descsz {
                4 => Some(u64::from(u32::from_le_bytes([
                    desc[0], desc[1], desc[2], desc[3],
                ]))),
                8 => {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(desc);
                    Some(u64::from_le_bytes(a))
                }
                _ => None,
            };
        }
        notes = &notes[desc_end..];
    }
    None
}

/// Reads the bzImage at `bzimage`, writes the extracted `vmlinux` to `out` atomically (temporary
/// file in the same directory, then rename) and returns its size.
pub(crate) fn write_vmlinux(bzimage: &Path, out: &Path) -> Result<u64, KernelError> {
    let data = std::fs::read(bzimage).map_err(|source| {
        KernelError::Io(IoError {
            action: "cannot read",
            path: bzimage.to_path_buf(),
            source,
        })
    })?;
    let elf = extract_vmlinux(&data)?;
    crate::util::write_atomic(out, &elf, 0o644).map_err(|source| {
        KernelError::Io(IoError {
            action: "cannot write",
            path: out.to_path_buf(),
            source,
        })
    })?;
    Ok(elf.len() as u64)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ELF64 with one PT_NOTE segment holding the PVH note.
    pub(crate) fn fake_elf(with_note: bool) -> Vec<u8> {
        let mut elf = vec![0u8; 64 + 56];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let mut notes = Vec::new();
        // an unrelated note first
        notes.extend_from_slice(&4u32.to_le_bytes());
        notes.extend_from_slice(&3u32.to_le_bytes());
        notes.extend_from_slice(&1u32.to_le_bytes());
        notes.extend_from_slice(b"GNU\0");
        notes.extend_from_slice(&[1, 2, 3, 0]);
        notes.extend_from_slice(&4u32.to_le_bytes());
        notes.extend_from_slice(&4u32.to_le_bytes());
        let t = if with_note {
            XEN_ELFNOTE_PHYS32_ENTRY
        } else {
            17
        };
        notes.extend_from_slice(&t.to_le_bytes());
        notes.extend_from_slice(b"Xen\0");
        notes.extend_from_slice(&0x0100_0000u32.to_le_bytes());
        let off = elf.len() as u64;
        let ph = 64;
        elf[ph..ph + 4].copy_from_slice(&PT_NOTE.to_le_bytes());
        elf[ph + 8..ph + 16].copy_from_slice(&off.to_le_bytes());
        elf[ph + 0x20..ph + 0x28].copy_from_slice(&(notes.len() as u64).to_le_bytes());
        elf.extend_from_slice(&notes);
        elf.resize(elf.len() + 4000, 0x90);
        elf
    }

    /// Wraps `kernel` into a synthetic bzImage the way the kernel build does.
    pub(crate) fn fake_bzimage(kernel: &[u8], setup_sects: u8) -> Vec<u8> {
        let mut payload = zstd::encode_all(kernel, 3).unwrap();
        payload.extend_from_slice(&(kernel.len() as u32).to_le_bytes());
        let sects = if setup_sects == 0 {
            4
        } else {
            setup_sects as usize
        };
        let payload_offset = 0x3c0u32; // some pm-code prefix
        let mut img = vec![0u8; (sects + 1) * 512 + payload_offset as usize];
        img[0x1f1] = setup_sects;
        img[0x1fe..0x200].copy_from_slice(&BOOT_FLAG.to_le_bytes());
        img[0x202..0x206].copy_from_slice(HEADER_MAGIC);
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x248..0x24c].copy_from_slice(&payload_offset.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend_from_slice(&payload);
        img.extend_from_slice(&[0u8; 100]); // trailing stuff after the payload
        img
    }

    #[test]
    fn extracts_synthetic_kernel() {
        let elf = fake_elf(true);
        for sects in [0u8, 4, 31, 39] {
            let img = fake_bzimage(&elf, sects);
            let h = parse_bzimage_header(&img).unwrap();
            assert_eq!(h.setup_sects, if sects == 0 { 4 } else { sects as u32 });
            assert_eq!(extract_vmlinux(&img).unwrap(), elf);
        }
        assert_eq!(check_pvh_elf(&elf).unwrap(), 0x0100_0000);
    }

    #[test]
    fn rejects_missing_pvh_note() {
        let img = fake_bzimage(&fake_elf(false), 31);
        assert!(matches!(extract_vmlinux(&img), Err(KernelError::NoPvhNote)));
    }

    #[test]
    fn rejects_non_elf_payload() {
        let img = fake_bzimage(&vec![7u8; 5000], 31);
        assert!(matches!(extract_vmlinux(&img), Err(KernelError::NotElf(_))));
    }

    #[test]
    fn malformed_inputs_are_errors() {
        assert!(matches!(
            parse_bzimage_header(&[0u8; 10]),
            Err(KernelError::Truncated { .. })
        ));
        assert!(matches!(
            parse_bzimage_header(&[0u8; 0x400]),
            Err(KernelError::NotBzImage(_))
        ));
        let good = fake_bzimage(&fake_elf(true), 31);

        let mut old = good.clone();
        old[0x206..0x208].copy_from_slice(&0x0206u16.to_le_bytes());
        assert!(matches!(
            parse_bzimage_header(&old),
            Err(KernelError::OldProtocol { .. })
        ));

        let mut magic = good.clone();
        magic[0x203] = b'x';
        assert!(matches!(
            parse_bzimage_header(&magic),
            Err(KernelError::NotBzImage(_))
        ));

        let truncated = &good[..good.len() - 200];
        assert!(matches!(
            extract_vmlinux(truncated),
            Err(KernelError::Truncated { .. })
        ));

        let mut huge = good.clone();
        huge[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            extract_vmlinux(&huge),
            Err(KernelError::Truncated { .. })
        ));

        let h = parse_bzimage_header(&good).unwrap();
        let start = h.payload_start() as usize;
        let end = start + h.payload_length as usize;

        let mut gzip = good.clone();
        gzip[start..start + 4].copy_from_slice(&[0x1f, 0x8b, 8, 0]);
        assert!(matches!(
            extract_vmlinux(&gzip),
            Err(KernelError::UnsupportedCompression { .. })
        ));

        let mut wrong_size = good.clone();
        wrong_size[end - 4..end].copy_from_slice(&100u32.to_le_bytes());
        assert!(matches!(
            extract_vmlinux(&wrong_size),
            Err(KernelError::SizeMismatch { .. })
        ));

        let mut corrupt = good.clone();
        for b in &mut corrupt[start + 10..end - 10] {
            *b ^= 0x5a;
        }
        assert!(extract_vmlinux(&corrupt).is_err());
    }

    #[test]
    fn elf_checker_rejects_bad_program_headers() {
        let mut elf = fake_elf(true);
        elf[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(check_pvh_elf(&elf).is_err());
        let mut elf = fake_elf(true);
        elf[0x38..0x3a].copy_from_slice(&0xffffu16.to_le_bytes());
        // the first (valid) header still holds the note
        assert!(check_pvh_elf(&elf).is_ok());
        elf[64..68].copy_from_slice(&1u32.to_le_bytes());
        assert!(check_pvh_elf(&elf).is_err());
        let mut elf = fake_elf(true);
        // note segment size beyond the file
        elf[64 + 0x20..64 + 0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(check_pvh_elf(&elf).is_err());
        let mut elf = fake_elf(true);
        elf[4] = 1;
        assert!(matches!(check_pvh_elf(&elf), Err(KernelError::NotElf(_))));
    }

    /// The byte ranges of `fake_elf(true)` that `check_pvh_elf` reads: the ELF identification,
    /// e_phoff, e_phentsize and e_phnum, the program header's p_type, p_offset and p_filesz, and
    /// the two notes.
    const ELF_USED: &[std::ops::Range<usize>] = &[
        0..6,
        0x20..0x28,
        0x36..0x3a,
        64..68,
        72..80,
        96..104,
        120..160,
    ];

    proptest::proptest! {
        /// Random bytes are refused, with a one-line message; what is shorter than the setup
        /// header is refused as exactly that. (That nothing panics is checked along the way.)
        #[test]
        fn garbage_is_refused(data in proptest::collection::vec(proptest::num::u8::ANY, 0..4096)) {
            let e = extract_vmlinux(&data).unwrap_err();
            let msg = e.to_string();
            proptest::prop_assert!(!msg.is_empty() && !msg.contains('\n'), "{:?}", msg);
            if data.len() < 0x250 {
                let short = matches!(
                    parse_bzimage_header(&data),
                    Err(KernelError::Truncated { need: 0x250, len, .. }) if len == data.len()
                );
                proptest::prop_assert!(short, "not refused as too short");
            }
            // A PVH entry is reported only for a 64-bit little-endian ELF file.
            if check_pvh_elf(&data).is_ok() {
                proptest::prop_assert!(data.starts_with(b"\x7fELF\x02\x01"));
            }
        }

        /// One changed byte of a good bzImage: outside the header fields and the payload it
        /// changes nothing (the same kernel comes out); anywhere, what comes out is still a
        /// PVH ELF of the size the trailer announces.
        #[test]
        fn mutated_images_give_the_kernel_or_an_error(pos in 0usize..8192, val in proptest::num::u8::ANY) {
            let elf = fake_elf(true);
            let good = fake_bzimage(&elf, 4);
            let h = parse_bzimage_header(&good).unwrap();
            let payload = h.payload_start() as usize..(h.payload_start() + u64::from(h.payload_length)) as usize;
            let used = [0x1f1..0x1f2, 0x1fe..0x200, 0x202..0x208, 0x248..0x250, payload];
            let mut img = good.clone();
            let p = pos % img.len();
            img[p] = val;
            match extract_vmlinux(&img) {
                Ok(out) => {
                    proptest::prop_assert!(check_pvh_elf(&out).is_ok());
                    let trailer = bzimage_payload(&img).unwrap();
                    let announced = u32::from_le_bytes(trailer[trailer.len() - 4..].try_into().unwrap());
                    proptest::prop_assert_eq!(out.len() as u64, u64::from(announced));
                    if !used.iter().any(|r| r.contains(&p)) {
                        proptest::prop_assert_eq!(out, elf.clone());
                    }
                }
                Err(e) => proptest::prop_assert!(
                    used.iter().any(|r| r.contains(&p)),
                    "byte {:#x} is not read, yet the image is refused: {}", p, e
                ),
            }
        }

        /// One changed byte of a good ELF: outside the fields read it changes nothing; inside,
        /// the answer is an entry address or an error, never a panic.
        #[test]
        fn mutated_elf_keeps_its_entry_unless_a_read_field_changes(pos in 0usize..4096, val in proptest::num::u8::ANY) {
            let mut elf = fake_elf(true);
            let p = pos % elf.len();
            elf[p] = val;
            let res = check_pvh_elf(&elf);
            if !ELF_USED.iter().any(|r| r.contains(&p)) {
                proptest::prop_assert_eq!(res.ok(), Some(0x0100_0000));
            }
        }
    }
}
