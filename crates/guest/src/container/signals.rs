//! Forwarding SIGINT, SIGTERM and SIGHUP to the foreground container.
//!
//! The agent delivers the host's signals to this process. They are blocked in every thread and
//! taken by one thread with `sigwait`: while the container is being set up they are only
//! remembered (the setup stops at the next step and undoes itself), while `ctr` runs they are
//! passed on, and once it has exited they are ignored so the cleanup always finishes.
//!
//! Without a terminal `ctr tasks start` proxies signals to the task itself, so they go to the ctr
//! process. With `--tty` ctr does not proxy anything (the terminal is expected to carry ^C), so
//! they are sent to the task with `ctr tasks kill`. A container's init that ignores them (a plain
//! `sleep` as PID 1 does) would keep the run going forever, so the third forwarded signal kills
//! the task with SIGKILL.

use super::ctr;
use crate::cni::run_captured;
use crate::reaper::{Reaper, Spawned};
use gatevm_abi::ExitStatus;
use nix::sys::signal::{SigSet, Signal};
use std::sync::{Arc, Mutex};

/// The signals that are forwarded.
pub(crate) const FORWARDED: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

/// The forwarded signal from which on the task is killed instead.
pub(crate) const KILL_AFTER: u32 = 3;

/// The foreground container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// Pid of the attached `ctr tasks start`.
    pub ctr_pid: i32,
    /// containerd namespace.
    pub namespace: String,
    /// Container id.
    pub id: String,
    /// Signal the task with `ctr tasks kill` (terminal mode) rather than the ctr process.
    pub via_task: bool,
}

/// What to do with the `nth` forwarded signal (counting from 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Send it to the ctr process.
    SignalCtr(i32),
    /// Send it to the task with `ctr tasks kill`.
    SignalTask(i32),
    /// Kill the task with SIGKILL.
    KillTask,
}

/// Decides how the `nth` signal reaches the container.
pub(crate) fn action(target: &Target, sig: i32, nth: u32) -> Action {
    if nth >= KILL_AFTER {
        Action::KillTask
    } else if target.via_task {
        Action::SignalTask(sig)
    } else {
        Action::SignalCtr(sig)
    }
}

#[derive(Debug)]
enum Phase {
    Setup { pending: Option<i32> },
    Running { target: Target, count: u32 },
    Done,
}

/// The forwarding thread's shared state.
#[derive(Debug, Clone)]
pub(crate) struct Forwarder {
    phase: Arc<Mutex<Phase>>,
}

/// Why a foreground `ctr` was not started.
#[derive(Debug)]
pub(crate) enum LaunchError {
    /// A signal arrived during the setup: stop, undo, exit 128+N.
    Signalled(i32),
    /// The process could not be spawned.
    Spawn(std::io::Error),
}

fn task_kill(namespace: &str, id: &str, sig: &str) {
    let mut kill = ctr::command(namespace, &["tasks", "kill", "--signal", sig, id]);
    let _ = run_captured(&mut kill, None);
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
    pub(crate) fn start() -> Forwarder {
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
                    Phase::Running { target, count } => {
                        *count += 1;
                        match action(target, sig, *count) {
                            // Only while the reaper has not reaped it: never a recycled pid.
                            Action::SignalCtr(s) => {
                                Reaper::global().signal(target.ctr_pid, s, false);
                            }
                            Action::SignalTask(s) => {
                                task_kill(&target.namespace, &target.id, &s.to_string())
                            }
                            Action::KillTask => task_kill(&target.namespace, &target.id, "SIGKILL"),
                        }
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
    pub(crate) fn pending(&self) -> Option<i32> {
        match &*crate::sys::lock(&self.phase) {
            Phase::Setup { pending } => *pending,
            _ => None,
        }
    }

    /// Spawns the foreground ctr unless a signal is pending, and routes signals to container
    /// `id` of `namespace` (through the task when `via_task`).
    pub(crate) fn launch(
        &self,
        spawn: impl FnOnce() -> std::io::Result<Spawned>,
        namespace: &str,
        id: &str,
        via_task: bool,
    ) -> Result<Spawned, LaunchError> {
        let mut p = crate::sys::lock(&self.phase);
        if let Phase::Setup { pending: Some(sig) } = &*p {
            return Err(LaunchError::Signalled(*sig));
        }
        let child = spawn().map_err(LaunchError::Spawn)?;
        *p = Phase::Running {
            target: Target {
                ctr_pid: child.pid,
                namespace: namespace.into(),
                id: id.into(),
                via_task,
            },
            count: 0,
        };
        Ok(child)
    }

    /// Waits for the launched child; signals that arrive afterwards are ignored.
    pub(crate) fn wait(&self, child: &Spawned) -> Option<ExitStatus> {
        let status = child.exit.recv().ok();
        *crate::sys::lock(&self.phase) = Phase::Done;
        status
    }

    /// Stops forwarding for good (signals from now on are ignored).
    pub(crate) fn finish(&self) {
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
        let child = fwd
            .launch(
                || Reaper::global().spawn(&mut Command::new("true")),
                "default",
                "web",
                false,
            )
            .expect("launch");
        assert!(matches!(
            &*crate::sys::lock(&fwd.phase),
            Phase::Running { target, count: 0 } if target.ctr_pid == child.pid && target.id == "web"
        ));
        assert_eq!(fwd.wait(&child).and_then(|s| s.code), Some(0));
        assert!(matches!(&*crate::sys::lock(&fwd.phase), Phase::Done));

        let fwd = Forwarder {
            phase: Arc::new(Mutex::new(Phase::Setup { pending: Some(15) })),
        };
        assert_eq!(fwd.pending(), Some(15));
        let r = fwd.launch(|| panic!("must not spawn"), "default", "web", false);
        assert!(matches!(r, Err(LaunchError::Signalled(15))));
    }

    #[test]
    fn signals_reach_ctr_or_the_task_and_the_third_kills() {
        let mut t = Target {
            ctr_pid: 42,
            namespace: "default".into(),
            id: "web".into(),
            via_task: false,
        };
        assert_eq!(action(&t, 15, 1), Action::SignalCtr(15));
        assert_eq!(action(&t, 2, 2), Action::SignalCtr(2));
        assert_eq!(action(&t, 2, 3), Action::KillTask);
        t.via_task = true;
        assert_eq!(action(&t, 1, 1), Action::SignalTask(1));
        assert_eq!(action(&t, 15, 4), Action::KillTask);
    }
}
