//! User-mode networking for gatevm instances: port forward specs and the network helpers
//! (gvproxy, passt).

pub mod confine;
pub mod filter;
pub mod forward;
pub mod gvproxy;
pub mod loopback;
pub mod passt;

pub use forward::{parse_forwards, Forward, ForwardSpecError, Proto};

/// The MTU of the guest's link with its network helper under QEMU: passt's default and the
/// largest both helpers take. A frame carries a ~64 KiB TCP segment where 1500 would take 45
/// frames, and each frame costs the emulated guest dearly: host-to-guest throughput through a
/// forward went from ~20 to ~70 MiB/s with gvproxy and from ~42 to ~80-150 MiB/s with passt
/// (QEMU TCG, this project's benchmark).
pub const LARGE_MTU: u32 = 65520;

/// The usual Ethernet MTU, kept where the VMM's network device is not known to take larger
/// frames (libkrun).
pub const ETHERNET_MTU: u32 = 1500;
