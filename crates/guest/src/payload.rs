//! Supervision of a payload's services, whatever they run (the profiles in [`crate::profile`]
//! say what): start, readiness probe, restarts with exponential backoff, log capture with
//! rotation, orderly stop.

use crate::reaper::{describe, Reaper};
use crate::sys;
use gatevm_abi::{PayloadState, PayloadStatus};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How the supervisor decides that a started service is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Readiness {
    /// A unix socket accepts connections (containerd's API socket).
    UnixSocket(PathBuf),
    /// A file exists and a TCP connection to the address succeeds (k3s: the kubeconfig it writes
    /// once the API server is up, and its supervisor port).
    TcpAndFile(SocketAddr, PathBuf),
    /// A TCP connection to the address succeeds (a k3s agent: its kubelet's health port).
    Tcp(SocketAddr),
}

impl Readiness {
    /// How long a TCP probe may take before it counts as "not ready yet".
    pub(crate) const TCP_TIMEOUT: Duration = Duration::from_millis(500);

    /// One probe: whether the service answers now.
    pub(crate) fn probe(&self) -> bool {
        match self {
            Readiness::UnixSocket(path) => std::os::unix::net::UnixStream::connect(path).is_ok(),
            Readiness::TcpAndFile(addr, file) => {
                file.is_file() && TcpStream::connect_timeout(addr, Self::TCP_TIMEOUT).is_ok()
            }
            Readiness::Tcp(addr) => TcpStream::connect_timeout(addr, Self::TCP_TIMEOUT).is_ok(),
        }
    }
}

/// What [`Payload::wait_ready`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WaitOutcome {
    /// The payload is ready.
    Ready,
    /// The payload failed for good (not restarted); its last exit or failure message.
    Failed(String),
    /// The payload is being stopped (shutdown).
    Stopping,
    /// Neither happened within the time given.
    Timeout,
}

/// Time a payload gets between SIGTERM and SIGKILL at shutdown unless its configuration says
/// otherwise ([`PayloadConfig::stop_timeout`]).
pub(crate) const PAYLOAD_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How one payload service is run.
#[derive(Debug, Clone)]
pub(crate) struct PayloadConfig {
    /// Name reported in the status.
    pub name: String,
    /// Program to run.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// How readiness is probed.
    pub readiness: Readiness,
    /// File receiving stdout and stderr.
    pub log: PathBuf,
    /// Size at which the log is rotated to `<log>.1`.
    pub log_max: u64,
    /// First restart delay.
    pub backoff_initial: Duration,
    /// Largest restart delay.
    pub backoff_max: Duration,
    /// A run at least this long resets the delay to `backoff_initial`.
    pub healthy_reset: Duration,
    /// Interval of readiness probes.
    pub probe_interval: Duration,
    /// Time between SIGTERM and SIGKILL when the payload is stopped for shutdown.
    pub stop_timeout: Duration,
}

/// Delay before the next restart: the initial delay after a first failure or a healthy run
/// (`ran_for >= healthy_reset`), else double the previous one, capped.
pub(crate) fn next_backoff(
    prev: Option<Duration>,
    ran_for: Duration,
    cfg: &PayloadConfig,
) -> Duration {
    match prev {
        Some(p) if ran_for < cfg.healthy_reset => (p * 2).min(cfg.backoff_max),
        _ => cfg.backoff_initial,
    }
}

/// An append-only log file rotated to `<path>.1` when it would grow over `max` bytes.
pub(crate) struct LogWriter {
    path: PathBuf,
    max: u64,
    file: Option<File>,
    size: u64,
}

impl LogWriter {
    /// Opens (appending) the log, rotating it first when it is already too large.
    pub(crate) fn open(path: &Path, max: u64) -> Self {
        let mut w = LogWriter {
            path: path.to_path_buf(),
            max,
            file: None,
            size: 0,
        };
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        w.reopen();
        if w.size > max {
            w.rotate();
        }
        w
    }

    fn reopen(&mut self) {
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .ok();
        self.size = self
            .file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map(|m| m.len())
            .unwrap_or(0);
    }

    fn rotate(&mut self) {
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        self.file = None;
        if std::fs::rename(&self.path, &old).is_err() {
            let _ = std::fs::remove_file(&self.path);
        }
        self.reopen();
    }

    /// Appends bytes (best effort: a log that cannot be written must not stop the payload).
    pub(crate) fn write(&mut self, buf: &[u8]) {
        if self.size + buf.len() as u64 > self.max && self.size > 0 {
            self.rotate();
        }
        if let Some(f) = self.file.as_mut() {
            if f.write_all(buf).is_ok() {
                self.size += buf.len() as u64;
            }
        }
    }
}

#[derive(Debug)]
struct Inner {
    state: PayloadState,
    pid: Option<i32>,
    restarts: u32,
    last_exit: Option<String>,
    stopping: bool,
}

