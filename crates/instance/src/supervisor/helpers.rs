//! The helper the VM needs: the network helper, gvproxy (behind the frame filter, restarted when
//! it loses its ssh port) or passt, and the shares' file servers (virtiofsd, one per `-v`; the
//! root is a set of disks, no virtiofsd serves it).

use super::children::{
    helper_exited_during_boot, keep_when_listening, spawn_owned, wait_socket, OwnedChild, SpawnSpec,
};
use super::{io_err, RunningInstance, SupervisorError};
use crate::backend::VmmBackend;
use crate::config::NetBackend;
use crate::paths::InstancePaths;
use gatevm_net::confine::HelperConfine;
use gatevm_net::filter::{self, FilterStats};
use gatevm_net::gvproxy::{self, GvproxyConfig};
use gatevm_net::loopback::LoopbackGuard;
use gatevm_net::passt::{PasstAttach, PasstConfig};
use gatevm_vmm::NetAttach;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::Command;

/// How many times gvproxy is started when another process takes its ssh port first.
const GVPROXY_ATTEMPTS: u32 = 4;

/// The guest's network as the VM gets it.
pub(crate) struct Network {
    /// How the VMM attaches its network device.
    pub(crate) attach: NetAttach,
    /// gvproxy's configuration (its forwards go in through its API), None for passt.
    pub(crate) gvproxy: Option<GvproxyConfig>,
    /// The VM's end of a connected pair, held until the VM has inherited it.
    pub(crate) vm_end: Option<UnixStream>,
}

/// Starts the network helper. Unless the user allows it, it runs where it cannot reach the host's
/// loopback (gvproxy NATs 192.168.127.254 there; passt maps the gateway there without
/// --no-map-gw, which it then gets as well). gvproxy runs in the loopback guard; passt too where
/// the guard can be attached (as root), a second wall beside --no-map-gw
/// ([`crate::backend::net_guarded`]).
pub(crate) async fn start_network(
    inst: &RunningInstance,
    runtime: &gatevm_runtime::Runtime,
    backend: &VmmBackend,
    mtu: u32,
    children: &mut Vec<OwnedChild>,
) -> Result<Network, SupervisorError> {
    let cfg = &inst.config;
    let can_guard = || match LoopbackGuard::probe() {
        Ok(()) => true,
        Err(e) => {
            tracing::info!("passt runs without the loopback guard (--no-map-gw keeps the guest off the host's loopback): {e}");
            false
        }
    };
    let guard = if crate::backend::net_guarded(cfg.net, cfg.allow_host_loopback, can_guard) {
        Some(LoopbackGuard::create(&cfg.name).map_err(|e| SupervisorError::Setup(e.to_string()))?)
    } else {
        None
    };
    // The network helper's own directory (its sockets; the only place a confined gvproxy may
    // write).
    let net_dir = inst.paths.net_dir();
    let _ = std::fs::remove_dir_all(&net_dir);
    crate::paths::mkdir_private(&net_dir)
        .map_err(io_err(format!("creating {}", net_dir.display())))?;
    match cfg.net {
        NetBackend::Gvproxy => start_gvproxy(inst, runtime, guard, mtu, &net_dir, children).await,
        NetBackend::Passt => {
            // QEMU: vhost-user on the instance's network socket. libkrun: a connected pair,
            // passt's end inherited by passt, the VM's by the VM.
            let vhost_user = matches!(backend, VmmBackend::Qemu(_));
            start_passt(inst, runtime, guard, mtu, vhost_user, children).await
        }
    }
}

/// Starts gvproxy (confined) and puts the frame filter between it and the VM.
async fn start_gvproxy(
    inst: &RunningInstance,
    runtime: &gatevm_runtime::Runtime,
    guard: Option<LoopbackGuard>,
    mtu: u32,
    net_dir: &Path,
    children: &mut Vec<OwnedChild>,
) -> Result<Network, SupervisorError> {
    let (mut gvp, gv) =
        spawn_gvproxy_retrying(inst, runtime, guard, mtu, net_dir, children).await?;
    inst.set_state(|s| s.helpers.push(("gvproxy".to_string(), gvp.id)));
    // The VM does not talk to gvproxy directly: its frames pass the filter that keeps the guest
    // away from gvproxy's API (gatevm_net::filter).
    let connected = connect_helper_retrying(
        &mut gvp,
        &inst.paths,
        &inst.paths.net_socket(),
        Duration::from_secs(5),
    )
    .await;
    // Among the children either way, so a failure still tears it down.
    children.push(gvp);
    let helper = connected?;
    let (vm_end, relay_end) =
        UnixStream::pair().map_err(io_err("creating the network socket pair"))?;
    filter::spawn_relay(relay_end, helper, Arc::new(FilterStats::default()))
        .map_err(io_err("starting the network filter"))?;
    Ok(Network {
        attach: NetAttach::Fd(vm_end.as_raw_fd()),
        gvproxy: Some(gv),
        vm_end: Some(vm_end),
    })
}

