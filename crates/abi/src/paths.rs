//! Where things are in the guest's root filesystem, and the disks the guest finds its file
//! systems on. Host code that writes into a staging directory uses the relative forms ([`rel`]);
//! the guest uses the absolute ones.

/// The guest agent (PID 1 of the root, stage 2): stage 1 copies itself here at every boot.
pub const GUEST_AGENT: &str = "/usr/local/sbin/gatevm-guest";

/// containerd's API socket in the guest (both profiles: k3s runs on this containerd).
pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";

/// The disks a VM gets, by the serial (virtio-blk ID) the VMM gives each; the guest finds them in
/// `/sys/block/vd*/serial`, whatever order the devices come up in.
pub mod disk {
    /// The shared base root file system: a read-only EROFS image (the lower layer of the root).
    pub const BASE: &str = "gatevm-base";
    /// The instance's writable root layer: ext4 holding `upper/` and `work/` of the overlay.
    pub const UPPER: &str = "gatevm-upper";
    /// The state disk (ext4 at [`super::STATE_DIR`]).
    pub const STATE: &str = "gatevm-state";
    /// What the host stages for the k3s profile: a read-only EROFS image mounted at
    /// [`super::K3S_STAGE_DIR`].
    pub const STAGE: &str = "gatevm-stage";
    /// The host's settings for this boot (`crate::settings`): JSON on a small read-only raw disk.
    pub const SETTINGS: &str = "gatevm-settings";
    /// Subdirectories of the writable layer's file system: the overlay's upper and work dirs.
    pub const UPPER_DIR: &str = "upper";
    pub const WORK_DIR: &str = "work";
}
/// Present at the root of the initramfs only: the agent there is stage 1.
pub const INITRAMFS_MARKER: &str = "/gatevm-initramfs";
/// The state disk's mount point.
pub const STATE_DIR: &str = "/var/lib/gatevm";
/// The k3s binary the host stages for the k3s profile.
pub const K3S_BIN: &str = "/etc/gatevm/k3s/k3s";
/// Where the guest mounts the k3s profile's staging image (read-only; rebuilt by the host at
/// every start).
pub const K3S_STAGE_DIR: &str = "/etc/gatevm/k3s";
/// The k3s plan ([`crate::plan`]) in the staging directory.
pub const K3S_PLAN: &str = "/etc/gatevm/k3s/plan.json";
/// Manifests staged for k3s's auto-deploy directory.
pub const K3S_STAGED_MANIFESTS: &str = "/etc/gatevm/k3s/manifests";
/// Image archives staged for import.
pub const K3S_STAGED_IMAGES: &str = "/etc/gatevm/k3s/images";
/// The cluster token (0600), for a cluster's server and agents (`--token-file`).
pub const K3S_TOKEN: &str = "/etc/gatevm/k3s/token";
/// k3s's data directory as gatevm plans it: on the state disk.
pub const K3S_DATA_DIR: &str = "/var/lib/gatevm/k3s";
/// The admin kubeconfig k3s writes once its API server is up (unless the plan passes
/// `--write-kubeconfig`); the host reads it through the agent.
pub const K3S_KUBECONFIG: &str = "/etc/rancher/k3s/k3s.yaml";
/// What the guest's k3s profile did at this boot, for `gatevm status`: JSON
/// `{"images": [LINE...], "datastore": [LINE...]}` (airgap imports, datastore recovery).
pub const K3S_REPORT: &str = "/run/gatevm/k3s-report.json";

/// A guest path relative to the root, for host code that joins it onto the mounted root.
pub const fn rel(guest_path: &str) -> &str {
    match guest_path.as_bytes() {
        [b'/', rest @ ..] => match std::str::from_utf8(rest) {
            Ok(r) => r,
            Err(_) => guest_path,
        },
        _ => guest_path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_paths_are_in_the_stage_dir_and_state_on_the_state_disk() {
        for p in [K3S_BIN, K3S_PLAN, K3S_STAGED_MANIFESTS, K3S_STAGED_IMAGES] {
            assert!(p.starts_with(&format!("{K3S_STAGE_DIR}/")), "{p}");
        }
        assert!(K3S_DATA_DIR.starts_with(&format!("{STATE_DIR}/")));
        assert_eq!(rel(K3S_BIN), "etc/gatevm/k3s/k3s");
        // virtio-blk IDs hold at most 20 bytes.
        for s in [disk::BASE, disk::UPPER, disk::STATE, disk::STAGE] {
            assert!(s.len() <= 20 && s.starts_with("gatevm-"), "{s}");
        }
        assert_eq!(rel(GUEST_AGENT), "usr/local/sbin/gatevm-guest");
    }
}
