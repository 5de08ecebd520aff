//! The steps of a start, in order: choose the backend, prepare the root's disks (and k3s's
//! staging image), the state disk and the initramfs, start the network helper, spawn the VM, put the forwards in, open the
//! control socket, race the boot against the helpers and a stop, then serve until the VM ends.

use super::children::{
    describe, describe_vm_exit, first_exit, helper_exited_during_boot, log_tail, spawn_owned,
    wait_socket, OwnedChild, SpawnSpec,
};
use super::helpers::{self, Network};
use super::{
    control, io_err, payloads_ready, state, AbortOnDrop, ProgressSink, RunningInstance,
    SuperviseOptions, SupervisorError, AGENT_TIMEOUT, PAYLOAD_TIMEOUT, VMM_SILENCE,
};
use crate::agent::Agent;
use crate::backend::{self, VmmBackend};
use crate::config::{InstanceConfig, VmmChoice};
use crate::control::Progress;
use crate::paths::InstancePaths;
use crate::state::Phase;
use gatevm_abi::cmdline::{Cmdline, PayloadKind};
use gatevm_abi::paths::{disk, GUEST_AGENT as GUEST_AGENT_PATH};
use gatevm_abi::PayloadState;
use gatevm_net::gvproxy::{self, GvproxyConfig};
use gatevm_runtime::erofs::Owners;
use gatevm_vmm::{Accel, Disk, VmConfig, Vmm};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{UnixListener, UnixStream};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Reports the start of a phase (and logs it), with the time since the start began.
fn phase(p: &str, t0: Instant, progress: &mut ProgressSink) {
    let ms = t0.elapsed().as_millis() as u64;
    tracing::info!("phase {p} at {ms} ms");
    progress(Progress::Phase {
        phase: p.to_string(),
        elapsed_ms: ms,
    });
}

/// Boots the VM and serves until it stops; returns why it stopped.
pub(super) async fn boot_and_serve(
    opts: &SuperviseOptions,
    inst: &Arc<RunningInstance>,
    children: &mut Vec<OwnedChild>,
    stop_rx: &mut mpsc::Receiver<u64>,
    progress: &mut ProgressSink,
    t0: Instant,
) -> Result<String, SupervisorError> {
    let (paths, cfg) = (&inst.paths, &opts.config);
    phase("preparing", t0, progress);
    let runtime = gatevm_runtime::Runtime::load()
        .map_err(|e| SupervisorError::Setup(gatevm_abi::error_chain(&e)))?;
    let (chosen, vmm) = choose_backend(inst, &runtime, progress)?;
    let cluster_ip = cluster_ip(cfg, &chosen)?;
    let mut disks = prepare_root(opts, paths, &runtime, &chosen, cluster_ip)?;
    disks.extend(prepare_state_disk(paths, cfg)?);
    disks.extend(prepare_settings(paths, cfg, cluster_ip)?);
    let initramfs = boot_files(vmm.as_ref(), &runtime, paths, &opts.guest_bin)?;

    phase("starting helpers", t0, progress);
    let mtu = net_mtu(&chosen);
    let net = helpers::start_network(inst, &runtime, &chosen, mtu, children).await?;
    let shares = helpers::start_file_servers(inst, &runtime, &chosen, children)?;

    phase("booting", t0, progress);
    // The VMM writes the console into a FIFO that the supervisor drains into the capped log.
    let console = crate::logcap::LogFifo::create(
        &paths.console_fifo(),
        &paths.log("console"),
        crate::logcap::CONSOLE_LOG_CAP,
    )
    .map_err(io_err(format!(
        "creating {}",
        paths.console_fifo().display()
    )))?;
    let mut vm_cfg = vm_config(cfg, paths, &chosen, mtu, &runtime, initramfs, disks);
    vm_cfg.shares = shares;
    // The cluster network: the VM's end of its NIC's socket pair, and the switch (a server) or
    // the relay to the server's switch (an agent) on ours, for as long as this boot serves.
    let (cluster_vm_end, _cluster) = match cluster_ip {
        Some(ip) => {
            let (vm_end, ours) =
                super::cluster::vm_pair().map_err(io_err("creating the cluster NIC's sockets"))?;
            let link = match cfg.k3s.as_ref().and_then(|k| k.join.as_ref()) {
                Some(j) => super::cluster::start_relay(
                    ours,
                    InstancePaths::new(&j.server).cluster_socket(),
                ),
                None => super::cluster::start_switch(ours, &paths.cluster_socket()).map_err(
                    io_err(format!("listening on {}", paths.cluster_socket().display())),
                )?,
            };
            vm_cfg.cluster_nic = Some(gatevm_vmm::ClusterNic {
                fd: std::os::fd::AsRawFd::as_raw_fd(&vm_end),
                mac: gatevm_abi::net::cluster_mac(ip),
            });
            (Some(vm_end), Some(link))
        }
        None => (None, None),
    };
    // From here on a failure before the agent answers is the VM's: with `auto` on krun, the
    // supervisor then boots the instance with QEMU.
    inst.krun_by_auto.store(
        cfg.vmm == VmmChoice::Auto && matches!(chosen, VmmBackend::Krun(_)),
        std::sync::atomic::Ordering::SeqCst,
    );
    let (net_gvproxy, vm_index) =
        spawn_vm(inst, vmm.as_ref(), vm_cfg, net, cluster_vm_end, children)?;
    let expose = put_forwards(cfg, paths, net_gvproxy);
    let _server = open_control_socket(inst)?;

    // The helpers are watched from here on: one that dies during boot ends the start at once.
    let (helpers, vm) = children.split_at_mut(vm_index);
    let vm = &mut vm[0];
    let (agent, (agent_ms, ready_ms)) =
        race_boot(inst, helpers, vm, &console.drained, stop_rx, progress, t0).await?;
    forwards_done(expose).await?;
    if matches!(chosen, VmmBackend::Krun(_)) {
        // krun works here (again): forget an earlier failure.
        if let Some(f) = backend::krun_failure_file() {
            let _ = std::fs::remove_file(f);
        }
    }
    inst.set_state(|s| {
        s.phase = Phase::Running;
        s.agent_ready_ms = Some(agent_ms);
        s.ready_ms = Some(ready_ms);
        s.last_error = None;
        s.stop_reason = None;
    });
    // containerd's API on the host (an appliance's, not a throwaway VM's).
    let _containerd = match cfg.ephemeral {
        None => Some(open_containerd_socket(inst)?),
        Some(_) => None,
    };
    progress(Progress::Ready {
        agent_ready_ms: agent_ms,
        ready_ms,
    });
    let reason = serve(inst, &agent, helpers, vm, stop_rx).await;
    inst.set_state(|s| s.phase = Phase::Stopping);
    Ok(reason)
}

