//! Operations on instances from another process (the CLI, or any Rust program): status, list,
//! stop, delete, exec, read a guest file, and starting a detached supervisor.

use crate::config::InstanceConfig;
use crate::control::{AgentInfo, CtlReply, CtlRequest, InstanceStatus, Progress, CLIENT_STREAM};
use crate::lock::is_held;
use crate::name::{validate, NameError};
use crate::paths::{instances_dir, InstancePaths};
use crate::state::{Phase, StateFile};
use crate::supervisor::state::{
    phase_name, read_state, read_state_quietly, record_without_processes, recover_stale,
};
use gatevm_abi::{asyncio, ExecRequest, Fd, Frame, GuestMsg};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

/// Errors of instance operations; each message names the instance and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("instance {0:?} does not exist (create it with `gatevm start {0}`)")]
    NotFound(String),
    #[error("instance {0:?} is not running (start it with `gatevm start {0}`)")]
    NotRunning(String),
    #[error("instance {0:?} is already running")]
    AlreadyRunning(String),
    #[error("instance {0:?} is running: stop it first or use --force")]
    RunningNoForce(String),
    #[error("instance {name:?}: {message}")]
    Control { name: String, message: String },
    /// A [`read_file`] failed: the guest refused or could not read the file, sent more than the
    /// limit, or did not finish in time.
    #[error("instance {name:?}: reading {path} in the guest: {message}")]
    ReadFile {
        name: String,
        path: String,
        message: String,
    },
    #[error("instance {name:?}: {what}: {source}")]
    Io {
        name: String,
        what: String,
        source: std::io::Error,
    },
}

fn ioe(name: &str, what: &str) -> impl FnOnce(std::io::Error) -> ClientError {
    let (name, what) = (name.to_string(), what.to_string());
    move |source| ClientError::Io { name, what, source }
}

/// Paths of an existing instance.
pub fn existing(name: &str) -> Result<InstancePaths, ClientError> {
    validate(name)?;
    let p = InstancePaths::new(name);
    if !p.exists() {
        return Err(ClientError::NotFound(name.to_string()));
    }
    Ok(p)
}

/// Whether the instance's supervisor is alive.
pub fn is_running(paths: &InstancePaths) -> bool {
    is_held(&paths.lock())
}

