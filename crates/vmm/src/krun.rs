//! The libkrun backend: the fast path on hosts with hardware virtualization.
//!
//! A libkrun VM is configured by a sequence of C calls on a context and started with
//! `krun_start_enter`, which never returns on success: the process becomes the VM and exits when
//! the guest does. So every VM runs in a child process of its own (`gatevm __krun-vm`, built by
//! [`Krun::command`]), which the supervisor owns, reaps and reports exactly like a QEMU process.
//!
//! This module turns an instance configuration into that call sequence as plain data
//! ([`KrunCall`]), so the sequence is unit-tested without a hypervisor, and replays it through the
//! [`KrunApi`] trait: [`sys::LibKrun`] calls the linked `libkrun` crate; tests use a recording
//! fake.
//!
//! The appliance is the same as under QEMU: the same disks (the read-only base image, the root's
//! writable layer, the k3s staging image, the state disk) as virtio-blk with the same serials,
//! and `gatevm-guest` as the workload (started by libkrun's own init as PID 1,
//! `KRUN_INIT_PID1=1`) from a boot directory served by libkrun's built-in virtio-fs that holds
//! nothing else; it builds the root from the disks as it does from gatevm's initramfs, the agent on vsock port 1024 mapped to a host unix socket, and
//! gvproxy attached as a unix stream network device with the same static address and MAC.
//! Transparent socket impersonation (TSI) stays off: it would give the guest the host's network
//! stack, loopback included.
//!
//! Constants below are libkrun 1.19's (`libkrun.h`).

use crate::{HostCaps, VmConfig, Vmm, VmmError};
use gatevm_abi::cmdline;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `krun_add_disk3` disk format: raw.
pub const KRUN_DISK_FORMAT_RAW: u32 = 0;
/// `krun_add_disk3` sync mode: guest flushes become host fsyncs (durability after fsync).
pub const KRUN_SYNC_FULL: u32 = 2;
/// `krun_set_kernel` format: ELF.
pub const KRUN_KERNEL_FORMAT_ELF: u32 = 1;
/// `krun_add_net_unixstream` features libkrun calls compatible (checksum and TSO/UFO offloads).
pub const NET_COMPAT_FEATURES: u32 =
    (1 << 0) | (1 << 1) | (1 << 7) | (1 << 10) | (1 << 11) | (1 << 14);

/// Which kernel the VM boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KrunKernel {
    /// The kernel inside libkrunfw (`libkrunfw.so.5`), with libkrun's own command line.
    Libkrunfw,
    /// An external kernel through `krun_set_kernel`.
    External {
        path: PathBuf,
        initramfs: Option<PathBuf>,
        cmdline: String,
    },
}

/// Everything the libkrun backend needs for one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KrunConfig {
    pub cpus: u8,
    pub memory_mib: u32,
    pub kernel: KrunKernel,
    /// The boot directory (only the guest agent), served by libkrun's built-in virtio-fs.
    pub root_dir: PathBuf,
    /// The disks, each with its serial as libkrun's block id (the guest reads it as the serial).
    pub disks: Vec<crate::Disk>,
    /// Host unix socket libkrun listens on and connects to the guest agent's vsock port.
    pub agent_socket: PathBuf,
    /// The network helper: gvproxy's `-listen-qemu` socket or passt's inherited descriptor.
    pub net: Option<crate::NetAttach>,
    pub mac: [u8; 6],
    pub console_log: PathBuf,
    /// The workload: gatevm-guest in the instance root, and its arguments.
    pub exec: String,
    pub args: Vec<String>,
    /// The workload's whole environment (never the host's).
    pub env: Vec<(String, String)>,
    /// Shared host directories, served by libkrun's built-in virtio-fs.
    #[serde(default)]
    pub shares: Vec<crate::Share>,
}

/// One libkrun call, with its arguments (the context id is implied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KrunCall {
    SetVmConfig {
        vcpus: u8,
        ram_mib: u32,
    },
    SetKernel {
        path: PathBuf,
        format: u32,
        initramfs: Option<PathBuf>,
        cmdline: String,
    },
    SetRoot {
        path: PathBuf,
    },
    AddDisk3 {
        block_id: String,
        path: PathBuf,
        format: u32,
        read_only: bool,
        direct_io: bool,
        sync_mode: u32,
    },
    /// A shared directory on libkrun's virtio-fs (`krun_add_virtiofs3`, no DAX window).
    AddVirtiofs3 {
        tag: String,
        path: PathBuf,
        shm_size: u64,
        read_only: bool,
    },
    AddNetUnixstream {
        net: crate::NetAttach,
        mac: [u8; 6],
        features: u32,
        flags: u32,
    },
    /// Drops libkrun's implicit vsock device (which would enable TSI when there is no network).
    DisableImplicitVsock,
    /// An explicit vsock device with these TSI features (gatevm uses none).
    AddVsock {
        tsi_features: u32,
    },
    AddVsockPort2 {
        port: u32,
        path: PathBuf,
        listen: bool,
    },
    SetConsoleOutput {
        path: PathBuf,
    },
    SetWorkdir {
        path: String,
    },
    SetExec {
        path: String,
        argv: Vec<String>,
        envp: Vec<String>,
    },
}

