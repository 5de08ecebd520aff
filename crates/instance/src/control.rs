//! The supervisor's control socket: what CLI clients ask and what they get.
//!
//! Each client connection does one operation. The client's first frame is a
//! `Frame::Msg { stream: 1, msg: CtlRequest }`. For `Status` and `Stop` the supervisor answers with
//! one `Frame<CtlReply>`. For `Exec` and `ReadFile` the connection then carries `Frame<GuestMsg>` on
//! stream 1 in both directions, relayed to and from the guest agent as in the agent protocol, less
//! its credit frames: the connection is the client's own, so the socket's backpressure is its flow
//! control (the supervisor reads the client's stdin only while the guest granted credit, and
//! grants the guest credit only after writing its output to the client).

use gatevm_abi::{ExecRequest, PayloadStatus};
use serde::{Deserialize, Serialize};

/// The stream id clients use.
pub const CLIENT_STREAM: u32 = 1;

/// A step of the start, reported to whoever started the supervisor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Progress {
    /// A phase began.
    Phase { phase: String, elapsed_ms: u64 },
    /// Something the user should know (e.g. software emulation).
    Notice { message: String },
    /// The instance is ready.
    Ready { agent_ready_ms: u64, ready_ms: u64 },
    /// The start failed.
    Failed { message: String },
}

/// A client's request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CtlRequest {
    /// Current status, with a fresh answer from the guest when it is up.
    Status,
    /// Stop gracefully within `timeout_secs`, then force.
    Stop { timeout_secs: u64 },
    /// Run a process in the guest.
    Exec(ExecRequest),
    /// Read a regular file in the guest (the guest agent opens it; no program runs), at most
    /// `max_bytes` bytes. Answered like an exec: see [`gatevm_abi::GuestMsg::ReadFile`].
    ReadFile { path: String, max_bytes: u64 },
}

/// The supervisor's answer to `Status` and `Stop`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CtlReply {
    Status(Box<InstanceStatus>),
    /// The stop has begun; the supervisor exits when it is done.
    Stopping,
    Error {
        message: String,
    },
}

/// What the guest agent said about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AgentInfo {
    /// The agent channel is open and the guest said hello.
    pub connected: bool,
    /// The agent answered a status request just now (within 2 s).
    #[serde(default)]
    pub responding: bool,
    pub version: Option<String>,
    pub kernel: Option<String>,
    pub uptime_ms: Option<u64>,
}

/// Health of the k3s profile, asked of the guest's k3s at status time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct K3sHealth {
    /// k3s's version (from the instance configuration).
    pub version: String,
    /// Host port of the API server.
    pub api_port: u16,
    /// The API server's `/readyz` answered `ok`.
    pub api_ready: bool,
    /// The node reports Ready.
    pub node_ready: bool,
    /// Why a part is not ready, when known.
    pub detail: Option<String>,
    /// The gateway port, when one is configured.
    #[serde(default)]
    pub gateway: Option<GatewayHealth>,
    /// The user's own k3s server arguments (`--k3s-arg`).
    #[serde(default)]
    pub user_args: Vec<String>,
    /// For an agent node (`--join`): its cluster's server instance; null for a server.
    #[serde(default)]
    pub server: Option<String>,
    /// What this boot did with each airgap archive (imported, already imported and skipped,
    /// failed), as the guest reports it.
    #[serde(default)]
    pub images: Vec<String>,
    /// What this boot's datastore recovery did (a database moved aside, a stale bootstrap
    /// lock removed), as the guest reports it.
    #[serde(default)]
    pub datastore: Vec<String>,
}

/// The gateway port's part of the k3s health.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayHealth {
    /// `https://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The guest port it is forwarded to.
    pub guest_port: u16,
    /// A TLS handshake there verified against the instance's CA (client certificate offered).
    pub tls_ready: bool,
    /// Why not, when it failed.
    pub detail: Option<String>,
}

