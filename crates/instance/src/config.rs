//! An instance's configuration: what `start` was asked for (the recorded state is in
//! [`crate::state`]).

use gatevm_abi::settings::{GuestSettings, ProxyVar, RegistryHost, VolumeMount};
use gatevm_net::Forward;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Smallest and largest guest memory in MiB.
pub const MEMORY_RANGE: (u32, u32) = (256, 262_144);
/// Largest CPU count.
pub const MAX_CPUS: u32 = 64;
/// Default CPU count (fits a 2-core host).
pub const DEFAULT_CPUS: u32 = 2;
/// Default guest memory in MiB.
pub const DEFAULT_MEMORY_MIB: u32 = 2048;
/// Default state disk size in GiB (a sparse file: it costs only what the guest writes).
pub const DEFAULT_DISK_GIB: u32 = 32;
/// Largest state disk in GiB.
pub const MAX_DISK_GIB: u32 = 16 * 1024;
/// Default budget of the guest's writes to its root filesystem, in MiB (a sparse file: it costs
/// only what the guest writes).
pub const DEFAULT_ROOT_MIB: u32 = 8 * 1024;
/// Smallest root budget in MiB (room for the guest agent and a journal).
pub const MIN_ROOT_MIB: u32 = 128;
/// Largest root budget in MiB.
pub const MAX_ROOT_MIB: u32 = 1024 * 1024;

/// Why a size, network helper or VMM given for an instance was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigValueError {
    /// A root write budget that does not parse.
    #[error("invalid root size {0:?}: use e.g. 512M, 8G or 8 (GiB)")]
    RootSize(String),
    /// A root write budget out of range.
    #[error("root size {0:?} is out of range: use {MIN_ROOT_MIB}M to {max}T", max = MAX_ROOT_MIB / 1024 / 1024)]
    RootSizeRange(String),
    /// A disk size that does not parse.
    #[error("invalid disk size {0:?}: use GiB, e.g. 32 or 32G or 1T")]
    DiskSize(String),
    /// A disk size out of range.
    #[error("disk size {0:?} is out of range: use 1G to {max}T", max = MAX_DISK_GIB / 1024)]
    DiskSizeRange(String),
    /// An unknown network helper.
    #[error("unknown network helper {0:?}: use gvproxy or passt")]
    UnknownNet(String),
    /// An unknown VMM.
    #[error("unknown VMM {0:?}: use auto, krun or qemu")]
    UnknownVmm(String),
}

/// Splits a size into its number and unit (`t`, `g`, `m`, or `None` without one); `TiB`, `GiB`
/// and `MiB` count as `t`, `g` and `m`. `lower` is already lower-case.
fn split_size(lower: &str) -> (&str, Option<char>) {
    for (long, short) in [("tib", 't'), ("gib", 'g'), ("mib", 'm')] {
        if let Some(n) = lower
            .strip_suffix(long)
            .or_else(|| lower.strip_suffix(short))
        {
            return (n.trim(), Some(short));
        }
    }
    (lower, None)
}

/// Parses a root write budget: MiB with an M suffix, GiB plain or with a G suffix, TiB with T.
pub fn parse_root_size(s: &str) -> Result<u32, ConfigValueError> {
    let lower = s.trim().to_ascii_lowercase();
    let (num, unit) = split_size(&lower);
    let mult = match unit {
        Some('t') => 1024 * 1024,
        Some('m') => 1,
        _ => 1024,
    };
    let n: u32 = num
        .parse()
        .map_err(|_| ConfigValueError::RootSize(s.to_string()))?;
    n.checked_mul(mult)
        .filter(|m| (MIN_ROOT_MIB..=MAX_ROOT_MIB).contains(m))
        .ok_or_else(|| ConfigValueError::RootSizeRange(s.to_string()))
}

/// Parses a disk size: a number of GiB, or a number with a `G`/`GiB`/`T`/`TiB` suffix.
pub fn parse_disk_size(s: &str) -> Result<u32, ConfigValueError> {
    let lower = s.trim().to_ascii_lowercase();
    let invalid = || ConfigValueError::DiskSize(s.to_string());
    let (num, mult) = match split_size(&lower) {
        (n, Some('t')) => (n, 1024),
        (n, Some('g') | None) => (n, 1),
        _ => return Err(invalid()),
    };
    let n: u32 = num.parse().map_err(|_| invalid())?;
    let gib = n
        .checked_mul(mult)
        .filter(|g| (1..=MAX_DISK_GIB).contains(g));
    gib.ok_or_else(|| ConfigValueError::DiskSizeRange(s.to_string()))
}

