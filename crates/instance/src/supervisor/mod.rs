//! The supervisor: one host process per running instance.
//!
//! It holds the instance lock for its whole life, owns the VMM process and the network helper
//! (gvproxy or passt), the agent channel and the control socket, and records the instance state. Its children
//! get `PR_SET_PDEATHSIG(SIGKILL)`, so they die with it even when it is SIGKILLed; they are spawned
//! from the runtime's only thread (the death signal follows the spawning thread).
//!
//! When the helper dies, the supervisor stops the VM and records why: a guest without its network
//! is not the appliance the user started (and passt's vhost-user connection cannot be remade under
//! a running guest). The next `start` begins from a clean slate.
//!
//! [`run`] is the entry; [`boot`] holds the steps of a start, [`helpers`] the network
//! helper, [`children`] the owned processes, [`control`] the control socket and the
//! exec relay, [`state`] the state file and [`mounts`] the instance's disks.

mod boot;
mod children;
mod cluster;
mod control;
mod helpers;
pub mod mounts;
mod seccomp;
pub mod state;

pub use crate::control::Progress;
pub use children::INSTANCE_ENV;

use crate::agent::Agent;
use crate::config::InstanceConfig;
use crate::control::InstanceStatus;
use crate::lock::{try_lock, InstanceLock};
use crate::paths::{write_atomic, InstancePaths};
use crate::state::{now_ms, Phase, ProcId, StateFile};
use children::OwnedChild;
use gatevm_abi::PayloadState;
use gatevm_net::loopback;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How long the guest may take from VM start to the agent answering.
const AGENT_TIMEOUT: Duration = Duration::from_secs(90);
/// How long the guest may take to answer an exec request with "started" or "failed".
const EXEC_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a VM may run without writing a byte on its console before the boot counts as
/// stalled: the guest kernel prints within a second or two even under software emulation on a
/// busy host, so silence this long means the VMM hung before the guest ran (seen once in CI with
/// QEMU and passt's vhost-user back end: 90 s without a byte). Such a boot is tried once more.
const VMM_SILENCE: Duration = Duration::from_secs(30);
/// How long the payload may take after the agent answered.
const PAYLOAD_TIMEOUT: Duration = Duration::from_secs(90);

/// Where the supervisor reports the steps of a start.
pub type ProgressSink = Box<dyn FnMut(Progress) + Send>;

