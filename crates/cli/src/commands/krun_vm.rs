//! `gatevm __krun-vm`: the process that becomes a libkrun VM.
//!
//! The supervisor starts it with the VM's libkrun configuration as JSON; it configures libkrun,
//! confines itself (its own mount namespace holding only what the VM needs, capabilities
//! dropped: `gatevm_vmm::confine`) and calls `krun_start_enter`, which on success never returns:
//! libkrun exits the process with the guest's exit code when the guest shuts down. Anything that comes back is a failure, reported on
//! stderr (the instance's vmm log) with the libkrun call and errno.

use anyhow::Context;
use gatevm_instance::vmm::krun::{run_vm, KrunConfig};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The libkrun configuration ([`KrunConfig`] as JSON).
    #[arg(long)]
    config_json: String,
}

pub(crate) fn run(a: Args) -> anyhow::Result<i32> {
    let cfg: KrunConfig =
        serde_json::from_str(&a.config_json).context("reading the libkrun configuration")?;
    let err = run_vm(&cfg);
    Err(anyhow::Error::new(err).context("the libkrun VM did not start"))
}