impl KrunCall {
    /// The C function's name, for error messages.
    pub fn function(&self) -> &'static str {
        match self {
            KrunCall::SetVmConfig { .. } => "krun_set_vm_config",
            KrunCall::SetKernel { .. } => "krun_set_kernel",
            KrunCall::SetRoot { .. } => "krun_set_root",
            KrunCall::AddDisk3 { .. } => "krun_add_disk3",
            KrunCall::AddVirtiofs3 { .. } => "krun_add_virtiofs3",
            KrunCall::AddNetUnixstream { .. } => "krun_add_net_unixstream",
            KrunCall::DisableImplicitVsock => "krun_disable_implicit_vsock",
            KrunCall::AddVsock { .. } => "krun_add_vsock",
            KrunCall::AddVsockPort2 { .. } => "krun_add_vsock_port2",
            KrunCall::SetConsoleOutput { .. } => "krun_set_console_output",
            KrunCall::SetWorkdir { .. } => "krun_set_workdir",
            KrunCall::SetExec { .. } => "krun_set_exec",
        }
    }
}

/// The configuration calls for an instance, in the order they are made (after
/// `krun_create_ctx`, before `krun_start_enter`).
pub fn plan(c: &KrunConfig) -> Vec<KrunCall> {
    let mut calls = vec![KrunCall::SetVmConfig {
        vcpus: c.cpus,
        ram_mib: c.memory_mib,
    }];
    if let KrunKernel::External {
        path,
        initramfs,
        cmdline,
    } = &c.kernel
    {
        calls.push(KrunCall::SetKernel {
            path: path.clone(),
            format: KRUN_KERNEL_FORMAT_ELF,
            initramfs: initramfs.clone(),
            cmdline: cmdline.clone(),
        });
    }
    calls.push(KrunCall::SetRoot {
        path: c.root_dir.clone(),
    });
    for disk in &c.disks {
        calls.push(KrunCall::AddDisk3 {
            block_id: disk.serial.clone(),
            path: disk.path.clone(),
            format: KRUN_DISK_FORMAT_RAW,
            read_only: disk.read_only,
            direct_io: false,
            sync_mode: KRUN_SYNC_FULL,
        });
    }
    for share in &c.shares {
        calls.push(KrunCall::AddVirtiofs3 {
            tag: share.tag.clone(),
            path: share.host_dir.clone(),
            shm_size: 0,
            read_only: share.read_only,
        });
    }
    if let Some(net) = &c.net {
        calls.push(KrunCall::AddNetUnixstream {
            net: net.clone(),
            mac: c.mac,
            features: NET_COMPAT_FEATURES,
            flags: 0,
        });
    }
    calls.push(KrunCall::DisableImplicitVsock);
    calls.push(KrunCall::AddVsock { tsi_features: 0 });
    calls.push(KrunCall::AddVsockPort2 {
        port: gatevm_abi::AGENT_VSOCK_PORT,
        path: c.agent_socket.clone(),
        listen: true,
    });
    calls.push(KrunCall::SetConsoleOutput {
        path: c.console_log.clone(),
    });
    calls.push(KrunCall::SetWorkdir { path: "/".into() });
    calls.push(KrunCall::SetExec {
        path: c.exec.clone(),
        argv: c.args.clone(),
        envp: c.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
    });
    calls
}

/// A failed libkrun call: the function and the errno it returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{function} failed: {}", std::io::Error::from_raw_os_error(*errno))]
pub struct KrunError {
    pub function: &'static str,
    pub errno: i32,
}

/// The libkrun API as gatevm uses it. Return values follow libkrun: a context id or 0 on
/// success, a negative errno on failure.
pub trait KrunApi {
    fn create_ctx(&mut self) -> i32;
    fn call(&mut self, ctx: u32, call: &KrunCall) -> i32;
    fn free_ctx(&mut self, ctx: u32) -> i32;
    /// Boots the VM; returns only on failure (a negative errno).
    fn start_enter(&mut self, ctx: u32) -> i32;
}

/// A configured context; freed on drop unless started.
pub struct Context<'a, A: KrunApi> {
    api: &'a mut A,
    id: u32,
}

impl<A: KrunApi> Context<'_, A> {
    /// The context id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Boots the VM with `krun_start_enter`. On success the call never returns (the process
    /// exits with the guest), so what comes back is always the failure.
    pub fn start(self) -> KrunError {
        let rc = self.api.start_enter(self.id);
        KrunError {
            function: "krun_start_enter",
            errno: if rc < 0 { -rc } else { libc::EIO },
        }
    }
}

impl<A: KrunApi> Drop for Context<'_, A> {
    fn drop(&mut self) {
        self.api.free_ctx(self.id);
    }
}

/// Creates a context and makes every call of the plan; the first failure frees the context and
/// names the call.
pub fn configure<'a, A: KrunApi>(
    api: &'a mut A,
    calls: &[KrunCall],
) -> Result<Context<'a, A>, KrunError> {
    let id = api.create_ctx();
    if id < 0 {
        return Err(KrunError {
            function: "krun_create_ctx",
            errno: -id,
        });
    }
    let ctx = Context { api, id: id as u32 };
    for call in calls {
        let rc = ctx.api.call(ctx.id, call);
        if rc < 0 {
            return Err(KrunError {
                function: call.function(),
                errno: -rc,
            });
        }
    }
    Ok(ctx)
}