/// One supervised payload service.
pub(crate) struct Payload {
    cfg: PayloadConfig,
    inner: Mutex<Inner>,
    changed: Condvar,
}

impl Payload {
    /// A payload that has not started (`Pending`).
    pub(crate) fn new(cfg: PayloadConfig) -> Arc<Self> {
        Arc::new(Payload {
            cfg,
            inner: Mutex::new(Inner {
                state: PayloadState::Pending,
                pid: None,
                restarts: 0,
                last_exit: None,
                stopping: false,
            }),
            changed: Condvar::new(),
        })
    }

    /// Its current status.
    pub(crate) fn status(&self) -> PayloadStatus {
        let i = sys::lock(&self.inner);
        PayloadStatus {
            name: self.cfg.name.clone(),
            state: i.state,
            pid: i.pid.map(|p| p as u32),
            restarts: i.restarts,
            last_exit: i.last_exit.clone(),
        }
    }

    /// How it is run.
    pub(crate) fn config(&self) -> &PayloadConfig {
        &self.cfg
    }

    /// Marks a payload that will not be started as `Failed`, with `message` as its last exit
    /// (what the host's status shows), e.g. when what it needs is missing from the root.
    pub(crate) fn fail(&self, message: &str) {
        let mut i = sys::lock(&self.inner);
        if !i.stopping {
            i.state = PayloadState::Failed;
        }
        i.last_exit = Some(message.to_string());
        drop(i);
        self.changed.notify_all();
        crate::glog!("{}: {message}", self.cfg.name);
    }