/// Which user-mode network helper gives the guest its network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NetBackend {
    /// gvproxy: its own TCP/IP stack, forwards added at run time through its API.
    #[default]
    Gvproxy,
    /// passt: the host's sockets, forwards fixed at start.
    Passt,
}

impl NetBackend {
    pub fn name(self) -> &'static str {
        match self {
            NetBackend::Gvproxy => "gvproxy",
            NetBackend::Passt => "passt",
        }
    }
}

impl std::str::FromStr for NetBackend {
    type Err = ConfigValueError;
    fn from_str(s: &str) -> Result<Self, ConfigValueError> {
        match s {
            "gvproxy" => Ok(NetBackend::Gvproxy),
            "passt" => Ok(NetBackend::Passt),
            _ => Err(ConfigValueError::UnknownNet(s.to_string())),
        }
    }
}

/// Which VMM backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum VmmChoice {
    /// The best the host supports.
    #[default]
    Auto,
    Qemu,
    Krun,
}

impl VmmChoice {
    pub fn name(self) -> &'static str {
        match self {
            VmmChoice::Auto => "auto",
            VmmChoice::Qemu => "qemu",
            VmmChoice::Krun => "krun",
        }
    }
}

impl std::str::FromStr for VmmChoice {
    type Err = ConfigValueError;
    fn from_str(s: &str) -> Result<Self, ConfigValueError> {
        match s {
            "auto" => Ok(VmmChoice::Auto),
            "qemu" => Ok(VmmChoice::Qemu),
            "krun" => Ok(VmmChoice::Krun),
            _ => Err(ConfigValueError::UnknownVmm(s.to_string())),
        }
    }
}

/// What an instance was started with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceConfig {
    pub name: String,
    pub cpus: u32,
    pub memory_mib: u32,
    #[serde(default)]
    pub forwards: Vec<Forward>,
    /// Let the guest reach the host's loopback via 192.168.127.254.
    #[serde(default)]
    pub allow_host_loopback: bool,
    #[serde(default)]
    pub vmm: VmmChoice,
    /// The network helper.
    #[serde(default)]
    pub net: NetBackend,
    #[serde(default = "default_disk")]
    pub disk_gib: u32,
    /// Budget of the guest's writes to its root filesystem (MiB): the writable layer lives in a
    /// sparse ext4 image of this size, so a guest that fills it gets ENOSPC and the host keeps its
    /// space.
    #[serde(default = "default_root")]
    pub root_mib: u32,
    /// A kernel for the krun backend instead of libkrunfw's (`krun_set_kernel`).
    #[serde(default)]
    pub krun_kernel: Option<PathBuf>,
    /// A throwaway VM (`gatevm vm-run`): its own root, no containerd, no state disk, deleted
    /// when it stops.
    #[serde(default)]
    pub ephemeral: Option<Ephemeral>,
    /// The k3s profile's settings; None for the containerd profile.
    #[serde(default)]
    pub k3s: Option<K3sSettings>,
    /// Shared host directories (`-v`).
    #[serde(default)]
    pub volumes: Vec<crate::volume::Volume>,
    /// Registry mirrors and insecure registries (`--registry-mirror`, `--insecure-registry`).
    #[serde(default)]
    pub registries: Vec<RegistryHost>,
    /// Proxy variables for the guest's containerd and k3s (`--proxy-env`).
    #[serde(default)]
    pub proxy: Vec<ProxyVar>,
}

/// Guest port of the Kubernetes API server.
pub const K3S_API_GUEST_PORT: u16 = 6443;

/// The k3s profile: k3s with the VM's containerd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct K3sSettings {
    /// The k3s binary installed into the guest.
    pub binary: PathBuf,
    /// Its version and sha256 (checked at start).
    pub version: String,
    pub sha256: String,
    /// Host port forwarded to the API server (127.0.0.1).
    pub api_port: u16,
    /// Manifest files or directories placed in k3s's auto-deploy directory.
    #[serde(default)]
    pub manifests: Vec<PathBuf>,
    /// Image archives k3s imports at boot.
    #[serde(default)]
    pub images: Vec<PathBuf>,
    /// Packaged components to keep (traefik, servicelb, metrics-server); off by default.
    #[serde(default)]
    pub enable: Vec<String>,
    /// Merge the kubeconfig into the user's (`~/.kube/config` or the first of `$KUBECONFIG`).
    #[serde(default = "yes")]
    pub merge_kubeconfig: bool,
    /// Namespace and name of the gateway's TLS Secret.
    #[serde(default = "default_secret_namespace")]
    pub secret_namespace: String,
    #[serde(default = "default_secret_name")]
    pub secret_name: String,
    /// In-cluster names of the gateway Service (`NAME.NAMESPACE`); empty for the default,
    /// `gateway.gatevm`. Each puts `NAME.NAMESPACE.svc[.cluster.local]` in the server certificate.
    #[serde(default)]
    pub services: Vec<String>,
    /// More names or addresses for the gateway's server certificate.
    #[serde(default)]
    pub tls_sans: Vec<String>,
    /// The gateway's port: a host port (127.0.0.1) forwarded to a guest port (normally the
    /// gateway Service's NodePort); health then also needs TLS signed by the instance's CA there.
    #[serde(default)]
    pub gateway: Option<GatewayPort>,
    /// The user's own k3s server arguments (`--k3s-arg`), checked, passed after gatevm's.
    #[serde(default)]
    pub user_args: Vec<String>,
    /// A k3s agent node of another instance's cluster (`start --join SERVER`); None for a
    /// server.
    #[serde(default)]
    pub join: Option<Join>,
}