/// The libkrun release linked in (the `libkrun` crate's version, pinned in Cargo.toml).
pub const LIBKRUN_VERSION: &str = "1.19.7";

/// The variable the dynamic loader searches for libkrunfw (macOS, with Hypervisor.framework,
/// would use `DYLD_LIBRARY_PATH` and `libkrunfw.5.dylib`; only Linux is built today).
#[cfg(target_os = "linux")]
pub const LIBRARY_PATH_VAR: &str = "LD_LIBRARY_PATH";
#[cfg(target_os = "macos")]
pub const LIBRARY_PATH_VAR: &str = "DYLD_LIBRARY_PATH";

/// The workload's `PATH` in the guest.
pub const GUEST_ENV_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why the krun backend cannot run on this host, as one line naming the reason and the
/// alternative; None when it can. Cheap (a few file reads), so `--vmm krun` fails in
/// milliseconds instead of a guest dying later.
pub fn unavailable(caps: &HostCaps, libkrunfw: &Path, kernel: &KrunKernel) -> Option<String> {
    if let Some(why) = caps.why_no_hardware_virt() {
        return Some(format!(
            "the krun backend needs hardware virtualization, and {why}: use --vmm qemu (or auto)"
        ));
    }
    match kernel {
        KrunKernel::Libkrunfw if !libkrunfw.exists() => Some(format!(
            "the krun backend needs {}, which is missing: run `gatevm setup`, or use --vmm qemu",
            libkrunfw.display()
        )),
        KrunKernel::External { path, .. } if !path.is_file() => Some(format!(
            "the kernel for the krun backend, {}, is not a file",
            path.display()
        )),
        _ => None,
    }
}

/// Parses a MAC address written as six colon-separated hex bytes.
pub fn parse_mac(s: &str) -> Result<[u8; 6], VmmError> {
    let bad = || VmmError::Invalid(format!("MAC address {s:?} is not six hex bytes"));
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

/// The libkrun configuration for a VM configuration: the guest gets the `gatevm.*` settings of
/// the kernel command line as arguments (libkrun writes its own command line), the agent on vsock,
/// and an environment of its own.
pub fn translate(
    vm: &VmConfig,
    kernel: &KrunKernel,
    guest_exec: &str,
) -> Result<KrunConfig, VmmError> {
    let cpus = u8::try_from(vm.cpus)
        .ok()
        .filter(|c| *c > 0)
        .ok_or_else(|| {
            VmmError::Invalid(format!("libkrun takes 1 to 255 vCPUs, not {}", vm.cpus))
        })?;
    if vm.memory_mib < 64 {
        return Err(VmmError::Invalid(format!(
            "{} MiB of memory",
            vm.memory_mib
        )));
    }
    let mut args: Vec<String> = vm
        .cmdline
        .split_whitespace()
        .filter(|w| {
            w.starts_with(cmdline::KEY_PREFIX)
                && !w.starts_with(&format!("{}=", cmdline::KEY_AGENT))
        })
        .map(str::to_string)
        .collect();
    args.push(format!("{}=vsock", cmdline::KEY_AGENT));
    args.push(format!("{}=krun", cmdline::KEY_VMM));
    if let Some(crate::NetAttach::VhostUser(_)) = &vm.net {
        return Err(VmmError::Invalid(
            "libkrun has no vhost-user network device (passt is attached with --fd)".into(),
        ));
    }
    for share in &vm.shares {
        share.check()?;
    }
    if vm.cluster_nic.is_some() {
        return Err(VmmError::Invalid(
            "libkrun gets no cluster network device in gatevm yet (k3s clusters of several VMs \
             run on QEMU)"
                .into(),
        ));
    }
    Ok(KrunConfig {
        shares: vm.shares.clone(),
        cpus,
        memory_mib: vm.memory_mib,
        kernel: kernel.clone(),
        root_dir: vm.boot_dir.clone(),
        disks: vm.disks.clone(),
        agent_socket: vm.agent_socket.clone(),
        net: vm.net.clone(),
        mac: parse_mac(&vm.mac)?,
        console_log: vm.console_log.clone(),
        exec: guest_exec.to_string(),
        args,
        env: vec![
            ("KRUN_INIT_PID1".into(), "1".into()),
            ("HOSTNAME".into(), vm.name.clone()),
            ("PATH".into(), GUEST_ENV_PATH.into()),
            ("HOME".into(), "/root".into()),
            ("TERM".into(), "linux".into()),
        ],
    })
}

/// The krun backend: runs each VM as `PROGRAM __krun-vm --config-json JSON`, a child process that
/// configures libkrun and enters the VM ([`run_vm`]).
#[derive(Debug, Clone)]
pub struct Krun {
    /// The gatevm executable (it links libkrun).
    pub program: PathBuf,
    /// `libkrunfw.so.5`; its directory goes on the child's library path.
    pub libkrunfw: PathBuf,
    pub kernel: KrunKernel,
    /// Path of gatevm-guest inside the guest root.
    pub guest_exec: String,
}

impl Krun {
    /// The child's argument list after the program.
    pub fn args(&self, cfg: &VmConfig) -> Result<Vec<String>, VmmError> {
        let kc = translate(cfg, &self.kernel, &self.guest_exec)?;
        let json = serde_json::to_string(&kc).map_err(|e| VmmError::Invalid(e.to_string()))?;
        Ok(vec!["__krun-vm".into(), "--config-json".into(), json])
    }
}

impl Vmm for Krun {
    fn name(&self) -> &'static str {
        "krun"
    }

    fn boots_initramfs(&self) -> bool {
        false
    }

    fn command(&self, cfg: &VmConfig) -> Result<std::process::Command, VmmError> {
        if matches!(self.kernel, KrunKernel::Libkrunfw) && !self.libkrunfw.exists() {
            return Err(VmmError::Missing {
                what: "libkrunfw",
                path: self.libkrunfw.clone(),
            });
        }
        let mut cmd = std::process::Command::new(&self.program);
        cmd.args(self.args(cfg)?);
        // The VM process gets a small, explicit environment: libkrun finds libkrunfw by name.
        cmd.env_clear();
        if let Some(dir) = self.libkrunfw.parent() {
            cmd.env(LIBRARY_PATH_VAR, dir);
        }
        // libkrun names the process `VM:$HOSTNAME`.
        cmd.env("HOSTNAME", &cfg.name);
        if let Ok(v) = std::env::var("RUST_LOG") {
            cmd.env("RUST_LOG", v);
        }
        Ok(cmd)
    }
}

