//! passt, the second network helper (`--net passt`): a user-mode network stack that talks QEMU's
//! stream protocol like gvproxy, but forwards with the host's own sockets (splicing, no userspace
//! TCP stack for the host side) and takes its port forwards on the command line.
//!
//! The guest sees the same network as with gvproxy (192.168.127.2/24, gateway and DNS .1), so the
//! guest side does not change. Under QEMU, passt is QEMU's vhost-user network back end
//! (`--vhost-user`): it reads and writes the guest's virtqueues in the shared guest memory, so
//! frames are not copied through QEMU's main loop. libkrun has no vhost-user network device;
//! there passt gets its end of the VM's network as an already connected socket (`--fd`).
//!
//! The binary is the runtime's `bin/passt`, which `gatevm setup` builds from Debian trixie's
//! source package: bookworm's packaged passt (2023-03) never completes inbound connections (they
//! stay in SYN_RCVD), and trixie's binary package needs a newer glibc than bookworm's.
//!
//! Host loopback: passt maps the gateway address to the host's loopback unless `--no-map-gw`, so
//! that flag is given unless the user allowed the guest onto the host's loopback.

use crate::forward::{Forward, Proto};
use gatevm_abi::net::{GATEWAY_IP, GUEST_IP, PREFIX_LEN};
use std::net::IpAddr;

/// How passt meets the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasstAttach {
    /// A connected stream socket passt inherits as this descriptor (QEMU's stream protocol).
    Fd(i32),
    /// The vhost-user socket passt listens on (one connection: the VMM's).
    VhostUser(std::path::PathBuf),
}

/// What passt is started with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasstConfig {
    /// passt's end of the VM's network.
    pub attach: PasstAttach,
    /// Host-to-guest forwards (host address, host port, guest port, protocol).
    pub forwards: Vec<Forward>,
    /// Let the guest reach the host's loopback through the gateway address.
    pub allow_host_loopback: bool,
    /// The link MTU (the guest's `eth0` gets the same).
    pub mtu: u32,
}

/// Why a configuration cannot be given to passt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--net passt: {0}")]
pub struct PasstError(String);

impl PasstConfig {
    /// Command-line arguments.
    pub fn args(&self) -> Result<Vec<String>, PasstError> {
        let mut a: Vec<String> = vec![
            "--foreground".into(),
            "--quiet".into(),
            "--ipv4-only".into(),
        ];
        match &self.attach {
            PasstAttach::Fd(fd) => a.extend(["--fd".into(), fd.to_string()]),
            PasstAttach::VhostUser(p) => a.extend([
                "--vhost-user".into(),
                "--socket".into(),
                p.to_string_lossy().into_owned(),
            ]),
        }
        a.extend([
            "--mtu".into(),
            self.mtu.to_string(),
            "--address".into(),
            GUEST_IP.to_string(),
            "--netmask".into(),
            PREFIX_LEN.to_string(),
            "--gateway".into(),
            GATEWAY_IP.to_string(),
            // The guest's resolv.conf names the gateway (as with gvproxy); passt forwards those
            // queries to the host's resolver.
            "--dns-forward".into(),
            GATEWAY_IP.to_string(),
        ]);
        if !self.allow_host_loopback {
            a.push("--no-map-gw".into());
        }
        check_forwards(&self.forwards)?;
        for f in &self.forwards {
            let IpAddr::V4(ip) = f.host_ip else {
                unreachable!("check_forwards refuses IPv6 host addresses");
            };
            a.push(
                match f.proto {
                    Proto::Tcp => "--tcp-ports",
                    Proto::Udp => "--udp-ports",
                }
                .into(),
            );
            a.push(format!("{ip}/{}:{}", f.host_port, f.guest_port));
        }
        Ok(a)
    }
}

/// Whether passt can take these forwards: it runs IPv4 only here.
pub fn check_forwards(forwards: &[Forward]) -> Result<(), PasstError> {
    match forwards.iter().find(|f| !f.host_ip.is_ipv4()) {
        Some(f) => Err(PasstError(format!(
            "forward {f}: passt runs IPv4 only here; use an IPv4 host address"
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fwd(spec: &str) -> Forward {
        crate::parse_forwards(&[spec.to_string()])
            .unwrap()
            .remove(0)
    }

    #[test]
    fn arguments() {
        let c = PasstConfig {
            attach: PasstAttach::Fd(5),
            forwards: vec![fwd("8080:80"), fwd("127.0.0.1:5353:53/udp")],
            allow_host_loopback: false,
            mtu: crate::LARGE_MTU,
        };
        let a = c.args().unwrap().join(" ");
        assert!(
            a.starts_with("--foreground --quiet --ipv4-only --fd 5 --mtu 65520 "),
            "{a}"
        );
        assert!(
            a.contains("--address 192.168.127.2 --netmask 24 --gateway 192.168.127.1"),
            "{a}"
        );
        assert!(a.contains("--dns-forward 192.168.127.1"), "{a}");
        assert!(a.contains("--no-map-gw"), "{a}");
        assert!(a.contains("--tcp-ports 127.0.0.1/8080:80"), "{a}");
        assert!(a.contains("--udp-ports 127.0.0.1/5353:53"), "{a}");

        let open = PasstConfig {
            allow_host_loopback: true,
            forwards: vec![],
            ..c
        };
        let a = open.args().unwrap().join(" ");
        assert!(!a.contains("--no-map-gw") && !a.contains("-ports"), "{a}");

        let vhost = PasstConfig {
            attach: PasstAttach::VhostUser("/run/gatevm/gw/net.sock".into()),
            ..open
        };
        let a = vhost.args().unwrap().join(" ");
        assert!(
            a.starts_with(
                "--foreground --quiet --ipv4-only --vhost-user --socket /run/gatevm/gw/net.sock --mtu 65520 "
            ),
            "{a}"
        );
        assert!(!a.contains("--fd"), "{a}");
    }

    #[test]
    fn ipv6_host_addresses_are_refused() {
        let c = PasstConfig {
            attach: PasstAttach::Fd(5),
            forwards: vec![fwd("[::1]:8080:80")],
            allow_host_loopback: false,
            mtu: crate::LARGE_MTU,
        };
        let e = c.args().unwrap_err().to_string();
        assert!(e.contains("IPv4 only"), "{e}");
    }
}
