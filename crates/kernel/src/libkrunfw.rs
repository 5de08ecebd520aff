//! libkrunfw's kernel, the guest kernel of the libkrun backend: its build configuration as
//! recorded from libkrunfw's sources, read like a Debian kernel's `config-<release>` file.
//!
//! libkrunfw ships no configuration: its kernel is built without `CONFIG_IKCONFIG` and without
//! module support, so neither the library nor a running guest can say what it was built with.
//! What it does carry is the kernel's version banner (`Linux version 6.12.91 (...)`), which
//! [`kernel_release_in`] finds in the library file; a recording is used only for the exact
//! kernel release it was taken from ([`recorded`]). A library with another release counts as
//! unknown (every feature missing, the conservative k3s plan) until its configuration is
//! recorded here too.
//!
//! Recorded from libkrunfw's `config-libkrunfw_x86_64` and `config-libkrunfw_aarch64` at the
//! release that builds Linux 6.12.91 (libkrunfw 5.5.0, upstream commit ecfe76bd, the first with
//! its netfilter and bridge options): every option [`crate::kconfig::FEATURES`] reads, plus the
//! netfilter and namespace options the k3s plan's notes rely on. Debian's `libkrunfw5`
//! 5.5.0+ds-1 carries that banner and the bridge and netfilter code these options enable.

use crate::kconfig::{capabilities, Capability};

/// One recorded configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// libkrunfw's release.
    pub libkrunfw: &'static str,
    /// The kernel release in its version banner.
    pub kernel: &'static str,
    /// The architecture (`x86_64`, `aarch64`, as Rust names it).
    pub arch: &'static str,
    /// Where it was recorded from.
    pub source: &'static str,
    /// The configuration lines, as in a kernel `.config`.
    pub config: &'static str,
}

impl Recorded {
    /// The features, read as from any kernel configuration.
    pub fn capabilities(&self) -> Vec<Capability> {
        capabilities(self.config)
    }
}

/// The options common to both architectures of libkrunfw 5.5.0 (Linux 6.12.91).
macro_rules! krunfw_6_12_91 {
    ($extra:literal) => {
        concat!(
            "CONFIG_CGROUP_SCHED=y\n",
            "CONFIG_MEMCG=y\n",
            "CONFIG_CGROUP_PIDS=y\n",
            "CONFIG_CPUSETS=y\n",
            "CONFIG_BLK_CGROUP=y\n",
            "CONFIG_CGROUP_BPF=y\n",
            "CONFIG_BPF_SYSCALL=y\n",
            "CONFIG_OVERLAY_FS=y\n",
            "CONFIG_POSIX_MQUEUE=y\n",
            "CONFIG_NET_NS=y\n",
            "CONFIG_USER_NS=y\n",
            "CONFIG_SECCOMP=y\n",
            "CONFIG_IPV6=y\n",
            "CONFIG_NF_CONNTRACK=y\n",
            "CONFIG_NF_NAT=y\n",
            "CONFIG_NF_TABLES=y\n",
            "CONFIG_NF_TABLES_INET=y\n",
            "CONFIG_NF_TABLES_IPV4=y\n",
            "CONFIG_NF_TABLES_IPV6=y\n",
            "# CONFIG_NF_TABLES_NETDEV is not set\n",
            "CONFIG_NFT_CT=y\n",
            "CONFIG_NFT_NAT=y\n",
            "CONFIG_NFT_MASQ=y\n",
            "CONFIG_NFT_REDIR=y\n",
            "CONFIG_NFT_FIB_IPV4=y\n",
            "# CONFIG_NFT_NUMGEN is not set\n",
            "# CONFIG_NETFILTER_XTABLES is not set\n",
            "# CONFIG_IP_NF_IPTABLES is not set\n",
            "CONFIG_BRIDGE=y\n",
            "CONFIG_BRIDGE_NETFILTER=y\n",
            "CONFIG_VETH=y\n",
            "# CONFIG_VXLAN is not set\n",
            "# CONFIG_IP_VS is not set\n",
            "CONFIG_VIRTIO_VSOCKETS=y\n",
            "CONFIG_VIRTIO_FS=y\n",
            "# CONFIG_MODULES is not set\n",
            "# CONFIG_IKCONFIG is not set\n",
            $extra
        )
    };
}

/// Every recorded configuration.
pub const RECORDED: &[Recorded] = &[
    Recorded {
        libkrunfw: "5.5.0",
        kernel: "6.12.91",
        arch: "x86_64",
        source: "libkrunfw 5.5.0 config-libkrunfw_x86_64 (upstream commit ecfe76bd)",
        config: krunfw_6_12_91!("# CONFIG_INET_DIAG is not set\n"),
    },
    Recorded {
        libkrunfw: "5.5.0",
        kernel: "6.12.91",
        arch: "aarch64",
        source: "libkrunfw 5.5.0 config-libkrunfw_aarch64 (upstream commit ecfe76bd)",
        config: krunfw_6_12_91!("CONFIG_INET_DIAG=y\n"),
    },
];

/// The recording for a kernel release on an architecture, if there is one.
pub fn recorded(kernel_release: &str, arch: &str) -> Option<&'static Recorded> {
    RECORDED
        .iter()
        .find(|r| r.kernel == kernel_release && r.arch == arch)
}

