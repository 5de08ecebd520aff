//! End-to-end tests of the agent over a socketpair, with real child processes.

use super::*;
use gatevm_abi::flow::{RecvWindow, SendWindow};
use gatevm_abi::{
    read_frame, write_frame, ExitStatus, PayloadState, DATA_CHUNK, GRANT_STEP, INITIAL_WINDOW,
};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::thread::JoinHandle;
use std::time::Instant;

struct TestHost {
    shutdown: AtomicBool,
}

impl AgentHost for TestHost {
    fn payloads(&self) -> Vec<PayloadStatus> {
        vec![PayloadStatus {
            name: "containerd".into(),
            state: PayloadState::Ready,
            pid: Some(42),
            restarts: 1,
            last_exit: None,
        }]
    }
    fn shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
    }
}

struct Peer {
    sock: UnixStream,
    agent: Arc<Agent>,
    host: Arc<TestHost>,
    thread: Option<JoinHandle<ServeEnd>>,
}

#[derive(Debug, Default)]
struct Outcome {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    eofs: Vec<Fd>,
    exit: Option<ExitStatus>,
    max_chunk: usize,
    /// Stdin credit the guest granted back.
    credit: u64,
}

fn hello() -> GuestMsg {
    GuestMsg::Hello {
        version: PROTOCOL_VERSION,
        software: "test-host".into(),
        uptime_ms: None,
        kernel: None,
    }
}

