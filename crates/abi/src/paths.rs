//! Where things are in the guest's root filesystem. Host code that writes into the instance root
//! uses the relative forms ([`rel`]); the guest uses the absolute ones.

/// The guest agent (PID 1 of the root, stage 2), installed by the host at every start.
pub const GUEST_AGENT: &str = "/usr/local/sbin/gatevm-guest";
/// Present at the root of the initramfs only: the agent there is stage 1.
pub const INITRAMFS_MARKER: &str = "/gatevm-initramfs";
/// The state disk's mount point.
pub const STATE_DIR: &str = "/var/lib/gatevm";
/// The k3s binary the host installs for the k3s profile.
pub const K3S_BIN: &str = "/usr/local/bin/k3s";
/// The directory the host stages the k3s profile into (rebuilt at every start).
pub const K3S_STAGE_DIR: &str = "/etc/gatevm/k3s";
/// The k3s plan ([`crate::plan`]) in the staging directory.
pub const K3S_PLAN: &str = "/etc/gatevm/k3s/plan.json";
/// Manifests staged for k3s's auto-deploy directory.
pub const K3S_STAGED_MANIFESTS: &str = "/etc/gatevm/k3s/manifests";
/// Image archives staged for import.
pub const K3S_STAGED_IMAGES: &str = "/etc/gatevm/k3s/images";
/// k3s's data directory as gatevm plans it: on the state disk.
pub const K3S_DATA_DIR: &str = "/var/lib/gatevm/k3s";
/// The admin kubeconfig k3s writes once its API server is up (unless the plan passes
/// `--write-kubeconfig`); the host reads it through the agent.
pub const K3S_KUBECONFIG: &str = "/etc/rancher/k3s/k3s.yaml";

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
        for p in [K3S_PLAN, K3S_STAGED_MANIFESTS, K3S_STAGED_IMAGES] {
            assert!(p.starts_with(&format!("{K3S_STAGE_DIR}/")), "{p}");
        }
        assert!(K3S_DATA_DIR.starts_with(&format!("{STATE_DIR}/")));
        assert_eq!(rel(K3S_BIN), "usr/local/bin/k3s");
        assert_eq!(rel(GUEST_AGENT), "usr/local/sbin/gatevm-guest");
    }
}
