//! The state disk: the disk with serial `gatevm-state` (ext4) at `/var/lib/gatevm`, with containerd's state bind-mounted
//! at `/var/lib/containerd`; a tmpfs there when the VM has no disk (containerd's overlayfs
//! snapshotter cannot sit on virtio-fs).

use crate::mounts::mkdir;
use crate::reaper::{describe, Reaper};
use crate::sys::Context;
use nix::mount::{mount, MsFlags};
use std::io::{self, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Where the state disk is mounted.
pub(crate) const STATE_DIR: &str = gatevm_abi::paths::STATE_DIR;
/// containerd's root directory.
pub(crate) const CONTAINERD_DIR: &str = "/var/lib/containerd";

/// What backs `/var/lib/containerd` after [`setup`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StateBacking {
    /// The ext4 state disk.
    Disk,
    /// A tmpfs (no disk, or the disk could not be mounted): state is lost at shutdown.
    Tmpfs,
    /// Nothing could be mounted.
    None,
}

/// Whether the first 64 KiB of a device are all zero (a never-formatted disk).
pub(crate) fn is_blank(device: &Path) -> io::Result<bool> {
    let mut f = std::fs::File::open(device)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(buf[..got].iter().all(|&b| b == 0))
}

/// containerd's unfinished content writes, one directory per writer's ref.
const INGEST_DIR: &str = "io.containerd.content.v1.content/ingest";

/// Removes runtime leftovers that must not survive a reboot, under a containerd root and the
/// CNI state directory: task state, CNI allocations, and unfinished content writes (an import
/// or pull cut off by the VM's death; no writer of a previous boot is alive, and containerd
/// would resume such a write under its ref, so the next import of other content under the same
/// name, such as `layer0/layer.tar`, would fail its commit). Never touches
/// `io.containerd.metadata.v1.bolt` (meta.db), committed content or snapshots.
pub(crate) fn clean_runtime_state(containerd_root: &Path, cni_root: &Path) -> Vec<String> {
    let mut removed = Vec::new();
    let targets = [
        containerd_root.join("io.containerd.runtime.v2.task"),
        cni_root.join("networks"),
        cni_root.join("results"),
    ];
    let ingests: Vec<std::path::PathBuf> = std::fs::read_dir(containerd_root.join(INGEST_DIR))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    for t in targets.into_iter().chain(ingests) {
        if std::fs::symlink_metadata(&t).is_ok() && std::fs::remove_dir_all(&t).is_ok() {
            removed.push(t.display().to_string());
        }
    }
    removed
}

fn find_mkfs() -> Option<&'static str> {
    ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

fn format(reaper: &Reaper, dev: &Path) -> io::Result<()> {
    let mkfs = find_mkfs()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "mkfs.ext4 not found"))?;
    let mut cmd = Command::new(mkfs);
    cmd.args([
        "-q",
        "-F",
        "-L",
        "gatevm-state",
        "-E",
        "lazy_itable_init=1,lazy_journal_init=1",
    ])
    .arg(dev)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let s = reaper.spawn(&mut cmd).ctx(|| format!("start {mkfs}"))?;
    match s.exit.recv_timeout(Duration::from_secs(120)) {
        Ok(st) if st.code == Some(0) => Ok(()),
        Ok(st) => Err(io::Error::other(format!(
            "{mkfs} failed: {}",
            describe(&st)
        ))),
        Err(_) => Err(io::Error::other(format!("{mkfs} did not finish"))),
    }
}

