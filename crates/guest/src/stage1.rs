//! Stage 1: `/init` of gatevm's initramfs (or, under libkrun, the workload libkrun's init starts
//! from a directory holding only this binary). Mounts the kernel filesystems, loads the modules
//! listed in `/modules/load.list`, then builds the instance root from the VM's disks: the shared
//! base (read-only EROFS, [`disk::BASE`]) under an overlay whose upper layer lives on the
//! instance's own disk ([`disk::UPPER`], ext4), and the k3s staging image ([`disk::STAGE`]) when
//! the host attached one. It copies itself into the root as stage 2 ([`crate::STAGE2_PATH`]),
//! switches root and executes it. Nothing of the root is mounted on the host. Any fatal error is
//! printed and powers the VM off, so the host sees an exit instead of a hang.

use crate::sys::{self, Context};
use gatevm_abi::paths::disk;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

/// Directory of the initramfs's modules.
pub(crate) const MODULES_DIR: &str = "/modules";
/// Where the instance root is assembled before the switch.
pub(crate) const NEWROOT: &str = "/newroot";
/// Where the base image is mounted (read-only; the overlay's lower layer).
pub(crate) const LOWER: &str = "/lower";
/// Where the writable layer's disk is mounted.
pub(crate) const RW: &str = "/rw";
/// How long to wait for the root's disks to show up.
pub(crate) const ROOT_WAIT: Duration = Duration::from_secs(5);

fn fatal(msg: &str) -> ! {
    crate::glog!("FATAL: {msg}; powering off");
    sys::power_off()
}

/// Parses `load.list`: one file name per line, blank lines and `#` comments skipped, names that
/// would leave the modules directory refused.
pub(crate) fn parse_load_list(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter(|l| !l.starts_with('/') && !l.split('/').any(|c| c == ".."))
        .map(str::to_string)
        .collect()
}

fn mount_api(source: &str, target: &str, fstype: &str) {
    let _ = std::fs::create_dir_all(target);
    match mount(
        Some(source),
        target,
        Some(fstype),
        MsFlags::empty(),
        None::<&str>,
    ) {
        Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
        Err(e) => crate::glog!("initramfs: mount {fstype} on {target}: {e}"),
    }
}

/// Loads the initramfs modules; returns (loaded, failures).
fn load_modules() -> (usize, Vec<String>) {
    let dir = Path::new(MODULES_DIR);
    let list = match std::fs::read_to_string(dir.join("load.list")) {
        Ok(t) => parse_load_list(&t),
        Err(e) => return (0, vec![format!("{MODULES_DIR}/load.list: {e}")]),
    };
    let mut loaded = 0;
    let mut failed = Vec::new();
    for name in list {
        match crate::modules::load_file(&dir.join(&name)) {
            Ok(()) => loaded += 1,
            Err(e) => failed.push(format!("{name}: {e}")),
        }
    }
    (loaded, failed)
}

/// The overlay's options for the lower and writable mounts.
pub(crate) fn overlay_options(lower: &str, rw: &str) -> String {
    format!(
        "lowerdir={lower},upperdir={rw}/{},workdir={rw}/{}",
        disk::UPPER_DIR,
        disk::WORK_DIR
    )
}

/// Mounts `dev` (`fstype`) on `target`, creating the directory.
fn mount_dev(dev: &Path, target: &str, fstype: &str, flags: MsFlags) -> io::Result<()> {
    std::fs::create_dir_all(target).ctx(|| format!("mkdir {target}"))?;
    mount(Some(dev), target, Some(fstype), flags, None::<&str>)
        .map_err(io::Error::from)
        .ctx(|| format!("mount {} ({fstype}) on {target}", dev.display()))
}