/// Why the VM process did not become the VM.
#[derive(Debug, thiserror::Error)]
pub enum RunVmError {
    #[error(transparent)]
    Krun(#[from] KrunError),
    #[error(transparent)]
    Confine(#[from] crate::confine::ConfineError),
}

/// Runs in the VM child process: configures libkrun, confines the process
/// ([`crate::confine::for_krun`]: its own mount namespace holding only what the VM needs,
/// capabilities dropped, no_new_privs) and enters the VM. Returns only on failure.
pub fn run_vm(cfg: &KrunConfig) -> RunVmError {
    // Warnings and errors from libkrun go to stderr, i.e. the instance's vmm log.
    let _ = ::krun::krun_set_log_level(2);
    let mut api = sys::LibKrun;
    let confine = crate::confine::for_krun(cfg);
    let result = match configure(&mut api, &plan(cfg)) {
        // libkrunfw is loaded by now; the files libkrun opens when it starts must be inside.
        Ok(ctx) => match confine.apply() {
            Ok(()) => ctx.start().into(),
            Err(e) => e.into(),
        },
        Err(e) => e.into(),
    };
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records calls; fails the named function with EINVAL.
    #[derive(Default)]
    struct Recorder {
        log: Vec<String>,
        fail: Option<&'static str>,
    }

    impl KrunApi for Recorder {
        fn create_ctx(&mut self) -> i32 {
            self.log.push("krun_create_ctx".into());
            if self.fail == Some("krun_create_ctx") {
                -libc::ENOMEM
            } else {
                7
            }
        }
        fn call(&mut self, ctx: u32, call: &KrunCall) -> i32 {
            assert_eq!(ctx, 7);
            self.log.push(call.function().into());
            if self.fail == Some(call.function()) {
                -libc::EINVAL
            } else {
                0
            }
        }
        fn free_ctx(&mut self, ctx: u32) -> i32 {
            self.log.push(format!("krun_free_ctx({ctx})"));
            0
        }
        fn start_enter(&mut self, ctx: u32) -> i32 {
            self.log.push(format!("krun_start_enter({ctx})"));
            -libc::ENOENT
        }
    }

    fn cfg() -> KrunConfig {
        KrunConfig {
            cpus: 2,
            memory_mib: 2048,
            kernel: KrunKernel::Libkrunfw,
            root_dir: "/i/boot".into(),
            disks: vec![
                crate::Disk::ro("gatevm-base", "/rt/base.erofs"),
                crate::Disk::rw("gatevm-upper", "/i/rootfs-rw.img"),
                crate::Disk::rw("gatevm-state", "/i/state.img"),
            ],
            agent_socket: "/run/gatevm/i/agent.sock".into(),
            net: Some(crate::NetAttach::Socket("/run/gatevm/i/net.sock".into())),
            mac: [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee],
            console_log: "/i/logs/console.log".into(),
            exec: "/usr/local/sbin/gatevm-guest".into(),
            args: vec![],
            env: vec![("PATH".into(), "/usr/sbin:/usr/bin".into())],
            shares: vec![],
        }
    }

    #[test]
    fn shares_are_served_by_libkrun_and_bound_into_the_confinement() {
        let mut c = cfg();
        c.shares = vec![
            crate::Share {
                tag: "gatevm-vol0".into(),
                host_dir: "/home/u/src".into(),
                read_only: false,
                socket: None,
            },
            crate::Share {
                tag: "gatevm-vol1".into(),
                host_dir: "/home/u/ro".into(),
                read_only: true,
                socket: None,
            },
        ];
        let calls = plan(&c);
        let fs: Vec<&KrunCall> = calls
            .iter()
            .filter(|k| matches!(k, KrunCall::AddVirtiofs3 { .. }))
            .collect();
        assert_eq!(
            fs,
            vec![
                &KrunCall::AddVirtiofs3 {
                    tag: "gatevm-vol0".into(),
                    path: "/home/u/src".into(),
                    shm_size: 0,
                    read_only: false
                },
                &KrunCall::AddVirtiofs3 {
                    tag: "gatevm-vol1".into(),
                    path: "/home/u/ro".into(),
                    shm_size: 0,
                    read_only: true
                },
            ]
        );
        assert_eq!(fs[0].function(), "krun_add_virtiofs3");
        // libkrun's file server runs in the confined VM process: each share is bound there,
        // read-only when the share is.
        let conf = crate::confine::for_krun(&c);
        let b: Vec<(&str, bool)> = conf
            .binds
            .iter()
            .filter(|b| b.path.starts_with("/home/u"))
            .map(|b| (b.path.to_str().unwrap(), b.read_only))
            .collect();
        assert_eq!(b, vec![("/home/u/src", false), ("/home/u/ro", true)]);
        // A tag the guest could not take is refused before libkrun is called.
        let mut vm = vm();
        vm.shares = vec![crate::Share {
            tag: "Bad Tag".into(),
            host_dir: "/x".into(),
            read_only: false,
            socket: None,
        }];
        let e = translate(&vm, &KrunKernel::Libkrunfw, "/g").unwrap_err();
        assert!(e.to_string().contains("share tag"), "{e}");
    }

    #[test]
    fn plan_for_the_appliance() {
        let p = plan(&cfg());
        let names: Vec<&str> = p.iter().map(KrunCall::function).collect();
        assert_eq!(
            names,
            [
                "krun_set_vm_config",
                "krun_set_root",
                "krun_add_disk3",
                "krun_add_disk3",
                "krun_add_disk3",
                "krun_add_net_unixstream",
                "krun_disable_implicit_vsock",
                "krun_add_vsock",
                "krun_add_vsock_port2",
                "krun_set_console_output",
                "krun_set_workdir",
                "krun_set_exec"
            ]
        );
        // Each disk with its serial as the block id, the base read-only.
        assert!(p.contains(&KrunCall::AddDisk3 {
            block_id: "gatevm-base".into(),
            path: "/rt/base.erofs".into(),
            format: KRUN_DISK_FORMAT_RAW,
            read_only: true,
            direct_io: false,
            sync_mode: KRUN_SYNC_FULL,
        }));
        assert!(p.contains(&KrunCall::AddDisk3 {
            block_id: "gatevm-upper".into(),
            path: "/i/rootfs-rw.img".into(),
            format: KRUN_DISK_FORMAT_RAW,
            read_only: false,
            direct_io: false,
            sync_mode: KRUN_SYNC_FULL,
        }));
        assert!(p.contains(&KrunCall::AddVsockPort2 {
            port: gatevm_abi::AGENT_VSOCK_PORT,
            path: "/run/gatevm/i/agent.sock".into(),
            listen: true
        }));
        assert!(p.contains(&KrunCall::SetExec {
            path: "/usr/local/sbin/gatevm-guest".into(),
            argv: vec![],
            envp: vec!["PATH=/usr/sbin:/usr/bin".into()]
        }));
    }

    fn vm() -> VmConfig {
        VmConfig {
            name: "gw".into(),
            cpus: 2,
            memory_mib: 1024,
            accel: crate::Accel::Kvm,
            kernel: "/rt/vmlinux".into(),
            initramfs: Some("/rt/initramfs".into()),
            cmdline:
                "console=ttyS0 quiet gatevm.hostname=gw gatevm.agent=serial gatevm.payload=none"
                    .into(),
            disks: vec![
                crate::Disk::ro("gatevm-base", "/rt/base.erofs"),
                crate::Disk::rw("gatevm-state", "/i/state.img"),
            ],
            boot_dir: "/i/boot".into(),
            shares: vec![],
            cluster_nic: None,
            agent_socket: "/run/gatevm/gw/agent.sock".into(),
            net: Some(crate::NetAttach::Socket("/run/gatevm/gw/net.sock".into())),
            mac: "5a:94:ef:e4:0c:ee".into(),
            console_log: "/i/logs/console.log".into(),
        }
    }

    #[test]
    fn translation_of_a_vm_configuration() {
        let k = translate(
            &vm(),
            &KrunKernel::Libkrunfw,
            "/usr/local/sbin/gatevm-guest",
        )
        .unwrap();
        assert_eq!(k.cpus, 2);
        assert_eq!(k.memory_mib, 1024);
        assert_eq!(k.root_dir, PathBuf::from("/i/boot"));
        assert_eq!(k.disks, vm().disks);
        assert_eq!(k.mac, [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee]);
        // Only gatevm.* words reach the guest, and the agent is always on vsock.
        assert_eq!(
            k.args,
            [
                "gatevm.hostname=gw",
                "gatevm.payload=none",
                "gatevm.agent=vsock",
                "gatevm.vmm=krun"
            ]
        );
        assert!(k.env.contains(&("KRUN_INIT_PID1".into(), "1".into())));
        assert!(k.env.iter().all(|(key, _)| key != "LD_LIBRARY_PATH"));

        let mut bad = vm();
        bad.cpus = 300;
        assert!(translate(&bad, &KrunKernel::Libkrunfw, "/g").is_err());
        bad = vm();
        bad.mac = "5a:94:ef:e4:0c".into();
        assert!(translate(&bad, &KrunKernel::Libkrunfw, "/g")
            .unwrap_err()
            .to_string()
            .contains("MAC"));
        bad = vm();
        bad.net = Some(crate::NetAttach::VhostUser("/i/net.sock".into()));
        assert!(translate(&bad, &KrunKernel::Libkrunfw, "/g")
            .unwrap_err()
            .to_string()
            .contains("vhost-user"));
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("00:11:22:aa:bb:ff").unwrap(),
            [0, 0x11, 0x22, 0xaa, 0xbb, 0xff]
        );
        for bad in [
            "",
            "00:11:22:aa:bb",
            "00:11:22:aa:bb:ff:00",
            "0:11:22:aa:bb:ff",
            "zz:11:22:aa:bb:ff",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_child_command_has_its_own_environment() {
        let d = tempfile::tempdir().unwrap();
        let fw = d.path().join("libkrunfw.so.5");
        std::fs::write(&fw, b"").unwrap();
        let k = Krun {
            program: "/usr/bin/gatevm".into(),
            libkrunfw: fw.clone(),
            kernel: KrunKernel::Libkrunfw,
            guest_exec: "/usr/local/sbin/gatevm-guest".into(),
        };
        let cmd = k.command(&vm()).unwrap();
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(&args[..2], ["__krun-vm", "--config-json"]);
        let back: KrunConfig = serde_json::from_str(&args[2]).unwrap();
        assert_eq!(
            back,
            translate(
                &vm(),
                &KrunKernel::Libkrunfw,
                "/usr/local/sbin/gatevm-guest"
            )
            .unwrap()
        );
        let envs: Vec<(String, Option<String>)> = cmd
            .get_envs()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.map(|v| v.to_string_lossy().into_owned()),
                )
            })
            .collect();
        assert!(envs.contains(&(
            "LD_LIBRARY_PATH".into(),
            Some(d.path().display().to_string())
        )));
        assert!(envs.contains(&("HOSTNAME".into(), Some("gw".into()))));

        std::fs::remove_file(&fw).unwrap();
        assert!(matches!(k.command(&vm()), Err(VmmError::Missing { .. })));
    }

