//! The agent server: speaks [`gatevm_abi`] with the host over any byte stream.
//!
//! The host speaks first (`Hello`); the guest only ever answers, because a virtio-serial write
//! blocks while no host is connected. Stream 0 carries `Hello`, `StatusRequest` and `Shutdown`;
//! every `Exec` opens a session on the stream id the host chose. A new `Hello` means a new host
//! connection: sessions of the previous one are muted and their process groups killed (their
//! stream ids may be reused by the new host).
//!
//! Per exec stream: `ExecStarted` or `ExecFailed` answers the `Exec`; then `Data`/`Eof` frames of
//! stdout and stderr (a terminal session has only stdout); `Exit` comes last. `Resize`, `Signal`,
//! `Credit` and stdin frames for a stream that has already ended are dropped silently (they race
//! with the exit). In terminal mode `Eof{Stdin}` is ignored: a pty has no end-of-file to pass on.
//!
//! Flow control: output is sent only within the credit the host granted on the stream (the
//! session's thread waits for it; the agent loop never does), and stdin beyond the window this
//! side granted is dropped with a log line, so the loop never blocks on a process.
//!
//! `ReadFile` streams are served by the agent itself (no program runs): only a regular file at
//! an absolute path, no larger than the host's limit, read in a thread within the credit.
//!
//! [`Agent::serve`] is generic over the channel, so tests drive it over a socketpair with real
//! child processes; [`run_serial`] and [`run_vsock`] are the two real transports.

use crate::exec;
use crate::log::error_chain;
use crate::reaper::Reaper;
use crate::session::{self, Link, OutputCredit, SharedWriter, StdinQueue};
use crate::sys;
use gatevm_abi::{
    check_len, decode_body, ExecRequest, Fd, Frame, GuestMsg, PayloadStatus, ProtoError,
    CREDIT_DISCARD, PROTOCOL_VERSION, STREAM_CONTROL,
};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the agent needs from the rest of the guest.
pub(crate) trait AgentHost: Send + Sync {
    /// Current payload statuses for `Status`.
    fn payloads(&self) -> Vec<PayloadStatus>;
    /// Called after `ShutdownAck` was written. In PID 1 this powers off and never returns.
    fn shutdown(&self);
}

/// Facts reported in the guest's `Hello`.
#[derive(Debug, Clone)]
pub(crate) struct AgentInfo {
    /// e.g. `gatevm-guest 0.1.0`.
    pub software: String,
    /// Kernel release.
    pub kernel: Option<String>,
    /// Guest uptime when the agent started listening.
    pub uptime_at_start_ms: u64,
}

impl AgentInfo {
    /// The info of this binary, stamped now.
    pub(crate) fn current() -> Self {
        AgentInfo {
            software: crate::software(),
            kernel: sys::kernel_release(),
            uptime_at_start_ms: crate::log::uptime_ms(),
        }
    }
}

/// What to do when the channel reads end-of-file at a frame boundary.
#[derive(Debug, Clone, Copy)]
pub(crate) enum OnEof {
    /// No host is connected right now (virtio-serial): sleep and read again.
    Retry(Duration),
    /// The connection is over (vsock, tests): return.
    Stop,
}

/// Why [`Agent::serve`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ServeEnd {
    /// The channel ended ([`OnEof::Stop`]).
    Eof,
    /// The host asked for a shutdown and [`AgentHost::shutdown`] returned.
    Shutdown,
}

struct SessionHandle {
    serial: u64,
    /// The process (none for a read-file stream).
    pid: Option<i32>,
    tty: Option<Arc<File>>,
    stdin: Option<StdinQueue>,
    muted: Arc<AtomicBool>,
    credit: Arc<OutputCredit>,
}

type Sessions = Arc<Mutex<HashMap<u32, SessionHandle>>>;

/// The agent: session table plus what it reports.
pub(crate) struct Agent {
    host: Arc<dyn AgentHost>,
    reaper: &'static Reaper,
    info: AgentInfo,
    sessions: Sessions,
    next_serial: AtomicU64,
    grace: Duration,
}

