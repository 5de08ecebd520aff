//! The host side against a misbehaving peer: a guest agent that sends garbage, oversize or
//! truncated frames, messages it should not send, or nothing at all, and a control socket that
//! does the same to the CLI's client. Each must end in an error (or "not responding") within a
//! bound, without a panic or a hang.
//!
//! `HANG` is the hang detector, not a performance bound: it is generous because the machines that
//! run this are shared and slow.

use gatevm_abi::{
    asyncio::FrameReader, ExitStatus, Fd, Frame, GuestMsg, PayloadState, PayloadStatus,
    MAX_FRAME_LEN, PROTOCOL_VERSION, STREAM_CONTROL,
};
use gatevm_instance::agent::Agent;
use std::future::Future;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

const HANG: Duration = Duration::from_secs(20);

async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(HANG, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: still waiting after {} s", HANG.as_secs()),
    }
}

/// An agent over one end of a socket pair; the other end plays the guest.
fn agent() -> (Agent, UnixStream) {
    let (host, guest) = UnixStream::pair().expect("socketpair");
    let (r, w) = host.into_split();
    (Agent::spawn(r, w), guest)
}

async fn wait_ended(agent: &Agent) {
    bounded("the channel to end", async {
        while !agent.ended() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(!*agent.connected.borrow());
}

async fn wait_connected(agent: &Agent) {
    let mut c = agent.connected.clone();
    bounded("the guest hello to register", async {
        while !*c.borrow_and_update() {
            c.changed().await.expect("agent dropped");
        }
    })
    .await;
}

fn hello(version: u32) -> Frame<GuestMsg> {
    Frame::Msg {
        stream: STREAM_CONTROL,
        msg: GuestMsg::Hello {
            version,
            software: "hostile".into(),
            uptime_ms: Some(1),
            kernel: None,
        },
    }
}

async fn put(guest: &mut UnixStream, f: &Frame<GuestMsg>) {
    let bytes = f.encode().expect("encode");
    guest.write_all(&bytes).await.expect("guest write");
}

/// Deterministic noise (xorshift), so a failure can be replayed.
fn garbage(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// After the channel ended, requests fail (within their timeouts).
async fn requests_fail(agent: &Agent) {
    assert!(!bounded("status", agent.refresh_status(Duration::from_secs(1))).await);
    assert!(!bounded("shutdown", agent.shutdown(Duration::from_secs(1))).await);
}

#[tokio::test]
async fn random_garbage_ends_the_channel() {
    for seed in 1..=16u64 {
        let (agent, mut guest) = agent();
        let noise = garbage(seed, 64 * 1024);
        // A length field may announce a frame longer than the noise: the end of the stream then
        // truncates it. Written from a task: the host stops reading at the first error.
        let writer = tokio::spawn(async move {
            let _ = guest.write_all(&noise).await;
            let _ = guest.shutdown().await;
            guest
        });
        wait_ended(&agent).await;
        requests_fail(&agent).await;
        drop(writer);
    }
}

#[tokio::test]
async fn garbage_after_hello_ends_the_channel() {
    let (agent, mut guest) = agent();
    put(&mut guest, &hello(PROTOCOL_VERSION)).await;
    wait_connected(&agent).await;
    // A plausible length, then a body that is not a frame.
    guest
        .write_all(&[0, 0, 0, 9, 0, 0, 0, 0, 0x7f, 1, 2, 3, 4])
        .await
        .expect("guest write");
    wait_ended(&agent).await;
    requests_fail(&agent).await;
}

#[tokio::test]
async fn oversize_frames_end_the_channel_without_waiting_for_the_body() {
    for len in [u32::MAX, 0x8000_0000, (MAX_FRAME_LEN + 1) as u32] {
        let (agent, mut guest) = agent();
        let mut bytes = len.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0, 0, 0, 1, 0x11, 0xaa, 0xbb]);
        guest.write_all(&bytes).await.expect("guest write");
        // The guest stays connected and sends nothing more: the host must not wait for the
        // announced gigabytes.
        wait_ended(&agent).await;
        requests_fail(&agent).await;
        drop(guest);
    }
}

#[tokio::test]
async fn undersize_frames_end_the_channel() {
    for len in [0u32, 1, 4] {
        let (agent, mut guest) = agent();
        let mut bytes = len.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0; 8]);
        guest.write_all(&bytes).await.expect("guest write");
        wait_ended(&agent).await;
        drop(guest);
    }
}

