//! The guest side of gatevm: one static binary that is both the initramfs `/init` (stage 1) and
//! PID 1 of the real root (stage 2), where it mounts the API filesystems, loads modules, configures
//! the network and the state disk, reaps orphans, supervises the payload (containerd, or
//! containerd and then k3s: see [`profile`]) and serves the host's agent protocol
//! ([`gatevm_abi`]) on a virtio-serial port or a vsock port.
//!
//! Everything that can be exercised without a VM (command line parsing, module loading plans,
//! `PATH` lookup, the agent conversation with real child processes) is a plain library function
//! with unit tests; the PID 1 sequencing lives in [`pid1`] and [`stage1`].

pub(crate) mod agent;
pub(crate) mod blockdev;
pub(crate) mod cmdline;
pub(crate) mod cni;
pub(crate) mod container;
pub(crate) mod disk;
pub(crate) mod exec;
pub(crate) mod fsutil;
pub(crate) mod log;
pub(crate) mod modules;
pub(crate) mod mounts;
pub(crate) mod net;
pub(crate) mod payload;
pub(crate) mod pid1;
pub(crate) mod profile;
pub(crate) mod reaper;
pub(crate) mod relay;
pub(crate) mod session;
pub(crate) mod settings;
pub(crate) mod shutdown;
pub(crate) mod stage1;
pub(crate) mod sys;
pub(crate) mod toml;

use std::path::Path;

/// Version of this crate, reported in `--version` and in the agent's hello.
pub(crate) const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Marker file that exists only in gatevm's initramfs.
pub(crate) const INITRAMFS_MARKER: &str = gatevm_abi::paths::INITRAMFS_MARKER;

/// Where the host installs this same binary in the instance root; stage 1 executes it.
pub(crate) const STAGE2_PATH: &str = gatevm_abi::paths::GUEST_AGENT;

/// Software string of the agent's hello, e.g. `gatevm-guest 0.1.0`.
pub(crate) fn software() -> String {
    format!("gatevm-guest {VERSION}")
}

/// Entry point of the binary; returns the exit code when not running as PID 1.
///
/// As PID 1 it picks stage 1 when [`INITRAMFS_MARKER`] exists and stage 2 otherwise; neither
/// returns. Run as an ordinary process it answers `--version` and the `container` commands (see
/// [`container`]; the host runs them through the agent) and otherwise prints a usage error (exit
/// 2): it never does PID 1 work outside PID 1.
pub fn main_entry() -> i32 {
    if std::process::id() == 1 {
        if Path::new(INITRAMFS_MARKER).exists() {
            stage1::run();
        }
        pid1::run();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--version") | Some("-V") if args.len() == 1 => {
            println!("{}", software());
            0
        }
        Some("container") => container::main(&args[1..]),
        Some("relay") => relay::main(&args[1..]),
        _ => {
            eprintln!(
                "gatevm-guest: usage: gatevm-guest --version | gatevm-guest container run|ps|rm ... | gatevm-guest relay SOCKET (otherwise it only runs as PID 1 of a gatevm VM)"
            );
            2
        }
    }
}