/// Chooses the backend (with a notice when it is QEMU's software emulation), builds it and
/// records it and its kernel in the state.
fn choose_backend(
    inst: &RunningInstance,
    runtime: &gatevm_runtime::Runtime,
    progress: &mut ProgressSink,
) -> Result<(VmmBackend, Box<dyn Vmm>), SupervisorError> {
    let cfg = &inst.config;
    let caps = gatevm_vmm::probe();
    let failed_now = inst
        .krun_failed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let failed_before = backend::krun_failure_file().and_then(|f| {
        backend::remembered_krun_failure(&f, &backend::runtime_identity(&runtime.libkrunfw()))
    });
    let (chosen, note) = match (&failed_now, cfg.vmm) {
        // krun failed in this very start: the same instance boots with QEMU.
        (Some(why), VmmChoice::Auto) => (
            VmmBackend::Qemu(Accel::for_host(&caps)),
            Some(format!(
                "krun failed to boot the guest ({why}); this start uses QEMU, and --vmm auto \
                 does until the runtime changes"
            )),
        ),
        // The test hook (see FAULT_KRUN_ENV): auto acts as if it took krun, which fails.
        (None, VmmChoice::Auto)
            if std::env::var(backend::FAULT_KRUN_ENV).as_deref() == Ok("boot-fails") =>
        {
            match &failed_before {
                Some(f) => (
                    VmmBackend::Qemu(Accel::for_host(&caps)),
                    Some(backend::remembered_note(f)),
                ),
                None => {
                    inst.krun_by_auto
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                    inst.set_state(|s| s.backend = Some("krun/kvm".into()));
                    return Err(SupervisorError::Boot(format!(
                        "the VM exited before the guest agent answered ({}=boot-fails)",
                        backend::FAULT_KRUN_ENV
                    )));
                }
            }
        }
        // A k3s agent's cluster NIC is a QEMU device: auto means QEMU for it.
        _ if cfg.vmm == VmmChoice::Auto && cfg.k3s.as_ref().is_some_and(|k| k.join.is_some()) => {
            (VmmBackend::Qemu(Accel::for_host(&caps)), None)
        }
        _ => backend::choose_remembering(
            cfg.vmm,
            &caps,
            &runtime.libkrunfw(),
            cfg.krun_kernel.as_deref(),
            failed_before.as_ref(),
        )
        .map_err(SupervisorError::Setup)?,
    };
    if let Some(n) = &note {
        progress(Progress::Notice { message: n.clone() });
    }
    // Set just before the VM is spawned (see boot_and_serve): a step before it that fails is not
    // krun's failure.
    inst.krun_by_auto
        .store(false, std::sync::atomic::Ordering::SeqCst);
    if chosen == VmmBackend::Qemu(Accel::Tcg) {
        let why = caps.why_no_hardware_virt().unwrap_or_default();
        progress(Progress::Notice {
            message: format!("no hardware virtualization ({why}): using QEMU software emulation (TCG), which is slower"),
        });
    }
    let program = std::env::current_exe().map_err(io_err("locating the gatevm executable"))?;
    let vmm = backend::build(&chosen, runtime, program);
    let kernel_label = match &chosen {
        VmmBackend::Krun(gatevm_vmm::krun::KrunKernel::Libkrunfw) => {
            format!("libkrunfw ({})", runtime.libkrunfw().display())
        }
        VmmBackend::Krun(gatevm_vmm::krun::KrunKernel::External { path, .. }) => {
            path.display().to_string()
        }
        VmmBackend::Qemu(_) => runtime.kernel_path().display().to_string(),
    };
    inst.set_state(|s| {
        s.backend = Some(chosen.label().to_string());
        s.kernel = Some(kernel_label);
        s.backend_note = note;
    });
    Ok((chosen, vmm))
}