    #[test]
    fn unavailable_names_the_reason_and_the_alternative() {
        let good = HostCaps {
            cpu_virt_flag: true,
            kvm_device: true,
            kvm_accessible: true,
            kvm_flavour: Some("kvm_intel".into()),
            vhost_vsock: true,
            vhost_net: true,
        };
        let d = tempfile::tempdir().unwrap();
        let fw = d.path().join("libkrunfw.so.5");
        std::fs::write(&fw, b"").unwrap();
        assert_eq!(unavailable(&good, &fw, &KrunKernel::Libkrunfw), None);
        let pvm = HostCaps {
            kvm_flavour: Some("kvm_pvm".into()),
            ..good.clone()
        };
        let why = unavailable(&pvm, &fw, &KrunKernel::Libkrunfw).unwrap();
        assert!(
            why.contains("kvm_pvm") && why.contains("--vmm qemu"),
            "{why}"
        );
        let no_access = HostCaps {
            kvm_accessible: false,
            ..good.clone()
        };
        assert!(unavailable(&no_access, &fw, &KrunKernel::Libkrunfw)
            .unwrap()
            .contains("read-write"));
        let missing = d.path().join("nope.so");
        let why = unavailable(&good, &missing, &KrunKernel::Libkrunfw).unwrap();
        assert!(
            why.contains("nope.so") && why.contains("gatevm setup"),
            "{why}"
        );
        // An external kernel does not need libkrunfw, but must exist.
        let ext = KrunKernel::External {
            path: missing.clone(),
            initramfs: None,
            cmdline: String::new(),
        };
        assert!(unavailable(&good, &missing, &ext)
            .unwrap()
            .contains("not a file"));
        let ext = KrunKernel::External {
            path: fw.clone(),
            initramfs: None,
            cmdline: String::new(),
        };
        assert_eq!(unavailable(&good, &missing, &ext), None);
    }