#[tokio::test]
async fn truncated_frames_then_eof_end_the_channel() {
    let whole = hello(PROTOCOL_VERSION).encode().expect("encode");
    for cut in [1, 2, 3, 4, 5, 8, 9, whole.len() - 1] {
        let (agent, mut guest) = agent();
        guest.write_all(&whole[..cut]).await.expect("guest write");
        guest.shutdown().await.expect("guest shutdown");
        wait_ended(&agent).await;
        requests_fail(&agent).await;
        drop(guest);
    }
    // A long frame cut short.
    let (agent, mut guest) = agent();
    let mut bytes = 100_000u32.to_be_bytes().to_vec();
    bytes.extend_from_slice(&[0, 0, 0, 1, 0x11]);
    bytes.extend_from_slice(&[7; 1000]);
    guest.write_all(&bytes).await.expect("guest write");
    drop(guest);
    wait_ended(&agent).await;
}

#[tokio::test]
async fn undecodable_or_wrong_version_messages_end_the_channel() {
    let bad: Vec<Vec<u8>> = vec![
        // Not JSON.
        [&[0, 0, 0, 8, 0, 0, 0, 0, 0x01][..], b"{x:"].concat(),
        // JSON, but no message this protocol knows.
        {
            let body = br#"{"type":"launch"}"#;
            let mut v = ((5 + body.len()) as u32).to_be_bytes().to_vec();
            v.extend_from_slice(&[0, 0, 0, 0, 0x01]);
            v.extend_from_slice(body);
            v
        },
        // Unknown frame kinds.
        vec![0, 0, 0, 5, 0, 0, 0, 0, 0x13],
        vec![0, 0, 0, 5, 0, 0, 0, 0, 0x40],
        // End-of-stream with a payload.
        vec![0, 0, 0, 6, 0, 0, 0, 0, 0x21, 0],
        // Another protocol version.
        hello(PROTOCOL_VERSION + 1).encode().expect("encode"),
    ];
    for bytes in bad {
        let (agent, mut guest) = agent();
        guest.write_all(&bytes).await.expect("guest write");
        wait_ended(&agent).await;
        drop(guest);
    }
}