/// The root's disks: the read-only base (gatevm's rootfs image, or a throwaway VM's own root made
/// into one), the instance's writable layer and, for k3s, the staging image. Nothing is mounted
/// on the host: the guest's stage 1 builds the root from them.
fn prepare_root(
    opts: &SuperviseOptions,
    paths: &InstancePaths,
    runtime: &gatevm_runtime::Runtime,
    chosen: &VmmBackend,
    cluster_ip: Option<std::net::Ipv4Addr>,
) -> Result<Vec<Disk>, SupervisorError> {
    let cfg = &opts.config;
    let base = match cfg.ephemeral.as_ref().and_then(|e| e.rootfs.clone()) {
        Some(dir) => {
            // A tree an ordinary user made holds that user's files: root's in the guest.
            let owners = if nix::unistd::geteuid().is_root() {
                Owners::AsInTree
            } else {
                Owners::AllRoot
            };
            let img = paths.root_image();
            gatevm_runtime::erofs::make_image(&dir, &img, owners)
                .map_err(|e| SupervisorError::Setup(gatevm_abi::error_chain(&e)))?;
            img
        }
        None => runtime
            .base_image()
            .map_err(|e| SupervisorError::Setup(gatevm_abi::error_chain(&e)))?,
    };
    super::mounts::prepare_upper(paths, cfg.root_mib)?;
    let mut disks = vec![
        Disk::ro(disk::BASE, base),
        Disk::rw(disk::UPPER, paths.upper_image()),
    ];
    if let Some(k3s) = &cfg.k3s {
        // The plan follows the kernel the VM boots: Debian's config is read; libkrunfw's kernel
        // ships none, so its recorded configuration is read (for the release in the library's
        // banner; another release counts as unknown: every feature missing, the conservative
        // plan).
        let caps = match chosen {
            VmmBackend::Qemu(_) => {
                gatevm_kernel::kconfig::capabilities_of(&runtime.kernel_config())
                    .unwrap_or_default()
            }
            VmmBackend::Krun(_) => gatevm_kernel::libkrunfw::KrunfwKernel::of_library(
                &runtime.libkrunfw(),
                std::env::consts::ARCH,
            )
            .map(|k| k.capabilities())
            .unwrap_or_default(),
        };
        crate::k3s::stage::stage(paths, k3s, &caps, cluster_ip)
            .map_err(SupervisorError::K3sStage)?;
        disks.push(Disk::ro(disk::STAGE, paths.stage_image()));
    }
    Ok(disks)
}

/// The state disk, created or grown as configured; none for a throwaway VM.
fn prepare_state_disk(
    paths: &InstancePaths,
    cfg: &InstanceConfig,
) -> Result<Option<Disk>, SupervisorError> {
    if cfg.ephemeral.is_some() {
        return Ok(None);
    }
    super::mounts::ensure_state_disk(paths, cfg.disk_gib)?;
    Ok(Some(Disk::rw(disk::STATE, paths.state_disk())))
}

/// The settings disk ([`gatevm_abi::settings`]): shares, registries and proxies for the guest,
/// written at every start (0600: it may hold a proxy password); none when there are none.
fn prepare_settings(
    paths: &InstancePaths,
    cfg: &InstanceConfig,
    cluster_ip: Option<std::net::Ipv4Addr>,
) -> Result<Option<Disk>, SupervisorError> {
    let img = paths.settings_image();
    let settings = cfg.guest_settings_with(cluster_ip);
    if settings.is_empty() {
        let _ = std::fs::remove_file(&img);
        return Ok(None);
    }
    let bytes = settings
        .to_image()
        .map_err(|e| SupervisorError::Setup(format!("the guest's settings: {e}")))?;
    crate::paths::write_atomic(&img, &bytes)
        .map_err(io_err(format!("writing {}", img.display())))?;
    Ok(Some(Disk::ro(disk::SETTINGS, img)))
}

