//! Forwarding SIGINT, SIGTERM and SIGHUP to the foreground container.
//!
//! The agent delivers the host's signals to this process. They are blocked in every thread and
//! taken by one thread with `sigwait`: while the container is being set up they are only
//! remembered (the setup stops at the next step and undoes itself), while `ctr` runs they are
//! passed on, and once it has exited they are ignored so the cleanup always finishes.
//!
//! Without a terminal `ctr tasks start` proxies signals to the task itself, so they go to the ctr
//! process. With `--tty` ctr does not proxy anything (the terminal is expected to carry ^C), so
//! they are sent to the task with `ctr tasks kill`.

use super::ctr;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::Pid;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};

/// The signals that are forwarded.
pub const FORWARDED: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

/// Where forwarded signals go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The ctr process (it proxies them to the task).
    Ctr(i32),
    /// The task, through `ctr tasks kill` (terminal mode).
    Task {
        /// containerd namespace.
        namespace: String,
        /// Container id.
        id: String,
    },
}

#[derive(Debug)]
enum Phase {
    Setup { pending: Option<i32> },
    Running(Target),
    Done,
}

/// The forwarding thread's shared state.
#[derive(Debug, Clone)]
pub struct Forwarder {
    phase: Arc<Mutex<Phase>>,
}

/// Why a foreground `ctr` was not started.
#[derive(Debug)]
pub enum LaunchError {
    /// A signal arrived during the setup: stop, undo, exit 128+N.
    Signalled(i32),
    /// The process could not be spawned.
    Spawn(std::io::Error),
}

fn set() -> SigSet {
    let mut s = SigSet::empty();
    for sig in FORWARDED {
        s.add(sig);
    }
    s
}

impl Forwarder {
    /// Blocks the forwarded signals and starts the thread that takes them. Call it before any
    /// other thread exists, so every thread inherits the mask. Without the thread (it could not
    /// start) the signals are left unblocked and keep their default effect.
    pub fn start() -> Forwarder {
        let fwd = Forwarder {
            phase: Arc::new(Mutex::new(Phase::Setup { pending: None })),
        };
        let set = set();
        if set.thread_block().is_err() {
            return fwd;
        }
        let phase = fwd.phase.clone();
        let spawned = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                let Ok(sig) = set.wait() else { continue };
                let sig = sig as i32;
                let mut p = crate::sys::lock(&phase);
                match &mut *p {
                    Phase::Setup { pending } => {
                        pending.get_or_insert(sig);
                    }
                    Phase::Running(Target::Ctr(pid)) => {
                        let _ = crate::sys::kill(*pid, sig);
                    }
                    Phase::Running(Target::Task { namespace, id }) => {
                        let sig = sig.to_string();
                        let _ = ctr::command(namespace, &["tasks", "kill", "--signal", &sig, id])
                            .stdin(Stdio::null())
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .status();
                    }
                    Phase::Done => {}
                }
            });
        if spawned.is_err() {
            let _ = set.thread_unblock();
        }
        fwd
    }

    /// The first signal received during the setup, if any.
    pub fn pending(&self) -> Option<i32> {
        match &*crate::sys::lock(&self.phase) {
            Phase::Setup { pending } => *pending,
            _ => None,
        }
    }

    /// Spawns the foreground ctr unless a signal is pending, and routes signals to it (to the
    /// task instead when `task` is given).
    pub fn launch(
        &self,
        spawn: impl FnOnce() -> std::io::Result<Child>,
        task: Option<Target>,
    ) -> Result<Child, LaunchError> {
        let mut p = crate::sys::lock(&self.phase);
        if let Phase::Setup { pending: Some(sig) } = &*p {
            return Err(LaunchError::Signalled(*sig));
        }
        let child = spawn().map_err(LaunchError::Spawn)?;
        *p = Phase::Running(task.unwrap_or(Target::Ctr(child.id() as i32)));
        Ok(child)
    }

    /// Waits for the launched child, stops forwarding before it is reaped (so no signal can hit
    /// a reused pid), then reaps it.
    pub fn wait(&self, child: &mut Child) -> std::io::Result<std::process::ExitStatus> {
        let pid = Pid::from_raw(child.id() as i32);
        loop {
            match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
                Err(nix::errno::Errno::EINTR) => continue,
                _ => break,
            }
        }
        *crate::sys::lock(&self.phase) = Phase::Done;
        child.wait()
    }

    /// Stops forwarding for good (signals from now on are ignored).
    pub fn finish(&self) {
        *crate::sys::lock(&self.phase) = Phase::Done;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn launch_refuses_after_a_pending_signal_and_routes_to_ctr_otherwise() {
        // Exercise the state machine without the thread (no signals are blocked in tests).
        let fwd = Forwarder {
            phase: Arc::new(Mutex::new(Phase::Setup { pending: None })),
        };
        assert_eq!(fwd.pending(), None);
        let mut child = fwd
            .launch(|| Command::new("true").spawn(), None)
            .expect("launch");
        assert!(matches!(
            &*crate::sys::lock(&fwd.phase),
            Phase::Running(Target::Ctr(pid)) if *pid == child.id() as i32
        ));
        assert!(fwd.wait(&mut child).unwrap().success());
        assert!(matches!(&*crate::sys::lock(&fwd.phase), Phase::Done));

        let fwd = Forwarder {
            phase: Arc::new(Mutex::new(Phase::Setup { pending: Some(15) })),
        };
        assert_eq!(fwd.pending(), Some(15));
        let r = fwd.launch(|| panic!("must not spawn"), None);
        assert!(matches!(r, Err(LaunchError::Signalled(15))));
    }
}
