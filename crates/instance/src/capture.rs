//! Commands the host runs in the guest for itself (probes, listings), bounded: the guest may
//! never answer, or stream forever.

use gatevm_abi::{ExecRequest, GuestMsg};
use std::time::Duration;

/// Why a bounded command gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The exec itself failed (no instance, no supervisor, a broken stream).
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
    #[error("`{command}` in {name:?} printed more than {max} bytes on {what}; gave up")]
    TooMuchOutput {
        command: String,
        name: String,
        max: usize,
        what: &'static str,
    },
    #[error("`{command}` in {name:?} did not finish within {secs} s; gave up")]
    Timeout {
        command: String,
        name: String,
        secs: u64,
    },
}

/// What a command in the guest printed, and its exit code.
pub struct Captured {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Captured {
    /// The last non-empty line of stderr (where `ctr` and friends put their error), without a
    /// `ctr: ` prefix, stripped of terminal control sequences and cut to 300 characters (it is
    /// the guest's text and ends up on the user's terminal).
    pub fn error_line(&self) -> String {
        let line = self
            .stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim();
        crate::text::line(line.strip_prefix("ctr: ").unwrap_or(line), 300)
    }
}

/// Bounds on a command the host runs in the guest for itself: the guest may never answer, or
/// stream forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The whole exchange, start to exit code.
    pub timeout: Duration,
    /// Most bytes kept of stdout; more is an error.
    pub max_stdout: usize,
    /// Most bytes kept of stderr; more is an error.
    pub max_stderr: usize,
}

impl Limits {
    /// Probes and listings: 60 s, 4 MiB of stdout, 64 KiB of stderr.
    pub const DEFAULT: Limits = Limits {
        timeout: Duration::from_secs(60),
        max_stdout: 4 << 20,
        max_stderr: 64 << 10,
    };

    /// These limits with another timeout.
    pub const fn within(self, timeout: Duration) -> Limits {
        Limits { timeout, ..self }
    }
}

/// An output sink that keeps at most `max` bytes; a write past that keeps what fits, marks the
/// sink as overflowed and fails, which ends the exec.
pub struct Capped {
    buf: Vec<u8>,
    max: usize,
    overflowed: bool,
}

impl Capped {
    /// An empty sink for at most `max` bytes.
    pub fn new(max: usize) -> Capped {
        Capped {
            buf: Vec::new(),
            max,
            overflowed: false,
        }
    }

    /// More than `max` bytes were written.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// What was kept.
    pub fn into_inner(self) -> Vec<u8> {
        self.buf
    }
}

impl tokio::io::AsyncWrite for Capped {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let room = self.max - self.buf.len();
        if data.len() > room {
            self.buf.extend_from_slice(&data[..room]);
            self.overflowed = true;
            let max = self.max;
            return std::task::Poll::Ready(Err(std::io::Error::other(format!(
                "more than {max} bytes of output"
            ))));
        }
        self.buf.extend_from_slice(data);
        std::task::Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// A command as error messages show it: its first words, cut short.
fn shown_command(argv: &[&str]) -> String {
    crate::text::line(
        &argv.iter().take(3).copied().collect::<Vec<_>>().join(" "),
        60,
    )
}

/// What a bounded command printed, as bytes, and its exit code.
pub struct CapturedBytes {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Runs a command in the guest with `stdin` (if any) as its input and collects its output,
/// within `limits`: a command that outlives the timeout or prints more than the caps is a
/// one-line error (its exec stream is closed, which ends it in the guest).
pub async fn capture_bytes<I>(
    name: &str,
    argv: &[&str],
    stdin: Option<I>,
    limits: Limits,
) -> Result<CapturedBytes, CaptureError>
where
    I: tokio::io::AsyncRead + Unpin,
{
    let req = ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![],
        cwd: None,
        tty: false,
        rows: 0,
        cols: 0,
        stdin: stdin.is_some(),
    };
    let (_tx, rx) = tokio::sync::mpsc::channel::<GuestMsg>(1);
    let mut out = Capped::new(limits.max_stdout);
    let mut err = Capped::new(limits.max_stderr);
    let result = tokio::time::timeout(
        limits.timeout,
        crate::client::exec(name, req, stdin, &mut out, &mut err, rx),
    )
    .await;
    let cmd = shown_command(argv);
    for (what, sink, max) in [
        ("stdout", &out, limits.max_stdout),
        ("stderr", &err, limits.max_stderr),
    ] {
        if sink.overflowed() {
            return Err(CaptureError::TooMuchOutput {
                command: cmd,
                name: name.to_string(),
                max,
                what,
            });
        }
    }
    let code = match result {
        Ok(r) => r?,
        Err(_) => {
            return Err(CaptureError::Timeout {
                command: cmd,
                name: name.to_string(),
                secs: limits.timeout.as_secs(),
            })
        }
    };
    Ok(CapturedBytes {
        code,
        stdout: out.into_inner(),
        stderr: err.into_inner(),
    })
}

/// [`capture_bytes`], with the output as (lossy UTF-8) text.
pub async fn capture<I>(
    name: &str,
    argv: &[&str],
    stdin: Option<I>,
    limits: Limits,
) -> Result<Captured, CaptureError>
where
    I: tokio::io::AsyncRead + Unpin,
{
    let b = capture_bytes(name, argv, stdin, limits).await?;
    Ok(Captured {
        code: b.code,
        stdout: String::from_utf8_lossy(&b.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&b.stderr).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn capped_sink_keeps_up_to_its_limit_then_fails() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut c = Capped::new(10);
            c.write_all(b"12345").await.unwrap();
            c.write_all(b"67890").await.unwrap();
            assert!(!c.overflowed());
            let e = c.write_all(b"x").await.unwrap_err();
            assert!(e.to_string().contains("more than 10 bytes"), "{e}");
            assert!(c.overflowed());
            assert_eq!(c.into_inner(), b"1234567890");

            // One big write: what fits is kept, the rest is refused.
            let mut c = Capped::new(4);
            assert!(c.write_all(&[b'y'; 1 << 20]).await.is_err());
            assert!(c.overflowed());
            assert_eq!(c.into_inner(), b"yyyy");

            // An endless writer stops at the cap instead of growing without bound.
            let mut c = Capped::new(64 << 10);
            let chunk = [b'z'; 4096];
            let mut written = 0usize;
            while let Ok(n) = c.write(&chunk).await {
                written += n;
                assert!(written <= 64 << 10);
            }
            assert_eq!(c.into_inner().len(), 64 << 10);
        });
    }

    #[test]
    fn error_lines_from_the_guest_are_made_safe() {
        let c = Captured {
            code: 1,
            stdout: String::new(),
            stderr: format!(
                "first\nctr: \u{1b}]52;c;aGk=\u{7}bad \u{1b}[2Jthing\u{9b}31m{}\n\n",
                "x".repeat(1000)
            ),
        };
        let line = c.error_line();
        assert!(line.starts_with("bad thing"), "{line:?}");
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert_eq!(line.chars().count(), 300);
    }

    #[test]
    fn limits() {
        let l = Limits::DEFAULT.within(Duration::from_secs(5));
        assert_eq!(l.timeout, Duration::from_secs(5));
        assert_eq!(l.max_stdout, Limits::DEFAULT.max_stdout);
        assert_eq!(
            shown_command(&["ctr", "-n", "k8s.io", "images", "ls"]),
            "ctr -n k8s.io"
        );
    }
}
