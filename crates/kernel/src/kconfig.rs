//! What a guest kernel can do for the payloads, read from its build configuration.

use std::path::Path;

/// How a kernel feature is available.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum Availability {
    /// Built into the kernel.
    Builtin,
    /// A loadable module (gatevm-guest loads it at boot).
    Module,
    /// Not configured.
    Missing,
}

/// One feature the payloads (containerd, runc, CNI, kube-proxy, flannel) care about.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Capability {
    /// Short name (`overlay`, `nft_compat`, `cgroup:memory`, ...).
    pub name: &'static str,
    /// The kernel option it comes from.
    pub option: &'static str,
    /// Built in, a module, or missing.
    pub availability: Availability,
}

/// The features reported, with the kernel option that provides each.
pub const FEATURES: &[(&str, &str)] = &[
    ("cgroup:cpu", "CONFIG_CGROUP_SCHED"),
    ("cgroup:memory", "CONFIG_MEMCG"),
    ("cgroup:pids", "CONFIG_CGROUP_PIDS"),
    ("cgroup:cpuset", "CONFIG_CPUSETS"),
    ("cgroup:io", "CONFIG_BLK_CGROUP"),
    ("overlay", "CONFIG_OVERLAY_FS"),
    ("mqueue", "CONFIG_POSIX_MQUEUE"),
    ("nftables", "CONFIG_NF_TABLES"),
    ("nft_compat", "CONFIG_NFT_COMPAT"),
    ("xtables", "CONFIG_NETFILTER_XTABLES"),
    ("bridge", "CONFIG_BRIDGE"),
    ("veth", "CONFIG_VETH"),
    ("vxlan", "CONFIG_VXLAN"),
    ("ipvs", "CONFIG_IP_VS"),
    ("vsock", "CONFIG_VIRTIO_VSOCKETS"),
    ("virtiofs", "CONFIG_VIRTIO_FS"),
];

/// Reads the features from a kernel configuration (the `config-<release>` file of a Debian
/// kernel package). Lines other than `CONFIG_X=y|m` count as not configured.
pub fn capabilities(config: &str) -> Vec<Capability> {
    FEATURES
        .iter()
        .map(|&(name, option)| {
            let value = config.lines().find_map(|l| {
                let (k, v) = l.trim().split_once('=')?;
                (k == option).then_some(v)
            });
            let availability = match value {
                Some("y") => Availability::Builtin,
                Some("m") => Availability::Module,
                _ => Availability::Missing,
            };
            Capability {
                name,
                option,
                availability,
            }
        })
        .collect()
}

/// Reads the features from a configuration file.
pub fn capabilities_of(config_file: &Path) -> std::io::Result<Vec<Capability>> {
    Ok(capabilities(&std::fs::read_to_string(config_file)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_builtin_module_and_missing() {
        let cfg = "CONFIG_OVERLAY_FS=m\nCONFIG_VIRTIO_FS=y\n# CONFIG_VXLAN is not set\nCONFIG_MEMCG=y\nCONFIG_IP_VS=n\n";
        let caps = capabilities(cfg);
        assert_eq!(caps.len(), FEATURES.len());
        let get = |n: &str| caps.iter().find(|c| c.name == n).unwrap().availability;
        assert_eq!(get("overlay"), Availability::Module);
        assert_eq!(get("virtiofs"), Availability::Builtin);
        assert_eq!(get("cgroup:memory"), Availability::Builtin);
        assert_eq!(get("vxlan"), Availability::Missing);
        assert_eq!(get("ipvs"), Availability::Missing);
        assert_eq!(get("nft_compat"), Availability::Missing);
    }

    #[test]
    fn option_names_must_match_exactly() {
        // CONFIG_BRIDGE_NETFILTER must not count as CONFIG_BRIDGE.
        let caps = capabilities("CONFIG_BRIDGE_NETFILTER=m\n");
        assert_eq!(
            caps.iter()
                .find(|c| c.name == "bridge")
                .unwrap()
                .availability,
            Availability::Missing
        );
    }
}
