//! An instance's configuration (what `start` was asked for) and the recorded state.

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
pub fn parse_root_size(s: &str) -> Result<u32, String> {
    let lower = s.trim().to_ascii_lowercase();
    let (num, unit) = split_size(&lower);
    let mult = match unit {
        Some('t') => 1024 * 1024,
        Some('m') => 1,
        _ => 1024,
    };
    let n: u32 = num
        .parse()
        .map_err(|_| format!("invalid root size {s:?}: use e.g. 512M, 8G or 8 (GiB)"))?;
    n.checked_mul(mult)
        .filter(|m| (MIN_ROOT_MIB..=MAX_ROOT_MIB).contains(m))
        .ok_or_else(|| {
            format!(
                "root size {s:?} is out of range: use {MIN_ROOT_MIB}M to {}T",
                MAX_ROOT_MIB / 1024 / 1024
            )
        })
}

/// Parses a disk size: a number of GiB, or a number with a `G`/`GiB`/`T`/`TiB` suffix.
pub fn parse_disk_size(s: &str) -> Result<u32, String> {
    let lower = s.trim().to_ascii_lowercase();
    let invalid = || format!("invalid disk size {s:?}: use GiB, e.g. 32 or 32G or 1T");
    let (num, mult) = match split_size(&lower) {
        (n, Some('t')) => (n, 1024),
        (n, Some('g') | None) => (n, 1),
        _ => return Err(invalid()),
    };
    let n: u32 = num.parse().map_err(|_| invalid())?;
    let gib = n
        .checked_mul(mult)
        .filter(|g| (1..=MAX_DISK_GIB).contains(g));
    gib.ok_or_else(|| {
        format!(
            "disk size {s:?} is out of range: use 1G to {}T",
            MAX_DISK_GIB / 1024
        )
    })
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
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "gvproxy" => Ok(NetBackend::Gvproxy),
            "passt" => Ok(NetBackend::Passt),
            _ => Err(format!(
                "unknown network helper {s:?}: use gvproxy or passt"
            )),
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
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(VmmChoice::Auto),
            "qemu" => Ok(VmmChoice::Qemu),
            "krun" => Ok(VmmChoice::Krun),
            _ => Err(format!("unknown VMM {s:?}: use auto, krun or qemu")),
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

/// Lifecycle phase of an instance, as recorded by its supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Starting,
    Running,
    Stopping,
    Stopped,
}

/// A process owned by the supervisor, identified by pid, start time and the host's boot (so a
/// recycled pid, also one of a later boot that happens to have the same start time, is not
/// mistaken for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcId {
    pub pid: u32,
    /// Start time in clock ticks since boot (field 22 of /proc/PID/stat).
    pub start_ticks: u64,
    /// The host's boot id when the process was recorded (`/proc/sys/kernel/random/boot_id`).
    /// A record without one (written by an older gatevm) never matches a live process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<BootId>,
}

/// The kernel's random id of the current boot, a UUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootId(pub [u8; 16]);

const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

impl BootId {
    /// The current boot's id; None where the kernel does not say.
    pub fn current() -> Option<BootId> {
        std::fs::read_to_string(BOOT_ID_PATH)
            .ok()
            .and_then(|s| BootId::parse(&s))
    }

    /// Parses a UUID (with or without dashes, surrounding whitespace ignored).
    pub fn parse(s: &str) -> Option<BootId> {
        let hex: Vec<u8> = s.trim().bytes().filter(|b| *b != b'-').collect();
        if hex.len() != 32 {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, pair) in hex.chunks(2).enumerate() {
            let text = std::str::from_utf8(pair).ok()?;
            out[i] = u8::from_str_radix(text, 16).ok()?;
        }
        Some(BootId(out))
    }
}

impl std::fmt::Display for BootId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl Serialize for BootId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for BootId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<BootId, D::Error> {
        let s = String::deserialize(d)?;
        BootId::parse(&s).ok_or_else(|| serde::de::Error::custom("not a boot id (a UUID)"))
    }
}

impl ProcId {
    /// The identity of a live process.
    pub fn of(pid: u32) -> Option<ProcId> {
        Some(ProcId {
            pid,
            start_ticks: proc_start_ticks(pid)?,
            boot_id: BootId::current(),
        })
    }