#[tokio::test]
async fn unexpected_messages_are_dropped_and_the_channel_stays_usable() {
    let (agent, guest) = agent();
    let (gr, mut gw) = guest.into_split();
    // Frames before any hello are not a hello: still not connected.
    put_half(
        &mut gw,
        &Frame::Eof {
            stream: STREAM_CONTROL,
            fd: Fd::Stdout,
        },
    )
    .await;
    put_half(&mut gw, &hello(PROTOCOL_VERSION)).await;
    wait_connected(&agent).await;
    let (sid, mut from_guest) = agent.open_stream();

    // What a guest never sends on the control stream, or unasked.
    let unexpected = [
        GuestMsg::StatusRequest,
        GuestMsg::Exec(Default::default()),
        GuestMsg::ExecStarted { pid: 1 },
        GuestMsg::ExecFailed {
            code: 1,
            message: "x".into(),
        },
        GuestMsg::Exit(ExitStatus {
            code: Some(0),
            signal: None,
        }),
        GuestMsg::Resize { rows: 1, cols: 1 },
        GuestMsg::Signal { signal: 9 },
        GuestMsg::Shutdown,
        GuestMsg::ShutdownAck,
    ];
    for msg in &unexpected {
        put_half(
            &mut gw,
            &Frame::Msg {
                stream: STREAM_CONTROL,
                msg: msg.clone(),
            },
        )
        .await;
    }
    put_half(
        &mut gw,
        &Frame::Data {
            stream: STREAM_CONTROL,
            fd: Fd::Stdout,
            bytes: vec![1; 1000],
        },
    )
    .await;
    // A flood of error reports (the log keeps only the first ones).
    for i in 0..200 {
        put_half(
            &mut gw,
            &Frame::Msg {
                stream: STREAM_CONTROL,
                msg: GuestMsg::Error {
                    message: format!("\x1b]0;owned\x07error {i} {}", "y".repeat(2000)),
                },
            },
        )
        .await;
    }
    // Frames for streams the host never opened.
    for stream in [sid + 1, 999, u32::MAX] {
        put_half(
            &mut gw,
            &Frame::Msg {
                stream,
                msg: GuestMsg::Exit(ExitStatus {
                    code: Some(0),
                    signal: None,
                }),
            },
        )
        .await;
        put_half(
            &mut gw,
            &Frame::Data {
                stream,
                fd: Fd::Stdout,
                bytes: vec![2; 100],
            },
        )
        .await;
    }
    // On the open exec stream: messages that do not belong there, and stdin from the guest.
    for msg in [
        hello(PROTOCOL_VERSION),
        Frame::Msg {
            stream: 0,
            msg: GuestMsg::Status {
                uptime_ms: 1,
                payloads: vec![],
            },
        },
        Frame::Msg {
            stream: 0,
            msg: GuestMsg::Exec(gatevm_abi::ExecRequest {
                argv: vec![String::new(); 50_000],
                ..Default::default()
            }),
        },
        Frame::Msg {
            stream: 0,
            msg: GuestMsg::Shutdown,
        },
        Frame::Data {
            stream: 0,
            fd: Fd::Stdin,
            bytes: vec![3; 10],
        },
        Frame::Eof {
            stream: 0,
            fd: Fd::Stdin,
        },
    ] {
        put_half(&mut gw, &restream(msg, sid)).await;
    }
    // Then what the exec stream does carry.
    let wanted = vec![
        Frame::Msg {
            stream: sid,
            msg: GuestMsg::ExecStarted { pid: 42 },
        },
        Frame::Data {
            stream: sid,
            fd: Fd::Stdout,
            bytes: b"out".to_vec(),
        },
        Frame::Eof {
            stream: sid,
            fd: Fd::Stdout,
        },
        Frame::Msg {
            stream: sid,
            msg: GuestMsg::Exit(ExitStatus {
                code: Some(3),
                signal: None,
            }),
        },
    ];
    for f in &wanted {
        put_half(&mut gw, f).await;
    }
    let mut got = Vec::new();
    bounded("the exec stream's frames", async {
        while let Some(f) = from_guest.recv().await {
            got.push(f);
        }
    })
    .await;
    assert_eq!(
        got, wanted,
        "only the exec stream's own frames, then its end"
    );
    assert!(
        !agent.ended(),
        "unexpected but well-formed frames must not end the channel"
    );

    // An oversized, hostile status answer: the host keeps 16 payloads with short, clean strings.
    let payloads: Vec<PayloadStatus> = (0..100)
        .map(|i| PayloadStatus {
            name: format!("p{i}\x1b[2J{}", "n".repeat(300)),
            state: PayloadState::Failed,
            pid: None,
            restarts: u32::MAX,
            last_exit: Some(format!("\x1b[31m{}", "e".repeat(1200))),
        })
        .collect();
    let answer = Frame::Msg {
        stream: STREAM_CONTROL,
        msg: GuestMsg::Status {
            uptime_ms: u64::MAX,
            payloads,
        },
    };
    // Answer the host's status request as a real guest would.
    let answering = tokio::spawn(async move {
        let mut r = FrameReader::new(gr);
        loop {
            match r.read_frame::<GuestMsg>().await {
                Ok(Some(Frame::Msg {
                    msg: GuestMsg::StatusRequest,
                    ..
                })) => put_half(&mut gw, &answer).await,
                Ok(Some(_)) => {}
                _ => return,
            }
        }
    });
    assert!(
        bounded("a status answer", agent.refresh_status(HANG / 2)).await,
        "the guest answered"
    );
    let view = agent.view();
    assert_eq!(view.payloads.len(), 16);
    for p in &view.payloads {
        assert!(p.name.chars().count() <= 100, "{}", p.name.len());
        let last = p.last_exit.as_deref().unwrap_or("");
        assert!(last.chars().count() <= 1000);
        assert!(!p.name.chars().chain(last.chars()).any(char::is_control));
    }
    assert!(!agent.ended());
    answering.abort();
}