async fn connect(paths: &InstancePaths) -> Result<UnixStream, ClientError> {
    let name = &paths.name;
    if !is_running(paths) {
        return Err(ClientError::NotRunning(name.clone()));
    }
    // The control socket appears a moment after the supervisor takes the lock.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match UnixStream::connect(paths.control_socket()).await {
            Ok(s) => return Ok(s),
            Err(e) => {
                if Instant::now() > deadline || !is_running(paths) {
                    return Err(ClientError::Control {
                        name: name.clone(),
                        message: format!(
                            "the supervisor does not answer on {}: {e}",
                            paths.control_socket().display()
                        ),
                    });
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn request(
    paths: &InstancePaths,
    req: CtlRequest,
    timeout: Duration,
) -> Result<CtlReply, ClientError> {
    let name = paths.name.clone();
    let fut = async {
        let mut s = connect(paths).await?;
        asyncio::write_frame(
            &mut s,
            &Frame::Msg {
                stream: CLIENT_STREAM,
                msg: req,
            },
        )
        .await
        .map_err(|e| ClientError::Control {
            name: name.clone(),
            message: gatevm_abi::error_chain(&e),
        })?;
        match asyncio::read_frame::<CtlReply, _>(&mut s).await {
            Ok(Some(Frame::Msg { msg, .. })) => Ok(msg),
            Ok(_) => Err(ClientError::Control {
                name: name.clone(),
                message: "the supervisor closed the connection".into(),
            }),
            Err(e) => Err(ClientError::Control {
                name: name.clone(),
                message: gatevm_abi::error_chain(&e),
            }),
        }
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| ClientError::Control {
            name: name.clone(),
            message: "the supervisor did not answer in time".into(),
        })?
}

/// Status from the files alone (no supervisor to ask).
fn offline_status(
    paths: &InstancePaths,
    cfg: Option<InstanceConfig>,
    state: Option<StateFile>,
) -> InstanceStatus {
    let running = is_running(paths);
    let mut st = state.unwrap_or_else(|| StateFile::stopped(None));
    if !running && st.phase != Phase::Stopped {
        // The supervisor died without recording it (SIGKILL, host crash).
        after_dead_supervisor(paths, &mut st);
    }
    let cfg = cfg.unwrap_or_else(|| InstanceConfig {
        cpus: 0,
        memory_mib: 0,
        disk_gib: 0,
        ..InstanceConfig::new(&paths.name)
    });
    let stopped = st.phase == Phase::Stopped;
    InstanceStatus {
        name: paths.name.clone(),
        state: phase_name(st.phase).into(),
        healthy: false,
        backend: st.backend.clone(),
        backend_note: st.backend_note.clone(),
        net: cfg.net.name().into(),
        kernel: st.kernel.clone(),
        ephemeral: cfg.ephemeral.is_some(),
        k3s: None,
        cpus: cfg.cpus,
        memory_mib: cfg.memory_mib,
        forwards: crate::config::all_forwards(&cfg)
            .iter()
            .map(|f| f.to_string())
            .collect(),
        supervisor_pid: if stopped {
            None
        } else {
            st.supervisor.map(|p| p.pid)
        },
        vm_pid: if stopped { None } else { st.vmm.map(|p| p.pid) },
        agent: AgentInfo::default(),
        payloads: vec![],
        started_at_ms: st.started_at_ms,
        agent_ready_ms: st.agent_ready_ms,
        ready_ms: st.ready_ms,
        stop_reason: st.stop_reason,
        last_error: st.last_error,
        logs: paths.logs().display().to_string(),
        processes: vec![],
        containerd_socket: None,
        volumes: vec![],
        registries: vec![],
        proxy_env: vec![],
        role: None,
        cluster_server: None,
    }
    .with_settings(&cfg)
}

/// The stop reason of a supervisor that died without recording it (README, "When things fail").
const SUPERVISOR_DIED: &str = "the supervisor process died unexpectedly";

/// Marks `st` (the state a dead supervisor left) as stopped with the reason, and clears up after
/// that supervisor.
fn after_dead_supervisor(paths: &InstancePaths, st: &mut StateFile) {
    st.phase = Phase::Stopped;
    st.stop_reason = Some(SUPERVISOR_DIED.into());
    st.last_error = st.stop_reason.clone();
    clean_up_after_dead_supervisor(paths, st);
}

/// After a `start` whose supervisor ended without a word (killed before it recorded its run, e.g.
/// by SIGKILL right after it began): records the instance as stopped by the supervisor's death,
/// under the instance lock, so `status` does not go on showing the previous run's stop reason.
/// Nothing is recorded when that supervisor (or a later one) recorded its run itself (a start
/// time from `spawned_at_ms` on: `status` then finds the dead supervisor), or when another
/// supervisor holds the lock. `spawned_at_ms` is when the start launched the supervisor.
pub fn record_silent_supervisor_death(name: &str, spawned_at_ms: u64) {
    let paths = InstancePaths::new(name);
    let Ok(Some(_lock)) = crate::lock::try_lock(&paths.lock()) else {
        return;
    };
    let mut st = read_state(&paths).unwrap_or_else(|| StateFile::stopped(None));
    if st.phase != Phase::Stopped || st.started_at_ms.is_some_and(|t| t >= spawned_at_ms) {
        return;
    }
    recover_stale(&paths);
    st.stop_reason = Some(SUPERVISOR_DIED.into());
    st.last_error = st.stop_reason.clone();
    if let Err(e) = record_without_processes(&paths, &st) {
        tracing::warn!("recording the stop of {name}: {e}");
    }
}

/// The first client to notice that a supervisor died without recording it (SIGKILL, host crash)
/// clears what it left (its children are dead already, by their death signal): the root mount,
/// the sockets, the loopback guard; and records the instance as stopped. This happens under the
/// instance lock, so never beside a live supervisor; a start that races with it waits for the lock.
fn clean_up_after_dead_supervisor(paths: &InstancePaths, st: &StateFile) {
    let Ok(Some(_lock)) = crate::lock::try_lock(&paths.lock()) else {
        return;
    };
    // Under the lock, the state file is re-read: a supervisor may have come and gone meanwhile.
    if read_state(paths).is_some_and(|now| now.phase == Phase::Stopped) {
        return;
    }
    recover_stale(paths);
    if let Err(e) = record_without_processes(paths, st) {
        tracing::warn!("recording the stop of {}: {e}", paths.name);
    }
}

fn read_config(paths: &InstancePaths) -> Option<InstanceConfig> {
    read_config_checked(paths).ok().flatten()
}

/// Why an instance's saved config could not be used.
#[derive(Debug, thiserror::Error)]
enum ConfigFileError {
    /// The file exists but could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file does not decode.
    #[error("{} is corrupt; the next start rewrites it", path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// The saved config; `Ok(None)` when there is none, `Err` naming the file when it is unreadable.
fn read_config_checked(paths: &InstancePaths) -> Result<Option<InstanceConfig>, ConfigFileError> {
    let path = paths.config();
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(ConfigFileError::Read { path, source }),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| ConfigFileError::Corrupt { path, source })
}

/// The configuration an existing instance last ran with (None for a new instance, or when the
/// file is unreadable, in which case the defaults apply again).
pub fn saved_config(name: &str) -> Option<InstanceConfig> {
    validate(name).ok()?;
    read_config(&InstancePaths::new(name))
}

/// The status of one instance; asks the supervisor when it runs.
pub async fn status(name: &str) -> Result<InstanceStatus, ClientError> {
    let paths = existing(name)?;
    if is_running(&paths) {
        match request(&paths, CtlRequest::Status, Duration::from_secs(5)).await {
            Ok(CtlReply::Status(s)) => return Ok(*s),
            Ok(other) => tracing::warn!("unexpected status reply: {other:?}"),
            Err(e) => {
                let mut st = offline_status(&paths, read_config(&paths), read_state(&paths));
                st.last_error = Some(format!(
                    "the supervisor does not answer: {}",
                    gatevm_abi::error_chain(&e)
                ));
                return Ok(st);
            }
        }
    }
    let (cfg, cfg_err) = match read_config_checked(&paths) {
        Ok(c) => (c, None),
        Err(e) => (None, Some(gatevm_abi::error_chain(&e))),
    };
    let mut st = offline_status(&paths, cfg, read_state(&paths));
    if let Some(e) = cfg_err {
        st.last_error = Some(e);
    }
    Ok(st)
}

/// Names of all instances, sorted.
pub fn names() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(instances_dir())
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| validate(n).is_ok() && InstancePaths::new(n).exists())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Status of every instance.
pub async fn list() -> Vec<InstanceStatus> {
    let mut out = Vec::new();
    for n in names() {
        if let Ok(s) = status(&n).await {
            out.push(s);
        }
    }
    out
}

/// Stops an instance: graceful within `timeout`, then forced. Returns when every process of the
/// instance is gone and its mount and sockets are removed.
pub async fn stop(name: &str, timeout: Duration) -> Result<(), ClientError> {
    let paths = existing(name)?;
    if !is_running(&paths) {
        // A crashed run's leftovers go now, not at the next status or start.
        // (Read quietly: a corrupt state file is no news to someone stopping.)
        if let Some(mut st) = read_state_quietly(&paths).filter(|s| s.phase != Phase::Stopped) {
            after_dead_supervisor(&paths, &mut st);
        }
        return Err(ClientError::NotRunning(name.to_string()));
    }
    let asked = request(
        &paths,
        CtlRequest::Stop {
            timeout_secs: timeout.as_secs(),
        },
        Duration::from_secs(5),
    )
    .await;
    if let Err(e) = &asked {
        tracing::warn!(
            "graceful stop request failed: {}; forcing",
            gatevm_abi::error_chain(e)
        );
    }
    // The supervisor's own deadline is `timeout` plus a few seconds of teardown.
    let deadline = Instant::now()
        + if asked.is_ok() {
            timeout + Duration::from_secs(10)
        } else {
            Duration::ZERO
        };
    while is_running(&paths) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if is_running(&paths) {
        force_kill(&paths);
    }
    Ok(())
}

/// Kills the supervisor (its children die with it through their death signal) and clears leftovers.
fn force_kill(paths: &InstancePaths) {
    if let Some(sup) = read_state(paths).and_then(|s| s.supervisor) {
        if sup.alive() {
            // SAFETY: kill has no memory effects; the pid was verified by its start time.
            unsafe {
                libc::kill(sup.pid as i32, libc::SIGKILL);
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while is_running(paths) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    recover_stale(paths);
    if let Some(mut st) = read_state(paths) {
        st.phase = Phase::Stopped;
        st.stop_reason = Some("stopped by force: the supervisor did not finish in time".into());
        let _ = record_without_processes(paths, &st);
    }
}

/// Deletes an instance and everything it keeps (state disk, writable root layer, logs).
pub async fn delete(name: &str, force: bool) -> Result<(), ClientError> {
    let paths = existing(name)?;
    if is_running(&paths) {
        if !force {
            return Err(ClientError::RunningNoForce(name.to_string()));
        }
        stop(name, Duration::from_secs(10)).await?;
    }
    // Under the lock, so no supervisor starts while the files go (one waiting for the lock then
    // finds them gone and starts a new instance).
    let _lock = match crate::lock::try_lock(&paths.lock()) {
        Ok(Some(l)) => Some(l),
        Ok(None) => return Err(ClientError::AlreadyRunning(name.to_string())),
        // Something that is no lock file (a directory left in its place) cannot be held by a
        // supervisor either: it goes with the rest.
        Err(_) if !is_running(&paths) => None,
        Err(e) => return Err(ioe(name, "taking the instance lock")(e)),
    };
    recover_stale(&paths);
    // While this holds the lock at its path no supervisor can run: the runtime directory goes
    // first. The instance directory then moves aside in one step, lock and all, and is removed
    // from there. A racing start that waits for the lock finds no instance and makes a new one
    // beside the old one being removed; removing the directory in place instead let a start
    // create a fresh lock file in it half-way and boot into what was still being removed.
    remove_any(&paths.run).map_err(ioe(name, &format!("removing {}", paths.run.display())))?;
    let aside = paths
        .dir
        .with_file_name(format!(".deleting-{name}-{}", std::process::id()));
    match gatevm_fsutil::rename_durable(&paths.dir, &aside) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(ioe(name, &format!("moving {} aside", paths.dir.display()))(
                e,
            ))
        }
    }
    remove_any(&aside).map_err(ioe(name, &format!("removing {}", aside.display())))?;
    // What an earlier delete of this name left when it was killed half-way (never listed: the
    // name is no instance name); the pid in the name tells whether that delete still runs.
    let stale = format!(".deleting-{name}-");
    for e in std::fs::read_dir(instances_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let file = e.file_name().to_string_lossy().into_owned();
        // `.deleting-NAME-PID`: the name may hold '-' itself, so the rest must be the pid.
        let pid = file.strip_prefix(&stale).unwrap_or_default();
        // A delete still running has its own to remove.
        let ours_or_dead =
            pid == std::process::id().to_string() || !Path::new("/proc").join(pid).exists();
        if !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) && ours_or_dead {
            let _ = remove_any(&e.path());
        }
    }
    Ok(())
}

/// Discards a stopped instance's state: the state disk and the writable layer of its root.
pub fn reset_state(name: &str) -> Result<(), ClientError> {
    validate(name)?;
    let paths = InstancePaths::new(name);
    if is_running(&paths) {
        return Err(ClientError::AlreadyRunning(name.to_string()));
    }
    recover_stale(&paths);
    for p in [
        paths.state_disk(),
        paths.dir.join("state.img.tmp"),
        paths.upper_image(),
        paths.dir.join("rootfs-rw.img.tmp"),
    ] {
        if let Err(e) = std::fs::remove_file(&p) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(ioe(name, &format!("removing {}", p.display()))(e));
            }
        }
    }
    for d in [
        paths.legacy_upper(),
        paths.dir.join("rootfs-work"),
        paths.upper_mount(),
    ] {
        if d.exists() {
            std::fs::remove_dir_all(&d).map_err(ioe(name, &format!("removing {}", d.display())))?;
        }
    }
    Ok(())
}

