//! API filesystems of stage 2 and the mount table helpers used at boot and at shutdown.

use crate::sys::Context;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::collections::HashSet;
use std::io;
use std::os::unix::fs::{symlink, DirBuilderExt};
use std::path::Path;

/// One filesystem to mount.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Spec {
    /// Source (device or a name for virtual filesystems).
    pub source: &'static str,
    /// Mount point.
    pub target: &'static str,
    /// Filesystem type.
    pub fstype: &'static str,
    /// Mount flags.
    pub flags: MsFlags,
    /// Filesystem options.
    pub data: &'static str,
}

const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);
const NOSUID_NODEV_NOEXEC: MsFlags = NOSUID_NODEV.union(MsFlags::MS_NOEXEC);

/// The API filesystems of stage 2, in mount order.
pub(crate) const STAGE2: &[Spec] = &[
    Spec {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    Spec {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    Spec {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: "mode=0755",
    },
    Spec {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: "newinstance,ptmxmode=0666,mode=0620,gid=5",
    },
    Spec {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: "mode=1777",
    },
    Spec {
        source: "mqueue",
        target: "/dev/mqueue",
        fstype: "mqueue",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    Spec {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: "mode=0755",
    },
    Spec {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: NOSUID_NODEV,
        data: "mode=1777",
    },
    Spec {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
];

pub(crate) use gatevm_fsutil::mountinfo::mount_points;

/// Creates a directory (and parents) with `mode` when missing.
pub(crate) fn mkdir(path: &Path, mode: u32) -> io::Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .ctx(|| format!("mkdir {}", path.display()))
}

/// Mounts `spec` unless its target is already a mount point; true when it mounted.
pub(crate) fn ensure(spec: &Spec, mounted: &mut HashSet<String>) -> io::Result<bool> {
    if mounted.contains(spec.target) {
        return Ok(false);
    }
    mkdir(Path::new(spec.target), 0o755)?;
    mount(
        Some(spec.source),
        spec.target,
        Some(spec.fstype),
        spec.flags,
        if spec.data.is_empty() {
            None
        } else {
            Some(spec.data)
        },
    )
    .ctx(|| format!("mount {} on {}", spec.fstype, spec.target))?;
    mounted.insert(spec.target.to_string());
    Ok(true)
}

/// Mounts the stage 2 API filesystems, creates the usual `/dev` symlinks and enables the cgroup
/// controllers. Returns one message per problem (nothing here is fatal).
pub(crate) fn setup_stage2() -> Vec<String> {
    let mut problems = Vec::new();
    let mut mounted: HashSet<String> = mount_points().into_iter().collect();
    for spec in STAGE2 {
        if let Err(e) = ensure(spec, &mut mounted) {
            problems.push(e.to_string());
        }
        if spec.target == "/proc" {
            // Now readable: learn what stage 1 (or anyone) already mounted.
            mounted.extend(mount_points());
        }
    }
    dev_links(&mut problems);
    let _ = mkdir(Path::new("/run/lock"), 0o1777);
    enable_cgroup_controllers(Path::new("/sys/fs/cgroup"));
    problems
}

fn dev_links(problems: &mut Vec<String>) {
    let links = [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ];
    for (link, target) in links {
        if std::fs::symlink_metadata(link).is_err() {
            if let Err(e) = symlink(target, link) {
                problems.push(format!("symlink {link}: {e}"));
            }
        }
    }
    if std::fs::symlink_metadata("/dev/ptmx").is_err() {
        if let Err(e) = symlink("pts/ptmx", "/dev/ptmx") {
            problems.push(format!("symlink /dev/ptmx: {e}"));
        }
    }
}

/// Enables every available controller for the children of the cgroup at `root`, one by one,
/// ignoring the ones that refuse.
pub(crate) fn enable_cgroup_controllers(root: &Path) -> Vec<String> {
    let available = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let mut enabled = Vec::new();
    for c in available.split_whitespace() {
        if std::fs::write(root.join("cgroup.subtree_control"), format!("+{c}")).is_ok() {
            enabled.push(c.to_string());
        }
    }
    enabled
}

/// Unmounts everything except the root and the kernel API filesystems, last mounted first. A busy
/// mount listed in `remount_ro` is remounted read-only (so its filesystem is clean); other busy
/// mounts are detached lazily.
pub(crate) fn unmount_for_shutdown(remount_ro: &[&str]) {
    let points = mount_points();
    let keep = |p: &str| {
        p == "/"
            || ["/proc", "/sys", "/dev"]
                .iter()
                .any(|k| p == *k || p.starts_with(&format!("{k}/")))
    };
    for p in points.iter().rev() {
        if keep(p) {
            continue;
        }
        match umount2(p.as_str(), MntFlags::empty()) {
            Ok(()) => {}
            Err(nix::errno::Errno::EBUSY) if remount_ro.contains(&p.as_str()) => {
                let r = mount::<str, str, str, str>(
                    None,
                    p.as_str(),
                    None,
                    MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                    None,
                );
                if let Err(e) = r {
                    crate::glog!("shutdown: {p} busy and cannot be remounted read-only: {e}");
                }
            }
            Err(nix::errno::Errno::EBUSY) => {
                let _ = umount2(p.as_str(), MntFlags::MNT_DETACH);
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use gatevm_fsutil::mountinfo::{parse as parse_mountinfo, unescape};

    #[test]
    fn mountinfo_parsing() {
        let text = "22 1 0:21 / / rw,relatime shared:1 - virtiofs root rw\n\
                    23 22 0:5 / /dev rw,nosuid - devtmpfs devtmpfs rw\n\
                    40 22 0:40 / /mnt/with\\040space rw - tmpfs tmpfs rw\n\
                    short line\n";
        assert_eq!(parse_mountinfo(text), vec!["/", "/dev", "/mnt/with space"]);
        assert_eq!(unescape("a\\134b\\011"), "a\\b\t");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
    }

    #[test]
    fn this_host_has_mounts() {
        assert!(mount_points().iter().any(|p| p == "/"));
    }

    #[test]
    fn cgroup_controllers_from_a_fake_root() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        // A plain file accepts every write: all are reported enabled.
        assert_eq!(
            enable_cgroup_controllers(d.path()),
            vec!["cpu", "memory", "pids"]
        );
    }
}
