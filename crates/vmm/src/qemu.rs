//! The QEMU backend: `qemu-system-x86_64 -M microvm` with virtio-mmio devices.

use crate::{Accel, VmConfig, Vmm, VmmError};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Command;

/// QEMU's seccomp sandbox: obsolete system calls, privilege changes (`setuid` and friends),
/// spawning processes and resource control (scheduler, affinity, rlimits) are refused.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The unprivileged identity QEMU runs as when gatevm runs as root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    /// `nobody` and its primary group from `/etc/passwd`, else 65534:65534.
    pub fn nobody() -> RunAs {
        let from_passwd = std::fs::read_to_string("/etc/passwd").ok().and_then(|t| {
            t.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.first() == Some(&"nobody") && f.len() > 3)
                    .then(|| {
                        Some(RunAs {
                            uid: f[2].parse().ok()?,
                            gid: f[3].parse().ok()?,
                        })
                    })
                    .flatten()
            })
        });
        from_passwd.unwrap_or(RunAs {
            uid: 65534,
            gid: 65534,
        })
    }
}

/// QEMU `microvm` backend.
#[derive(Debug, Clone)]
pub struct Qemu {
    /// The `qemu-system-x86_64` binary.
    pub binary: PathBuf,
    /// Firmware directories (`-L`), searched in order; empty for QEMU's built-in paths.
    pub data_dirs: Vec<PathBuf>,
    /// The host's TSC frequency in kHz, handed to a TCG guest as `tsc_early_khz`.
    ///
    /// Under TCG the guest's TSC is the host's, but the guest kernel has to calibrate it against
    /// the emulated PIT; on a loaded host that calibration fails, the kernel marks the TSC
    /// unusable and boot stalls for minutes (seen with three VMs on two cores). Telling it the
    /// frequency skips the calibration.
    pub tsc_khz: Option<u64>,
    /// Whom QEMU runs as: set when gatevm runs as root (see [`Qemu::command`]).
    pub run_as: Option<RunAs>,
}

impl Default for Qemu {
    fn default() -> Self {
        Qemu {
            binary: PathBuf::from("qemu-system-x86_64"),
            data_dirs: vec![],
            tsc_khz: None,
            run_as: None,
        }
    }
}

impl Qemu {
    /// The backend for a QEMU binary and its firmware directories on this host (measures the
    /// TSC frequency once, ~5 ms).
    pub fn for_host(binary: PathBuf, data_dirs: Vec<PathBuf>) -> Qemu {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        Qemu {
            binary,
            data_dirs,
            tsc_khz: crate::probe::host_tsc_khz(),
            run_as: root.then(RunAs::nobody),
        }
    }
}

/// What an unprivileged QEMU is handed already open, by descriptor number: everything it would
/// otherwise open by a path under root's directories.
#[derive(Debug, Default)]
struct Handles {
    /// Descriptors QEMU inherits (close-on-exec cleared in the child).
    keep: Vec<OwnedFd>,
    data_dirs: Vec<RawFd>,
    kernel: RawFd,
    initramfs: Option<RawFd>,
    console: RawFd,
    /// Per disk, its descriptors: read-write ones get a read-only one as well, since QEMU also
    /// opens an image read-only (for its lock) and takes from the fd set only a descriptor whose
    /// access mode matches.
    disks: Vec<Vec<RawFd>>,
    agent: RawFd,
    net: Option<RawFd>,
    /// The vhost-user socket's directory: QEMU connects by path through it
    /// (`/proc/self/fd/N/FILE`), since a chardev made from a descriptor cannot pass descriptors,
    /// which vhost-user needs.
    vhost_dir: Option<(RawFd, String)>,
    /// Per share, its virtiofsd socket's directory and file name (as for `vhost_dir`).
    shares: Vec<(RawFd, String)>,
}

