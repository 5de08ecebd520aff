//! The supervisor's end of the guest agent channel: one reader task demultiplexing frames from the
//! guest to per-stream routes, one writer task serializing frames to the guest.
//!
//! The guest is untrusted: frames are bounded by the protocol decoder, a frame for an unknown stream
//! (or one an exec stream never carries) is dropped, strings the guest reports are cut short and
//! stripped of control characters, and a framing error ends the channel (the instance then reports
//! the agent as disconnected) rather than anything on the host. Nothing waits on the guest without
//! a bound: a request that expects an answer has a timeout covering the whole exchange, and
//! queueing a frame for a guest that stopped reading gives up after [`SEND_TIMEOUT`].
//!
//! Flow control: the reader never waits for a stream's consumer. Each exec stream has an unbounded
//! queue whose data is bounded by the stream's credit window instead: the guest may send only
//! [`gatevm_abi::INITIAL_WINDOW`] bytes plus what was granted back, and the host grants only
//! after the consumer handed bytes on ([`Agent::consumed`]). A guest that exceeds its window, or
//! sends more than [`MAX_STREAM_MSGS`] messages and ends on one exec stream, breaks only that
//! stream: its consumer gets an `Error` and the stream is closed; the channel and every other
//! stream go on. The guest grants stdin credit the same way ([`StdinCredit`]).

use crate::control::AgentInfo;
use gatevm_abi::flow::RecvWindow;
use gatevm_abi::{
    asyncio, Fd, Frame, GuestMsg, PayloadStatus, CREDIT_DISCARD, INITIAL_WINDOW, PROTOCOL_VERSION,
    STREAM_CONTROL,
};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot, watch};

/// Messages and ends (frames other than data and credit) the guest may send on one exec stream:
/// an honest one sends a start, two ends and an exit, and an error now and then. Beyond this the
/// stream is ended, which bounds what its queue holds besides the window's data.
pub const MAX_STREAM_MSGS: u32 = 16;
/// Frames queued for the guest before senders wait for the writer.
const WRITE_DEPTH: usize = 256;
/// How long queueing one frame for the guest may wait. The queue only stays full while the guest
/// reads nothing at all: the agent drains it continuously (it never waits for a process; stdin is
/// bounded by its window), so this is a guest that stopped reading.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Error messages from the guest logged as warnings; later ones go to the debug level, so a
/// guest cannot fill the supervisor's log.
const GUEST_ERRORS_LOGGED: u32 = 20;

/// Why the agent channel's reader stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// A frame could not be read or decoded.
    #[error(transparent)]
    Frame(#[from] gatevm_abi::ProtoError),
    /// The guest's hello names another protocol version.
    #[error("guest agent speaks protocol {guest}, this host {PROTOCOL_VERSION}: rebuild the runtime with `gatevm setup`")]
    Version {
        /// The guest's version.
        guest: u32,
    },
}

/// Why a frame could not be queued for the guest.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The frame does not encode.
    #[error(transparent)]
    Encode(#[from] gatevm_abi::ProtoError),
    /// The channel has ended.
    #[error("agent channel is closed")]
    Closed,
    /// The guest stopped reading while the queue was full.
    #[error("the guest agent has not read its channel for {secs} s")]
    Stalled {
        /// How long the send waited.
        secs: u64,
    },
}

/// The host's side of one exec stream, as the reader sees it.
struct Route {
    tx: mpsc::UnboundedSender<Frame<GuestMsg>>,
    /// The guest's output window: what it may still send, what is queued, what to grant back.
    window: RecvWindow,
    /// Messages and ends received on the stream.
    msgs: u32,
    /// Stdin credit the guest granted in all, the initial window included.
    stdin_granted: watch::Sender<u64>,
}

/// The consumer's end of one exec stream: the guest's frames on it, and the stdin credit the guest
/// granted.
pub struct GuestStream {
    /// The stream id.
    pub id: u32,
    rx: mpsc::UnboundedReceiver<Frame<GuestMsg>>,
    /// The stream's stdin credit.
    pub stdin: StdinCredit,
}