/// Errors of the supervisor.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("instance {0:?} is already running")]
    AlreadyRunning(String),
    #[error("{0}")]
    Setup(String),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Boot(String),
    /// The VMM runs but the guest never wrote on its console (see [`VMM_SILENCE`]).
    #[error("{0}")]
    Stalled(String),
    /// A stop was asked for while the guest was booting (not a failure of the VM).
    #[error("{0}")]
    StoppedDuringBoot(String),
    /// The guest agent could not be put in the instance root.
    #[error("installing gatevm-guest at {}", gatevm_abi::paths::GUEST_AGENT)]
    InstallGuest(#[source] crate::rootdir::RootDirError),
    /// The k3s profile could not be staged in the root.
    #[error("preparing k3s")]
    K3sStage(#[source] crate::k3s::stage::StageError),
    /// gvproxy refused a port forward.
    #[error("port forward failed")]
    Forward(#[source] gatevm_net::gvproxy::ApiError),
    /// The task putting the forwards in failed.
    #[error("port forward task failed")]
    ForwardTask(#[source] tokio::task::JoinError),
    /// A frame could not be queued for the guest agent.
    #[error(transparent)]
    Agent(#[from] crate::agent::SendError),
}

/// Maps an I/O error to [`SupervisorError::Io`] naming `what` failed.
fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SupervisorError {
    let what = what.into();
    move |source| SupervisorError::Io { what, source }
}

/// What the supervisor needs to run an instance.
pub struct SuperviseOptions {
    pub config: InstanceConfig,
    /// The gatevm-guest binary installed into the guest root and initramfs.
    pub guest_bin: PathBuf,
    /// SIGTERM and SIGINT stop the instance gracefully. Off for `vm-run`, whose client forwards
    /// them to the command in the guest and stops the VM when the command ends.
    pub handle_signals: bool,
}

/// Runs an instance until it stops. Blocks; builds its own single-threaded runtime.
pub fn run(opts: SuperviseOptions, progress: ProgressSink) -> Result<(), SupervisorError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_err("building the async runtime"))?;
    rt.block_on(supervise(opts, progress))
}

/// A task aborted when this is dropped.
pub(crate) struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A running instance as its supervisor's tasks share it: configuration, recorded state, the
/// agent once connected, and the way to ask for a stop.
pub(crate) struct RunningInstance {
    pub(crate) paths: InstancePaths,
    pub(crate) config: InstanceConfig,
    state: Mutex<StateFile>,
    agent: Mutex<Option<Agent>>,
    /// A stop request, with its timeout in seconds.
    pub(crate) stop_tx: mpsc::Sender<u64>,
    /// This attempt boots krun because `--vmm auto` took it (a failure before the agent answers
    /// then falls back to QEMU).
    pub(crate) krun_by_auto: std::sync::atomic::AtomicBool,
    /// Why krun failed in this start: the next attempt uses QEMU.
    pub(crate) krun_failed: Mutex<Option<String>>,
}

impl RunningInstance {
    /// Changes the recorded state and writes the state file.
    pub(crate) fn set_state(&self, f: impl FnOnce(&mut StateFile)) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
        state::write_state(&self.paths, &s);
    }

    /// The agent, once connected.
    pub(crate) fn agent(&self) -> Option<Agent> {
        self.agent.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records the connected agent.
    pub(crate) fn set_agent(&self, agent: Agent) {
        *self.agent.lock().unwrap_or_else(|p| p.into_inner()) = Some(agent);
    }

    /// The status document, with a fresh answer from the guest when it is up.
    pub(crate) async fn status(&self) -> InstanceStatus {
        let agent = self.agent();
        let responding = match &agent {
            Some(a) => a.refresh_status(Duration::from_secs(2)).await,
            None => false,
        };
        let mut view = agent.map(|a| a.view()).unwrap_or_default();
        view.agent.responding = responding;
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let payload_ready = payloads_ready(&self.config, &view.payloads);
        InstanceStatus {
            name: self.config.name.clone(),
            state: state::phase_name(s.phase).into(),
            healthy: s.phase == Phase::Running && responding && payload_ready,
            backend: s.backend.clone(),
            backend_note: s.backend_note.clone(),
            net: self.config.net.name().into(),
            kernel: s.kernel.clone(),
            ephemeral: self.config.ephemeral.is_some(),
            k3s: None,
            cpus: self.config.cpus,
            memory_mib: self.config.memory_mib,
            forwards: crate::config::all_forwards(&self.config)
                .iter()
                .map(|f| f.to_string())
                .collect(),
            supervisor_pid: s.supervisor.map(|p| p.pid),
            vm_pid: s.vmm.map(|p| p.pid),
            agent: view.agent,
            payloads: view.payloads,
            started_at_ms: s.started_at_ms,
            agent_ready_ms: s.agent_ready_ms,
            ready_ms: s.ready_ms,
            stop_reason: s.stop_reason.clone(),
            last_error: s.last_error.clone(),
            logs: self.paths.logs().display().to_string(),
            processes: state::process_reports(&s),
            containerd_socket: (s.phase == Phase::Running && self.config.ephemeral.is_none())
                .then(|| self.paths.containerd_socket().display().to_string()),
            volumes: vec![],
            registries: vec![],
            proxy_env: vec![],
            role: None,
            cluster_server: None,
        }
        .with_settings(&self.config)
    }
}

/// Whether the payloads the instance runs are all ready (a throwaway VM runs none).
fn payloads_ready(cfg: &InstanceConfig, payloads: &[gatevm_abi::PayloadStatus]) -> bool {
    if cfg.ephemeral.is_some() {
        return payloads.iter().all(|p| p.state == PayloadState::Ready);
    }
    !payloads.is_empty() && payloads.iter().all(|p| p.state == PayloadState::Ready)
}

/// Takes the instance lock and runs the instance under it; a failure is reported as progress too.
async fn supervise(
    opts: SuperviseOptions,
    mut progress: ProgressSink,
) -> Result<(), SupervisorError> {
    let name = opts.config.name.clone();
    let paths = InstancePaths::new(&name);
    paths.create_dirs().map_err(io_err(format!(
        "creating the directories of instance {name:?}"
    )))?;
    let Some(lock) = take_lock(&paths).await? else {
        let e = SupervisorError::AlreadyRunning(name);
        progress(Progress::Failed {
            message: gatevm_abi::error_chain(&e),
        });
        return Err(e);
    };
    let result = supervise_locked(&opts, &paths, &lock, &mut progress).await;
    if let Err(e) = &result {
        progress(Progress::Failed {
            message: gatevm_abi::error_chain(e),
        });
    }
    drop(lock);
    result
}

/// Takes the instance lock; None when another supervisor holds it. Clients probe the lock by
/// taking it for a moment (and clean up after a dead supervisor under it), so a free lock can
/// look taken briefly: this retries for a little while.
async fn take_lock(paths: &InstancePaths) -> Result<Option<InstanceLock>, SupervisorError> {
    let name = &paths.name;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let taken = match try_lock(&paths.lock()) {
            // The instance was deleted meanwhile: this start makes it anew.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && Instant::now() < deadline => {
                paths.create_dirs().map_err(io_err(format!(
                    "creating the directories of instance {name:?}"
                )))?;
                continue;
            }
            other => other.map_err(io_err("taking the instance lock"))?,
        };
        match taken {
            Some(l) => return Ok(Some(l)),
            None if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            None => return Ok(None),
        }
    }
}

