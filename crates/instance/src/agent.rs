//! The supervisor's end of the guest agent channel: one reader task demultiplexing frames from the
//! guest to per-stream routes, one writer task serializing frames to the guest.
//!
//! The guest is untrusted: frames are bounded by the protocol decoder, routes are bounded channels,
//! a frame for an unknown stream is dropped, and a framing error ends the channel (the instance then
//! reports the agent as disconnected) rather than anything on the host.

use crate::control::AgentInfo;
use gatevm_protocol::{asyncio, Frame, GuestMsg, PayloadStatus, PROTOCOL_VERSION, STREAM_CONTROL};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot, watch};

/// Frames queued for one exec stream before the reader waits for the client.
const ROUTE_DEPTH: usize = 64;

type Route = mpsc::Sender<Frame<GuestMsg>>;

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
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Agent {
    /// Starts the reader and writer tasks over a connected socket.
    pub fn spawn(read: OwnedReadHalf, write: OwnedWriteHalf) -> Agent {
        let (tx, rx) = mpsc::channel::<Vec<u8>>(256);
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
        };
        tokio::spawn(writer(write, rx));
        let a = agent.clone();
        tokio::spawn(async move {
            let result = a.read_loop(read, &conn_tx).await;
            if let Err(e) = result {
                tracing::warn!("agent channel closed: {e}");
            } else {
                tracing::info!("agent channel closed by the guest");
            }
            a.ended.store(true, Ordering::SeqCst);
            conn_tx.send_replace(false);
            lock(&a.view).agent.connected = false;
            lock(&a.routes).clear();
            lock(&a.status_waiters).clear();
        });
        agent
    }

    /// Whether the channel has ended (the guest or the VMM closed it).
    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    async fn read_loop(
        &self,
        mut read: OwnedReadHalf,
        conn: &watch::Sender<bool>,
    ) -> Result<(), String> {
        loop {
            let frame = match asyncio::read_frame::<GuestMsg, _>(&mut read).await {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(e) => return Err(e.to_string()),
            };
            let stream = frame.stream();
            if stream == STREAM_CONTROL {
                match frame {
                    Frame::Msg {
                        msg:
                            GuestMsg::Hello {
                                version,
                                software,
                                uptime_ms,
                                kernel,
                            },
                        ..
                    } => {
                        if version != PROTOCOL_VERSION {
                            return Err(format!(
                                "guest agent speaks protocol {version}, this host {PROTOCOL_VERSION}: rebuild the runtime with `gatevm setup`"
                            ));
                        }
                        let mut v = lock(&self.view);
                        v.agent = AgentInfo {
                            connected: true,
                            responding: true,
                            version: Some(truncate(&software, 100)),
                            kernel: kernel.map(|k| truncate(&k, 100)),
                            uptime_ms,
                        };
                        drop(v);
                        conn.send_replace(true);
                    }
                    Frame::Msg {
                        msg:
                            GuestMsg::Status {
                                uptime_ms,
                                payloads,
                            },
                        ..
                    } => {
                        let mut v = lock(&self.view);
                        v.agent.uptime_ms = Some(uptime_ms);
                        v.payloads = payloads.into_iter().take(16).collect();
                        drop(v);
                        if let Some(w) = lock(&self.status_waiters).pop_front() {
                            let _ = w.send(());
                        }
                    }
                    Frame::Msg {
                        msg: GuestMsg::ShutdownAck,
                        ..
                    } => {
                        if let Some(w) = lock(&self.shutdown_ack).take() {
                            let _ = w.send(());
                        }
                    }
                    Frame::Msg {
                        msg: GuestMsg::Error { message },
                        ..
                    } => {
                        tracing::warn!("guest agent error: {}", truncate(&message, 300));
                    }
                    other => tracing::debug!(
                        "ignoring unexpected control frame from guest: {:?}",
                        kind(&other)
                    ),
                }
                continue;
            }
            let route = lock(&self.routes).get(&stream).cloned();
            let Some(route) = route else {
                tracing::debug!("dropping frame for unknown stream {stream}");
                continue;
            };
            let last = matches!(
                frame,
                Frame::Msg {
                    msg: GuestMsg::Exit(_) | GuestMsg::ExecFailed { .. },
                    ..
                }
            );
            if route.send(frame).await.is_err() || last {
                lock(&self.routes).remove(&stream);
            }
        }
    }

    /// Queues a frame for the guest.
    pub async fn send(&self, frame: Frame<GuestMsg>) -> Result<(), String> {
        let bytes = frame.encode().map_err(|e| e.to_string())?;
        self.tx
            .send(bytes)
            .await
            .map_err(|_| "agent channel is closed".to_string())
    }

    /// Sends the host hello.
    pub async fn hello(&self) -> Result<(), String> {
        self.send(Frame::Msg {
            stream: STREAM_CONTROL,
            msg: GuestMsg::Hello {
                version: PROTOCOL_VERSION,
                software: format!("gatevm {}", env!("CARGO_PKG_VERSION")),
                uptime_ms: None,
                kernel: None,
            },
        })
        .await
    }

    /// Asks the guest for its status and waits up to `timeout` for the answer.
    pub async fn refresh_status(&self, timeout: Duration) -> bool {
        if !*self.connected.borrow() {
            return false;
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.status_waiters).push_back(tx);
        if self
            .send(Frame::Msg {
                stream: STREAM_CONTROL,
                msg: GuestMsg::StatusRequest,
            })
            .await
            .is_err()
        {
            return false;
        }
        matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(())))
    }

    /// The latest view of the guest.
    pub fn view(&self) -> GuestView {
        lock(&self.view).clone()
    }

    /// Opens an exec stream: returns its id and the receiver of the guest's frames on it.
    pub fn open_stream(&self) -> (u32, mpsc::Receiver<Frame<GuestMsg>>) {
        let (tx, rx) = mpsc::channel(ROUTE_DEPTH);
        let mut routes = lock(&self.routes);
        let mut id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        while id == STREAM_CONTROL || routes.contains_key(&id) {
            id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        }
        routes.insert(id, tx);
        (id, rx)
    }

    /// Forgets a stream (its client went away).
    pub fn close_stream(&self, id: u32) {
        lock(&self.routes).remove(&id);
    }

    /// Asks the guest to shut down; true when it acknowledged within `timeout`.
    pub async fn shutdown(&self, timeout: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        *lock(&self.shutdown_ack) = Some(tx);
        if self
            .send(Frame::Msg {
                stream: STREAM_CONTROL,
                msg: GuestMsg::Shutdown,
            })
            .await
            .is_err()
        {
            return false;
        }
        matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(())))
    }
}

fn kind(f: &Frame<GuestMsg>) -> &'static str {
    match f {
        Frame::Msg { .. } => "message",
        Frame::Data { .. } => "data",
        Frame::Eof { .. } => "eof",
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
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
