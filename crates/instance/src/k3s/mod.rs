//! The k3s profile on the host: the settings of a start (flags over what the instance last ran
//! with, and the k3s binary), the work after the instance is ready (kubeconfig, gateway metadata,
//! the node becoming Ready), its health in status, and clean-up on delete.
//!
//! Nothing here prints: what the user should read comes out as [`Notice`]s.

mod health;
mod ready;
mod resolve;
pub mod stage;

pub use health::{k3s_health, status_with_health};
pub use ready::{after_ready, kubeconfig_file, refresh_kubeconfig};
pub use resolve::{cache_binary, fetch_and_cache, resolve, K3sRequest, Profile, COMPONENTS};

use crate::config::InstanceConfig;
use crate::paths::InstancePaths;
use gatevm_k3s::{kubeconfig, pki};
use std::path::PathBuf;

/// Errors of the k3s profile's host work; each message names what failed.
#[derive(Debug, thiserror::Error)]
pub enum K3sError {
    /// A setting that cannot be used (the message says which and why).
    #[error("{0}")]
    Invalid(String),
    /// A flag's value was refused by the gateway PKI's checks.
    #[error("{flag}")]
    Flag {
        /// The flag ("--gateway-secret", "--tls-san").
        flag: &'static str,
        #[source]
        source: pki::PkiError,
    },
    /// The binary `--k3s` names cannot be used.
    /// (Its text is the binary's error with its causes, after `--k3s`: the path leads it.)
    #[error("--k3s {}", gatevm_abi::error_chain(.0))]
    GivenBinary(gatevm_k3s::binary::BinaryError),
    /// No k3s binary given or cached, and the pinned release could not be fetched.
    #[error("the k3s profile needs a k3s binary: pass --k3s PATH, or cache one with `gatevm setup --k3s FILE`; the pinned download failed")]
    NoBinary(#[source] Box<K3sError>),
    /// A k3s binary could not be checked or cached.
    #[error(transparent)]
    Binary(#[from] gatevm_k3s::binary::BinaryError),
    /// The pinned k3s release could not be fetched.
    #[error(transparent)]
    Download(#[from] gatevm_k3s::download::DownloadError),
    /// The k3s profile could not be staged, or a `--manifest` not read.
    #[error(transparent)]
    Stage(#[from] stage::StageError),
    /// A file in the instance's directory could not be written.
    #[error(transparent)]
    RootDir(#[from] crate::rootdir::RootDirError),
    /// A file read from the guest is not text.
    #[error("{path} in {name:?} is not UTF-8 text")]
    NotUtf8 { name: String, path: &'static str },
    /// The node did not become Ready in time.
    #[error("{name} is running, but its node is not Ready after {secs} s ({detail}); `gatevm status {name}` shows progress")]
    NodeNotReady {
        name: String,
        secs: u64,
        detail: String,
    },
    /// `$HOME` is not set.
    #[error("$HOME is not set: cannot find ~/.kube/config")]
    NoHome,
    #[error("reading {path} in {name:?}")]
    ReadGuest {
        name: String,
        path: &'static str,
        #[source]
        source: crate::client::ClientError,
    },
    #[error(transparent)]
    Kubeconfig(#[from] kubeconfig::KubeconfigError),
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error(transparent)]
    Dirs(#[from] gatevm_runtime::dirs::DirsError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Something the user should read about the k3s profile's host work; its `Display` is the line
/// to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// The pinned k3s release is being fetched.
    Fetching {
        version: Option<String>,
        url: String,
        sha256: String,
    },
    /// A k3s binary was cached in the runtime.
    Cached {
        version: String,
        path: PathBuf,
        sha256: String,
    },
    /// The instance's kubeconfig was written.
    KubeconfigWritten { path: PathBuf, api_port: u16 },
    /// The kubeconfig was merged into the user's.
    KubeconfigMerged {
        context: String,
        path: PathBuf,
        current: bool,
    },
    /// The gateway metadata was written.
    GatewayCredentials {
        path: PathBuf,
        endpoint: Option<String>,
    },
    /// `start` waits for the node.
    WaitingForNode { name: String },
    /// The node is Ready.
    NodeReady { name: String },
    /// A step of an agent leaving its cluster (`kubectl drain`, `kubectl delete node`) done.
    Left {
        name: String,
        server: String,
        step: String,
    },
    /// A clean-up step failed; the work went on.
    Warning(String),
}

impl std::fmt::Display for Notice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Notice::Fetching {
                version,
                url,
                sha256,
            } => write!(
                f,
                "fetching k3s {} from {url} (sha256 {sha256})",
                version.as_deref().unwrap_or("(version unpinned)")
            ),
            Notice::Cached {
                version,
                path,
                sha256,
            } => write!(
                f,
                "k3s {version} cached at {} (sha256 {sha256})",
                path.display()
            ),
            Notice::KubeconfigWritten { path, api_port } => write!(
                f,
                "kubeconfig: {} (API at https://127.0.0.1:{api_port})",
                path.display()
            ),
            Notice::KubeconfigMerged {
                context,
                path,
                current,
            } => write!(
                f,
                "kubeconfig: context {context} in {}{}",
                path.display(),
                if *current {
                    " (now the current context)"
                } else {
                    ""
                }
            ),
            Notice::GatewayCredentials { path, endpoint } => write!(
                f,
                "gateway credentials: {}{}",
                path.display(),
                endpoint
                    .as_ref()
                    .map(|e| format!(" (endpoint {e})"))
                    .unwrap_or_default()
            ),
            Notice::WaitingForNode { name } => {
                write!(f, "{name}: waiting for the node to be Ready")
            }
            Notice::NodeReady { name } => write!(f, "{name}: node Ready"),
            Notice::Left { name, server, step } => {
                write!(f, "{name}: {step} done on {server}")
            }
            Notice::Warning(w) => write!(f, "warning: {w}"),
        }
    }
}

/// The user's kubeconfig gatevm merges into.
fn user_kubeconfig() -> Result<PathBuf, K3sError> {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .ok_or(K3sError::NoHome)?;
    Ok(kubeconfig::target_path(
        std::env::var("KUBECONFIG").ok().as_deref(),
        &home,
    ))
}

/// The gateway endpoint of an instance, when it has a gateway port.
fn gateway_endpoint(s: &crate::config::K3sSettings) -> Option<String> {
    s.gateway
        .map(|g| format!("https://127.0.0.1:{}", g.host_port))
}

/// On delete: the instance's context leaves the user's kubeconfig and its gateway metadata goes.
pub fn on_delete(name: &str, cfg: Option<&InstanceConfig>, notice: &mut dyn FnMut(Notice)) {
    let Some(s) = cfg.and_then(|c| c.k3s.as_ref()) else {
        return;
    };
    if s.merge_kubeconfig {
        if let Ok(target) = user_kubeconfig() {
            if let Err(e) = kubeconfig::remove(&target, name) {
                notice(Notice::Warning(format!(
                    "removing context gatevm-{name} from {}: {}",
                    target.display(),
                    gatevm_abi::error_chain(&e)
                )));
            }
        }
    }
    if let Some(dir) = pki::config_dir() {
        if let Err(e) = pki::remove_gateway_metadata(&dir, name) {
            notice(Notice::Warning(format!(
                "removing the gateway metadata of {name}: {}",
                gatevm_abi::error_chain(&e)
            )));
        }
    }
}

/// The agents of a cluster server instance (the instances that joined it).
pub fn agents_of(server: &str) -> Vec<String> {
    crate::client::names()
        .into_iter()
        .filter(|n| {
            crate::client::saved_config(n)
                .and_then(|c| c.k3s)
                .and_then(|k| k.join)
                .is_some_and(|j| j.server == server)
        })
        .collect()
}

/// Before an agent node is deleted: drains it and deletes it from its cluster, asking its server
/// (when that runs). A failure is a warning: the instance goes either way.
pub fn leave_cluster(name: &str, cfg: Option<&InstanceConfig>, notice: &mut dyn FnMut(Notice)) {
    let Some(j) = cfg
        .and_then(|c| c.k3s.as_ref())
        .and_then(|k| k.join.as_ref())
    else {
        return;
    };
    let server = j.server.as_str();
    if !crate::client::is_running(&InstancePaths::new(server)) {
        notice(Notice::Warning(format!(
            "the cluster's server {server:?} is not running: node {name} stays in its cluster \
             until removed there (k3s kubectl delete node {name})"
        )));
        return;
    }
    let limits = crate::capture::Limits {
        timeout: std::time::Duration::from_secs(150),
        max_stdout: 64 << 10,
        max_stderr: 64 << 10,
    };
    let steps: [&[&str]; 2] = [
        &[
            gatevm_abi::paths::K3S_BIN,
            "kubectl",
            "drain",
            name,
            "--ignore-daemonsets",
            "--delete-emptydir-data",
            "--force",
            "--timeout=120s",
        ],
        &[
            gatevm_abi::paths::K3S_BIN,
            "kubectl",
            "delete",
            "node",
            name,
        ],
    ];
    let Ok(rt) = runtime() else { return };
    for argv in steps {
        let what = argv[2..4].join(" ");
        match rt.block_on(crate::capture::capture::<tokio::io::Empty>(
            server, argv, None, limits,
        )) {
            Ok(o) if o.code == 0 => notice(Notice::Left {
                name: name.to_string(),
                server: server.to_string(),
                step: what,
            }),
            Ok(o) => notice(Notice::Warning(format!(
                "{what} on {server}: {}",
                o.error_line()
            ))),
            Err(e) => notice(Notice::Warning(format!(
                "{what} on {server}: {}",
                gatevm_abi::error_chain(&e)
            ))),
        }
    }
}

/// A single-threaded runtime for the blocking entry points.
fn runtime() -> Result<tokio::runtime::Runtime, K3sError> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}