/// Name prefix of the throwaway instances of `gatevm vm-run`.
pub const EPHEMERAL_PREFIX: &str = "vmrun-";
/// File an ephemeral instance's client holds locked for its whole life (before its supervisor
/// exists, too, while an image is unpacked).
pub const EPHEMERAL_HOLD: &str = "vmrun.lock";

/// Removes throwaway instances whose client is gone (killed before it could clean up). Returns
/// their names.
pub fn sweep_ephemeral() -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(instances_dir()) else {
        return vec![];
    };
    let mut swept = Vec::new();
    for e in rd.flatten() {
        let Ok(name) = e.file_name().into_string() else {
            continue;
        };
        if !name.starts_with(EPHEMERAL_PREFIX) || validate(&name).is_err() {
            continue;
        }
        let paths = InstancePaths::new(&name);
        // Swept only under its hold lock: the vm-run that made it holds that lock for its whole
        // life, and one that loses a fresh directory to this sweep takes another name.
        let Ok(Some(_hold)) = crate::lock::try_lock(&paths.dir.join(EPHEMERAL_HOLD)) else {
            continue;
        };
        if is_running(&paths) {
            continue;
        }
        // Only throwaway instances (or one that died before writing its configuration).
        if paths.exists() && read_config(&paths).is_none_or(|c| c.ephemeral.is_none()) {
            continue;
        }
        if remove_ephemeral(&paths).is_ok() {
            swept.push(name);
        }
    }
    swept
}

