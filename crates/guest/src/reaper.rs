//! The one place that waits for child processes.
//!
//! PID 1 inherits every orphan, so a single reaper thread owns all waiting: it blocks in
//! `waitid(P_ALL, WEXITED | WNOWAIT)` until some child is a zombie, then takes the registry lock
//! and reaps exactly that pid. Processes gatevm starts are spawned through [`Reaper::spawn`], which
//! holds the same lock across fork+exec and the registry insert, so an exit can never be reaped
//! before its pid is registered. Statuses of unregistered pids (orphans) are dropped.
//!
//! Because a registered pid is reaped only under the lock, [`Reaper::signal`] (which checks the
//! registry under the lock) never signals a recycled pid.
//!
//! Nothing else may wait: never call `std::process::Child::wait` (it would race the reaper);
//! [`Reaper::spawn`] takes the `Child` apart so callers cannot.

use crate::sys;
use gatevm_abi::ExitStatus;
use std::collections::HashMap;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::{ChildStderr, ChildStdin, ChildStdout, Command};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A process started through the reaper.
#[derive(Debug)]
pub(crate) struct Spawned {
    /// Its pid.
    pub pid: i32,
    /// Its stdin pipe when piped.
    pub stdin: Option<ChildStdin>,
    /// Its stdout pipe when piped.
    pub stdout: Option<ChildStdout>,
    /// Its stderr pipe when piped.
    pub stderr: Option<ChildStderr>,
    /// Receives its exit status once, when the reaper reaped it.
    pub exit: Receiver<ExitStatus>,
}

#[derive(Default)]
struct Registry {
    waiters: HashMap<i32, Sender<ExitStatus>>,
    /// Bumped on every spawn, so a reaper that found no children notices new ones at once.
    generation: u64,
}

/// The process-wide reaper (see the module docs).
pub(crate) struct Reaper {
    registry: Mutex<Registry>,
    spawned: Condvar,
}

static GLOBAL: OnceLock<Reaper> = OnceLock::new();

impl Reaper {
    /// The process's reaper; the reaper thread starts on first use.
    pub(crate) fn global() -> &'static Reaper {
        let mut started = false;
        let r = GLOBAL.get_or_init(|| {
            started = true;
            Reaper {
                registry: Mutex::new(Registry::default()),
                spawned: Condvar::new(),
            }
        });
        if started {
            let spawn = std::thread::Builder::new()
                .name("reaper".into())
                .spawn(move || r.run());
            if let Err(e) = spawn {
                crate::glog!("cannot start the reaper thread: {e}");
            }
        }
        r
    }

    /// Spawns `cmd` and registers its pid before any exit can be reaped. The child starts with an
    /// empty signal mask (std keeps the parent's, and PID 1 blocks its shutdown signals).
    pub(crate) fn spawn(&self, cmd: &mut Command) -> io::Result<Spawned> {
        // SAFETY: runs in the forked child before exec; sigemptyset and pthread_sigmask are
        // async-signal-safe and only touch the local set and the calling thread's mask.
        unsafe {
            cmd.pre_exec(|| {
                let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
                libc::sigemptyset(set.as_mut_ptr());
                libc::pthread_sigmask(libc::SIG_SETMASK, set.as_ptr(), std::ptr::null_mut());
                Ok(())
            });
        }
        let mut reg = sys::lock(&self.registry);
        let mut child = cmd.spawn()?;
        let pid = child.id() as i32;
        let (tx, rx) = channel();
        reg.waiters.insert(pid, tx);
        reg.generation = reg.generation.wrapping_add(1);
        drop(reg);
        self.spawned.notify_all();
        Ok(Spawned {
            pid,
            stdin: child.stdin.take(),
            stdout: child.stdout.take(),
            stderr: child.stderr.take(),
            exit: rx,
        })
        // `child` is dropped here without waiting: the reaper owns that.
    }

    /// Sends `sig` to a registered, not yet reaped pid (to its process group when `group`).
    /// Returns false when the pid is not (or no longer) ours.
    pub(crate) fn signal(&self, pid: i32, sig: i32, group: bool) -> bool {
        let reg = sys::lock(&self.registry);
        if pid <= 1 || !reg.waiters.contains_key(&pid) {
            return false;
        }
        sys::kill(if group { -pid } else { pid }, sig).is_ok()
    }

    /// Whether a pid is registered and not reaped yet.
    #[cfg(test)]
    pub(crate) fn is_running(&self, pid: i32) -> bool {
        sys::lock(&self.registry).waiters.contains_key(&pid)
    }

    /// Whether this process has any child at all (running or zombie).
    pub(crate) fn has_children(&self) -> bool {
        // SAFETY: an all-zero siginfo_t is a valid value for waitid to fill.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid writes only into `info`; WNOHANG|WNOWAIT neither blocks nor reaps.
        let rc = unsafe {
            libc::waitid(
                libc::P_ALL,
                0,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT | libc::__WALL,
            )
        };
        !(rc < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD))
    }

    /// Waits until this process has no children left, up to `timeout`; true when none are left.
    pub(crate) fn wait_no_children(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.has_children() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn run(&self) {
        loop {
            let generation = sys::lock(&self.registry).generation;
            // SAFETY: an all-zero siginfo_t is a valid value for waitid to fill.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waitid writes only into `info`; WNOWAIT leaves the zombie for the reap below.
            let rc = unsafe {
                libc::waitid(
                    libc::P_ALL,
                    0,
                    &mut info,
                    libc::WEXITED | libc::WNOWAIT | libc::__WALL,
                )
            };
            if rc < 0 {
                match io::Error::last_os_error().raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::ECHILD) => {
                        let reg = sys::lock(&self.registry);
                        if reg.generation == generation {
                            let _ = self.spawned.wait_timeout(reg, Duration::from_secs(1));
                        }
                    }
                    _ => std::thread::sleep(Duration::from_millis(100)),
                }
                continue;
            }
            // SAFETY: waitid succeeded with WEXITED, so the siginfo holds a child's pid.
            let pid = unsafe { info.si_pid() };
            if pid <= 0 {
                continue;
            }
            let mut reg = sys::lock(&self.registry);
            let mut status: libc::c_int = 0;
            // SAFETY: waitpid writes only into `status`; the pid is a zombie child of ours.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::__WALL) };
            if r != pid {
                continue;
            }
            let waiter = reg.waiters.remove(&pid);
            drop(reg);
            if let Some(tx) = waiter {
                let _ = tx.send(decode_status(status));
            }
        }
    }
}