impl GuestStream {
    /// The next frame from the guest; None once the stream ended (after its last frame, a
    /// violation of its window, or the end of the channel).
    pub async fn recv(&mut self) -> Option<Frame<GuestMsg>> {
        self.rx.recv().await
    }

    /// The frame receiver and the stdin credit apart, to wait on both at once.
    pub fn split(self) -> (mpsc::UnboundedReceiver<Frame<GuestMsg>>, StdinCredit) {
        (self.rx, self.stdin)
    }
}

/// The stdin credit the guest granted on one stream.
pub struct StdinCredit {
    granted: watch::Receiver<u64>,
    sent: u64,
    open: bool,
}

impl StdinCredit {
    /// Stdin bytes that may be sent to the guest now.
    pub fn available(&self) -> u64 {
        self.granted.borrow().saturating_sub(self.sent)
    }

    /// Records `n` stdin bytes as sent.
    pub fn sent(&mut self, n: usize) {
        self.sent = self.sent.saturating_add(n as u64);
    }

    /// Waits for the guest's next stdin grant; never returns once the stream is closed.
    pub async fn granted(&mut self) {
        if self.open && self.granted.changed().await.is_ok() {
            return;
        }
        self.open = false;
        std::future::pending::<()>().await
    }
}

/// What the host knows about the guest, updated by the reader.
#[derive(Debug, Default, Clone)]
pub struct GuestView {
    pub agent: AgentInfo,
    pub payloads: Vec<PayloadStatus>,
}