/// What an agent node joined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Join {
    /// The server instance.
    pub server: String,
    /// This node's address on the server's cluster network (kept across starts).
    pub node_ip: std::net::Ipv4Addr,
}

/// Where the gateway is reached: host port (on 127.0.0.1) to guest port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayPort {
    pub host_port: u16,
    pub guest_port: u16,
}

impl K3sSettings {
    /// The service DNS names for the server certificate.
    pub fn service_dns_names(&self) -> Vec<String> {
        let services: Vec<&str> = if self.services.is_empty() {
            vec!["gateway.gatevm"]
        } else {
            self.services.iter().map(String::as_str).collect()
        };
        services
            .iter()
            .flat_map(|s| [format!("{s}.svc"), format!("{s}.svc.cluster.local")])
            .collect()
    }
}

fn yes() -> bool {
    true
}

fn default_secret_namespace() -> String {
    "gatevm".into()
}

fn default_secret_name() -> String {
    "gateway-tls".into()
}

/// What a throwaway VM boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ephemeral {
    /// The read-only lower layer of the root (the VM's writes go to a private upper layer);
    /// None for gatevm's own rootfs.
    pub rootfs: Option<PathBuf>,
}

fn default_disk() -> u32 {
    DEFAULT_DISK_GIB
}

fn default_root() -> u32 {
    DEFAULT_ROOT_MIB
}

/// Why a configuration is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("--cpus {0} is out of range: use 1 to {MAX_CPUS}")]
    Cpus(u32),
    #[error("--memory {0} MiB is out of range: use {lo} to {hi} MiB", lo = MEMORY_RANGE.0, hi = MEMORY_RANGE.1)]
    Memory(u32),
    #[error("--memory {want} MiB is more than this host's {host} MiB of RAM")]
    MemoryHost { want: u32, host: u64 },
}

impl InstanceConfig {
    /// A configuration with the defaults.
    pub fn new(name: &str) -> InstanceConfig {
        InstanceConfig {
            name: name.to_string(),
            cpus: DEFAULT_CPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            forwards: vec![],
            allow_host_loopback: false,
            vmm: VmmChoice::Auto,
            net: NetBackend::Gvproxy,
            disk_gib: DEFAULT_DISK_GIB,
            root_mib: DEFAULT_ROOT_MIB,
            krun_kernel: None,
            ephemeral: None,
            k3s: None,
            volumes: vec![],
            registries: vec![],
            proxy: vec![],
        }
    }

    /// The instance's address on its cluster network: a k3s server's is
    /// [`gatevm_abi::net::CLUSTER_SERVER_IP`], an agent's the one it was given when it joined;
    /// None for the containerd profile and throwaway VMs.
    pub fn cluster_ip(&self) -> Option<std::net::Ipv4Addr> {
        if self.ephemeral.is_some() {
            return None;
        }
        let k = self.k3s.as_ref()?;
        Some(match &k.join {
            Some(j) => j.node_ip,
            None => gatevm_abi::net::CLUSTER_SERVER_IP,
        })
    }

    /// What the guest is handed on its settings disk: the shares (tagged in order), the
    /// registries and the proxy variables, `NO_PROXY` completed with the guest's own network,
    /// and the cluster NIC's address (`cluster`, when the VM has one).
    pub fn guest_settings_with(&self, cluster: Option<std::net::Ipv4Addr>) -> GuestSettings {
        let mut s = self.guest_settings();
        s.cluster = cluster.map(|ip| gatevm_abi::settings::ClusterLink { ip });
        s
    }

