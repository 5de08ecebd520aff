//! Runs external commands with a timeout, measuring the wall time from spawn to exit, and owns
//! the long-running ones ([`Background`]: a VM, a guest-side server, an ssh master).
//!
//! Standard output and error go to files in the scratch directory (not pipes: a daemon the
//! command leaves behind cannot hold them open and stall the measurement). A waiter thread
//! notices the exit with `waitid(WNOWAIT)`, which leaves the child unreaped, so the owner can
//! still kill it by its handle on a timeout or Ctrl-C without racing a reused pid.

use crate::scratch::Scratch;
use anyhow::{anyhow, bail};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a command has to exit after SIGTERM (on a timeout or Ctrl-C) before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(10);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Catches SIGINT, SIGTERM and SIGHUP: the running command is killed, the run ends with an
/// error and the instance is deleted on the way out.
pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler only
        // stores to an atomic, which is async-signal-safe; the pointer to `sa` is valid for the
        // call and the old action is not asked for.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Whether a SIGINT/SIGTERM/SIGHUP arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Errors out when interrupted.
pub fn check_interrupted() -> anyhow::Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// A command that ran to its end.
#[derive(Debug)]
pub struct Finished {
    /// How the command was named in messages.
    pub label: String,
    /// Its exit status.
    pub status: ExitStatus,
    /// Its standard output (lossy UTF-8).
    pub stdout: String,
    /// Its standard error (lossy UTF-8).
    pub stderr: String,
    /// Wall time from just before spawn to the exit being noticed.
    pub elapsed: Duration,
}

impl Finished {
    /// The command itself, or an error naming it, its status and its last line of output.
    pub fn ok(self) -> anyhow::Result<Finished> {
        if self.status.success() {
            return Ok(self);
        }
        bail!(
            "`{}` failed ({}): {}",
            self.label,
            self.status,
            self.last_line()
        )
    }

    /// The last non-empty line of standard error, else of standard output.
    pub fn last_line(&self) -> String {
        last_line(&self.stderr)
            .or_else(|| last_line(&self.stdout))
            .unwrap_or("no output")
            .to_string()
    }
}

/// The last non-empty line of `s`, trimmed.
pub fn last_line(s: &str) -> Option<&str> {
    s.lines().map(str::trim).rev().find(|l| !l.is_empty())
}