    /// Whether this exact process still exists (and is not a zombie): same pid, same start time,
    /// and recorded during this boot of the host.
    pub fn alive(&self) -> bool {
        if self.boot_id != BootId::current() {
            return false;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return false;
        };
        match parse_stat(&stat) {
            Some((state, ticks)) => ticks == self.start_ticks && state != 'Z' && state != 'X',
            None => false,
        }
    }
}

/// (state char, start ticks) from a /proc/PID/stat line; the command name may contain spaces and
/// parentheses, so fields are counted after the last ')'.
fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // After the state (field 3) comes field 4; start time is field 22 -> 18 further.
    let ticks = fields.nth(18)?.parse().ok()?;
    Some((state, ticks))
}

fn proc_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat).map(|(_, t)| t)
}

/// What the supervisor records in `state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFile {
    pub phase: Phase,
    pub supervisor: Option<ProcId>,
    pub vmm: Option<ProcId>,
    pub helpers: Vec<(String, ProcId)>,
    /// Confinement a process got that `/proc` does not show, by role (gvproxy's Landlock rules).
    #[serde(default)]
    pub policies: Vec<(String, String)>,
    /// Which backend and acceleration run the VM (`qemu/tcg`, ...).
    pub backend: Option<String>,
    /// Which kernel the VM boots (a path, or libkrunfw's).
    #[serde(default)]
    pub kernel: Option<String>,
    /// Unix time in milliseconds when the start began.
    pub started_at_ms: Option<u64>,
    /// Milliseconds from start to the guest agent answering.
    pub agent_ready_ms: Option<u64>,
    /// Milliseconds from start to the payload being ready.
    pub ready_ms: Option<u64>,
    /// Why the instance is stopped, when it did not stop on request.
    pub last_error: Option<String>,
    /// How the last run ended.
    pub stop_reason: Option<String>,
}

impl StateFile {
    pub fn stopped(reason: Option<String>) -> StateFile {
        StateFile {
            phase: Phase::Stopped,
            supervisor: None,
            vmm: None,
            helpers: vec![],
            policies: vec![],
            backend: None,
            kernel: None,
            started_at_ms: None,
            agent_ready_ms: None,
            ready_ms: None,
            last_error: None,
            stop_reason: reason,
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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

    #[test]
    fn stat_parsing() {
        let line =
            "123 (a) b) c) S 1 123 123 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(parse_stat(line), Some(('S', 98765)));
        assert_eq!(parse_stat("garbage"), None);
        let me = ProcId::of(std::process::id()).unwrap();
        assert!(me.alive());
        assert!(!ProcId {
            start_ticks: me.start_ticks + 1,
            ..me
        }
        .alive());
    }

    #[test]
    fn boot_id_is_part_of_the_identity() {
        let me = ProcId::of(std::process::id()).unwrap();
        let Some(now) = me.boot_id else {
            println!("NOT RUN: this kernel has no {BOOT_ID_PATH}");
            return;
        };
        assert!(me.alive());
        // The same pid and start time recorded in another boot is not this process.
        let mut other = now;
        other.0[0] ^= 1;
        assert!(!ProcId {
            boot_id: Some(other),
            ..me
        }
        .alive());
        // Nor is a record that does not say which boot it is from.
        assert!(!ProcId {
            boot_id: None,
            ..me
        }
        .alive());
        // Round trip through the state file's JSON, as the kernel writes it.
        let text = std::fs::read_to_string(BOOT_ID_PATH).unwrap();
        let json = serde_json::to_string(&me).unwrap();
        assert!(json.contains(text.trim()), "{json}");
        let back: ProcId = serde_json::from_str(&json).unwrap();
        assert_eq!(back, me);
        assert!(serde_json::from_str::<ProcId>(
            r#"{"pid":1,"start_ticks":2,"boot_id":"not-a-uuid"}"#
        )
        .is_err());
        assert_eq!(
            BootId::parse("00112233445566778899aabbccddeeff").map(|b| b.to_string()),
            Some("00112233-4455-6677-8899-aabbccddeeff".into())
        );
    }
}
