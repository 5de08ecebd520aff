//! Confinement of the libkrun VM process (`gatevm __krun-vm`) before it enters the VM.
//!
//! libkrun serves the instance root over virtio-fs from inside the VM process, and its
//! passthrough file system resolves names sent by the guest kernel without confining `..`
//! (libkrun issue #329: "the caller must sandbox"). A guest that controls its kernel could walk
//! from the instance root up to the host's `/`. So before `krun_start_enter` the process:
//!
//! 1. enters a mount namespace of its own (`unshare(CLONE_NEWNS)`; as a non-root user together
//!    with a user namespace that maps only the user itself), with every mount made private;
//! 2. mounts a small tmpfs and bind-mounts into it, each at the same absolute path it has on the
//!    host, only what the VM needs ([`Bind`]): the instance root, the state disk, the runtime
//!    directory where the agent and network sockets are, the console log, an external kernel,
//!    `/dev/kvm`, and `/proc/self/fd` (libkrun's passthrough reopens its files through it; only
//!    that directory of procfs is there, not `/proc/sys` nor other processes). Guest-writable
//!    data is bound `nosuid,nodev`, so a device node the guest creates (it keeps `CAP_MKNOD`)
//!    cannot be opened as a device on the host;
//! 3. `pivot_root`s into it and detaches the old root, then remounts the tmpfs read-only: `..`
//!    from `/` stays at `/`, and nothing else of the host is reachable;
//! 4. sets `PR_SET_NO_NEW_PRIVS` and makes itself non-dumpable (no other process of the same uid
//!    and capabilities, such as another instance's VM, can ptrace it or open its `/proc` files);
//! 5. drops every capability but those libkrun's passthrough file system needs to run the guest's
//!    root as root on the instance root ([`KEPT_CAPS`]) from the bounding, effective, permitted,
//!    inheritable and ambient sets.
//!
//! Paths stay the same inside, so the libkrun call sequence needs no rewriting. The step is a
//! plain [`Confine`] value (unit-tested), applied by [`Confine::apply`]; it runs after the
//! libkrun context is configured (libkrunfw is loaded by then) and before `krun_start_enter`,
//! on the process's only thread (mount namespace, root and capabilities are per thread; the
//! threads libkrun starts afterwards inherit them).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Capabilities the VM process keeps: libkrun's passthrough file system switches its file
/// system uid/gid to the guest caller's per request (`CAP_SETUID`, `CAP_SETGID`), creates files
/// owned by any guest user and changes owners (`CAP_CHOWN`), bypasses permission checks the way
/// the guest's root does (`CAP_DAC_OVERRIDE`, `CAP_FOWNER`), keeps set-id bits on writes
/// (`CAP_FSETID`, which it drops and raises around writes), creates device nodes and FIFOs for
/// the guest (`CAP_MKNOD`) and file capabilities (`CAP_SETFCAP`). Everything else is dropped,
/// `CAP_SYS_ADMIN` (mounts, namespaces) included.
pub const KEPT_CAPS: [u32; 8] = [
    CAP_CHOWN,
    CAP_DAC_OVERRIDE,
    CAP_FOWNER,
    CAP_FSETID,
    CAP_SETGID,
    CAP_SETUID,
    CAP_MKNOD,
    CAP_SETFCAP,
];

// Capability numbers (`linux/capability.h`).
const CAP_CHOWN: u32 = 0;
const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_FOWNER: u32 = 3;
const CAP_FSETID: u32 = 4;
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
/// `CAP_SYS_ADMIN`, never kept.
pub const CAP_SYS_ADMIN: u32 = 21;
const CAP_MKNOD: u32 = 27;
const CAP_SETFCAP: u32 = 31;

/// The capability mask of [`KEPT_CAPS`], as `CapEff` in `/proc/PID/status` shows it.
pub fn kept_mask() -> u64 {
    KEPT_CAPS.iter().fold(0u64, |m, c| m | (1u64 << c))
}

/// What a bound path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindKind {
    /// A directory.
    Dir,
    /// A regular file (created empty first when `create` is set and it is missing).
    File,
    /// A device node.
    Device,
}

/// One path of the host made visible inside, at the same absolute path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// The path, absolute.
    pub path: PathBuf,
    pub kind: BindKind,
    /// Read-only inside.
    pub read_only: bool,
    /// Devices on it can be opened (only for `/dev/kvm` itself).
    pub allow_dev: bool,
    /// Create the file (empty) on the host when it is missing.
    pub create: bool,
}