    /// [`Self::guest_settings_with`] without a cluster NIC.
    pub fn guest_settings(&self) -> GuestSettings {
        let mut proxy: Vec<ProxyVar> = self
            .proxy
            .iter()
            .filter(|p| p.name != "NO_PROXY")
            .cloned()
            .collect();
        if !proxy.is_empty() {
            let given = self
                .proxy
                .iter()
                .find(|p| p.name == "NO_PROXY")
                .map(|p| p.value.as_str());
            proxy.push(ProxyVar {
                name: "NO_PROXY".into(),
                value: gatevm_abi::settings::no_proxy_with_guest_net(given),
            });
        }
        GuestSettings {
            volumes: self
                .volumes
                .iter()
                .enumerate()
                .map(|(i, v)| VolumeMount {
                    tag: gatevm_abi::settings::volume_tag(i),
                    guest_dir: v.guest.clone(),
                    read_only: v.read_only,
                })
                .collect(),
            registries: self.registries.clone(),
            proxy,
            cluster: None,
        }
    }

    /// Checks the bounds (and, given the host's RAM, that the guest fits).
    pub fn validate(&self, host_mem_mib: Option<u64>) -> Result<(), ConfigError> {
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(ConfigError::Cpus(self.cpus));
        }
        if self.memory_mib < MEMORY_RANGE.0 || self.memory_mib > MEMORY_RANGE.1 {
            return Err(ConfigError::Memory(self.memory_mib));
        }
        if let Some(host) = host_mem_mib {
            if u64::from(self.memory_mib) > host {
                return Err(ConfigError::MemoryHost {
                    want: self.memory_mib,
                    host,
                });
            }
        }
        Ok(())
    }
}

/// The host's total RAM in MiB.
pub fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Every forward of the instance: the configured ones and, for k3s, the API server's and the
/// gateway's.
pub fn all_forwards(cfg: &InstanceConfig) -> Vec<Forward> {
    let mut v = cfg.forwards.clone();
    // An agent runs no API server (its api_port is 0).
    if let Some(k) = cfg.k3s.as_ref().filter(|k| k.join.is_none()) {
        if !v.iter().any(|f| f.guest_port == K3S_API_GUEST_PORT) {
            v.push(Forward {
                host_ip: std::net::Ipv4Addr::LOCALHOST.into(),
                host_port: k.api_port,
                guest_port: K3S_API_GUEST_PORT,
                proto: gatevm_net::forward::Proto::Tcp,
            });
        }
        if let Some(g) = k.gateway {
            if !v.iter().any(|f| f.host_port == g.host_port) {
                v.push(Forward {
                    host_ip: std::net::Ipv4Addr::LOCALHOST.into(),
                    host_port: g.host_port,
                    guest_port: g.guest_port,
                    proto: gatevm_net::forward::Proto::Tcp,
                });
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> InstanceConfig {
        InstanceConfig {
            name: "x".into(),
            cpus: 2,
            memory_mib: 2048,
            forwards: vec![],
            allow_host_loopback: false,
            vmm: VmmChoice::Auto,
            net: NetBackend::Gvproxy,
            disk_gib: 8,
            root_mib: DEFAULT_ROOT_MIB,
            krun_kernel: None,
            ephemeral: None,
            k3s: None,
            volumes: vec![],
            registries: vec![],
            proxy: vec![],
        }
    }

    #[test]
    fn bounds() {
        assert!(cfg().validate(Some(4096)).is_ok());
        assert_eq!(
            InstanceConfig { cpus: 0, ..cfg() }.validate(None),
            Err(ConfigError::Cpus(0))
        );
        assert_eq!(
            InstanceConfig { cpus: 65, ..cfg() }.validate(None),
            Err(ConfigError::Cpus(65))
        );
        assert_eq!(
            InstanceConfig {
                memory_mib: 100,
                ..cfg()
            }
            .validate(None),
            Err(ConfigError::Memory(100))
        );
        assert!(matches!(
            cfg().validate(Some(1024)),
            Err(ConfigError::MemoryHost { .. })
        ));
    }

    #[test]
    fn disk_sizes() {
        assert_eq!(parse_disk_size("32"), Ok(32));
        assert_eq!(parse_disk_size("8G"), Ok(8));
        assert_eq!(parse_disk_size("8GiB"), Ok(8));
        assert_eq!(parse_disk_size("2t"), Ok(2048));
        assert!(parse_disk_size("512M").is_err());
        assert_eq!(parse_root_size("512M"), Ok(512));
        assert_eq!(parse_root_size("8"), Ok(8192));
        assert_eq!(parse_root_size("2GiB"), Ok(2048));
        assert_eq!(parse_root_size("1t"), Ok(1024 * 1024));
        for bad in ["64M", "2T", "x", "", "-1G", "1.5G"] {
            assert!(parse_root_size(bad).is_err(), "{bad:?}");
        }
        for bad in ["", "0", "-1", "1.5G", "32M", "17T", "x", "99999999999"] {
            assert!(parse_disk_size(bad).is_err(), "{bad:?}");
        }
    }
}
