//! gvproxy: the user-mode network of an instance, and a client for its HTTP API.
//!
//! Debian's gvproxy (0.8.1) has no configuration file: its stack is fixed (192.168.127.0/24,
//! gateway .1, guest .2 by static lease), it NATs 192.168.127.254 to the host's 127.0.0.1, and it
//! always forwards a host port to the guest's ssh port (`-ssh-port`, 1024-65535, no way to turn it
//! off). We pass a free port and remove that forward through the API as soon as gvproxy is up, so
//! no listener is left that the user did not ask for. Keeping the guest away from the host's
//! loopback is done around gvproxy (see [`crate::loopback`]), since gvproxy itself cannot.

use crate::forward::{Forward, Proto};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

pub use gatevm_abi::net::{GATEWAY_IP, GUEST_IP, GUEST_MAC, HOST_ALIAS_IP};
/// Largest HTTP answer read from gvproxy.
const MAX_ANSWER: usize = 64 * 1024;

/// How to run gvproxy for one instance.
#[derive(Debug, Clone)]
pub struct GvproxyConfig {
    /// Unix socket of the HTTP API.
    pub api_socket: PathBuf,
    /// Unix socket QEMU (or libkrun) connects its network device to.
    pub vm_socket: PathBuf,
    /// The host port gvproxy insists on forwarding to the guest's ssh; removed with
    /// [`remove_ssh_forward`] once gvproxy is up.
    pub ssh_port: u16,
    /// The link MTU (the guest's `eth0` gets the same).
    pub mtu: u32,
}

impl GvproxyConfig {
    /// Command-line arguments.
    pub fn args(&self) -> Vec<String> {
        vec![
            "-listen".into(),
            format!("unix://{}", self.api_socket.display()),
            "-listen-qemu".into(),
            format!("unix://{}", self.vm_socket.display()),
            "-ssh-port".into(),
            self.ssh_port.to_string(),
            "-mtu".into(),
            self.mtu.to_string(),
        ]
    }
}

/// A free TCP port on 127.0.0.1 in gvproxy's accepted range for its ssh forward.
pub fn free_ssh_port() -> std::io::Result<u16> {
    for _ in 0..64 {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let p = l.local_addr()?.port();
        if p >= 1024 {
            return Ok(p);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrNotAvailable,
        "no free port for gvproxy",
    ))
}

/// Removes gvproxy's built-in ssh forward, retrying until its API answers.
pub async fn remove_ssh_forward(
    api: &Path,
    ssh_port: u16,
    deadline: Duration,
) -> Result<(), ApiError> {
    let body = serde_json::json!({"local": format!("127.0.0.1:{ssh_port}"), "protocol": "tcp"})
        .to_string();
    let start = Instant::now();
    let mut delay = Duration::from_millis(5);
    loop {
        let last = match request(api, "POST", "/services/forwarder/unexpose", &body).await {
            Ok((200..=299, _)) => return Ok(()),
            Ok((status, body)) => format!("HTTP {status}: {body}"),
            Err(e) => e.to_string(),
        };
        if start.elapsed() >= deadline {
            return Err(ApiError::Timeout {
                forward: format!("unexpose 127.0.0.1:{ssh_port}"),
                secs: deadline.as_secs(),
                last,
            });
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}

/// Errors talking to gvproxy's API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("gvproxy API at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("gvproxy refused forward {forward}: HTTP {status}: {body}")]
    Refused {
        forward: String,
        status: u16,
        body: String,
    },
    #[error("gvproxy API answered something that is not HTTP: {0:?}")]
    Garbled(String),
    #[error("gvproxy did not accept forward {forward} within {secs} s: {last}")]
    Timeout {
        forward: String,
        secs: u64,
        last: String,
    },
}

/// One HTTP exchange with gvproxy over its unix socket. Returns (status, body).
async fn request(
    api: &Path,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String), ApiError> {
    let io = |source| ApiError::Io {
        path: api.to_path_buf(),
        source,
    };
    let mut s = UnixStream::connect(api).await.map_err(io)?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: gvproxy\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.map_err(io)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_ANSWER {
            return Err(ApiError::Garbled("answer larger than 64 KiB".into()));
        }
    }
    parse_response(&buf)
}

/// Parses an HTTP/1.x answer into (status, body text).
fn parse_response(buf: &[u8]) -> Result<(u16, String), ApiError> {
    let text = String::from_utf8_lossy(buf);
    let status_line = text.lines().next().unwrap_or("");
    let mut parts = status_line.split_whitespace();
    let (Some(proto), Some(code)) = (parts.next(), parts.next()) else {
        return Err(ApiError::Garbled(status_line.chars().take(80).collect()));
    };
    if !proto.starts_with("HTTP/1.") {
        return Err(ApiError::Garbled(status_line.chars().take(80).collect()));
    }
    let status = code
        .parse::<u16>()
        .map_err(|_| ApiError::Garbled(status_line.chars().take(80).collect()))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_string())
        .unwrap_or_default();
    Ok((status, body.chars().take(300).collect()))
}