/// Removes a throwaway instance that no supervisor runs: leftovers of its processes and mount, its
/// directory and its runtime directory.
pub fn remove_ephemeral(paths: &InstancePaths) -> std::io::Result<()> {
    recover_stale(paths);
    if paths.dir.exists() {
        std::fs::remove_dir_all(&paths.dir)?;
    }
    remove_any(&paths.run)
}

/// Removes what is at `p`: a directory with its contents, or a file or symlink (never what a
/// symlink points to); nothing there is fine.
fn remove_any(p: &Path) -> std::io::Result<()> {
    let r = match std::fs::symlink_metadata(p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
    };
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Runs a process in the guest, streaming its stdin/stdout/stderr, and returns its exit code
/// (127 not found, 126 not executable, 128+N killed by signal N; 141 when our own output was
/// closed, as for a process killed by SIGPIPE — the guest process then gets SIGHUP).
///
/// `resize` delivers terminal size changes for TTY sessions; `signals` signals to forward.
pub async fn exec<I, O, E>(
    name: &str,
    req: ExecRequest,
    mut stdin: Option<I>,
    mut stdout: O,
    mut stderr: E,
    mut events: tokio::sync::mpsc::Receiver<GuestMsg>,
) -> Result<i32, ClientError>
where
    I: AsyncRead + Unpin,
    O: AsyncWrite + Unpin,
    E: AsyncWrite + Unpin,
{
    let paths = existing(name)?;
    let cerr = |m: String| ClientError::Control {
        name: name.to_string(),
        message: m,
    };
    let s = connect(&paths).await?;
    let (r, mut w) = s.into_split();
    // Raced against stdin in select!, so a reader that keeps partial frames across cancellation.
    let mut r = asyncio::FrameReader::new(r);
    asyncio::write_frame(
        &mut w,
        &Frame::Msg {
            stream: CLIENT_STREAM,
            msg: CtlRequest::Exec(req),
        },
    )
    .await
    .map_err(|e| cerr(gatevm_abi::error_chain(&e)))?;
    let mut buf = vec![0u8; gatevm_abi::DATA_CHUNK];
    let mut stdin_open = stdin.is_some();
    let mut events_open = true;
    // The supervisor answers within its own start timeout (30 s, see relay_exec); a silent one
    // must not hang the caller.
    let mut started = false;
    let start_deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(start_deadline), if !started => {
                return Err(cerr("the supervisor did not start the command within 45 s".into()));
            }
            f = r.read_frame::<GuestMsg>() => {
                started = true;
                match f.map_err(|e| cerr(gatevm_abi::error_chain(&e)))? {
                    None => return Err(cerr("the supervisor closed the exec stream".into())),
                    Some(Frame::Data { fd, bytes, .. }) if fd != Fd::Stdin => {
                        let out: &mut (dyn AsyncWrite + Unpin) =
                            if fd == Fd::Stdout { &mut stdout } else { &mut stderr };
                        let written = match out.write_all(&bytes).await {
                            Ok(()) => out.flush().await,
                            Err(e) => Err(e),
                        };
                        match written {
                            Ok(()) => {}
                            // Our reader went away (`| head`): end like a process killed by
                            // SIGPIPE; the supervisor hangs up on the guest process.
                            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                                return Ok(128 + libc::SIGPIPE)
                            }
                            Err(e) => return Err(ioe(name, "writing output")(e)),
                        }
                    }
                    Some(Frame::Msg { msg: GuestMsg::Exit(st), .. }) => return Ok(st.as_exit_code()),
                    Some(Frame::Msg { msg: GuestMsg::ExecFailed { code, message }, .. }) => {
                        let line = format!("gatevm: {message}\n");
                        let _ = stderr.write_all(line.as_bytes()).await;
                        let _ = stderr.flush().await;
                        return Ok(code);
                    }
                    Some(Frame::Msg { msg: GuestMsg::Error { message }, .. }) => return Err(cerr(message)),
                    Some(_) => {}
                }
            }
            n = async { match stdin.as_mut() { Some(i) => i.read(&mut buf).await, None => Ok(0) } }, if stdin_open => {
                match n {
                    Ok(0) | Err(_) => {
                        stdin_open = false;
                        asyncio::write_frame(&mut w, &Frame::<GuestMsg>::Eof { stream: CLIENT_STREAM, fd: Fd::Stdin }).await.map_err(|e| cerr(gatevm_abi::error_chain(&e)))?;
                    }
                    Ok(n) => {
                        asyncio::write_frame(&mut w, &Frame::<GuestMsg>::Data { stream: CLIENT_STREAM, fd: Fd::Stdin, bytes: buf[..n].to_vec() }).await.map_err(|e| cerr(gatevm_abi::error_chain(&e)))?;
                    }
                }
            }
            ev = events.recv(), if events_open => {
                match ev {
                    Some(msg) => asyncio::write_frame(&mut w, &Frame::Msg { stream: CLIENT_STREAM, msg }).await.map_err(|e| cerr(gatevm_abi::error_chain(&e)))?,
                    None => events_open = false,
                }
            }
        }
    }
}

