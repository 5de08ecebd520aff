//! `container rm`: stop (with `--force`) and delete a container, its snapshot, its network
//! attachment, namespace, state and log.

use super::args;
use super::network;
use super::{ctr, error, print, Failure};
use crate::log::error_chain;
use std::time::{Duration, Instant};

/// How long `--force` waits for a killed task to stop.
pub(crate) const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Deletes a container of `ns` (its task first; a running task only when `force`, with
/// SIGKILL). Exit code 1 on failure.
pub(crate) fn remove_container(ns: &str, name: &str, force: bool) -> Result<(), Failure> {
    let fail = |m: String| Failure::new(1, m);
    let ctr_fail = |e: ctr::CtrError| fail(error_chain(&e));
    if let Some(task) = ctr::task(ns, name).map_err(ctr_fail)? {
        if task.is_running() {
            if !force {
                return Err(fail(format!(
                    "container {name} is running: stop it or use --force"
                )));
            }
            if matches!(task.status.as_str(), "paused" | "pausing") {
                // A frozen task cannot die until it is thawed.
                let _ = ctr::output(ns, &["tasks", "resume", name]);
            }
            let killed = ctr::output(ns, &["tasks", "kill", "--signal", "SIGKILL", name]);
            let deadline = Instant::now() + STOP_TIMEOUT;
            loop {
                match ctr::task(ns, name) {
                    Ok(Some(t)) if t.is_running() => {}
                    Ok(_) => break,
                    Err(e) => return Err(ctr_fail(e)),
                }
                if Instant::now() >= deadline {
                    let why = killed
                        .err()
                        .map(|e| format!(": {}", error_chain(&e)))
                        .unwrap_or_default();
                    return Err(fail(format!(
                        "container {name} did not stop within {} s{why}",
                        STOP_TIMEOUT.as_secs()
                    )));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        if ctr::task(ns, name).map_err(ctr_fail)?.is_some() {
            ctr::output(ns, &["tasks", "delete", name]).map_err(|e| {
                fail(format!(
                    "cannot delete the task of {name}: {}",
                    error_chain(&e)
                ))
            })?;
        }
    }
    ctr::output(ns, &["containers", "delete", name]).map_err(|e| {
        fail(format!(
            "cannot delete container {name}: {}",
            error_chain(&e)
        ))
    })?;
    Ok(())
}

/// `gatevm-guest container rm ARGS…`.
pub(crate) fn main(argv: &[String]) -> i32 {
    let o = match args::parse_rm(argv) {
        Ok(o) => o,
        Err(e) => return Failure::new(2, error_chain(&e)).report(),
    };
    match rm(&o) {
        Ok(()) => {
            print(&format!("{}\n", o.name));
            0
        }
        Err(f) => f.report(),
    }
}

fn rm(o: &args::RmOpts) -> Result<(), Failure> {
    let (ns, name) = (o.namespace.as_str(), o.name.as_str());
    ctr::check_running().map_err(|e| Failure::new(1, error_chain(&e)))?;
    let known = ctr::container_ids(ns)
        .map_err(|e| Failure::new(1, error_chain(&e)))?
        .iter()
        .any(|c| c == name);
    // The network of this name is ours to undo unless another namespace or a live foreground
    // run (which undoes it itself when its container ends) owns it.
    let owned_elsewhere = matches!(
        network::load(name),
        Ok(Some(st)) if st.namespace != ns || network::owner_alive(st.owner_pid)
    );
    let ours = !owned_elsewhere && network::exists(name);
    if !known {
        if ours {
            // Left over by a run that did not finish: only the network is left to undo.
            for p in network::teardown(name) {
                error(&format!("cleanup: {p}"));
            }
            return Ok(());
        }
        return Err(Failure::new(1, format!("no container \"{name}\"")));
    }
    remove_container(ns, name, o.force)?;
    if ours {
        for p in network::teardown(name) {
            error(&format!("cleanup: {p}"));
        }
    }
    let _ = std::fs::remove_file(network::log_path(name));
    Ok(())
}
