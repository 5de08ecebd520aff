//! The contract between the host and the guest agent, written once: both sides depend on this
//! crate and nothing here is restated elsewhere.
//!
//! - [`cmdline`]: the `gatevm.*` keys of the guest kernel command line (rendered by the host,
//!   parsed by the guest, round-trip tested);
//! - [`paths`]: where things are in the guest (the agent binary, the state disk, the k3s staging
//!   directory);
//! - [`net`]: the guest's fixed network (addresses, MAC, MTUs);
//! - [`plan`]: the k3s plan the host stages and the guest validates.
//!
//! The frames and messages of the agent protocol are the other half of the contract
//! (`gatevm-protocol`); see ARCHITECTURE.md.

pub mod cmdline;
pub mod net;
pub mod paths;
pub mod plan;