impl Bind {
    fn data(path: &Path, kind: BindKind) -> Bind {
        Bind {
            path: path.to_path_buf(),
            kind,
            read_only: false,
            allow_dev: false,
            create: false,
        }
    }
}

/// The confinement of one process: the mounts it keeps and the capabilities it keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confine {
    /// Where the new root's tmpfs is mounted before `pivot_root` (any existing directory: in the
    /// private namespace the mount hides nothing from anybody else, and the sources are opened
    /// before it is mounted).
    pub staging: PathBuf,
    /// What is bound inside, in order.
    pub binds: Vec<Bind>,
    /// Capability numbers kept.
    pub keep_caps: Vec<u32>,
}

/// A failed confinement step.
#[derive(Debug, thiserror::Error)]
#[error("confining the VM process: {step} {}", path.display())]
pub struct ConfineError {
    /// What was done.
    pub step: &'static str,
    /// On what.
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn err<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ConfineError + 'a {
    move |source| ConfineError {
        step,
        path: path.to_path_buf(),
        source,
    }
}

fn last(step: &'static str, path: &Path) -> ConfineError {
    err(step, path)(std::io::Error::last_os_error())
}

fn cpath(p: &Path) -> Result<CString, ConfineError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| ConfineError {
        step: "a NUL byte in",
        path: p.to_path_buf(),
        source: std::io::Error::from_raw_os_error(libc::EINVAL),
    })
}

/// The confinement of a libkrun VM for its configuration.
pub fn for_krun(c: &crate::krun::KrunConfig) -> Confine {
    // The boot directory holds only the guest agent: read-only, so the guest cannot write
    // through libkrun's virtio-fs; so are the disks attached read-only.
    let mut binds = vec![Bind {
        read_only: true,
        ..Bind::data(&c.root_dir, BindKind::Dir)
    }];
    for d in &c.disks {
        binds.push(Bind {
            read_only: d.read_only,
            ..Bind::data(&d.path, BindKind::File)
        });
    }
    // Shared directories: libkrun's virtio-fs serves them from inside this process, so each is
    // bound here (read-only for a read-only share: the kernel refuses writes even if the
    // file server did not), nosuid and nodev like every bind.
    for share in &c.shares {
        binds.push(Bind {
            read_only: share.read_only,
            ..Bind::data(&share.host_dir, BindKind::Dir)
        });
    }
    // The agent socket does not exist yet (libkrun creates it): its directory is bound.
    let mut dirs: Vec<&Path> = c.agent_socket.parent().into_iter().collect();
    if let Some(crate::NetAttach::Socket(p)) = &c.net {
        dirs.extend(p.parent());
    }
    dirs.dedup();
    for d in dirs {
        binds.push(Bind::data(d, BindKind::Dir));
    }
    binds.push(Bind {
        create: true,
        ..Bind::data(&c.console_log, BindKind::File)
    });
    if let crate::krun::KrunKernel::External {
        path, initramfs, ..
    } = &c.kernel
    {
        for p in std::iter::once(path).chain(initramfs) {
            binds.push(Bind {
                read_only: true,
                ..Bind::data(p, BindKind::File)
            });
        }
    }
    binds.push(Bind {
        allow_dev: true,
        ..Bind::data(Path::new("/dev/kvm"), BindKind::Device)
    });
    binds.push(Bind {
        read_only: true,
        ..Bind::data(Path::new("/proc/self/fd"), BindKind::Dir)
    });
    Confine {
        staging: PathBuf::from("/tmp"),
        binds,
        keep_caps: KEPT_CAPS.to_vec(),
    }
}

/// Mount flags of the mount a descriptor is on that a bind mount in a user namespace must keep.
fn locked_flags(fd: &OwnedFd) -> libc::c_ulong {
    // SAFETY: fstatvfs writes into the zeroed struct we own; fd is open.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    if unsafe { libc::fstatvfs(fd.as_raw_fd(), &mut st) } != 0 {
        return 0;
    }
    let mut f = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_RDONLY, libc::MS_RDONLY),
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if st.f_flag & st_flag != 0 {
            f |= ms_flag;
        }
    }
    f
}