/// Turns a raw wait status into the protocol's exit status.
pub(crate) fn decode_status(status: libc::c_int) -> ExitStatus {
    if libc::WIFEXITED(status) {
        ExitStatus {
            code: Some(libc::WEXITSTATUS(status)),
            signal: None,
        }
    } else if libc::WIFSIGNALED(status) {
        ExitStatus {
            code: None,
            signal: Some(libc::WTERMSIG(status)),
        }
    } else {
        ExitStatus {
            code: None,
            signal: None,
        }
    }
}

/// Renders an exit status as text (`exit code 3`, `killed by signal 9`).
pub(crate) fn describe(status: &ExitStatus) -> String {
    match (status.code, status.signal) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        (None, None) => "unknown exit".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;

    #[test]
    fn reaps_registered_children_even_when_they_exit_at_once() {
        let r = Reaper::global();
        for code in 0..20 {
            let mut cmd = Command::new("/bin/sh");
            cmd.arg("-c")
                .arg(format!("exit {code}"))
                .stdin(Stdio::null());
            let s = r.spawn(&mut cmd).expect("spawn sh");
            let st = s
                .exit
                .recv_timeout(Duration::from_secs(10))
                .expect("status");
            assert_eq!(
                st,
                ExitStatus {
                    code: Some(code),
                    signal: None
                }
            );
            assert!(!r.is_running(s.pid));
        }
    }

    #[test]
    fn signal_only_registered() {
        let r = Reaper::global();
        let mut cmd = Command::new("/bin/sleep");
        cmd.arg("30");
        let s = r.spawn(&mut cmd).expect("spawn sleep");
        assert!(r.is_running(s.pid));
        assert!(r.signal(s.pid, libc::SIGKILL, false));
        let st = s
            .exit
            .recv_timeout(Duration::from_secs(10))
            .expect("status");
        assert_eq!(st.signal, Some(libc::SIGKILL));
        assert!(!r.signal(s.pid, libc::SIGKILL, false));
        assert!(!r.signal(1, libc::SIGTERM, false));
        assert_eq!(describe(&st), "killed by signal 9");
    }

    #[test]
    fn children_get_an_empty_signal_mask() {
        use std::io::Read;
        // Block a signal in a thread of our own (the mask is per thread), then spawn from it.
        let out = std::thread::spawn(|| {
            let mut set = nix::sys::signal::SigSet::empty();
            set.add(nix::sys::signal::Signal::SIGUSR2);
            set.thread_block().unwrap();
            let mut cmd = Command::new("/bin/grep");
            cmd.args(["SigBlk", "/proc/self/status"])
                .stdout(Stdio::piped());
            let s = Reaper::global().spawn(&mut cmd).expect("spawn grep");
            let mut out = String::new();
            s.stdout.unwrap().read_to_string(&mut out).unwrap();
            s.exit.recv_timeout(Duration::from_secs(10)).unwrap();
            out
        })
        .join()
        .unwrap();
        assert_eq!(out.trim(), "SigBlk:\t0000000000000000");
    }

    #[test]
    fn decode() {
        assert_eq!(
            decode_status(3 << 8),
            ExitStatus {
                code: Some(3),
                signal: None
            }
        );
        assert_eq!(
            decode_status(9),
            ExitStatus {
                code: None,
                signal: Some(9)
            }
        );
    }
}
