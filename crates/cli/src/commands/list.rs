//! `gatevm list`

use crate::output::{print_json, runtime};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Print a JSON array of status documents.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(a: Args) -> anyhow::Result<i32> {
    let mut all = runtime()?.block_on(gatevm_instance::client::list());
    all.iter_mut().for_each(crate::output::sanitize_status);
    if a.json {
        print_json(&all)?;
        return Ok(0);
    }
    println!(
        "{:<24} {:<10} {:<8} {:<10} {:<20} FORWARDS",
        "NAME", "STATE", "HEALTHY", "BACKEND", "ROLE"
    );
    for s in &all {
        let role = match (&s.role, &s.cluster_server) {
            (Some(_), Some(server)) => format!("agent of {server}"),
            (Some(r), None) => format!("k3s {r}"),
            _ => "-".into(),
        };
        println!(
            "{:<24} {:<10} {:<8} {:<10} {:<20} {}",
            s.name,
            s.state,
            if s.healthy { "yes" } else { "no" },
            s.backend.as_deref().unwrap_or("-"),
            role,
            s.forwards.join(",")
        );
    }
    Ok(0)
}
