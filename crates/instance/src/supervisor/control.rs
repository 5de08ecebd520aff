//! Serving the control socket: status and stop for clients, and the exec (and read-file) relay
//! between a client connection and the guest agent, with the client's stdin held to the guest's
//! credit.

use super::{AbortOnDrop, RunningInstance, EXEC_START_TIMEOUT};
use crate::agent::{Agent, SendError, StdinCredit};
use crate::control::{CtlReply, CtlRequest, CLIENT_STREAM};
use gatevm_abi::{asyncio, Fd, Frame, GuestMsg, ProtoError};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc::UnboundedReceiver;

/// Why serving one control client ended early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ServeError {
    /// No request within the wait.
    #[error("client sent no request")]
    NoRequest,
    /// The client hung up before its request.
    #[error("client closed without a request")]
    Closed,
    /// The reply was not read within the wait.
    #[error("the client does not read its reply")]
    ReplyTimeout,
    /// A frame to or from the client failed.
    #[error(transparent)]
    Frame(#[from] ProtoError),
    /// A frame could not be queued for the guest.
    #[error(transparent)]
    Agent(#[from] SendError),
}

/// Accepts control clients on `listener` and serves each on its own task, until the returned
/// guard is dropped.
pub(crate) fn serve_clients(listener: UnixListener, inst: Arc<RunningInstance>) -> AbortOnDrop {
    AbortOnDrop(tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((conn, _)) => {
                    let inst = inst.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve_client(conn, &inst).await {
                            tracing::debug!("control client: {}", gatevm_abi::error_chain(&e));
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("control socket accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }))
}

/// Accepts plain clients of a guest API socket (containerd's) on `listener` and relays each to
/// `guest_socket` in the guest, until the returned guard is dropped. A client that comes while
/// the agent is not connected is closed at once.
pub(crate) fn serve_socket_relay(
    listener: UnixListener,
    inst: Arc<RunningInstance>,
    guest_socket: &'static str,
) -> AbortOnDrop {
    AbortOnDrop(tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((conn, _)) => {
                    let Some(agent) = inst.agent().filter(|a| *a.connected.borrow()) else {
                        tracing::info!(
                            "{guest_socket}: a client came while the guest agent is not connected"
                        );
                        continue;
                    };
                    tokio::spawn(async move {
                        if let Err(e) = relay_socket(conn, agent, guest_socket).await {
                            tracing::debug!(
                                "{guest_socket} relay: {}",
                                gatevm_abi::error_chain(&e)
                            );
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("{guest_socket} relay accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }))
}

/// How many lines of what the guest says about one relayed connection are logged at info.
const GUEST_LINES_LOGGED: u32 = 3;

/// Relays one plain client connection to `guest_socket` in the guest: a `gatevm-guest relay`
/// exec joins the socket to its stdin and stdout, and the exec relay ([`relay_exec`]) carries the
/// client's bytes as that stdin and the answers as that stdout, with its flow control (a client
/// that stops reading stops only its own connection). The two directions run apart, so a full
/// buffer one way never holds up the other. When the guest side ends (the server closed, or
/// containerd restarted) the client's connection is closed; a client that closes its side ends
/// the guest's stdin.
pub(crate) async fn relay_socket(
    raw: UnixStream,
    agent: Agent,
    guest_socket: &str,
) -> Result<(), ServeError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = GuestMsg::Exec(gatevm_abi::ExecRequest {
        argv: vec![
            gatevm_abi::paths::GUEST_AGENT.into(),
            "relay".into(),
            guest_socket.into(),
        ],
        stdin: true,
        ..Default::default()
    });
    let (framed, inner) = UnixStream::pair().map_err(ProtoError::Io)?;
    let relay = tokio::spawn(relay_exec(inner, agent, request));
    let (mut raw_r, mut raw_w) = raw.into_split();
    let (framed_r, mut framed_w) = framed.into_split();
    let up = tokio::spawn(async move {
        let mut buf = vec![0u8; gatevm_abi::DATA_CHUNK];
        loop {
            let n = raw_r.read(&mut buf).await.unwrap_or(0);
            let f = if n == 0 {
                Frame::Eof {
                    stream: CLIENT_STREAM,
                    fd: Fd::Stdin,
                }
            } else {
                Frame::Data {
                    stream: CLIENT_STREAM,
                    fd: Fd::Stdin,
                    bytes: buf[..n].to_vec(),
                }
            };
            if asyncio::write_frame::<GuestMsg, _>(&mut framed_w, &f)
                .await
                .is_err()
                || n == 0
            {
                // Holds the write half until the relay ends, so the exec's stdin stays as sent.
                return framed_w;
            }
        }
    });
    let mut frames = asyncio::FrameReader::new(framed_r);
    let mut result = Ok(());
    // What the guest says is logged as one plain line each (no control characters), and only the
    // first few lines at info: a guest cannot fill the log or write escapes into it.
    let mut said = 0u32;
    let mut log_guest = |what: &str| {
        said = said.saturating_add(1);
        let line = crate::text::line(what, 300);
        if said <= GUEST_LINES_LOGGED {
            tracing::info!("{guest_socket} relay: {line}");
        } else {
            tracing::debug!("{guest_socket} relay: {line}");
        }
    };
    loop {
        match frames.read_frame::<GuestMsg>().await {
            Ok(Some(Frame::Data {
                fd: Fd::Stdout,
                bytes,
                ..
            })) => {
                if raw_w.write_all(&bytes).await.is_err() {
                    break;
                }
            }
            Ok(Some(Frame::Data {
                fd: Fd::Stderr,
                bytes,
                ..
            })) => log_guest(&String::from_utf8_lossy(&bytes[..bytes.len().min(300)])),
            Ok(Some(Frame::Msg { msg, .. })) => match msg {
                GuestMsg::Exit(_) => break,
                GuestMsg::ExecFailed { message, .. } | GuestMsg::Error { message } => {
                    log_guest(&message);
                    break;
                }
                _ => {}
            },
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => {
                result = Err(e.into());
                break;
            }
        }
    }
    let _ = raw_w.shutdown().await;
    up.abort();
    drop(frames);
    let _ = tokio::time::timeout(Duration::from_secs(5), relay).await;
    result
}

/// Tells an exec or file-read client that there is no guest agent to ask.
async fn not_connected(conn: &mut UnixStream) -> Result<(), ServeError> {
    let f: Frame<GuestMsg> = Frame::Msg {
        stream: CLIENT_STREAM,
        msg: GuestMsg::ExecFailed {
            code: 1,
            message: "the guest agent is not connected".into(),
        },
    };
    Ok(asyncio::write_frame(conn, &f).await?)
}

/// Writes a one-frame reply, giving up on a client that does not read it within 10 s (the task
/// serving it would otherwise wait forever).
async fn reply_within(conn: &mut UnixStream, f: &Frame<CtlReply>) -> Result<(), ServeError> {
    match tokio::time::timeout(Duration::from_secs(10), asyncio::write_frame(conn, f)).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(ServeError::ReplyTimeout),
    }
}

/// Serves one control client.
async fn serve_client(mut conn: UnixStream, inst: &RunningInstance) -> Result<(), ServeError> {
    let first = tokio::time::timeout(
        Duration::from_secs(10),
        asyncio::read_frame::<CtlRequest, _>(&mut conn),
    )
    .await
    .map_err(|_| ServeError::NoRequest)??;
    let Some(Frame::Msg { msg, .. }) = first else {
        return Err(ServeError::Closed);
    };
    let reply = |m: CtlReply| Frame::Msg {
        stream: CLIENT_STREAM,
        msg: m,
    };
    match msg {
        CtlRequest::Status => {
            let st = inst.status().await;
            reply_within(&mut conn, &reply(CtlReply::Status(Box::new(st)))).await
        }
        CtlRequest::Stop { timeout_secs } => {
            let _ = inst.stop_tx.send(timeout_secs.min(3600)).await;
            reply_within(&mut conn, &reply(CtlReply::Stopping)).await
        }
        CtlRequest::Exec(req) => {
            let Some(agent) = inst.agent().filter(|a| *a.connected.borrow()) else {
                return not_connected(&mut conn).await;
            };
            relay_exec(conn, agent, GuestMsg::Exec(req)).await
        }
        CtlRequest::ReadFile { path, max_bytes } => {
            let Some(agent) = inst.agent().filter(|a| *a.connected.borrow()) else {
                return not_connected(&mut conn).await;
            };
            relay_exec(conn, agent, GuestMsg::ReadFile { path, max_bytes }).await
        }
    }
}

/// An error frame for the client.
fn client_error(message: String) -> Frame<GuestMsg> {
    Frame::Msg {
        stream: CLIENT_STREAM,
        msg: GuestMsg::Error { message },
    }
}

/// Relays one exec (or read-file) stream between a client connection and the guest.
///
/// Flow control: guest output is written to the client first and granted back to the guest only
/// after the write, so a client that stops reading stops only this relay (and, through the
/// window, its process in the guest); client frames are read only while the guest granted stdin
/// credit, so a process that does not read its stdin stops only its own client.
pub(crate) async fn relay_exec(
    conn: UnixStream,
    agent: Agent,
    request: GuestMsg,
) -> Result<(), ServeError> {
    let read_file = matches!(request, GuestMsg::ReadFile { .. });
    let (sid, stream) = agent.open_stream();
    let (from_guest, stdin_credit) = stream.split();
    let start_deadline = tokio::time::Instant::now() + EXEC_START_TIMEOUT;
    let Some(conn) = send_request(&agent, sid, request, start_deadline, conn).await? else {
        return Ok(());
    };
    let (cr, cw) = conn.into_split();
    let mut relay = Relay {
        agent: &agent,
        sid,
        read_file,
        from_guest,
        stdin_credit,
        // Raced against the guest's frames in select!: keeps partial frames across cancellation.
        client: asyncio::FrameReader::new(cr),
        cw,
        pending: Vec::new(),
        started: false,
    };
    let end = relay.run(start_deadline).await;
    let mut cw = relay.cw;
    if !matches!(end, Flow::Finished) {
        hang_up(&agent, sid).await;
    }
    agent.close_stream(sid);
    match end {
        Flow::Failed(e) => {
            // The client may be the one that stalled: do not wait on it for long.
            let f = client_error(gatevm_abi::error_chain(&e));
            let _ = tokio::time::timeout(Duration::from_secs(5), asyncio::write_frame(&mut cw, &f))
                .await;
            Err(e.into())
        }
        _ => Ok(()),
    }
}

/// Sends the request to the guest; a guest that does not take it before `deadline` gets the
/// client an error frame, and then there is nothing to relay (None).
async fn send_request(
    agent: &Agent,
    sid: u32,
    request: GuestMsg,
    deadline: tokio::time::Instant,
    mut conn: UnixStream,
) -> Result<Option<UnixStream>, SendError> {
    let sent = tokio::time::timeout_at(
        deadline,
        agent.send(Frame::Msg {
            stream: sid,
            msg: request,
        }),
    )
    .await;
    match sent {
        Ok(sent) => sent.map(|()| Some(conn)),
        Err(_) => {
            agent.close_stream(sid);
            let message = "the guest agent does not take requests (see `gatevm logs --console`)";
            tracing::warn!("{message}");
            let _ = asyncio::write_frame(&mut conn, &client_error(message.into())).await;
            Ok(None)
        }
    }
}

/// The client went away: hang up on the process as a terminal would (`nohup` survives it), close
/// its stdin, and let the guest discard the rest of its output.
async fn hang_up(agent: &Agent, sid: u32) {
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
            fd: Fd::Stdin,
        })
        .await;
    let _ = agent.discard(sid).await;
}

/// What the relay does after a step.
enum Flow {
    /// Goes on.
    Next,
    /// The process ended and the client has its last frame.
    Finished,
    /// The relay ends without the process's end (client gone, guest gone, start timeout).
    Ended,
    /// A frame could not be queued for the guest (it stopped reading): the stream ends.
    Failed(SendError),
}

/// One exec stream between a client connection and the guest.
struct Relay<'a> {
    agent: &'a Agent,
    sid: u32,
    read_file: bool,
    from_guest: UnboundedReceiver<Frame<GuestMsg>>,
    stdin_credit: StdinCredit,
    client: asyncio::FrameReader<OwnedReadHalf>,
    cw: OwnedWriteHalf,
    /// Stdin the client sent beyond the guest's credit, sent on as grants come.
    pending: Vec<u8>,
    /// The guest answered the request.
    started: bool,
}

impl Relay<'_> {
    /// Relays until the stream ends; returns how.
    async fn run(&mut self, start_deadline: tokio::time::Instant) -> Flow {
        loop {
            let read_client = self.pending.is_empty() && self.stdin_credit.available() > 0;
            let flow = tokio::select! {
                _ = tokio::time::sleep_until(start_deadline), if !self.started => {
                    self.start_timed_out().await
                }
                f = self.from_guest.recv() => self.on_guest_frame(f).await,
                // Waits for a grant while stdin is held back: pending bytes, or no credit at all.
                _ = self.stdin_credit.granted(), if !read_client => self.send_stdin().await,
                f = self.client.read_frame::<GuestMsg>(), if read_client => {
                    self.on_client_frame(f).await
                }
            };
            if !matches!(flow, Flow::Next) {
                return flow;
            }
        }
    }

    /// The guest did not answer the request in time.
    async fn start_timed_out(&mut self) -> Flow {
        let message = format!(
            "the guest agent did not start the command within {} s (see `gatevm logs --console`)",
            EXEC_START_TIMEOUT.as_secs()
        );
        tracing::warn!("{message}");
        let _ = asyncio::write_frame(&mut self.cw, &client_error(message)).await;
        Flow::Ended
    }

    /// Hands a guest frame to the client, and grants its data back to the guest once written.
    async fn on_guest_frame(&mut self, f: Option<Frame<GuestMsg>>) -> Flow {
        self.started = true;
        let Some(f) = f else {
            if self.agent.ended() {
                let f = client_error("the guest agent disconnected".into());
                let _ = asyncio::write_frame(&mut self.cw, &f).await;
            }
            // Otherwise the stream was ended for breaking flow control: its consumer got the
            // error already.
            return Flow::Ended;
        };
        let last = matches!(
            f,
            Frame::Msg {
                msg: GuestMsg::Exit(_) | GuestMsg::ExecFailed { .. },
                ..
            }
        ) || (self.read_file
            && matches!(
                f,
                Frame::Msg {
                    msg: GuestMsg::Error { .. },
                    ..
                }
            ));
        let data = match &f {
            Frame::Data { bytes, .. } => bytes.len(),
            _ => 0,
        };
        let f = restream(f, CLIENT_STREAM);
        if asyncio::write_frame(&mut self.cw, &f).await.is_err() {
            return Flow::Ended;
        }
        if last {
            return Flow::Finished;
        }
        if data > 0 {
            // Handed on: the guest may send as much more.
            if let Err(e) = self.agent.consumed(self.sid, data).await {
                return Flow::Failed(e);
            }
        }
        Flow::Next
    }

    /// Passes a client frame on: stdin within the guest's credit, stdin's end, resizes and
    /// signals; anything else is dropped.
    async fn on_client_frame(&mut self, f: Result<Option<Frame<GuestMsg>>, ProtoError>) -> Flow {
        match f {
            Ok(Some(Frame::Data {
                fd: Fd::Stdin,
                bytes,
                ..
            })) => {
                self.pending = bytes;
                self.send_stdin().await
            }
            Ok(Some(f)) => {
                let allowed = matches!(
                    &f,
                    Frame::Eof { fd: Fd::Stdin, .. }
                        | Frame::Msg {
                            msg: GuestMsg::Resize { .. } | GuestMsg::Signal { .. },
                            ..
                        }
                );
                if allowed {
                    if let Err(e) = self.agent.send(restream(f, self.sid)).await {
                        return Flow::Failed(e);
                    }
                }
                Flow::Next
            }
            // The client hung up (or sent garbage).
            _ => Flow::Ended,
        }
    }

    /// Sends the pending stdin the guest has credit for.
    async fn send_stdin(&mut self) -> Flow {
        match send_stdin(
            self.agent,
            self.sid,
            &mut self.stdin_credit,
            &mut self.pending,
        )
        .await
        {
            Ok(()) => Flow::Next,
            Err(e) => Flow::Failed(e),
        }
    }
}

/// Sends as much of `pending` stdin as the guest's credit allows, in data chunks; what is left
/// waits for the next grant.
async fn send_stdin(
    agent: &Agent,
    sid: u32,
    credit: &mut StdinCredit,
    pending: &mut Vec<u8>,
) -> Result<(), SendError> {
    while !pending.is_empty() {
        let n = usize::try_from(credit.available())
            .unwrap_or(usize::MAX)
            .min(pending.len())
            .min(gatevm_abi::DATA_CHUNK);
        if n == 0 {
            break;
        }
        let rest = pending.split_off(n);
        let bytes = std::mem::replace(pending, rest);
        credit.sent(n);
        agent
            .send(Frame::Data {
                stream: sid,
                fd: Fd::Stdin,
                bytes,
            })
            .await?;
    }
    Ok(())
}

/// The same frame on another stream.
fn restream(f: Frame<GuestMsg>, stream: u32) -> Frame<GuestMsg> {
    match f {
        Frame::Msg { msg, .. } => Frame::Msg { stream, msg },
        Frame::Data { fd, bytes, .. } => Frame::Data { stream, fd, bytes },
        Frame::Eof { fd, .. } => Frame::Eof { stream, fd },
        Frame::Credit { bytes, .. } => Frame::Credit { stream, bytes },
    }
}

/// The exec relay between a CLI client and the guest, against a fake guest that keeps to the
/// credit windows: a client that stops reading stops only its own relay.
#[cfg(test)]
mod relay_tests {
    use super::{relay_exec, relay_socket, Agent};
    use crate::control::CLIENT_STREAM;
    use gatevm_abi::flow::SendWindow;
    use gatevm_abi::{
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
        fake_guest_with(output, grant_stdin, 0).await
    }

    /// [`fake_guest`] whose process first writes `stderr_flood` bytes of terminal escapes and
    /// line breaks on its stderr (a hostile guest's relay process).
    async fn fake_guest_with(
        output: usize,
        grant_stdin: bool,
        stderr_flood: usize,
    ) -> (Agent, Arc<Mutex<Seen>>) {
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
                            // The stderr flood first, then the output, each within the host's
                            // credit.
                            let hostile: &[u8] = b"\x1b[2J\x1b]0;owned\x07\r\nPRI * HTTP/2.0\n";
                            for (fd, pattern, total) in [
                                (Fd::Stderr, hostile, stderr_flood),
                                (Fd::Stdout, &b"y"[..], output),
                            ] {
                                let mut left = total;
                                while left > 0 {
                                    let n = windows
                                        .lock()
                                        .expect("lock")
                                        .get_mut(&stream)
                                        .map(|w| w.take(left.min(DATA_CHUNK)))
                                        .unwrap_or(0);
                                    if n == 0 {
                                        // Polls too: a grant between the take and this wait
                                        // would otherwise be missed.
                                        let _ = tokio::time::timeout(
                                            Duration::from_millis(20),
                                            notify.notified(),
                                        )
                                        .await;
                                        continue;
                                    }
                                    let bytes = pattern.iter().copied().cycle().take(n).collect();
                                    put(gw.clone(), Frame::Data { stream, fd, bytes }).await;
                                    left -= n;
                                }
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

    /// A plain client of the containerd relay gets the guest's bytes as they are, then the end of
    /// the connection when the guest's side ends.
    #[tokio::test]
    async fn a_socket_relay_passes_the_bytes_and_ends_with_the_guest() {
        use tokio::io::AsyncReadExt;
        let (agent, _) = fake_guest(1_000_000, true).await;
        let (mut client, server) = UnixStream::pair().expect("socketpair");
        let relay = tokio::spawn(relay_socket(server, agent, "/run/x.sock"));
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), client.read_to_end(&mut got))
            .await
            .expect("the relay closes the client when the guest side ends")
            .expect("read");
        assert_eq!(got.len(), 1_000_000);
        assert!(got.iter().all(|b| *b == b'y'));
        let ended = tokio::time::timeout(Duration::from_secs(10), relay).await;
        assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
    }

    /// What the guest's relay process writes on stderr (here a megabyte of terminal escapes and
    /// text that looks like the protocol) never reaches the client's byte stream, and does not
    /// stop the relay: the client gets exactly the stdout bytes.
    #[tokio::test]
    async fn a_hostile_guests_stderr_stays_out_of_the_clients_stream() {
        use tokio::io::AsyncReadExt;
        let (agent, _) = fake_guest_with(100_000, true, 1 << 20).await;
        let (mut client, server) = UnixStream::pair().expect("socketpair");
        let relay = tokio::spawn(relay_socket(server, agent, "/run/x.sock"));
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), client.read_to_end(&mut got))
            .await
            .expect("the relay ends with the guest despite the stderr flood")
            .expect("read");
        assert_eq!(got.len(), 100_000);
        assert!(
            got.iter().all(|b| *b == b'y'),
            "stderr bytes reached the client"
        );
        let ended = tokio::time::timeout(Duration::from_secs(10), relay).await;
        assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
    }

    /// A guest that floods a plain client that does not read gets no more credit than the window
    /// and the sockets' buffers hold: nothing piles up in the supervisor. The client's hang-up
    /// ends the relay.
    #[tokio::test]
    async fn a_socket_relay_holds_a_flooding_guest_to_its_window() {
        let (agent, seen) = fake_guest(64 << 20, true).await;
        let (client, server) = UnixStream::pair().expect("socketpair");
        let relay = tokio::spawn(relay_socket(server, agent, "/run/x.sock"));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let granted: u64 = seen.lock().expect("lock").granted.values().sum();
        assert!(
            granted < 4 << 20,
            "{granted} bytes granted to a guest whose client reads nothing"
        );
        drop(client);
        let ended = tokio::time::timeout(Duration::from_secs(10), relay).await;
        assert!(
            ended.is_ok(),
            "the relay did not end after the client hung up"
        );
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