/// Handle to the agent channel; cheap to clone.
#[derive(Clone)]
pub struct Agent {
    tx: mpsc::Sender<Vec<u8>>,
    routes: Arc<Mutex<HashMap<u32, Route>>>,
    status_waiters: Arc<Mutex<VecDeque<oneshot::Sender<()>>>>,
    next_stream: Arc<AtomicU32>,
    view: Arc<Mutex<GuestView>>,
    /// Becomes true when the guest said hello; false again when the channel ends.
    pub connected: watch::Receiver<bool>,
    shutdown_ack: Arc<Mutex<Option<oneshot::Sender<()>>>>,
    ended: Arc<std::sync::atomic::AtomicBool>,
    send_timeout: Duration,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Agent {
    /// Starts the reader and writer tasks over a connected socket.
    pub fn spawn(read: OwnedReadHalf, write: OwnedWriteHalf) -> Agent {
        let (tx, rx) = mpsc::channel::<Vec<u8>>(WRITE_DEPTH);
        let (conn_tx, conn_rx) = watch::channel(false);
        let agent = Agent {
            tx,
            routes: Arc::default(),
            status_waiters: Arc::default(),
            next_stream: Arc::new(AtomicU32::new(1)),
            view: Arc::default(),
            connected: conn_rx,
            shutdown_ack: Arc::default(),
            ended: Arc::default(),
            send_timeout: SEND_TIMEOUT,
        };
        tokio::spawn(writer(write, rx));
        let a = agent.clone();
        tokio::spawn(async move {
            let result = a.read_loop(read, &conn_tx).await;
            if let Err(e) = result {
                tracing::warn!("agent channel closed: {}", gatevm_abi::error_chain(&e));
            } else {
                tracing::info!("agent channel closed by the guest");
            }
            a.ended.store(true, Ordering::SeqCst);
            conn_tx.send_replace(false);
            lock(&a.view).agent.connected = false;
            lock(&a.routes).clear();
            lock(&a.status_waiters).clear();
            lock(&a.shutdown_ack).take();
        });
        agent
    }

    /// This handle with another bound on queueing a frame than [`SEND_TIMEOUT`] (tests use a short
    /// one).
    pub fn with_send_timeout(mut self, timeout: Duration) -> Agent {
        self.send_timeout = timeout;
        self
    }

    /// Whether the channel has ended (the guest or the VMM closed it).
    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    async fn read_loop(
        &self,
        mut read: OwnedReadHalf,
        conn: &watch::Sender<bool>,
    ) -> Result<(), ReadError> {
        let mut errors_logged = 0u32;
        loop {
            let frame = match asyncio::read_frame::<GuestMsg, _>(&mut read).await {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            if frame.stream() == STREAM_CONTROL {
                self.on_control(frame, conn, &mut errors_logged)?;
            } else {
                self.route_exec_frame(frame);
            }
        }
    }

    /// A frame on the control stream: the agent's hello, a status answer, a shutdown
    /// acknowledgement or an error report. Fails only on a protocol version mismatch.
    fn on_control(
        &self,
        frame: Frame<GuestMsg>,
        conn: &watch::Sender<bool>,
        errors_logged: &mut u32,
    ) -> Result<(), ReadError> {
        let what = kind(&frame);
        let Frame::Msg { msg, .. } = frame else {
            tracing::debug!("ignoring unexpected control frame from guest: {what:?}");
            return Ok(());
        };
        match msg {
            GuestMsg::Hello {
                version,
                software,
                uptime_ms,
                kernel,
            } => {
                if version != PROTOCOL_VERSION {
                    return Err(ReadError::Version { guest: version });
                }
                lock(&self.view).agent = AgentInfo {
                    connected: true,
                    responding: true,
                    version: Some(truncate(&software, 100)),
                    kernel: kernel.map(|k| truncate(&k, 100)),
                    uptime_ms,
                };
                conn.send_replace(true);
            }
            GuestMsg::Status {
                uptime_ms,
                payloads,
            } => self.on_status(uptime_ms, payloads),
            GuestMsg::ShutdownAck => {
                if let Some(w) = lock(&self.shutdown_ack).take() {
                    let _ = w.send(());
                }
            }
            GuestMsg::Error { message } => log_guest_error(&message, errors_logged),
            _ => tracing::debug!("ignoring unexpected control frame from guest: {what:?}"),
        }
        Ok(())
    }

    /// A status answer: updates the view and wakes everyone who asked before it.
    fn on_status(&self, uptime_ms: u64, payloads: Vec<PayloadStatus>) {
        let mut v = lock(&self.view);
        v.agent.uptime_ms = Some(uptime_ms);
        v.payloads = payloads
            .into_iter()
            .take(16)
            .map(|p| PayloadStatus {
                name: truncate(&p.name, 100),
                last_exit: p.last_exit.map(|e| truncate(&e, 1000)),
                ..p
            })
            .collect();
        drop(v);
        // The view is fresh for everyone who asked before this answer.
        for w in lock(&self.status_waiters).drain(..) {
            let _ = w.send(());
        }
    }

    /// A frame on an exec stream: checked against the stream's flow-control window and message
    /// budget, then handed to the stream's consumer (the route ends with the last frame).
    fn route_exec_frame(&self, frame: Frame<GuestMsg>) {
        let stream = frame.stream();
        if !expected_on_exec_stream(&frame) {
            tracing::debug!(
                "dropping unexpected {} frame on stream {stream}",
                kind(&frame)
            );
            return;
        }
        let mut routes = lock(&self.routes);
        let Some(route) = routes.get_mut(&stream) else {
            tracing::debug!("dropping frame for unknown stream {stream}");
            return;
        };
        match &frame {
            Frame::Credit { bytes, .. } => {
                let bytes = u64::from(*bytes);
                route
                    .stdin_granted
                    .send_modify(|g| *g = g.saturating_add(bytes));
                return;
            }
            Frame::Data { bytes, .. } if bytes.is_empty() => return,
            Frame::Data { bytes, .. } => {
                if let Err(e) = route.window.receive(bytes.len()) {
                    let message = format!(
                        "the guest broke flow control on this stream ({e}); the stream was ended"
                    );
                    violation(&mut routes, stream, message);
                    return;
                }
            }
            Frame::Msg { .. } | Frame::Eof { .. } => {
                route.msgs += 1;
                if route.msgs > MAX_STREAM_MSGS {
                    let message = format!(
                        "the guest sent more than {MAX_STREAM_MSGS} messages on this stream; the stream was ended"
                    );
                    violation(&mut routes, stream, message);
                    return;
                }
            }
        }
        let last = matches!(
            frame,
            Frame::Msg {
                msg: GuestMsg::Exit(_) | GuestMsg::ExecFailed { .. },
                ..
            }
        );
        // Unbounded, so never waits: the window bounds the data in it, MAX_STREAM_MSGS the rest.
        if route.tx.send(frame).is_err() || last {
            routes.remove(&stream);
        }
    }

    /// `n` data bytes of stream `id` were handed on by its consumer: grants the guest credit when
    /// a grant is due. Fails only when the grant cannot be queued (see [`Agent::send`]).
    pub async fn consumed(&self, id: u32, n: usize) -> Result<(), SendError> {
        let grant = lock(&self.routes)
            .get_mut(&id)
            .and_then(|r| r.window.consume(n));
        match grant {
            Some(bytes) => self.send(Frame::Credit { stream: id, bytes }).await,
            None => Ok(()),
        }
    }

    /// Tells the guest that nobody reads stream `id` any more (it discards the rest of the
    /// output) and forgets the stream.
    pub async fn discard(&self, id: u32) -> Result<(), SendError> {
        self.close_stream(id);
        self.send(Frame::Credit {
            stream: id,
            bytes: CREDIT_DISCARD,
        })
        .await
    }

    /// Queues a frame for the guest; fails when the channel is closed, or when the guest has read
    /// nothing for the send timeout ([`SEND_TIMEOUT`]) while the queue is full.
    pub async fn send(&self, frame: Frame<GuestMsg>) -> Result<(), SendError> {
        use mpsc::error::SendTimeoutError;
        let bytes = frame.encode()?;
        match self.tx.send_timeout(bytes, self.send_timeout).await {
            Ok(()) => Ok(()),
            Err(SendTimeoutError::Closed(_)) => Err(SendError::Closed),
            Err(SendTimeoutError::Timeout(_)) => Err(SendError::Stalled {
                secs: self.send_timeout.as_secs(),
            }),
        }
    }

    /// Sends the host hello. Never waits: when the queue is full, hellos the guest has not read
    /// yet are already waiting in it, and one more adds nothing.
    pub async fn hello(&self) -> Result<(), SendError> {
        let frame = Frame::Msg {
            stream: STREAM_CONTROL,
            msg: GuestMsg::Hello {
                version: PROTOCOL_VERSION,
                software: format!("gatevm {}", env!("CARGO_PKG_VERSION")),
                uptime_ms: None,
                kernel: None,
            },
        };
        let bytes = frame.encode()?;
        match self.tx.try_send(bytes) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SendError::Closed),
        }
    }