fn exec_req(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

impl Peer {
    fn start() -> Peer {
        let (host_side, guest_side) = UnixStream::pair().unwrap();
        host_side
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let host = Arc::new(TestHost {
            shutdown: AtomicBool::new(false),
        });
        let info = AgentInfo {
            software: crate::software(),
            kernel: Some("6.12-test".into()),
            uptime_at_start_ms: 1234,
        };
        let agent = Arc::new(Agent::new(host.clone(), Reaper::global(), info));
        let a = agent.clone();
        let thread = std::thread::spawn(move || {
            let mut r = guest_side.try_clone().unwrap();
            let w = session::shared_writer(guest_side);
            a.serve(&mut r, &w, OnEof::Stop)
        });
        Peer {
            sock: host_side,
            agent,
            host,
            thread: Some(thread),
        }
    }

    fn send(&mut self, f: Frame<GuestMsg>) {
        write_frame(&mut self.sock, &f).unwrap();
    }

    fn msg(&mut self, stream: u32, m: GuestMsg) {
        self.send(Frame::Msg { stream, msg: m });
    }

    fn raw(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).unwrap();
    }

    fn recv(&mut self) -> Frame<GuestMsg> {
        read_frame(&mut self.sock)
            .unwrap()
            .expect("agent closed the channel")
    }

    fn recv_msg(&mut self) -> (u32, GuestMsg) {
        match self.recv() {
            Frame::Msg { stream, msg } => (stream, msg),
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// Sends an exec and returns its pid (panics on ExecFailed).
    fn exec(&mut self, stream: u32, req: ExecRequest) -> u32 {
        self.msg(stream, GuestMsg::Exec(req));
        match self.recv_msg() {
            (s, GuestMsg::ExecStarted { pid }) if s == stream => pid,
            other => panic!("expected ExecStarted on {stream}, got {other:?}"),
        }
    }

    /// Reads frames of one stream until its Exit, checking nothing follows the Eofs but Exit,
    /// granting output credit as an honest host does and checking the guest keeps to it.
    fn collect(&mut self, stream: u32) -> Outcome {
        self.collect_within(stream, RecvWindow::new())
    }

    fn collect_within(&mut self, stream: u32, mut window: RecvWindow) -> Outcome {
        let mut o = Outcome::default();
        loop {
            match self.recv() {
                Frame::Data {
                    stream: s,
                    fd,
                    bytes,
                } if s == stream => {
                    assert!(!o.eofs.contains(&fd), "data after eof on {fd:?}");
                    window
                        .receive(bytes.len())
                        .expect("the guest sent beyond its window");
                    if let Some(g) = window.consume(bytes.len()) {
                        self.send(Frame::Credit { stream, bytes: g });
                    }
                    o.max_chunk = o.max_chunk.max(bytes.len());
                    match fd {
                        Fd::Stdout => o.stdout.extend(bytes),
                        Fd::Stderr => o.stderr.extend(bytes),
                        Fd::Stdin => panic!("stdin data from the guest"),
                    }
                }
                Frame::Eof { stream: s, fd } if s == stream => o.eofs.push(fd),
                Frame::Credit { stream: s, bytes } if s == stream => o.credit += u64::from(bytes),
                Frame::Msg {
                    stream: s,
                    msg: GuestMsg::Exit(st),
                } if s == stream => {
                    o.exit = Some(st);
                    return o;
                }
                other => panic!("unexpected frame while collecting {stream}: {other:?}"),
            }
        }
    }

    /// The next frame within `t`, or None.
    fn recv_within(&mut self, t: Duration) -> Option<Frame<GuestMsg>> {
        self.sock.set_read_timeout(Some(t)).unwrap();
        let f = match read_frame(&mut self.sock) {
            Ok(f) => f,
            Err(gatevm_abi::ProtoError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("{e}"),
        };
        self.sock
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        f
    }

    /// Reads the stdout data of `stream` without granting anything until `want` bytes came;
    /// panics on other frames of the stream (except Credit).
    fn drain_data(&mut self, stream: u32, want: usize) -> usize {
        let mut got = 0;
        while got < want {
            match self.recv() {
                Frame::Data {
                    stream: s, bytes, ..
                } if s == stream => got += bytes.len(),
                Frame::Credit { stream: s, .. } if s == stream => {}
                other => panic!("unexpected frame while draining {stream}: {other:?}"),
            }
        }
        got
    }

    /// Asks for the status and returns how long the answer took.
    fn status_time(&mut self) -> Duration {
        let t = Instant::now();
        self.msg(0, GuestMsg::StatusRequest);
        loop {
            match self.recv() {
                Frame::Msg {
                    stream: 0,
                    msg: GuestMsg::Status { .. },
                } => return t.elapsed(),
                Frame::Credit { .. } => {}
                other => panic!("expected the status, got {other:?}"),
            }
        }
    }

    fn finish(mut self) -> ServeEnd {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        self.thread.take().unwrap().join().unwrap()
    }
}

fn code(c: i32) -> Option<ExitStatus> {
    Some(ExitStatus {
        code: Some(c),
        signal: None,
    })
}

#[test]
fn hello_and_status() {
    let mut p = Peer::start();
    p.msg(0, hello());
    match p.recv_msg() {
        (
            0,
            GuestMsg::Hello {
                version,
                software,
                uptime_ms,
                kernel,
            },
        ) => {
            assert_eq!(version, PROTOCOL_VERSION);
            assert!(software.starts_with("gatevm-guest "));
            assert_eq!(uptime_ms, Some(1234));
            assert_eq!(kernel.as_deref(), Some("6.12-test"));
        }
        other => panic!("{other:?}"),
    }
    p.msg(0, GuestMsg::StatusRequest);
    match p.recv_msg() {
        (
            0,
            GuestMsg::Status {
                payloads,
                uptime_ms,
            },
        ) => {
            assert!(uptime_ms > 0);
            assert_eq!(payloads.len(), 1);
            assert_eq!(payloads[0].state, PayloadState::Ready);
        }
        other => panic!("{other:?}"),
    }
    // A second hello (host reconnected) gets a second hello.
    p.msg(0, hello());
    assert!(matches!(p.recv_msg(), (0, GuestMsg::Hello { .. })));
    assert_eq!(p.finish(), ServeEnd::Eof);
}

#[test]
fn version_mismatch_is_an_error_and_the_agent_keeps_going() {
    let mut p = Peer::start();
    p.msg(
        0,
        GuestMsg::Hello {
            version: 99,
            software: "x".into(),
            uptime_ms: None,
            kernel: None,
        },
    );
    match p.recv_msg() {
        (0, GuestMsg::Error { message }) => assert!(message.contains("99"), "{message}"),
        other => panic!("{other:?}"),
    }
    p.msg(0, hello());
    assert!(matches!(p.recv_msg(), (0, GuestMsg::Hello { .. })));
    p.finish();
}

#[test]
fn exec_streams_output_then_exit() {
    let mut p = Peer::start();
    p.exec(1, exec_req(&["sh", "-c", "echo hi; echo err >&2; exit 3"]));
    let o = p.collect(1);
    assert_eq!(o.stdout, b"hi\n");
    assert_eq!(o.stderr, b"err\n");
    assert_eq!(o.exit, code(3));
    assert!(o.eofs.contains(&Fd::Stdout) && o.eofs.contains(&Fd::Stderr));
    // The stream id is free again afterwards.
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(p.agent.session_count(), 0);
    p.exec(1, exec_req(&["true"]));
    assert_eq!(p.collect(1).exit, code(0));
    p.finish();
}

#[test]
fn env_and_cwd() {
    let mut p = Peer::start();
    let mut r = exec_req(&[
        "sh",
        "-c",
        "echo $FOO $HOME; pwd; echo $PATH; echo ${TERM:-none}",
    ]);
    r.env = vec![("FOO".into(), "bar".into())];
    r.cwd = Some("/tmp".into());
    p.exec(2, r);
    let o = p.collect(2);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("bar /root\n/tmp\n{}\nnone\n", exec::DEFAULT_PATH)
    );
    p.finish();
}

#[test]
fn stdin_is_forwarded_and_closed() {
    let mut p = Peer::start();
    let mut r = exec_req(&["cat"]);
    r.stdin = true;
    p.exec(3, r);
    p.send(Frame::Data {
        stream: 3,
        fd: Fd::Stdin,
        bytes: b"hello ".to_vec(),
    });
    p.send(Frame::Data {
        stream: 3,
        fd: Fd::Stdin,
        bytes: b"world\n".to_vec(),
    });
    p.send(Frame::Eof {
        stream: 3,
        fd: Fd::Stdin,
    });
    let o = p.collect(3);
    assert_eq!(o.stdout, b"hello world\n");
    assert_eq!(o.exit, code(0));
    p.finish();
}

#[test]
fn without_stdin_the_process_reads_dev_null() {
    let mut p = Peer::start();
    p.exec(4, exec_req(&["cat"]));
    let o = p.collect(4);
    assert!(o.stdout.is_empty());
    assert_eq!(o.exit, code(0));
    // Stdin data for a session without stdin is ignored.
    p.finish();
}

#[test]
fn tty_session_with_size_and_resize() {
    let mut p = Peer::start();
    let mut r = exec_req(&[
        "sh",
        "-c",
        "test -t 0 && test -t 1 && test -t 2 && echo is-a-tty; echo TERM=$TERM; stty size; read x; stty size",
    ]);
    r.tty = true;
    r.stdin = true;
    r.rows = 30;
    r.cols = 100;
    p.exec(5, r);
    // Wait for the first size line before resizing.
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains("30 100") {
        match p.recv() {
            Frame::Data {
                stream: 5,
                fd: Fd::Stdout,
                bytes,
            } => out.extend(bytes),
            other => panic!("{other:?}"),
        }
    }
    p.msg(
        5,
        GuestMsg::Resize {
            rows: 50,
            cols: 132,
        },
    );
    p.send(Frame::Data {
        stream: 5,
        fd: Fd::Stdin,
        bytes: b"go\n".to_vec(),
    });
    let o = p.collect(5);
    out.extend(o.stdout);
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("is-a-tty"), "{text:?}");
    assert!(text.contains("TERM=xterm-256color"), "{text:?}");
    assert!(text.contains("50 132"), "{text:?}");
    assert!(o.stderr.is_empty());
    assert_eq!(o.exit, code(0));
    p.finish();
}

#[test]
fn signals_reach_the_process() {
    let mut p = Peer::start();
    p.exec(6, exec_req(&["sleep", "100"]));
    let t = Instant::now();
    p.msg(6, GuestMsg::Signal { signal: 15 });
    let o = p.collect(6);
    assert_eq!(
        o.exit,
        Some(ExitStatus {
            code: None,
            signal: Some(15)
        })
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    // Out-of-range signal numbers are refused.
    p.msg(7, GuestMsg::Signal { signal: 0 });
    assert!(matches!(p.recv_msg(), (7, GuestMsg::Error { .. })));
    p.finish();
}

#[test]
fn tty_signal_goes_to_the_process_group() {
    let mut p = Peer::start();
    let mut r = exec_req(&["sh", "-c", "sleep 100; echo not-reached"]);
    r.tty = true;
    p.exec(8, r);
    std::thread::sleep(Duration::from_millis(100));
    p.msg(8, GuestMsg::Signal { signal: 9 });
    let o = p.collect(8);
    assert_eq!(o.exit.unwrap().signal, Some(9));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("not-reached"));
    p.finish();
}

#[test]
fn not_found_127_not_executable_126() {
    let mut p = Peer::start();
    p.msg(
        9,
        GuestMsg::Exec(exec_req(&["definitely-not-a-command-gatevm"])),
    );
    match p.recv_msg() {
        (9, GuestMsg::ExecFailed { code, message }) => {
            assert_eq!(code, 127);
            assert!(message.contains("not found"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("plain");
    std::fs::write(&f, "echo hi\n").unwrap();
    p.msg(10, GuestMsg::Exec(exec_req(&[f.to_str().unwrap()])));
    assert!(matches!(
        p.recv_msg(),
        (10, GuestMsg::ExecFailed { code: 126, .. })
    ));
    p.msg(11, GuestMsg::Exec(exec_req(&["/tmp"])));
    assert!(matches!(
        p.recv_msg(),
        (11, GuestMsg::ExecFailed { code: 126, .. })
    ));
    p.msg(12, GuestMsg::Exec(exec_req(&[])));
    assert!(matches!(
        p.recv_msg(),
        (12, GuestMsg::ExecFailed { code: 1, .. })
    ));
    let mut r = exec_req(&["true"]);
    r.cwd = Some("/nonexistent-gatevm-dir".into());
    p.msg(13, GuestMsg::Exec(r));
    assert!(matches!(
        p.recv_msg(),
        (13, GuestMsg::ExecFailed { code: 1, .. })
    ));
    p.finish();
}

#[test]
fn background_grandchild_does_not_hold_exit() {
    let mut p = Peer::start();
    let t = Instant::now();
    p.exec(14, exec_req(&["sh", "-c", "sleep 30 & echo started"]));
    let o = p.collect(14);
    assert_eq!(o.stdout, b"started\n");
    assert_eq!(o.exit, code(0));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    p.finish();
}

#[test]
fn malformed_frames_get_errors_and_the_agent_continues() {
    let mut p = Peer::start();
    // Bad JSON on stream 5.
    p.raw(&[0, 0, 0, 7, 0, 0, 0, 5, 0x01, b'{', b'x']);
    match p.recv_msg() {
        (5, GuestMsg::Error { message }) => assert!(message.contains("bad frame"), "{message}"),
        other => panic!("{other:?}"),
    }
    // Valid JSON, unknown message type.
    let json = br#"{"type":"launch_missiles"}"#;
    let mut f = ((5 + json.len()) as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&6u32.to_be_bytes());
    f.push(0x01);
    f.extend_from_slice(json);
    p.raw(&f);
    assert!(matches!(p.recv_msg(), (6, GuestMsg::Error { .. })));
    // Unknown kind.
    p.raw(&[0, 0, 0, 5, 0, 0, 0, 7, 0x33]);
    assert!(matches!(p.recv_msg(), (7, GuestMsg::Error { .. })));
    // Length field beyond the limit, then one too short: logged, not answered.
    p.raw(&u32::MAX.to_be_bytes());
    p.raw(&[0, 0, 0, 2]);
    // Guest-to-host messages from the host.
    p.msg(8, GuestMsg::ExecStarted { pid: 1 });
    assert!(matches!(p.recv_msg(), (8, GuestMsg::Error { .. })));
    // Stdout data from the host.
    p.send(Frame::Data {
        stream: 9,
        fd: Fd::Stdout,
        bytes: b"x".to_vec(),
    });
    assert!(matches!(p.recv_msg(), (9, GuestMsg::Error { .. })));
    // Control messages on a non-zero stream.
    p.msg(10, GuestMsg::Shutdown);
    assert!(matches!(p.recv_msg(), (10, GuestMsg::Error { .. })));
    assert!(!p.host.shutdown.load(Ordering::SeqCst));
    // Still alive.
    p.msg(0, hello());
    assert!(matches!(p.recv_msg(), (0, GuestMsg::Hello { .. })));
    p.finish();
}

#[test]
fn exec_stream_rules() {
    let mut p = Peer::start();
    p.msg(0, GuestMsg::Exec(exec_req(&["true"])));
    assert!(matches!(p.recv_msg(), (0, GuestMsg::Error { .. })));
    let pid = p.exec(20, exec_req(&["sleep", "100"]));
    p.msg(20, GuestMsg::Exec(exec_req(&["true"])));
    assert!(matches!(p.recv_msg(), (20, GuestMsg::Error { .. })));
    assert!(Reaper::global().is_running(pid as i32));
    p.msg(20, GuestMsg::Signal { signal: 9 });
    assert_eq!(p.collect(20).exit.unwrap().signal, Some(9));
    p.finish();
}

#[test]
fn new_hello_kills_and_mutes_old_sessions() {
    let mut p = Peer::start();
    let pid = p.exec(30, exec_req(&["sleep", "100"])) as i32;
    p.msg(0, hello());
    assert!(matches!(p.recv_msg(), (0, GuestMsg::Hello { .. })));
    let deadline = Instant::now() + Duration::from_secs(5);
    while Reaper::global().is_running(pid) {
        assert!(Instant::now() < deadline, "old session still running");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Nothing of the old session arrives; the next frame is the answer to this request.
    std::thread::sleep(Duration::from_millis(100));
    p.msg(0, GuestMsg::StatusRequest);
    assert!(matches!(p.recv_msg(), (0, GuestMsg::Status { .. })));
    // The stream id can be reused.
    p.exec(30, exec_req(&["true"]));
    assert_eq!(p.collect(30).exit, code(0));
    p.finish();
}

#[test]
fn large_output_is_chunked() {
    let mut p = Peer::start();
    p.exec(40, exec_req(&["head", "-c", "300000", "/dev/zero"]));
    let o = p.collect(40);
    assert_eq!(o.stdout.len(), 300_000);
    assert!(o.max_chunk <= DATA_CHUNK);
    assert_eq!(o.exit, code(0));
    p.finish();
}

#[test]
fn many_sessions_at_once() {
    let mut p = Peer::start();
    let n = 12u32;
    for i in 0..n {
        let script = format!("for j in 1 2 3; do echo s{i}-$j; done; exit {i}");
        p.msg(100 + i, GuestMsg::Exec(exec_req(&["sh", "-c", &script])));
    }
    let mut out: HashMap<u32, Vec<u8>> = HashMap::new();
    let mut exits: HashMap<u32, ExitStatus> = HashMap::new();
    let mut started = 0;
    while exits.len() < n as usize {
        match p.recv() {
            Frame::Msg {
                stream,
                msg: GuestMsg::ExecStarted { .. },
            } => {
                assert!(!exits.contains_key(&stream) && !out.contains_key(&stream));
                started += 1;
            }
            Frame::Data {
                stream,
                fd: Fd::Stdout,
                bytes,
            } => out.entry(stream).or_default().extend(bytes),
            Frame::Eof { .. } => {}
            Frame::Msg {
                stream,
                msg: GuestMsg::Exit(st),
            } => {
                exits.insert(stream, st);
            }
            other => panic!("{other:?}"),
        }
    }
    for i in 0..n {
        assert_eq!(
            String::from_utf8_lossy(&out[&(100 + i)]),
            format!("s{i}-1\ns{i}-2\ns{i}-3\n")
        );
        assert_eq!(exits[&(100 + i)].code, Some(i as i32));
    }
    assert_eq!(started, n);
    p.finish();
}

#[test]
fn shutdown_acks_then_calls_the_host() {
    let mut p = Peer::start();
    p.msg(0, GuestMsg::Shutdown);
    assert!(matches!(p.recv_msg(), (0, GuestMsg::ShutdownAck)));
    let host = p.host.clone();
    assert_eq!(p.finish(), ServeEnd::Shutdown);
    assert!(host.shutdown.load(Ordering::SeqCst));
}

#[test]
fn truncated_frame_ends_a_stop_connection() {
    let mut p = Peer::start();
    p.raw(&[0, 0, 0, 20, 0, 0]);
    assert_eq!(p.finish(), ServeEnd::Eof);
}

#[test]
fn output_waits_for_credit_and_stops_only_its_own_stream() {
    let mut p = Peer::start();
    p.exec(50, exec_req(&["yes"]));
    // Without grants the guest sends the initial window, then nothing.
    let got = p.drain_data(50, INITIAL_WINDOW as usize);
    assert_eq!(got, INITIAL_WINDOW as usize, "more than the window");
    assert!(
        p.recv_within(Duration::from_millis(500)).is_none(),
        "data beyond the window"
    );
    // The agent loop and other streams go on meanwhile.
    let t = p.status_time();
    println!("status answered in {t:?} beside a stalled stream");
    assert!(t < Duration::from_secs(1), "{t:?}");
    p.exec(51, exec_req(&["echo", "hi"]));
    let o = p.collect(51);
    assert_eq!(o.stdout, b"hi\n");
    // A grant lets exactly that much more through.
    p.send(Frame::Credit {
        stream: 50,
        bytes: GRANT_STEP,
    });
    assert_eq!(p.drain_data(50, GRANT_STEP as usize), GRANT_STEP as usize);
    assert!(p.recv_within(Duration::from_millis(300)).is_none());
    // The reader is gone: the rest is discarded, the stream still ends.
    p.msg(50, GuestMsg::Signal { signal: 9 });
    p.send(Frame::Credit {
        stream: 50,
        bytes: gatevm_abi::CREDIT_DISCARD,
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "no exit after discard");
        match p.recv() {
            Frame::Msg {
                stream: 50,
                msg: GuestMsg::Exit(st),
            } => {
                assert_eq!(st.signal, Some(9));
                break;
            }
            Frame::Eof { stream: 50, .. } => {}
            other => panic!("only the end after a discard: {other:?}"),
        }
    }
    p.finish();
}

#[test]
fn a_stalled_stream_keeps_its_output_after_the_exit() {
    // The process ends while its output waits for credit: nothing is lost to the exit grace.
    let mut p = Peer::start();
    p.exec(52, exec_req(&["head", "-c", "400000", "/dev/zero"]));
    let got = p.drain_data(52, INITIAL_WINDOW as usize);
    assert_eq!(got, INITIAL_WINDOW as usize);
    std::thread::sleep(Duration::from_millis(600));
    let mut w = RecvWindow::new();
    w.receive(got).unwrap();
    let g = w.consume(got).unwrap();
    p.send(Frame::Credit {
        stream: 52,
        bytes: g,
    });
    let o = p.collect_within(52, w);
    assert_eq!(got + o.stdout.len(), 400_000);
    assert_eq!(o.exit, code(0));
    p.finish();
}

#[test]
fn stdin_beyond_the_window_is_dropped_without_blocking_the_loop() {
    let mut p = Peer::start();
    let mut r = exec_req(&["sleep", "100"]);
    r.stdin = true;
    p.exec(53, r);
    // A host that ignores the window: 1 MiB for a process that reads nothing.
    let chunk = vec![b'x'; DATA_CHUNK];
    let t = Instant::now();
    for _ in 0..32 {
        p.send(Frame::Data {
            stream: 53,
            fd: Fd::Stdin,
            bytes: chunk.clone(),
        });
    }
    let sent = t.elapsed();
    let st = p.status_time();
    println!("1 MiB of unread stdin sent in {sent:?}; status answered in {st:?}");
    assert!(st < Duration::from_secs(1), "{st:?}");
    {
        let sessions = sys::lock(&p.agent.sessions);
        let q = sessions[&53].stdin.as_ref().unwrap();
        assert!(q.queued() <= u64::from(INITIAL_WINDOW), "{}", q.queued());
    }
    // Grants come only for what the process took (the pipe's buffer, at most).
    let mut granted = 0u64;
    while let Some(f) = p.recv_within(Duration::from_millis(300)) {
        match f {
            Frame::Credit { stream: 53, bytes } => granted += u64::from(bytes),
            other => panic!("{other:?}"),
        }
    }
    assert!(granted < u64::from(INITIAL_WINDOW), "{granted}");
    p.msg(53, GuestMsg::Signal { signal: 9 });
    assert_eq!(p.collect(53).exit.unwrap().signal, Some(9));
    p.finish();
}

#[test]
fn stdin_credit_comes_back_as_the_process_reads() {
    let mut p = Peer::start();
    let mut r = exec_req(&["wc", "-c"]);
    r.stdin = true;
    p.exec(54, r);
    let total = 1024 * 1024usize;
    let mut window = SendWindow::new();
    let mut sent = 0;
    let mut granted = 0u64;
    while sent < total {
        let n = window.take((total - sent).min(DATA_CHUNK));
        if n == 0 {
            // Out of credit: wait for a grant (an honest host).
            match p.recv() {
                Frame::Credit { stream: 54, bytes } => {
                    granted += u64::from(bytes);
                    window.grant(bytes);
                }
                other => panic!("{other:?}"),
            }
            continue;
        }
        p.send(Frame::Data {
            stream: 54,
            fd: Fd::Stdin,
            bytes: vec![b'y'; n],
        });
        sent += n;
    }
    p.send(Frame::Eof {
        stream: 54,
        fd: Fd::Stdin,
    });
    let o = p.collect(54);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), total.to_string());
    assert!(granted + o.credit >= (total - INITIAL_WINDOW as usize) as u64);
    p.finish();
}

fn read_file(p: &mut Peer, stream: u32, path: &str, max_bytes: u64) -> Result<Outcome, String> {
    p.msg(
        stream,
        GuestMsg::ReadFile {
            path: path.into(),
            max_bytes,
        },
    );
    match p.recv_msg() {
        (s, GuestMsg::ExecStarted { pid: 0 }) if s == stream => Ok(p.collect(stream)),
        (s, GuestMsg::ExecFailed { code: 1, message }) if s == stream => Err(message),
        other => panic!("{other:?}"),
    }
}

#[test]
fn read_file_serves_regular_files_only() {
    let mut p = Peer::start();
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("big");
    let content: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&f, &content).unwrap();
    let path = f.to_str().unwrap();
    // Larger than the window: the credit is granted as it arrives (collect does).
    let o = read_file(&mut p, 60, path, 700_000).unwrap();
    assert_eq!(o.stdout, content);
    assert_eq!(o.exit, code(0));
    assert_eq!(o.eofs, vec![Fd::Stdout]);
    let e = read_file(&mut p, 61, path, 699_999).unwrap_err();
    assert!(e.contains("more than the limit"), "{e}");
    let e = read_file(&mut p, 62, d.path().to_str().unwrap(), 10).unwrap_err();
    assert!(e.contains("directory"), "{e}");
    let e = read_file(&mut p, 63, "/nonexistent-gatevm/file", 10).unwrap_err();
    assert!(e.contains("cannot open"), "{e}");
    let e = read_file(&mut p, 64, "relative/path", 10).unwrap_err();
    assert!(e.contains("absolute"), "{e}");
    // A FIFO would block an open for reading until a writer comes: refused at once.
    let fifo = d.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let t = Instant::now();
    let e = read_file(&mut p, 65, fifo.to_str().unwrap(), 10).unwrap_err();
    assert!(e.contains("not a regular file"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(2));
    let e = read_file(&mut p, 66, "/dev/zero", u64::MAX).unwrap_err();
    assert!(e.contains("not a regular file"), "{e}");
    // Not on stream 0; the stream is free again after an answer.
    p.msg(
        0,
        GuestMsg::ReadFile {
            path: path.into(),
            max_bytes: 1,
        },
    );
    assert!(matches!(p.recv_msg(), (0, GuestMsg::Error { .. })));
    let small = d.path().join("small");
    std::fs::write(&small, b"k3s: yes\n").unwrap();
    let o = read_file(&mut p, 60, small.to_str().unwrap(), 9).unwrap();
    assert_eq!(o.stdout, b"k3s: yes\n");
    p.finish();
}

#[test]
fn read_file_keeps_to_the_window() {
    let mut p = Peer::start();
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("big");
    std::fs::write(&f, vec![7u8; 600_000]).unwrap();
    p.msg(
        70,
        GuestMsg::ReadFile {
            path: f.to_str().unwrap().into(),
            max_bytes: 1 << 20,
        },
    );
    assert!(matches!(
        p.recv_msg(),
        (70, GuestMsg::ExecStarted { pid: 0 })
    ));
    assert_eq!(
        p.drain_data(70, INITIAL_WINDOW as usize),
        INITIAL_WINDOW as usize
    );
    assert!(p.recv_within(Duration::from_millis(500)).is_none());
    assert!(p.status_time() < Duration::from_secs(1));
    // A new hello (host reconnected) ends the stalled read.
    p.msg(0, hello());
    assert!(matches!(p.recv_msg(), (0, GuestMsg::Hello { .. })));
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.agent.session_count() > 0 {
        assert!(Instant::now() < deadline, "the read thread did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
    p.finish();
}

#[test]
fn port_discovery() {
    let d = tempfile::tempdir().unwrap();
    for (dir, name) in [
        ("vport0p0", ""),
        ("vport1p1", "gatevm.agent\n"),
        ("vport1p2", "other\n"),
    ] {
        std::fs::create_dir_all(d.path().join(dir)).unwrap();
        std::fs::write(d.path().join(dir).join("name"), name).unwrap();
    }
    assert_eq!(
        find_port(d.path(), "gatevm.agent").as_deref(),
        Some("vport1p1")
    );
    assert_eq!(find_port(d.path(), "missing"), None);
    assert_eq!(find_port(&d.path().join("nope"), "gatevm.agent"), None);
}

fn quiet_agent() -> Agent {
    let host = Arc::new(TestHost {
        shutdown: AtomicBool::new(false),
    });
    Agent::new(host, Reaper::global(), AgentInfo::current())
}

/// A writer whose bytes the test reads afterwards.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Serves `bytes` to a fresh agent, failing the test when that does not end within a minute;
/// returns how serving ended, the frames the agent wrote back (as the host would read them)
/// and the sessions left running.
fn serve_bytes(bytes: Vec<u8>) -> (ServeEnd, Vec<Result<Frame<GuestMsg>, String>>, usize) {
    gatevm_testkit::within(
        Duration::from_secs(60),
        "the agent serving hostile bytes",
        move || {
            let agent = quiet_agent();
            let out = Captured::default();
            let w = session::shared_writer(out.clone());
            let mut r = &bytes[..];
            let end = agent.serve(&mut r, &w, OnEof::Stop);
            let written = out.0.lock().unwrap().clone();
            let mut replies = Vec::new();
            let mut r = &written[..];
            loop {
                match read_frame::<GuestMsg, _>(&mut r) {
                    Ok(Some(f)) => replies.push(Ok(f)),
                    Ok(None) => break,
                    Err(e) => {
                        replies.push(Err(e.to_string()));
                        break;
                    }
                }
            }
            (end, replies, agent.session_count())
        },
    )
}

proptest::proptest! {
    // Arbitrary bytes from the host never panic the agent, never make it hang (bounded by
    // `within`), start no session, and whatever it answers is a well-formed frame.
    #[test]
    fn arbitrary_input_is_survived(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096)) {
        let (end, replies, sessions) = serve_bytes(bytes);
        proptest::prop_assert!(matches!(end, ServeEnd::Eof), "serving ended by a shutdown");
        proptest::prop_assert_eq!(sessions, 0);
        for r in &replies {
            proptest::prop_assert!(r.is_ok(), "the agent wrote a frame the host cannot read: {:?}", r);
        }
    }

    // Well-framed bodies with arbitrary stream ids, kinds and payloads.
    #[test]
    fn arbitrary_frames_are_survived(
        frames in proptest::collection::vec(
            (proptest::prelude::any::<u32>(), proptest::prelude::any::<u8>(),
             proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)),
            0..32,
        )
    ) {
        let mut bytes = Vec::new();
        let frames_sent = frames.len();
        for (stream, kind, payload) in frames {
            bytes.extend_from_slice(&((5 + payload.len()) as u32).to_be_bytes());
            bytes.extend_from_slice(&stream.to_be_bytes());
            bytes.push(kind);
            bytes.extend_from_slice(&payload);
        }
        let (_, replies, sessions) = serve_bytes(bytes);
        proptest::prop_assert_eq!(sessions, 0);
        // Each reply is a readable frame; one a frame at most (a malformed frame gets one
        // Error, a request one answer).
        proptest::prop_assert!(replies.len() <= frames_sent, "{} replies to {} frames", replies.len(), frames_sent);
        for r in &replies {
            proptest::prop_assert!(r.is_ok(), "the agent wrote a frame the host cannot read: {:?}", r);
        }
    }
}