enum ReadError {
    /// Clean end of stream at a frame boundary.
    Eof,
    /// The stream ended inside a frame.
    Truncated,
    /// A length field out of bounds: the stream cannot be resynchronized.
    Framing(ProtoError),
    Io(io::Error),
}

/// Reads one frame body (everything after the length), bounded by the protocol's limit.
fn read_body<R: Read>(r: &mut R) -> Result<Vec<u8>, ReadError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Err(ReadError::Eof),
            Ok(0) => return Err(ReadError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
    let len = check_len(u32::from_be_bytes(len)).map_err(ReadError::Framing)?;
    let mut body = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match r.read(&mut body[got..]) {
            Ok(0) => return Err(ReadError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
    Ok(body)
}

fn msg(stream: u32, msg: GuestMsg) -> Frame<GuestMsg> {
    Frame::Msg { stream, msg }
}

fn error(stream: u32, message: impl Into<String>) -> Frame<GuestMsg> {
    msg(
        stream,
        GuestMsg::Error {
            message: message.into(),
        },
    )
}

impl Agent {
    /// A new agent with no sessions.
    pub(crate) fn new(host: Arc<dyn AgentHost>, reaper: &'static Reaper, info: AgentInfo) -> Self {
        Agent {
            host,
            reaper,
            info,
            sessions: Arc::new(Mutex::new(HashMap::new())),
            next_serial: AtomicU64::new(1),
            grace: session::EXIT_GRACE,
        }
    }

    /// Number of running sessions.
    #[cfg(test)]
    pub(crate) fn session_count(&self) -> usize {
        sys::lock(&self.sessions).len()
    }

    /// Serves one channel until it ends (per `on_eof`) or a shutdown was handled. Malformed
    /// frames get an `Error` on their stream; bad length fields are logged and reading goes on.
    pub(crate) fn serve<R: Read>(&self, r: &mut R, w: &SharedWriter, on_eof: OnEof) -> ServeEnd {
        let mut bad_frames: u64 = 0;
        loop {
            match read_body(r) {
                Ok(body) => {
                    if let Some(end) = self.handle_body(&body, w) {
                        return end;
                    }
                }
                Err(ReadError::Eof) => match on_eof {
                    OnEof::Retry(d) => std::thread::sleep(d),
                    OnEof::Stop => return ServeEnd::Eof,
                },
                Err(ReadError::Truncated) => match on_eof {
                    OnEof::Retry(_) => crate::glog!("agent: host went away inside a frame"),
                    OnEof::Stop => return ServeEnd::Eof,
                },
                Err(ReadError::Framing(e)) => {
                    bad_frames += 1;
                    if bad_frames.is_power_of_two() {
                        crate::glog!(
                            "agent: framing error ({bad_frames} so far): {}",
                            gatevm_abi::error_chain(&e)
                        );
                    }
                }
                Err(ReadError::Io(e)) => match on_eof {
                    OnEof::Retry(d) => {
                        bad_frames += 1;
                        if bad_frames.is_power_of_two() {
                            crate::glog!("agent: read error: {e}");
                        }
                        std::thread::sleep(d);
                    }
                    OnEof::Stop => return ServeEnd::Eof,
                },
            }
        }
    }

    /// Mutes every session (their frames would go to a host that is gone) and kills their
    /// process groups.
    pub(crate) fn detach_all(&self, w: &SharedWriter) {
        let drained: Vec<SessionHandle> = {
            let mut sessions = sys::lock(&self.sessions);
            let _writer = sys::lock(w);
            let drained: Vec<SessionHandle> = sessions.drain().map(|(_, s)| s).collect();
            for s in &drained {
                s.muted.store(true, Ordering::SeqCst);
            }
            drained
        };
        for s in drained {
            // Wakes a thread that waits for credit: nobody reads its output any more.
            s.credit.grant(CREDIT_DISCARD);
            if let Some(pid) = s.pid {
                self.reaper.signal(pid, libc::SIGKILL, true);
            }
        }
    }

    fn handle_body(&self, body: &[u8], w: &SharedWriter) -> Option<ServeEnd> {
        let frame = match decode_body::<GuestMsg>(body) {
            Ok(f) => f,
            Err(e) => {
                let stream = match body {
                    [a, b, c, d, ..] => u32::from_be_bytes([*a, *b, *c, *d]),
                    _ => STREAM_CONTROL,
                };
                session::send(
                    w,
                    &error(
                        stream,
                        format!("bad frame: {}", gatevm_abi::error_chain(&e)),
                    ),
                );
                return None;
            }
        };
        match frame {
            Frame::Msg { stream, msg } => return self.handle_msg(stream, msg, w),
            Frame::Data {
                stream,
                fd: Fd::Stdin,
                bytes,
            } => {
                // Never waits: beyond the window the bytes are dropped.
                let q = {
                    let sessions = sys::lock(&self.sessions);
                    sessions.get(&stream).and_then(|s| s.stdin.clone())
                };
                if let Some(q) = q {
                    q.push(bytes);
                }
            }
            Frame::Eof {
                stream,
                fd: Fd::Stdin,
            } => {
                let sessions = sys::lock(&self.sessions);
                if let Some(q) = sessions.get(&stream).and_then(|s| s.stdin.as_ref()) {
                    q.close();
                }
            }
            Frame::Data { stream, fd, .. } | Frame::Eof { stream, fd } => {
                session::send(
                    w,
                    &error(stream, format!("the host cannot send {fd:?} data")),
                );
            }
            Frame::Credit { stream, bytes } => {
                let sessions = sys::lock(&self.sessions);
                if let Some(s) = sessions.get(&stream) {
                    s.credit.grant(bytes);
                }
            }
        }
        None
    }

    fn handle_msg(&self, stream: u32, m: GuestMsg, w: &SharedWriter) -> Option<ServeEnd> {
        let control_only = |name: &str| {
            session::send(w, &error(stream, format!("{name} belongs on stream 0")));
        };
        match m {
            GuestMsg::Hello { version, .. } => {
                if stream != STREAM_CONTROL {
                    control_only("hello");
                } else {
                    self.answer_hello(version, w);
                }
            }
            GuestMsg::StatusRequest => {
                if stream != STREAM_CONTROL {
                    control_only("status_request");
                } else {
                    let status = GuestMsg::Status {
                        uptime_ms: crate::log::uptime_ms(),
                        payloads: self.host.payloads(),
                    };
                    session::send(w, &msg(stream, status));
                }
            }
            GuestMsg::Shutdown => {
                if stream != STREAM_CONTROL {
                    control_only("shutdown");
                } else {
                    crate::glog!("agent: shutdown requested by the host");
                    session::send(w, &msg(stream, GuestMsg::ShutdownAck));
                    self.host.shutdown();
                    return Some(ServeEnd::Shutdown);
                }
            }
            GuestMsg::Exec(req) => self.start_exec(stream, req, w),
            GuestMsg::ReadFile { path, max_bytes } => {
                self.start_read_file(stream, &path, max_bytes, w)
            }
            GuestMsg::Resize { rows, cols } => {
                let sessions = sys::lock(&self.sessions);
                if let Some(tty) = sessions.get(&stream).and_then(|s| s.tty.as_ref()) {
                    let _ = exec::set_winsize(&**tty, rows, cols);
                }
            }
            GuestMsg::Signal { signal } => self.signal_session(stream, signal, w),
            GuestMsg::Error { message } => {
                crate::glog!(
                    "agent: host reported an error on stream {stream}: {}",
                    truncate(&message, 200)
                );
            }
            GuestMsg::Status { .. }
            | GuestMsg::ExecStarted { .. }
            | GuestMsg::ExecFailed { .. }
            | GuestMsg::Exit(_)
            | GuestMsg::ShutdownAck => {
                session::send(w, &error(stream, "unexpected message from the host"));
            }
        }
        None
    }

    /// Answers the host's hello on the control stream: a fresh hello ends every session of an
    /// earlier connection; an unsupported version gets an error.
    fn answer_hello(&self, version: u32, w: &SharedWriter) {
        let stream = STREAM_CONTROL;
        if version != PROTOCOL_VERSION {
            session::send(
                w,
                &error(
                    stream,
                    format!(
                        "protocol version {version} not supported: this guest speaks {PROTOCOL_VERSION}"
                    ),
                ),
            );
            return;
        }
        self.detach_all(w);
        session::send(
            w,
            &msg(
                stream,
                GuestMsg::Hello {
                    version: PROTOCOL_VERSION,
                    software: self.info.software.clone(),
                    uptime_ms: Some(self.info.uptime_at_start_ms),
                    kernel: self.info.kernel.clone(),
                },
            ),
        );
    }

    /// Sends `signal` to the process of the session on `stream` (its process group when it has
    /// a terminal).
    fn signal_session(&self, stream: u32, signal: i32, w: &SharedWriter) {
        if !(1..=64).contains(&signal) {
            session::send(w, &error(stream, format!("invalid signal number {signal}")));
            return;
        }
        let target = sys::lock(&self.sessions)
            .get(&stream)
            .and_then(|s| Some((s.pid?, s.tty.is_some())));
        // Signals for finished sessions race with their exit: drop them silently.
        if let Some((pid, group)) = target {
            self.reaper.signal(pid, signal, group);
        }
    }

    /// Whether `stream` can take a new session; answers with an error when not.
    fn stream_free(&self, stream: u32, what: &str, w: &SharedWriter) -> bool {
        if stream == STREAM_CONTROL {
            session::send(
                w,
                &error(stream, format!("{what} needs a non-zero stream id")),
            );
            return false;
        }
        if sys::lock(&self.sessions).contains_key(&stream) {
            session::send(
                w,
                &error(stream, format!("stream {stream} is already in use")),
            );
            return false;
        }
        true
    }

    fn start_read_file(&self, stream: u32, path: &str, max_bytes: u64, w: &SharedWriter) {
        if !self.stream_free(stream, "read_file", w) {
            return;
        }
        let failed = |message: String| {
            session::send(w, &msg(stream, GuestMsg::ExecFailed { code: 1, message }));
        };
        let file = match open_for_reading(path, max_bytes) {
            Ok(f) => f,
            Err(e) => return failed(error_chain(&e)),
        };
        let serial = self.next_serial.fetch_add(1, Ordering::SeqCst);
        let link = Link {
            writer: w.clone(),
            muted: Arc::new(AtomicBool::new(false)),
        };
        let credit = OutputCredit::new();
        sys::lock(&self.sessions).insert(
            stream,
            SessionHandle {
                serial,
                pid: None,
                tty: None,
                stdin: None,
                muted: link.muted.clone(),
                credit: credit.clone(),
            },
        );
        link.send(&msg(stream, GuestMsg::ExecStarted { pid: 0 }));
        let sessions = self.sessions.clone();
        let thread_link = link.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("read-{stream}"))
            .spawn(move || {
                let last = session::send_file(stream, file, max_bytes, &thread_link, &credit);
                {
                    let mut s = sys::lock(&sessions);
                    if s.get(&stream).map(|h| h.serial) == Some(serial) {
                        s.remove(&stream);
                    }
                }
                if let Some(last) = last {
                    thread_link.send(&msg(stream, last));
                }
            });
        if let Err(e) = spawned {
            let mut s = sys::lock(&self.sessions);
            if s.get(&stream).map(|h| h.serial) == Some(serial) {
                s.remove(&stream);
            }
            drop(s);
            link.send(&error(stream, format!("cannot start the read thread: {e}")));
        }
    }

    fn start_exec(&self, stream: u32, req: ExecRequest, w: &SharedWriter) {
        if !self.stream_free(stream, "exec", w) {
            return;
        }
        let p = match exec::spawn(&req, self.reaper) {
            Ok(p) => p,
            Err(f) => {
                session::send(
                    w,
                    &msg(
                        stream,
                        GuestMsg::ExecFailed {
                            code: f.code,
                            message: f.message,
                        },
                    ),
                );
                return;
            }
        };
        let serial = self.next_serial.fetch_add(1, Ordering::SeqCst);
        let link = Link {
            writer: w.clone(),
            muted: Arc::new(AtomicBool::new(false)),
        };
        let stdin = p
            .stdin
            .and_then(|f| StdinQueue::start(f, req.tty, stream, link.clone()).ok());
        let pid = p.pid;
        let credit = OutputCredit::new();
        sys::lock(&self.sessions).insert(
            stream,
            SessionHandle {
                serial,
                pid: Some(pid),
                tty: p.tty.map(Arc::new),
                stdin,
                muted: link.muted.clone(),
                credit: credit.clone(),
            },
        );
        link.send(&msg(stream, GuestMsg::ExecStarted { pid: pid as u32 }));

        let sessions = self.sessions.clone();
        let grace = self.grace;
        let outputs = p.outputs;
        let exit = p.exit;
        let thread_link = link.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("exec-{stream}"))
            .spawn(move || {
                let status = session::pump(stream, outputs, &exit, &thread_link, &credit, grace);
                {
                    let mut s = sys::lock(&sessions);
                    if s.get(&stream).map(|h| h.serial) == Some(serial) {
                        s.remove(&stream);
                    }
                }
                thread_link.send(&msg(stream, GuestMsg::Exit(status)));
            });
        if let Err(e) = spawned {
            self.reaper.signal(pid, libc::SIGKILL, true);
            let mut s = sys::lock(&self.sessions);
            if s.get(&stream).map(|h| h.serial) == Some(serial) {
                s.remove(&stream);
            }
            drop(s);
            link.send(&error(
                stream,
                format!("cannot start the session thread: {e}"),
            ));
        }
    }
}

