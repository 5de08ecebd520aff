//! `gatevm status`

use crate::output::{print_json, runtime, secs};
use gatevm_instance::InstanceStatus;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Instance name.
    #[arg(default_value = super::DEFAULT_NAME)]
    name: String,
    /// Print the status document as JSON (schema in the README).
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(a: Args) -> anyhow::Result<i32> {
    let name = super::name_arg(&a.name)?;
    let mut st = runtime()?.block_on(gatevm_instance::k3s::status_with_health(name))?;
    crate::output::sanitize_status(&mut st);
    if a.json {
        print_json(&st)?;
    } else {
        print_human(&st);
    }
    Ok(0)
}

/// The human form of a status.
pub(crate) fn print_human(st: &InstanceStatus) {
    let health = if st.healthy { " (healthy)" } else { "" };
    println!("name:       {}", st.name);
    println!("state:      {}{health}", st.state);
    if let Some(b) = &st.backend {
        println!("backend:    {b}, network {}", st.net);
    }
    if let Some(n) = &st.backend_note {
        println!("            {n}");
    }
    println!("resources:  {} CPUs, {} MiB", st.cpus, st.memory_mib);
    if !st.forwards.is_empty() {
        println!("forwards:   {}", st.forwards.join(", "));
    }
    for v in &st.volumes {
        println!("volume:     {v}");
    }
    for r in &st.registries {
        let mut what: Vec<String> = r.mirrors.iter().map(|m| format!("mirror {m}")).collect();
        if r.insecure {
            what.push("insecure (plain HTTP or unchecked TLS)".into());
        }
        println!("registry:   {}: {}", r.host, what.join(", "));
    }
    if !st.proxy_env.is_empty() {
        println!("proxy:      {} (from --proxy-env)", st.proxy_env.join(", "));
    }
    if let Some(sock) = &st.containerd_socket {
        println!(
            "containerd: {sock} (`eval \"$(gatevm env {})\"`, then `ctr`)",
            st.name
        );
    }
    if let Some(k) = st.k3s.as_ref().filter(|k| k.server.is_some()) {
        println!(
            "k3s:        {} agent of {} (node {}{})",
            k.version,
            k.server.as_deref().unwrap_or("?"),
            if k.node_ready { "Ready" } else { "not Ready" },
            k.detail
                .as_deref()
                .map(|d| format!("; {d}"))
                .unwrap_or_default()
        );
    } else if let Some(k) = &st.k3s {
        println!(
            "k3s:        {} on https://127.0.0.1:{} (API {}, node {}{})",
            k.version,
            k.api_port,
            if k.api_ready { "ready" } else { "not ready" },
            if k.node_ready { "Ready" } else { "not Ready" },
            k.detail
                .as_deref()
                .map(|d| format!("; {d}"))
                .unwrap_or_default()
        );
        for l in &k.images {
            println!("airgap:     {l}");
        }
        for l in &k.datastore {
            println!("datastore:  {l}");
        }
        if !k.user_args.is_empty() {
            println!("k3s args:   {} (--k3s-arg)", k.user_args.join(" "));
        }
        if let Some(g) = &k.gateway {
            println!(
                "gateway:    {} -> guest port {} ({}{})",
                g.endpoint,
                g.guest_port,
                if g.tls_ready {
                    "TLS ok, signed by the instance's CA"
                } else {
                    "TLS not ready"
                },
                g.detail
                    .as_deref()
                    .map(|d| format!("; {d}"))
                    .unwrap_or_default()
            );
        }
    }
    if st.state != "stopped" {
        if let Some(p) = st.supervisor_pid {
            println!("supervisor: pid {p}");
        }
        if st.agent.connected {
            let answer = if st.agent.responding {
                ""
            } else {
                ", NOT RESPONDING"
            };
            println!(
                "agent:      {} (kernel {}, up {}{answer})",
                st.agent.version.as_deref().unwrap_or("?"),
                st.agent.kernel.as_deref().unwrap_or("?"),
                st.agent.uptime_ms.map(secs).unwrap_or_default()
            );
        } else {
            println!("agent:      not connected");
        }
        for p in &st.payloads {
            println!(
                "payload:    {} {:?} (restarts {})",
                p.name, p.state, p.restarts
            );
        }
        if let (Some(a), Some(r)) = (st.agent_ready_ms, st.ready_ms) {
            println!("boot:       agent {}, ready {}", secs(a), secs(r));
        }
    }
    if let Some(r) = &st.stop_reason {
        println!("last stop:  {r}");
    }
    if let Some(e) = &st.last_error {
        println!("error:      {e}");
    }
    println!("logs:       {}", st.logs);
}
