//! `gatevm exec`

use crate::output::runtime;
use anyhow::bail;
use gatevm_abi::{ExecRequest, GuestMsg};
pub(crate) use gatevm_instance::capture::{capture, Captured, Limits};
use std::io::IsTerminal;
use tokio::signal::unix::{signal, SignalKind};

#[derive(clap::Args)]
pub(crate) struct Args {
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
pub(crate) struct ExecOpts {
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
    pub(crate) fn request(&self, argv: &[String]) -> anyhow::Result<ExecRequest> {
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

pub(crate) fn run(a: Args) -> anyhow::Result<i32> {
    let name = super::name_arg(&a.name)?.to_string();
    let req = a.opts.request(&a.cmd)?;
    run_exec(&name, req)
}

/// Terminal size of stdin's terminal.
fn term_size() -> Option<(u16, u16)> {
    // SAFETY: winsize is plain integers, for which all zeroes is a valid value.
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
pub(crate) fn run_exec(name: &str, mut req: ExecRequest) -> anyhow::Result<i32> {
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

/// The instance must exist and run (the one-line errors say which is not the case).
pub(crate) fn require_running(name: &str) -> anyhow::Result<()> {
    let paths = gatevm_instance::client::existing(name)?;
    if !gatevm_instance::client::is_running(&paths) {
        return Err(gatevm_instance::client::ClientError::NotRunning(name.to_string()).into());
    }
    Ok(())
}
