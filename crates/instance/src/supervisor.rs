//! The supervisor: one host process per running instance.
//!
//! It holds the instance lock for its whole life, owns the VMM process and the helpers (virtiofsd,
//! gvproxy), the agent channel and the control socket, and records the instance state. Its children
//! get `PR_SET_PDEATHSIG(SIGKILL)`, so they die with it even when it is SIGKILLed; they are spawned
//! from the runtime's only thread (the death signal follows the spawning thread).
//!
//! When a helper dies, the supervisor stops the VM and records why: virtiofsd cannot be restarted
//! under a running guest (the vhost-user connection is gone), and a guest without its network is
//! not the appliance the user started. The next `start` begins from a clean slate.

use crate::agent::Agent;
use crate::backend;
use crate::config::NetBackend;
use crate::config::{now_ms, InstanceConfig, Phase, ProcId, StateFile};
use crate::control::{CtlReply, CtlRequest, InstanceStatus, CLIENT_STREAM};
use crate::lock::{try_lock, InstanceLock};
use crate::paths::{write_atomic, InstancePaths};
use gatevm_net::confine::HelperConfine;
use gatevm_net::filter::{self, FilterStats};
use gatevm_net::gvproxy::{self, GvproxyConfig};
use gatevm_net::loopback::{self, LoopbackGuard};
use gatevm_net::passt::{PasstAttach, PasstConfig};
use gatevm_protocol::{asyncio, Frame, GuestMsg, PayloadState};
use gatevm_vmm::{Accel, NetAttach, VmConfig};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{UnixListener, UnixStream};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// How long the guest may take from VM start to the agent answering.
const AGENT_TIMEOUT: Duration = Duration::from_secs(90);
/// Where gatevm-guest is installed in every instance root (the guest's stage 2 path).
pub const GUEST_PATH: &str = "/usr/local/sbin/gatevm-guest";
/// How long the guest may take to answer an exec request with "started" or "failed".
const EXEC_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the payload may take after the agent answered.
const PAYLOAD_TIMEOUT: Duration = Duration::from_secs(90);

/// A step of the start, reported to whoever started the supervisor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Progress {
    /// A phase began.
    Phase { phase: String, elapsed_ms: u64 },
    /// Something the user should know (e.g. software emulation).
    Notice { message: String },
    /// The instance is ready.
    Ready { agent_ready_ms: u64, ready_ms: u64 },
    /// The start failed.
    Failed { message: String },
}

/// Errors of the supervisor.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("instance {0:?} is already running")]
    AlreadyRunning(String),
    #[error("{0}")]
    Setup(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Boot(String),
}

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
pub fn run(
    opts: SuperviseOptions,
    progress: Box<dyn FnMut(Progress) + Send>,
) -> Result<(), SupervisorError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_err("building the async runtime"))?;
    rt.block_on(supervise(opts, progress))
}

/// One owned child process.
struct Owned {
    name: &'static str,
    child: Child,
    id: ProcId,
    /// The end of the drain that copies its output into its capped log.
    drained: crate::logcap::Drained,
}