/// What the VM boots before the root: gatevm's initramfs (with `guest_bin` as its init) for QEMU;
/// for libkrun, whose own init starts the workload from a virtio-fs directory, a boot directory
/// holding only `guest_bin` (at the agent's path, with the initramfs marker, so it runs as stage
/// 1 there too).
fn boot_files(
    vmm: &dyn Vmm,
    runtime: &gatevm_runtime::Runtime,
    paths: &InstancePaths,
    guest_bin: &Path,
) -> Result<Option<PathBuf>, SupervisorError> {
    if vmm.boots_initramfs() {
        return runtime
            .initramfs(guest_bin)
            .map(Some)
            .map_err(|e| SupervisorError::Setup(gatevm_abi::error_chain(&e)));
    }
    let boot = paths.boot_dir();
    let _ = std::fs::remove_dir_all(&boot);
    let rel = GUEST_AGENT_PATH.trim_start_matches('/');
    let (dir_rel, file) = rel.rsplit_once('/').unwrap_or(("", rel));
    let made = (|| {
        use std::os::unix::fs::PermissionsExt;
        let dir = boot.join(dir_rel);
        std::fs::create_dir_all(&dir)?;
        for d in ["dev", "proc", "sys", "tmp"] {
            std::fs::create_dir_all(boot.join(d))?;
        }
        std::fs::copy(guest_bin, dir.join(file))?;
        std::fs::set_permissions(dir.join(file), std::fs::Permissions::from_mode(0o755))?;
        std::fs::write(
            boot.join(gatevm_abi::paths::rel(gatevm_abi::paths::INITRAMFS_MARKER)),
            b"",
        )?;
        std::fs::set_permissions(&boot, std::fs::Permissions::from_mode(0o755))
    })();
    made.map_err(io_err(format!(
        "making the boot directory {}",
        boot.display()
    )))?;
    Ok(None)
}

/// Large frames where the VMM's device is known to take them (QEMU's virtio-net).
fn net_mtu(chosen: &VmmBackend) -> u32 {
    match chosen {
        VmmBackend::Qemu(_) => gatevm_net::LARGE_MTU,
        VmmBackend::Krun(_) => gatevm_net::ETHERNET_MTU,
    }
}

/// The VM's configuration; the network is attached by [`spawn_vm`].
fn vm_config(
    cfg: &InstanceConfig,
    paths: &InstancePaths,
    chosen: &VmmBackend,
    mtu: u32,
    runtime: &gatevm_runtime::Runtime,
    initramfs: Option<PathBuf>,
    disks: Vec<Disk>,
) -> VmConfig {
    VmConfig {
        name: cfg.name.clone(),
        cpus: cfg.cpus,
        memory_mib: cfg.memory_mib,
        accel: match chosen {
            VmmBackend::Qemu(a) => *a,
            VmmBackend::Krun(_) => Accel::Kvm,
        },
        kernel: runtime.kernel_path().to_path_buf(),
        initramfs,
        cmdline: kernel_cmdline(
            &cfg.name,
            payload_kind(cfg),
            mtu,
            disks.iter().any(|d| d.serial == disk::SETTINGS),
        ),
        disks,
        boot_dir: paths.boot_dir(),
        agent_socket: paths.agent_socket(),
        net: None,
        mac: gvproxy::GUEST_MAC.to_string(),
        console_log: paths.console_fifo(),
        shares: vec![],
        cluster_nic: None,
    }
}

/// The VM's address on its cluster network: a k3s instance's under QEMU
/// ([`InstanceConfig::cluster_ip`]); none under libkrun, where an agent cannot run.
fn cluster_ip(
    cfg: &InstanceConfig,
    chosen: &VmmBackend,
) -> Result<Option<std::net::Ipv4Addr>, SupervisorError> {
    let ip = cfg.cluster_ip();
    match chosen {
        VmmBackend::Qemu(_) => Ok(ip),
        VmmBackend::Krun(_) => match cfg.k3s.as_ref().and_then(|k| k.join.as_ref()) {
            Some(j) => Err(SupervisorError::Setup(format!(
                "a k3s agent of {:?} needs the QEMU backend: gatevm gives libkrun VMs no cluster \
                 network yet (start it with --vmm qemu)",
                j.server
            ))),
            None => Ok(None),
        },
    }
}

/// Spawns the VMM on `net`, as the last of `children` (teardown goes in reverse). Returns
/// gvproxy's configuration (for the forwards) and the VM's index in `children`.
fn spawn_vm(
    inst: &RunningInstance,
    vmm: &dyn Vmm,
    mut vm_cfg: VmConfig,
    net: Network,
    cluster_vm_end: Option<std::os::fd::OwnedFd>,
    children: &mut Vec<OwnedChild>,
) -> Result<(Option<GvproxyConfig>, usize), SupervisorError> {
    let paths = &inst.paths;
    vm_cfg.net = Some(net.attach);
    // libkrun refuses to listen on an existing path; an unprivileged QEMU gets the agent
    // socket bound by `command` (so before it).
    let _ = std::fs::remove_file(paths.agent_socket());
    let std_cmd = vmm.command(&vm_cfg).map_err(|e| {
        // A helper that died refuses its socket: the death is the cause, so name it.
        if let Some(dead) = exited_helper(paths, children) {
            return dead;
        }
        match std::error::Error::source(&e) {
            Some(cause) => SupervisorError::Setup(format!("{e}: {cause}")),
            None => SupervisorError::Setup(e.to_string()),
        }
    })?;
    let vm_log = paths.log("vmm");
    let spec = SpawnSpec {
        inherit: net
            .vm_end
            .as_ref()
            .map(|s| {
                use std::os::fd::AsRawFd;
                s.as_raw_fd()
            })
            .into_iter()
            .chain(cluster_vm_end.as_ref().map(std::os::fd::AsRawFd::as_raw_fd))
            .collect(),
        ..SpawnSpec::plain(&vm_log, &paths.run)
    };
    children.push(spawn_owned(vmm.name(), Command::from(std_cmd), spec)?);
    // The VM has its copies; ours go.
    drop(net.vm_end);
    drop(cluster_vm_end);
    let vm_index = children.len() - 1;
    let vm_id = children[vm_index].id;
    inst.set_state(|s| s.vmm = Some(vm_id));
    Ok((net.gvproxy, vm_index))
}