/// The kernel release in the version banner embedded in a libkrunfw library (`Linux version
/// 6.12.91 (...)`): the first banner whose release is made of digits, dots, `-`, `+` and
/// letters, at most 64 bytes.
pub fn kernel_release_in(library: &[u8]) -> Option<String> {
    const BANNER: &[u8] = b"Linux version ";
    let mut rest = library;
    while let Some(i) = find(rest, BANNER) {
        let after = &rest[i + BANNER.len()..];
        let end = after.iter().position(|&b| b == b' ').unwrap_or(after.len());
        let rel = &after[..end];
        let ok = !rel.is_empty()
            && rel.len() <= 64
            && rel[0].is_ascii_digit()
            && rel
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b"._-+~".contains(&b));
        if ok {
            return Some(String::from_utf8_lossy(rel).into_owned());
        }
        rest = after;
    }
    None
}

/// Where `needle` first occurs in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let first = *needle.first()?;
    let mut start = 0;
    while let Some(p) = hay[start..].iter().position(|&b| b == first) {
        let i = start + p;
        if hay.len() - i < needle.len() {
            return None;
        }
        if &hay[i..i + needle.len()] == needle {
            return Some(i);
        }
        start = i + 1;
    }
    None
}

/// What is known of a libkrunfw library's kernel: its release and, when recorded, its
/// configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KrunfwKernel {
    /// The release in its banner, if one was found.
    pub release: Option<String>,
    /// The recording for that release on this architecture.
    pub recorded: Option<&'static Recorded>,
}

impl KrunfwKernel {
    /// Reads the library file's banner and looks its release up for `arch`.
    pub fn of_library(path: &std::path::Path, arch: &str) -> std::io::Result<KrunfwKernel> {
        let bytes = std::fs::read(path)?;
        let release = kernel_release_in(&bytes);
        let recorded = release.as_deref().and_then(|r| recorded(r, arch));
        Ok(KrunfwKernel { release, recorded })
    }

    /// The features: the recording's, or none (every feature counts as missing) when the
    /// release is not recorded.
    pub fn capabilities(&self) -> Vec<Capability> {
        self.recorded
            .map(Recorded::capabilities)
            .unwrap_or_default()
    }

    /// Where the features come from, or why there are none, in one line.
    pub fn source(&self) -> String {
        match (&self.release, self.recorded) {
            (Some(r), Some(rec)) => format!("kernel {r}: recorded configuration, {}", rec.source),
            (Some(r), None) => format!(
                "kernel {r}: no recorded configuration for this release (gatevm knows {}); every \
                 feature counts as missing",
                RECORDED
                    .iter()
                    .map(|x| format!("{} {}", x.kernel, x.arch))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            (None, _) => "no kernel version banner found in the library; every feature counts \
                          as missing"
                .into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kconfig::{Availability, FEATURES};

    #[test]
    fn the_recordings_cover_every_feature() {
        for r in RECORDED {
            for (_, option) in FEATURES {
                let said = r.config.lines().any(|l| {
                    l.starts_with(&format!("{option}=")) || l == format!("# {option} is not set")
                });
                // nft_compat depends on xtables: with xtables off, a real .config has no line.
                assert!(
                    said || *option == "CONFIG_NFT_COMPAT",
                    "{} lacks {option}",
                    r.arch
                );
            }
        }
    }

    #[test]
    fn libkrunfw_has_nftables_bridge_and_veth_but_no_iptables_or_vxlan() {
        let caps = recorded("6.12.91", "x86_64").unwrap().capabilities();
        let get = |n: &str| caps.iter().find(|c| c.name == n).unwrap().availability;
        for n in [
            "nftables",
            "bridge",
            "veth",
            "overlay",
            "vsock",
            "virtiofs",
            "cgroup:memory",
        ] {
            assert_eq!(get(n), Availability::Builtin, "{n}");
        }
        for n in ["xtables", "nft_compat", "vxlan", "ipvs"] {
            assert_eq!(get(n), Availability::Missing, "{n}");
        }
        assert!(recorded("6.12.91", "aarch64").is_some());
        assert!(recorded("6.12.92", "x86_64").is_none());
        assert!(recorded("6.12.91", "riscv64").is_none());
    }

    #[test]
    fn the_banner_gives_the_release() {
        let lib =
            b"\x7fELF\0\0junk Linux version %s\0Linux version 6.12.91 (root@libkrunfw) (gcc)\0";
        assert_eq!(kernel_release_in(lib).as_deref(), Some("6.12.91"));
        assert_eq!(kernel_release_in(b"Linux version "), None);
        assert_eq!(kernel_release_in(b"no banner"), None);
        assert_eq!(kernel_release_in(b"Linux version 6.1\xff9 x"), None);
        let k = KrunfwKernel {
            release: Some("6.12.91".into()),
            recorded: recorded("6.12.91", "x86_64"),
        };
        assert!(k.source().contains("recorded configuration"));
        assert_eq!(k.capabilities().len(), FEATURES.len());
        let k = KrunfwKernel {
            release: Some("7.0.1".into()),
            recorded: None,
        };
        assert!(k.capabilities().is_empty());
        assert!(
            k.source().contains("no recorded configuration"),
            "{}",
            k.source()
        );
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_are_searched_without_panicking(
            v in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
            at in 0usize..300,
        ) {
            let mut v = v;
            let at = at.min(v.len());
            v.splice(at..at, b"Linux version ".iter().copied());
            let _ = kernel_release_in(&v);
        }
    }
}
