//! The instance's disks on the host: the image of the root's writable layer and the state disk
//! (both sparse ext4 files the guest mounts; the host mounts nothing), and the clean-up of the
//! mounts an earlier gatevm made on the host.

use super::{io_err, SupervisorError};
use crate::paths::InstancePaths;
use std::path::Path;

/// Whether `p` is a mount point (it is in mountinfo).
pub fn is_mounted(p: &Path) -> bool {
    gatevm_fsutil::mountinfo::is_mount_point(p)
}

/// Unmounts what an earlier gatevm mounted on the host for an instance (its merged root and the
/// image of its writable layer), lazily when busy: an instance that ran under an earlier version
/// may still have them.
pub fn unmount_rootfs(paths: &InstancePaths) {
    for p in [paths.rootfs(), paths.upper_mount()] {
        while is_mounted(&p) {
            if nix::mount::umount2(&p, nix::mount::MntFlags::empty()).is_err() {
                if let Err(e) = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH) {
                    tracing::warn!("could not unmount {}: {e}", p.display());
                    break;
                }
            }
        }
    }
}

/// Makes sure the image of the root's writable layer exists: a sparse ext4 file of the root
/// budget's size, made on first use. The guest mounts it as the upper layer of its root's
/// overlay, so what it writes to its root counts against this size (it gets ENOSPC, and the host
/// keeps its space). An instance of an early gatevm that kept the layer in a plain directory on
/// the host is refused with the way out, since that needed a host mount.
pub(crate) fn prepare_upper(paths: &InstancePaths, root_mib: u32) -> Result<(), SupervisorError> {
    if paths.is_legacy_upper() {
        return Err(SupervisorError::Setup(format!(
            "{}: the root's writable layer is the directory {} of an early gatevm, which this \
             version no longer mounts on the host; `gatevm start {} --reset` replaces it with a \
             disk (containerd's data on the state disk stays)",
            paths.name,
            paths.legacy_upper().display(),
            paths.name
        )));
    }
    let img = paths.upper_image();
    if img.exists() {
        return Ok(());
    }
    create_upper_image(paths, &img, root_mib)
}

/// Writes the root budget's image: a fresh file system on an empty sparse file (the host never
/// runs a file system tool on what the guest wrote; the guest makes the overlay's directories).
fn create_upper_image(
    paths: &InstancePaths,
    img: &Path,
    root_mib: u32,
) -> Result<(), SupervisorError> {
    let tmp = paths.dir.join("rootfs-rw.img.tmp");
    let f = std::fs::File::create(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
    f.set_len(u64::from(root_mib) << 20)
        .map_err(io_err("sizing the root's writable layer"))?;
    drop(f);
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-L", "gatevm-root"])
        .args(["-E", "lazy_itable_init=1,lazy_journal_init=1"])
        .arg(&tmp)
        .output()
        .map_err(io_err("running mkfs.ext4 for the root's writable layer"))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(SupervisorError::Setup(format!(
            "mkfs.ext4 of {} failed: {}",
            tmp.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    gatevm_fsutil::rename_durable(&tmp, img).map_err(io_err(format!("creating {}", img.display())))
}

/// Creates the sparse ext4 state disk on first start, and grows it (the file; the guest grows
/// the file system) when the configuration asks for more than it has.
pub(crate) fn ensure_state_disk(paths: &InstancePaths, gib: u32) -> Result<(), SupervisorError> {
    let disk = paths.state_disk();
    let want = u64::from(gib) << 30;
    if let Ok(meta) = std::fs::metadata(&disk) {
        if meta.len() < want {
            grow_state_disk(&disk, want)?;
        }
        return Ok(());
    }
    create_state_disk(paths, &disk, gib)
}

/// Writes a fresh state disk: an empty sparse file with an ext4 file system.
fn create_state_disk(paths: &InstancePaths, disk: &Path, gib: u32) -> Result<(), SupervisorError> {
    let tmp = paths.dir.join("state.img.tmp");
    let f = std::fs::File::create(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
    f.set_len(u64::from(gib) << 30)
        .map_err(io_err("sizing the state disk"))?;
    drop(f);
    let out = std::process::Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-L",
            "gatevm-state",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,discard",
        ])
        .arg(&tmp)
        .output()
        .map_err(io_err("running mkfs.ext4 (install e2fsprogs)"))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(SupervisorError::Setup(format!(
            "mkfs.ext4 failed on {}: {}",
            tmp.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    gatevm_fsutil::rename_durable(&tmp, disk).map_err(io_err("installing the state disk"))
}

/// Grows a state disk image as a file only (sparse: the new bytes are a hole). The ext4 file
/// system on it was written by the guest, so the host runs no file system tool on it: the guest
/// grows the mounted file system to the device's size itself (`gatevm-guest`'s disk set-up).
fn grow_state_disk(disk: &Path, bytes: u64) -> Result<(), SupervisorError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(disk)
        .and_then(|f| f.set_len(bytes))
        .map_err(io_err(format!("growing {}", disk.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(d: &Path) -> InstancePaths {
        let p = InstancePaths {
            name: "m1".into(),
            dir: d.join("m1"),
            run: d.join("run"),
        };
        std::fs::create_dir_all(&p.dir).unwrap();
        p
    }

    #[test]
    fn the_writable_layer_is_a_disk_made_once_and_never_mounted() {
        let d = tempfile::tempdir().unwrap();
        let p = paths(d.path());
        prepare_upper(&p, 64).unwrap();
        let img = p.upper_image();
        let meta = std::fs::metadata(&img).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        // An ext4 superblock (magic 0xEF53 at 1024 + 56), made on the host only while new.
        let bytes = std::fs::read(&img).unwrap();
        assert_eq!(&bytes[1024 + 56..1024 + 58], &[0x53, 0xef]);
        // The next start leaves what the guest wrote alone.
        std::fs::write(&img, b"the guest's bytes").unwrap();
        prepare_upper(&p, 64).unwrap();
        assert_eq!(std::fs::read(&img).unwrap(), b"the guest's bytes");
        // Nothing was mounted, and no host-side root or overlay directory exists.
        for gone in [p.rootfs(), p.upper_mount()] {
            assert!(!gone.exists(), "{}", gone.display());
        }
        assert!(!std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(&d.path().display().to_string()));
    }

    #[test]
    fn an_early_directory_layer_is_refused_with_the_way_out() {
        let d = tempfile::tempdir().unwrap();
        let p = paths(d.path());
        std::fs::create_dir_all(p.legacy_upper().join("etc")).unwrap();
        let e = prepare_upper(&p, 64).unwrap_err();
        assert_eq!(
            gatevm_abi::error_chain(&e),
            format!(
                "m1: the root's writable layer is the directory {} of an early gatevm, which this \
                 version no longer mounts on the host; `gatevm start m1 --reset` replaces it with a \
                 disk (containerd's data on the state disk stays)",
                p.legacy_upper().display()
            )
        );
        assert!(!p.upper_image().exists());
    }
}
