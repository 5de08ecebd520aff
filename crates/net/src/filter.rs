//! The frame filter between the VM and gvproxy: the guest never reaches gvproxy's control plane.
//!
//! gvproxy serves its HTTP API (forwarder `expose`/`unexpose`, DNS zones, DHCP leases) *inside*
//! the virtual network, on the gateway's port 80, and its main program gives no way to turn that
//! off. Through it any guest process could make gvproxy listen on any host address, replace any
//! host file with a socket, or remove the user's forwards. So gatevm does not connect the VM to
//! gvproxy directly: the VMM gets one end of a socket pair, and the supervisor relays frames
//! between the other end and gvproxy's VM socket, dropping every frame from the guest addressed to
//! the gateway except what the guest needs from it (DNS on port 53, ICMP). Frames from gvproxy to
//! the guest pass untouched. What gets through is decided by [`verdict`], a pure function of the
//! frame's bytes, so it is unit- and property-tested; the relay is [`spawn_relay`].
//!
//! Rules for frames from the guest (everything else passes, as it did without the filter):
//! - IPv4 to the gateway address: a TCP segment that opens a connection (SYN without ACK) passes
//!   only to port 53 (DNS): the API's port 80 and every other port of the gateway stay closed to
//!   the guest. Other TCP segments pass: they belong to connections gvproxy opened itself (the
//!   user's port forwards reach the guest from the gateway's address, and the guest's answers go
//!   back to it), and a TCP listener takes a connection only from a SYN. UDP and ICMP pass (the
//!   API is TCP only; UDP forwards are answered the same way). Any other protocol is dropped, and
//!   so is every fragment (a fragment may hide its header), a header that does not parse, and a
//!   packet whose options push the TCP flags past the frame's end.
//! - VLAN-tagged frames (802.1Q, 802.1ad, QinQ) are dropped: the guest has no use for them and a
//!   tag would hide the packet from the rules above.
//! - IPv6 passes: gvproxy's network is IPv4 only and its API listens on the IPv4 gateway address.
//!
//! The stream between the VMM and gvproxy is QEMU's `-netdev stream` format (libkrun's
//! `unixstream` speaks the same): each frame is preceded by its length as a 4-byte big-endian
//! number. A length beyond [`MAX_FRAME`] ends the relay (the VMM never sends one).

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The gateway address of the guest network ([`gatevm_abi::net::GATEWAY_IP`]).
pub const GATEWAY: [u8; 4] = gatevm_abi::net::GATEWAY_IP.octets();
/// Largest frame relayed: a 65520-byte MTU plus the Ethernet header, with room to spare.
pub const MAX_FRAME: usize = 65_536 + 64;
/// Ports of the gateway the guest may open TCP connections to: DNS.
pub const GATEWAY_TCP_PORTS: [u16; 1] = [53];
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

const ETHERTYPE_IPV4: u16 = 0x0800;
const VLAN_TYPES: [u16; 3] = [0x8100, 0x88a8, 0x9100];
const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

/// Why a frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// A port or protocol of the gateway the guest may not use (the API among them).
    GatewayService,
    /// A fragment addressed to the gateway.
    GatewayFragment,
    /// An IPv4 header to the gateway (or one too short to tell) that does not parse.
    Malformed,
    /// A VLAN-tagged frame.
    Vlan,
}

