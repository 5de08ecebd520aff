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
pub mod ephemeral;
pub mod guest_paths;
pub mod k3s;
pub mod k3s_stage;
pub mod lock;
pub mod logcap;
pub mod name;
pub mod paths;
pub mod rootdir;
pub mod state;
pub mod supervisor;
pub mod text;

pub use config::{InstanceConfig, VmmChoice};
pub use control::InstanceStatus;
pub use paths::InstancePaths;
