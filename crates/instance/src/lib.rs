//! gatevm instances: a named VM appliance on the host.
//!
//! [`client`] is the API other programs use (status, list, stop, delete, exec, start a detached
//! supervisor); [`supervisor`] is the process that owns a running instance.

pub mod agent;
pub mod backend;
pub mod capture;
pub mod client;
pub mod config;
pub mod control;
pub mod doctor;
pub mod ephemeral;
pub mod k3s;
pub mod lock;
pub mod logcap;
pub mod name;
pub mod paths;
pub mod preflight;
pub mod rootdir;
pub mod state;
pub mod supervisor;
pub mod text;
pub mod volume;

pub use config::{InstanceConfig, VmmChoice};
pub use control::InstanceStatus;
pub use paths::InstancePaths;

/// Port forwards (`-p` specs) and the network helpers: re-exported so the CLI parses forwards
/// through this crate only.
pub use gatevm_net as net;
/// Image archives and references (`gatevm image load`/`rm` read and compare them): re-exported
/// so the CLI reaches them through this crate only.
pub use gatevm_oci as oci;
/// The runtime bundle (`gatevm setup` and its report): re-exported so the CLI reaches it through
/// this crate only.
pub use gatevm_runtime as runtime;
/// The VMM backends (the `__krun-vm` process runs a libkrun VM): re-exported so the CLI reaches
/// them through this crate only.
pub use gatevm_vmm as vmm;
