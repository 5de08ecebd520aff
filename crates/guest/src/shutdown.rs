//! Orderly power-off of the guest (PID 1 only): stop the payloads (the last started first: k3s
//! before the containerd it uses), terminate everything else (containerd-shim processes k3s's
//! pods leave included), sync, unmount the state, power off.

use crate::disk::{CONTAINERD_DIR, STATE_DIR};
use crate::payload::Payload;
use crate::reaper::Reaper;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Time all other processes get between SIGTERM and SIGKILL.
pub(crate) const OTHERS_STOP_TIMEOUT: Duration = Duration::from_secs(2);

static STARTED: AtomicBool = AtomicBool::new(false);

/// Whether a shutdown is under way.
pub(crate) fn in_progress() -> bool {
    STARTED.load(Ordering::SeqCst)
}

/// Shuts the VM down; never returns. `payloads` are in start order and are stopped in reverse,
/// each with its own stop timeout. A second caller (say SIGTERM during a host-requested
/// shutdown) just waits for the first one to finish.
pub(crate) fn run(payloads: &[Arc<Payload>], reaper: &Reaper, why: &str) -> ! {
    if STARTED.swap(true, Ordering::SeqCst) {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    let t = Instant::now();
    if payloads.is_empty() {
        crate::glog!("shutdown ({why})");
    }
    for payload in payloads.iter().rev() {
        let cfg = payload.config();
        crate::glog!("shutdown ({why}): stopping {}", cfg.name);
        payload.stop(reaper, cfg.stop_timeout);
    }

    // SIGTERM to every process but PID 1 (and kernel threads).
    let _ = crate::sys::kill(-1, libc::SIGTERM);
    if !reaper.wait_no_children(OTHERS_STOP_TIMEOUT) {
        let _ = crate::sys::kill(-1, libc::SIGKILL);
        reaper.wait_no_children(Duration::from_secs(1));
    }
    nix::unistd::sync();
    crate::mounts::unmount_for_shutdown(&[CONTAINERD_DIR, STATE_DIR]);
    nix::unistd::sync();
    crate::glog!("powering off after {}ms", t.elapsed().as_millis());
    crate::sys::power_off()
}
