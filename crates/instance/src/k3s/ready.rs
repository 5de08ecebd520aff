//! After a k3s instance is ready: its kubeconfig (from the guest, for the forwarded port),
//! merged into the user's unless disabled, the gateway metadata for clients, and the wait for
//! the node to be Ready.

use super::{gateway_endpoint, runtime, user_kubeconfig, K3sError, Notice};
use crate::config::K3sSettings;
use crate::paths::InstancePaths;
use gatevm_k3s::{kubeconfig, pki};
use std::path::PathBuf;
use std::time::Duration;

/// How long `start` waits, after the API server answers, for the node to be Ready.
const NODE_READY_WITHIN: Duration = Duration::from_secs(300);

/// Where k3s writes its kubeconfig in the guest.
const K3S_YAML: &str = gatevm_abi::paths::K3S_KUBECONFIG;

/// How long a kubeconfig fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// The instance's own kubeconfig file.
pub fn kubeconfig_file(paths: &InstancePaths) -> PathBuf {
    paths.dir.join("kubeconfig")
}

/// Reads a file of the guest: at most `max` bytes, within [`FETCH_TIMEOUT`], as UTF-8 text.
///
/// The guest agent reads the file itself ([`crate::client::read_file`]): no guest program runs,
/// the answer is capped at `max` bytes (more is an error) and the whole exchange is bounded by a
/// timeout. What it returns is untrusted all the same.
async fn fetch_guest_file(name: &str, path: &'static str, max: usize) -> Result<String, K3sError> {
    let bytes = crate::client::read_file(name, path, max, FETCH_TIMEOUT)
        .await
        .map_err(|source| K3sError::ReadGuest {
            name: name.to_string(),
            path,
            source,
        })?;
    String::from_utf8(bytes).map_err(|_| K3sError::NotUtf8 {
        name: name.to_string(),
        path,
    })
}

/// Fetches k3s's kubeconfig from the guest, rebuilds the instance's from its allowlisted
/// fields (see [`kubeconfig::instance_kubeconfig`]), writes it to the instance's directory and,
/// unless disabled, merges it into the user's.
pub fn refresh_kubeconfig(
    name: &str,
    s: &K3sSettings,
    notice: &mut dyn FnMut(Notice),
) -> Result<(), K3sError> {
    let paths = InstancePaths::new(name);
    let k3s_yaml =
        runtime()?.block_on(fetch_guest_file(name, K3S_YAML, kubeconfig::MAX_K3S_YAML))?;
    let yaml = kubeconfig::instance_kubeconfig(&k3s_yaml, name, s.api_port)?;
    crate::k3s::stage::write_new(&kubeconfig_file(&paths), yaml.as_bytes(), 0o600)?;
    notice(Notice::KubeconfigWritten {
        path: kubeconfig_file(&paths),
        api_port: s.api_port,
    });
    if s.merge_kubeconfig {
        let target = user_kubeconfig()?;
        let m = kubeconfig::merge(&target, &yaml, name)?;
        notice(Notice::KubeconfigMerged {
            context: m.context,
            path: m.path,
            current: m.current_context_set,
        });
    }
    Ok(())
}

/// After a k3s instance is ready: its kubeconfig (from the guest, for the forwarded port), merged
/// into the user's unless disabled, and the gateway metadata for clients; then waits for the
/// node to be Ready (the API server answering is not enough to run anything).
pub fn after_ready(
    name: &str,
    s: &K3sSettings,
    notice: &mut dyn FnMut(Notice),
) -> Result<(), K3sError> {
    let paths = InstancePaths::new(name);
    // An agent has no kubeconfig or gateway of its own: its server's serve the cluster.
    if s.join.is_none() {
        refresh_kubeconfig(name, s, notice)?;
        let pki = pki::load_or_create(
            &paths.dir.join("pki"),
            &crate::k3s::stage::pki_options(name, s),
        )?;
        if let Some(dir) = pki::config_dir() {
            let at = pki::write_gateway_metadata(&dir, name, gateway_endpoint(s).as_deref(), &pki)?;
            notice(Notice::GatewayCredentials {
                path: at,
                endpoint: gateway_endpoint(s),
            });
        }
    }
    let deadline = std::time::Instant::now() + NODE_READY_WITHIN;
    let mut said = false;
    loop {
        let h = runtime()?.block_on(super::k3s_health(name, s, false));
        if h.api_ready && h.node_ready {
            notice(Notice::NodeReady {
                name: name.to_string(),
            });
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(K3sError::NodeNotReady {
                name: name.to_string(),
                secs: NODE_READY_WITHIN.as_secs(),
                detail: h.detail.unwrap_or_else(|| "no detail".into()),
            });
        }
        if !said {
            notice(Notice::WaitingForNode {
                name: name.to_string(),
            });
            said = true;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}