fn mount_disk(reaper: &Reaper, dev: &Path) -> io::Result<()> {
    mkdir(Path::new(STATE_DIR), 0o755)?;
    if is_blank(dev).ctx(|| format!("read {}", dev.display()))? {
        crate::glog!("state disk is blank, formatting it");
        format(reaper, dev)?;
    }
    mount(
        Some(dev),
        STATE_DIR,
        Some("ext4"),
        MsFlags::MS_NOATIME,
        None::<&str>,
    )
    .ctx(|| format!("mount {} on {STATE_DIR}", dev.display()))?;
    let state = Path::new(STATE_DIR).join("containerd");
    mkdir(&state, 0o711)?;
    mkdir(Path::new(CONTAINERD_DIR), 0o711)?;
    mount(
        Some(&state),
        CONTAINERD_DIR,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .ctx(|| format!("bind {} on {CONTAINERD_DIR}", state.display()))?;
    Ok(())
}

/// Size in bytes of the ext4 file system whose superblock (the 1024 bytes at offset 1024 of the
/// device) is `sb`; None when it is not ext4.
pub(crate) fn ext4_size(sb: &[u8]) -> Option<u64> {
    let u32_at =
        |o: usize| -> Option<u32> { Some(u32::from_le_bytes(sb.get(o..o + 4)?.try_into().ok()?)) };
    if sb.get(0x38..0x3a)? != [0x53, 0xef] {
        return None;
    }
    let log = u32_at(0x18)?;
    if log > 6 {
        return None;
    }
    let block = 1024u64 << log;
    let mut blocks = u64::from(u32_at(0x4)?);
    // INCOMPAT_64BIT: the high half of the block count.
    if u32_at(0x60)? & 0x80 != 0 {
        blocks |= u64::from(u32_at(0x150)?) << 32;
    }
    blocks.checked_mul(block)
}

/// Growth below this is not worth a resize2fs run at every boot (file systems end on a block
/// or group boundary, a little short of the device).
const GROW_SLACK: u64 = 16 << 20;

/// Whether a file system of `fs_bytes` on a device of `dev_bytes` should be grown.
pub(crate) fn needs_grow(dev_bytes: u64, fs_bytes: u64) -> bool {
    dev_bytes > fs_bytes.saturating_add(GROW_SLACK)
}

/// Size of block device `dev` (`/dev/vdX`) from sysfs, in bytes.
fn device_bytes(dev: &Path) -> io::Result<u64> {
    let name = dev
        .file_name()
        .ok_or_else(|| io::Error::other("no device name"))?;
    let sectors = std::fs::read_to_string(Path::new("/sys/class/block").join(name).join("size"))?;
    sectors
        .trim()
        .parse::<u64>()
        .map(|s| s * 512)
        .map_err(|e| io::Error::other(format!("reading the size of {}: {e}", dev.display())))
}

fn find_resize2fs() -> Option<&'static str> {
    ["/usr/sbin/resize2fs", "/sbin/resize2fs"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

/// Grows the mounted state file system to its device when the host made the disk larger (the
/// host grows only the image file; it never runs a file system tool on what the guest wrote).
/// Online: resize2fs on a mounted ext4 uses the kernel's resize ioctl.
fn grow_if_larger(reaper: &Reaper, dev: &Path) -> io::Result<()> {
    let name = dev.display();
    let dev_bytes = device_bytes(dev).ctx(|| format!("size of {name}"))?;
    let mut sb = vec![0u8; 2048];
    let mut f = std::fs::File::open(dev).ctx(|| format!("open {name}"))?;
    f.read_exact(&mut sb).ctx(|| format!("read {name}"))?;
    let fs_bytes = ext4_size(&sb[1024..])
        .ok_or_else(|| io::Error::other(format!("{name} holds no ext4 superblock")))?;
    if !needs_grow(dev_bytes, fs_bytes) {
        return Ok(());
    }
    let prog = find_resize2fs()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "resize2fs not found"))?;
    crate::glog!(
        "state disk: growing the file system from {} to {} MiB",
        fs_bytes >> 20,
        dev_bytes >> 20
    );
    let mut cmd = Command::new(prog);
    cmd.arg(dev)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let s = reaper.spawn(&mut cmd).ctx(|| format!("start {prog}"))?;
    match s.exit.recv_timeout(Duration::from_secs(300)) {
        Ok(st) if st.code == Some(0) => Ok(()),
        Ok(st) => Err(io::Error::other(format!(
            "{prog} {name} failed: {}",
            describe(&st)
        ))),
        Err(_) => Err(io::Error::other(format!("{prog} {name} did not finish"))),
    }
}

fn mount_tmpfs() -> io::Result<()> {
    mkdir(Path::new(CONTAINERD_DIR), 0o711)?;
    mount(
        Some("tmpfs"),
        CONTAINERD_DIR,
        Some("tmpfs"),
        MsFlags::MS_NODEV,
        Some("mode=0711"),
    )
    .ctx(|| format!("mount tmpfs on {CONTAINERD_DIR}"))
}

