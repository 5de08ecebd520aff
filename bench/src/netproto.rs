//! The network case's test server (a static C program, `netsrv.c`, the same in every guest) and
//! the host-side client of its protocol.
//!
//! One TCP connection at a time. On accept the server sends [`HELLO`], so a client can tell the
//! server from a port forwarder that accepts while the guest is not listening yet. Then the
//! client sends one command byte:
//! - `S` + N (u64 big-endian) + N bytes: the server answers the number of bytes it received (u64
//!   big-endian) once it has them all: throughput;
//! - `E`, then bytes: the server echoes what it reads until end of file: latency;
//! - `Q`: the server answers `q` and exits (as a bare VM's /init, it powers the VM off).

use crate::runner::{self, check_interrupted};
use crate::scratch::Scratch;
use anyhow::{bail, Context};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// The server's C source.
pub const SERVER_C: &str = include_str!("netsrv.c");
/// What the server sends first on every connection.
pub const HELLO: &[u8; 4] = b"GVB1";
/// The port the server listens on in the guest.
pub const GUEST_PORT: u16 = 5001;
/// Size of the client's writes in the throughput test.
const CHUNK: usize = 256 * 1024;
const COMPILE_TIMEOUT: Duration = Duration::from_secs(120);

/// The command byte of the throughput test and its length header.
pub fn sink_header(bytes: u64) -> [u8; 9] {
    let mut h = [0u8; 9];
    h[0] = b'S';
    h[1..].copy_from_slice(&bytes.to_be_bytes());
    h
}

/// Compiles the server with `cc -static -O2` into the scratch directory.
pub fn build_server(scratch: &Scratch) -> anyhow::Result<PathBuf> {
    let src = scratch.path().join("gatevm-bench-srv.c");
    std::fs::write(&src, SERVER_C).with_context(|| format!("cannot write {}", src.display()))?;
    let out = scratch.path().join("gatevm-bench-srv");
    let mut c = Command::new("cc");
    c.args(["-static", "-O2", "-o"]).arg(&out).arg(&src);
    let f = runner::run(&mut c, COMPILE_TIMEOUT, scratch)?;
    if !f.status.success() {
        bail!(
            "cannot build the network test server with `cc -static` ({}): {} (install gcc and libc6-dev)",
            f.status,
            f.last_line()
        );
    }
    Ok(out)
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("cannot bind a free port on 127.0.0.1")?;
    Ok(l.local_addr().context("no local address")?.port())
}

/// The address of a forwarded port on the host.
pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Connects and reads the hello; `None` when nothing listens yet (refused, closed, reset, or
/// silent for `wait`).
pub fn try_connect(addr: SocketAddr, wait: Duration) -> Option<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, wait).ok()?;
    s.set_read_timeout(Some(wait)).ok()?;
    let mut hello = [0u8; 4];
    (&s).read_exact(&mut hello).ok()?;
    if &hello != HELLO {
        return None;
    }
    s.set_nodelay(true).ok()?;
    Some(s)
}

/// Connects once the server answers, up to `timeout`; `alive` is asked between attempts and
/// ends the wait with its error (the VM or the server died).
pub fn connect_ready(
    addr: SocketAddr,
    timeout: Duration,
    mut alive: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<TcpStream> {
    runner::wait_until(
        &format!("the network test server behind {addr}"),
        timeout,
        Duration::from_millis(250),
        || {
            alive()?;
            Ok(try_connect(addr, Duration::from_secs(10)))
        },
    )
}

/// Connects to a server known to be up (one attempt with a generous wait).
pub fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    try_connect(addr, Duration::from_secs(30))
        .with_context(|| format!("the network test server behind {addr} does not answer"))
}

fn timeouts(s: &TcpStream, t: Duration) -> anyhow::Result<()> {
    s.set_read_timeout(Some(t))
        .and_then(|_| s.set_write_timeout(Some(t)))
        .context("cannot set socket timeouts")
}

/// Sends `bytes` through a fresh connection and waits for the server's count: the wall time
/// from the command to the acknowledgement.
pub fn send_bulk(mut s: TcpStream, bytes: u64, timeout: Duration) -> anyhow::Result<Duration> {
    timeouts(&s, Duration::from_secs(60))?;
    let data = vec![0x5au8; CHUNK];
    let t0 = Instant::now();
    let deadline = t0 + timeout;
    s.write_all(&sink_header(bytes))
        .context("sending the throughput header")?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        s.write_all(&data[..n])
            .with_context(|| format!("sending to the test server ({left} bytes left)"))?;
        left -= n as u64;
        check_interrupted()?;
        if Instant::now() > deadline {
            bail!(
                "sending {} MiB took over {} s",
                bytes >> 20,
                timeout.as_secs()
            );
        }
    }
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack)
        .context("waiting for the test server's count")?;
    let elapsed = t0.elapsed();
    let got = u64::from_be_bytes(ack);
    if got != bytes {
        bail!("the test server counted {got} bytes of {bytes} sent");
    }
    Ok(elapsed)
}

/// `n` one-byte request/response round trips over one fresh connection, in milliseconds.
pub fn echo_rtts(mut s: TcpStream, n: usize, timeout: Duration) -> anyhow::Result<Vec<f64>> {
    timeouts(&s, Duration::from_secs(30))?;
    s.write_all(b"E").context("sending the echo command")?;
    let deadline = Instant::now() + timeout;
    let mut out = Vec::with_capacity(n);
    let mut b = [0u8; 1];
    for i in 0..n {
        let byte = [(i % 251) as u8];
        let t = Instant::now();
        s.write_all(&byte).context("sending a byte to echo")?;
        s.read_exact(&mut b).context("reading the echoed byte")?;
        out.push(runner::ms(t.elapsed()));
        if b != byte {
            bail!("the test server echoed {:?} for {:?}", b[0], byte[0]);
        }
        if i % 64 == 0 {
            check_interrupted()?;
        }
        if Instant::now() > deadline {
            bail!(
                "{n} round trips took over {} s ({i} done)",
                timeout.as_secs()
            );
        }
    }
    Ok(out)
}