/// Why a `ReadFile` path cannot be read.
#[derive(Debug, thiserror::Error)]
enum OpenError {
    /// The path is relative or contains a NUL byte.
    #[error("{0:?} is not an absolute path")]
    NotAbsolute(String),
    /// open(2) failed.
    #[error("cannot open {path}")]
    Open {
        /// The path (at most 200 characters).
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// fstat(2) failed.
    #[error("cannot stat {path}")]
    Stat {
        /// The path (at most 200 characters).
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Not a regular file.
    #[error("{path} is {what}")]
    NotAFile {
        /// The path (at most 200 characters).
        path: String,
        /// `a directory` or `not a regular file`.
        what: &'static str,
    },
    /// Larger than the request allows.
    #[error("{path} is {len} bytes, more than the limit of {max}")]
    TooLarge {
        /// The path (at most 200 characters).
        path: String,
        /// Its size.
        len: u64,
        /// The limit.
        max: u64,
    },
}

/// Opens `path` for a `ReadFile`: an absolute path naming a regular file of at most `max_bytes`
/// bytes. Opened without blocking (a FIFO or device would otherwise hold the agent loop) and
/// checked on the open file, so a swap after the check changes nothing.
fn open_for_reading(path: &str, max_bytes: u64) -> Result<File, OpenError> {
    use std::os::unix::fs::OpenOptionsExt;
    if !path.starts_with('/') || path.contains('\0') {
        return Err(OpenError::NotAbsolute(truncate(path, 200).into()));
    }
    let shown = || truncate(path, 200).to_string();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|source| OpenError::Open {
            path: shown(),
            source,
        })?;
    let meta = file.metadata().map_err(|source| OpenError::Stat {
        path: shown(),
        source,
    })?;
    if !meta.is_file() {
        let what = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file"
        };
        return Err(OpenError::NotAFile {
            path: shown(),
            what,
        });
    }
    if meta.len() > max_bytes {
        return Err(OpenError::TooLarge {
            path: shown(),
            len: meta.len(),
            max: max_bytes,
        });
    }
    Ok(file)
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Finds the virtio-serial port named `name` under `sysfs_ports` (normally
/// `/sys/class/virtio-ports`); returns the port's device name (e.g. `vport1p1`).
pub(crate) fn find_port(sysfs_ports: &Path, name: &str) -> Option<String> {
    let entries = std::fs::read_dir(sysfs_ports).ok()?;
    for e in entries.flatten() {
        let n = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if n.trim_end_matches(['\n', '\0']) == name {
            return Some(e.file_name().to_string_lossy().into_owned());
        }
    }
    None
}

/// Makes sure `/dev/<port>` exists, creating the node from sysfs's `major:minor` when needed.
fn port_device(port: &str) -> io::Result<PathBuf> {
    let dev = Path::new("/dev").join(port);
    if dev.exists() {
        return Ok(dev);
    }
    let numbers =
        std::fs::read_to_string(Path::new("/sys/class/virtio-ports").join(port).join("dev"))?;
    let (maj, min) = numbers
        .trim()
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad dev numbers {numbers:?}"),
            )
        })?;
    sys::mknod_char(&dev, maj, min)?;
    Ok(dev)
}

