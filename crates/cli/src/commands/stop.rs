//! `gatevm stop`

use crate::output::runtime;
use std::time::Duration;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Instance name.
    #[arg(default_value = super::DEFAULT_NAME)]
    name: String,
    /// Seconds to wait for a graceful shutdown before forcing the VM off.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=3600))]
    timeout: u64,
}

pub(crate) fn run(a: Args) -> anyhow::Result<i32> {
    let name = super::name_arg(&a.name)?;
    runtime()?.block_on(gatevm_instance::client::stop(
        name,
        Duration::from_secs(a.timeout),
    ))?;
    eprintln!("stopped {name}");
    Ok(0)
}
