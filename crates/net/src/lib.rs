//! User-mode networking for gatevm instances: port forward specs and the network helpers
//! (gvproxy, passt).

pub mod confine;
pub mod filter;
pub mod forward;
pub mod gvproxy;
pub mod loopback;
pub mod passt;

pub use forward::{parse_forwards, Forward, ForwardSpecError, Proto};

pub use gatevm_abi::net::{ETHERNET_MTU, LARGE_MTU};
