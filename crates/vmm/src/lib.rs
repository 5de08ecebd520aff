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
    /// The instance's root directory on the host (libkrun serves it itself).
    pub root_dir: PathBuf,
    /// vhost-user socket of virtiofsd serving the root filesystem (tag `root`; QEMU).
    pub virtiofs_socket: PathBuf,
    /// Raw disk image attached as virtio-blk (the guest's /dev/vda).
    pub state_disk: Option<PathBuf>,
    /// Unix socket path where the VMM listens for the agent channel.
    pub agent_socket: PathBuf,
    /// The network helper's end (gvproxy's `-listen-qemu` socket, or passt's connected socket),
    /// when networking is on.
    pub net: Option<NetAttach>,
    /// Guest MAC address.
    pub mac: String,
    /// File the guest console is appended to.
    pub console_log: PathBuf,
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
    /// Whether the backend needs an external virtiofsd for the root filesystem.
    fn needs_virtiofsd(&self) -> bool;
    /// The command that runs the VM; it exits when the guest powers off.
    fn command(&self, cfg: &VmConfig) -> Result<std::process::Command, VmmError>;
}