    #[test]
    fn start_reports_the_failure_and_frees_the_context() {
        let mut r = Recorder::default();
        let calls = plan(&cfg());
        let err = configure(&mut r, &calls).unwrap().start();
        assert_eq!(err.function, "krun_start_enter");
        assert_eq!(err.errno, libc::ENOENT);
        let n = r.log.len();
        assert_eq!(r.log[n - 2], "krun_start_enter(7)");
        assert_eq!(r.log[n - 1], "krun_free_ctx(7)");
    }

    #[test]
    fn external_kernel_and_no_disk_or_network() {
        let c = KrunConfig {
            kernel: KrunKernel::External {
                path: "/k/vmlinux".into(),
                initramfs: None,
                cmdline: "quiet".into(),
            },
            disks: vec![],
            net: None,
            ..cfg()
        };
        let p = plan(&c);
        assert_eq!(p[1].function(), "krun_set_kernel");
        assert!(!p.iter().any(|c| matches!(
            c,
            KrunCall::AddDisk3 { .. } | KrunCall::AddNetUnixstream { .. }
        )));
    }

    #[test]
    fn configure_makes_the_calls_and_frees_the_context() {
        let mut r = Recorder::default();
        let calls = plan(&cfg());
        {
            let ctx = configure(&mut r, &calls).unwrap();
            assert_eq!(ctx.id(), 7);
        }
        assert_eq!(r.log.first().map(String::as_str), Some("krun_create_ctx"));
        assert_eq!(r.log.len(), calls.len() + 2);
        assert_eq!(r.log.last().map(String::as_str), Some("krun_free_ctx(7)"));
    }

