//! One module per subcommand.

pub mod container;
pub mod delete;
pub mod doctor;
pub mod exec;
pub mod image;
pub mod k3s;
pub mod krun_vm;
pub mod list;
pub mod logs;
pub mod setup;
pub mod shell;
pub mod start;
pub mod status;
pub mod stop;
pub mod supervise;
pub mod vm_run;

use anyhow::{bail, Context};
use std::path::PathBuf;

/// The name used when a command is given none.
pub const DEFAULT_NAME: &str = "default";

/// The gatevm-guest binary: `$GATEVM_GUEST_BIN`, else `gatevm-guest` next to this executable.
pub fn guest_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("GATEVM_GUEST_BIN") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!(
                "GATEVM_GUEST_BIN names {}, which is not a file",
                p.display()
            );
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("locating the gatevm executable")?;
    let p = exe.with_file_name("gatevm-guest");
    if !p.is_file() {
        bail!(
            "the guest agent binary is missing: expected {} (build it with scripts/build.sh or set GATEVM_GUEST_BIN)",
            p.display()
        );
    }
    Ok(p)
}

/// Checks a name from the command line.
pub fn name_arg(name: &str) -> anyhow::Result<&str> {
    Ok(gatevm_instance::name::validate(name)?)
}

/// Fails naming the first forward whose host port is taken.
pub fn check_ports_free(forwards: &[gatevm_net::Forward]) -> anyhow::Result<()> {
    for f in forwards {
        gatevm_net::forward::check_host_port_free(f).map_err(|e| {
            anyhow::anyhow!(
                "host port {} ({}) is not available: {e}",
                f.host_addr(),
                f.proto
            )
        })?;
    }
    Ok(())
}

/// `n` random bytes as hex, for generated names (the clock's nanoseconds if getrandom fails).
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let got = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if got != b.len() as isize {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            ^ u128::from(std::process::id());
        for (i, x) in b.iter_mut().enumerate() {
            *x = (t >> ((i % 16) * 8)) as u8;
        }
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}