/// The program's file name and the arguments, as a user would type them.
pub fn label(cmd: &Command) -> String {
    let prog = Path::new(cmd.get_program());
    let prog = prog.file_name().unwrap_or(prog.as_os_str());
    std::iter::once(prog)
        .chain(cmd.get_args())
        .map(|a| {
            let a = a.to_string_lossy();
            if a.is_empty() || a.contains(char::is_whitespace) {
                format!("'{a}'")
            } else {
                a.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

struct RemoveOnDrop(Vec<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Waits for `pid` to exit without reaping it.
fn wait_exit_noreap(pid: u32) -> std::io::Result<()> {
    loop {
        // SAFETY: a zeroed siginfo_t is a valid out-buffer for waitid, which writes into it and
        // keeps no pointer; WNOWAIT leaves the child to be reaped by its owner.
        let r = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Runs `cmd` (stdin from /dev/null), named in messages by [`label`].
pub fn run(cmd: &mut Command, timeout: Duration, scratch: &Scratch) -> anyhow::Result<Finished> {
    let l = label(cmd);
    run_labeled(cmd, &l, timeout, scratch)
}

/// Runs `cmd`, named `label` in messages; kills it after `timeout` or on Ctrl-C (both errors).
/// A non-zero exit is not an error here: see [`Finished::ok`].
pub fn run_labeled(
    cmd: &mut Command,
    label: &str,
    timeout: Duration,
    scratch: &Scratch,
) -> anyhow::Result<Finished> {
    run_inner(cmd, label, timeout, scratch, true, None)
}

/// Like [`run`], with standard input read from `stdin`.
pub fn run_with_stdin(
    cmd: &mut Command,
    stdin: File,
    timeout: Duration,
    scratch: &Scratch,
) -> anyhow::Result<Finished> {
    let l = label(cmd);
    run_inner(cmd, &l, timeout, scratch, true, Some(stdin))
}

/// Like [`run`], but runs even after Ctrl-C (for the clean-up on the way out).
pub fn run_uninterruptible(
    cmd: &mut Command,
    timeout: Duration,
    scratch: &Scratch,
) -> anyhow::Result<Finished> {
    let l = label(cmd);
    run_inner(cmd, &l, timeout, scratch, false, None)
}

fn run_inner(
    cmd: &mut Command,
    label: &str,
    timeout: Duration,
    scratch: &Scratch,
    interruptible: bool,
    stdin: Option<File>,
) -> anyhow::Result<Finished> {
    let stop_asked = || interruptible && interrupted();
    if stop_asked() {
        bail!("interrupted");
    }
    let out_path = scratch.unique("stdout");
    let err_path = scratch.unique("stderr");
    let _files = RemoveOnDrop(vec![out_path.clone(), err_path.clone()]);
    let create = |p: &Path| {
        std::fs::File::create(p).map_err(|e| anyhow!("cannot create {}: {e}", p.display()))
    };
    cmd.stdin(stdin.map_or_else(Stdio::null, Stdio::from))
        .stdout(create(&out_path)?)
        .stderr(create(&err_path)?);
    let t0 = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| anyhow!("cannot run `{label}`: {e}"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = wait_exit_noreap(pid);
        let _ = tx.send((r, Instant::now()));
    });
    let deadline = t0 + timeout;
    let (waited, t1) = loop {
        let now = Instant::now();
        let why = if stop_asked() {
            Some("interrupted".to_string())
        } else if now >= deadline {
            Some(format!("timed out after {} s (killed)", timeout.as_secs()))
        } else {
            None
        };
        if let Some(why) = why {
            // SIGTERM first, so gatevm can undo what it started; SIGKILL after a grace period.
            // SAFETY: kill(2) has no memory-safety preconditions; the child is not reaped yet
            // (only `child.wait()` below reaps it), so its pid cannot name another process.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
            if rx.recv_timeout(TERM_GRACE).is_err() {
                let _ = child.kill();
            }
            let _ = child.wait();
            bail!("`{label}` {why}");
        }
        match rx.recv_timeout((deadline - now).min(Duration::from_millis(100))) {
            Ok(v) => break v,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("waiting for `{label}` failed");
            }
        }
    };
    let status = match waited {
        Ok(()) => child.wait(),
        Err(e) => {
            let _ = child.kill();
            Err(e)
        }
    }
    .map_err(|e| anyhow!("waiting for `{label}` failed: {e}"))?;
    let read =
        |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
    Ok(Finished {
        label: label.to_string(),
        status,
        stdout: read(&out_path),
        stderr: read(&err_path),
        elapsed: t1.duration_since(t0),
    })
}

/// A long-running child process the benchmark owns: stdin from /dev/null, output to files in the
/// scratch directory, a parent-death signal (SIGTERM) so it does not outlive a SIGKILLed
/// benchmark, and stopped (SIGTERM, then SIGKILL after a grace period) when dropped: at the end,
/// on an error, after Ctrl-C. It is signalled by pid only while unreaped.
pub struct Background {
    child: Child,
    label: String,
    out: PathBuf,
    err: PathBuf,
    exited: Option<ExitStatus>,
    grace: Duration,
    _files: RemoveOnDrop,
}

impl Background {
    /// Starts `cmd`, named `label` in messages.
    pub fn spawn(cmd: &mut Command, label: &str, scratch: &Scratch) -> anyhow::Result<Background> {
        use std::os::unix::process::CommandExt;
        check_interrupted()?;
        let out = scratch.unique("bg-stdout");
        let err = scratch.unique("bg-stderr");
        let files = RemoveOnDrop(vec![out.clone(), err.clone()]);
        let create =
            |p: &Path| File::create(p).map_err(|e| anyhow!("cannot create {}: {e}", p.display()));
        cmd.stdin(Stdio::null())
            .stdout(create(&out)?)
            .stderr(create(&err)?);
        // SAFETY: the closure runs in the child between fork and exec and only calls prctl(2),
        // which is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| anyhow!("cannot run `{label}`: {e}"))?;
        Ok(Background {
            child,
            label: label.to_string(),
            out,
            err,
            exited: None,
            grace: TERM_GRACE,
            _files: files,
        })
    }

    /// How long it gets to exit after SIGTERM when dropped [default: 10 s].
    pub fn with_grace(mut self, grace: Duration) -> Background {
        self.grace = grace;
        self
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How it was named.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Its exit status, if it has exited (reaping it).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.exited = Some(st);
            }
        }
        self.exited
    }

    /// What it printed so far on standard output (lossy UTF-8).
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.out).unwrap_or_default()).into_owned()
    }

    /// The last non-empty line of its standard error, else of its standard output.
    pub fn last_line(&self) -> String {
        let err =
            String::from_utf8_lossy(&std::fs::read(&self.err).unwrap_or_default()).into_owned();
        let out = self.stdout();
        last_line(&err)
            .or_else(|| last_line(&out))
            .unwrap_or("no output")
            .to_string()
    }

    /// An error unless it still runs: "`label` exited early (status): last line".
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        match self.exited() {
            None => Ok(()),
            Some(st) => bail!("`{}` exited early ({st}): {}", self.label, self.last_line()),
        }
    }

    /// Waits up to `timeout` for it to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.exited() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` unless it has exited, waits up to `grace` for the exit, then SIGKILLs it;
    /// returns its exit status.
    pub fn stop(&mut self, signal: libc::c_int, grace: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(st) = self.exited() {
            return Ok(st);
        }
        // SAFETY: kill(2) has no memory-safety preconditions; the child is unreaped (exited()
        // said so), so its pid names no other process.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, signal);
        }
        if let Some(st) = self.wait_exit(grace) {
            return Ok(st);
        }
        let _ = self.child.kill();
        let st = self
            .child
            .wait()
            .map_err(|e| anyhow!("waiting for `{}` failed: {e}", self.label))?;
        self.exited = Some(st);
        Ok(st)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if self.exited().is_none() {
            eprintln!("gatevm-bench: stopping `{}`", self.label);
            let _ = self.stop(libc::SIGTERM, self.grace);
        }
    }
}