/// Runs the instance under its lock: clears what an earlier run left, boots and serves, and tears
/// everything down on every path.
async fn supervise_locked(
    opts: &SuperviseOptions,
    paths: &InstancePaths,
    _lock: &InstanceLock,
    progress: &mut ProgressSink,
) -> Result<(), SupervisorError> {
    let t0 = Instant::now();
    state::recover_stale(paths);
    let cfg_bytes = serde_json::to_vec_pretty(&opts.config)
        .map_err(|e| SupervisorError::Setup(e.to_string()))?;
    write_atomic(&paths.config(), &cfg_bytes).map_err(io_err("writing the instance config"))?;

    let (stop_tx, mut stop_rx) = mpsc::channel::<u64>(4);
    let mut initial = StateFile::stopped(None);
    initial.phase = Phase::Starting;
    initial.supervisor = ProcId::of(std::process::id());
    initial.started_at_ms = Some(now_ms());
    let inst = Arc::new(RunningInstance {
        paths: paths.clone(),
        config: opts.config.clone(),
        state: Mutex::new(initial),
        agent: Mutex::new(None),
        stop_tx,
        krun_by_auto: std::sync::atomic::AtomicBool::new(false),
        krun_failed: Mutex::new(None),
    });
    inst.set_state(|_| {});
    let _signals = if opts.handle_signals {
        Some(stop_on_signals(inst.stop_tx.clone())?)
    } else {
        None
    };

    let mut children: Vec<OwnedChild> = Vec::new();
    let mut outcome =
        boot::boot_and_serve(opts, &inst, &mut children, &mut stop_rx, progress, t0).await;
    if let Err(SupervisorError::Stalled(why)) = &outcome {
        // A VMM that hung before the guest ran has touched nothing of the guest's: start the VM
        // and its helpers once more.
        tracing::warn!("{why}: starting the VM once more");
        progress(Progress::Notice {
            message: format!("{why}: starting the VM once more"),
        });
        clear_attempt(&inst, &mut children).await;
        outcome = boot::boot_and_serve(opts, &inst, &mut children, &mut stop_rx, progress, t0)
            .await
            .map_err(|e| match e {
                SupervisorError::Stalled(why) => SupervisorError::Stalled(format!("{why} (twice)")),
                e => e,
            });
    }
    if let Err(e) = &outcome {
        let before_agent =
            inst.state.lock().unwrap_or_else(|p| p.into_inner()).phase != Phase::Running;
        // Only the krun VM's own failure counts: not the user's stop, and not a step before the
        // VM was spawned (krun_by_auto is set just before the spawn).
        let vm_failed = !matches!(e, SupervisorError::StoppedDuringBoot(_));
        if before_agent && vm_failed && inst.krun_by_auto.load(std::sync::atomic::Ordering::SeqCst)
        {
            // `auto` must not strand the user on a path never proven here: say why in one
            // line, remember it, and boot the same instance with QEMU.
            let why = gatevm_abi::error_chain(e);
            let file = crate::backend::krun_failure_file();
            let runtime = gatevm_runtime::Runtime::load().ok();
            if let (Some(file), Some(rt)) = (file, runtime) {
                let failure = crate::backend::KrunFailure {
                    runtime: crate::backend::runtime_identity(&rt.libkrunfw()),
                    reason: why.clone(),
                    at_ms: now_ms(),
                };
                if let Err(err) = crate::backend::remember_krun_failure(&file, &failure) {
                    tracing::warn!(
                        "cannot remember the krun failure in {}: {err}",
                        file.display()
                    );
                }
            }
            let message = format!(
                "krun could not boot the guest ({why}); booting it with QEMU instead (remembered \
                 until the runtime changes)"
            );
            tracing::warn!("{message}");
            progress(Progress::Notice { message });
            clear_attempt(&inst, &mut children).await;
            inst.krun_by_auto
                .store(false, std::sync::atomic::Ordering::SeqCst);
            *inst.krun_failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
            outcome =
                boot::boot_and_serve(opts, &inst, &mut children, &mut stop_rx, progress, t0).await;
        }
    }
    tear_down(&inst, &mut children, &outcome, t0).await;
    outcome.map(|_| ())
}