    #[test]
    fn a_failing_call_is_named_and_frees_the_context() {
        let mut r = Recorder {
            fail: Some("krun_add_disk3"),
            ..Default::default()
        };
        let err = configure(&mut r, &plan(&cfg())).err().unwrap();
        assert_eq!(err.function, "krun_add_disk3");
        assert_eq!(err.errno, libc::EINVAL);
        assert!(
            err.to_string()
                .starts_with("krun_add_disk3 failed: Invalid argument"),
            "{err}"
        );
        assert_eq!(r.log.last().map(String::as_str), Some("krun_free_ctx(7)"));
        assert!(
            !r.log.iter().any(|l| l == "krun_set_exec"),
            "calls after the failure were made"
        );

        let mut r = Recorder {
            fail: Some("krun_create_ctx"),
            ..Default::default()
        };
        let err = configure(&mut r, &plan(&cfg())).err().unwrap();
        assert_eq!(err.function, "krun_create_ctx");
        assert!(
            !r.log.iter().any(|l| l.starts_with("krun_free_ctx")),
            "freed a context never made"
        );
    }
}

/// The real libkrun, linked from the `libkrun` crate (lib name `krun`).
pub mod sys {
    use super::{KrunApi, KrunCall};
    use std::ffi::{c_char, CString};
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    /// libkrun itself. Configuration calls are safe to make anywhere; `start_enter` boots.
    #[derive(Debug, Default)]
    pub struct LibKrun;

    fn cstr(s: &str) -> Option<CString> {
        CString::new(s).ok()
    }

    fn cpath(p: &Path) -> Option<CString> {
        CString::new(p.as_os_str().as_bytes()).ok()
    }