/// Starts gvproxy until it listens. gvproxy insists on a host port for its ssh forward (removed
/// once it runs). The port is free when chosen, but another process (another instance starting at
/// the same moment) can take it before gvproxy binds it: then gvproxy exits at once, and it is
/// started again with another port.
async fn spawn_gvproxy_retrying(
    inst: &RunningInstance,
    runtime: &gatevm_runtime::Runtime,
    guard: Option<LoopbackGuard>,
    mtu: u32,
    net_dir: &Path,
    children: &mut Vec<OwnedChild>,
) -> Result<(OwnedChild, GvproxyConfig), SupervisorError> {
    let gv_log = inst.paths.log("gvproxy");
    let mut attempt = 1;
    loop {
        let (mut gvp, gv) = spawn_gvproxy(inst, runtime, guard.clone(), mtu, net_dir, &gv_log)?;
        let waited = wait_socket(
            &inst.paths.net_socket(),
            &mut gvp,
            &gv_log,
            Duration::from_secs(10),
        )
        .await;
        match waited {
            Ok(()) => return Ok((gvp, gv)),
            Err(e) if attempt < GVPROXY_ATTEMPTS && lost_port(&e, gv.ssh_port) => {
                tracing::info!(
                    "gvproxy lost its ssh port {} to another process: {e}",
                    gv.ssh_port
                );
                gvp.terminate(Duration::from_secs(1)).await;
                attempt += 1;
            }
            Err(e) => {
                children.push(gvp);
                return Err(e);
            }
        }
    }
}

/// Starts gvproxy once, confined (see gatevm_net::confine): its own directory is the only place
/// it may create or remove files, it binds only the forwarded TCP ports (and its ssh port,
/// removed once it runs), and as root it runs as `nobody`, reaching its directory and binary
/// through descriptors.
fn spawn_gvproxy(
    inst: &RunningInstance,
    runtime: &gatevm_runtime::Runtime,
    guard: Option<LoopbackGuard>,
    mtu: u32,
    net_dir: &Path,
    gv_log: &Path,
) -> Result<(OwnedChild, GvproxyConfig), SupervisorError> {
    let forwards = crate::config::all_forwards(&inst.config);
    let ssh_port = gvproxy::free_ssh_port().map_err(io_err("finding a port for gvproxy"))?;
    let mut ports: Vec<u16> = forwards
        .iter()
        .filter(|f| f.proto == gatevm_net::Proto::Tcp)
        .map(|f| f.host_port)
        .collect();
    ports.push(ssh_port);
    let confine = HelperConfine::new(net_dir, &ports)
        .and_then(|c| c.with_program(&runtime.gvproxy()))
        .map_err(|e| SupervisorError::Setup(format!("confining gvproxy: {e}")))?;
    let inside = confine.dir_path();
    let gv = GvproxyConfig {
        api_socket: PathBuf::from(format!("{inside}/netapi.sock")),
        vm_socket: PathBuf::from(format!("{inside}/net.sock")),
        ssh_port,
        mtu,
    };
    let program = confine
        .program()
        .map(PathBuf::from)
        .unwrap_or_else(|| runtime.gvproxy());
    let policy = confine.describe();
    tracing::info!("gvproxy confinement: {policy}");
    inst.set_state(|s| {
        s.policies.retain(|(r, _)| r != "gvproxy");
        s.policies.push(("gvproxy".to_string(), policy));
    });
    let mut gv_cmd = Command::new(program);
    // Run through a descriptor, named as itself (ps, and whoever looks for it).
    gv_cmd.arg0(runtime.gvproxy()).args(gv.args());
    let spec = SpawnSpec {
        guard,
        confine: Some(Arc::new(confine)),
        ..SpawnSpec::plain(gv_log, &inst.paths.run)
    };
    let gvp = spawn_owned("gvproxy", gv_cmd, spec)?;
    Ok((gvp, gv))
}