    /// Asks the guest for its status and waits up to `timeout` for the answer (queueing the
    /// request included).
    pub async fn refresh_status(&self, timeout: Duration) -> bool {
        if !*self.connected.borrow() {
            return false;
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut waiters = lock(&self.status_waiters);
            // Callers that gave up; without this a silent guest would grow the queue per call.
            waiters.retain(|w| !w.is_closed());
            waiters.push_back(tx);
        }
        let exchange = async {
            self.send(Frame::Msg {
                stream: STREAM_CONTROL,
                msg: GuestMsg::StatusRequest,
            })
            .await?;
            rx.await.map_err(|_| SendError::Closed)
        };
        matches!(tokio::time::timeout(timeout, exchange).await, Ok(Ok(())))
    }

    /// The latest view of the guest.
    pub fn view(&self) -> GuestView {
        lock(&self.view).clone()
    }

    /// Opens an exec stream: returns its id and the consumer's end of it.
    pub fn open_stream(&self) -> (u32, GuestStream) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (granted_tx, granted_rx) = watch::channel(u64::from(INITIAL_WINDOW));
        let mut routes = lock(&self.routes);
        let mut id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        while id == STREAM_CONTROL || routes.contains_key(&id) {
            id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        }
        routes.insert(
            id,
            Route {
                tx,
                window: RecvWindow::new(),
                msgs: 0,
                stdin_granted: granted_tx,
            },
        );
        (
            id,
            GuestStream {
                id,
                rx,
                stdin: StdinCredit {
                    granted: granted_rx,
                    sent: 0,
                    open: true,
                },
            },
        )
    }

    /// Bytes of stream `id`'s output the guest sent and its consumer has not handed on yet (None
    /// for a closed stream).
    pub fn queued(&self, id: u32) -> Option<u64> {
        lock(&self.routes).get(&id).map(|r| r.window.queued())
    }

    /// Forgets a stream (its client went away).
    pub fn close_stream(&self, id: u32) {
        lock(&self.routes).remove(&id);
    }

    /// Asks the guest to shut down; true when it acknowledged within `timeout` (queueing the
    /// request included).
    pub async fn shutdown(&self, timeout: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        *lock(&self.shutdown_ack) = Some(tx);
        if self.ended() {
            return false;
        }
        let exchange = async {
            self.send(Frame::Msg {
                stream: STREAM_CONTROL,
                msg: GuestMsg::Shutdown,
            })
            .await?;
            rx.await.map_err(|_| SendError::Closed)
        };
        matches!(tokio::time::timeout(timeout, exchange).await, Ok(Ok(())))
    }
}

