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

/// Variables that place gatevm's files; each, when set and not empty, must be an absolute path.
pub const DIR_VARS: &[&str] = &[
    "GATEVM_DATA_DIR",
    "GATEVM_RUNTIME_DIR",
    "GATEVM_CACHE_DIR",
    "GATEVM_RUN_DIR",
];

/// Checks the environment that places gatevm's files before a command reads or writes any:
/// a `GATEVM_*_DIR` override that is set must be an absolute path that is a directory or does not
/// exist yet (the library would otherwise ignore a relative one and use the default), and the
/// data directory must be found (`$HOME` unset is refused here rather than falling back to a
/// system-wide directory).
pub fn check_env() -> anyhow::Result<()> {
    for &var in DIR_VARS {
        let Some(value) = std::env::var_os(var).filter(|v| !v.is_empty()) else {
            continue;
        };
        let p = PathBuf::from(value);
        if !p.is_absolute() {
            bail!(
                "{var}={} is not an absolute path: give the full path (or unset it)",
                p.display()
            );
        }
        check_dir(&p).map_err(|why| anyhow::anyhow!("{var}={} {why}", p.display()))?;
        // Another user's directory is refused (root included: `sudo -E` passes them on).
        gatevm_runtime::dirs::env_dir(var)?;
    }
    let data = gatevm_runtime::dirs::data_dir()?;
    check_dir(&data)
        .map_err(|why| anyhow::anyhow!("the data directory {} {why}", data.display()))?;
    Ok(())
}

/// Whether `p` can be a directory of gatevm's: it is one (through symlinks) or does not exist.
/// The error completes a sentence that starts with the path.
fn check_dir(p: &std::path::Path) -> Result<(), String> {
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err("is not a directory".into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot be used: {e}")),
    }
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

pub use gatevm_instance::name::random_hex;