/// Whether gvproxy failed because `port` was taken between choosing and binding it.
fn lost_port(e: &SupervisorError, port: u16) -> bool {
    let text = e.to_string();
    text.contains(&format!(":{port}: bind: address already in use"))
}

/// Starts passt: on vhost-user (QEMU), waiting for its socket, or on a connected pair (libkrun).
async fn start_passt(
    inst: &RunningInstance,
    runtime: &gatevm_runtime::Runtime,
    guard: Option<LoopbackGuard>,
    mtu: u32,
    vhost_user: bool,
    children: &mut Vec<OwnedChild>,
) -> Result<Network, SupervisorError> {
    let (paths, cfg) = (&inst.paths, &inst.config);
    let pair = if vhost_user {
        None
    } else {
        Some(UnixStream::pair().map_err(io_err("creating the network socket pair"))?)
    };
    let attach = match &pair {
        Some((_, passt_end)) => PasstAttach::Fd(passt_end.as_raw_fd()),
        None => {
            let _ = std::fs::remove_file(paths.net_socket());
            PasstAttach::VhostUser(paths.net_socket())
        }
    };
    let pc = PasstConfig {
        attach,
        forwards: crate::config::all_forwards(cfg),
        allow_host_loopback: cfg.allow_host_loopback,
        mtu,
    };
    let args = pc
        .args()
        .map_err(|e| SupervisorError::Setup(e.to_string()))?;
    let bin = runtime.passt();
    if !bin.is_file() {
        return Err(SupervisorError::Setup(format!(
            "--net passt: {} is missing: run `gatevm setup` (it builds passt)",
            bin.display()
        )));
    }
    // A socket file left by an earlier run would look like passt's own before passt binds it.
    if pair.is_none() {
        let _ = std::fs::remove_file(paths.net_socket());
    }
    let mut p_cmd = Command::new(bin);
    p_cmd.args(args);
    let p_log = paths.log("passt");
    let spec = SpawnSpec {
        guard,
        inherit: pair
            .as_ref()
            .map(|(_, passt_end)| passt_end.as_raw_fd())
            .into_iter()
            .collect(),
        ..SpawnSpec::plain(&p_log, &paths.run)
    };
    let passt = spawn_owned("passt", p_cmd, spec)?;
    inst.set_state(|s| s.helpers.push(("passt".to_string(), passt.id)));
    match pair {
        Some((vm_end, passt_end)) => {
            drop(passt_end);
            children.push(passt);
            Ok(Network {
                attach: NetAttach::Fd(vm_end.as_raw_fd()),
                gvproxy: None,
                vm_end: Some(vm_end),
            })
        }
        None => {
            keep_when_listening(passt, &paths.net_socket(), &p_log, children).await?;
            Ok(Network {
                attach: NetAttach::VhostUser(paths.net_socket()),
                gvproxy: None,
                vm_end: None,
            })
        }
    }
}

