//! `gatevm __supervise`: the detached supervisor process `start` launches.

use anyhow::Context;
use gatevm_instance::control::Progress;
use gatevm_instance::supervisor::{self, SuperviseOptions};
use std::io::Write;
use std::os::fd::FromRawFd;
use std::path::PathBuf;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The instance configuration as JSON.
    #[arg(long)]
    config_json: String,
    /// The guest agent binary.
    #[arg(long)]
    guest_bin: PathBuf,
    /// File descriptor to write progress events to (JSON lines), closed once ready or failed.
    #[arg(long)]
    progress_fd: Option<i32>,
}

impl Args {
    /// Opens the instance's capped supervisor log and points this process's stdout and stderr
    /// at it (they follow it across rotations). None when the configuration or the log cannot
    /// be read: the log then stays the file the starter opened.
    pub(crate) fn open_log(&self) -> Option<gatevm_instance::logcap::SharedLog> {
        use gatevm_instance::logcap::{CappedLog, SharedLog, HELPER_LOG_CAP};
        let config: gatevm_instance::config::InstanceConfig =
            serde_json::from_str(&self.config_json).ok()?;
        let paths = gatevm_instance::InstancePaths::new(&config.name);
        let mut log = CappedLog::open(&paths.log("supervisor"), HELPER_LOG_CAP).ok()?;
        log.follow_with_fd(1).ok()?;
        log.follow_with_fd(2).ok()?;
        Some(SharedLog::new(log))
    }
}

pub(crate) fn run(a: Args) -> anyhow::Result<i32> {
    let config = serde_json::from_str(&a.config_json).context("decoding --config-json")?;
    // Losing the starter (it was killed, or it stopped reading) must not kill us.
    // SAFETY: setting SIGPIPE to ignored has no preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let mut pipe = match a.progress_fd {
        // SAFETY: the starter passes this fd to us open and owned by nobody else in this process.
        Some(fd) if fd >= 3 => Some(unsafe { std::fs::File::from_raw_fd(fd) }),
        _ => None,
    };
    let progress = move |p: Progress| {
        tracing::info!("progress: {p:?}");
        let done = matches!(p, Progress::Ready { .. } | Progress::Failed { .. });
        if let Some(f) = pipe.as_mut() {
            if let Ok(line) = serde_json::to_string(&p) {
                let _ = writeln!(f, "{line}");
            }
        }
        if done {
            pipe = None;
        }
    };
    supervisor::run(
        SuperviseOptions {
            config,
            guest_bin: a.guest_bin,
            handle_signals: true,
        },
        Box::new(progress),
    )?;
    Ok(0)
}