/// The first of the helpers started so far that has exited, as the boot's error.
fn exited_helper(paths: &InstancePaths, helpers: &mut [OwnedChild]) -> Option<SupervisorError> {
    helpers.iter_mut().find_map(|h| {
        let st = h.child.try_wait().ok().flatten()?;
        Some(helper_exited_during_boot(paths, h.name, Ok(st)))
    })
}

/// Puts gvproxy's forwards in while the guest boots (it retries internally until its stack is
/// up); passt has its forwards from its command line.
fn put_forwards(
    cfg: &InstanceConfig,
    paths: &InstancePaths,
    gv: Option<GvproxyConfig>,
) -> JoinHandle<Result<(), gvproxy::ApiError>> {
    let forwards = crate::config::all_forwards(cfg);
    let api = paths.net_api_socket();
    tokio::spawn(async move {
        let Some(gv) = gv else {
            return Ok::<(), gvproxy::ApiError>(());
        };
        gvproxy::remove_ssh_forward(&api, gv.ssh_port, Duration::from_secs(20)).await?;
        for f in &forwards {
            gvproxy::expose(&api, f, Duration::from_secs(20)).await?;
        }
        Ok(())
    })
}

/// Waits for the forwards task of [`put_forwards`].
async fn forwards_done(
    expose: JoinHandle<Result<(), gvproxy::ApiError>>,
) -> Result<(), SupervisorError> {
    match expose.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(SupervisorError::Forward(e)),
        Err(e) => Err(SupervisorError::ForwardTask(e)),
    }
}

/// Binds the control socket (owner-only) and serves it, so status works during boot.
fn open_control_socket(inst: &Arc<RunningInstance>) -> Result<AbortOnDrop, SupervisorError> {
    let paths = &inst.paths;
    let listener =
        UnixListener::bind(paths.control_socket()).map_err(io_err("binding the control socket"))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(
            paths.control_socket(),
            std::fs::Permissions::from_mode(0o600),
        );
    }
    Ok(control::serve_clients(listener, inst.clone()))
}

/// Listens on the instance's containerd socket (owner only); each client is relayed to the guest's
/// containerd through the agent channel.
fn open_containerd_socket(inst: &Arc<RunningInstance>) -> Result<AbortOnDrop, SupervisorError> {
    let path = inst.paths.containerd_socket();
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).map_err(io_err(format!("binding {}", path.display())))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err(format!("restricting {}", path.display())))?;
    }
    Ok(control::serve_socket_relay(
        listener,
        inst.clone(),
        gatevm_abi::paths::CONTAINERD_SOCKET,
    ))
}

/// Waits for the guest to be ready, ended early by a helper that exits or a stop request.
/// Returns the agent and the (agent, ready) times in ms.
async fn race_boot(
    inst: &RunningInstance,
    helpers: &mut [OwnedChild],
    vm: &mut OwnedChild,
    console: &crate::logcap::Drained,
    stop_rx: &mut mpsc::Receiver<u64>,
    progress: &mut ProgressSink,
    t0: Instant,
) -> Result<(Agent, (u64, u64)), SupervisorError> {
    let paths = &inst.paths;
    let vm_log = paths.log("vmm");
    state::restrict_sockets(&paths.run);
    let (name, st) = {
        let boot = async {
            let agent = connect_agent(paths, &mut *vm, &vm_log).await?;
            // The helpers' and the VMM's sockets exist by now; their makers use their own modes.
            state::restrict_sockets(&paths.run);
            inst.set_agent(agent.clone());
            let times = wait_ready(&agent, &inst.config, &mut *vm, &vm_log, t0, progress).await?;
            Ok::<_, SupervisorError>(Ok((agent, times)))
        };
        let booted = tokio::select! {
            r = boot => r,
            exited = first_exit(helpers) => Ok(Err(exited)),
            () = console_silent(console) => {
                let said = log_tail(&vm_log, 2);
                return Err(SupervisorError::Stalled(format!(
                    "the VM wrote nothing on its console for {} s: the VMM hung before the guest kernel ran{}",
                    VMM_SILENCE.as_secs(),
                    if said.is_empty() { String::new() } else { format!(" (the VMM said: {said})") }
                )));
            }
            t = stop_rx.recv() => return Err(SupervisorError::StoppedDuringBoot(format!("stopped during boot (timeout {} s)", t.unwrap_or(0)))),
        };
        match booted {
            Ok(Ok(ready)) => return Ok(ready),
            Ok(Err(exited)) => exited,
            // The VM's failure may be the consequence of a helper killed a moment before (QEMU
            // exits when its vhost-user network back end goes away): the killed helper is the
            // cause, whichever of the two exits was seen first.
            Err(e) => match killed_helper(helpers) {
                Some(exited) => exited,
                None => return Err(e),
            },
        }
    };
    // As in `helper_died`: a helper that exited by itself may have followed the VM.
    if !killed_by_signal(&st) {
        if let Ok(vm_st) = tokio::time::timeout(Duration::from_millis(500), vm.child.wait()).await {
            return Err(SupervisorError::Boot(format!(
                "the VM exited during boot ({})",
                describe(vm_st)
            )));
        }
    }
    Err(helper_exited_during_boot(paths, name, st))
}

