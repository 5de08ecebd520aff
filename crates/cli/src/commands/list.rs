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
        "{:<24} {:<10} {:<8} {:<10} FORWARDS",
        "NAME", "STATE", "HEALTHY", "BACKEND"
    );
    for s in &all {
        println!(
            "{:<24} {:<10} {:<8} {:<10} {}",
            s.name,
            s.state,
            if s.healthy { "yes" } else { "no" },
            s.backend.as_deref().unwrap_or("-"),
            s.forwards.join(",")
        );
    }
    Ok(0)
}