/// Reads a regular file in the guest through the guest agent, without running any program there
/// (so nothing on the guest's `PATH` is involved): the agent opens `path` itself and refuses
/// anything but a regular file at an absolute path.
///
/// The guest is untrusted, and this is bounded both ways: the whole exchange (connecting
/// included) ends after `timeout`, and a guest that sends more than `max_bytes` bytes is an error,
/// never a truncated answer. Messages from the guest in errors are cut short and stripped of
/// control characters. Fails with [`ClientError::ReadFile`] for a missing file, a directory or
/// other non-regular file, a file over the limit, or a timeout; with the usual errors when the
/// instance does not exist or does not run.
///
/// ```no_run
/// # async fn f() -> Result<(), gatevm_instance::client::ClientError> {
/// use std::time::Duration;
/// let yaml = gatevm_instance::client::read_file(
///     "dev",
///     "/etc/rancher/k3s/k3s.yaml",
///     64 * 1024,
///     Duration::from_secs(10),
/// )
/// .await?;
/// # Ok(()) }
/// ```
pub async fn read_file(
    name: &str,
    path: &str,
    max_bytes: usize,
    timeout: Duration,
) -> Result<Vec<u8>, ClientError> {
    let paths = existing(name)?;
    let fail = |message: String| ClientError::ReadFile {
        name: name.to_string(),
        path: path.to_string(),
        message,
    };
    let exchange = async {
        let mut s = connect(&paths).await?;
        asyncio::write_frame(
            &mut s,
            &Frame::Msg {
                stream: CLIENT_STREAM,
                msg: CtlRequest::ReadFile {
                    path: path.to_string(),
                    max_bytes: max_bytes as u64,
                },
            },
        )
        .await
        .map_err(|e| fail(gatevm_abi::error_chain(&e)))?;
        let mut out = Vec::new();
        loop {
            let f = asyncio::read_frame::<GuestMsg, _>(&mut s)
                .await
                .map_err(|e| fail(gatevm_abi::error_chain(&e)))?;
            match f {
                None => return Err(fail("the supervisor closed the stream".into())),
                Some(Frame::Data {
                    fd: Fd::Stdout,
                    bytes,
                    ..
                }) => {
                    if out.len() + bytes.len() > max_bytes {
                        return Err(fail(format!(
                            "the guest sent more than the limit of {max_bytes} bytes"
                        )));
                    }
                    out.extend_from_slice(&bytes);
                }
                Some(Frame::Data { fd, .. }) => {
                    return Err(fail(format!("the guest sent {fd:?} data for a file")))
                }
                Some(Frame::Msg { msg, .. }) => match msg {
                    GuestMsg::Exit(st) if st.code == Some(0) => return Ok(out),
                    GuestMsg::Exit(st) => {
                        return Err(fail(format!(
                            "the read ended with code {}",
                            st.as_exit_code()
                        )))
                    }
                    GuestMsg::ExecFailed { message, .. } | GuestMsg::Error { message } => {
                        return Err(fail(clean(&message)))
                    }
                    _ => {}
                },
                Some(Frame::Eof { .. } | Frame::Credit { .. }) => {}
            }
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(fail(format!(
            "no complete answer within {:.1} s",
            timeout.as_secs_f64()
        ))),
    }
}

/// A message from the guest, fit for a terminal: at most 300 characters, control characters
/// (terminal escapes) turned into spaces.
fn clean(s: &str) -> String {
    s.chars()
        .take(300)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Starts a detached supervisor for `config` by running `exe __supervise` in a new session, and
/// returns its progress events as they come (read from a pipe on fd 3) until it is ready or fails.
pub fn spawn_supervisor(
    exe: &Path,
    config: &InstanceConfig,
    guest_bin: &Path,
) -> Result<std::io::BufReader<std::fs::File>, ClientError> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    let name = &config.name;
    let paths = InstancePaths::new(name);
    paths
        .create_dirs()
        .map_err(ioe(name, "creating the instance directories"))?;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two fds into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(ioe(name, "creating a pipe")(std::io::Error::last_os_error()));
    }
    // SAFETY: both fds were just created by pipe2 and are owned by nobody else.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let open_log = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(paths.log("supervisor"))
    };
    let log = match open_log() {
        // A racing delete moved the instance's directory away after it was created above: this
        // start makes the instance anew (as its supervisor does when the lock file is gone).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            paths
                .create_dirs()
                .map_err(ioe(name, "creating the instance directories"))?;
            open_log()
        }
        other => other,
    }
    .map_err(ioe(name, "opening the supervisor log"))?;
    let log2 = log
        .try_clone()
        .map_err(ioe(name, "opening the supervisor log"))?;
    let cfg_json = serde_json::to_string(config).map_err(|e| ClientError::Control {
        name: name.clone(),
        message: e.to_string(),
    })?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("__supervise")
        .arg("--config-json")
        .arg(cfg_json)
        .arg("--guest-bin")
        .arg(guest_bin)
        .arg("--progress-fd")
        .arg("3")
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2);
    let wr_raw = wr.as_raw_fd();
    // SAFETY: between fork and exec we only call async-signal-safe functions (setsid, dup2).
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if wr_raw == 3 {
                libc::fcntl(3, libc::F_SETFD, 0);
            } else if libc::dup2(wr_raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(ioe(
        name,
        &format!("starting the supervisor {}", exe.display()),
    ))?;
    drop(wr);
    // The supervisor is detached (own session); reap it from a thread so it never lingers as a
    // zombie while this process lives on (e.g. the library used from a long-running program).
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    Ok(std::io::BufReader::new(std::fs::File::from(rd)))
}

/// Reads the next progress event from a supervisor's pipe; None at its end.
pub fn next_progress(r: &mut std::io::BufReader<std::fs::File>) -> Option<Progress> {
    use std::io::BufRead;
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return None,
            Ok(_) => {
                if let Ok(p) = serde_json::from_str(line.trim()) {
                    return Some(p);
                }
            }
        }
    }
}