fn mount(
    src: Option<&CString>,
    target: &CString,
    fstype: Option<&CString>,
    flags: libc::c_ulong,
    data: Option<&CString>,
) -> std::io::Result<()> {
    let p = |s: Option<&CString>| s.map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is a NUL-terminated string alive for the call, or null.
    let rc = unsafe { libc::mount(p(src), target.as_ptr(), p(fstype), flags, p(data).cast()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn write_file(path: &str, text: &str) -> Result<(), ConfineError> {
    std::fs::write(path, text).map_err(err("writing", Path::new(path)))
}

impl Confine {
    /// Applies the confinement to the calling thread (and the threads it starts afterwards).
    /// Irreversible; on error the process is left half-confined and must exit.
    pub fn apply(&self) -> Result<(), ConfineError> {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        // SAFETY: getegid has no preconditions.
        let egid = unsafe { libc::getegid() };
        for b in &self.binds {
            if b.create && !b.path.exists() {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&b.path)
                    .map_err(err("creating", &b.path))?;
            }
        }
        let flags = if euid == 0 {
            libc::CLONE_NEWNS
        } else {
            libc::CLONE_NEWNS | libc::CLONE_NEWUSER
        };
        // SAFETY: unshare has no memory effects.
        if unsafe { libc::unshare(flags) } != 0 {
            return Err(last("entering a new mount namespace for", Path::new("/")));
        }
        if euid != 0 {
            write_file("/proc/self/setgroups", "deny")?;
            write_file("/proc/self/uid_map", &format!("{euid} {euid} 1"))?;
            write_file("/proc/self/gid_map", &format!("{egid} {egid} 1"))?;
        }
        let root = cpath(Path::new("/"))?;
        mount(None, &root, None, libc::MS_REC | libc::MS_PRIVATE, None)
            .map_err(err("making the mounts private under", Path::new("/")))?;
        // Open every source now, in the new namespace (a bind mount takes its source from the
        // caller's namespace) and before the staging mount, which may hide some of them.
        let mut sources = Vec::with_capacity(self.binds.len());
        for b in &self.binds {
            let c = cpath(&b.path)?;
            // SAFETY: c is a NUL-terminated path; the descriptor is checked and then owned.
            let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
            if fd < 0 {
                return Err(last("opening", &b.path));
            }
            // SAFETY: fd was just opened and is owned by nobody else.
            sources.push(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let stage = cpath(&self.staging)?;
        let tmpfs = CString::from(c"tmpfs");
        let opts = CString::from(c"size=64k,nr_inodes=256,mode=0755");
        mount(
            Some(&tmpfs),
            &stage,
            Some(&tmpfs),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            Some(&opts),
        )
        .map_err(err("mounting a tmpfs on", &self.staging))?;
        for (b, fd) in self.binds.iter().zip(&sources) {
            let rel = b.path.strip_prefix("/").unwrap_or(&b.path);
            let target = self.staging.join(rel);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(err("creating", parent))?;
            }
            match b.kind {
                BindKind::Dir => {
                    std::fs::create_dir_all(&target).map_err(err("creating", &target))?
                }
                BindKind::File | BindKind::Device => std::fs::File::create(&target)
                    .map(drop)
                    .map_err(err("creating", &target))?,
            }
            let src = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .map_err(|_| last("naming", &b.path))?;
            let t = cpath(&target)?;
            mount(Some(&src), &t, None, libc::MS_BIND, None)
                .map_err(err("bind-mounting", &b.path))?;
            let mut f = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | locked_flags(fd);
            if !b.allow_dev {
                f |= libc::MS_NODEV;
            }
            if b.read_only {
                f |= libc::MS_RDONLY;
            }
            if b.kind != BindKind::Dir || b.read_only {
                f |= libc::MS_NOEXEC;
            }
            mount(None, &t, None, f, None)
                .map_err(err("restricting the bind mount of", &b.path))?;
        }
        drop(sources);
        // pivot_root(".", "."): the old root ends up on top of the new one and is detached.
        std::env::set_current_dir(&self.staging).map_err(err("entering", &self.staging))?;
        let dot = CString::from(c".");
        // SAFETY: both arguments are NUL-terminated strings alive for the call.
        if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } != 0 {
            return Err(last("pivot_root into", &self.staging));
        }
        // SAFETY: dot is a NUL-terminated string alive for the call.
        if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(last("detaching the old root from", &self.staging));
        }
        std::env::set_current_dir("/").map_err(err("entering", Path::new("/")))?;
        mount(
            None,
            &root,
            None,
            libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            None,
        )
        .map_err(err("making the new root read-only:", Path::new("/")))?;
        self.drop_privileges()
    }

    /// Sets no_new_privs and non-dumpable, and keeps only [`Confine::keep_caps`].
    fn drop_privileges(&self) -> Result<(), ConfineError> {
        let here = Path::new("/");
        // SAFETY: prctl with integer arguments has no memory effects.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(last("setting no_new_privs in", here));
        }
        // SAFETY: as above.
        if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
            return Err(last("making the process non-dumpable in", here));
        }
        // SAFETY: as above.
        if unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
        } != 0
        {
            return Err(last("clearing the ambient capabilities in", here));
        }
        // The bounding set first, while CAP_SETPCAP is still effective.
        for cap in 0..=63u32 {
            if self.keep_caps.contains(&cap) {
                continue;
            }
            // SAFETY: as above.
            let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            if rc != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
                return Err(last("dropping a capability from the bounding set in", here));
            }
        }
        let mask = self.keep_caps.iter().fold(0u64, |m, c| m | (1u64 << c));
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
        let hdr = Header {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let half = |shift: u32| Data {
            effective: (mask >> shift) as u32,
            permitted: (mask >> shift) as u32,
            inheritable: 0,
        };
        let data = [half(0), half(32)];
        // SAFETY: capset reads a version-3 header and two data structs we own for the call.
        if unsafe { libc::syscall(libc::SYS_capset, &hdr, data.as_ptr()) } != 0 {
            return Err(last("setting the capabilities in", here));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::krun::{KrunConfig, KrunKernel};

    fn cfg() -> KrunConfig {
        KrunConfig {
            cpus: 1,
            memory_mib: 256,
            kernel: KrunKernel::External {
                path: "/rt/vmlinux".into(),
                initramfs: None,
                cmdline: String::new(),
            },
            root_dir: "/inst/boot".into(),
            disks: vec![
                crate::Disk::ro("gatevm-base", "/rt/base.erofs"),
                crate::Disk::rw("gatevm-state", "/inst/state.img"),
            ],
            agent_socket: "/run/g/i/agent.sock".into(),
            net: Some(crate::NetAttach::Socket("/run/g/i/net.sock".into())),
            mac: [0; 6],
            console_log: "/inst/logs/console.log".into(),
            exec: "/init".into(),
            args: vec![],
            env: vec![],
            shares: vec![],
        }
    }

    #[test]
    fn the_plan_binds_only_what_the_vm_needs() {
        let c = for_krun(&cfg());
        let paths: Vec<&str> = c.binds.iter().map(|b| b.path.to_str().unwrap()).collect();
        assert_eq!(
            paths,
            [
                "/inst/boot",
                "/rt/base.erofs",
                "/inst/state.img",
                "/run/g/i",
                "/inst/logs/console.log",
                "/rt/vmlinux",
                "/dev/kvm",
                "/proc/self/fd"
            ]
        );
        let by = |p: &str| c.binds.iter().find(|b| b.path == Path::new(p)).unwrap();
        assert!(!by("/inst/boot").allow_dev && by("/inst/boot").read_only);
        assert!(by("/rt/base.erofs").read_only && !by("/inst/state.img").read_only);
        assert!(by("/rt/vmlinux").read_only && by("/proc/self/fd").read_only);
        assert!(by("/dev/kvm").allow_dev);
        assert!(by("/inst/logs/console.log").create);
        assert_eq!(c.keep_caps, KEPT_CAPS);
        assert!(!c.keep_caps.contains(&CAP_SYS_ADMIN));
        assert_eq!(kept_mask(), 0x8800_00db);
    }

    #[test]
    fn libkrunfw_kernel_binds_no_kernel_file() {
        let c = for_krun(&KrunConfig {
            kernel: KrunKernel::Libkrunfw,
            net: None,
            ..cfg()
        });
        assert!(!c.binds.iter().any(|b| b.path == Path::new("/rt/vmlinux")));
        assert_eq!(
            c.binds
                .iter()
                .filter(|b| b.path == Path::new("/run/g/i"))
                .count(),
            1
        );
    }
}