    /// Waits up to `timeout` for the payload to become ready, fail for good, or be stopped.
    /// A payload that is restarting is waited for.
    pub(crate) fn wait_ready(&self, timeout: Duration) -> WaitOutcome {
        let deadline = Instant::now() + timeout;
        let mut i = sys::lock(&self.inner);
        loop {
            if i.stopping {
                return WaitOutcome::Stopping;
            }
            match i.state {
                PayloadState::Ready => return WaitOutcome::Ready,
                PayloadState::Failed => {
                    return WaitOutcome::Failed(i.last_exit.clone().unwrap_or_default())
                }
                _ => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return WaitOutcome::Timeout;
            }
            i = self
                .changed
                .wait_timeout(i, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Starts the supervisor thread.
    pub(crate) fn start(self: &Arc<Self>, reaper: &'static Reaper) -> io::Result<()> {
        let me = self.clone();
        std::thread::Builder::new()
            .name(format!("payload-{}", self.cfg.name))
            .spawn(move || me.supervise(reaper))?;
        Ok(())
    }

    fn set_state(&self, state: PayloadState) {
        let mut i = sys::lock(&self.inner);
        if !i.stopping {
            i.state = state;
        }
        drop(i);
        self.changed.notify_all();
    }

    fn supervise(&self, reaper: &'static Reaper) {
        let cfg = &self.cfg;
        let log = Arc::new(Mutex::new(LogWriter::open(&cfg.log, cfg.log_max)));
        let mut backoff: Option<Duration> = None;
        loop {
            if !cfg.program.exists() {
                self.program_missing();
                return;
            }
            let spawned = {
                let mut i = sys::lock(&self.inner);
                if i.stopping {
                    return;
                }
                let r = self.spawn_once(reaper, &log);
                match &r {
                    Ok(s) => {
                        i.pid = Some(s.pid);
                        i.state = PayloadState::Starting;
                    }
                    Err(e) => {
                        i.last_exit = Some(format!("cannot start: {e}"));
                        i.state = PayloadState::Restarting;
                    }
                }
                r
            };
            self.changed.notify_all();
            let started = Instant::now();
            let status = match spawned {
                Ok(s) => {
                    crate::glog!("{} started (pid {})", cfg.name, s.pid);
                    Some(self.wait_exit(&s.exit))
                }
                Err(e) => {
                    crate::glog!("{}: cannot start: {e}", cfg.name);
                    None
                }
            };
            if !self.wait_restart(status, started, &mut backoff) {
                return;
            }
        }
    }

    /// The program does not exist: `Failed` (unless stopping), for good.
    fn program_missing(&self) {
        let cfg = &self.cfg;
        let mut i = sys::lock(&self.inner);
        if !i.stopping {
            i.state = PayloadState::Failed;
        }
        i.last_exit = Some(format!("{} not found", cfg.program.display()));
        drop(i);
        self.changed.notify_all();
        crate::glog!(
            "{}: {} not found, not starting it",
            cfg.name,
            cfg.program.display()
        );
    }

    /// Records the end of a run that began at `started` (`status`: its exit, `None` when it
    /// could not start) and, unless the payload is being stopped, counts a restart and waits the
    /// backoff delay (cut short by a stop). False when the payload is being stopped.
    fn wait_restart(
        &self,
        status: Option<gatevm_abi::ExitStatus>,
        started: Instant,
        backoff: &mut Option<Duration>,
    ) -> bool {
        let cfg = &self.cfg;
        let mut i = sys::lock(&self.inner);
        i.pid = None;
        if let Some(st) = status {
            i.last_exit = Some(describe(&st));
        }
        if i.stopping {
            drop(i);
            self.changed.notify_all();
            return false;
        }
        i.restarts = i.restarts.saturating_add(1);
        i.state = PayloadState::Restarting;
        let delay = next_backoff(*backoff, started.elapsed(), cfg);
        *backoff = Some(delay);
        crate::glog!(
            "{} exited ({}), restart #{} in {}ms",
            cfg.name,
            i.last_exit.as_deref().unwrap_or("?"),
            i.restarts,
            delay.as_millis()
        );
        self.changed.notify_all();
        let deadline = Instant::now() + delay;
        while !i.stopping {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            i = self
                .changed
                .wait_timeout(i, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        true
    }

    fn spawn_once(
        &self,
        reaper: &Reaper,
        log: &Arc<Mutex<LogWriter>>,
    ) -> io::Result<crate::reaper::Spawned> {
        let cfg = &self.cfg;
        let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        let mut cmd = Command::new(&cfg.program);
        cmd.args(&cfg.args)
            .env_clear()
            .env("PATH", crate::exec::DEFAULT_PATH)
            .env("HOME", "/root")
            // The proxy variables the host handed over (`start --proxy-env`), if any.
            .envs(crate::settings::get().proxy_env())
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::from(wr.try_clone()?))
            .stderr(Stdio::from(wr));
        // SAFETY: runs in the forked child before exec; setsid is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let s = reaper.spawn(&mut cmd)?;
        drop(cmd);
        let log = log.clone();
        let mut rd = File::from(rd);
        std::thread::Builder::new()
            .name(format!("{}-log", cfg.name))
            .spawn(move || {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match rd.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => sys::lock(&log).write(&buf[..n]),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
            })?;
        Ok(s)
    }

    fn wait_exit(
        &self,
        exit: &std::sync::mpsc::Receiver<gatevm_abi::ExitStatus>,
    ) -> gatevm_abi::ExitStatus {
        let mut ready = false;
        loop {
            let wait = if ready {
                Duration::from_secs(3600)
            } else {
                self.cfg.probe_interval
            };
            match exit.recv_timeout(wait) {
                Ok(s) => return s,
                Err(RecvTimeoutError::Disconnected) => {
                    return gatevm_abi::ExitStatus {
                        code: None,
                        signal: None,
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    if !ready && self.cfg.readiness.probe() {
                        ready = true;
                        self.set_state(PayloadState::Ready);
                        crate::glog!("{} ready", self.cfg.name);
                    }
                }
            }
        }
    }

    /// Stops the payload for shutdown: state `Stopping`, SIGTERM, up to `timeout` for it to
    /// exit, then SIGKILL (and up to 2 s more). No restart happens afterwards.
    pub(crate) fn stop(&self, reaper: &Reaper, timeout: Duration) {
        let pid = {
            let mut i = sys::lock(&self.inner);
            i.stopping = true;
            i.state = PayloadState::Stopping;
            i.pid
        };
        self.changed.notify_all();
        let Some(pid) = pid else { return };
        reaper.signal(pid, libc::SIGTERM, false);
        if !self.wait_gone(pid, timeout) {
            crate::glog!(
                "{} did not stop in {}s, killing it",
                self.cfg.name,
                timeout.as_secs()
            );
            reaper.signal(pid, libc::SIGKILL, false);
            self.wait_gone(pid, Duration::from_secs(2));
        }
    }

    fn wait_gone(&self, pid: i32, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut i = sys::lock(&self.inner);
        while i.pid == Some(pid) {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            i = self
                .changed
                .wait_timeout(i, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path, program: &str, args: &[&str]) -> PayloadConfig {
        PayloadConfig {
            name: "test".into(),
            program: program.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            readiness: Readiness::UnixSocket(dir.join("sock")),
            log: dir.join("log/payload.log"),
            log_max: 1024 * 1024,
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_millis(40),
            healthy_reset: Duration::from_secs(60),
            probe_interval: Duration::from_millis(10),
            stop_timeout: Duration::from_secs(5),
        }
    }

    fn wait_for(p: &Payload, what: impl Fn(&PayloadStatus) -> bool) -> PayloadStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = p.status();
            if what(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "timed out, last status {s:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn log_rotates() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("x.log");
        let mut w = LogWriter::open(&path, 10);
        w.write(b"12345678");
        w.write(b"abcdef");
        assert_eq!(std::fs::read(&path).unwrap(), b"abcdef");
        assert_eq!(
            std::fs::read(d.path().join("x.log.1")).unwrap(),
            b"12345678"
        );
        drop(w);
        std::fs::write(&path, vec![b'z'; 20]).unwrap();
        let mut w = LogWriter::open(&path, 10);
        w.write(b"new");
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
    }

    #[test]
    fn restarts_with_backoff_and_logs_output() {
        let d = tempfile::tempdir().unwrap();
        let p = Payload::new(cfg(
            d.path(),
            "/bin/sh",
            &["-c", "echo out; echo err >&2; exit 7"],
        ));
        assert_eq!(p.status().state, PayloadState::Pending);
        p.start(Reaper::global()).unwrap();
        let s = wait_for(&p, |s| s.restarts >= 3);
        assert_eq!(s.last_exit.as_deref(), Some("exit code 7"));
        p.stop(Reaper::global(), Duration::from_secs(5));
        assert_eq!(p.status().state, PayloadState::Stopping);
        let log = std::fs::read_to_string(d.path().join("log/payload.log")).unwrap();
        assert!(log.contains("out\n") && log.contains("err\n"), "{log:?}");
    }

    #[test]
    fn ready_when_socket_answers_and_stops() {
        let d = tempfile::tempdir().unwrap();
        let c = cfg(d.path(), "/bin/sleep", &["30"]);
        let p = Payload::new(c.clone());
        p.start(Reaper::global()).unwrap();
        let s = wait_for(&p, |s| s.state == PayloadState::Starting);
        assert!(s.pid.is_some());
        let _listener = std::os::unix::net::UnixListener::bind(d.path().join("sock")).unwrap();
        wait_for(&p, |s| s.state == PayloadState::Ready);
        let t = Instant::now();
        p.stop(Reaper::global(), Duration::from_secs(5));
        assert!(t.elapsed() < Duration::from_secs(4));
        let s = p.status();
        assert_eq!(s.state, PayloadState::Stopping);
        assert_eq!(s.pid, None);
        assert_eq!(s.restarts, 0);
        assert_eq!(s.last_exit.as_deref(), Some("killed by signal 15"));
    }

    #[test]
    fn missing_program_fails() {
        let d = tempfile::tempdir().unwrap();
        let p = Payload::new(cfg(d.path(), "/nonexistent/containerd", &[]));
        p.start(Reaper::global()).unwrap();
        let s = wait_for(&p, |s| s.state == PayloadState::Failed);
        assert!(s.last_exit.unwrap().contains("not found"));
    }

    #[test]
    fn tcp_and_file_readiness_needs_both() {
        let d = tempfile::tempdir().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let file = d.path().join("k3s.yaml");
        let r = Readiness::TcpAndFile(addr, file.clone());
        assert!(!r.probe(), "no file yet");
        std::fs::write(&file, "x").unwrap();
        assert!(r.probe());
        drop(listener);
        assert!(!r.probe(), "nothing listening");
        // A directory of that name is not the file.
        let dir = d.path().join("dir");
        std::fs::create_dir(&dir).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(!Readiness::TcpAndFile(listener.local_addr().unwrap(), dir).probe());
    }

    #[test]
    fn ready_on_tcp_and_file() {
        let d = tempfile::tempdir().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let file = d.path().join("k3s.yaml");
        let mut c = cfg(d.path(), "/bin/sleep", &["30"]);
        c.readiness = Readiness::TcpAndFile(listener.local_addr().unwrap(), file.clone());
        let p = Payload::new(c);
        p.start(Reaper::global()).unwrap();
        assert_eq!(
            p.wait_ready(Duration::from_millis(200)),
            WaitOutcome::Timeout
        );
        std::fs::write(&file, "x").unwrap();
        assert_eq!(p.wait_ready(Duration::from_secs(20)), WaitOutcome::Ready);
        p.stop(Reaper::global(), Duration::from_secs(5));
        assert_eq!(p.wait_ready(Duration::from_secs(1)), WaitOutcome::Stopping);
    }

    #[test]
    fn fail_reports_the_message_and_wait_sees_it() {
        let d = tempfile::tempdir().unwrap();
        let p = Payload::new(cfg(d.path(), "/bin/true", &[]));
        p.fail("plan.json missing");
        let s = p.status();
        assert_eq!(s.state, PayloadState::Failed);
        assert_eq!(s.last_exit.as_deref(), Some("plan.json missing"));
        assert_eq!(
            p.wait_ready(Duration::from_secs(1)),
            WaitOutcome::Failed("plan.json missing".into())
        );
        // A stopped payload keeps Stopping; a later fail only records the message.
        let p = Payload::new(cfg(d.path(), "/bin/true", &[]));
        p.stop(Reaper::global(), Duration::from_secs(1));
        p.fail("late");
        assert_eq!(p.status().state, PayloadState::Stopping);
    }
}