    /// A NULL-terminated array of C strings (the pointers borrow `owned`).
    fn carray(owned: &[CString]) -> Vec<*const c_char> {
        owned
            .iter()
            .map(|s| s.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect()
    }

    impl KrunApi for LibKrun {
        fn create_ctx(&mut self) -> i32 {
            ::krun::krun_create_ctx()
        }

        fn call(&mut self, ctx: u32, call: &KrunCall) -> i32 {
            let inval = -libc::EINVAL;
            match call {
                KrunCall::SetVmConfig { vcpus, ram_mib } => {
                    ::krun::krun_set_vm_config(ctx, *vcpus, *ram_mib)
                }
                KrunCall::SetKernel {
                    path,
                    format,
                    initramfs,
                    cmdline,
                } => {
                    let (Some(p), Some(c)) = (cpath(path), cstr(cmdline)) else {
                        return inval;
                    };
                    let i = match initramfs {
                        Some(i) => match cpath(i) {
                            Some(i) => Some(i),
                            None => return inval,
                        },
                        None => None,
                    };
                    let iptr = i.as_ref().map_or(std::ptr::null(), |i| i.as_ptr());
                    // SAFETY: pointers from CStrings/arrays alive for the call; libkrun copies them.
                    unsafe { ::krun::krun_set_kernel(ctx, p.as_ptr(), *format, iptr, c.as_ptr()) }
                }
                KrunCall::SetRoot { path } => {
                    let Some(p) = cpath(path) else { return inval };
                    // SAFETY: pointers from CStrings/arrays alive for the call; libkrun copies them.
                    unsafe { ::krun::krun_set_root(ctx, p.as_ptr()) }
                }
                KrunCall::AddDisk3 {
                    block_id,
                    path,
                    format,
                    read_only,
                    direct_io,
                    sync_mode,
                } => {
                    let (Some(b), Some(p)) = (cstr(block_id), cpath(path)) else {
                        return inval;
                    };
                    // SAFETY: pointers from CStrings/arrays alive for the call; libkrun copies them.
                    unsafe {
                        ::krun::krun_add_disk3(
                            ctx,
                            b.as_ptr(),
                            p.as_ptr(),
                            *format,
                            *read_only,
                            *direct_io,
                            *sync_mode,
                        )
                    }
                }
                KrunCall::AddVirtiofs3 {
                    tag,
                    path,
                    shm_size,
                    read_only,
                } => {
                    let (Some(t), Some(p)) = (cstr(tag), cpath(path)) else {
                        return inval;
                    };
                    // SAFETY: pointers from CStrings alive for the call; libkrun copies them.
                    unsafe {
                        ::krun::krun_add_virtiofs3(
                            ctx,
                            t.as_ptr(),
                            p.as_ptr(),
                            *shm_size,
                            *read_only,
                        )
                    }
                }
                KrunCall::AddNetUnixstream {
                    net,
                    mac,
                    features,
                    flags,
                } => {
                    // A path, or an inherited connected descriptor (passt): one of the two.
                    let (p, fd) = match net {
                        crate::NetAttach::Socket(path) => {
                            let Some(p) = cpath(path) else { return inval };
                            (Some(p), -1)
                        }
                        crate::NetAttach::Fd(fd) => (None, *fd),
                        // Refused when the configuration is made.
                        crate::NetAttach::VhostUser(_) => return inval,
                    };
                    // SAFETY: pointers from CStrings/arrays alive for the call (or null with a
                    // descriptor, as libkrun documents); libkrun copies them.
                    unsafe {
                        ::krun::krun_add_net_unixstream(
                            ctx,
                            p.as_ref().map_or(std::ptr::null(), |p| p.as_ptr()),
                            fd,
                            mac.as_ptr(),
                            *features,
                            *flags,
                        )
                    }
                }
                KrunCall::DisableImplicitVsock => ::krun::krun_disable_implicit_vsock(ctx),
                KrunCall::AddVsock { tsi_features } => ::krun::krun_add_vsock(ctx, *tsi_features),
                KrunCall::AddVsockPort2 { port, path, listen } => {
                    let Some(p) = cpath(path) else { return inval };
                    // SAFETY: pointers from CStrings/arrays alive for the call; libkrun copies them.
                    unsafe { ::krun::krun_add_vsock_port2(ctx, *port, p.as_ptr(), *listen) }
                }
                KrunCall::SetConsoleOutput { path } => {
                    let Some(p) = cpath(path) else { return inval };
                    // SAFETY: pointers from CStrings/arrays alive for the call; libkrun copies them.
                    unsafe { ::krun::krun_set_console_output(ctx, p.as_ptr()) }
                }
                KrunCall::SetWorkdir { path } => {
                    let Some(p) = cstr(path) else { return inval };
                    // SAFETY: pointers from CStrings/arrays alive for the call; libkrun copies them.
                    unsafe { ::krun::krun_set_workdir(ctx, p.as_ptr()) }
                }
                KrunCall::SetExec { path, argv, envp } => {
                    let Some(p) = cstr(path) else { return inval };
                    let Some(a) = argv.iter().map(|s| cstr(s)).collect::<Option<Vec<_>>>() else {
                        return inval;
                    };
                    let Some(e) = envp.iter().map(|s| cstr(s)).collect::<Option<Vec<_>>>() else {
                        return inval;
                    };
                    let (ap, ep) = (carray(&a), carray(&e));
                    // SAFETY: pointers from CStrings/arrays alive for the call; libkrun copies them.
                    unsafe { ::krun::krun_set_exec(ctx, p.as_ptr(), ap.as_ptr(), ep.as_ptr()) }
                }
            }
        }

        fn free_ctx(&mut self, ctx: u32) -> i32 {
            ::krun::krun_free_ctx(ctx)
        }

        fn start_enter(&mut self, ctx: u32) -> i32 {
            ::krun::krun_start_enter(ctx)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::super::*;
        use super::LibKrun;

        /// The real libkrun accepts the whole configuration (booting needs KVM; configuring
        /// does not), and refuses a bad one with the call named.
        #[test]
        fn real_libkrun_accepts_the_plan() {
            let d = tempfile::tempdir().unwrap();
            let disk = d.path().join("state.img");
            std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
            let c = KrunConfig {
                cpus: 2,
                memory_mib: 512,
                kernel: KrunKernel::Libkrunfw,
                root_dir: d.path().to_path_buf(),
                disks: vec![
                    crate::Disk::ro("gatevm-base", &disk),
                    crate::Disk::rw("gatevm-state", &disk),
                ],
                agent_socket: d.path().join("agent.sock"),
                net: Some(crate::NetAttach::Socket(d.path().join("net.sock"))),
                mac: [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee],
                console_log: d.path().join("console.log"),
                exec: "/usr/local/sbin/gatevm-guest".into(),
                args: vec!["--krun".into()],
                env: vec![("PATH".into(), "/usr/bin".into())],
                // A share, read-only: libkrun's own virtio-fs takes it.
                shares: vec![crate::Share {
                    tag: "gatevm-vol0".into(),
                    host_dir: d.path().to_path_buf(),
                    read_only: true,
                    socket: None,
                }],
            };
            let mut api = LibKrun;
            let ctx = configure(&mut api, &plan(&c)).expect("libkrun refused the plan");
            assert!(ctx.id() < 1 << 20);
            drop(ctx);

            let bad = KrunConfig { cpus: 0, ..c };
            let err = configure(&mut api, &plan(&bad))
                .err()
                .expect("0 vCPUs accepted");
            assert_eq!(err.function, "krun_set_vm_config");
        }
    }
}