fn expose_body(f: &Forward, guest_ip: std::net::Ipv4Addr) -> String {
    let local = match f.host_ip {
        std::net::IpAddr::V6(ip) => format!("[{ip}]:{}", f.host_port),
        std::net::IpAddr::V4(ip) => format!("{ip}:{}", f.host_port),
    };
    serde_json::json!({
        "local": local,
        "remote": format!("{guest_ip}:{}", f.guest_port),
        "protocol": match f.proto { Proto::Tcp => "tcp", Proto::Udp => "udp" },
    })
    .to_string()
}

/// Exposes a forward, retrying with backoff while gvproxy's API is not up or its netstack not
/// ready (it answers 500 then), until `deadline` has passed.
pub async fn expose(api: &Path, f: &Forward, deadline: Duration) -> Result<(), ApiError> {
    let body = expose_body(f, GUEST_IP);
    let start = Instant::now();
    let mut delay = Duration::from_millis(10);
    loop {
        let last = match request(api, "POST", "/services/forwarder/expose", &body).await {
            Ok((200..=299, _)) => return Ok(()),
            // "address already in use" and similar are final: retrying will not help.
            Ok((status, body)) if body.contains("in use") || body.contains("permission denied") => {
                return Err(ApiError::Refused {
                    forward: f.to_string(),
                    status,
                    body,
                })
            }
            Ok((status, body)) => format!("HTTP {status}: {body}"),
            Err(e) => e.to_string(),
        };
        if start.elapsed() >= deadline {
            return Err(ApiError::Timeout {
                forward: f.to_string(),
                secs: deadline.as_secs(),
                last,
            });
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}

/// Removes a forward.
pub async fn unexpose(api: &Path, f: &Forward) -> Result<(), ApiError> {
    let local = match f.host_ip {
        std::net::IpAddr::V6(ip) => format!("[{ip}]:{}", f.host_port),
        std::net::IpAddr::V4(ip) => format!("{ip}:{}", f.host_port),
    };
    let body = serde_json::json!({"local": local, "protocol": f.proto.to_string()}).to_string();
    match request(api, "POST", "/services/forwarder/unexpose", &body).await? {
        (200..=299, _) => Ok(()),
        (status, body) => Err(ApiError::Refused {
            forward: f.to_string(),
            status,
            body,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_name_sockets_and_ssh_port() {
        let c = GvproxyConfig {
            api_socket: "/a".into(),
            vm_socket: "/b".into(),
            ssh_port: 40000,
            mtu: 65520,
        };
        assert_eq!(
            c.args(),
            [
                "-listen",
                "unix:///a",
                "-listen-qemu",
                "unix:///b",
                "-ssh-port",
                "40000",
                "-mtu",
                "65520"
            ]
        );
        assert!(free_ssh_port().unwrap() >= 1024);
    }

    #[test]
    fn response_parsing() {
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n").unwrap(),
            (200, String::new())
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 500 Internal Server Error\r\n\r\nnot ready\n").unwrap(),
            (500, "not ready".into())
        );
        for bad in [
            &b""[..],
            b"garbage",
            b"HTTP/1.1 abc",
            b"SSH-2.0 x\r\n",
            b"\xff\xfe",
        ] {
            assert!(parse_response(bad).is_err());
        }
    }

    #[test]
    fn expose_body_shape() {
        let f: Forward = "0.0.0.0:8080:80/udp".parse().unwrap();
        let v: serde_json::Value = serde_json::from_str(&expose_body(&f, GUEST_IP)).unwrap();
        assert_eq!(v["local"], "0.0.0.0:8080");
        assert_eq!(v["remote"], "192.168.127.2:80");
        assert_eq!(v["protocol"], "udp");
    }

    #[tokio::test]
    async fn expose_retries_until_ready_then_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            for i in 0..3 {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await.unwrap();
                let ans: &[u8] = if i < 2 {
                    b"HTTP/1.1 500 Internal Server Error\r\n\r\nnot ready"
                } else {
                    b"HTTP/1.1 200 OK\r\n\r\n"
                };
                s.write_all(ans).await.unwrap();
            }
        });
        let f: Forward = "8080:80".parse().unwrap();
        expose(&sock, &f, Duration::from_secs(5)).await.unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn expose_times_out_when_nobody_listens() {
        let dir = tempfile::tempdir().unwrap();
        let f: Forward = "8080:80".parse().unwrap();
        let err = expose(
            &dir.path().join("none.sock"),
            &f,
            Duration::from_millis(100),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ApiError::Timeout { .. }), "{err}");
    }
}