/// Tells the server to exit; an error when it does not acknowledge.
pub fn quit(mut s: TcpStream) -> anyhow::Result<()> {
    timeouts(&s, Duration::from_secs(30))?;
    s.write_all(b"Q").context("sending quit")?;
    let mut b = [0u8; 1];
    match s.read_exact(&mut b) {
        Ok(()) if &b == b"q" => Ok(()),
        Ok(()) => bail!("the test server answered {:?} to quit", b[0]),
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
            bail!("the test server closed the connection on quit")
        }
        Err(e) => Err(e).context("waiting for the test server to quit"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::Background;

    #[test]
    fn header_layout() {
        assert_eq!(
            sink_header(0x0102_0304_0506_0708),
            [b'S', 1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert!(SERVER_C.contains("\"GVB1\""));
        assert_eq!(HELLO, b"GVB1");
    }

    /// A fake server in Rust speaking the protocol, for the client's own checks.
    fn fake_server(lie: bool) -> (u16, std::thread::JoinHandle<()>) {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        let h = std::thread::spawn(move || {
            for c in l.incoming() {
                let mut c = c.unwrap();
                c.write_all(HELLO).unwrap();
                let mut cmd = [0u8; 1];
                if c.read_exact(&mut cmd).is_err() {
                    continue;
                }
                match cmd[0] {
                    b'S' => {
                        let mut h = [0u8; 8];
                        c.read_exact(&mut h).unwrap();
                        let want = u64::from_be_bytes(h);
                        let mut got = 0u64;
                        let mut buf = vec![0u8; 65536];
                        while got < want {
                            let n = c.read(&mut buf).unwrap();
                            if n == 0 {
                                break;
                            }
                            got += n as u64;
                        }
                        let said = if lie { got - 1 } else { got };
                        c.write_all(&said.to_be_bytes()).unwrap();
                    }
                    b'E' => {
                        let mut buf = [0u8; 512];
                        loop {
                            match c.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => c.write_all(&buf[..n]).unwrap(),
                            }
                        }
                    }
                    b'Q' => {
                        c.write_all(b"q").unwrap();
                        return;
                    }
                    _ => {}
                }
            }
        });
        (port, h)
    }

    #[test]
    fn client_against_a_fake_server() {
        let (port, h) = fake_server(false);
        let addr = local(port);
        let s = connect_ready(addr, Duration::from_secs(10), || Ok(())).unwrap();
        assert!(send_bulk(s, 3 * CHUNK as u64 + 5, Duration::from_secs(30)).is_ok());
        let rtts = echo_rtts(connect(addr).unwrap(), 50, Duration::from_secs(30)).unwrap();
        assert_eq!(rtts.len(), 50);
        assert!(rtts.iter().all(|r| *r >= 0.0));
        quit(connect(addr).unwrap()).unwrap();
        h.join().unwrap();
    }

    #[test]
    fn a_short_count_is_an_error() {
        let (port, h) = fake_server(true);
        let e = send_bulk(connect(local(port)).unwrap(), 1000, Duration::from_secs(30))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "the test server counted 999 bytes of 1000 sent");
        quit(connect(local(port)).unwrap()).unwrap();
        h.join().unwrap();
    }

    #[test]
    fn nothing_listening_is_not_ready() {
        let port = free_port().unwrap();
        assert!(try_connect(local(port), Duration::from_millis(200)).is_none());
        // A forwarder that accepts and closes (the guest not listening yet) is not ready either.
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        let h = std::thread::spawn(move || drop(l.accept()));
        assert!(try_connect(local(port), Duration::from_secs(5)).is_none());
        h.join().unwrap();
        let e = connect_ready(local(port), Duration::from_millis(300), || {
            anyhow::bail!("the VM died")
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "the VM died");
    }

    /// The real C server on the host (not as init: it only serves), when `cc -static` works.
    #[test]
    fn the_c_server_speaks_the_protocol() {
        let s = Scratch::new("gatevm-bench-test").unwrap();
        let bin = match build_server(&s) {
            Ok(b) => b,
            Err(e) => {
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED the_c_server_speaks_the_protocol: {e}"
                );
                return;
            }
        };
        assert!(bin.is_file());
        let port = free_port().unwrap();
        let mut c = Command::new(&bin);
        c.arg(port.to_string());
        let mut srv = Background::spawn(&mut c, "gatevm-bench-srv", &s).unwrap();
        let addr = local(port);
        let conn = connect_ready(addr, Duration::from_secs(10), || srv.check_running()).unwrap();
        send_bulk(conn, 8 << 20, Duration::from_secs(60)).unwrap();
        let rtts = echo_rtts(connect(addr).unwrap(), 100, Duration::from_secs(30)).unwrap();
        assert_eq!(rtts.len(), 100);
        // A client that connects and leaves does not stop the server.
        drop(connect(addr).unwrap());
        quit(connect(addr).unwrap()).unwrap();
        let st = srv
            .wait_exit(Duration::from_secs(10))
            .expect("the server exits on quit");
        assert!(st.success(), "{st}");
        assert!(srv.stdout().contains("listening on port"));
    }
}
