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

pub use gatevm_instance::name::random_hex;
