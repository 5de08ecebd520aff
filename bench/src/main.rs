//! `gatevm-bench`: runs gatevm's benchmarks beside their baselines and writes docs/benchmarks.md.

use clap::Parser;
use gatevm_bench::{runner, Case, Options};
use std::path::{Path, PathBuf};

/// Benchmarks of gatevm, each beside a baseline measured in the same run: boot (bare QEMU boot of
/// the same kernel), exec round trip (ssh into the same VM), host memory (guest RAM configured),
/// image import (host-side copy; the host's `ctr` through the containerd socket beside it),
/// shared-directory throughput (the same writes and reads on the host), port-forward throughput
/// and latency (QEMU user networking), rootfs build (minbase mmdebstrap). Uses, and deletes at
/// the end, instances named `bench`, `bench-vol` and `benchnet` and a `gatevm vm-run` VM; caches
/// the ssh test rootfs in ~/.cache/gatevm-bench ($GATEVM_BENCH_CACHE_DIR).
#[derive(Parser)]
#[command(
    name = "gatevm-bench",
    version,
    after_help = "Exit codes: 0 ok (missed targets are reported, not failures), 1 a command failed or timed out, 2 usage, 130 interrupted."
)]
struct Args {
    /// Cases to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "boot,exec,memory,import,volume,net,rootfs"
    )]
    only: Vec<Case>,
    /// Repetitions of each case.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000))]
    runs: u64,
    /// Round trips of the exec case.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    exec_runs: u64,
    /// Size of the import case's image archive, MiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    import_mib: u64,
    /// The host's `ctr` (containerd's client; scripts/host-ctr.sh prints one) for the import
    /// case's row that imports the same archive through the instance's containerd socket
    /// [default: none, the row is left out].
    #[arg(long, value_name = "PATH")]
    host_ctr: Option<PathBuf>,
    /// Size of the file the volume case writes and reads through the shared directory, MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    volume_mib: u64,
    /// MiB sent from the host into the guest per throughput measurement of the net case.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    net_mib: u64,
    /// One-byte round trips per latency measurement of the net case.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    net_pings: u64,
    /// Cold builds (and minbase baselines) of the rootfs case: each downloads every package.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100))]
    rootfs_runs: u64,
    /// Where to write the report [default: docs/benchmarks.md of the repository].
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// The ordinary user the boot and memory cases also run gatevm as (through runuser, in that
    /// user's own data directory), and whom the volume case's shared directory belongs to (as
    /// root, gatevm refuses a writable share of a root-owned directory); the tool must run as
    /// root for it.
    #[arg(long, value_name = "USER", default_value = "gatevm-ci")]
    user: String,
    /// The gatevm binary [default: target/release/gatevm of the repository].
    #[arg(long, value_name = "PATH")]
    gatevm: Option<PathBuf>,
}

fn main() {
    let a = Args::parse();
    // The repository is the bench crate's parent directory.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new(".."))
        .to_path_buf();
    let command = std::iter::once("gatevm-bench".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let o = Options {
        gatevm: a
            .gatevm
            .unwrap_or_else(|| repo.join("target/release/gatevm")),
        runs: a.runs as usize,
        exec_runs: a.exec_runs as usize,
        import_mib: a.import_mib,
        host_ctr: a.host_ctr,
        volume_mib: a.volume_mib,
        net_mib: a.net_mib,
        net_pings: a.net_pings as usize,
        rootfs_runs: a.rootfs_runs as usize,
        out: a.out.unwrap_or_else(|| repo.join("docs/benchmarks.md")),
        cases: a.only,
        user: a.user,
        repo,
        command,
    };
    runner::install_signal_handlers();
    if let Err(e) = gatevm_bench::run(&o) {
        eprintln!("gatevm-bench: {e:#}");
        std::process::exit(if runner::interrupted() { 130 } else { 1 });
    }
}