#[tokio::test]
async fn a_silent_guest_is_not_responding() {
    // Connected and reading, never answering.
    let (agent, guest) = agent();
    let (gr, mut gw) = guest.into_split();
    put_half(&mut gw, &hello(PROTOCOL_VERSION)).await;
    wait_connected(&agent).await;
    let drain = tokio::spawn(async move {
        let mut r = FrameReader::new(gr);
        while let Ok(Some(_)) = r.read_frame::<GuestMsg>().await {}
    });
    for _ in 0..3 {
        assert!(!bounded("status", agent.refresh_status(Duration::from_secs(1))).await);
    }
    assert!(!bounded("shutdown", agent.shutdown(Duration::from_secs(1))).await);
    let (_sid, mut from_guest) = agent.open_stream();
    // Nothing arrives on an exec stream of a silent guest (the supervisor's exec start timeout
    // ends that wait); the stream ends when the guest goes away.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), from_guest.recv())
            .await
            .is_err()
    );
    drop(gw);
    drain.abort();
    let _ = drain.await;
    wait_ended(&agent).await;
    assert!(bounded("the exec stream to end", from_guest.recv())
        .await
        .is_none());
}

#[tokio::test]
async fn a_silent_guest_that_never_said_hello_is_not_responding() {
    let (agent, guest) = agent();
    for _ in 0..3 {
        agent.hello().await.expect("hello queued");
    }
    assert!(!bounded("status", agent.refresh_status(Duration::from_secs(1))).await);
    assert!(!bounded("shutdown", agent.shutdown(Duration::from_secs(1))).await);
    assert!(!*agent.connected.borrow());
    drop(guest);
    wait_ended(&agent).await;
}

#[tokio::test]
async fn a_guest_that_stops_reading_cannot_block_the_host() {
    let (agent, guest) = agent();
    let agent = agent.with_send_timeout(Duration::from_secs(1));
    let (_gr, mut gw) = guest.into_split();
    put_half(&mut gw, &hello(PROTOCOL_VERSION)).await;
    wait_connected(&agent).await;
    // The guest reads nothing: the socket buffer fills, then the agent's queue, then sending
    // gives up instead of waiting forever.
    let (sid, _from_guest) = agent.open_stream();
    let chunk = vec![0u8; gatevm_abi::DATA_CHUNK];
    let err = bounded("a send to a guest that does not read to fail", async {
        loop {
            let f = Frame::Data {
                stream: sid,
                fd: Fd::Stdin,
                bytes: chunk.clone(),
            };
            if let Err(e) = agent.send(f).await {
                return e;
            }
        }
    })
    .await;
    let err = gatevm_abi::error_chain(&err);
    assert!(err.contains("has not read"), "{err}");
    // Requests with a timeout time out (queueing included); a hello does not wait at all.
    assert!(!bounded("status", agent.refresh_status(Duration::from_secs(1))).await);
    assert!(!bounded("shutdown", agent.shutdown(Duration::from_secs(1))).await);
    bounded("hello", agent.hello())
        .await
        .expect("a hello on a full queue is not an error");
    assert!(!agent.ended());
}

async fn put_half(w: &mut tokio::net::unix::OwnedWriteHalf, f: &Frame<GuestMsg>) {
    let bytes = f.encode().expect("encode");
    w.write_all(&bytes).await.expect("guest write");
}

fn restream(f: Frame<GuestMsg>, stream: u32) -> Frame<GuestMsg> {
    match f {
        Frame::Msg { msg, .. } => Frame::Msg { stream, msg },
        Frame::Data { fd, bytes, .. } => Frame::Data { stream, fd, bytes },
        Frame::Eof { fd, .. } => Frame::Eof { stream, fd },
        Frame::Credit { bytes, .. } => Frame::Credit { stream, bytes },
    }
}

/// The CLI's control client against a fake supervisor.
mod control_client {
    use super::*;
    use gatevm_instance::client;
    use gatevm_instance::lock::{try_lock, InstanceLock};
    use gatevm_instance::InstancePaths;
    use std::sync::OnceLock;
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixListener;

    /// Points the data and runtime directories into the target's scratch directory, once, before
    /// any client call reads them.
    fn dirs() {
        static BASE: OnceLock<tempfile::TempDir> = OnceLock::new();
        BASE.get_or_init(|| {
            let base = tempfile::Builder::new()
                .prefix("hostile")
                .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
                .expect("scratch dir");
            std::env::set_var("GATEVM_DATA_DIR", base.path().join("d"));
            std::env::set_var("GATEVM_RUN_DIR", base.path().join("r"));
            base
        });
    }

    #[derive(Clone, Copy)]
    enum Fake {
        Garbage,
        Oversize,
        Truncated,
        Silent,
        /// A well-formed reply of a type the request does not expect, then the end.
        Unexpected,
    }

