//! The benchmark cases. Each runs its measurements `--runs` times (exec: `--exec-runs`; the
//! rootfs case's cold builds: `--rootfs-runs`) and returns a report section whose rows stand
//! beside a baseline measured in the same run.

pub mod boot;
pub mod exec;
pub mod import;
pub mod memory;
pub mod net;
pub mod rootfs;
pub mod volume;

use crate::gatevm::Gatevm;
use crate::host::{Machine, Qemu};
use crate::scratch::Scratch;
use crate::stats::{summarize, Summary};
use std::path::PathBuf;
use std::time::Duration;

/// What every case needs.
pub struct Bench<'a> {
    /// Repetitions of each measurement.
    pub runs: usize,
    /// Round trips of the exec case.
    pub exec_runs: usize,
    /// Size of the import case's archive.
    pub import_mib: u64,
    /// The host's `ctr` for the import case's row through the containerd socket, if any.
    pub host_ctr: Option<PathBuf>,
    /// Size of the volume case's file, MiB.
    pub volume_mib: u64,
    /// The ordinary user (`--user`) the volume case's shared directory belongs to when the tool
    /// runs as root.
    pub user_name: String,
    /// MiB sent per throughput measurement of the net case.
    pub net_mib: u64,
    /// Round trips per latency measurement of the net case.
    pub net_pings: usize,
    /// Cold builds of the rootfs case.
    pub rootfs_runs: usize,
    /// The gatevm binary on the benchmark's instance, run as root (the caller).
    pub gv: Gatevm<'a>,
    /// The same as an ordinary user (on that user's own instance `bench`), or why there is none.
    pub user: Result<Gatevm<'a>, String>,
    /// The report this run replaces (docs/benchmarks.md as it was), for earlier numbers to
    /// compare with.
    pub previous: Option<String>,
    /// Scratch space (the initramfs, the image archive, command output).
    pub scratch: &'a Scratch,
    /// The host.
    pub machine: Machine,
    /// gatevm's runtime directory.
    pub runtime: PathBuf,
    /// The bare boot's QEMU, or why there is none.
    pub qemu: Result<Qemu, String>,
    /// The backend the instance reported (`qemu/tcg`, ...), once known.
    pub backend: Option<String>,
    /// How long the exec case took to build the ssh test rootfs, when it built it in this run.
    pub ssh_rootfs_build: Option<Duration>,
    /// What the cases could not measure, for the report's last section.
    pub not_measured: Vec<String>,
}

/// The summary of samples that a loop of at least one run filled.
pub(crate) fn summary(samples: &[f64]) -> Summary {
    summarize(samples).unwrap_or(Summary {
        n: 0,
        min: f64::NAN,
        median: f64::NAN,
        max: f64::NAN,
        p50: f64::NAN,
        p95: f64::NAN,
    })
}