/// Ends stream `stream` for breaking flow control: its consumer gets `message` as an `Error`, and
/// later frames on it are dropped as frames of an unknown stream.
/// Logs an error the guest agent reported: the first ones as warnings, the rest at debug level
/// (a guest cannot flood the log).
fn log_guest_error(message: &str, errors_logged: &mut u32) {
    let message = truncate(message, 300);
    *errors_logged = errors_logged.saturating_add(1);
    if *errors_logged < GUEST_ERRORS_LOGGED {
        tracing::warn!("guest agent error: {message}");
    } else if *errors_logged == GUEST_ERRORS_LOGGED {
        tracing::warn!("guest agent error: {message} (further ones at debug level)");
    } else {
        tracing::debug!("guest agent error: {message}");
    }
}

fn violation(routes: &mut HashMap<u32, Route>, stream: u32, message: String) {
    tracing::warn!("guest agent, stream {stream}: {message}");
    if let Some(r) = routes.remove(&stream) {
        let _ = r.tx.send(Frame::Msg {
            stream,
            msg: GuestMsg::Error { message },
        });
    }
}

/// What the guest sends on an exec stream: the process's output, how it started and ended, and
/// stdin credit. Anything else is dropped before it is queued for the client.
fn expected_on_exec_stream(f: &Frame<GuestMsg>) -> bool {
    match f {
        Frame::Credit { .. } => true,
        Frame::Data { fd, .. } | Frame::Eof { fd, .. } => *fd != Fd::Stdin,
        Frame::Msg { msg, .. } => matches!(
            msg,
            GuestMsg::ExecStarted { .. }
                | GuestMsg::ExecFailed { .. }
                | GuestMsg::Exit(_)
                | GuestMsg::Error { .. }
        ),
    }
}

fn kind(f: &Frame<GuestMsg>) -> &'static str {
    match f {
        Frame::Msg { .. } => "message",
        Frame::Data { .. } => "data",
        Frame::Eof { .. } => "eof",
        Frame::Credit { .. } => "credit",
    }
}

/// At most `n` characters of a string from the guest, terminal control sequences removed (see
/// [`crate::text`]): these strings end up in logs and on the user's terminal.
fn truncate(s: &str, n: usize) -> String {
    crate::text::line(s, n)
}

async fn writer(mut w: OwnedWriteHalf, mut rx: mpsc::Receiver<Vec<u8>>) {
    use tokio::io::AsyncWriteExt;
    while let Some(bytes) = rx.recv().await {
        if let Err(e) = w.write_all(&bytes).await {
            tracing::warn!("writing to the guest agent failed: {e}");
            return;
        }
    }
}