    /// A running instance as the client sees it (config, held lock, control socket), served by
    /// a fake supervisor that answers every connection per `fake`.
    struct Instance {
        name: String,
        _lock: InstanceLock,
        server: tokio::task::JoinHandle<()>,
    }

    impl Drop for Instance {
        fn drop(&mut self) {
            self.server.abort();
            let p = InstancePaths::new(&self.name);
            let _ = std::fs::remove_dir_all(&p.dir);
            let _ = std::fs::remove_dir_all(&p.run);
        }
    }

    fn instance(name: &str, fake: Fake) -> Instance {
        dirs();
        let p = InstancePaths::new(name);
        std::fs::create_dir_all(&p.dir).expect("instance dir");
        std::fs::create_dir_all(&p.run).expect("run dir");
        std::fs::write(p.config(), "{}").expect("config");
        let lock = try_lock(&p.lock()).expect("lock").expect("lock free");
        let listener = UnixListener::bind(p.control_socket()).expect("control socket");
        let server = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve(conn, fake));
            }
        });
        Instance {
            name: name.to_string(),
            _lock: lock,
            server,
        }
    }

    async fn serve(mut conn: UnixStream, fake: Fake) {
        // Read the whole request: closing a unix socket with unread data resets the connection,
        // which would hide what the client makes of the answer.
        let _ = FrameReader::new(&mut conn)
            .read_frame::<gatevm_instance::control::CtlRequest>()
            .await;
        let _ = match fake {
            Fake::Garbage => {
                let _ = conn.write_all(&garbage(7, 4096)).await;
                return;
            }
            Fake::Oversize => conn.write_all(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1]).await,
            Fake::Truncated => {
                let _ = conn
                    .write_all(&[0, 0, 0, 200, 0, 0, 0, 1, 0x01, b'{'])
                    .await;
                return;
            }
            Fake::Silent => Ok(()),
            Fake::Unexpected => {
                let f = Frame::Msg {
                    stream: 1,
                    msg: GuestMsg::ExecStarted { pid: 1 },
                };
                let _ = conn.write_all(&f.encode().expect("encode")).await;
                return;
            }
        };
        // Hold the connection open and say nothing more.
        let mut sink = [0u8; 4096];
        while let Ok(n) = conn.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    }

    async fn status_fails(name: &str, fake: Fake) {
        let _i = instance(name, fake);
        let st = bounded("client::status", client::status(name))
            .await
            .expect("status falls back to the files");
        let err = st.last_error.unwrap_or_default();
        assert!(err.contains("does not answer"), "{name}: {err}");
        assert!(!st.agent.connected);
    }

    #[tokio::test]
    async fn status_against_a_garbage_supervisor() {
        status_fails("hostile-st-garbage", Fake::Garbage).await;
    }

    #[tokio::test]
    async fn status_against_an_oversize_supervisor() {
        status_fails("hostile-st-oversize", Fake::Oversize).await;
    }

    #[tokio::test]
    async fn status_against_a_truncating_supervisor() {
        status_fails("hostile-st-truncated", Fake::Truncated).await;
    }

    #[tokio::test]
    async fn status_against_a_silent_supervisor() {
        status_fails("hostile-st-silent", Fake::Silent).await;
    }

    #[tokio::test]
    async fn status_against_a_wrong_reply() {
        // An exec frame where a status reply belongs: not decodable as a reply.
        status_fails("hostile-st-unexpected", Fake::Unexpected).await;
    }

    async fn exec_fails(name: &str, fake: Fake) -> client::ClientError {
        exec_fails_within(name, fake, HANG).await
    }

    async fn exec_fails_within(name: &str, fake: Fake, within: Duration) -> client::ClientError {
        let _i = instance(name, fake);
        let (_events_tx, events) = tokio::sync::mpsc::channel(1);
        let r = tokio::time::timeout(
            within,
            client::exec(
                name,
                gatevm_abi::ExecRequest {
                    argv: vec!["true".into()],
                    ..Default::default()
                },
                None::<tokio::io::Empty>,
                tokio::io::sink(),
                tokio::io::sink(),
                events,
            ),
        )
        .await;
        match r {
            Err(_) => panic!("client::exec: still waiting after {} s", within.as_secs()),
            Ok(Ok(code)) => panic!("{name}: exec returned {code} from a broken supervisor"),
            Ok(Err(e)) => e,
        }
    }

    #[tokio::test]
    async fn exec_against_a_garbage_supervisor() {
        exec_fails("hostile-ex-garbage", Fake::Garbage).await;
    }

    #[tokio::test]
    async fn exec_against_an_oversize_supervisor() {
        let e = exec_fails("hostile-ex-oversize", Fake::Oversize).await;
        assert!(e.to_string().contains("exceeds the limit"), "{e}");
    }

    #[tokio::test]
    async fn exec_against_a_truncating_supervisor() {
        let e = exec_fails("hostile-ex-truncated", Fake::Truncated).await;
        assert!(e.to_string().contains("middle of a frame"), "{e}");
    }

    #[tokio::test]
    async fn exec_against_a_supervisor_that_hangs_up() {
        let e = exec_fails("hostile-ex-unexpected", Fake::Unexpected).await;
        assert!(e.to_string().contains("closed"), "{e}");
    }

    /// A supervisor that never answers an exec. Its own start timeout (30 s in all, queueing the
    /// request included) normally ends the wait with an error frame; the client gives up at 45 s.
    #[tokio::test]
    async fn exec_against_a_silent_supervisor() {
        exec_fails_within("hostile-ex-silent", Fake::Silent, Duration::from_secs(120)).await;
    }
}

