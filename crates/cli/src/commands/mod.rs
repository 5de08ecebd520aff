//! One module per subcommand.

pub(crate) mod container;
pub(crate) mod delete;
pub(crate) mod doctor;
pub(crate) mod env;
pub(crate) mod exec;
pub(crate) mod image;
pub(crate) mod k3s;
pub(crate) mod krun_vm;
pub(crate) mod list;
pub(crate) mod logs;
pub(crate) mod setup;
pub(crate) mod shell;
pub(crate) mod start;
pub(crate) mod status;
pub(crate) mod stop;
pub(crate) mod supervise;
pub(crate) mod vm_run;

use anyhow::{bail, Context};
use std::path::PathBuf;

/// The name used when a command is given none.
pub(crate) const DEFAULT_NAME: &str = "default";

/// The gatevm-guest binary: `$GATEVM_GUEST_BIN`, else `gatevm-guest` next to this executable.
pub(crate) fn guest_bin() -> anyhow::Result<PathBuf> {
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
pub(crate) fn name_arg(name: &str) -> anyhow::Result<&str> {
    Ok(gatevm_instance::name::validate(name)?)
}

pub(crate) use gatevm_instance::name::random_hex;
