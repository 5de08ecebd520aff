//! `gatevm exec`

use crate::output::runtime;
use anyhow::bail;
use gatevm_protocol::{ExecRequest, GuestMsg};
use std::io::IsTerminal;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

#[derive(clap::Args)]
pub struct Args {
    /// Instance name.
    name: String,
    #[command(flatten)]
    opts: ExecOpts,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    cmd: Vec<String>,
}

/// How a command runs in the guest (shared by `exec` and `vm-run`).
#[derive(clap::Args, Clone)]
pub struct ExecOpts {
    /// Keep stdin open and send it to the command.
    #[arg(short, long)]
    pub interactive: bool,
    /// Allocate a terminal for the command.
    #[arg(short, long)]
    pub tty: bool,
    /// Set an environment variable for the command (KEY=VALUE). Repeatable.
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory of the command in the guest.
    #[arg(short, long)]
    pub workdir: Option<String>,
}

impl ExecOpts {
    /// The request for `argv` (which may still be empty for `vm-run --image`).
    pub fn request(&self, argv: &[String]) -> anyhow::Result<ExecRequest> {
        let mut env = Vec::new();
        for kv in &self.env {
            match kv.split_once('=') {
                Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => {
                    env.push((k.to_string(), v.to_string()))
                }
                _ => bail!("invalid --env {kv:?}: expected KEY=VALUE with a non-empty KEY"),
            }
        }
        if argv.iter().any(|c| c.contains('\0')) {
            bail!("the command contains a NUL byte");
        }
        if argv.first().is_some_and(|c| c.is_empty()) {
            bail!("the command is empty");
        }
        Ok(ExecRequest {
            argv: argv.to_vec(),
            env,
            cwd: self.workdir.clone(),
            tty: self.tty,
            rows: 0,
            cols: 0,
            stdin: self.interactive,
        })
    }
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let name = super::name_arg(&a.name)?.to_string();
    let req = a.opts.request(&a.cmd)?;
    run_exec(&name, req)
}

/// Terminal size of stdin's terminal.
fn term_size() -> Option<(u16, u16)> {
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a winsize into the struct we own.
    let rc = unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
}

/// Puts stdin's terminal into raw mode until dropped.
struct RawMode(Option<nix::sys::termios::Termios>);

impl RawMode {
    fn enter() -> RawMode {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return RawMode(None);
        }
        let Ok(orig) = tcgetattr(&stdin) else {
            return RawMode(None);
        };
        let mut raw = orig.clone();
        cfmakeraw(&mut raw);
        if tcsetattr(&stdin, SetArg::TCSANOW, &raw).is_err() {
            return RawMode(None);
        }
        RawMode(Some(orig))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                t,
            );
        }
    }
}

/// Runs an exec request against an instance, wiring this process's stdio and signals to it.
pub fn run_exec(name: &str, mut req: ExecRequest) -> anyhow::Result<i32> {
    let rt = runtime()?;
    if req.tty {
        let (rows, cols) = term_size().unwrap_or((24, 80));
        req.rows = rows;
        req.cols = cols;
    }
    let tty = req.tty;
    let interactive = req.stdin;
    let _raw = if tty && interactive {
        Some(RawMode::enter())
    } else {
        None
    };
    let code = rt.block_on(async {
        let (tx, rx) = tokio::sync::mpsc::channel::<GuestMsg>(16);
        // Forward terminal resizes and the usual signals to the guest process.
        let mut winch = signal(SignalKind::window_change())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut hup = signal(SignalKind::hangup())?;
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = winch.recv() => match term_size() { Some((rows, cols)) if tty => GuestMsg::Resize { rows, cols }, _ => continue },
                    _ = int.recv() => GuestMsg::Signal { signal: libc::SIGINT },
                    _ = term.recv() => GuestMsg::Signal { signal: libc::SIGTERM },
                    _ = hup.recv() => GuestMsg::Signal { signal: libc::SIGHUP },
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        });
        let stdin = if interactive { Some(tokio::io::stdin()) } else { None };
        let code = gatevm_instance::client::exec(name, req, stdin, tokio::io::stdout(), tokio::io::stderr(), rx).await?;
        Ok::<i32, anyhow::Error>(code)
    })?;
    drop(_raw);
    // Don't wait for a blocking stdin read to finish.
    rt.shutdown_background();
    Ok(code)
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
        gatevm_instance::text::line(line.strip_prefix("ctr: ").unwrap_or(line), 300)
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
    gatevm_instance::text::line(
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
) -> anyhow::Result<CapturedBytes>
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
        gatevm_instance::client::exec(name, req, stdin, &mut out, &mut err, rx),
    )
    .await;
    let cmd = shown_command(argv);
    for (what, sink, max) in [
        ("stdout", &out, limits.max_stdout),
        ("stderr", &err, limits.max_stderr),
    ] {
        if sink.overflowed() {
            bail!("`{cmd}` in {name:?} printed more than {max} bytes on {what}; gave up");
        }
    }
    let code = match result {
        Ok(r) => r?,
        Err(_) => bail!(
            "`{cmd}` in {name:?} did not finish within {} s; gave up",
            limits.timeout.as_secs()
        ),
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
) -> anyhow::Result<Captured>
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

/// The instance must exist and run (the one-line errors say which is not the case).
pub fn require_running(name: &str) -> anyhow::Result<()> {
    let paths = gatevm_instance::client::existing(name)?;
    if !gatevm_instance::client::is_running(&paths) {
        return Err(gatevm_instance::client::ClientError::NotRunning(name.to_string()).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn capped_sink_keeps_up_to_its_limit_then_fails() {
        let rt = crate::output::runtime().unwrap();
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