/// Mounts the state disk (formatting it when blank) or the tmpfs fallback, then cleans stale
/// runtime state. Returns what backs containerd's root and one message per problem.
pub(crate) fn setup(reaper: &Reaper) -> (StateBacking, Vec<String>) {
    let mut problems = Vec::new();
    let mut backing = StateBacking::None;
    // Stage 1 waited for the root's disks, so every disk of the VM is there by now; a VM
    // without a state disk (a throwaway one) has none.
    let dev = match crate::blockdev::find(gatevm_abi::paths::disk::STATE) {
        Ok(d) => Some(d),
        Err(e) if e.starts_with("no disk") => None,
        Err(e) => {
            problems.push(format!("state disk: {e}; using a tmpfs"));
            None
        }
    };
    if let Some(dev) = dev {
        match mount_disk(reaper, &dev) {
            Ok(()) => {
                backing = StateBacking::Disk;
                // A file system that could not grow still works at its old size.
                if let Err(e) = grow_if_larger(reaper, &dev) {
                    problems.push(format!("state disk: growing the file system: {e}"));
                }
            }
            Err(e) => problems.push(format!("state disk: {e}; using a tmpfs")),
        }
    }
    if backing == StateBacking::None {
        match mount_tmpfs() {
            Ok(()) => backing = StateBacking::Tmpfs,
            Err(e) => problems.push(e.to_string()),
        }
    }
    clean_runtime_state(Path::new(CONTAINERD_DIR), Path::new("/var/lib/cni"));
    (backing, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleaning_keeps_metadata_content_and_snapshots() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("containerd");
        let keep = [
            "io.containerd.metadata.v1.bolt/meta.db",
            "io.containerd.content.v1.content/blobs/sha256/abc",
            "io.containerd.snapshotter.v1.overlayfs/snapshots/1/fs/x",
        ];
        for k in keep {
            let p = root.join(k);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, "x").unwrap();
        }
        let task = root.join("io.containerd.runtime.v2.task/k8s.io/abc");
        std::fs::create_dir_all(&task).unwrap();
        let cni = d.path().join("cni");
        std::fs::create_dir_all(cni.join("networks/cbr0")).unwrap();
        std::fs::write(cni.join("networks/cbr0/10.42.0.5"), "id").unwrap();
        // An import cut off by the VM's death: its ref's directory with the data so far.
        let ingest = root.join(INGEST_DIR);
        for w in ["1f2e3d", "4c5b6a"] {
            std::fs::create_dir_all(ingest.join(w)).unwrap();
            std::fs::write(ingest.join(w).join("data"), vec![7u8; 4096]).unwrap();
            std::fs::write(ingest.join(w).join("ref"), "tar-layer0/layer.tar").unwrap();
        }
        let removed = clean_runtime_state(&root, &cni);
        assert_eq!(removed.len(), 4, "{removed:?}");
        assert!(!root.join("io.containerd.runtime.v2.task").exists());
        assert!(!cni.join("networks").exists());
        // The ingest directory stays (containerd writes into it), empty.
        assert_eq!(std::fs::read_dir(&ingest).unwrap().count(), 0);
        for k in keep {
            assert!(root.join(k).exists(), "{k} was removed");
        }
        assert!(clean_runtime_state(&root, &cni).is_empty());
    }

    #[test]
    fn ext4_superblock_size_and_growth() {
        let mut sb = vec![0u8; 1024];
        assert_eq!(ext4_size(&sb), None, "no magic");
        sb[0x38] = 0x53;
        sb[0x39] = 0xef;
        sb[0x18..0x1c].copy_from_slice(&2u32.to_le_bytes()); // 4 KiB blocks
        sb[0x4..0x8].copy_from_slice(&262_144u32.to_le_bytes()); // 1 GiB
        assert_eq!(ext4_size(&sb), Some(1 << 30));
        // The high half counts only with the 64bit feature.
        sb[0x150..0x154].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(ext4_size(&sb), Some(1 << 30));
        sb[0x60..0x64].copy_from_slice(&0x80u32.to_le_bytes());
        assert_eq!(ext4_size(&sb), Some((1 << 30) + (4096u64 << 32)));
        sb[0x18..0x1c].copy_from_slice(&40u32.to_le_bytes());
        assert_eq!(ext4_size(&sb), None, "absurd block size");
        assert_eq!(ext4_size(&sb[..100]), None, "short");
        assert!(needs_grow(2 << 30, 1 << 30));
        assert!(!needs_grow(1 << 30, 1 << 30));
        assert!(!needs_grow((1 << 30) + 4096, 1 << 30));
        assert!(!needs_grow(1 << 30, 2 << 30));
    }

    /// The superblock mkfs.ext4 writes parses to the size it was given (where mkfs exists).
    #[test]
    fn ext4_size_of_a_real_file_system() {
        let Some(mkfs) = find_mkfs() else {
            gatevm_testkit::skip(
                "disk::tests::ext4_size_of_a_real_file_system",
                "mkfs.ext4 is not installed",
            );
            return;
        };
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        std::fs::File::create(&p)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let ok = Command::new(mkfs)
            .args(["-q", "-F"])
            .arg(&p)
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let img = std::fs::read(&p).unwrap();
        assert_eq!(ext4_size(&img[1024..2048]), Some(64 << 20));
        assert!(needs_grow(128 << 20, 64 << 20));
    }

    #[test]
    fn blank_detection() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("disk");
        std::fs::write(&p, vec![0u8; 100_000]).unwrap();
        assert!(is_blank(&p).unwrap());
        let mut data = vec![0u8; 100_000];
        data[1080] = 0x53;
        data[1081] = 0xef;
        std::fs::write(&p, data).unwrap();
        assert!(!is_blank(&p).unwrap());
    }
}