/// SIGTERM and SIGINT (systemd, Ctrl-C in the foreground) ask for a graceful stop.
fn stop_on_signals(stop: mpsc::Sender<u64>) -> Result<AbortOnDrop, SupervisorError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(io_err("installing the SIGTERM handler"))?;
    let mut sigint =
        signal(SignalKind::interrupt()).map_err(io_err("installing the SIGINT handler"))?;
    Ok(AbortOnDrop(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = sigterm.recv() => {}
                _ = sigint.recv() => {}
            }
            let _ = stop.send(30).await;
        }
    })))
}

/// Undoes a boot attempt that stalled so that another can start: its processes, sockets and
/// loopback guard go, and the state forgets them.
async fn clear_attempt(inst: &RunningInstance, children: &mut Vec<OwnedChild>) {
    for c in children.iter_mut().rev() {
        c.terminate(Duration::from_secs(2)).await;
    }
    children.clear();
    let _ = std::fs::remove_file(inst.paths.control_socket());
    loopback::remove_stale(&inst.paths.name);
    // The stalled attempt's agent channel (if the VMM's socket took one) is not the next one's.
    *inst.agent.lock().unwrap_or_else(|p| p.into_inner()) = None;
    inst.set_state(|s| {
        s.vmm = None;
        s.helpers.clear();
    });
}

/// Stops the children (the VM first), removes the mounts and sockets and records how the run
/// ended.
async fn tear_down(
    inst: &RunningInstance,
    children: &mut [OwnedChild],
    outcome: &Result<String, SupervisorError>,
    t0: Instant,
) {
    let paths = &inst.paths;
    for c in children.iter_mut().rev() {
        c.terminate(Duration::from_secs(2)).await;
    }
    mounts::unmount_rootfs(paths);
    state::clear_run_dir(paths);
    loopback::remove_stale(&paths.name);
    let (reason, error) = match outcome {
        Ok(reason) => (reason.clone(), None),
        Err(e) => {
            let line = gatevm_abi::error_chain(e);
            (format!("start failed: {line}"), Some(line))
        }
    };
    tracing::info!(
        "instance stopped after {} ms: {reason}",
        t0.elapsed().as_millis() as u64
    );
    inst.set_state(|s| {
        s.phase = Phase::Stopped;
        s.supervisor = None;
        s.vmm = None;
        s.helpers.clear();
        s.stop_reason = Some(reason);
        if error.is_some() {
            s.last_error = error;
        }
    });
}
