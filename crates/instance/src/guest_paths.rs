//! Paths inside the guest's root that the host relies on.

/// Where the supervisor installs gatevm-guest (the guest agent) in every instance root: the
/// guest's stage 2 and what the krun backend executes.
pub const GUEST_AGENT_PATH: &str = gatevm_abi::paths::GUEST_AGENT;
