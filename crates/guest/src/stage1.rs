//! Stage 1: `/init` of gatevm's initramfs. Mounts the kernel filesystems, loads the modules
//! listed in `/modules/load.list`, mounts the virtio-fs root (tag `root`), switches root and
//! executes stage 2 ([`crate::STAGE2_PATH`]). Any fatal error is printed and powers the VM off, so
//! the host sees an exit instead of a hang.

use crate::sys::{self, Context};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Directory of the initramfs's modules.
pub(crate) const MODULES_DIR: &str = "/modules";
/// Where the virtio-fs root is mounted before the switch.
pub(crate) const NEWROOT: &str = "/newroot";
/// virtio-fs tag of the instance root.
pub(crate) const ROOT_TAG: &str = "root";
/// How long to wait for the virtio-fs device to show up.
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

fn mount_root() -> io::Result<()> {
    std::fs::create_dir_all(NEWROOT).ctx(|| format!("mkdir {NEWROOT}"))?;
    let deadline = Instant::now() + ROOT_WAIT;
    loop {
        match mount(
            Some(ROOT_TAG),
            NEWROOT,
            Some("virtiofs"),
            MsFlags::empty(),
            Some(""),
        ) {
            Ok(()) => return Ok(()),
            Err(
                e @ (nix::errno::Errno::ENOENT
                | nix::errno::Errno::ENODEV
                | nix::errno::Errno::EINVAL
                | nix::errno::Errno::ENXIO),
            ) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                return Err(io::Error::from(e))
                    .ctx(|| format!("mount virtiofs tag {ROOT_TAG:?} on {NEWROOT}"))
            }
        }
    }
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
            if p == Path::new(NEWROOT) {
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
    let (loaded, failed) = load_modules();
    for f in failed.iter().take(5) {
        crate::glog!("initramfs: module {f}");
    }
    if let Err(e) = mount_root() {
        fatal(&format!(
            "{e} ({loaded} modules loaded, {} failed)",
            failed.len()
        ));
    }
    let stage2 = format!("{NEWROOT}{}", crate::STAGE2_PATH);
    if !Path::new(&stage2).exists() {
        fatal(&format!(
            "{} missing in the instance root",
            crate::STAGE2_PATH
        ));
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
    fn load_list() {
        let t = "virtio.ko.xz\n\n# comment\n  virtio_ring.ko.xz  \n../etc/passwd\n/abs.ko\nsub/dir.ko.xz\n";
        assert_eq!(
            parse_load_list(t),
            vec!["virtio.ko.xz", "virtio_ring.ko.xz", "sub/dir.ko.xz"]
        );
    }
}