/// The first helper that has exited by a signal, if any (reaping it).
fn killed_helper(
    helpers: &mut [OwnedChild],
) -> Option<(&'static str, std::io::Result<std::process::ExitStatus>)> {
    helpers.iter_mut().find_map(|h| match h.child.try_wait() {
        Ok(Some(st)) if killed_by_signal(&Ok(st)) => Some((h.name, Ok(st))),
        _ => None,
    })
}

/// Connects to the agent channel. libkrun connects each host connection to the guest's vsock
/// port and closes it while nothing listens there yet; QEMU, given an already listening socket,
/// was seen (rarely, under load) to end the first connection too. So a channel closed before the
/// guest answered is retried until the guest answers (the VM's exit and the boot timeout end the
/// wait).
async fn connect_agent(
    paths: &InstancePaths,
    vm: &mut OwnedChild,
    vm_log: &Path,
) -> Result<Agent, SupervisorError> {
    wait_socket(&paths.agent_socket(), vm, vm_log, Duration::from_secs(20)).await?;
    let deadline = Instant::now() + AGENT_TIMEOUT;
    // The VMM binds the socket a moment before it listens on it: refused connections are retried
    // for a while (as long as the VM lives).
    let refused_until = Instant::now() + Duration::from_secs(10);
    loop {
        let stream = match connect_agent_socket(paths, vm, refused_until).await {
            Ok(s) => s,
            Err(e) => return Err(vm_exit_or(vm, vm_log, e).await),
        };
        let (r, w) = stream.into_split();
        let agent = Agent::spawn(r, w);
        if let Err(e) = agent.hello().await {
            return Err(vm_exit_or(vm, vm_log, e.into()).await);
        }
        let mut connected = agent.connected.clone();
        let answered = tokio::time::timeout(Duration::from_millis(500), async {
            while !*connected.borrow() && !agent.ended() {
                if connected.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
        if *agent.connected.borrow() || (answered.is_err() && !agent.ended()) {
            // Answered, or the connection stays open: the hello loop of `wait_ready` goes on.
            return Ok(agent);
        }
        if let Ok(Some(st)) = vm.child.try_wait() {
            return Err(vm_exited_during_boot(vm, vm_log, st).await);
        }
        if Instant::now() > deadline {
            return Err(agent_timeout());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The boot's error once the VM has exited.
async fn vm_exited_during_boot(
    vm: &mut OwnedChild,
    vm_log: &Path,
    st: std::process::ExitStatus,
) -> SupervisorError {
    vm.drained.wait(Duration::from_secs(1)).await;
    SupervisorError::Boot(format!(
        "the VM exited during boot ({st}): see the console log; last lines: {}",
        log_tail(vm_log, 2)
    ))
}

/// A failed agent connection is the VM's exit when the VM is exiting: a killed process closes
/// its sockets a moment before it can be waited for, so the VM gets a second to show its exit
/// before `err` is taken as the cause.
async fn vm_exit_or(vm: &mut OwnedChild, vm_log: &Path, err: SupervisorError) -> SupervisorError {
    match tokio::time::timeout(Duration::from_secs(1), vm.child.wait()).await {
        Ok(Ok(st)) => vm_exited_during_boot(vm, vm_log, st).await,
        _ => err,
    }
}

/// Connects to the agent socket, retrying a refused connection until `refused_until` while the
/// VM lives.
async fn connect_agent_socket(
    paths: &InstancePaths,
    vm: &mut OwnedChild,
    refused_until: Instant,
) -> Result<UnixStream, SupervisorError> {
    loop {
        match UnixStream::connect(paths.agent_socket()).await {
            Ok(s) => return Ok(s),
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && Instant::now() < refused_until
                    && matches!(vm.child.try_wait(), Ok(None)) =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => {
                return Err(SupervisorError::Boot(format!(
                    "connecting to the agent socket: {e}"
                )))
            }
        }
    }
}

/// Resolves once the console has stayed empty for [`VMM_SILENCE`] (never, once a byte came).
async fn console_silent(console: &crate::logcap::Drained) {
    let start = Instant::now();
    while console.bytes() == 0 {
        if start.elapsed() >= VMM_SILENCE {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    std::future::pending::<()>().await
}

/// The agent did not answer within [`AGENT_TIMEOUT`].
fn agent_timeout() -> SupervisorError {
    SupervisorError::Boot(format!(
        "the guest agent did not answer within {} s: see the console log",
        AGENT_TIMEOUT.as_secs()
    ))
}

/// Waits for the agent's hello, then for every payload to be ready. Returns (agent ms, ready ms).
async fn wait_ready(
    agent: &Agent,
    cfg: &InstanceConfig,
    vm: &mut OwnedChild,
    vm_log: &Path,
    t0: Instant,
    progress: &mut ProgressSink,
) -> Result<(u64, u64), SupervisorError> {
    wait_hello(agent, vm, vm_log).await?;
    let agent_ms = t0.elapsed().as_millis() as u64;
    if cfg.ephemeral.is_some() {
        return Ok((agent_ms, agent_ms));
    }
    progress(Progress::Phase {
        phase: if cfg.k3s.is_some() {
            "agent ready, starting containerd and k3s".into()
        } else {
            "agent ready, starting containerd".into()
        },
        elapsed_ms: agent_ms,
    });
    wait_payloads(agent, cfg, vm).await?;
    Ok((agent_ms, t0.elapsed().as_millis() as u64))
}

/// Says hello until the guest answers (our bytes wait in the socket until the guest opens its
/// port).
async fn wait_hello(
    agent: &Agent,
    vm: &mut OwnedChild,
    vm_log: &Path,
) -> Result<(), SupervisorError> {
    let mut connected = agent.connected.clone();
    let deadline = Instant::now() + AGENT_TIMEOUT;
    let vm_drained = vm.drained.clone();
    loop {
        if *connected.borrow() {
            return Ok(());
        }
        agent.hello().await?;
        tokio::select! {
            _ = connected.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            st = vm.child.wait() => {
                vm_drained.wait(Duration::from_secs(1)).await;
                return Err(SupervisorError::Boot(format!(
                    "the VM exited during boot ({}): see the console log; last lines: {}",
                    describe(st), log_tail(vm_log, 2)
                )));
            }
        }
        if Instant::now() > deadline {
            return Err(agent_timeout());
        }
    }
}

/// Waits for every payload to be ready (k3s under software emulation takes minutes to bring its
/// API server up, so it gets longer).
async fn wait_payloads(
    agent: &Agent,
    cfg: &InstanceConfig,
    vm: &mut OwnedChild,
) -> Result<(), SupervisorError> {
    let payload_timeout = if cfg.k3s.is_some() {
        Duration::from_secs(600)
    } else {
        PAYLOAD_TIMEOUT
    };
    let deadline = Instant::now() + payload_timeout;
    loop {
        agent.refresh_status(Duration::from_secs(2)).await;
        let view = agent.view();
        if payloads_ready(cfg, &view.payloads) {
            return Ok(());
        }
        if let Some(p) = view
            .payloads
            .iter()
            .find(|p| p.state == PayloadState::Failed)
        {
            return Err(SupervisorError::Boot(format!(
                "{} failed in the guest: {}",
                p.name,
                p.last_exit.clone().unwrap_or_default()
            )));
        }
        if !*agent.connected.borrow() {
            return Err(SupervisorError::Boot(
                "the guest agent disconnected during boot".into(),
            ));
        }
        if Instant::now() > deadline {
            let states: Vec<String> = view
                .payloads
                .iter()
                .map(|p| format!("{} {:?}", p.name, p.state))
                .collect();
            return Err(SupervisorError::Boot(format!(
                "the payload was not ready within {} s ({})",
                payload_timeout.as_secs(),
                states.join(", ")
            )));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            st = vm.child.wait() => {
                return Err(SupervisorError::Boot(format!("the VM exited during boot ({})", describe(st))));
            }
        }
    }
}

/// Serves until the VM ends, a helper dies, or a stop is asked for; returns why it ended.
async fn serve(
    inst: &RunningInstance,
    agent: &Agent,
    helpers: &mut [OwnedChild],
    vm: &mut OwnedChild,
    stop_rx: &mut mpsc::Receiver<u64>,
) -> String {
    tokio::select! {
        st = vm.child.wait() => describe_vm_exit(st),
        (name, st) = first_exit(helpers) => helper_died(inst, vm, name, st).await,
        t = stop_rx.recv() => graceful_stop(inst, agent, vm, Duration::from_secs(t.unwrap_or(30))).await,
    }
}

/// Whether a helper was killed by a signal: then its death is the cause of whatever follows. The
/// helpers end by themselves, with an exit code, when the VM goes away (gvproxy when QEMU's
/// network connection closes, passt when its vhost-user peer does), and QEMU ends with one when
/// a vhost-user back end goes during boot; so only a helper that exited by itself may have followed a VM
/// that exited at about the same time.
fn killed_by_signal(st: &std::io::Result<std::process::ExitStatus>) -> bool {
    use std::os::unix::process::ExitStatusExt;
    matches!(st, Ok(s) if s.signal().is_some())
}

/// Why the instance ends after a helper exited: the helper, unless it exited by itself and the VM
/// exited at about the same time (see [`killed_by_signal`]).
async fn helper_died(
    inst: &RunningInstance,
    vm: &mut OwnedChild,
    name: &str,
    st: std::io::Result<std::process::ExitStatus>,
) -> String {
    if !killed_by_signal(&st) {
        if let Ok(vm_st) = tokio::time::timeout(Duration::from_millis(500), vm.child.wait()).await {
            return describe_vm_exit(vm_st);
        }
    }
    let why = format!(
        "{name} exited unexpectedly ({}); the VM was stopped",
        describe(st)
    );
    inst.set_state(|s| s.last_error = Some(why.clone()));
    why
}

/// Asks the guest to power off, waits up to `timeout`, then forces the VM down.
async fn graceful_stop(
    inst: &RunningInstance,
    agent: &Agent,
    vm: &mut OwnedChild,
    timeout: Duration,
) -> String {
    inst.set_state(|s| s.phase = Phase::Stopping);
    let start = Instant::now();
    let acked =
        *agent.connected.borrow() && agent.shutdown(Duration::from_secs(2).min(timeout)).await;
    if acked {
        let left = timeout.saturating_sub(start.elapsed());
        if let Ok(st) = tokio::time::timeout(left, vm.child.wait()).await {
            return match st {
                Ok(s) if s.success() => "stopped on request".into(),
                other => format!("stopped on request ({})", describe(other)),
            };
        }
    }
    vm.terminate(Duration::from_secs(2)).await;
    if acked {
        format!(
            "stopped on request (forced after {} s: the guest did not power off)",
            timeout.as_secs()
        )
    } else {
        "stopped on request (forced: the guest agent did not answer)".into()
    }
}

/// What the guest runs: nothing for a throwaway VM, k3s (with containerd) for the k3s profile,
/// else containerd.
fn payload_kind(cfg: &InstanceConfig) -> PayloadKind {
    if cfg.ephemeral.is_some() {
        PayloadKind::None
    } else if cfg.k3s.is_some() {
        PayloadKind::K3s
    } else {
        PayloadKind::Containerd
    }
}

/// The guest kernel command line: the console, then the contract's `gatevm.*` words
/// ([`Cmdline::render`]); `$GATEVM_KERNEL_APPEND` adds to it (e.g. `loglevel=7` to see the
/// kernel's messages in the console log).
fn kernel_cmdline(hostname: &str, payload: PayloadKind, mtu: u32, settings_disk: bool) -> String {
    let settings = Cmdline {
        hostname: hostname.to_string(),
        payload,
        settings: settings_disk,
        // The guest keeps the device's MTU (Ethernet's) unless told otherwise.
        mtu: (mtu != gatevm_abi::net::ETHERNET_MTU).then_some(mtu),
        ..Cmdline::default()
    };
    let mut c = format!("console=ttyS0 quiet panic=-1 {}", settings.render());
    if let Ok(extra) = std::env::var("GATEVM_KERNEL_APPEND") {
        c.push(' ');
        c.push_str(&extra);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::kernel_cmdline;
    use gatevm_abi::cmdline::{parse, PayloadKind};

    #[test]
    fn kernel_cmdline_names_payload_and_a_large_mtu() {
        if std::env::var_os("GATEVM_KERNEL_APPEND").is_some() {
            gatevm_testkit::skip(
                "supervisor::boot::tests::kernel_cmdline_names_payload_and_a_large_mtu",
                "GATEVM_KERNEL_APPEND is set",
            );
            return;
        }
        assert_eq!(
            kernel_cmdline(
                "gw",
                PayloadKind::Containerd,
                gatevm_net::ETHERNET_MTU,
                false
            ),
            "console=ttyS0 quiet panic=-1 gatevm.hostname=gw"
        );
        assert_eq!(
            kernel_cmdline("gw", PayloadKind::K3s, gatevm_net::LARGE_MTU, true),
            "console=ttyS0 quiet panic=-1 gatevm.hostname=gw gatevm.payload=k3s gatevm.mtu=65520 gatevm.settings=1"
        );
        // What the host writes is what the guest reads.
        let (c, warnings) = parse(&kernel_cmdline("vm-1", PayloadKind::None, 9000, false));
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            (c.hostname.as_str(), c.payload, c.mtu),
            ("vm-1", PayloadKind::None, Some(9000))
        );
    }
}
