//! The libkrun backend's call sequence (work in progress for issue 3).
//!
//! A libkrun VM is configured by a sequence of C calls on a context and started with
//! `krun_start_enter`, which never returns on success. This module turns an instance
//! configuration into that sequence as plain data ([`KrunCall`]), so the sequence is unit-tested
//! without a hypervisor, and replays it through the [`KrunApi`] trait: the real implementation
//! calls the `libkrun` crate in the VM's own child process; tests use a recording fake.
//!
//! Constants below are libkrun 1.19's (`libkrun.h`).

use std::path::PathBuf;

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
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KrunConfig {
    pub cpus: u8,
    pub memory_mib: u32,
    pub kernel: KrunKernel,
    /// The instance's root directory, served by libkrun's built-in virtio-fs.
    pub root_dir: PathBuf,
    pub state_disk: Option<PathBuf>,
    /// Host unix socket libkrun listens on and connects to the guest agent's vsock port.
    pub agent_socket: PathBuf,
    /// gvproxy's `-listen-qemu` socket.
    pub net_socket: Option<PathBuf>,
    pub mac: [u8; 6],
    pub console_log: PathBuf,
    /// The workload: gatevm-guest in the instance root, and its arguments.
    pub exec: String,
    pub args: Vec<String>,
    /// The workload's whole environment (never the host's).
    pub env: Vec<(String, String)>,
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
    AddNetUnixstream {
        path: PathBuf,
        mac: [u8; 6],
        features: u32,
        flags: u32,
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
            KrunCall::AddNetUnixstream { .. } => "krun_add_net_unixstream",
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
    if let Some(disk) = &c.state_disk {
        calls.push(KrunCall::AddDisk3 {
            block_id: "state".into(),
            path: disk.clone(),
            format: KRUN_DISK_FORMAT_RAW,
            read_only: false,
            direct_io: false,
            sync_mode: KRUN_SYNC_FULL,
        });
    }
    if let Some(net) = &c.net_socket {
        calls.push(KrunCall::AddNetUnixstream {
            path: net.clone(),
            mac: c.mac,
            features: NET_COMPAT_FEATURES,
            flags: 0,
        });
    }
    calls.push(KrunCall::AddVsockPort2 {
        port: gatevm_protocol::AGENT_VSOCK_PORT,
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
    }

    fn cfg() -> KrunConfig {
        KrunConfig {
            cpus: 2,
            memory_mib: 2048,
            kernel: KrunKernel::Libkrunfw,
            root_dir: "/i/rootfs".into(),
            state_disk: Some("/i/state.img".into()),
            agent_socket: "/run/gatevm/i/agent.sock".into(),
            net_socket: Some("/run/gatevm/i/net.sock".into()),
            mac: [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee],
            console_log: "/i/logs/console.log".into(),
            exec: "/usr/local/sbin/gatevm-guest".into(),
            args: vec![],
            env: vec![("PATH".into(), "/usr/sbin:/usr/bin".into())],
        }
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
                "krun_add_net_unixstream",
                "krun_add_vsock_port2",
                "krun_set_console_output",
                "krun_set_workdir",
                "krun_set_exec"
            ]
        );
        assert!(p.contains(&KrunCall::AddVsockPort2 {
            port: gatevm_protocol::AGENT_VSOCK_PORT,
            path: "/run/gatevm/i/agent.sock".into(),
            listen: true
        }));
        assert!(p.contains(&KrunCall::SetExec {
            path: "/usr/local/sbin/gatevm-guest".into(),
            argv: vec![],
            envp: vec!["PATH=/usr/sbin:/usr/bin".into()]
        }));
    }

    #[test]
    fn external_kernel_and_no_disk_or_network() {
        let c = KrunConfig {
            kernel: KrunKernel::External {
                path: "/k/vmlinux".into(),
                initramfs: None,
                cmdline: "quiet".into(),
            },
            state_disk: None,
            net_socket: None,
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
                KrunCall::AddNetUnixstream {
                    path,
                    mac,
                    features,
                    flags,
                } => {
                    let Some(p) = cpath(path) else { return inval };
                    // SAFETY: pointers from CStrings/arrays alive for the call; libkrun copies them.
                    unsafe {
                        ::krun::krun_add_net_unixstream(
                            ctx,
                            p.as_ptr(),
                            -1,
                            mac.as_ptr(),
                            *features,
                            *flags,
                        )
                    }
                }
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
                state_disk: Some(disk),
                agent_socket: d.path().join("agent.sock"),
                net_socket: Some(d.path().join("net.sock")),
                mac: [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee],
                console_log: d.path().join("console.log"),
                exec: "/usr/local/sbin/gatevm-guest".into(),
                args: vec!["--krun".into()],
                env: vec![("PATH".into(), "/usr/bin".into())],
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
