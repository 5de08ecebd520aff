//! The initramfs gatevm boots the QEMU guest with: the guest agent as `/init` plus the kernel
//! modules needed before the root file system (virtio-fs) and the devices appear.
//!
//! Contents (uncompressed cpio newc):
//! - `/init` — the static `gatevm-guest` binary (0755)
//! - `/gatevm-initramfs` — empty marker file, tells the guest it runs from the initramfs
//! - `/dev`, `/proc`, `/sys`, `/newroot`, `/modules` — directories
//! - `/dev/console` — character device 5:1
//! - `/modules/<file>.ko[.xz]` — the modules, and `/modules/load.list` — their file names, one per
//!   line, in load order (dependencies first)
//!
//! The file is cached in the output directory under a name that carries a hash of the guest
//! binary, the module list and the kernel release; building again with the same inputs returns
//! the cached file after hashing the guest binary (milliseconds).

use std::io::Write;
use std::path::{Path, PathBuf};

use gatevm_abi::error_chain;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::component::kernel::KernelInfo;
use crate::cpio::CpioWriter;
use crate::modules::{self, ModulesError};
use std::time::Instant;

use crate::setup::{Ctx, SetupAction, SetupError, SetupOptions};

/// Modules wanted before the root is mounted (those built into the kernel are skipped).
pub(crate) const INITRAMFS_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtiofs",
    "virtio_net",
    "virtio_console",
    "erofs",
    "overlay",
];

/// Bump when the initramfs layout changes.
pub(crate) const INITRAMFS_REVISION: u32 = 2;

/// Name of the marker file at the initramfs root.
pub(crate) const MARKER_FILE: &str = "gatevm-initramfs";

/// How many initramfs files to keep in the output directory (newest first).
const KEEP: usize = 4;

