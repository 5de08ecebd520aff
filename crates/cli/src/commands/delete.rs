//! `gatevm delete`

use crate::output::runtime;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Instance name.
    name: String,
    /// Stop the instance first if it is running.
    #[arg(short, long)]
    force: bool,
}

pub(crate) fn run(a: Args) -> anyhow::Result<i32> {
    let name = super::name_arg(&a.name)?;
    let saved = gatevm_instance::client::saved_config(name);
    runtime()?.block_on(gatevm_instance::client::delete(name, a.force))?;
    gatevm_instance::k3s::on_delete(name, saved.as_ref(), &mut super::k3s::show);
    eprintln!("deleted {name}");
    Ok(0)
}