/// Serves the agent on the virtio-serial port named [`gatevm_abi::AGENT_PORT_NAME`]; waits
/// for the port to appear and never returns except after a handled shutdown.
pub(crate) fn run_serial(agent: &Agent) {
    let started = std::time::Instant::now();
    let mut warned = false;
    let port = loop {
        if let Some(p) = find_port(
            Path::new("/sys/class/virtio-ports"),
            gatevm_abi::AGENT_PORT_NAME,
        ) {
            break p;
        }
        if !warned && started.elapsed() > Duration::from_secs(5) {
            crate::glog!(
                "agent: no virtio-serial port named {} yet",
                gatevm_abi::AGENT_PORT_NAME
            );
            warned = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut attempts = 0u32;
    let (mut reader, writer) = loop {
        let opened = port_device(&port).and_then(|dev| {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&dev)?;
            let w = f.try_clone()?;
            Ok((f, w))
        });
        match opened {
            Ok(pair) => break pair,
            Err(e) => {
                attempts += 1;
                if attempts.is_power_of_two() {
                    crate::glog!("agent: cannot open /dev/{port}: {e}");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    crate::glog!("agent listening on /dev/{port}");
    let writer = session::shared_writer(writer);
    loop {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            agent.serve(
                &mut reader,
                &writer,
                OnEof::Retry(Duration::from_millis(50)),
            )
        }));
        match r {
            Ok(ServeEnd::Shutdown) => return,
            Ok(ServeEnd::Eof) => {}
            Err(_) => {
                crate::glog!("agent: serve loop panicked; continuing");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Serves the agent on an `AF_VSOCK` listener on [`gatevm_abi::AGENT_VSOCK_PORT`], one
/// connection at a time; sessions of a closed connection are killed.
pub(crate) fn run_vsock(agent: &Agent) {
    use nix::sys::socket::{
        accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
    };
    let listener = loop {
        let made = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .and_then(|fd| {
            bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &VsockAddr::new(libc::VMADDR_CID_ANY, gatevm_abi::AGENT_VSOCK_PORT),
            )?;
            listen(&fd, Backlog::new(4).unwrap_or(Backlog::MAXCONN))?;
            Ok(fd)
        });
        match made {
            Ok(fd) => break fd,
            Err(e) => {
                crate::glog!(
                    "agent: vsock listen on port {}: {e}",
                    gatevm_abi::AGENT_VSOCK_PORT
                );
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    crate::glog!(
        "agent listening on vsock port {}",
        gatevm_abi::AGENT_VSOCK_PORT
    );
    loop {
        let accepted = accept4(
            std::os::fd::AsRawFd::as_raw_fd(&listener),
            SockFlag::SOCK_CLOEXEC,
        );
        let conn = match accepted {
            Ok(fd) => {
                // SAFETY: accept4 returned a new fd that nothing else owns.
                let owned =
                    unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
                File::from(owned)
            }
            Err(e) => {
                crate::glog!("agent: vsock accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let Ok(w) = conn.try_clone() else { continue };
        let writer = session::shared_writer(w);
        let mut reader = conn;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            agent.serve(&mut reader, &writer, OnEof::Stop)
        }));
        agent.detach_all(&writer);
        if let Ok(ServeEnd::Shutdown) = r {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