/// What happens to one frame from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it to gvproxy.
    Pass,
    /// Drop it.
    Drop(Drop),
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Decides the fate of one Ethernet frame sent by the guest.
pub fn verdict(frame: &[u8]) -> Verdict {
    let Some(ethertype) = be16(frame, 12) else {
        // Shorter than an Ethernet header: nothing gvproxy could take as IP.
        return Verdict::Pass;
    };
    if VLAN_TYPES.contains(&ethertype) {
        return Verdict::Drop(Drop::Vlan);
    }
    if ethertype != ETHERTYPE_IPV4 {
        return Verdict::Pass;
    }
    let ip = &frame[14..];
    if ip.len() < 20 {
        return Verdict::Drop(Drop::Malformed);
    }
    if ip[16..20] != GATEWAY {
        return Verdict::Pass;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 || ihl > ip.len() {
        return Verdict::Drop(Drop::Malformed);
    }
    let (flags_frag, proto) = (be16(ip, 6).unwrap_or(0), ip[9]);
    // More fragments, or an offset: either way not a whole packet.
    if flags_frag & 0x3fff != 0 {
        return Verdict::Drop(Drop::GatewayFragment);
    }
    match proto {
        PROTO_ICMP | PROTO_UDP => return Verdict::Pass,
        PROTO_TCP => {}
        _ => return Verdict::Drop(Drop::GatewayService),
    }
    let (Some(port), Some(flags)) = (be16(ip, ihl + 2), ip.get(ihl + 13)) else {
        return Verdict::Drop(Drop::Malformed);
    };
    let opens = flags & TCP_SYN != 0 && flags & TCP_ACK == 0;
    if opens && !GATEWAY_TCP_PORTS.contains(&port) {
        return Verdict::Drop(Drop::GatewayService);
    }
    Verdict::Pass
}

/// Counters of the relay, shared with whoever reports on it.
#[derive(Debug, Default)]
pub struct FilterStats {
    /// Frames from the guest forwarded to gvproxy.
    pub passed: AtomicU64,
    /// Frames from the guest dropped.
    pub dropped: AtomicU64,
}

/// Relays frames between the VMM's end of the network socket pair (`vm`) and gvproxy's VM socket
/// (`helper`) on two threads, filtering the guest's frames with [`verdict`]. When either side
/// closes, or the VMM sends a frame length beyond [`MAX_FRAME`], both sockets are shut down, which
/// ends the other thread too (and gvproxy exits, as it does when its VMM goes away).
pub fn spawn_relay(vm: UnixStream, helper: UnixStream, stats: Arc<FilterStats>) -> io::Result<()> {
    let (vm2, helper2) = (vm.try_clone()?, helper.try_clone()?);
    std::thread::Builder::new()
        .name("net-filter-out".into())
        .spawn(move || {
            if let Err(e) = guest_to_helper(&vm, &helper, &stats) {
                tracing::debug!("network relay (guest to gvproxy) ended: {e}");
            }
            let _ = vm.shutdown(Shutdown::Both);
            let _ = helper.shutdown(Shutdown::Both);
        })?;
    std::thread::Builder::new()
        .name("net-filter-in".into())
        .spawn(move || {
            if let Err(e) = copy_all(&helper2, &vm2) {
                tracing::debug!("network relay (gvproxy to guest) ended: {e}");
            }
            let _ = vm2.shutdown(Shutdown::Both);
            let _ = helper2.shutdown(Shutdown::Both);
        })?;
    Ok(())
}

/// Reads length-prefixed frames from `from`, writes those [`verdict`] passes to `to`, flushing
/// whenever no more input is buffered. Returns at the end of the input.
pub fn filter_stream<R: Read, W: Write>(from: R, to: W, stats: &FilterStats) -> io::Result<()> {
    let mut r = BufReader::with_capacity(256 * 1024, from);
    let mut w = BufWriter::with_capacity(256 * 1024, to);
    let mut frame = vec![0u8; MAX_FRAME];
    loop {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                w.flush()?;
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        let n = u32::from_be_bytes(len) as usize;
        if n > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame of {n} bytes from the VMM exceeds {MAX_FRAME}"),
            ));
        }
        r.read_exact(&mut frame[..n])?;
        match verdict(&frame[..n]) {
            Verdict::Pass => {
                stats.passed.fetch_add(1, Ordering::Relaxed);
                w.write_all(&len)?;
                w.write_all(&frame[..n])?;
            }
            Verdict::Drop(why) => {
                let count = stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                // The first drops say why; a guest hammering the gateway does not fill the log.
                if count <= 10 {
                    tracing::warn!("network filter: dropped a frame from the guest ({why:?})");
                }
            }
        }
        if r.buffer().is_empty() {
            w.flush()?;
        }
    }
}

fn guest_to_helper(vm: &UnixStream, helper: &UnixStream, stats: &FilterStats) -> io::Result<()> {
    filter_stream(vm, helper, stats)
}

