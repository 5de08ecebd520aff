//! User-mode networking for gatevm instances: port forward specs and the gvproxy helper.

pub mod forward;
pub mod gvproxy;
pub mod loopback;
pub mod passt;

pub use forward::{parse_forwards, Forward, ForwardSpecError, Proto};