fn open_fd(p: &Path, flags: i32, what: &'static str) -> Result<OwnedFd, VmmError> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| VmmError::Invalid(format!("{what} path {} has a NUL byte", p.display())))?;
    // SAFETY: c is a NUL-terminated path; the descriptor is checked and then owned.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, 0o600) };
    if fd < 0 {
        return Err(VmmError::Open {
            what,
            path: p.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: fd was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Handles {
    fn add(&mut self, fd: OwnedFd) -> RawFd {
        let n = fd.as_raw_fd();
        self.keep.push(fd);
        n
    }

    /// A vhost-user back end's socket (passt's, a virtiofsd's) as QEMU reaches it: its directory
    /// by descriptor and its file name (QEMU connects to `/proc/self/fd/N/FILE`, since a chardev
    /// made from a descriptor cannot pass descriptors, which vhost-user needs). QEMU's uid must
    /// reach the socket: the directory and the socket become its own (never through a symlink put
    /// in their place).
    fn vhost_user_socket(
        &mut self,
        q: &Qemu,
        p: &Path,
        what: &'static str,
    ) -> Result<(RawFd, String), VmmError> {
        let (Some(dir), Some(file)) = (p.parent(), p.file_name()) else {
            return Err(VmmError::Invalid(format!(
                "{what} path {} has no directory",
                p.display()
            )));
        };
        if let Some(ra) = q.run_as {
            for path in [dir, p] {
                std::os::unix::fs::lchown(path, Some(ra.uid), Some(ra.gid)).map_err(|source| {
                    VmmError::Open {
                        what,
                        path: path.to_path_buf(),
                        source,
                    }
                })?;
            }
        }
        let dfd = self.add(open_fd(dir, libc::O_PATH | libc::O_DIRECTORY, what)?);
        Ok((dfd, file.to_string_lossy().into_owned()))
    }

    /// Opens the files and sockets of a configuration; the agent socket is bound and listening.
    fn open(q: &Qemu, cfg: &VmConfig) -> Result<Handles, VmmError> {
        use std::os::unix::net::{UnixListener, UnixStream};
        let mut h = Handles::default();
        for d in &q.data_dirs {
            let fd = open_fd(
                d,
                libc::O_PATH | libc::O_DIRECTORY,
                "QEMU firmware directory",
            )?;
            let n = h.add(fd);
            h.data_dirs.push(n);
        }
        h.kernel = h.add(open_fd(&cfg.kernel, libc::O_RDONLY, "guest kernel")?);
        if let Some(i) = &cfg.initramfs {
            h.initramfs = Some(h.add(open_fd(i, libc::O_RDONLY, "initramfs")?));
        }
        h.console = h.add(open_fd(
            &cfg.console_log,
            libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT,
            "console log",
        )?);
        for d in &cfg.disks {
            let mut fds = vec![];
            if !d.read_only {
                fds.push(h.add(open_fd(&d.path, libc::O_RDWR, "disk image")?));
            }
            fds.push(h.add(open_fd(&d.path, libc::O_RDONLY, "disk image")?));
            h.disks.push(fds);
        }
        fn sock(what: &'static str, p: &Path) -> impl FnOnce(std::io::Error) -> VmmError {
            let path = p.to_path_buf();
            move |source| VmmError::Open { what, path, source }
        }
        let _ = std::fs::remove_file(&cfg.agent_socket);
        let agent = UnixListener::bind(&cfg.agent_socket)
            .map_err(sock("agent socket", &cfg.agent_socket))?;
        h.agent = h.add(agent.into());
        // No waiting here: the supervisor runs this on its event loop, and a helper that died
        // must fail the start at once (the supervisor waited for each socket to be there).
        h.net = match &cfg.net {
            Some(crate::NetAttach::Socket(p)) => {
                let s = UnixStream::connect(p).map_err(sock("network helper socket", p))?;
                Some(h.add(s.into()))
            }
            Some(crate::NetAttach::VhostUser(p)) => {
                h.vhost_dir = Some(h.vhost_user_socket(q, p, "network helper socket")?);
                None
            }
            _ => None,
        };
        for share in &cfg.shares {
            let Some(p) = &share.socket else {
                return Err(VmmError::Invalid(format!(
                    "share {} has no virtiofsd socket",
                    share.tag
                )));
            };
            let dir = h.vhost_user_socket(q, p, "virtiofsd socket")?;
            h.shares.push(dir);
        }
        Ok(h)
    }
}

/// Escapes a value for QEMU's comma-separated option syntax (a comma is doubled).
fn opt(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

impl Qemu {
    /// How the guest boots, apart from its devices and files: the sandbox, the machine type, the
    /// accelerator (and CPU model), CPUs and memory. Set-up's boot check of a QEMU binary uses
    /// it too, so that the check boots the kernel as the guests do.
    pub fn machine_args(accel: Accel, cpus: u32, memory_mib: u32) -> Vec<String> {
        let mem = format!("{memory_mib}M");
        let mut a: Vec<&str> = vec![
            "-sandbox",
            SANDBOX,
            "-M",
            "microvm,x-option-roms=off,rtc=on,memory-backend=mem",
            // Modern (virtio 1.x) devices on virtio-mmio instead of QEMU's legacy default:
            // vhost-user back ends such as passt take only modern devices.
            "-global",
            "virtio-mmio.force-legacy=false",
        ];
        match accel {
            Accel::Kvm => a.extend(["-accel", "kvm", "-cpu", "host"]),
            // TCG keeps QEMU's default CPU model. QEMU 7.2 crashed 6.12 guests under TCG with
            // any model; the runtime bundle brings QEMU 10 where the host's is older.
            Accel::Tcg => a.extend(["-accel", "tcg"]),
        }
        let smp = cpus.to_string();
        let backend = format!("memory-backend-memfd,id=mem,size={mem},share=on");
        a.extend(["-smp", &smp, "-m", &mem, "-object", &backend]);
        a.extend(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
        a.into_iter().map(str::to_string).collect()
    }

    /// The kernel command line QEMU hands the guest: `base`, then what the guest's clock needs
    /// under `accel` (under TCG the host's TSC frequency as `tsc_early_khz`, see
    /// [`Qemu::tsc_khz`]; KVM guests use kvmclock).
    pub fn kernel_append(&self, accel: Accel, base: &str) -> String {
        let mut cmdline = base.to_string();
        if let (Accel::Tcg, Some(khz)) = (accel, self.tsc_khz) {
            if !cmdline.is_empty() {
                cmdline.push(' ');
            }
            cmdline.push_str(&format!("tsc_early_khz={khz}"));
        }
        cmdline
    }

    /// The argument list for a configuration, with QEMU opening every path itself.
    pub fn args(&self, cfg: &VmConfig) -> Result<Vec<String>, VmmError> {
        self.args_with(cfg, None)
    }

    /// The argument list; with `h`, files and sockets are the inherited descriptors instead of
    /// paths (`/proc/self/fd/N` for what QEMU opens with plain `open`, `/dev/fdset/N` for what
    /// it opens through its own fd sets, `fd=N` for sockets).
    fn args_with(&self, cfg: &VmConfig, h: Option<&Handles>) -> Result<Vec<String>, VmmError> {
        let fdpath = |fd: RawFd| format!("/proc/self/fd/{fd}");
        if cfg.cpus == 0 || cfg.memory_mib < 64 {
            return Err(VmmError::Invalid(format!(
                "{} CPUs and {} MiB",
                cfg.cpus, cfg.memory_mib
            )));
        }
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        push(&[
            "-name",
            &format!("gatevm-{},process=gatevm-{}", cfg.name, cfg.name),
        ]);
        match h {
            Some(h) => h
                .data_dirs
                .iter()
                .for_each(|fd| push(&["-L", &fdpath(*fd)])),
            None => self
                .data_dirs
                .iter()
                .for_each(|d| push(&["-L", &d.display().to_string()])),
        }
        let machine = Self::machine_args(cfg.accel, cfg.cpus, cfg.memory_mib);
        push(&machine.iter().map(String::as_str).collect::<Vec<_>>());
        let console = match h {
            Some(h) => {
                push(&["-add-fd", &format!("fd={},set=1", h.console)]);
                "/dev/fdset/1".to_string()
            }
            None => opt(&cfg.console_log),
        };
        push(&["-chardev", &format!("file,id=con,path={console},append=on")]);
        push(&["-serial", "chardev:con"]);
        match h {
            Some(h) => push(&["-kernel", &fdpath(h.kernel)]),
            None => push(&["-kernel", &cfg.kernel.display().to_string()]),
        }
        match (h.and_then(|h| h.initramfs), &cfg.initramfs) {
            (Some(fd), _) => push(&["-initrd", &fdpath(fd)]),
            (None, Some(initrd)) => push(&["-initrd", &initrd.display().to_string()]),
            (None, None) => {}
        }
        push(&["-append", &self.kernel_append(cfg.accel, &cfg.cmdline)]);
        // Agent channel: a virtio-serial port the guest finds by name.
        push(&["-device", "virtio-serial-device"]);
        push(&[
            "-chardev",
            &match h {
                Some(h) => format!("socket,id=ag,fd={},server=on,wait=off", h.agent),
                None => format!(
                    "socket,id=ag,path={},server=on,wait=off",
                    opt(&cfg.agent_socket)
                ),
            },
        ]);
        push(&[
            "-device",
            &format!(
                "virtserialport,chardev=ag,name={}",
                gatevm_abi::AGENT_PORT_NAME
            ),
        ]);
        // The disks, each with the serial the guest finds it by; fd sets from 2 on.
        for (i, d) in cfg.disks.iter().enumerate() {
            d.check()?;
            let set = i + 2;
            let file = match h.and_then(|h| h.disks.get(i)) {
                Some(fds) => {
                    for fd in fds {
                        push(&["-add-fd", &format!("fd={fd},set={set}")]);
                    }
                    format!("/dev/fdset/{set}")
                }
                None => opt(&d.path),
            };
            // writeback: the host's page cache, with the guest's flushes passed on as fsync of
            // the file, so what the guest fsyncs survives a host crash too.
            let mode = if d.read_only {
                "readonly=on"
            } else {
                "discard=unmap"
            };
            push(&[
                "-drive",
                &format!("if=none,id=d{i},format=raw,file={file},cache=writeback,{mode}"),
            ]);
            push(&[
                "-device",
                &format!("virtio-blk-device,drive=d{i},serial={}", d.serial),
            ]);
        }
        if let Some(net) = &cfg.net {
            let stream = |addr: String| format!("stream,id=n0,server=off,{addr}");
            let net_fd = h.and_then(|h| h.net);
            match net {
                crate::NetAttach::Socket(_) if net_fd.is_some() => push(&[
                    "-netdev",
                    &stream(format!("addr.type=fd,addr.str={}", net_fd.unwrap_or(-1))),
                ]),
                crate::NetAttach::Socket(p) => push(&[
                    "-netdev",
                    &stream(format!("addr.type=unix,addr.path={}", opt(p))),
                ]),
                crate::NetAttach::Fd(fd) => {
                    push(&["-netdev", &stream(format!("addr.type=fd,addr.str={fd}"))])
                }
                crate::NetAttach::VhostUser(p) => {
                    // The guest RAM is a shared memfd already (for vhost-user back ends).
                    let chardev = match h.and_then(|h| h.vhost_dir.as_ref()) {
                        Some((fd, file)) => {
                            format!(
                                "socket,id=net,path=/proc/self/fd/{fd}/{}",
                                file.replace(',', ",,")
                            )
                        }
                        None => format!("socket,id=net,path={}", opt(p)),
                    };
                    push(&["-chardev", &chardev]);
                    push(&["-netdev", "vhost-user,id=n0,chardev=net"]);
                }
            }
            push(&[
                "-device",
                &format!("virtio-net-device,netdev=n0,mac={}", cfg.mac),
            ]);
        }
        // The cluster NIC: a datagram socket whose datagrams are Ethernet frames.
        if let Some(c) = &cfg.cluster_nic {
            push(&[
                "-netdev",
                &format!("dgram,id=n1,local.type=fd,local.str={}", c.fd),
            ]);
            push(&[
                "-device",
                &format!("virtio-net-device,netdev=n1,mac={}", c.mac),
            ]);
        }
        // Shared directories: one virtiofsd per share, on vhost-user (the guest RAM is a shared
        // memfd already).
        for (i, share) in cfg.shares.iter().enumerate() {
            share.check()?;
            let path = match (h.and_then(|h| h.shares.get(i)), &share.socket) {
                (Some((fd, file)), _) => format!("/proc/self/fd/{fd}/{}", file.replace(',', ",,")),
                (None, Some(p)) => opt(p),
                (None, None) => {
                    return Err(VmmError::Invalid(format!(
                        "share {} has no virtiofsd socket",
                        share.tag
                    )))
                }
            };
            push(&["-chardev", &format!("socket,id=fs{i},path={path}")]);
            push(&[
                "-device",
                &format!(
                    "vhost-user-fs-device,chardev=fs{i},tag={},queue-size=1024",
                    share.tag
                ),
            ]);
        }
        Ok(a)
    }
}

impl Vmm for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn boots_initramfs(&self) -> bool {
        true
    }

    fn command(&self, cfg: &VmConfig) -> Result<Command, VmmError> {
        for (what, p) in [("guest kernel", &cfg.kernel)] {
            if !p.exists() {
                return Err(VmmError::Missing {
                    what,
                    path: p.clone(),
                });
            }
        }
        let run_as = self
            .run_as
            .and_then(|r| kvm_group(cfg.accel).map(|g| (r, g)));
        let Some((run_as, kvm_gid)) = run_as else {
            let mut c = Command::new(&self.binary);
            c.args(self.args(cfg)?);
            return Ok(c);
        };
        self.unprivileged_command(cfg, run_as, kvm_gid)
    }
}

/// Under KVM, the group an unprivileged QEMU needs for `/dev/kvm` (`Some(None)`: none, the
/// device is open to everybody; `None`: only root can open it, so QEMU keeps root). Under TCG,
/// `Some(None)`.
fn kvm_group(accel: Accel) -> Option<Option<u32>> {
    use std::os::unix::fs::MetadataExt;
    if accel == Accel::Tcg {
        return Some(None);
    }
    let m = std::fs::metadata("/dev/kvm").ok()?;
    if m.mode() & 0o006 == 0o006 {
        Some(None)
    } else if m.mode() & 0o060 == 0o060 {
        Some(Some(m.gid()))
    } else {
        tracing::warn!("/dev/kvm is open to root only: QEMU keeps running as root (sandboxed)");
        None
    }
}

impl Qemu {
    /// QEMU as an unprivileged user, for gatevm running as root.
    ///
    /// QEMU's own `-run-with user=` would drop privileges after opening its files, but QEMU
    /// installs its seccomp filter first, and `elevateprivileges=deny` then kills it at its
    /// `setuid` (others ship `elevateprivileges=allow` for that reason). So, as libvirt does,
    /// the privileges are dropped before exec, in the child: no supplementary groups (or just
    /// `/dev/kvm`'s group under KVM), then the gid and uid of [`RunAs`]; and QEMU gets
    /// everything it would open under root's private directories already open: the firmware
    /// directories, kernel and initramfs as `/proc/self/fd/N` (their files are world-readable;
    /// their directories need not be), the console log and the disks through QEMU fd sets,
    /// the agent socket bound and listening, and a connected socket to the network helper. The binary itself is executed through a descriptor too.
    fn unprivileged_command(
        &self,
        cfg: &VmConfig,
        run_as: RunAs,
        kvm_gid: Option<u32>,
    ) -> Result<Command, VmmError> {
        use std::os::unix::process::CommandExt;
        let binary = open_fd(&self.binary, libc::O_PATH, "QEMU binary")?;
        let h = Handles::open(self, cfg)?;
        let args = self.args_with(cfg, Some(&h))?;
        let mut c = Command::new(format!("/proc/self/fd/{}", binary.as_raw_fd()));
        c.arg0(&self.binary).args(args);
        let keep = h.keep;
        // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
        // functions (fcntl, setgroups, setgid, setuid); it owns the descriptors it names.
        unsafe {
            c.pre_exec(move || {
                let _ = &binary;
                for fd in &keep {
                    if libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                let groups: &[libc::gid_t] = match &kvm_gid {
                    Some(g) => std::slice::from_ref(g),
                    None => &[],
                };
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(run_as.gid) != 0
                    || libc::setuid(run_as.uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> VmConfig {
        VmConfig {
            name: "t".into(),
            cpus: 2,
            memory_mib: 512,
            accel: Accel::Tcg,
            kernel: "/k".into(),
            initramfs: Some("/i".into()),
            cmdline: "console=ttyS0".into(),
            disks: vec![
                crate::Disk::ro("gatevm-base", "/b,x"),
                crate::Disk::rw("gatevm-state", "/d"),
            ],
            boot_dir: "/unused".into(),
            shares: vec![],
            cluster_nic: None,
            agent_socket: "/a".into(),
            net: Some(crate::NetAttach::Socket("/n".into())),
            mac: "5a:94:ef:e4:0c:ee".into(),
            console_log: "/c".into(),
        }
    }

    #[test]
    fn args_cover_the_appliance() {
        let q = Qemu {
            tsc_khz: Some(2_600_000),
            data_dirs: vec!["/fw1".into(), "/fw2".into()],
            ..Qemu::default()
        };
        let a = q.args(&cfg()).unwrap().join(" ");
        assert!(a.contains("console=ttyS0 tsc_early_khz=2600000"), "{a}");
        assert!(a.contains("-L /fw1 -L /fw2"), "{a}");
        for want in [
            "-accel tcg",
            "-smp 2 -m 512M",
            "memory-backend-memfd,id=mem,size=512M,share=on",
            "-global virtio-mmio.force-legacy=false",
            "virtserialport,chardev=ag,name=gatevm.agent",
            "-drive if=none,id=d0,format=raw,file=/b,,x,cache=writeback,readonly=on -device virtio-blk-device,drive=d0,serial=gatevm-base",
            "-drive if=none,id=d1,format=raw,file=/d,cache=writeback,discard=unmap -device virtio-blk-device,drive=d1,serial=gatevm-state",
            "virtio-net-device,netdev=n0,mac=5a:94:ef:e4:0c:ee",
            "-no-reboot",
        ] {
            assert!(a.contains(want), "missing {want} in {a}");
        }
        assert!(!a.contains("vhost-user-fs"), "no virtio-fs root: {a}");
        // A serial that would need quoting (or is longer than virtio-blk's ID) is refused.
        for bad in ["gatevm,x", "", "a-very-long-disk-serial-x", "Upper"] {
            let mut c = cfg();
            c.disks[0].serial = bad.into();
            let e = q.args(&c).unwrap_err().to_string();
            assert!(e.contains("disk serial"), "{bad}: {e}");
        }
        let mut k = cfg();
        k.accel = Accel::Kvm;
        k.net = Some(crate::NetAttach::Fd(7));
        let a = Qemu::default().args(&k).unwrap().join(" ");
        assert!(
            a.contains("-netdev stream,id=n0,server=off,addr.type=fd,addr.str=7"),
            "{a}"
        );
        k.net = Some(crate::NetAttach::VhostUser("/run/n,x".into()));
        let a = Qemu::default().args(&k).unwrap().join(" ");
        assert!(
            a.contains("-chardev socket,id=net,path=/run/n,,x -netdev vhost-user,id=n0,chardev=net -device virtio-net-device,netdev=n0"),
            "{a}"
        );
        k.cluster_nic = Some(crate::ClusterNic {
            fd: 9,
            mac: "5a:94:ef:c8:c8:0a".into(),
        });
        let a = Qemu::default().args(&k).unwrap().join(" ");
        assert!(
            a.contains("-netdev dgram,id=n1,local.type=fd,local.str=9 -device virtio-net-device,netdev=n1,mac=5a:94:ef:c8:c8:0a"),
            "{a}"
        );
        k.cluster_nic = None;
        k.net = None;
        k.disks.clear();
        let a = Qemu {
            tsc_khz: Some(2_600_000),
            ..Qemu::default()
        }
        .args(&k)
        .unwrap()
        .join(" ");
        assert!(a.contains("-accel kvm -cpu host"));
        assert!(!a.contains("tsc_early_khz"), "KVM guests use kvmclock");
        assert!(!a.contains("netdev") && !a.contains("virtio-blk"));
    }

    #[test]
    fn shares_are_vhost_user_fs_devices_on_their_virtiofsd_sockets() {
        let mut c = cfg();
        c.shares = vec![
            crate::Share {
                tag: "gatevm-vol0".into(),
                host_dir: "/home/u/src".into(),
                read_only: false,
                socket: Some("/run/gatevm/t/fs/vol0.sock".into()),
            },
            crate::Share {
                tag: "gatevm-vol1".into(),
                host_dir: "/home/u/ro".into(),
                read_only: true,
                socket: Some("/run/g,x/vol1.sock".into()),
            },
        ];
        let a = Qemu::default().args(&c).unwrap().join(" ");
        assert!(
            a.contains("-chardev socket,id=fs0,path=/run/gatevm/t/fs/vol0.sock -device vhost-user-fs-device,chardev=fs0,tag=gatevm-vol0,queue-size=1024"),
            "{a}"
        );
        assert!(
            a.contains("-chardev socket,id=fs1,path=/run/g,,x/vol1.sock -device vhost-user-fs-device,chardev=fs1,tag=gatevm-vol1"),
            "{a}"
        );
        // QEMU never sees the host directory itself: virtiofsd serves it.
        assert!(!a.contains("/home/u"), "{a}");
        let mut bad = c.clone();
        bad.shares[0].tag = "tag,with=comma".into();
        assert!(Qemu::default()
            .args(&bad)
            .unwrap_err()
            .to_string()
            .contains("share tag"));
        bad = c.clone();
        bad.shares[0].socket = None;
        assert!(Qemu::default()
            .args(&bad)
            .unwrap_err()
            .to_string()
            .contains("no virtiofsd socket"));
    }

    #[test]
    fn kernel_append_adds_the_tsc_frequency_under_tcg_only() {
        let q = Qemu {
            tsc_khz: Some(2_600_000),
            ..Qemu::default()
        };
        assert_eq!(
            q.kernel_append(Accel::Tcg, "console=ttyS0"),
            "console=ttyS0 tsc_early_khz=2600000"
        );
        assert_eq!(q.kernel_append(Accel::Tcg, ""), "tsc_early_khz=2600000");
        assert_eq!(
            q.kernel_append(Accel::Kvm, "console=ttyS0"),
            "console=ttyS0"
        );
        assert_eq!(
            Qemu::default().kernel_append(Accel::Tcg, "console=ttyS0"),
            "console=ttyS0"
        );
    }

    #[test]
    fn sandboxed_always() {
        let a = Qemu::default().args(&cfg()).unwrap().join(" ");
        assert!(
            a.contains(
                "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
            ),
            "{a}"
        );
    }

    /// As root, QEMU gets descriptors instead of paths and drops to the unprivileged user.
    #[test]
    fn unprivileged_qemu_gets_descriptors() {
        use std::os::unix::net::UnixListener;
        let d = tempfile::tempdir().unwrap();
        let p = |n: &str| d.path().join(n);
        for f in ["vmlinux", "initrd", "state.img", "base.erofs"] {
            std::fs::write(p(f), b"x").unwrap();
        }
        let _net = UnixListener::bind(p("net.sock")).unwrap();
        let c = VmConfig {
            kernel: p("vmlinux"),
            initramfs: Some(p("initrd")),
            disks: vec![
                crate::Disk::ro("gatevm-base", p("base.erofs")),
                crate::Disk::rw("gatevm-state", p("state.img")),
            ],
            agent_socket: p("agent.sock"),
            console_log: p("console.log"),
            net: Some(crate::NetAttach::Socket(p("net.sock"))),
            ..cfg()
        };
        let q = Qemu {
            binary: "/bin/true".into(),
            data_dirs: vec![d.path().to_path_buf()],
            run_as: Some(RunAs::nobody()),
            ..Qemu::default()
        };
        let cmd = q.command(&c).unwrap();
        assert!(cmd
            .get_program()
            .to_string_lossy()
            .starts_with("/proc/self/fd/"));
        let a: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let a = a.join(" ");
        for want in [
            "-L /proc/self/fd/",
            "-kernel /proc/self/fd/",
            "-initrd /proc/self/fd/",
            "path=/dev/fdset/1,append=on",
            "file=/dev/fdset/2,cache=writeback,readonly=on",
            "file=/dev/fdset/3,cache=writeback,discard=unmap",
            "socket,id=ag,fd=",
            "stream,id=n0,server=off,addr.type=fd,addr.str=",
            "-sandbox on,",
        ] {
            assert!(a.contains(want), "missing {want} in {a}");
        }
        assert!(
            !a.contains(&d.path().display().to_string()),
            "a path left: {a}"
        );
        // The agent socket is bound and listening already; the console log exists.
        assert!(std::os::unix::net::UnixStream::connect(p("agent.sock")).is_ok());
        assert!(p("console.log").exists());
        // The read-only disk's set holds one descriptor, the read-write one's two.
        assert_eq!(a.matches(",set=2").count(), 1, "{a}");
        assert_eq!(a.matches(",set=3").count(), 2, "{a}");
        // A socket or a disk that is not there is named.
        let bad = VmConfig {
            net: Some(crate::NetAttach::Socket(p("missing.sock"))),
            ..c.clone()
        };
        let e = q.command(&bad).unwrap_err();
        assert!(e.to_string().contains("missing.sock"), "{e}");
        let bad = VmConfig {
            disks: vec![crate::Disk::ro("gatevm-base", p("missing.erofs"))],
            ..c
        };
        let e = q.command(&bad).unwrap_err();
        assert!(e.to_string().contains("missing.erofs"), "{e}");
    }

    #[test]
    fn nobody_is_found() {
        let n = RunAs::nobody();
        assert_ne!(n.uid, 0);
        assert_ne!(n.gid, 0);
    }

    #[test]
    fn bad_sizes_refused() {
        let mut c = cfg();
        c.cpus = 0;
        assert!(Qemu::default().args(&c).is_err());
    }

    #[test]
    fn missing_kernel_named() {
        let err = Qemu::default().command(&cfg()).unwrap_err().to_string();
        assert!(err.contains("guest kernel") && err.contains("/k"), "{err}");
    }
}