/// Calls `probe` every `every` until it gives `Some`, an error on Ctrl-C or after `timeout`
/// ("timed out after N s waiting for WHAT").
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut probe: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        check_interrupted()?;
        if let Some(v) = probe()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {} s waiting for {what}", timeout.as_secs());
        }
        std::thread::sleep(every);
    }
}

/// Milliseconds of a duration.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn output_status_and_time() {
        let s = Scratch::new("gatevm-bench-test").unwrap();
        let f = run(
            &mut sh("echo out; echo err >&2; sleep 0.05"),
            Duration::from_secs(10),
            &s,
        )
        .unwrap();
        assert!(f.status.success());
        assert_eq!(f.stdout, "out\n");
        assert_eq!(f.stderr, "err\n");
        assert!(f.elapsed >= Duration::from_millis(50));
        // The output files are gone.
        assert_eq!(std::fs::read_dir(s.path()).unwrap().count(), 0);
    }

    #[test]
    fn failure_names_the_command_and_its_last_line() {
        let s = Scratch::new("gatevm-bench-test").unwrap();
        let f = run(
            &mut sh("echo first >&2; echo 'it broke' >&2; exit 3"),
            Duration::from_secs(10),
            &s,
        )
        .unwrap();
        let e = f.ok().unwrap_err().to_string();
        assert!(
            e.starts_with("`sh -c 'echo first >&2; echo 'it broke' >&2; exit 3'` failed"),
            "{e}"
        );
        assert!(e.contains("exit status: 3"), "{e}");
        assert!(e.ends_with(": it broke"), "{e}");
    }

    #[test]
    fn timeout_kills() {
        let s = Scratch::new("gatevm-bench-test").unwrap();
        let t = Instant::now();
        let e = run(&mut sh("sleep 30"), Duration::from_millis(300), &s).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(e.to_string().contains("timed out"), "{e}");
    }

    #[test]
    fn a_command_ignoring_sigterm_is_killed_after_the_grace_period() {
        let s = Scratch::new("gatevm-bench-test").unwrap();
        let t = Instant::now();
        let e = run(
            &mut sh("trap '' TERM; while :; do sleep 0.1; done"),
            Duration::from_millis(200),
            &s,
        )
        .unwrap_err();
        assert!(e.to_string().contains("timed out"), "{e}");
        assert!(t.elapsed() >= TERM_GRACE);
    }

    #[test]
    fn a_daemon_holding_no_pipe_does_not_stall() {
        let s = Scratch::new("gatevm-bench-test").unwrap();
        let f = run(
            &mut sh("sleep 5 & echo started"),
            Duration::from_secs(3),
            &s,
        )
        .unwrap();
        assert!(f.elapsed < Duration::from_secs(3));
        assert_eq!(f.stdout, "started\n");
    }

    #[test]
    fn missing_program() {
        let s = Scratch::new("gatevm-bench-test").unwrap();
        let e = run(
            &mut Command::new("/nonexistent/gatevm"),
            Duration::from_secs(1),
            &s,
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("cannot run `gatevm`"), "{e}");
    }

    #[test]
    fn stdin_from_a_file() {
        let s = Scratch::new("gatevm-bench-test").unwrap();
        let p = s.path().join("in");
        std::fs::write(&p, b"abc").unwrap();
        let f = run_with_stdin(
            &mut sh("wc -c"),
            File::open(&p).unwrap(),
            Duration::from_secs(10),
            &s,
        )
        .unwrap();
        assert_eq!(f.stdout.trim(), "3");
    }

    #[test]
    fn background_is_stopped_when_dropped() {
        let s = Scratch::new("gatevm-bench-test").unwrap();
        let mut b = Background::spawn(&mut sh("echo up; exec sleep 30"), "sleeper", &s).unwrap();
        let pid = b.pid();
        assert!(b.check_running().is_ok());
        wait_until(
            "the output",
            Duration::from_secs(5),
            Duration::from_millis(10),
            || Ok(b.stdout().contains("up").then_some(())),
        )
        .unwrap();
        let t = Instant::now();
        drop(b);
        assert!(t.elapsed() < Duration::from_secs(5));
        // Reaped: the pid is gone (or, unlikely, reused by another process).
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert_ne!(comm.trim(), "sleep");
    }

    #[test]
    fn background_that_exits_early_says_why() {
        let s = Scratch::new("gatevm-bench-test").unwrap();
        let mut b =
            Background::spawn(&mut sh("echo 'no such port' >&2; exit 4"), "server", &s).unwrap();
        assert!(b.wait_exit(Duration::from_secs(5)).is_some());
        let e = b.check_running().unwrap_err().to_string();
        assert!(e.starts_with("`server` exited early"), "{e}");
        assert!(e.ends_with(": no such port"), "{e}");
        // Stopping an exited process only reports its status.
        assert_eq!(
            b.stop(libc::SIGTERM, Duration::from_secs(1))
                .unwrap()
                .code(),
            Some(4)
        );
    }

    #[test]
    fn wait_until_times_out() {
        let t = Instant::now();
        let e = wait_until(
            "nothing",
            Duration::from_millis(100),
            Duration::from_millis(10),
            || Ok(None::<()>),
        )
        .unwrap_err();
        assert!(e.to_string().contains("waiting for nothing"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn last_lines() {
        assert_eq!(last_line("a\nb\n\n  \n"), Some("b"));
        assert_eq!(last_line(" \n"), None);
    }
}