/// Flow control against a hostile guest: each violation ends only its own stream, and a consumer
/// that stops reading delays nobody else.
mod flow {
    use super::*;
    use gatevm_abi::{GRANT_STEP, INITIAL_WINDOW};
    use gatevm_instance::agent::MAX_STREAM_MSGS;
    use std::sync::Arc;
    use tokio::net::unix::OwnedWriteHalf;
    use tokio::sync::Mutex;

    /// A guest that said hello and answers every status request; the test writes through the
    /// same writer. Credit frames the host sends are counted per stream.
    struct Guest {
        w: Arc<Mutex<OwnedWriteHalf>>,
        credits: Arc<std::sync::Mutex<std::collections::HashMap<u32, u64>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Guest {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl Guest {
        async fn put(&self, f: &Frame<GuestMsg>) {
            put_half(&mut *self.w.lock().await, f).await;
        }

        fn credit(&self, stream: u32) -> u64 {
            self.credits
                .lock()
                .map(|c| c.get(&stream).copied().unwrap_or(0))
                .unwrap_or(0)
        }
    }

    async fn connected() -> (Agent, Guest) {
        let (agent, guest) = agent();
        let (gr, gw) = guest.into_split();
        let w = Arc::new(Mutex::new(gw));
        let credits: Arc<std::sync::Mutex<std::collections::HashMap<u32, u64>>> = Arc::default();
        put_half(&mut *w.lock().await, &hello(PROTOCOL_VERSION)).await;
        wait_connected(&agent).await;
        let (w2, c2) = (w.clone(), credits.clone());
        let task = tokio::spawn(async move {
            let mut r = FrameReader::new(gr);
            loop {
                match r.read_frame::<GuestMsg>().await {
                    Ok(Some(Frame::Msg {
                        msg: GuestMsg::StatusRequest,
                        ..
                    })) => {
                        let answer = Frame::Msg {
                            stream: STREAM_CONTROL,
                            msg: GuestMsg::Status {
                                uptime_ms: 1,
                                payloads: vec![],
                            },
                        };
                        put_half(&mut *w2.lock().await, &answer).await;
                    }
                    Ok(Some(Frame::Credit { stream, bytes })) => {
                        if let Ok(mut c) = c2.lock() {
                            *c.entry(stream).or_default() += u64::from(bytes);
                        }
                    }
                    Ok(Some(_)) => {}
                    _ => return,
                }
            }
        });
        (agent, Guest { w, credits, task })
    }

    fn data(stream: u32, n: usize) -> Frame<GuestMsg> {
        Frame::Data {
            stream,
            fd: Fd::Stdout,
            bytes: vec![b'y'; n],
        }
    }

    /// A status answer must come within 1 s, measured by a timeout around the whole request.
    async fn status_within_1s(agent: &Agent) {
        let t = std::time::Instant::now();
        let answered = tokio::time::timeout(
            Duration::from_secs(1),
            agent.refresh_status(Duration::from_secs(1)),
        )
        .await;
        println!("status answered in {:?}", t.elapsed());
        assert!(
            matches!(answered, Ok(true)),
            "no status answer within 1 s ({:?})",
            t.elapsed()
        );
    }

    /// The stream's frames until it ends: (data bytes, other frames).
    async fn drain(s: &mut gatevm_instance::agent::GuestStream) -> (usize, Vec<Frame<GuestMsg>>) {
        let mut bytes = 0;
        let mut other = Vec::new();
        bounded("the stream to end", async {
            while let Some(f) = s.recv().await {
                match f {
                    Frame::Data { bytes: b, .. } => bytes += b.len(),
                    f => other.push(f),
                }
            }
        })
        .await;
        (bytes, other)
    }

    fn error_text(frames: &[Frame<GuestMsg>]) -> String {
        match frames.last() {
            Some(Frame::Msg {
                msg: GuestMsg::Error { message },
                ..
            }) => message.clone(),
            other => panic!("the stream did not end with an error: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_stalled_consumer_does_not_delay_status_or_other_streams() {
        let (agent, guest) = connected().await;
        let (stalled, _stalled_rx) = agent.open_stream();
        let (other, mut other_rx) = agent.open_stream();
        // Far more frames than any per-stream queue depth, all within the window: nobody reads
        // them. The old bounded route (64 frames) stopped the reader for everybody here.
        let chunk = 1024;
        for _ in 0..(INITIAL_WINDOW as usize / chunk) {
            guest.put(&data(stalled, chunk)).await;
        }
        // Empty data frames are dropped without counting against anything.
        for _ in 0..5000 {
            guest.put(&data(stalled, 0)).await;
        }
        status_within_1s(&agent).await;
        assert_eq!(agent.queued(stalled), Some(u64::from(INITIAL_WINDOW)));
        // Another stream runs to its end meanwhile.
        let t = std::time::Instant::now();
        guest
            .put(&Frame::Msg {
                stream: other,
                msg: GuestMsg::ExecStarted { pid: 2 },
            })
            .await;
        guest.put(&data(other, 10)).await;
        guest
            .put(&Frame::Msg {
                stream: other,
                msg: GuestMsg::Exit(ExitStatus {
                    code: Some(0),
                    signal: None,
                }),
            })
            .await;
        let (bytes, frames) = drain(&mut other_rx).await;
        println!("another stream ran to its end in {:?}", t.elapsed());
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        assert_eq!(bytes, 10);
        assert_eq!(frames.len(), 2);
        assert!(!agent.ended());
    }

    #[tokio::test]
    async fn a_guest_that_ignores_the_window_loses_only_that_stream() {
        let (agent, guest) = connected().await;
        let (bad, mut bad_rx) = agent.open_stream();
        let (good, mut good_rx) = agent.open_stream();
        // Exactly the window is fine; one byte more is a violation.
        for _ in 0..(INITIAL_WINDOW as usize / gatevm_abi::DATA_CHUNK) {
            guest.put(&data(bad, gatevm_abi::DATA_CHUNK)).await;
        }
        guest.put(&data(bad, 1)).await;
        // And it goes on, as a hostile guest would.
        for _ in 0..64 {
            guest.put(&data(bad, gatevm_abi::DATA_CHUNK)).await;
        }
        let (bytes, frames) = drain(&mut bad_rx).await;
        assert_eq!(
            bytes, INITIAL_WINDOW as usize,
            "only the window got through"
        );
        let e = error_text(&frames);
        assert!(e.contains("flow control"), "{e}");
        assert_eq!(agent.queued(bad), None, "the stream is closed");
        // The channel and the other stream are untouched.
        assert!(!agent.ended());
        status_within_1s(&agent).await;
        guest.put(&data(good, 5)).await;
        guest
            .put(&Frame::Msg {
                stream: good,
                msg: GuestMsg::Exit(ExitStatus {
                    code: Some(0),
                    signal: None,
                }),
            })
            .await;
        let (bytes, frames) = drain(&mut good_rx).await;
        assert_eq!(bytes, 5);
        assert!(matches!(
            frames.last(),
            Some(Frame::Msg {
                msg: GuestMsg::Exit(_),
                ..
            })
        ));
    }

    #[tokio::test]
    async fn a_flood_of_messages_on_an_exec_stream_ends_only_that_stream() {
        let (agent, guest) = connected().await;
        let (bad, mut bad_rx) = agent.open_stream();
        let (good, mut good_rx) = agent.open_stream();
        for i in 0..1000 {
            let f = if i % 2 == 0 {
                Frame::Msg {
                    stream: bad,
                    msg: GuestMsg::Error {
                        message: "z".repeat(10_000),
                    },
                }
            } else {
                Frame::Eof {
                    stream: bad,
                    fd: Fd::Stderr,
                }
            };
            guest.put(&f).await;
        }
        let (_, frames) = drain(&mut bad_rx).await;
        assert_eq!(
            frames.len() as u32,
            MAX_STREAM_MSGS + 1,
            "the limit, then the error"
        );
        let e = error_text(&frames);
        assert!(e.contains("more than"), "{e}");
        assert!(!agent.ended());
        status_within_1s(&agent).await;
        guest
            .put(&Frame::Msg {
                stream: good,
                msg: GuestMsg::ExecFailed {
                    code: 127,
                    message: "nope".into(),
                },
            })
            .await;
        let (_, frames) = drain(&mut good_rx).await;
        assert_eq!(frames.len(), 1);
    }

    #[tokio::test]
    async fn credit_is_granted_only_after_the_consumer_took_the_bytes() {
        let (agent, guest) = connected().await;
        let (sid, mut rx) = agent.open_stream();
        for _ in 0..(INITIAL_WINDOW as usize / gatevm_abi::DATA_CHUNK) {
            guest.put(&data(sid, gatevm_abi::DATA_CHUNK)).await;
        }
        // Received but not handed on: no grant.
        let mut got = 0;
        while got < INITIAL_WINDOW as usize {
            match bounded("data", rx.recv()).await {
                Some(Frame::Data { bytes, .. }) => got += bytes.len(),
                other => panic!("{other:?}"),
            }
        }
        status_within_1s(&agent).await;
        assert_eq!(
            guest.credit(sid),
            0,
            "granted before the consumer handed anything on"
        );
        // Handed on in small steps: grants come in steps of GRANT_STEP, never more than taken.
        let step = 4096;
        let mut taken = 0;
        while taken < INITIAL_WINDOW as usize {
            agent.consumed(sid, step).await.expect("grant");
            taken += step;
        }
        status_within_1s(&agent).await;
        let granted = guest.credit(sid);
        assert_eq!(granted, u64::from(INITIAL_WINDOW));
        assert_eq!(granted % u64::from(GRANT_STEP), 0);
        // With the grant the guest may send another window's worth, and no more.
        for _ in 0..(INITIAL_WINDOW as usize / gatevm_abi::DATA_CHUNK) {
            guest.put(&data(sid, gatevm_abi::DATA_CHUNK)).await;
        }
        status_within_1s(&agent).await;
        assert_eq!(agent.queued(sid), Some(u64::from(INITIAL_WINDOW)));
        guest.put(&data(sid, 1)).await;
        status_within_1s(&agent).await;
        assert_eq!(agent.queued(sid), None, "one byte over the granted window");
    }

    #[tokio::test]
    async fn stdin_credit_follows_the_guest_grants() {
        let (agent, guest) = connected().await;
        let (sid, s) = agent.open_stream();
        let (_rx, mut stdin) = s.split();
        assert_eq!(stdin.available(), u64::from(INITIAL_WINDOW));
        stdin.sent(INITIAL_WINDOW as usize);
        assert_eq!(stdin.available(), 0);
        // A grant wakes the waiter and adds exactly its bytes.
        let waiter = async {
            stdin.granted().await;
            stdin.available()
        };
        let put = async {
            guest
                .put(&Frame::Credit {
                    stream: sid,
                    bytes: GRANT_STEP,
                })
                .await
        };
        let (available, ()) = bounded("a stdin grant", async { tokio::join!(waiter, put) }).await;
        assert_eq!(available, u64::from(GRANT_STEP));
        // Credit on the control stream or an unknown stream goes nowhere and breaks nothing.
        guest
            .put(&Frame::Credit {
                stream: STREAM_CONTROL,
                bytes: 1,
            })
            .await;
        guest
            .put(&Frame::Credit {
                stream: 4242,
                bytes: 1,
            })
            .await;
        status_within_1s(&agent).await;
        assert!(!agent.ended());
    }
}