fn copy_all(from: &UnixStream, mut to: &UnixStream) -> io::Result<()> {
    let mut from = from;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An Ethernet frame holding an IPv4 packet from the guest to `dst` with `proto` and, for TCP
    /// and UDP, the destination port.
    fn ipv4(dst: [u8; 4], proto: u8, port: u16) -> Vec<u8> {
        let mut f = vec![0u8; 14];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let mut ip = vec![0u8; 20];
        ip[0] = 0x45;
        ip[9] = proto;
        ip[12..16].copy_from_slice(&[192, 168, 127, 2]);
        ip[16..20].copy_from_slice(&dst);
        f.extend_from_slice(&ip);
        let mut l4 = vec![0u8; 20];
        l4[0..2].copy_from_slice(&40000u16.to_be_bytes());
        l4[2..4].copy_from_slice(&port.to_be_bytes());
        l4[13] = TCP_SYN; // a connection opening, for TCP
        f.extend_from_slice(&l4);
        f
    }

    #[test]
    fn the_api_port_of_the_gateway_is_dropped() {
        assert_eq!(
            verdict(&ipv4(GATEWAY, PROTO_TCP, 80)),
            Verdict::Drop(Drop::GatewayService)
        );
        assert_eq!(
            verdict(&ipv4(GATEWAY, PROTO_TCP, 8080)),
            Verdict::Drop(Drop::GatewayService)
        );
        // SCTP or any other protocol to the gateway.
        assert_eq!(
            verdict(&ipv4(GATEWAY, 132, 80)),
            Verdict::Drop(Drop::GatewayService)
        );
    }

    #[test]
    fn dns_dhcp_and_icmp_to_the_gateway_pass() {
        assert_eq!(verdict(&ipv4(GATEWAY, PROTO_UDP, 53)), Verdict::Pass);
        assert_eq!(verdict(&ipv4(GATEWAY, PROTO_TCP, 53)), Verdict::Pass);
        assert_eq!(verdict(&ipv4(GATEWAY, PROTO_UDP, 67)), Verdict::Pass);
        assert_eq!(verdict(&ipv4(GATEWAY, PROTO_ICMP, 0)), Verdict::Pass);
    }

    #[test]
    fn answers_on_connections_gvproxy_opened_pass() {
        // The guest's SYN-ACK and data to the gateway's ephemeral port of a port forward.
        let mut f = ipv4(GATEWAY, PROTO_TCP, 45678);
        f[14 + 20 + 13] = TCP_SYN | TCP_ACK;
        assert_eq!(verdict(&f), Verdict::Pass);
        f[14 + 20 + 13] = TCP_ACK;
        assert_eq!(verdict(&f), Verdict::Pass);
        // A SYN with ACK to the API's port is no opening: the listener answers it with RST.
        let mut f = ipv4(GATEWAY, PROTO_TCP, 80);
        f[14 + 20 + 13] = TCP_SYN | TCP_ACK;
        assert_eq!(verdict(&f), Verdict::Pass);
        // UDP answers of a UDP forward.
        assert_eq!(verdict(&ipv4(GATEWAY, PROTO_UDP, 45678)), Verdict::Pass);
    }

    #[test]
    fn other_destinations_pass_whatever_the_port() {
        assert_eq!(verdict(&ipv4([1, 1, 1, 1], PROTO_TCP, 80)), Verdict::Pass);
        assert_eq!(
            verdict(&ipv4([192, 168, 127, 254], PROTO_TCP, 80)),
            Verdict::Pass
        );
    }

    #[test]
    fn fragments_to_the_gateway_are_dropped() {
        let mut f = ipv4(GATEWAY, PROTO_TCP, 53);
        f[14 + 6] = 0x20; // more fragments
        assert_eq!(verdict(&f), Verdict::Drop(Drop::GatewayFragment));
        let mut f = ipv4(GATEWAY, PROTO_TCP, 53);
        f[14 + 7] = 1; // offset 8: the ports would be elsewhere
        assert_eq!(verdict(&f), Verdict::Drop(Drop::GatewayFragment));
        // Don't-fragment is not a fragment.
        let mut f = ipv4(GATEWAY, PROTO_TCP, 53);
        f[14 + 6] = 0x40;
        assert_eq!(verdict(&f), Verdict::Pass);
    }

    #[test]
    fn options_that_hide_the_ports_are_dropped() {
        // IHL 15 (60 bytes of header) with the frame ending before the ports.
        let mut f = ipv4(GATEWAY, PROTO_TCP, 53);
        f[14] = 0x4f;
        f.truncate(14 + 60);
        assert_eq!(verdict(&f), Verdict::Drop(Drop::Malformed));
        // IHL past the end of the frame.
        let mut f = ipv4(GATEWAY, PROTO_TCP, 53);
        f[14] = 0x4f;
        f.truncate(14 + 30);
        assert_eq!(verdict(&f), Verdict::Drop(Drop::Malformed));
        // IHL below the minimum.
        let mut f = ipv4(GATEWAY, PROTO_TCP, 53);
        f[14] = 0x44;
        assert_eq!(verdict(&f), Verdict::Drop(Drop::Malformed));
        // Options before a port the API listens on: still read at the right place.
        let mut f = ipv4(GATEWAY, PROTO_TCP, 80);
        f[14] = 0x46;
        f.splice(14 + 20..14 + 20, [1u8, 1, 1, 1]);
        assert_eq!(verdict(&f), Verdict::Drop(Drop::GatewayService));
    }

    #[test]
    fn vlan_tags_are_dropped() {
        for t in VLAN_TYPES {
            let mut f = ipv4(GATEWAY, PROTO_TCP, 80);
            f[12..14].copy_from_slice(&t.to_be_bytes());
            assert_eq!(verdict(&f), Verdict::Drop(Drop::Vlan));
        }
    }

    #[test]
    fn short_ipv4_is_dropped_and_other_types_pass() {
        let f = ipv4(GATEWAY, PROTO_TCP, 80);
        assert_eq!(verdict(&f[..14 + 19]), Verdict::Drop(Drop::Malformed));
        let mut arp = vec![0u8; 42];
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(verdict(&arp), Verdict::Pass);
        assert_eq!(verdict(&[0u8; 5]), Verdict::Pass);
    }

    fn framed(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            out.extend_from_slice(&(f.len() as u32).to_be_bytes());
            out.extend_from_slice(f);
        }
        out
    }

    #[test]
    fn the_stream_keeps_passing_frames_whole_and_in_order() {
        let frames = vec![
            ipv4([8, 8, 8, 8], PROTO_TCP, 443),
            ipv4(GATEWAY, PROTO_TCP, 80),
            ipv4(GATEWAY, PROTO_UDP, 53),
            vec![0u8; 60],
        ];
        let stats = FilterStats::default();
        let mut out = Vec::new();
        filter_stream(&framed(&frames)[..], &mut out, &stats).unwrap();
        let kept = vec![frames[0].clone(), frames[2].clone(), frames[3].clone()];
        assert_eq!(out, framed(&kept));
        assert_eq!(stats.passed.load(Ordering::Relaxed), 3);
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn an_oversized_length_ends_the_stream() {
        let mut bytes = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0u8; 64]);
        let err = filter_stream(&bytes[..], Vec::new(), &FilterStats::default()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn the_relay_filters_between_real_sockets() {
        let (vm_side, vm_end) = UnixStream::pair().unwrap();
        let (helper_end, helper_side) = UnixStream::pair().unwrap();
        let stats = Arc::new(FilterStats::default());
        spawn_relay(vm_end, helper_end, stats.clone()).unwrap();
        let (bad, good) = (ipv4(GATEWAY, PROTO_TCP, 80), ipv4(GATEWAY, PROTO_UDP, 53));
        (&vm_side).write_all(&framed(&[bad, good.clone()])).unwrap();
        let mut got = vec![0u8; 4 + good.len()];
        (&helper_side).read_exact(&mut got).unwrap();
        assert_eq!(got, framed(&[good]));
        // The other direction is untouched, even a frame to the gateway's port 80.
        let back = framed(&[ipv4(GATEWAY, PROTO_TCP, 80)]);
        (&helper_side).write_all(&back).unwrap();
        let mut got = vec![0u8; back.len()];
        (&vm_side).read_exact(&mut got).unwrap();
        assert_eq!(got, back);
        // The VMM going away ends the relay: gvproxy sees its end close.
        drop(vm_side);
        let mut rest = Vec::new();
        (&helper_side).read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 1);
    }

    proptest! {
        /// Whatever the bytes, no connection opening (SYN without ACK) to the gateway's port 80
        /// gets through, and the verdict never panics.
        #[test]
        fn no_frame_reaches_the_api(mut f in proptest::collection::vec(any::<u8>(), 0..200),
                                    ihl in 5u8..16, extra in 0usize..40) {
            let _ = verdict(&f);
            if f.len() < 14 + 60 + 4 { f.resize(14 + 60 + 4, 0); }
            f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
            let ip = 14;
            f[ip] = 0x40 | ihl;
            f[ip + 9] = PROTO_TCP;
            f[ip + 16..ip + 20].copy_from_slice(&GATEWAY);
            let l4 = ip + usize::from(ihl) * 4;
            f[l4 + 2..l4 + 4].copy_from_slice(&80u16.to_be_bytes());
            if f.len() > l4 + 13 {
                f[l4 + 13] = (f[l4 + 13] | TCP_SYN) & !TCP_ACK;
            }
            f.truncate((l4 + 4 + extra).min(f.len()));
            prop_assert_ne!(verdict(&f), Verdict::Pass);
        }
    }
}
