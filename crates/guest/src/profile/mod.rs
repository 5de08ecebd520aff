//! Payload profiles: what runs in the VM (`gatevm.payload=`) and how its services are prepared
//! and started. A profile turns into [`Payload`]s, which [`crate::payload`] supervises without
//! knowing what they run.
//!
//! - `none`: nothing (a throwaway VM, no state disk);
//! - `containerd` ([`containerd`]): containerd alone;
//! - `k3s` ([`k3s`]): containerd configured for k3s's pods, then `k3s server` using it.

pub(crate) mod containerd;
pub(crate) mod k3s;

use crate::cmdline::PayloadKind;
use crate::payload::Payload;
use crate::reaper::Reaper;
use std::sync::Arc;

/// The profile of this boot and its payloads.
pub(crate) enum Profile {
    /// No payload.
    None,
    /// containerd alone.
    Containerd(Arc<Payload>),
    /// containerd, then k3s.
    K3s(Box<k3s::Profile>),
}

impl Profile {
    /// Loads the profile `kind` names: writes containerd's configuration and, for k3s, reads
    /// the plan (so a missing plan or binary shows in the very first status). Runs before the
    /// state disk is mounted.
    pub(crate) fn load(kind: PayloadKind) -> Profile {
        match kind {
            PayloadKind::None => Profile::None,
            PayloadKind::Containerd => {
                Profile::Containerd(Payload::new(containerd::profile_payload_config()))
            }
            PayloadKind::K3s => Profile::K3s(Box::new(k3s::Profile::load())),
        }
    }

    /// The payloads in start order (stopped in reverse at shutdown).
    pub(crate) fn payloads(&self) -> Vec<Arc<Payload>> {
        match self {
            Profile::None => Vec::new(),
            Profile::Containerd(p) => vec![p.clone()],
            Profile::K3s(p) => p.payloads(),
        }
    }

    /// Whether the network must be set up before [`Profile::prepare`] and the start (k3s binds
    /// the guest address); the others start without waiting for it.
    pub(crate) fn needs_network_before_start(&self) -> bool {
        matches!(self, Profile::K3s(_))
    }

    /// Prepares what lives on the state disk, once it is mounted (k3s: its data directory).
    pub(crate) fn prepare(&mut self) {
        if let Profile::K3s(p) = self {
            p.prepare();
        }
    }

    /// Starts the payloads' supervisors (k3s: containerd now, k3s once containerd is ready).
    pub(crate) fn start(&self, reaper: &'static Reaper) {
        match self {
            Profile::None => {}
            Profile::Containerd(p) => {
                if let Err(e) = p.start(reaper) {
                    crate::glog!("cannot start the payload supervisor: {e}");
                }
            }
            Profile::K3s(p) => p.start(reaper),
        }
    }
}
