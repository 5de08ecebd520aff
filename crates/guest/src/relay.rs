//! `gatevm-guest relay SOCKET`: joins this process's stdin and stdout to a unix socket in the
//! guest. The host relays a client of an API socket (containerd's) through one such exec per
//! connection, so the bytes ride the agent channel with its flow control and never the guest's
//! network.

use std::io::{self, Read, Write};
use std::mem::ManuallyDrop;
use std::net::Shutdown;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;

/// Copies until either side ends: the host's end of stdin shuts the socket's write side (the
/// server then answers what it has and closes), the server's close ends stdout. Unbuffered both
/// ways: a protocol that waits for an answer must not find its request sitting in a buffer.
pub(crate) fn main(args: &[String]) -> i32 {
    let [path] = args else {
        eprintln!("gatevm-guest relay: usage: gatevm-guest relay SOCKET");
        return 2;
    };
    let sock = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gatevm-guest relay: connecting to {path}: {e}");
            return 1;
        }
    };
    let mut to_sock = match sock.try_clone() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gatevm-guest relay: {e}");
            return 1;
        }
    };
    std::thread::spawn(move || {
        // SAFETY: fd 0 is this process's stdin for its whole life; ManuallyDrop keeps it open.
        let mut stdin = ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(0) });
        let _ = copy(&mut *stdin, &mut to_sock);
        let _ = to_sock.shutdown(Shutdown::Write);
    });
    // SAFETY: as above, for stdout.
    let mut stdout = ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(1) });
    let mut from_sock = sock;
    match copy(&mut from_sock, &mut *stdout) {
        Ok(_) => 0,
        Err(e) => {
            eprintln!("gatevm-guest relay: {path}: {e}");
            1
        }
    }
}

/// `io::copy` with a plain buffer and no buffering of the writer.
fn copy(from: &mut impl Read, to: &mut impl Write) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_moves_every_byte_and_ends_at_eof() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut out = Vec::new();
        assert_eq!(copy(&mut &data[..], &mut out).unwrap(), data.len() as u64);
        assert_eq!(out, data);
    }

    #[test]
    fn a_missing_socket_is_one_line_and_exit_1() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("none.sock").display().to_string();
        assert_eq!(main(&[p]), 1);
        assert_eq!(main(&[]), 2);
    }
}