/// Builds the instance root on [`NEWROOT`]: the base image under an overlay with its upper layer
/// on the instance's disk, then the k3s staging image when there is one.
fn mount_root() -> io::Result<()> {
    let find = |serial| crate::blockdev::wait_for(serial, ROOT_WAIT).map_err(io::Error::other);
    let base = find(disk::BASE)?;
    let upper = find(disk::UPPER)?;
    mount_dev(&base, LOWER, "erofs", MsFlags::MS_RDONLY)?;
    mount_dev(&upper, RW, "ext4", MsFlags::MS_NOATIME)?;
    for d in [disk::UPPER_DIR, disk::WORK_DIR] {
        let p = format!("{RW}/{d}");
        std::fs::create_dir_all(&p).ctx(|| format!("mkdir {p}"))?;
    }
    // The root directory itself must be world-readable like any root.
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(
        format!("{RW}/{}", disk::UPPER_DIR),
        std::fs::Permissions::from_mode(0o755),
    );
    std::fs::create_dir_all(NEWROOT).ctx(|| format!("mkdir {NEWROOT}"))?;
    let opts = overlay_options(LOWER, RW);
    mount(
        Some("gatevm-root"),
        NEWROOT,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .map_err(io::Error::from)
    .ctx(|| format!("mount overlay ({opts}) on {NEWROOT}"))?;
    // The staging image is attached (before boot) only for the k3s profile.
    if let Ok(stage) = crate::blockdev::find(disk::STAGE) {
        let target = format!("{NEWROOT}{}", gatevm_abi::paths::K3S_STAGE_DIR);
        if std::fs::symlink_metadata(&target).is_ok_and(|m| !m.is_dir()) {
            let _ = std::fs::remove_file(&target);
        }
        mount_dev(
            &stage,
            &target,
            "erofs",
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        )?;
    }
    Ok(())
}

/// Copies this binary into the new root as stage 2 when what is there differs (the writable
/// layer keeps it; an update of gatevm brings a new one at the next boot).
fn install_stage2() -> io::Result<()> {
    let me = std::fs::read("/proc/self/exe").ctx(|| "read /proc/self/exe".into())?;
    let dest = format!("{NEWROOT}{}", crate::STAGE2_PATH);
    if std::fs::read(&dest).is_ok_and(|have| have == me) {
        return Ok(());
    }
    let dir = Path::new(&dest).parent().unwrap_or(Path::new(NEWROOT));
    std::fs::create_dir_all(dir).ctx(|| format!("mkdir {}", dir.display()))?;
    let tmp = format!("{dest}.new");
    let _ = std::fs::remove_file(&tmp);
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(&tmp)
            .ctx(|| format!("create {tmp}"))?;
        f.write_all(&me).ctx(|| format!("write {tmp}"))?;
    }
    std::fs::rename(&tmp, &dest).ctx(|| format!("rename {tmp} to {dest}"))
}

/// Deletes the initramfs's files (they would pin memory forever), staying on its filesystem.
fn free_initramfs() {
    use nix::sys::statfs::{statfs, FsType, TMPFS_MAGIC};
    const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);
    let Ok(fs) = statfs("/") else { return };
    if fs.filesystem_type() != RAMFS_MAGIC && fs.filesystem_type() != TMPFS_MAGIC {
        return;
    }
    let Ok(root) = std::fs::metadata("/") else {
        return;
    };
    fn remove(dir: &Path, dev: u64, depth: u32) {
        if depth > 32 {
            return;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if [NEWROOT, LOWER, RW].iter().any(|m| p == Path::new(m)) {
                continue;
            }
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if m.dev() != dev {
                continue;
            }
            if m.is_dir() {
                remove(&p, dev, depth + 1);
                let _ = std::fs::remove_dir(&p);
            } else {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
    remove(Path::new("/"), root.dev(), 0);
}

fn switch_root() -> io::Result<()> {
    for d in ["/dev", "/proc", "/sys"] {
        let target = format!("{NEWROOT}{d}");
        let _ = std::fs::create_dir_all(&target);
        if mount(
            Some(d),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .is_err()
        {
            let _ = umount2(d, MntFlags::MNT_DETACH);
        }
    }
    free_initramfs();
    nix::unistd::chdir(NEWROOT).ctx(|| format!("chdir {NEWROOT}"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .ctx(|| "move the new root onto /".into())?;
    nix::unistd::chroot(".").ctx(|| "chroot".into())?;
    nix::unistd::chdir("/").ctx(|| "chdir /".into())?;
    Ok(())
}

/// Runs stage 1; never returns (it executes stage 2 or powers off).
pub(crate) fn run() -> ! {
    let _ = std::fs::create_dir_all("/dev");
    mount_api("devtmpfs", "/dev", "devtmpfs");
    sys::fix_stdio();
    mount_api("proc", "/proc", "proc");
    mount_api("sysfs", "/sys", "sysfs");
    // libkrun's kernel has what stage 1 needs built in, and its boot directory no modules.
    let (loaded, failed) = if Path::new(MODULES_DIR).exists() {
        load_modules()
    } else {
        (0, vec![])
    };
    for f in failed.iter().take(5) {
        crate::glog!("initramfs: module {f}");
    }
    if let Err(e) = mount_root() {
        fatal(&format!(
            "{e} ({loaded} modules loaded, {} failed)",
            failed.len()
        ));
    }
    if let Err(e) = install_stage2() {
        fatal(&format!("installing stage 2: {e}"));
    }
    crate::glog!("initramfs: root mounted ({loaded} modules), switching root");
    if let Err(e) = switch_root() {
        fatal(&format!("switch root: {e}"));
    }
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_else(|| crate::STAGE2_PATH.into());
    let err = std::process::Command::new(crate::STAGE2_PATH)
        .arg0(argv0)
        .args(args)
        .exec();
    fatal(&format!("exec {}: {err}", crate::STAGE2_PATH))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_upper_and_work_are_on_the_writable_disk() {
        assert_eq!(
            overlay_options("/lower", "/rw"),
            "lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work"
        );
    }

    #[test]
    fn load_list() {
        let t = "virtio.ko.xz\n\n# comment\n  virtio_ring.ko.xz  \n../etc/passwd\n/abs.ko\nsub/dir.ko.xz\n";
        assert_eq!(
            parse_load_list(t),
            vec!["virtio.ko.xz", "virtio_ring.ko.xz", "sub/dir.ko.xz"]
        );
    }
}
