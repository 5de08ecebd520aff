//! Stage 2: PID 1 in the real root. Order matters for boot time: API mounts, then the agent
//! (so the host can talk as early as possible), then the modules network and disk need, network,
//! state disk (the modules the payload needs load in the background meanwhile), and finally the
//! payloads (containerd; in the k3s profile containerd and then k3s, see [`crate::profile`]) while
//! the modules containers' networks need are still loading.

use crate::agent::{self, Agent, AgentHost, AgentInfo};
use crate::cmdline::{self, AgentTransport, Cmdline, PayloadKind};
use crate::disk;
use crate::modules;
use crate::mounts;
use crate::net;
use crate::payload::Payload;
use crate::profile::Profile;
use crate::reaper::Reaper;
use crate::shutdown;
use crate::sys;
use gatevm_abi::PayloadStatus;
use gatevm_kernel::kmod::ModuleIndex;
use nix::sys::signal::SigSet;
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::Duration;

/// The running guest, as the agent and the signal handler see it.
pub(crate) struct System {
    /// The payloads in start order: none (`gatevm.payload=none`), containerd, or containerd
    /// and k3s.
    payloads: Vec<Arc<Payload>>,
    reaper: &'static Reaper,
}

impl AgentHost for System {
    fn payloads(&self) -> Vec<PayloadStatus> {
        self.payloads.iter().map(|p| p.status()).collect()
    }

    fn shutdown(&self) {
        shutdown::run(&self.payloads, self.reaper, "host request")
    }
}

fn report(what: &str, problems: &[String]) {
    for p in problems.iter().take(4) {
        crate::glog!("{what}: {p}");
    }
    if problems.len() > 4 {
        crate::glog!("{what}: {} more problems", problems.len() - 4);
    }
}

fn spawn_named(name: &str, f: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new().name(name.into()).spawn(f) {
        crate::glog!("cannot start thread {name}: {e}");
    }
}

fn load_report(what: &str, r: &modules::Report) -> String {
    let mut s = format!("{what}: {} loaded", r.loaded);
    if !r.missing.is_empty() {
        s.push_str(&format!(", not in this kernel: {}", r.missing.join(" ")));
    }
    if !r.failed.is_empty() {
        s.push_str(&format!(", failed: {}", r.failed.join("; ")));
    }
    s
}

/// Configures loopback, the hostname's /etc/hosts line and the guest's link, and logs the outcome.
fn setup_network(on: bool, hostname: &str, mtu: Option<u32>) {
    let cluster = crate::settings::get().cluster.as_ref().map(|c| c.ip);
    let (configured, problems) = net::setup(on, hostname, mtu, cluster);
    report("net", &problems);
    if configured {
        crate::glog!("network configured ({} on {})", net::GUEST_ADDR, net::IFACE);
    }
    if let Some(ip) = cluster {
        crate::glog!(
            "cluster network: {ip} on {}",
            gatevm_abi::net::CLUSTER_IFACE
        );
    }
}

fn join(thread: Option<std::thread::JoinHandle<()>>) {
    if let Some(t) = thread {
        let _ = t.join();
    }
}

/// Starts the threads that turn SIGTERM, SIGINT and SIGPWR into a shutdown and that serve the
/// host's agent protocol.
fn spawn_signals_and_agent(system: &Arc<System>, signals: SigSet, transport: AgentTransport) {
    let for_signals = system.clone();
    spawn_named("signals", move || loop {
        if let Ok(sig) = signals.wait() {
            let why = format!("{sig:?}");
            shutdown::run(&for_signals.payloads, for_signals.reaper, &why);
        }
    });
    let agent = Agent::new(system.clone(), system.reaper, AgentInfo::current());
    spawn_named("agent", move || match transport {
        AgentTransport::Serial => agent::run_serial(&agent),
        AgentTransport::Vsock => agent::run_vsock(&agent),
    });
}

