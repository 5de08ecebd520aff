//! The guest's network, the same under gvproxy and passt: 192.168.127.0/24, the guest at .2 with
//! a fixed MAC, the gateway and DNS server at .1 (gvproxy also NATs .254 to the host's loopback).

use std::net::Ipv4Addr;

/// The guest's address.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 127, 2);
/// The gateway and DNS server.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 127, 1);
/// The address gvproxy NATs to the host's 127.0.0.1.
pub const HOST_ALIAS_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 127, 254);
/// The prefix length of the guest network.
pub const PREFIX_LEN: u8 = 24;
/// The netmask of the guest network.
pub const NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
/// The guest's fixed MAC address (gvproxy's static DHCP lease for [`GUEST_IP`]).
pub const GUEST_MAC: &str = "5a:94:ef:e4:0c:ee";

/// The MTU of the guest's link with its network helper under QEMU: passt's default and the
/// largest both helpers take (one frame carries a ~64 KiB TCP segment where 1500 would take 45
/// frames, each costly to an emulated guest; see docs/benchmarks.md).
pub const LARGE_MTU: u32 = 65520;
/// The usual Ethernet MTU, kept where the VMM's network device is not known to take larger
/// frames (libkrun). The guest leaves the device's MTU alone when the command line names none.
pub const ETHERNET_MTU: u32 = 1500;

/// The cluster network: the private link between the VMs of one k3s cluster (a server instance
/// and the agents that joined it), on a second NIC the guest names [`CLUSTER_IFACE`]. Frames go
/// from VM to VM through the server's supervisor, never into the host's network stack.
pub const CLUSTER_NET: Ipv4Addr = Ipv4Addr::new(192, 168, 200, 0);
/// Its prefix length.
pub const CLUSTER_PREFIX_LEN: u8 = 24;
/// The server's address on it.
pub const CLUSTER_SERVER_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 200, 10);
/// The first and last address an agent gets.
pub const CLUSTER_AGENT_FIRST: u8 = 11;
/// See [`CLUSTER_AGENT_FIRST`].
pub const CLUSTER_AGENT_LAST: u8 = 250;
/// The guest's name for its cluster NIC.
pub const CLUSTER_IFACE: &str = "cl0";

/// The cluster NIC's MAC for an address on the cluster network (locally administered, unique
/// per address).
pub fn cluster_mac(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("5a:94:ef:c8:{:02x}:{:02x}", o[2], o[3])
}

/// Whether `ip` is an address a cluster node may have (server or agent).
pub fn is_cluster_node_ip(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    let net = CLUSTER_NET.octets();
    o[..3] == net[..3]
        && (ip == CLUSTER_SERVER_IP || (CLUSTER_AGENT_FIRST..=CLUSTER_AGENT_LAST).contains(&o[3]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_addresses_and_macs() {
        assert!(is_cluster_node_ip(CLUSTER_SERVER_IP));
        assert!(is_cluster_node_ip(Ipv4Addr::new(192, 168, 200, 11)));
        assert!(is_cluster_node_ip(Ipv4Addr::new(192, 168, 200, 250)));
        for bad in [
            [192, 168, 200, 1],
            [192, 168, 200, 251],
            [192, 168, 127, 2],
            [10, 0, 0, 11],
        ] {
            assert!(!is_cluster_node_ip(Ipv4Addr::from(bad)), "{bad:?}");
        }
        assert_eq!(cluster_mac(CLUSTER_SERVER_IP), "5a:94:ef:c8:c8:0a");
        assert_ne!(cluster_mac(CLUSTER_SERVER_IP), GUEST_MAC);
    }

    #[test]
    fn addresses_share_the_guest_network() {
        let mask = u32::from(NETMASK);
        assert_eq!(mask.count_ones(), u32::from(PREFIX_LEN));
        for a in [GATEWAY_IP, HOST_ALIAS_IP] {
            assert_eq!(u32::from(a) & mask, u32::from(GUEST_IP) & mask, "{a}");
        }
        // Six two-digit hex octets; the first says unicast (bit 0 clear, or no DHCP lease is
        // ever matched) and locally administered (bit 1 set: no vendor's address).
        let octets: Vec<u8> = GUEST_MAC
            .split(':')
            .map(|o| {
                assert_eq!(o.len(), 2, "{GUEST_MAC}");
                u8::from_str_radix(o, 16).unwrap()
            })
            .collect();
        assert_eq!(octets.len(), 6, "{GUEST_MAC}");
        assert_eq!(octets[0] & 0b11, 0b10, "{GUEST_MAC}");
    }
}
