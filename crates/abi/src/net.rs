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

#[cfg(test)]
mod tests {
    use super::*;

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
