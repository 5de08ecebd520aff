//! Virtual machine monitors for gatevm.
//!
//! A backend turns a [`VmConfig`] into a process to run: QEMU is a separate program; libkrun
//! runs in a child process of gatevm itself (`gatevm __krun-vm`) because `krun_start_enter` never
//! returns. Either way the supervisor owns a child process, so the trait hands back a
//! [`std::process::Command`] and says which helper processes the backend needs beside it.

pub mod confine;
pub mod krun;
pub mod probe;
pub mod process;
pub mod qemu;

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

pub use probe::{probe, HostCaps};
pub use process::{confinement, ProcessConfinement};

/// How the guest's CPU is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization through /dev/kvm.
    Kvm,
    /// QEMU's software emulation (slow, works everywhere).
    Tcg,
}

impl Accel {
    /// The best acceleration the host offers.
    pub fn for_host(caps: &HostCaps) -> Accel {
        if caps.hardware_virt() {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }
}

/// Everything a backend needs to boot one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Instance name (used for the process name and the guest hostname).
    pub name: String,
    pub cpus: u32,
    pub memory_mib: u32,
    pub accel: Accel,
    /// Uncompressed guest kernel (ELF with a PVH note, or bzImage).
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// The VM's disks (the root's base and writable layer, the k3s staging image, the state
    /// disk); the guest finds each by its serial, whatever order they come up in.
    pub disks: Vec<Disk>,
    /// libkrun only: the directory its built-in virtio-fs serves as the boot root. It holds only
    /// the guest agent, which builds the real root from the disks.
    pub boot_dir: PathBuf,
    /// Unix socket path where the VMM listens for the agent channel.
    pub agent_socket: PathBuf,
    /// The network helper's end (gvproxy's `-listen-qemu` socket, or passt's connected socket),
    /// when networking is on.
    pub net: Option<NetAttach>,
    /// Guest MAC address.
    pub mac: String,
    /// File the guest console is appended to.
    pub console_log: PathBuf,
    /// Shared host directories (virtio-fs), in tag order.
    #[serde(default)]
    pub shares: Vec<Share>,
    /// A second NIC on a k3s cluster's private network: one end of a datagram socket pair the
    /// VMM inherits (each datagram one Ethernet frame). QEMU only.
    #[serde(default)]
    pub cluster_nic: Option<ClusterNic>,
}

/// The cluster NIC of [`VmConfig::cluster_nic`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterNic {
    /// The inherited `SOCK_DGRAM` descriptor.
    pub fd: i32,
    /// The NIC's MAC address.
    pub mac: String,
}

/// One shared host directory: QEMU reaches it through its virtiofsd's vhost-user socket;
/// libkrun serves it with its built-in virtio-fs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// The tag the guest mounts (`gatevm_abi::settings::volume_tag`).
    pub tag: String,
    /// The host directory (resolved).
    pub host_dir: PathBuf,
    /// The host side refuses writes.
    pub read_only: bool,
    /// The virtiofsd socket (QEMU).
    pub socket: Option<PathBuf>,
}

impl Share {
    /// Checks the tag: 1 to 36 bytes (virtio-fs's tag size) of `[a-z0-9-]`.
    pub fn check(&self) -> Result<(), VmmError> {
        check_id("share tag", &self.tag, 36)
    }
}

/// Checks a device ID the guest reads (a disk serial, a share tag): 1 to `max` bytes of
/// `[a-z0-9-]`, so it needs no quoting anywhere.
fn check_id(what: &str, id: &str, max: usize) -> Result<(), VmmError> {
    let ok = (1..=max).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(VmmError::Invalid(format!(
            "{what} {id:?}: 1 to {max} characters of a-z, 0-9 and -"
        )))
    }
}

/// One virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// The ID the guest reads as `/sys/block/vdX/serial` (see `gatevm_abi::paths::disk`).
    pub serial: String,
    /// The raw image file.
    pub path: PathBuf,
    /// Attached read-only: the VMM opens the file read-only and the guest cannot write it.
    pub read_only: bool,
}

impl Disk {
    /// A read-write disk.
    pub fn rw(serial: &str, path: impl Into<PathBuf>) -> Disk {
        Disk {
            serial: serial.to_string(),
            path: path.into(),
            read_only: false,
        }
    }

    /// A read-only disk.
    pub fn ro(serial: &str, path: impl Into<PathBuf>) -> Disk {
        Disk {
            read_only: true,
            ..Disk::rw(serial, path)
        }
    }

    /// Checks the serial: 1 to 20 bytes (virtio-blk's ID size) of `[a-z0-9-]`, so it needs no
    /// quoting anywhere.
    pub fn check(&self) -> Result<(), VmmError> {
        check_id("disk serial", &self.serial, 20)
    }
}

/// How the VM's network device reaches the network helper: QEMU's stream protocol (frames with
/// a 32-bit length prefix) on a socket or descriptor, or vhost-user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetAttach {
    /// A unix socket the helper listens on (gvproxy).
    Socket(PathBuf),
    /// A connected stream socket the VMM inherits as this descriptor (passt `--fd`).
    Fd(i32),
    /// A vhost-user socket the helper listens on (passt `--vhost-user`): the helper reads and
    /// writes the guest's virtqueues in the shared guest memory itself, so frames are not
    /// copied through the VMM. QEMU only.
    VhostUser(PathBuf),
}

/// Errors preparing a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{what} not found at {path}: run `gatevm setup`")]
    Missing { what: &'static str, path: PathBuf },
    #[error("invalid VM configuration: {0}")]
    Invalid(String),
    #[error("opening the {what} {path}")]
    Open {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A virtual machine monitor backend.
pub trait Vmm {
    /// Short name (`qemu`, `krun`).
    fn name(&self) -> &'static str;
    /// Whether the VM boots gatevm's initramfs (QEMU) rather than libkrun's own init from
    /// [`VmConfig::boot_dir`].
    fn boots_initramfs(&self) -> bool;
    /// The command that runs the VM; it exits when the guest powers off.
    fn command(&self, cfg: &VmConfig) -> Result<std::process::Command, VmmError>;
}
