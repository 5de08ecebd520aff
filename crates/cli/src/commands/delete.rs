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
    let k3s = saved.as_ref().and_then(|c| c.k3s.as_ref());
    if k3s.is_some_and(|k| k.join.is_none()) {
        let agents = gatevm_instance::k3s::agents_of(name);
        if !agents.is_empty() {
            if !a.force {
                anyhow::bail!(
                    "{name:?} is the server of a cluster with agents {}: delete them first (--force deletes the server anyway and leaves them without one)",
                    agents.join(", ")
                );
            }
            eprintln!(
                "gatevm: warning: deleting the server of {}; they stay, without a server",
                agents.join(", ")
            );
        }
    }
    // An agent leaves its cluster first (drained, its node deleted), unless the delete is
    // refused anyway (running, without --force).
    let running = gatevm_instance::client::is_running(&gatevm_instance::InstancePaths::new(name));
    if a.force || !running {
        gatevm_instance::k3s::leave_cluster(name, saved.as_ref(), &mut super::k3s::show);
    }
    runtime()?.block_on(gatevm_instance::client::delete(name, a.force))?;
    gatevm_instance::k3s::on_delete(name, saved.as_ref(), &mut super::k3s::show);
    eprintln!("deleted {name}");
    Ok(0)
}