/// Starts one virtiofsd per share (QEMU; libkrun serves shares itself), each on a listening
/// socket gatevm binds and hands over (`--fd`), so QEMU can connect at once and no socket can be
/// taken over meanwhile. virtiofsd runs in its namespace sandbox (its own mount, PID and network
/// namespaces, the share as its root: a guest cannot name a file outside it), read-only shares
/// with `--readonly` (the server refuses writes), under a seccomp filter that makes no
/// set-user-ID or set-group-ID file ([`super::seccomp`]), and, when gatevm runs as root, as the
/// share's owner ([`crate::volume::server_identity`]).
pub(crate) fn start_file_servers(
    inst: &RunningInstance,
    runtime: &gatevm_runtime::Runtime,
    backend: &VmmBackend,
    children: &mut Vec<OwnedChild>,
) -> Result<Vec<gatevm_vmm::Share>, SupervisorError> {
    let (paths, cfg) = (&inst.paths, &inst.config);
    let qemu = matches!(backend, VmmBackend::Qemu(_));
    let mut shares = Vec::new();
    if qemu && !cfg.volumes.is_empty() {
        let dir = paths.fs_dir();
        let _ = std::fs::remove_dir_all(&dir);
        crate::paths::mkdir_private(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let no_setid = Arc::new(super::seccomp::no_setid_program());
    let host = crate::volume::HostView::current();
    for (i, v) in cfg.volumes.iter().enumerate() {
        // Checked again right before it is served: since the start's own check a path on the way
        // may have been replaced (by another instance's guest writing in a share that holds this
        // one, say) with a symlink to somewhere else.
        crate::volume::recheck(v, &host).map_err(|e| SupervisorError::Setup(e.to_string()))?;
        let tag = gatevm_abi::settings::volume_tag(i);
        let mut share = gatevm_vmm::Share {
            tag: tag.clone(),
            host_dir: v.host.clone(),
            read_only: v.read_only,
            socket: None,
        };
        if qemu {
            let sock = paths.fs_socket(i);
            let listener = std::os::unix::net::UnixListener::bind(&sock)
                .map_err(io_err(format!("binding {}", sock.display())))?;
            let identity = crate::volume::server_identity(v, euid)
                .map_err(io_err(format!("reading {}", v.host.display())))?;
            let bin = runtime.virtiofsd();
            // Run as the share's owner, who may not reach the runtime's directory: the binary
            // is executed through a descriptor opened here (named as itself).
            let exe = match identity {
                Some(_) => Some(
                    std::fs::File::options()
                        .read(true)
                        .custom_flags(libc::O_PATH)
                        .open(&bin)
                        .map(std::os::fd::OwnedFd::from)
                        .map_err(io_err(format!("opening {}", bin.display())))?,
                ),
                None => None,
            };
            let mut c = match &exe {
                Some(fd) => {
                    let mut c = Command::new(format!("/proc/self/fd/{}", fd.as_raw_fd()));
                    c.arg0(&bin);
                    c
                }
                None => Command::new(&bin),
            };
            c.arg(format!("--fd={}", listener.as_raw_fd()))
                .arg("--shared-dir")
                .arg(&v.host)
                .args(["--sandbox=namespace", "--cache=auto", "--log-level=warn"]);
            if v.read_only {
                c.arg("--readonly");
            }
            let log = paths.log(&format!("virtiofsd-vol{i}"));
            let spec = SpawnSpec {
                inherit: std::iter::once(listener.as_raw_fd())
                    .chain(exe.as_ref().map(|f| f.as_raw_fd()))
                    .collect(),
                run_as: identity,
                seccomp: Some(no_setid.clone()),
                ..SpawnSpec::plain(&log, &paths.run)
            };
            let child = spawn_owned("virtiofsd", c, spec)?;
            tracing::info!(
                "share {tag}: {} -> {}{} (virtiofsd pid {}{})",
                v.host.display(),
                v.guest,
                if v.read_only { ", read-only" } else { "" },
                child.id.pid,
                match identity {
                    Some((u, g)) => format!(", as {u}:{g}"),
                    None => String::new(),
                }
            );
            inst.set_state(|s| s.helpers.push((format!("virtiofsd-vol{i}"), child.id)));
            children.push(child);
            // virtiofsd has its copies of the listener and its binary.
            drop(listener);
            drop(exe);
            share.socket = Some(sock);
        }
        shares.push(share);
    }
    Ok(shares)
}

/// Connects to a helper's socket (a blocking socket, for a relay thread), retrying while the
/// helper is not listening yet; a helper that exits meanwhile ends the wait at once, named as the
/// cause.
async fn connect_helper_retrying(
    helper: &mut OwnedChild,
    paths: &InstancePaths,
    p: &Path,
    within: Duration,
) -> Result<UnixStream, SupervisorError> {
    let start = Instant::now();
    loop {
        match UnixStream::connect(p) {
            Ok(s) => return Ok(s),
            Err(e) => {
                if let Ok(Some(st)) = helper.child.try_wait() {
                    return Err(helper_exited_during_boot(paths, helper.name, Ok(st)));
                }
                if start.elapsed() >= within {
                    return Err(io_err(format!("connecting to {}'s VM socket", helper.name))(e));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{lost_port, SupervisorError};

    #[test]
    fn a_lost_ssh_port_is_told_from_other_failures() {
        let e = SupervisorError::Boot(
            "gvproxy exited (exit status: 0) before creating /run/gatevm/a/net.sock: level=error \
             msg=\"gvproxy exiting: cannot add network services: listen tcp 127.0.0.1:42485: \
             bind: address already in use\""
                .into(),
        );
        assert!(lost_port(&e, 42485));
        assert!(!lost_port(&e, 4248));
        assert!(!lost_port(&e, 42486));
        let other = SupervisorError::Boot("gvproxy did not create /run/x in time".into());
        assert!(!lost_port(&other, 42485));
    }
}
