//! The instance's file systems on the host: the root (a read-only base with the instance's
//! writable layer on top, in a budgeted ext4 image), mountinfo, and the state disk.

use super::{io_err, SupervisorError};
use crate::paths::InstancePaths;
use std::path::Path;

/// Whether `p` is a mount point (it is in mountinfo).
pub fn is_mounted(p: &Path) -> bool {
    gatevm_fsutil::mountinfo::is_mount_point(p)
}

/// Unmounts the instance root and the image of its writable layer if mounted (lazily when busy).
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

/// Mounts the instance's root: the shared read-only base with the instance's writable layer on
/// top. The writable layer lives in a sparse ext4 image of the root budget's size, mounted
/// `nosuid,nodev` (so a guest that fills its root gets ENOSPC and the host keeps its space); an
/// instance created before budgets keeps its plain directory. The overlay itself is `nosuid,nodev`
/// too: nothing the guest writes is a setuid program or a device for the host.
pub(crate) fn mount_rootfs(
    paths: &InstancePaths,
    base: &Path,
    root_mib: u32,
) -> Result<(), SupervisorError> {
    if paths.is_legacy_upper() {
        tracing::warn!(
            "{}: the root's writable layer is the unbudgeted directory {} of an earlier gatevm; \
             `gatevm start --reset` moves it into a budgeted image",
            paths.name,
            paths.legacy_upper().display()
        );
    } else {
        mount_upper(paths, root_mib)?;
    }
    for d in [paths.upper(), paths.overlay_work(), paths.rootfs()] {
        crate::paths::mkdir_private(&d).map_err(io_err(format!("creating {}", d.display())))?;
    }
    // The guest's root directory itself must be world-readable like any root.
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(paths.upper(), std::fs::Permissions::from_mode(0o755));
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        base.display(),
        paths.upper().display(),
        paths.overlay_work().display()
    );
    nix::mount::mount(
        Some("gatevm"),
        &paths.rootfs(),
        Some("overlay"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some(&*opts),
    )
    .map_err(|e| {
        SupervisorError::Setup(format!(
            "mounting the instance root (overlay on {}) failed: {e}; gatevm needs root for this",
            paths.rootfs().display()
        ))
    })
}

/// Creates the root budget's image on first use and mounts it.
fn mount_upper(paths: &InstancePaths, root_mib: u32) -> Result<(), SupervisorError> {
    let (img, mnt) = (paths.upper_image(), paths.upper_mount());
    crate::paths::mkdir_private(&mnt).map_err(io_err(format!("creating {}", mnt.display())))?;
    if is_mounted(&mnt) {
        return Ok(());
    }
    if !img.exists() {
        create_upper_image(paths, &img, root_mib)?;
    }
    mount_loop(&img, &mnt)
}

/// Writes the root budget's image: a fresh file system on an empty sparse file (the host never
/// runs a file system tool on what the guest wrote).
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

/// Mounts the root budget's image `img` on `mnt` with mount(8) (a loop device, `nosuid,nodev`).
fn mount_loop(img: &Path, mnt: &Path) -> Result<(), SupervisorError> {
    let mut mount = std::process::Command::new("mount");
    mount
        .args(["-t", "ext4", "-o", "loop,nosuid,nodev,noatime"])
        .arg(img)
        .arg(mnt);
    // A supervisor killed while mount(8) runs takes it along: otherwise the mount could appear
    // after whoever cleans up after the dead supervisor has looked.
    // SAFETY: the closure only calls prctl, which is async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt;
        mount.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = mount
        .output()
        .map_err(io_err("running mount for the root's writable layer"))?;
    if !out.status.success() {
        return Err(SupervisorError::Setup(format!(
            "mounting {} on {} failed: {}; gatevm needs root (and loop devices) for this",
            img.display(),
            mnt.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
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