/// Errors of building the initramfs.
#[derive(Debug, Error)]
pub enum InitramfsError {
    /// The guest binary cannot be read.
    #[error("cannot read guest binary {} (set GATEVM_GUEST_BIN or put gatevm-guest next to gatevm)", path.display())]
    GuestBin {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The guest binary is not a static ELF executable.
    #[error("guest binary {} is not usable as /init: {problem}", path.display())]
    BadGuestBin {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        problem: &'static str,
    },
    /// Module resolution failed.
    #[error(transparent)]
    Modules(#[from] ModulesError),
    /// A module file cannot be read.
    #[error("cannot read kernel module {}", path.display())]
    Module {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Writing the archive failed.
    #[error("cannot write initramfs {}", path.display())]
    Write {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Checks that `bin` is an ELF executable without a program interpreter (statically linked).
fn check_static_elf(bin: &[u8]) -> Result<(), &'static str> {
    if bin.len() < 64 || bin[..4] != [0x7f, b'E', b'L', b'F'] {
        return Err("not an ELF executable");
    }
    if bin[4] != 2 || bin[5] != 1 {
        return Err("not a 64-bit little-endian ELF executable");
    }
    let u16_at = |at: usize| {
        bin.get(at..at.checked_add(2)?)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u64_at = |at: usize| {
        bin.get(at..at.checked_add(8)?).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    };
    let phoff = u64_at(0x20).ok_or("truncated ELF header")? as usize;
    let phentsize = u16_at(0x36).ok_or("truncated ELF header")? as usize;
    let phnum = u16_at(0x38).ok_or("truncated ELF header")? as usize;
    for i in 0..phnum {
        let at = i
            .checked_mul(phentsize)
            .and_then(|o| o.checked_add(phoff))
            .ok_or("bad program headers")?;
        let ty = at
            .checked_add(4)
            .and_then(|end| bin.get(at..end))
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or("bad program headers")?;
        if ty == 3 {
            return Err("dynamically linked (has a PT_INTERP); /init must be static: build it with \
                        RUSTFLAGS='-C target-feature=+crt-static' --target x86_64-unknown-linux-gnu \
                        (or a musl target)");
        }
    }
    Ok(())
}

/// The module files (relative to the module tree) that go into the initramfs, in load order.
pub fn initramfs_modules(kernel: &KernelInfo) -> Result<Vec<String>, InitramfsError> {
    let idx = modules::load_index(&kernel.modules_dir)?;
    Ok(modules::closure(&idx, INITRAMFS_MODULES)?.load_order)
}

/// Builds (or finds cached) the initramfs for `guest_bin` and `kernel` in `out_dir` and returns
/// its path, `out_dir/initramfs-<hash12>.cpio`.
pub fn build_initramfs(
    guest_bin: &Path,
    kernel: &KernelInfo,
    out_dir: &Path,
) -> Result<PathBuf, InitramfsError> {
    let guest = std::fs::read(guest_bin).map_err(|source| InitramfsError::GuestBin {
        path: guest_bin.to_path_buf(),
        source,
    })?;
    check_static_elf(&guest).map_err(|problem| InitramfsError::BadGuestBin {
        path: guest_bin.to_path_buf(),
        problem,
    })?;
    let modules = initramfs_modules(kernel)?;

    let mut h = Sha256::new();
    h.update(format!("gatevm-initramfs\0rev={INITRAMFS_REVISION}\0").as_bytes());
    h.update(kernel.release.as_bytes());
    h.update([0]);
    for m in &modules {
        h.update(m.as_bytes());
        h.update([0]);
    }
    h.update((guest.len() as u64).to_le_bytes());
    h.update(&guest);
    let id = &hex::encode(h.finalize())[..12];
    let out = out_dir.join(format!("initramfs-{id}.cpio"));
    if out.is_file() {
        return Ok(out);
    }

    let write_err = |source| InitramfsError::Write {
        path: out.clone(),
        source,
    };
    crate::dirs::ensure_dir(out_dir).map_err(|e| InitramfsError::Write {
        path: out.clone(),
        source: std::io::Error::other(error_chain(&e)),
    })?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".initramfs-")
        .tempfile_in(out_dir)
        .map_err(write_err)?;
    {
        let buf = std::io::BufWriter::new(tmp.as_file_mut());
        let mut w = CpioWriter::new(buf);
        for d in ["dev", "proc", "sys", "newroot", "modules"] {
            w.dir(d, 0o755).map_err(write_err)?;
        }
        w.char_device("dev/console", 0o600, 5, 1)
            .map_err(write_err)?;
        w.file(MARKER_FILE, 0o644, b"").map_err(write_err)?;
        let mut list = String::new();
        for m in &modules {
            let src = kernel.modules_dir.join(m);
            let data = std::fs::read(&src).map_err(|source| InitramfsError::Module {
                path: src.clone(),
                source,
            })?;
            let name = m.rsplit('/').next().unwrap_or(m);
            w.file(&format!("modules/{name}"), 0o644, &data)
                .map_err(write_err)?;
            list.push_str(name);
            list.push('\n');
        }
        w.file("modules/load.list", 0o644, list.as_bytes())
            .map_err(write_err)?;
        w.file("init", 0o755, &guest).map_err(write_err)?;
        let mut buf = w.finish().map_err(write_err)?;
        buf.flush().map_err(write_err)?;
    }
    tmp.as_file().sync_all().map_err(write_err)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
            .map_err(write_err)?;
    }
    crate::fsutil::persist_durable(tmp, &out).map_err(write_err)?;
    prune(out_dir, &out);
    Ok(out)
}

/// Keeps the newest [`KEEP`] initramfs files (and always `current`); QEMU reads the file only at
/// start, so removing an older one does not disturb a running guest.
fn prune(dir: &Path, current: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with("initramfs-") && n.ends_with(".cpio")
        })
        .filter_map(|e| {
            let t = e.metadata().ok()?.modified().ok()?;
            Some((t, e.path()))
        })
        .collect();
    files.sort_by_key(|f| std::cmp::Reverse(f.0));
    for (_, p) in files.into_iter().skip(KEEP) {
        if p != current {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The `initramfs` step: builds (or reuses) the initramfs for the guest binary, when one is given.
pub(crate) fn ensure(
    ctx: &mut Ctx<'_>,
    opts: &SetupOptions,
    kernel: &KernelInfo,
) -> Result<Option<PathBuf>, SetupError> {
    const C: &str = "initramfs";
    let started = Instant::now();
    let Some(guest) = &opts.guest_bin else {
        ctx.step(
            C,
            SetupAction::Skipped,
            "no guest binary given (GATEVM_GUEST_BIN or gatevm-guest next to gatevm)".into(),
            started,
        );
        return Ok(None);
    };
    (ctx.progress)("building the initramfs");
    let out_dir = ctx.runtime.join("initramfs");
    let before: Vec<PathBuf> = std::fs::read_dir(&out_dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    let p = build_initramfs(guest, kernel, &out_dir)?;
    let size = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
    let modules = initramfs_modules(kernel)?
        .iter()
        .map(|m| gatevm_kernel::kmod::module_name(m))
        .collect::<Vec<_>>()
        .join(" ");
    ctx.step(
        C,
        if before.contains(&p) {
            SetupAction::AlreadyPresent
        } else {
            SetupAction::Installed
        },
        format!(
            "{} ({} KiB; /init = {}; modules: {modules})",
            p.display(),
            size >> 10,
            guest.display()
        ),
        started,
    );
    Ok(Some(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio::{parse_newc, S_IFCHR, S_IFDIR, S_IFMT};

    fn fake_kernel(dir: &Path) -> KernelInfo {
        let m = dir.join("lib/modules/6.0.0-test");
        std::fs::create_dir_all(m.join("kernel/drivers/virtio")).unwrap();
        std::fs::create_dir_all(m.join("kernel/drivers/net")).unwrap();
        std::fs::create_dir_all(m.join("kernel/drivers/block")).unwrap();
        std::fs::write(m.join("kernel/drivers/virtio/virtio_mmio.ko.xz"), b"mmio").unwrap();
        std::fs::write(m.join("kernel/drivers/block/virtio_blk.ko.xz"), b"blk").unwrap();
        std::fs::write(m.join("kernel/drivers/net/failover.ko.xz"), b"fo").unwrap();
        std::fs::write(m.join("kernel/drivers/net/virtio_net.ko.xz"), b"net").unwrap();
        std::fs::create_dir_all(m.join("kernel/fs/erofs")).unwrap();
        std::fs::create_dir_all(m.join("kernel/fs/overlayfs")).unwrap();
        std::fs::write(m.join("kernel/fs/erofs/erofs.ko.xz"), b"erofs").unwrap();
        std::fs::write(m.join("kernel/fs/overlayfs/overlay.ko.xz"), b"ovl").unwrap();
        std::fs::write(
            m.join("modules.dep"),
            "kernel/drivers/virtio/virtio_mmio.ko.xz:\n\
             kernel/drivers/block/virtio_blk.ko.xz:\n\
             kernel/drivers/net/failover.ko.xz:\n\
             kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/failover.ko.xz\n\
             kernel/fs/erofs/erofs.ko.xz:\n\
             kernel/fs/overlayfs/overlay.ko.xz:\n",
        )
        .unwrap();
        std::fs::write(
            m.join("modules.builtin"),
            "kernel/fs/fuse/virtiofs.ko\nkernel/drivers/char/virtio_console.ko\n",
        )
        .unwrap();
        KernelInfo {
            release: "6.0.0-test".into(),
            vmlinux: dir.join("vmlinux"),
            modules_dir: m,
        }
    }

    fn fake_static_elf() -> Vec<u8> {
        let mut elf = crate::component::kernel::vmlinux::tests::fake_elf(true);
        elf.extend_from_slice(b"guest");
        elf
    }

    #[test]
    fn builds_and_caches() {
        let tmp = tempfile::tempdir().unwrap();
        let k = fake_kernel(tmp.path());
        let guest = tmp.path().join("gatevm-guest");
        std::fs::write(&guest, fake_static_elf()).unwrap();
        let out_dir = tmp.path().join("initramfs");
        let p = build_initramfs(&guest, &k, &out_dir).unwrap();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with("initramfs-") && name.ends_with(".cpio"),
            "{name}"
        );
        let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
        let again = build_initramfs(&guest, &k, &out_dir).unwrap();
        assert_eq!(p, again);
        assert_eq!(std::fs::metadata(&p).unwrap().modified().unwrap(), mtime);

        let entries = parse_newc(&std::fs::read(&p).unwrap()).unwrap();
        let get = |n: &str| entries.iter().find(|e| e.name == n).unwrap();
        for d in ["dev", "proc", "sys", "newroot", "modules"] {
            assert_eq!(get(d).mode & S_IFMT, S_IFDIR);
        }
        let console = get("dev/console");
        assert_eq!(console.mode & S_IFMT, S_IFCHR);
        assert_eq!((console.rdev_major, console.rdev_minor), (5, 1));
        assert_eq!(get("init").data, fake_static_elf());
        assert_eq!(get("init").mode & 0o777, 0o755);
        assert!(get(MARKER_FILE).data.is_empty());
        assert_eq!(
            String::from_utf8(get("modules/load.list").data.clone()).unwrap(),
            "virtio_mmio.ko.xz\nvirtio_blk.ko.xz\nfailover.ko.xz\nvirtio_net.ko.xz\nerofs.ko.xz\noverlay.ko.xz\n"
        );
        assert_eq!(get("modules/virtio_net.ko.xz").data, b"net");

        // a different guest binary gives a different file
        let mut other = fake_static_elf();
        other.push(1);
        std::fs::write(&guest, other).unwrap();
        let p2 = build_initramfs(&guest, &k, &out_dir).unwrap();
        assert_ne!(p, p2);
    }

    #[test]
    fn rejects_bad_guest_binaries() {
        let tmp = tempfile::tempdir().unwrap();
        let k = fake_kernel(tmp.path());
        let out_dir = tmp.path().join("out");
        let missing = build_initramfs(&tmp.path().join("nope"), &k, &out_dir).unwrap_err();
        assert!(matches!(missing, InitramfsError::GuestBin { .. }));
        let script = tmp.path().join("script");
        std::fs::write(&script, b"#!/bin/sh\necho hi\n").unwrap();
        assert!(matches!(
            build_initramfs(&script, &k, &out_dir),
            Err(InitramfsError::BadGuestBin { .. })
        ));
        // a dynamically linked binary: PT_INTERP program header
        let mut dynamic = fake_static_elf();
        dynamic[64..68].copy_from_slice(&3u32.to_le_bytes());
        let dynp = tmp.path().join("dyn");
        std::fs::write(&dynp, dynamic).unwrap();
        let e = build_initramfs(&dynp, &k, &out_dir).unwrap_err();
        assert!(e.to_string().contains("must be static"), "{e}");
    }

    #[test]
    fn this_test_binary_is_checked() {
        // The test executable itself is dynamically linked on glibc targets.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let r = check_static_elf(&me);
        if cfg!(target_env = "gnu") {
            assert!(r.is_err());
        }
    }
}