impl Owned {
    /// Terminates the process (SIGTERM, then SIGKILL after `grace`) and reaps it.
    async fn terminate(&mut self, grace: Duration) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        signal(self.id.pid, libc::SIGTERM);
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill has no memory effects; pid is a child we have not reaped yet.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// The environment variable naming the instance a process belongs to.
pub const INSTANCE_ENV: &str = "GATEVM_INSTANCE";

/// Spawns a helper with its output in a capped log (through a pipe the supervisor drains) and a
/// death signal tied to this thread.
fn spawn_owned(
    name: &'static str,
    mut cmd: Command,
    log: &Path,
    cwd: &Path,
    guard: Option<LoopbackGuard>,
    inherit: Option<std::os::fd::RawFd>,
    confine: Option<std::sync::Arc<HelperConfine>>,
) -> Result<Owned, SupervisorError> {
    let (rd, logf) = crate::logcap::pipe().map_err(io_err("creating a log pipe"))?;
    let logf2 = logf
        .try_clone()
        .map_err(io_err("duplicating a log pipe descriptor"))?;
    let drained = crate::logcap::drain_into(rd, log, crate::logcap::HELPER_LOG_CAP)
        .map_err(io_err(format!("opening {}", log.display())))?;
    // Every process of an instance carries its name in the environment, so tools (and the tests'
    // leak checks) find even one whose command line names no path of the instance (passt).
    let instance = cwd
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    cmd.stdin(Stdio::null())
        .stdout(logf)
        .stderr(logf2)
        .current_dir(cwd)
        .env(INSTANCE_ENV, instance)
        .kill_on_drop(true);
    // SAFETY: the closure runs between fork and exec and only calls async-signal-safe functions
    // (prctl, getppid, _exit, open/write/close in enter_self, and the system calls of
    // HelperConfine::apply_in_child).
    unsafe {
        let parent = libc::getpid();
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            if let Some(g) = &guard {
                g.enter_self()?;
            }
            // A descriptor the child is told about by number keeps it across exec.
            if let Some(fd) = inherit {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Last: the uid change and Landlock come after entering the guard's cgroup.
            if let Some(c) = &confine {
                c.apply_in_child(parent)?;
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(io_err(format!("starting {name}")))?;
    // Our copies of the pipe's write end go with the command, so the drain ends with the child.
    drop(cmd);
    let pid = child.id().unwrap_or(0);
    let id = ProcId::of(pid).unwrap_or(ProcId {
        pid,
        start_ticks: 0,
        boot_id: None,
    });
    tracing::info!("started {name} as pid {pid}");
    Ok(Owned {
        name,
        child,
        id,
        drained,
    })
}

/// Tells an exec or file-read client that there is no guest agent to ask.
async fn not_connected(conn: &mut UnixStream) -> Result<(), String> {
    let f: Frame<GuestMsg> = Frame::Msg {
        stream: CLIENT_STREAM,
        msg: GuestMsg::ExecFailed {
            code: 1,
            message: "the guest agent is not connected".into(),
        },
    };
    asyncio::write_frame(conn, &f)
        .await
        .map_err(|e| e.to_string())
}

/// Connects to a unix socket that its creator may not be listening on yet (blocking socket, for
/// a relay thread).
async fn connect_unix_retrying(
    p: &Path,
    within: Duration,
) -> std::io::Result<std::os::unix::net::UnixStream> {
    let start = Instant::now();
    loop {
        match std::os::unix::net::UnixStream::connect(p) {
            Ok(s) => return Ok(s),
            Err(e) if start.elapsed() >= within => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Last lines of a log file, for error messages.
fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let v: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    v[v.len().saturating_sub(lines)..].join(" | ")
}

/// Waits for a socket file to appear while its creator runs.
async fn wait_socket(
    p: &Path,
    owner: &mut Owned,
    log: &Path,
    timeout: Duration,
) -> Result<(), SupervisorError> {
    let start = Instant::now();
    loop {
        if p.exists() {
            return Ok(());
        }
        if let Ok(Some(st)) = owner.child.try_wait() {
            // Its last words are in the log once the drain has copied them.
            owner.drained.wait(Duration::from_secs(1)).await;
            return Err(SupervisorError::Boot(format!(
                "{} exited ({st}) before creating {}: {}",
                owner.name,
                p.display(),
                log_tail(log, 3)
            )));
        }
        if start.elapsed() > timeout {
            return Err(SupervisorError::Boot(format!(
                "{} did not create {} in time",
                owner.name,
                p.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// How many times gvproxy is started when another process takes its ssh port first.
const GVPROXY_ATTEMPTS: u32 = 4;

/// Whether gvproxy failed because `port` was taken between choosing and binding it.
fn lost_port(e: &SupervisorError, port: u16) -> bool {
    let text = e.to_string();
    text.contains(&format!(":{port}: bind: address already in use"))
}

/// Waits for a helper's socket (10 s at most) and keeps the helper among `children` either way,
/// so a failure still tears it down.
async fn keep_when_listening(
    mut helper: Owned,
    socket: &Path,
    log: &Path,
    children: &mut Vec<Owned>,
) -> Result<(), SupervisorError> {
    let waited = wait_socket(socket, &mut helper, log, Duration::from_secs(10)).await;
    children.push(helper);
    waited
}

/// Whether `p` is a mount point (its device differs from its parent's, or it is in mountinfo).
pub fn is_mounted(p: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = p.to_string_lossy();
    info.lines().any(|l| {
        l.split_whitespace()
            .nth(4)
            .map(unescape_mountinfo)
            .as_deref()
            == Some(&*want)
    })
}

fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Unmounts the instance root and the image of its writable layer if mounted (lazily when busy).
pub fn unmount_rootfs(paths: &InstancePaths) {
    for p in [paths.rootfs(), paths.upper_mount()] {
        while is_mounted(&p) {
            if nix::mount::umount2(&p, nix::mount::MntFlags::empty()).is_err() {
                if let Err(e) = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH) {
                    tracing::warn!("could not unmount {}: {e}", p.display());
                    break;
                }
            }
        }
    }
}

/// Clears what a crashed run may have left: processes recorded in the state file (checked by
/// start time, so a recycled pid is never killed), the rootfs mount and the sockets.
pub fn recover_stale(paths: &InstancePaths) {
    if let Some(old) = read_state(paths) {
        let recorded = old
            .vmm
            .into_iter()
            .chain(old.helpers.iter().map(|(_, p)| *p));
        for p in recorded {
            if p.alive() {
                tracing::warn!("killing leftover process {} of a previous run", p.pid);
                signal(p.pid, libc::SIGKILL);
            }
        }
    }
    unmount_rootfs(paths);
    clear_run_dir(paths);
    loopback::remove_stale(&paths.name);
}

/// Makes every socket in the instance's runtime directory owner-only (0600). The directory is
/// 0700 already; this keeps the sockets private even if it is not.
fn restrict_sockets(run: &Path) {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    for e in std::fs::read_dir(run).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_socket()) {
            let _ = std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o600));
        }
    }
}

/// Removes everything in the instance's runtime directory (sockets, virtiofsd's pid file).
fn clear_run_dir(paths: &InstancePaths) {
    if let Ok(rd) = std::fs::read_dir(&paths.run) {
        for e in rd.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Reads the state file; a missing or corrupt one reads as None.
pub fn read_state(paths: &InstancePaths) -> Option<StateFile> {
    let bytes = std::fs::read(paths.state()).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(
                "ignoring corrupt state file {}: {e}",
                paths.state().display()
            );
            None
        }
    }
}

fn write_state(paths: &InstancePaths, s: &StateFile) {
    match serde_json::to_vec_pretty(s) {
        Ok(b) => {
            if let Err(e) = write_atomic(&paths.state(), &b) {
                tracing::error!("writing {}: {e}", paths.state().display());
            }
        }
        Err(e) => tracing::error!("encoding state: {e}"),
    }
}

/// Mounts the instance's root: the shared read-only base with the instance's writable layer on
/// top. The writable layer lives in a sparse ext4 image of the root budget's size, mounted
/// `nosuid,nodev` (so a guest that fills its root gets ENOSPC and the host keeps its space); an
/// instance created before budgets keeps its plain directory. The overlay itself is `nosuid,nodev`
/// too: nothing the guest writes is a setuid program or a device for the host.
fn mount_rootfs(paths: &InstancePaths, base: &Path, root_mib: u32) -> Result<(), SupervisorError> {
    if paths.is_legacy_upper() {
        tracing::warn!(
            "{}: the root's writable layer is the unbudgeted directory {} of an earlier gatevm; \
             `gatevm start --reset` moves it into a budgeted image",
            paths.name,
            paths.legacy_upper().display()
        );
    } else {
        mount_upper(paths, root_mib)?;
    }
    for d in [paths.upper(), paths.overlay_work(), paths.rootfs()] {
        crate::paths::mkdir_private(&d).map_err(io_err(format!("creating {}", d.display())))?;
    }
    // The guest's root directory itself must be world-readable like any root.
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(paths.upper(), std::fs::Permissions::from_mode(0o755));
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        base.display(),
        paths.upper().display(),
        paths.overlay_work().display()
    );
    nix::mount::mount(
        Some("gatevm"),
        &paths.rootfs(),
        Some("overlay"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some(&*opts),
    )
    .map_err(|e| {
        SupervisorError::Setup(format!(
            "mounting the instance root (overlay on {}) failed: {e}; gatevm needs root for this",
            paths.rootfs().display()
        ))
    })
}

/// Creates the root budget's image on first use (a fresh file system on an empty sparse file:
/// the host never runs a file system tool on what the guest wrote) and mounts it.
fn mount_upper(paths: &InstancePaths, root_mib: u32) -> Result<(), SupervisorError> {
    let (img, mnt) = (paths.upper_image(), paths.upper_mount());
    crate::paths::mkdir_private(&mnt).map_err(io_err(format!("creating {}", mnt.display())))?;
    if is_mounted(&mnt) {
        return Ok(());
    }
    if !img.exists() {
        let tmp = paths.dir.join("rootfs-rw.img.tmp");
        let f =
            std::fs::File::create(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
        f.set_len(u64::from(root_mib) << 20)
            .map_err(io_err("sizing the root's writable layer"))?;
        drop(f);
        let out = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0", "-L", "gatevm-root"])
            .args(["-E", "lazy_itable_init=1,lazy_journal_init=1"])
            .arg(&tmp)
            .output()
            .map_err(io_err("running mkfs.ext4 for the root's writable layer"))?;
        if !out.status.success() {
            let _ = std::fs::remove_file(&tmp);
            return Err(SupervisorError::Setup(format!(
                "mkfs.ext4 of {} failed: {}",
                tmp.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        gatevm_runtime::fsutil::rename_durable(&tmp, &img)
            .map_err(io_err(format!("creating {}", img.display())))?;
    }
    let mut mount = std::process::Command::new("mount");
    mount
        .args(["-t", "ext4", "-o", "loop,nosuid,nodev,noatime"])
        .arg(&img)
        .arg(&mnt);
    // A supervisor killed while mount(8) runs takes it along: otherwise the mount could appear
    // after whoever cleans up after the dead supervisor has looked.
    // SAFETY: the closure only calls prctl, which is async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt;
        mount.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = mount
        .output()
        .map_err(io_err("running mount for the root's writable layer"))?;
    if !out.status.success() {
        return Err(SupervisorError::Setup(format!(
            "mounting {} on {} failed: {}; gatevm needs root (and loop devices) for this",
            img.display(),
            mnt.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Copies the guest binary into the instance root when it differs. The root is not trusted (the
/// guest writes its upper layer; a `vm-run` image comes from anywhere), so no symlink in it is
/// followed on the host: a directory on the way that is a symlink is refused, and a symlink at the
/// binary's own path is replaced.
fn install_guest(paths: &InstancePaths, guest_bin: &Path) -> Result<(), SupervisorError> {
    let rel = GUEST_PATH.trim_start_matches('/');
    let (dir_rel, file) = rel.rsplit_once('/').unwrap_or(("", rel));
    let dir = crate::rootdir::dir_in_root(&paths.rootfs(), dir_rel).map_err(|e| {
        SupervisorError::Setup(format!(
            "{e}, so gatevm-guest cannot be installed at {GUEST_PATH}"
        ))
    })?;
    crate::rootdir::install(guest_bin, &dir.join(file), 0o755).map_err(SupervisorError::Setup)
}

/// Creates the sparse ext4 state disk on first start, and grows it (file and file system) when
/// the configuration asks for more than it has.
fn ensure_state_disk(paths: &InstancePaths, gib: u32) -> Result<(), SupervisorError> {
    let disk = paths.state_disk();
    let want = u64::from(gib) << 30;
    if let Ok(meta) = std::fs::metadata(&disk) {
        if meta.len() < want {
            grow_state_disk(&disk, want)?;
        }
        return Ok(());
    }
    let tmp = paths.dir.join("state.img.tmp");
    let f = std::fs::File::create(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
    f.set_len(u64::from(gib) << 30)
        .map_err(io_err("sizing the state disk"))?;
    drop(f);
    let out = std::process::Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-L",
            "gatevm-state",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,discard",
        ])
        .arg(&tmp)
        .output()
        .map_err(io_err("running mkfs.ext4 (install e2fsprogs)"))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(SupervisorError::Setup(format!(
            "mkfs.ext4 failed on {}: {}",
            tmp.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    gatevm_runtime::fsutil::rename_durable(&tmp, &disk).map_err(io_err("installing the state disk"))
}

/// Grows a state disk image as a file only (sparse: the new bytes are a hole). The ext4 file
/// system on it was written by the guest, so the host runs no file system tool on it: the guest
/// grows the mounted file system to the device's size itself (`gatevm-guest`'s disk set-up).
fn grow_state_disk(disk: &Path, bytes: u64) -> Result<(), SupervisorError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(disk)
        .and_then(|f| f.set_len(bytes))
        .map_err(io_err(format!("growing {}", disk.display())))
}

/// Shared state of a running supervisor.
struct Shared {
    paths: InstancePaths,
    config: InstanceConfig,
    state: Mutex<StateFile>,
    agent: Mutex<Option<Agent>>,
    stop_tx: mpsc::Sender<u64>,
}

impl Shared {
    fn set_state(&self, f: impl FnOnce(&mut StateFile)) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
        write_state(&self.paths, &s);
    }

    fn agent(&self) -> Option<Agent> {
        self.agent.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn status(&self) -> InstanceStatus {
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
            state: phase_name(s.phase).into(),
            healthy: s.phase == Phase::Running && responding && payload_ready,
            backend: s.backend.clone(),
            net: self.config.net.name().into(),
            kernel: s.kernel.clone(),
            ephemeral: self.config.ephemeral.is_some(),
            k3s: None,
            cpus: self.config.cpus,
            memory_mib: self.config.memory_mib,
            forwards: all_forwards(&self.config)
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
            processes: process_reports(&s),
        }
    }
}

/// The running processes of the instance and their confinement, for status.
fn process_reports(s: &StateFile) -> Vec<crate::control::ProcessReport> {
    let named = s
        .supervisor
        .map(|p| ("supervisor".to_string(), p))
        .into_iter()
        .chain(s.vmm.map(|p| ("vmm".to_string(), p)))
        .chain(s.helpers.iter().cloned());
    named
        .filter(|(_, p)| p.alive())
        .map(|(role, p)| crate::control::ProcessReport {
            confinement: gatevm_vmm::confinement(p.pid).ok(),
            policy: s
                .policies
                .iter()
                .find(|(r, _)| *r == role)
                .map(|(_, d)| d.clone()),
            role,
            pid: p.pid,
        })
        .collect()
}

/// Whether the payloads the instance runs are all ready (a throwaway VM runs none).
fn payloads_ready(cfg: &InstanceConfig, payloads: &[gatevm_protocol::PayloadStatus]) -> bool {
    if cfg.ephemeral.is_some() {
        return payloads.iter().all(|p| p.state == PayloadState::Ready);
    }
    !payloads.is_empty() && payloads.iter().all(|p| p.state == PayloadState::Ready)
}

/// The name of a phase in status documents.
pub fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Starting => "starting",
        Phase::Running => "running",
        Phase::Stopping => "stopping",
        Phase::Stopped => "stopped",
    }
}

async fn supervise(
    opts: SuperviseOptions,
    mut progress: Box<dyn FnMut(Progress) + Send>,
) -> Result<(), SupervisorError> {
    let name = opts.config.name.clone();
    let paths = InstancePaths::new(&name);
    paths.create_dirs().map_err(io_err(format!(
        "creating the directories of instance {name:?}"
    )))?;
    // Clients probe the lock by taking it for a moment (and clean up after a dead supervisor
    // under it), so a free lock can look taken briefly: retry for a little while.
    let deadline = Instant::now() + Duration::from_secs(3);
    let lock = loop {
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
            Some(l) => break Some(l),
            None if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            None => break None,
        }
    };
    let Some(lock) = lock else {
        let e = SupervisorError::AlreadyRunning(name);
        progress(Progress::Failed {
            message: e.to_string(),
        });
        return Err(e);
    };
    let result = supervise_locked(&opts, &paths, &lock, &mut progress).await;
    if let Err(e) = &result {
        progress(Progress::Failed {
            message: e.to_string(),
        });
    }
    drop(lock);
    result
}

async fn supervise_locked(
    opts: &SuperviseOptions,
    paths: &InstancePaths,
    _lock: &InstanceLock,
    progress: &mut Box<dyn FnMut(Progress) + Send>,
) -> Result<(), SupervisorError> {
    let t0 = Instant::now();
    let ms = |t: Instant| t.elapsed().as_millis() as u64;
    recover_stale(paths);
    let cfg_bytes = serde_json::to_vec_pretty(&opts.config)
        .map_err(|e| SupervisorError::Setup(e.to_string()))?;
    write_atomic(&paths.config(), &cfg_bytes).map_err(io_err("writing the instance config"))?;

    let (stop_tx, mut stop_rx) = mpsc::channel::<u64>(4);
    let mut initial = StateFile::stopped(None);
    initial.phase = Phase::Starting;
    initial.supervisor = ProcId::of(std::process::id());
    initial.started_at_ms = Some(now_ms());
    let shared = Arc::new(Shared {
        paths: paths.clone(),
        config: opts.config.clone(),
        state: Mutex::new(initial),
        agent: Mutex::new(None),
        stop_tx,
    });
    shared.set_state(|_| {});
    // SIGTERM and SIGINT (systemd, Ctrl-C in the foreground) ask for a graceful stop.
    let _signals = if opts.handle_signals {
        let sig_stop = shared.stop_tx.clone();
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(io_err("installing the SIGTERM handler"))?;
        let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .map_err(io_err("installing the SIGINT handler"))?;
        Some(AbortOnDrop(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = sigterm.recv() => {}
                    _ = sigint.recv() => {}
                }
                let _ = sig_stop.send(30).await;
            }
        })))
    } else {
        None
    };

    let mut children: Vec<Owned> = Vec::new();
    let outcome = boot_and_serve(opts, &shared, &mut children, &mut stop_rx, progress, t0).await;

    // Teardown, on every path.
    for c in children.iter_mut().rev() {
        c.terminate(Duration::from_secs(2)).await;
    }
    unmount_rootfs(paths);
    clear_run_dir(paths);
    loopback::remove_stale(&paths.name);
    let (reason, error) = match &outcome {
        Ok(reason) => (reason.clone(), None),
        Err(e) => (format!("start failed: {e}"), Some(e.to_string())),
    };
    tracing::info!("instance stopped after {} ms: {reason}", ms(t0));
    shared.set_state(|s| {
        s.phase = Phase::Stopped;
        s.supervisor = None;
        s.vmm = None;
        s.helpers.clear();
        s.stop_reason = Some(reason);
        if error.is_some() {
            s.last_error = error;
        }
    });
    outcome.map(|_| ())
}

/// Boots the VM and serves until it stops; returns why it stopped.
async fn boot_and_serve(
    opts: &SuperviseOptions,
    shared: &Arc<Shared>,
    children: &mut Vec<Owned>,
    stop_rx: &mut mpsc::Receiver<u64>,
    progress: &mut Box<dyn FnMut(Progress) + Send>,
    t0: Instant,
) -> Result<String, SupervisorError> {
    let paths = &shared.paths;
    let cfg = &opts.config;
    let ms = || t0.elapsed().as_millis() as u64;
    let phase = |p: &str, progress: &mut Box<dyn FnMut(Progress) + Send>| {
        tracing::info!("phase {p} at {} ms", ms());
        progress(Progress::Phase {
            phase: p.to_string(),
            elapsed_ms: ms(),
        });
    };

    phase("preparing", progress);
    let runtime =
        gatevm_runtime::Runtime::load().map_err(|e| SupervisorError::Setup(e.to_string()))?;
    let caps = gatevm_vmm::probe();
    let chosen = backend::choose(
        cfg.vmm,
        &caps,
        &runtime.libkrunfw(),
        cfg.krun_kernel.as_deref(),
    )
    .map_err(SupervisorError::Setup)?;
    if chosen == backend::Chosen::Qemu(Accel::Tcg) {
        let why = caps.why_no_hardware_virt().unwrap_or_default();
        progress(Progress::Notice {
            message: format!("no hardware virtualization ({why}): using QEMU software emulation (TCG), which is slower"),
        });
    }
    let program = std::env::current_exe().map_err(io_err("locating the gatevm executable"))?;
    let vmm = backend::build(&chosen, &runtime, program);
    let kernel_label = match &chosen {
        backend::Chosen::Krun(gatevm_vmm::krun::KrunKernel::Libkrunfw) => {
            format!("libkrunfw ({})", runtime.libkrunfw().display())
        }
        backend::Chosen::Krun(gatevm_vmm::krun::KrunKernel::External { path, .. }) => {
            path.display().to_string()
        }
        backend::Chosen::Qemu(_) => runtime.kernel_path().display().to_string(),
    };
    shared.set_state(|s| {
        s.backend = Some(chosen.label().to_string());
        s.kernel = Some(kernel_label);
    });

    let lower = match cfg.ephemeral.as_ref().and_then(|e| e.rootfs.clone()) {
        Some(dir) => dir,
        None => runtime
            .rootfs()
            .map_err(|e| SupervisorError::Setup(e.to_string()))?,
    };
    mount_rootfs(paths, &lower, cfg.root_mib)?;
    install_guest(paths, &opts.guest_bin)?;
    if let Some(k3s) = &cfg.k3s {
        // The plan follows the kernel the VM boots: Debian's config is read; libkrunfw's kernel
        // ships none, so every feature counts as missing and the plan is the conservative one.
        let caps = match &chosen {
            backend::Chosen::Qemu(_) => {
                gatevm_kernel::kconfig::capabilities_of(&runtime.kernel_config())
                    .unwrap_or_default()
            }
            backend::Chosen::Krun(_) => vec![],
        };
        crate::k3s_stage::stage(paths, k3s, &caps)
            .map_err(|e| SupervisorError::Setup(format!("preparing k3s: {e}")))?;
    }
    let state_disk = if cfg.ephemeral.is_some() {
        None
    } else {
        ensure_state_disk(paths, cfg.disk_gib)?;
        Some(paths.state_disk())
    };
    let initramfs = if vmm.needs_virtiofsd() {
        Some(
            runtime
                .initramfs(&opts.guest_bin)
                .map_err(|e| SupervisorError::Setup(e.to_string()))?,
        )
    } else {
        None
    };

    phase("starting helpers", progress);
    if vmm.needs_virtiofsd() {
        // virtiofsd serves the merged root.
        let mut vfs_cmd = Command::new(runtime.virtiofsd());
        vfs_cmd
            .arg(format!(
                "--socket-path={}",
                paths.virtiofs_socket().display()
            ))
            .arg(format!("--shared-dir={}", paths.rootfs().display()))
            .args(["--cache=auto", "--sandbox=namespace", "--log-level=info"]);
        let vfs_log = paths.log("virtiofsd");
        let vfs = spawn_owned("virtiofsd", vfs_cmd, &vfs_log, &paths.run, None, None, None)?;
        shared.set_state(|s| s.helpers.push(("virtiofsd".to_string(), vfs.id)));
        keep_when_listening(vfs, &paths.virtiofs_socket(), &vfs_log, children).await?;
    }
    // The network helper; unless the user allows it, it runs where it cannot reach the host's
    // loopback (gvproxy NATs 192.168.127.254 there; passt maps the gateway there without
    // --no-map-gw, which it then gets as well).
    let guard = if cfg.allow_host_loopback {
        None
    } else {
        Some(LoopbackGuard::create(&cfg.name).map_err(|e| SupervisorError::Setup(e.to_string()))?)
    };
    // Large frames where the VMM's device is known to take them (QEMU's virtio-net).
    let mtu = match chosen {
        backend::Chosen::Qemu(_) => gatevm_net::LARGE_MTU,
        backend::Chosen::Krun(_) => gatevm_net::ETHERNET_MTU,
    };
    // For passt: the VM's end of the connected pair, held until the VM has inherited it.
    let mut vm_net_end: Option<std::os::unix::net::UnixStream> = None;
    // The network helper's own directory (its sockets; the only place a confined gvproxy may
    // write).
    let net_dir = paths.net_dir();
    let _ = std::fs::remove_dir_all(&net_dir);
    crate::paths::mkdir_private(&net_dir)
        .map_err(io_err(format!("creating {}", net_dir.display())))?;
    let (net_attach, gv) = match cfg.net {
        NetBackend::Gvproxy => {
            let gv_log = paths.log("gvproxy");
            // gvproxy runs confined (see gatevm_net::confine): its own directory is the only place
            // it may create or remove files, it binds only the forwarded TCP ports (and its ssh
            // port, removed once it runs), and as root it runs as `nobody`, reaching its directory
            // and binary through descriptors.
            let forwards = all_forwards(cfg);
            // gvproxy insists on a host port for its ssh forward (removed once it runs). The
            // port is free when chosen, but another process (another instance starting at the
            // same moment) can take it before gvproxy binds it: then gvproxy exits at once, and
            // it is started again with another port.
            let mut attempt = 1;
            let (gvp, gv) = loop {
                let ssh_port =
                    gvproxy::free_ssh_port().map_err(io_err("finding a port for gvproxy"))?;
                let mut ports: Vec<u16> = forwards
                    .iter()
                    .filter(|f| f.proto == gatevm_net::Proto::Tcp)
                    .map(|f| f.host_port)
                    .collect();
                ports.push(ssh_port);
                let confine = HelperConfine::new(&net_dir, &ports)
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
                shared.set_state(|s| {
                    s.policies.retain(|(r, _)| r != "gvproxy");
                    s.policies.push(("gvproxy".to_string(), policy));
                });
                let mut gv_cmd = Command::new(program);
                // Run through a descriptor, named as itself (ps, and whoever looks for it).
                gv_cmd.arg0(runtime.gvproxy()).args(gv.args());
                let mut gvp = spawn_owned(
                    "gvproxy",
                    gv_cmd,
                    &gv_log,
                    &paths.run,
                    guard.clone(),
                    None,
                    Some(Arc::new(confine)),
                )?;
                let waited = wait_socket(
                    &paths.net_socket(),
                    &mut gvp,
                    &gv_log,
                    Duration::from_secs(10),
                )
                .await;
                match waited {
                    Ok(()) => break (gvp, gv),
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
            };
            shared.set_state(|s| s.helpers.push(("gvproxy".to_string(), gvp.id)));
            children.push(gvp);
            // The VM does not talk to gvproxy directly: its frames pass the filter that keeps
            // the guest away from gvproxy's API (gatevm_net::filter).
            let helper = connect_unix_retrying(&paths.net_socket(), Duration::from_secs(5))
                .await
                .map_err(io_err("connecting to gvproxy's VM socket"))?;
            let (vm_end, relay_end) = std::os::unix::net::UnixStream::pair()
                .map_err(io_err("creating the network socket pair"))?;
            filter::spawn_relay(relay_end, helper, Arc::new(FilterStats::default()))
                .map_err(io_err("starting the network filter"))?;
            let attach = {
                use std::os::fd::AsRawFd;
                NetAttach::Fd(vm_end.as_raw_fd())
            };
            vm_net_end = Some(vm_end);
            (attach, Some(gv))
        }
        NetBackend::Passt => {
            use std::os::fd::AsRawFd;
            // QEMU: vhost-user on the instance's network socket. libkrun: a connected pair,
            // passt's end inherited by passt, the VM's by the VM.
            let vhost_user = matches!(chosen, backend::Chosen::Qemu(_));
            let pair = if vhost_user {
                None
            } else {
                Some(
                    std::os::unix::net::UnixStream::pair()
                        .map_err(io_err("creating the network socket pair"))?,
                )
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
                forwards: all_forwards(cfg),
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
            let mut p_cmd = Command::new(bin);
            p_cmd.args(args);
            let p_log = paths.log("passt");
            let inherit = pair.as_ref().map(|(_, passt_end)| passt_end.as_raw_fd());
            let passt = spawn_owned("passt", p_cmd, &p_log, &paths.run, guard, inherit, None)?;
            shared.set_state(|s| s.helpers.push(("passt".to_string(), passt.id)));
            match pair {
                Some((vm_end, passt_end)) => {
                    drop(passt_end);
                    children.push(passt);
                    let attach = NetAttach::Fd(vm_end.as_raw_fd());
                    vm_net_end = Some(vm_end);
                    (attach, None)
                }
                None => {
                    keep_when_listening(passt, &paths.net_socket(), &p_log, children).await?;
                    (NetAttach::VhostUser(paths.net_socket()), None)
                }
            }
        }
    };

    phase("booting", progress);
    // The VMM writes the console into a FIFO that the supervisor drains into the capped log.
    let _console = crate::logcap::LogFifo::create(
        &paths.console_fifo(),
        &paths.log("console"),
        crate::logcap::CONSOLE_LOG_CAP,
    )
    .map_err(io_err(format!(
        "creating {}",
        paths.console_fifo().display()
    )))?;
    let vm_cfg = VmConfig {
        name: cfg.name.clone(),
        cpus: cfg.cpus,
        memory_mib: cfg.memory_mib,
        accel: match chosen {
            backend::Chosen::Qemu(a) => a,
            backend::Chosen::Krun(_) => Accel::Kvm,
        },
        kernel: runtime.kernel_path().to_path_buf(),
        initramfs,
        cmdline: kernel_cmdline(&cfg.name, payload_name(cfg), mtu),
        root_dir: paths.rootfs(),
        virtiofs_socket: paths.virtiofs_socket(),
        state_disk,
        agent_socket: paths.agent_socket(),
        net: Some(net_attach),
        mac: gvproxy::GUEST_MAC.to_string(),
        console_log: paths.console_fifo(),
    };
    // libkrun refuses to listen on an existing path; an unprivileged QEMU gets the agent
    // socket bound by `command` (so before it).
    let _ = std::fs::remove_file(paths.agent_socket());
    let std_cmd = vmm
        .command(&vm_cfg)
        .map_err(|e| match std::error::Error::source(&e) {
            Some(cause) => SupervisorError::Setup(format!("{e}: {cause}")),
            None => SupervisorError::Setup(e.to_string()),
        })?;
    let vm_log = paths.log("vmm");
    // From here the VM is the last of `children`; teardown goes in reverse.
    children.push(spawn_owned(
        vmm.name(),
        Command::from(std_cmd),
        &vm_log,
        &paths.run,
        None,
        vm_net_end.as_ref().map(|s| {
            use std::os::fd::AsRawFd;
            s.as_raw_fd()
        }),
        None,
    )?);
    // The VM has its copy; ours goes.
    drop(vm_net_end);
    let vm_index = children.len() - 1;
    let vm_id = children[vm_index].id;
    shared.set_state(|s| s.vmm = Some(vm_id));

    // gvproxy's forwards go in while the guest boots (it retries internally until its stack is
    // up); passt has its forwards from its command line.
    let forwards = all_forwards(cfg);
    let api = paths.net_api_socket();
    let expose = tokio::spawn(async move {
        let Some(gv) = gv else {
            return Ok::<(), String>(());
        };
        gvproxy::remove_ssh_forward(&api, gv.ssh_port, Duration::from_secs(20))
            .await
            .map_err(|e| e.to_string())?;
        for f in &forwards {
            gvproxy::expose(&api, f, Duration::from_secs(20))
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok::<(), String>(())
    });

    // The control socket is up from here, so status works during boot.
    let listener =
        UnixListener::bind(paths.control_socket()).map_err(io_err("binding the control socket"))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(
            paths.control_socket(),
            std::fs::Permissions::from_mode(0o600),
        );
    }
    let sh = shared.clone();
    let server = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((conn, _)) => {
                    let sh = sh.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve_client(conn, &sh).await {
                            tracing::debug!("control client: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("control socket accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    let _server_guard = AbortOnDrop(server);

    // libkrun closes host connections until the guest listens; QEMU, given an already listening
    // socket, was seen (rarely, under load) to end the first connection too: both retry.
    let reconnect = true;
    // The helpers are watched from here on: one that dies during boot ends the start at once.
    let (helpers, vm) = children.split_at_mut(vm_index);
    let vm = &mut vm[0];
    restrict_sockets(&paths.run);
    let boot = async {
        let agent = connect_agent(paths, vm, &vm_log, reconnect).await?;
        // The helpers' and the VMM's sockets exist by now; their makers use their own modes.
        restrict_sockets(&paths.run);
        *shared.agent.lock().unwrap_or_else(|p| p.into_inner()) = Some(agent.clone());
        let times = wait_ready(&agent, cfg, vm, &vm_log, t0, progress).await?;
        Ok::<_, SupervisorError>((agent, times))
    };
    let boot_result = tokio::select! {
        r = boot => r,
        (name, st) = first_exit(helpers) => Err(SupervisorError::Boot(format!(
            "{name} exited during boot ({}); see {}",
            describe(st),
            paths.log(name).display()
        ))),
        t = stop_rx.recv() => Err(SupervisorError::Boot(format!("stopped during boot (timeout {} s)", t.unwrap_or(0)))),
    };
    let (agent, (agent_ms, ready_ms)) = boot_result?;
    match expose.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(SupervisorError::Boot(format!("port forward failed: {e}"))),
        Err(e) => {
            return Err(SupervisorError::Boot(format!(
                "port forward task failed: {e}"
            )))
        }
    }
    shared.set_state(|s| {
        s.phase = Phase::Running;
        s.agent_ready_ms = Some(agent_ms);
        s.ready_ms = Some(ready_ms);
        s.last_error = None;
        s.stop_reason = None;
    });
    progress(Progress::Ready {
        agent_ready_ms: agent_ms,
        ready_ms,
    });

    // Serve until the VM ends, a helper dies, or a stop is asked for.
    let reason = tokio::select! {
        st = vm.child.wait() => describe_vm_exit(st),
        (name, st) = first_exit(helpers) => helper_died(shared, vm, name, st).await,
        t = stop_rx.recv() => graceful_stop(shared, &agent, vm, Duration::from_secs(t.unwrap_or(30))).await,
    };
    shared.set_state(|s| s.phase = Phase::Stopping);
    Ok(reason)
}

/// The first helper to exit, with its status (pending forever when there are none).
async fn first_exit(
    helpers: &mut [Owned],
) -> (&'static str, std::io::Result<std::process::ExitStatus>) {
    let waits: Vec<_> = helpers
        .iter_mut()
        .map(|h| {
            let name = h.name;
            Box::pin(async move { (name, h.child.wait().await) })
        })
        .collect();
    if waits.is_empty() {
        return std::future::pending().await;
    }
    let mut waits = waits;
    std::future::poll_fn(move |cx| {
        for w in waits.iter_mut() {
            if let std::task::Poll::Ready(r) = std::future::Future::poll(w.as_mut(), cx) {
                return std::task::Poll::Ready(r);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// Connects to the agent channel. QEMU listens on the socket and keeps a connection until the
/// guest opens its port, so one connection is enough. libkrun connects each host connection to
/// the guest's vsock port and closes it while nothing listens there yet, so with `reconnect` a
/// closed channel is retried until the guest answers (the VM's exit and the boot timeout end the
/// wait).
async fn connect_agent(
    paths: &InstancePaths,
    vm: &mut Owned,
    vm_log: &Path,
    reconnect: bool,
) -> Result<Agent, SupervisorError> {
    wait_socket(&paths.agent_socket(), vm, vm_log, Duration::from_secs(20)).await?;
    let deadline = Instant::now() + AGENT_TIMEOUT;
    // The VMM binds the socket a moment before it listens on it: refused connections are retried
    // for a while (as long as the VM lives).
    let refused_until = Instant::now() + Duration::from_secs(10);
    loop {
        let stream = match UnixStream::connect(paths.agent_socket()).await {
            Ok(s) => s,
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && Instant::now() < refused_until
                    && matches!(vm.child.try_wait(), Ok(None)) =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(e) => {
                return Err(SupervisorError::Boot(format!(
                    "connecting to the agent socket: {e}"
                )))
            }
        };
        let (r, w) = stream.into_split();
        let agent = Agent::spawn(r, w);
        if !reconnect {
            return Ok(agent);
        }
        agent.hello().await.map_err(SupervisorError::Boot)?;
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
            vm.drained.wait(Duration::from_secs(1)).await;
            return Err(SupervisorError::Boot(format!(
                "the VM exited during boot ({st}): see the console log; last lines: {}",
                log_tail(vm_log, 2)
            )));
        }
        if Instant::now() > deadline {
            return Err(SupervisorError::Boot(format!(
                "the guest agent did not answer within {} s: see the console log",
                AGENT_TIMEOUT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the guest runs: `none` for a throwaway VM, `k3s` (with containerd) for the k3s profile,
/// else `containerd`.
fn payload_name(cfg: &InstanceConfig) -> &'static str {
    if cfg.ephemeral.is_some() {
        "none"
    } else if cfg.k3s.is_some() {
        "k3s"
    } else {
        "containerd"
    }
}

/// Every forward of the instance: the configured ones and, for k3s, the API server's.
pub fn all_forwards(cfg: &InstanceConfig) -> Vec<gatevm_net::Forward> {
    let mut v = cfg.forwards.clone();
    if let Some(k) = &cfg.k3s {
        if !v
            .iter()
            .any(|f| f.guest_port == crate::config::K3S_API_GUEST_PORT)
        {
            v.push(gatevm_net::Forward {
                host_ip: std::net::Ipv4Addr::LOCALHOST.into(),
                host_port: k.api_port,
                guest_port: crate::config::K3S_API_GUEST_PORT,
                proto: gatevm_net::forward::Proto::Tcp,
            });
        }
        if let Some(g) = k.gateway {
            if !v.iter().any(|f| f.host_port == g.host_port) {
                v.push(gatevm_net::Forward {
                    host_ip: std::net::Ipv4Addr::LOCALHOST.into(),
                    host_port: g.host_port,
                    guest_port: g.guest_port,
                    proto: gatevm_net::forward::Proto::Tcp,
                });
            }
        }
    }
    v
}

/// The guest kernel command line; `$GATEVM_KERNEL_APPEND` adds to it (e.g. `loglevel=7` to see
/// the kernel's messages in the console log).
fn kernel_cmdline(hostname: &str, payload: &str, mtu: u32) -> String {
    let mut c = format!("console=ttyS0 quiet panic=-1 gatevm.hostname={hostname}");
    if payload != "containerd" {
        c.push_str(&format!(" gatevm.payload={payload}"));
    }
    if mtu != gatevm_net::ETHERNET_MTU {
        c.push_str(&format!(" gatevm.mtu={mtu}"));
    }
    if let Ok(extra) = std::env::var("GATEVM_KERNEL_APPEND") {
        c.push(' ');
        c.push_str(&extra);
    }
    c
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn describe(st: std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match st {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exit code {c}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => "unknown status".into(),
        },
        Err(e) => format!("wait failed: {e}"),
    }
}

/// Why the instance ends after a helper exited. The helpers end by themselves when the VM goes
/// away (gvproxy exits when QEMU's network connection closes), so a VM that exited at about the
/// same time is the cause, not the helper.
async fn helper_died(
    shared: &Shared,
    vm: &mut Owned,
    name: &str,
    st: std::io::Result<std::process::ExitStatus>,
) -> String {
    if let Ok(vm_st) = tokio::time::timeout(Duration::from_millis(500), vm.child.wait()).await {
        return describe_vm_exit(vm_st);
    }
    let why = format!(
        "{name} exited unexpectedly ({}); the VM was stopped",
        describe(st)
    );
    shared.set_state(|s| s.last_error = Some(why.clone()));
    why
}

fn describe_vm_exit(st: std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match &st {
        Ok(s) if s.success() => "the guest powered off".into(),
        Ok(s) if s.signal().is_some() => {
            format!("the VM process was {} from outside", describe(st))
        }
        _ => format!("the VM process ended ({})", describe(st)),
    }
}

/// Waits for the agent's hello, then for every payload to be ready. Returns (agent ms, ready ms).
async fn wait_ready(
    agent: &Agent,
    cfg: &InstanceConfig,
    vm: &mut Owned,
    vm_log: &Path,
    t0: Instant,
    progress: &mut Box<dyn FnMut(Progress) + Send>,
) -> Result<(u64, u64), SupervisorError> {
    let ms = || t0.elapsed().as_millis() as u64;
    let mut connected = agent.connected.clone();
    let deadline = Instant::now() + AGENT_TIMEOUT;
    let vm_drained = vm.drained.clone();
    // Say hello until the guest answers (our bytes wait in the socket until the guest opens its port).
    loop {
        if *connected.borrow() {
            break;
        }
        agent.hello().await.map_err(SupervisorError::Boot)?;
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
            return Err(SupervisorError::Boot(format!(
                "the guest agent did not answer within {} s: see the console log",
                AGENT_TIMEOUT.as_secs()
            )));
        }
    }
    let agent_ms = ms();
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
    // k3s under software emulation takes minutes to bring its API server up.
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
            return Ok((agent_ms, ms()));
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

/// Asks the guest to power off, waits up to `timeout`, then forces the VM down.
async fn graceful_stop(
    shared: &Shared,
    agent: &Agent,
    vm: &mut Owned,
    timeout: Duration,
) -> String {
    shared.set_state(|s| s.phase = Phase::Stopping);
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

/// Writes a one-frame reply, giving up on a client that does not read it within 10 s (the task
/// serving it would otherwise wait forever).
async fn reply_within(conn: &mut UnixStream, f: &Frame<CtlReply>) -> Result<(), String> {
    match tokio::time::timeout(Duration::from_secs(10), asyncio::write_frame(conn, f)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("the client does not read its reply".into()),
    }
}

/// Serves one control client.
async fn serve_client(mut conn: UnixStream, shared: &Shared) -> Result<(), String> {
    let first = tokio::time::timeout(
        Duration::from_secs(10),
        asyncio::read_frame::<CtlRequest, _>(&mut conn),
    )
    .await
    .map_err(|_| "client sent no request".to_string())?
    .map_err(|e| e.to_string())?;
    let Some(Frame::Msg { msg, .. }) = first else {
        return Err("client closed without a request".into());
    };
    let reply = |m: CtlReply| Frame::Msg {
        stream: CLIENT_STREAM,
        msg: m,
    };
    match msg {
        CtlRequest::Status => {
            let st = shared.status().await;
            reply_within(&mut conn, &reply(CtlReply::Status(Box::new(st)))).await
        }
        CtlRequest::Stop { timeout_secs } => {
            let _ = shared.stop_tx.send(timeout_secs.min(3600)).await;
            reply_within(&mut conn, &reply(CtlReply::Stopping)).await
        }
        CtlRequest::Exec(req) => {
            let Some(agent) = shared.agent().filter(|a| *a.connected.borrow()) else {
                return not_connected(&mut conn).await;
            };
            relay_exec(conn, agent, GuestMsg::Exec(req)).await
        }
        CtlRequest::ReadFile { path, max_bytes } => {
            let Some(agent) = shared.agent().filter(|a| *a.connected.borrow()) else {
                return not_connected(&mut conn).await;
            };
            relay_exec(conn, agent, GuestMsg::ReadFile { path, max_bytes }).await
        }
    }
}

/// Relays one exec (or read-file) stream between a client connection and the guest.
///
/// Flow control: guest output is written to the client first and granted back to the guest only
/// after the write, so a client that stops reading stops only this relay (and, through the
/// window, its process in the guest); client frames are read only while the guest granted stdin
/// credit, so a process that does not read its stdin stops only its own client.
async fn relay_exec(conn: UnixStream, agent: Agent, request: GuestMsg) -> Result<(), String> {
    let read_file = matches!(request, GuestMsg::ReadFile { .. });
    let (sid, stream) = agent.open_stream();
    let (mut from_guest, mut stdin_credit) = stream.split();
    let start_deadline = tokio::time::Instant::now() + EXEC_START_TIMEOUT;
    match tokio::time::timeout_at(
        start_deadline,
        agent.send(Frame::Msg {
            stream: sid,
            msg: request,
        }),
    )
    .await
    {
        Ok(sent) => sent?,
        Err(_) => {
            agent.close_stream(sid);
            let message = "the guest agent does not take requests (see `gatevm logs --console`)";
            tracing::warn!("{message}");
            let f: Frame<GuestMsg> = Frame::Msg {
                stream: CLIENT_STREAM,
                msg: GuestMsg::Error {
                    message: message.into(),
                },
            };
            let mut conn = conn;
            let _ = asyncio::write_frame(&mut conn, &f).await;
            return Ok(());
        }
    }
    let (cr, mut cw) = conn.into_split();
    // Raced against the guest's frames in select!: keeps partial frames across cancellation.
    let mut cr = asyncio::FrameReader::new(cr);
    let mut finished = false;
    let mut started = false;
    // Stdin the client sent beyond the guest's credit, sent on as grants come.
    let mut pending: Vec<u8> = Vec::new();
    // A frame that could not be queued for the guest (it stopped reading): the stream ends.
    let mut failed: Option<String> = None;
    loop {
        let read_client = pending.is_empty() && stdin_credit.available() > 0;
        tokio::select! {
            _ = tokio::time::sleep_until(start_deadline), if !started => {
                let message = format!(
                    "the guest agent did not start the command within {} s (see `gatevm logs --console`)",
                    EXEC_START_TIMEOUT.as_secs()
                );
                tracing::warn!("{message}");
                let f: Frame<GuestMsg> = Frame::Msg { stream: CLIENT_STREAM, msg: GuestMsg::Error { message } };
                let _ = asyncio::write_frame(&mut cw, &f).await;
                break;
            }
            f = from_guest.recv() => {
                started = true;
                let Some(f) = f else {
                    if agent.ended() {
                        let f: Frame<GuestMsg> = Frame::Msg { stream: CLIENT_STREAM, msg: GuestMsg::Error { message: "the guest agent disconnected".into() } };
                        let _ = asyncio::write_frame(&mut cw, &f).await;
                    }
                    // Otherwise the stream was ended for breaking flow control: its consumer
                    // got the error already.
                    break;
                };
                let last = matches!(f, Frame::Msg { msg: GuestMsg::Exit(_) | GuestMsg::ExecFailed { .. }, .. })
                    || (read_file && matches!(f, Frame::Msg { msg: GuestMsg::Error { .. }, .. }));
                let data = match &f {
                    Frame::Data { bytes, .. } => bytes.len(),
                    _ => 0,
                };
                let f = restream(f, CLIENT_STREAM);
                if asyncio::write_frame(&mut cw, &f).await.is_err() {
                    break;
                }
                if last {
                    finished = true;
                    break;
                }
                if data > 0 {
                    // Handed on: the guest may send as much more.
                    if let Err(e) = agent.consumed(sid, data).await {
                        failed = Some(e);
                        break;
                    }
                }
            }
            // Waits for a grant while stdin is held back: pending bytes, or no credit at all.
            _ = stdin_credit.granted(), if !read_client => {
                if let Err(e) = send_stdin(&agent, sid, &mut stdin_credit, &mut pending).await {
                    failed = Some(e);
                    break;
                }
            }
            f = cr.read_frame::<GuestMsg>(), if read_client => {
                match f {
                    Ok(Some(Frame::Data { fd: gatevm_protocol::Fd::Stdin, bytes, .. })) => {
                        pending = bytes;
                        if let Err(e) = send_stdin(&agent, sid, &mut stdin_credit, &mut pending).await {
                            failed = Some(e);
                            break;
                        }
                    }
                    Ok(Some(f)) => {
                        let allowed = matches!(&f, Frame::Eof { fd: gatevm_protocol::Fd::Stdin, .. } | Frame::Msg { msg: GuestMsg::Resize { .. } | GuestMsg::Signal { .. }, .. });
                        if allowed {
                            if let Err(e) = agent.send(restream(f, sid)).await {
                                failed = Some(e);
                                break;
                            }
                        }
                    }
                    // The client hung up (or sent garbage).
                    _ => break,
                }
            }
        }
    }
    if !finished {
        // The client went away: hang up on the process as a terminal would (`nohup` survives it),
        // close its stdin, and let the guest discard the rest of its output.
        let hup = GuestMsg::Signal {
            signal: libc::SIGHUP,
        };
        let _ = agent
            .send(Frame::Msg {
                stream: sid,
                msg: hup,
            })
            .await;
        let _ = agent
            .send(Frame::Eof {
                stream: sid,
                fd: gatevm_protocol::Fd::Stdin,
            })
            .await;
        let _ = agent.discard(sid).await;
    }
    agent.close_stream(sid);
    match failed {
        Some(e) => {
            let f: Frame<GuestMsg> = Frame::Msg {
                stream: CLIENT_STREAM,
                msg: GuestMsg::Error { message: e.clone() },
            };
            // The client may be the one that stalled: do not wait on it for long.
            let _ = tokio::time::timeout(Duration::from_secs(5), asyncio::write_frame(&mut cw, &f))
                .await;
            Err(e)
        }
        None => Ok(()),
    }
}

/// Sends as much of `pending` stdin as the guest's credit allows, in data chunks; what is left
/// waits for the next grant.
async fn send_stdin(
    agent: &Agent,
    sid: u32,
    credit: &mut crate::agent::StdinCredit,
    pending: &mut Vec<u8>,
) -> Result<(), String> {
    while !pending.is_empty() {
        let n = usize::try_from(credit.available())
            .unwrap_or(usize::MAX)
            .min(pending.len())
            .min(gatevm_protocol::DATA_CHUNK);
        if n == 0 {
            break;
        }
        let rest = pending.split_off(n);
        let bytes = std::mem::replace(pending, rest);
        credit.sent(n);
        agent
            .send(Frame::Data {
                stream: sid,
                fd: gatevm_protocol::Fd::Stdin,
                bytes,
            })
            .await?;
    }
    Ok(())
}

fn restream(f: Frame<GuestMsg>, stream: u32) -> Frame<GuestMsg> {
    match f {
        Frame::Msg { msg, .. } => Frame::Msg { stream, msg },
        Frame::Data { fd, bytes, .. } => Frame::Data { stream, fd, bytes },
        Frame::Eof { fd, .. } => Frame::Eof { stream, fd },
        Frame::Credit { bytes, .. } => Frame::Credit { stream, bytes },
    }
}

#[cfg(test)]
mod tests {
    use super::kernel_cmdline;

    #[test]
    fn a_lost_ssh_port_is_told_from_other_failures() {
        use super::{lost_port, SupervisorError};
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

    #[test]
    fn kernel_cmdline_names_payload_and_a_large_mtu() {
        if std::env::var_os("GATEVM_KERNEL_APPEND").is_some() {
            eprintln!(
                "NOT RUN kernel_cmdline_names_payload_and_a_large_mtu: GATEVM_KERNEL_APPEND is set"
            );
            return;
        }
        assert_eq!(
            kernel_cmdline("gw", "containerd", gatevm_net::ETHERNET_MTU),
            "console=ttyS0 quiet panic=-1 gatevm.hostname=gw"
        );
        assert_eq!(
            kernel_cmdline("gw", "k3s", gatevm_net::LARGE_MTU),
            "console=ttyS0 quiet panic=-1 gatevm.hostname=gw gatevm.payload=k3s gatevm.mtu=65520"
        );
    }
}

/// The exec relay between a CLI client and the guest, against a fake guest that keeps to the
/// credit windows: a client that stops reading stops only its own relay.
#[cfg(test)]
mod relay_tests {
    use super::{relay_exec, Agent};
    use crate::control::CLIENT_STREAM;
    use gatevm_protocol::flow::SendWindow;
    use gatevm_protocol::{
        asyncio, ExecRequest, ExitStatus, Fd, Frame, GuestMsg, DATA_CHUNK, INITIAL_WINDOW,
        PROTOCOL_VERSION, STREAM_CONTROL,
    };
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixStream;

    /// The fake process sends nothing and never exits.
    const RUNS_SILENTLY: usize = usize::MAX;

    #[derive(Default)]
    struct Seen {
        /// Output credit granted by the host, per stream.
        granted: HashMap<u32, u64>,
        /// Stdin bytes the host sent, per stream.
        stdin: HashMap<u32, u64>,
    }

    /// A guest that answers status, starts every exec, and streams `output` bytes on it within
    /// the host's credit (then exits); it grants stdin credit back for every frame when
    /// `grant_stdin`.
    async fn fake_guest(output: usize, grant_stdin: bool) -> (Agent, Arc<Mutex<Seen>>) {
        let (host, guest) = UnixStream::pair().expect("socketpair");
        let (hr, hw) = host.into_split();
        let agent = Agent::spawn(hr, hw);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (gr, gw) = guest.into_split();
        let gw = Arc::new(tokio::sync::Mutex::new(gw));
        let windows: Arc<Mutex<HashMap<u32, SendWindow>>> = Arc::default();
        let notify = Arc::new(tokio::sync::Notify::new());
        let put = |gw: Arc<tokio::sync::Mutex<tokio::net::unix::OwnedWriteHalf>>,
                   f: Frame<GuestMsg>| async move {
            let b = f.encode().expect("encode");
            let _ = gw.lock().await.write_all(&b).await;
        };
        put(
            gw.clone(),
            Frame::Msg {
                stream: STREAM_CONTROL,
                msg: GuestMsg::Hello {
                    version: PROTOCOL_VERSION,
                    software: "fake".into(),
                    uptime_ms: None,
                    kernel: None,
                },
            },
        )
        .await;
        let s2 = seen.clone();
        tokio::spawn(async move {
            let mut r = asyncio::FrameReader::new(gr);
            while let Ok(Some(f)) = r.read_frame::<GuestMsg>().await {
                match f {
                    Frame::Msg {
                        msg: GuestMsg::StatusRequest,
                        ..
                    } => {
                        let answer = Frame::Msg {
                            stream: STREAM_CONTROL,
                            msg: GuestMsg::Status {
                                uptime_ms: 1,
                                payloads: vec![],
                            },
                        };
                        put(gw.clone(), answer).await;
                    }
                    Frame::Msg {
                        stream,
                        msg: GuestMsg::Exec(_),
                    } => {
                        windows
                            .lock()
                            .expect("lock")
                            .insert(stream, SendWindow::new());
                        let (gw, windows, notify) = (gw.clone(), windows.clone(), notify.clone());
                        tokio::spawn(async move {
                            let started = Frame::Msg {
                                stream,
                                msg: GuestMsg::ExecStarted { pid: stream },
                            };
                            put(gw.clone(), started).await;
                            if output == RUNS_SILENTLY {
                                return;
                            }
                            let mut left = output;
                            while left > 0 {
                                let n = windows
                                    .lock()
                                    .expect("lock")
                                    .get_mut(&stream)
                                    .map(|w| w.take(left.min(DATA_CHUNK)))
                                    .unwrap_or(0);
                                if n == 0 {
                                    // Polls too: a grant between the take and this wait would
                                    // otherwise be missed.
                                    let _ = tokio::time::timeout(
                                        Duration::from_millis(20),
                                        notify.notified(),
                                    )
                                    .await;
                                    continue;
                                }
                                let data = Frame::Data {
                                    stream,
                                    fd: Fd::Stdout,
                                    bytes: vec![b'y'; n],
                                };
                                put(gw.clone(), data).await;
                                left -= n;
                            }
                            let exit = Frame::Msg {
                                stream,
                                msg: GuestMsg::Exit(ExitStatus {
                                    code: Some(0),
                                    signal: None,
                                }),
                            };
                            put(gw.clone(), exit).await;
                        });
                    }
                    Frame::Credit { stream, bytes } => {
                        *s2.lock().expect("lock").granted.entry(stream).or_default() +=
                            u64::from(bytes);
                        if let Some(w) = windows.lock().expect("lock").get_mut(&stream) {
                            w.grant(bytes);
                        }
                        notify.notify_waiters();
                    }
                    Frame::Data {
                        stream,
                        fd: Fd::Stdin,
                        bytes,
                    } => {
                        *s2.lock().expect("lock").stdin.entry(stream).or_default() +=
                            bytes.len() as u64;
                        if grant_stdin {
                            let grant = Frame::Credit {
                                stream,
                                bytes: bytes.len() as u32,
                            };
                            put(gw.clone(), grant).await;
                        }
                    }
                    _ => {}
                }
            }
        });
        let mut c = agent.connected.clone();
        tokio::time::timeout(Duration::from_secs(10), async {
            while !*c.borrow_and_update() {
                let _ = c.changed().await;
            }
        })
        .await
        .expect("the fake guest's hello");
        (agent, seen)
    }

    /// A client connection running `relay_exec`; returns the client's end.
    fn client(agent: &Agent, stdin: bool) -> UnixStream {
        let (mine, theirs) = UnixStream::pair().expect("socketpair");
        let agent = agent.clone();
        tokio::spawn(async move {
            let req = ExecRequest {
                argv: vec!["yes".into()],
                stdin,
                ..Default::default()
            };
            let _ = relay_exec(theirs, agent, GuestMsg::Exec(req)).await;
        });
        mine
    }

    async fn status_within_1s(agent: &Agent) -> Duration {
        let t = std::time::Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(1),
            agent.refresh_status(Duration::from_secs(1)),
        )
        .await;
        assert!(matches!(r, Ok(true)), "no status within 1 s");
        t.elapsed()
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_stops_only_its_own_relay() {
        const OUTPUT: usize = 16 * 1024 * 1024;
        let (agent, seen) = fake_guest(OUTPUT, false).await;
        // This client never reads its socket.
        let _stalled = client(&agent, false);
        // Let the relay fill the client's socket and the guest its window.
        let mut last = 0;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let g = seen.lock().expect("lock").granted.values().sum::<u64>();
            if g == last && g > 0 {
                break;
            }
            last = g;
        }
        let granted = seen.lock().expect("lock").granted.values().sum::<u64>();
        // Granted only what was written to the client's socket: bounded by its buffer, far
        // below the 16 MiB the guest would send.
        assert!(granted > 0 && granted < 2 * 1024 * 1024, "{granted}");
        let t = status_within_1s(&agent).await;
        println!("status in {t:?} beside a client that does not read ({granted} bytes granted)");
        // Another exec runs to its end meanwhile.
        let mut reader = asyncio::FrameReader::new(client(&agent, false));
        let t = std::time::Instant::now();
        let mut bytes = 0;
        loop {
            match tokio::time::timeout(Duration::from_secs(5), reader.read_frame::<GuestMsg>())
                .await
            {
                Ok(Ok(Some(Frame::Data { bytes: b, .. }))) => bytes += b.len(),
                Ok(Ok(Some(Frame::Msg {
                    stream: CLIENT_STREAM,
                    msg: GuestMsg::Exit(_),
                }))) => break,
                Ok(Ok(Some(_))) => {}
                other => panic!("the second exec did not finish: {other:?}"),
            }
        }
        println!("a second exec streamed {bytes} bytes in {:?}", t.elapsed());
        assert_eq!(bytes, OUTPUT);
    }

    #[tokio::test]
    async fn stdin_is_read_from_the_client_only_within_the_guest_credit() {
        let (agent, seen) = fake_guest(RUNS_SILENTLY, false).await;
        let conn = client(&agent, true);
        let (_r, mut w) = conn.into_split();
        // The client offers 4 MiB; the guest grants nothing beyond the initial window.
        let writer = tokio::spawn(async move {
            let chunk = vec![b'x'; DATA_CHUNK];
            for _ in 0..128 {
                let f: Frame<GuestMsg> = Frame::Data {
                    stream: CLIENT_STREAM,
                    fd: Fd::Stdin,
                    bytes: chunk.clone(),
                };
                if asyncio::write_frame(&mut w, &f).await.is_err() {
                    return;
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        status_within_1s(&agent).await;
        let sent: u64 = seen.lock().expect("lock").stdin.values().sum();
        assert_eq!(
            sent,
            u64::from(INITIAL_WINDOW),
            "stdin beyond the guest's credit"
        );
        assert!(
            !writer.is_finished(),
            "the client's writes should be blocked"
        );
        writer.abort();
    }

    #[tokio::test]
    async fn stdin_flows_on_as_the_guest_grants() {
        // Regression: with no credit left and nothing pending, the relay must still wake up for
        // the next grant.
        let (agent, seen) = fake_guest(RUNS_SILENTLY, true).await;
        let conn = client(&agent, true);
        let (_r, mut w) = conn.into_split();
        let total = 4 * INITIAL_WINDOW as u64;
        let chunk = vec![b'x'; DATA_CHUNK];
        for _ in 0..(total as usize / DATA_CHUNK) {
            let f: Frame<GuestMsg> = Frame::Data {
                stream: CLIENT_STREAM,
                fd: Fd::Stdin,
                bytes: chunk.clone(),
            };
            tokio::time::timeout(Duration::from_secs(10), asyncio::write_frame(&mut w, &f))
                .await
                .expect("the relay stopped reading stdin")
                .expect("write");
        }
        tokio::time::timeout(Duration::from_secs(10), async {
            while seen.lock().expect("lock").stdin.values().sum::<u64>() < total {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("all stdin reached the guest");
    }
}