/// The instance status document (`gatevm status --json`). Fields are only ever added.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub name: String,
    /// `running`, `starting`, `stopping` or `stopped`.
    pub state: String,
    /// Running, the agent answers and every payload is ready.
    pub healthy: bool,
    /// VMM and acceleration (`qemu/tcg`, `qemu/kvm`, `krun/kvm`).
    pub backend: Option<String>,
    /// The network helper: `gvproxy` or `passt`.
    #[serde(default)]
    pub net: String,
    /// The guest kernel: a path, or `libkrunfw` with its file.
    #[serde(default)]
    pub kernel: Option<String>,
    /// Why the backend is QEMU although `--vmm auto` would take krun: krun failed to boot a
    /// guest here (and is not tried again until the runtime changes).
    #[serde(default)]
    pub backend_note: Option<String>,
    /// A throwaway VM of `gatevm vm-run`, deleted when it stops.
    #[serde(default)]
    pub ephemeral: bool,
    /// The k3s profile's health (null for the containerd profile or a stopped instance).
    #[serde(default)]
    pub k3s: Option<K3sHealth>,
    pub cpus: u32,
    pub memory_mib: u32,
    /// Forwards as `ip:host:guest/proto`.
    pub forwards: Vec<String>,
    pub supervisor_pid: Option<u32>,
    pub vm_pid: Option<u32>,
    pub agent: AgentInfo,
    pub payloads: Vec<PayloadStatus>,
    pub started_at_ms: Option<u64>,
    pub agent_ready_ms: Option<u64>,
    pub ready_ms: Option<u64>,
    /// How the last run ended (when stopped).
    pub stop_reason: Option<String>,
    /// The last failure, if any.
    pub last_error: Option<String>,
    /// Directory of the instance's log files.
    pub logs: String,
    /// The instance's host processes (supervisor, VMM, helpers) and how each is confined.
    #[serde(default)]
    pub processes: Vec<ProcessReport>,
    /// containerd's API on the host while the instance runs (a unix socket, 0600), relayed to the
    /// guest's containerd over the agent channel; null when stopped and for `vm-run`.
    #[serde(default)]
    pub containerd_socket: Option<String>,
    /// Shared host directories, `HOST_DIR:GUEST_DIR[:ro]`.
    #[serde(default)]
    pub volumes: Vec<String>,
    /// Registry settings: `HOST` with its mirrors and whether it is insecure.
    #[serde(default)]
    pub registries: Vec<gatevm_abi::settings::RegistryHost>,
    /// The proxy variables handed to the guest (names only: values may hold a password).
    #[serde(default)]
    pub proxy_env: Vec<String>,
    /// A k3s instance's role in its cluster: `server` or `agent` (null for the containerd
    /// profile).
    #[serde(default)]
    pub role: Option<String>,
    /// An agent's server instance (`--join`).
    #[serde(default)]
    pub cluster_server: Option<String>,
}

impl InstanceStatus {
    /// Fills the configuration's shares, registries and proxy variable names in.
    pub fn with_settings(mut self, cfg: &crate::config::InstanceConfig) -> InstanceStatus {
        self.volumes = cfg.volumes.iter().map(|v| v.spec()).collect();
        self.registries = cfg.registries.clone();
        self.proxy_env = cfg.proxy.iter().map(|p| p.name.clone()).collect();
        if let Some(k) = &cfg.k3s {
            self.role = Some(if k.join.is_some() { "agent" } else { "server" }.into());
            self.cluster_server = k.join.as_ref().map(|j| j.server.clone());
        }
        self
    }
}

/// One host process of an instance, as `status --json` reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessReport {
    /// `supervisor`, `vmm`, `gvproxy` or `passt`.
    pub role: String,
    pub pid: u32,
    /// What the kernel says about it (uid, capabilities, seccomp, no_new_privs, mount
    /// namespace); null when it could not be read.
    pub confinement: Option<gatevm_vmm::ProcessConfinement>,
    /// What gatevm applied that `/proc` does not show (e.g. gvproxy's Landlock rules).
    #[serde(default)]
    pub policy: Option<String>,
}
