//! The k3s profile's health, asked of the guest's k3s (and of the gateway port) at status time.

use crate::capture::{capture, Limits};
use crate::client::ClientError;
use crate::config::{GatewayPort, K3sSettings};
use crate::control::{GatewayHealth, InstanceStatus, K3sHealth};
use crate::paths::InstancePaths;
use gatevm_k3s::pki;
use std::time::Duration;

/// Bounds on each probe of the k3s health check (`k3s kubectl` starts slowly under software
/// emulation).
const PROBE: Limits = Limits {
    timeout: Duration::from_secs(30),
    max_stdout: 64 << 10,
    max_stderr: 64 << 10,
};

/// An error and its causes on one line; a cause whose text the line already holds is not
/// repeated.
fn error_line(e: &dyn std::error::Error) -> String {
    let mut line = String::new();
    let mut next = Some(e);
    while let Some(cause) = next {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        next = cause.source();
    }
    line
}

/// Asks the guest's k3s whether its API server is ready (`/readyz`) and its node is Ready and,
/// with `gateway`, whether the gateway port accepts TLS signed by the instance's CA. An agent
/// node has no API server of its own: its server's is asked, about this node.
pub async fn k3s_health(name: &str, s: &K3sSettings, gateway: bool) -> K3sHealth {
    let mut h = K3sHealth {
        version: s.version.clone(),
        api_port: s.api_port,
        user_args: s.user_args.clone(),
        server: s.join.as_ref().map(|j| j.server.clone()),
        ..Default::default()
    };
    let asker = s.join.as_ref().map_or(name, |j| j.server.as_str());
    let readyz = capture::<tokio::io::Empty>(
        asker,
        &[
            gatevm_abi::paths::K3S_BIN,
            "kubectl",
            "get",
            "--raw=/readyz",
        ],
        None,
        PROBE,
    )
    .await;
    match readyz {
        Ok(o) if o.code == 0 && o.stdout.trim() == "ok" => h.api_ready = true,
        Ok(o) => h.detail = Some(format!("/readyz: {}", o.error_line())),
        Err(e) => h.detail = Some(format!("/readyz: {}", error_line(&e))),
    }
    if h.api_ready {
        let node = capture::<tokio::io::Empty>(
            asker,
            &[
                gatevm_abi::paths::K3S_BIN,
                "kubectl",
                "get",
                "node",
                name,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ],
            None,
            PROBE,
        )
        .await;
        match node {
            Ok(o) if o.code == 0 && o.stdout.split_whitespace().any(|w| w == "True") => {
                h.node_ready = true
            }
            Ok(o) if o.code == 0 => h.detail = Some("the node is not Ready yet".into()),
            Ok(o) => h.detail = Some(format!("nodes: {}", o.error_line())),
            Err(e) => h.detail = Some(format!("nodes: {}", error_line(&e))),
        }
    }
    if let (true, Some(g)) = (gateway, s.gateway) {
        h.gateway = Some(gateway_health(name, s, g).await);
    }
    h
}

/// The TLS check of the gateway port, from the host through the forward.
async fn gateway_health(name: &str, s: &K3sSettings, g: GatewayPort) -> GatewayHealth {
    let mut gh = GatewayHealth {
        endpoint: format!("https://127.0.0.1:{}", g.host_port),
        guest_port: g.guest_port,
        ..Default::default()
    };
    let dir = InstancePaths::new(name).dir.join("pki");
    let opts = crate::k3s::stage::pki_options(name, s);
    let checked = tokio::task::spawn_blocking(move || {
        let pki = pki::load_or_create(&dir, &opts).map_err(|e| gatevm_abi::error_chain(&e))?;
        gatevm_k3s::tls::probe(
            (std::net::Ipv4Addr::LOCALHOST, g.host_port).into(),
            &pki,
            Duration::from_secs(5),
        )
        .map_err(|e| gatevm_abi::error_chain(&e))
    })
    .await;
    match checked {
        Ok(Ok(())) => gh.tls_ready = true,
        Ok(Err(e)) => gh.detail = Some(e),
        Err(e) => gh.detail = Some(e.to_string()),
    }
    gh
}

/// The guest's report of this boot ([`gatevm_abi::paths::K3S_REPORT`]): its `images` and
/// `datastore` lines, at most 64 of each, each made one safe line; nothing when it cannot be
/// read (it is the guest's word, and only shown).
async fn boot_report(name: &str) -> (Vec<String>, Vec<String>) {
    let Ok(bytes) = crate::client::read_file(
        name,
        gatevm_abi::paths::K3S_REPORT,
        64 << 10,
        Duration::from_secs(5),
    )
    .await
    else {
        return (Vec::new(), Vec::new());
    };
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let lines = |k: &str| -> Vec<String> {
        v.get(k)
            .and_then(|a| a.as_array())
            .map(|a| {
                a.iter()
                    .take(64)
                    .filter_map(|x| x.as_str())
                    .map(|l| crate::text::line(l, 512))
                    .collect()
            })
            .unwrap_or_default()
    };
    (lines("images"), lines("datastore"))
}

/// Fills the status's `k3s` part for a k3s instance; healthy then also needs the API server,
/// the node and, when configured, the gateway port's TLS.
async fn fill_health(st: &mut InstanceStatus) {
    let Some(s) = crate::client::saved_config(&st.name).and_then(|c| c.k3s) else {
        return;
    };
    let h = if st.state == "running" {
        let mut h = k3s_health(&st.name, &s, true).await;
        (h.images, h.datastore) = boot_report(&st.name).await;
        let gateway_ok = h.gateway.as_ref().is_none_or(|g| g.tls_ready);
        st.healthy = st.healthy && h.api_ready && h.node_ready && gateway_ok;
        h
    } else {
        K3sHealth {
            version: s.version.clone(),
            api_port: s.api_port,
            user_args: s.user_args.clone(),
            server: s.join.as_ref().map(|j| j.server.clone()),
            gateway: s.gateway.map(|g| GatewayHealth {
                endpoint: format!("https://127.0.0.1:{}", g.host_port),
                guest_port: g.guest_port,
                ..Default::default()
            }),
            ..Default::default()
        }
    };
    st.k3s = Some(h);
}

/// The status of one instance ([`crate::client::status`]) with, for the k3s profile, its
/// health: the API server, the node and the gateway port.
pub async fn status_with_health(name: &str) -> Result<InstanceStatus, ClientError> {
    let mut st = crate::client::status(name).await?;
    fill_health(&mut st).await;
    Ok(st)
}