/// Loads the modules network and disk need now and starts a thread that loads the rest; the
/// receiver hears when the modules the payload needs at its start are loaded (or gives up when
/// there are none to load).
fn load_modules(payload: PayloadKind, transport: AgentTransport) -> Receiver<()> {
    // Modules: the ones network and disk need in the foreground, the rest in a background
    // thread while network and disk are set up: first what the payload needs at its start
    // (containerd: overlay), then, while containerd starts, what containers' networks need
    // (see [`modules::background`]). Measured under QEMU TCG with 2 vCPUs over 6 alternating
    // boots each: containerd ready at a median 5.0 s this way, 5.65 s when it waited for every
    // module.
    let batches = modules::background(
        payload == PayloadKind::K3s,
        transport == AgentTransport::Vsock,
    );
    let tree = modules::running_tree();
    let index = tree.as_ref().map(|t| (t.clone(), ModuleIndex::load(t)));
    let (modules_tx, modules_rx) = channel::<()>();
    match index {
        Some((tree, Ok(index))) => {
            let r = modules::load(&index, &tree, modules::EARLY);
            if r.loaded > 0 || !r.failed.is_empty() {
                crate::glog!("{}", load_report("modules (early)", &r));
            }
            spawn_named("modules", move || {
                let r = modules::load(&index, &tree, &batches.first);
                crate::glog!("{}", load_report("modules", &r));
                let _ = modules_tx.send(());
                if !batches.rest.is_empty() {
                    let r = modules::load(&index, &tree, &batches.rest);
                    crate::glog!("{}", load_report("modules (networks)", &r));
                }
                modules::mark_loaded();
            });
        }
        Some((tree, Err(e))) => {
            crate::glog!(
                "modules: {} (module tree {})",
                crate::log::error_chain(&e),
                tree.display()
            );
            modules::mark_loaded();
            drop(modules_tx);
        }
        None => {
            modules::mark_loaded();
            drop(modules_tx);
        }
    }
    modules_rx
}

/// Starts setting the network up in a thread (in the foreground when no thread can start);
/// join the handle to wait for it.
fn start_network(cmd: &Cmdline) -> Option<std::thread::JoinHandle<()>> {
    let (on, hostname, mtu) = (cmd.net, cmd.hostname.clone(), cmd.mtu);
    std::thread::Builder::new()
        .name("net".into())
        .spawn(move || setup_network(on, &hostname, mtu))
        .map_err(|e| {
            crate::glog!("cannot start thread net ({e}): setting the network up first");
            setup_network(cmd.net, &cmd.hostname, cmd.mtu)
        })
        .ok()
}

/// Runs stage 2; never returns.
pub(crate) fn run() -> ! {
    sys::fix_stdio();
    let signals = sys::block_shutdown_signals();
    std::panic::set_hook(Box::new(|info| {
        crate::glog!("panic: {info}");
    }));
    // Ctrl-Alt-Del becomes SIGINT to PID 1 instead of an immediate reboot.
    let _ = nix::sys::reboot::set_cad_enabled(false);
    crate::glog!("{} starting as PID 1", crate::software());

    report("mount", &mounts::setup_stage2());
    let (cmd, warnings) = cmdline::read();
    report("cmdline", &warnings);
    if cmd.krun {
        sys::end_by_reboot();
    }
    if let Err(e) = nix::unistd::sethostname(&cmd.hostname) {
        crate::glog!("sethostname {}: {e}", cmd.hostname);
    }

    let reaper = Reaper::global();
    // The host's settings (shares, registries, proxies) before anything uses them.
    if let Err(e) = crate::settings::load(cmd.settings) {
        crate::glog!("FATAL: {e}");
        shutdown::run(&[], reaper, "the host's settings cannot be read");
    }
    // The k3s profile reads its plan and writes containerd's configuration now, so a missing
    // plan or binary shows in the very first status.
    let mut profile = Profile::load(cmd.payload);
    let payloads = profile.payloads();
    let system = Arc::new(System {
        payloads: payloads.clone(),
        reaper,
    });

    spawn_signals_and_agent(&system, signals, cmd.agent);
    let modules_rx = load_modules(cmd.payload, cmd.agent);
    // The network is set up beside the state disk: containerd needs only the disk, so in the
    // containerd profile it starts before the network is waited for (containers' networks wait
    // for the modules marker, which comes much later). k3s binds the guest address: for it the
    // network is done before it starts.
    let mut network = start_network(&cmd);
    // A throwaway VM (no payload) has no state disk and keeps nothing.
    if cmd.payload.runs_anything() {
        let (backing, problems) = disk::setup(reaper);
        report("disk", &problems);
        crate::glog!("state: {backing:?}");
    }
    // Shares and registry settings before any payload could use them: a container must never
    // write into the guest's directory where the user's share should be.
    if let Err(e) = crate::settings::apply(cmd.payload == PayloadKind::K3s) {
        crate::glog!("FATAL: {e}");
        shutdown::run(&[], reaper, "a share or registry setting failed");
    }
    // k3s's data directory is on the state disk.
    if profile.needs_network_before_start() {
        join(network.take());
    }
    profile.prepare();

    let _ = modules_rx.recv_timeout(Duration::from_secs(20));
    if !payloads.is_empty() {
        if !mounts::mount_points().iter().any(|p| p == "/dev/mqueue") {
            crate::glog!("warning: no /dev/mqueue (POSIX mqueue), runc may fail");
        }
        if !shutdown::in_progress() {
            profile.start(reaper);
        }
    }
    join(network.take());
    crate::glog!("boot complete");
    loop {
        std::thread::park();
    }
}
