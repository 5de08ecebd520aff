//! The state file (`state.json`) and what is read from it: reading and writing it, clearing up
//! after a run that left processes and mounts behind, and the process and phase parts of status.
//! This is what other modules (the client) use of the supervisor's records.

use super::children::signal;
use super::mounts::unmount_rootfs;
use crate::control::ProcessReport;
use crate::paths::{write_atomic, InstancePaths};
use crate::state::{Phase, StateFile};
use gatevm_net::loopback;
use std::path::Path;

/// Reads the state file; a missing or corrupt one reads as None.
pub fn read_state(paths: &InstancePaths) -> Option<StateFile> {
    let bytes = std::fs::read(paths.state()).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(
                "ignoring corrupt state file {}: {e}",
                paths.state().display()
            );
            None
        }
    }
}

/// Reads the state file without a word about a corrupt one (it reads as None).
pub(crate) fn read_state_quietly(paths: &InstancePaths) -> Option<StateFile> {
    std::fs::read(paths.state())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// Writes the state file (atomically); a failure is logged.
pub(crate) fn write_state(paths: &InstancePaths, s: &StateFile) {
    match serde_json::to_vec_pretty(s) {
        Ok(b) => {
            if let Err(e) = write_atomic(&paths.state(), &b) {
                tracing::error!("writing {}: {e}", paths.state().display());
            }
        }
        Err(e) => tracing::error!("encoding state: {e}"),
    }
}

/// Records `st` as the state of an instance whose processes are gone: no supervisor, VMM or
/// helpers.
pub(crate) fn record_without_processes(
    paths: &InstancePaths,
    st: &StateFile,
) -> std::io::Result<()> {
    let mut rec = st.clone();
    rec.supervisor = None;
    rec.vmm = None;
    rec.helpers.clear();
    let b = serde_json::to_vec_pretty(&rec).map_err(std::io::Error::other)?;
    write_atomic(&paths.state(), &b)
}

/// Clears what a crashed run may have left: processes recorded in the state file (checked by
/// start time, so a recycled pid is never killed), the rootfs mount and the sockets.
pub fn recover_stale(paths: &InstancePaths) {
    if let Some(old) = read_state(paths) {
        let recorded = old
            .vmm
            .into_iter()
            .chain(old.helpers.iter().map(|(_, p)| *p));
        for p in recorded {
            if p.alive() {
                tracing::warn!("killing leftover process {} of a previous run", p.pid);
                signal(p.pid, libc::SIGKILL);
            }
        }
    }
    unmount_rootfs(paths);
    clear_run_dir(paths);
    loopback::remove_stale(&paths.name);
}

/// Makes every socket in the instance's runtime directory owner-only (0600). The directory is
/// 0700 already; this keeps the sockets private even if it is not.
pub(crate) fn restrict_sockets(run: &Path) {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    for e in std::fs::read_dir(run).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_socket()) {
            let _ = std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o600));
        }
    }
}

/// Removes everything in the instance's runtime directory (sockets, FIFOs).
pub(crate) fn clear_run_dir(paths: &InstancePaths) {
    if let Ok(rd) = std::fs::read_dir(&paths.run) {
        for e in rd.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The running processes of the instance and their confinement, for status.
pub(crate) fn process_reports(s: &StateFile) -> Vec<ProcessReport> {
    let named = s
        .supervisor
        .map(|p| ("supervisor".to_string(), p))
        .into_iter()
        .chain(s.vmm.map(|p| ("vmm".to_string(), p)))
        .chain(s.helpers.iter().cloned());
    named
        .filter(|(_, p)| p.alive())
        .map(|(role, p)| ProcessReport {
            confinement: gatevm_vmm::confinement(p.pid).ok(),
            policy: s
                .policies
                .iter()
                .find(|(r, _)| *r == role)
                .map(|(_, d)| d.clone()),
            role,
            pid: p.pid,
        })
        .collect()
}

/// The name of a phase in status documents.
pub fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Starting => "starting",
        Phase::Running => "running",
        Phase::Stopping => "stopping",
        Phase::Stopped => "stopped",
    }
}
