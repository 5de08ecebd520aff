//! Network setup with plain ioctls on an `AF_INET` datagram socket (no `ip` binary): `lo` up,
//! `eth0` with the static user-mode-network address, default route, `/etc/resolv.conf`.

use crate::sys::Context;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

/// The guest's address, netmask and gateway: the contract's ([`gatevm_abi::net`]).
pub(crate) use gatevm_abi::net::{GATEWAY_IP as GATEWAY, GUEST_IP as GUEST_ADDR, NETMASK};
/// The interface configured.
pub(crate) const IFACE: &str = "eth0";

/// `struct rtentry` of `<linux/route.h>` (libc has it only for musl).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

const RTF_UP: libc::c_ushort = 0x0001;
const RTF_GATEWAY: libc::c_ushort = 0x0002;

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and sockaddr is plain data;
    // this is the conversion the socket API is designed around.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// An `AF_INET` datagram socket for interface ioctls.
pub(crate) struct NetCtl {
    fd: OwnedFd,
}

impl NetCtl {
    /// Opens the control socket.
    pub(crate) fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the result is checked and owned right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error()).ctx(|| "socket(AF_INET)".into());
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(NetCtl { fd })
    }

    fn ifreq(name: &str) -> io::Result<libc::ifreq> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad interface name {name:?}"),
            ));
        }
        // SAFETY: ifreq is plain data for which all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        Ok(req)
    }

    fn ioctl(
        &self,
        what: &str,
        name: &str,
        op: libc::c_ulong,
        req: &mut libc::ifreq,
    ) -> io::Result<()> {
        // SAFETY: every request used here (SIOC[GS]IFFLAGS, SIOCSIFADDR, SIOCSIFNETMASK, SIOCSIFMTU) reads or
        // writes one `struct ifreq`, which `req` points to for the duration of the call.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), op as _, req as *mut libc::ifreq) };
        if rc < 0 {
            return Err(io::Error::last_os_error()).ctx(|| format!("{what} {name}"));
        }
        Ok(())
    }

    /// Sets `IFF_UP` on an interface.
    pub(crate) fn up(&self, name: &str) -> io::Result<()> {
        let mut req = Self::ifreq(name)?;
        self.ioctl("SIOCGIFFLAGS", name, libc::SIOCGIFFLAGS, &mut req)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        self.ioctl("SIOCSIFFLAGS", name, libc::SIOCSIFFLAGS, &mut req)
    }

    /// Renames a (down) interface.
    pub(crate) fn rename(&self, name: &str, new: &str) -> io::Result<()> {
        let mut req = Self::ifreq(name)?;
        let newreq = Self::ifreq(new)?;
        req.ifr_ifru.ifru_newname = newreq.ifr_name;
        self.ioctl("SIOCSIFNAME", name, libc::SIOCSIFNAME, &mut req)
    }

    /// Sets an interface's MTU.
    pub(crate) fn set_mtu(&self, name: &str, mtu: u32) -> io::Result<()> {
        let mut req = Self::ifreq(name)?;
        req.ifr_ifru.ifru_mtu = mtu as libc::c_int;
        self.ioctl("SIOCSIFMTU", name, libc::SIOCSIFMTU, &mut req)
    }

    /// Sets an interface's IPv4 address and netmask.
    pub(crate) fn set_addr(&self, name: &str, addr: Ipv4Addr, mask: Ipv4Addr) -> io::Result<()> {
        let mut req = Self::ifreq(name)?;
        req.ifr_ifru.ifru_addr = sockaddr_in(addr);
        self.ioctl("SIOCSIFADDR", name, libc::SIOCSIFADDR, &mut req)?;
        let mut req = Self::ifreq(name)?;
        req.ifr_ifru.ifru_netmask = sockaddr_in(mask);
        self.ioctl("SIOCSIFNETMASK", name, libc::SIOCSIFNETMASK, &mut req)
    }

    /// Adds the default route via `gw` (an existing one is fine).
    pub(crate) fn add_default_route(&self, gw: Ipv4Addr, dev: &str) -> io::Result<()> {
        let mut dev_c: Vec<libc::c_char> = dev.bytes().map(|b| b as libc::c_char).collect();
        dev_c.push(0);
        let mut rt = RtEntry {
            rt_pad1: 0,
            rt_dst: sockaddr_in(Ipv4Addr::UNSPECIFIED),
            rt_gateway: sockaddr_in(gw),
            rt_genmask: sockaddr_in(Ipv4Addr::UNSPECIFIED),
            rt_flags: RTF_UP | RTF_GATEWAY,
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            rt_dev: dev_c.as_mut_ptr(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        // SAFETY: SIOCADDRT reads one `struct rtentry` (matching layout above) and the
        // NUL-terminated device name it points to; both outlive the call.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::SIOCADDRT as _,
                &mut rt as *mut RtEntry,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EEXIST) {
                return Ok(());
            }
            return Err(e).ctx(|| format!("SIOCADDRT default via {gw}"));
        }
        Ok(())
    }
}

/// Whether a virtio device of `device_id` (1 net, 2 block) exists on the virtio bus.
pub(crate) fn virtio_device_present(device_id: u32) -> bool {
    let Ok(entries) = std::fs::read_dir("/sys/bus/virtio/devices") else {
        return false;
    };
    entries.flatten().any(|e| {
        std::fs::read_to_string(e.path().join("device"))
            .ok()
            .and_then(|s| u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
            == Some(device_id)
    })
}

/// Waits until `/sys/class/net/<name>` exists.
pub(crate) fn wait_for_iface(name: &str, timeout: Duration) -> bool {
    let path = Path::new("/sys/class/net").join(name);
    let deadline = Instant::now() + timeout;
    loop {
        if path.exists() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The interface whose MAC address is `mac` (as `/sys/class/net/*/address` shows it).
pub(crate) fn iface_with_mac(mac: &str) -> Option<String> {
    std::fs::read_dir("/sys/class/net")
        .ok()?
        .flatten()
        .find(|e| {
            std::fs::read_to_string(e.path().join("address"))
                .is_ok_and(|a| a.trim().eq_ignore_ascii_case(mac))
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
}

/// Gives the NICs their names by MAC: the cluster NIC becomes
/// [`gatevm_abi::net::CLUSTER_IFACE`] and the guest's own NIC [`IFACE`] (the kernel names them in
/// the order it finds the devices, which is not the order the VMM lists them in).
fn name_nics(ctl: &NetCtl, cluster_mac: &str, problems: &mut Vec<String>) {
    let cluster = gatevm_abi::net::CLUSTER_IFACE;
    match iface_with_mac(cluster_mac) {
        Some(n) if n == cluster => {}
        Some(n) => {
            if let Err(e) = ctl.rename(&n, cluster) {
                problems.push(e.to_string());
            }
        }
        None => problems.push(format!("no NIC with the cluster MAC {cluster_mac}")),
    }
    match iface_with_mac(gatevm_abi::net::GUEST_MAC) {
        Some(n) if n == IFACE => {}
        Some(n) => {
            if let Err(e) = ctl.rename(&n, IFACE) {
                problems.push(e.to_string());
            }
        }
        None => {}
    }
}

/// Configures the cluster NIC (see [`name_nics`]) with `ip` on the cluster network; the kernel
/// adds the network's route.
fn setup_cluster(ctl: &NetCtl, ip: Ipv4Addr, problems: &mut Vec<String>) -> bool {
    let cluster = gatevm_abi::net::CLUSTER_IFACE;
    let mask = Ipv4Addr::from(u32::MAX << (32 - u32::from(gatevm_abi::net::CLUSTER_PREFIX_LEN)));
    match ctl
        .set_addr(cluster, ip, mask)
        .and_then(|_| ctl.up(cluster))
    {
        Ok(()) => true,
        Err(e) => {
            problems.push(e.to_string());
            false
        }
    }
}

/// Text of the guest's `/etc/resolv.conf`.
pub(crate) fn resolv_conf() -> String {
    format!("nameserver {GATEWAY}\n")
}

/// Writes `/etc/resolv.conf` unless it already says the same (replacing a symlink).
pub(crate) fn write_resolv_conf(path: &Path) -> io::Result<()> {
    let want = resolv_conf();
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if m.file_type().is_symlink() {
            std::fs::remove_file(path).ctx(|| format!("remove {}", path.display()))?;
        } else if std::fs::read_to_string(path).ok().as_deref() == Some(want.as_str()) {
            return Ok(());
        }
    }
    std::fs::write(path, want).ctx(|| format!("write {}", path.display()))
}

/// The `/etc/hosts` text with a `127.0.1.1 <hostname>` line added when the name is missing;
/// `None` when nothing needs to change.
pub(crate) fn hosts_with(current: Option<&str>, hostname: &str) -> Option<String> {
    match current {
        None => Some(format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t{hostname}\n"
        )),
        Some(text) => {
            let known = text.lines().any(|l| {
                let l = l.split('#').next().unwrap_or("");
                l.split_whitespace().skip(1).any(|n| n == hostname)
            });
            if known {
                return None;
            }
            let mut out = text.to_string();
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(&format!("127.0.1.1\t{hostname}\n"));
            Some(out)
        }
    }
}

/// Brings `lo` up and, when `net`, configures `eth0` (its MTU when given), the default route and
/// DNS, and with `cluster` the cluster NIC at that address. Returns whether `eth0` got its
/// address and one message per problem.
pub(crate) fn setup(
    net: bool,
    hostname: &str,
    mtu: Option<u32>,
    cluster: Option<Ipv4Addr>,
) -> (bool, Vec<String>) {
    let mut problems = Vec::new();
    let ctl = match NetCtl::open() {
        Ok(c) => c,
        Err(e) => return (false, vec![e.to_string()]),
    };
    if let Err(e) = ctl.up("lo") {
        problems.push(e.to_string());
    }
    let hosts = Path::new("/etc/hosts");
    if let Some(text) = hosts_with(std::fs::read_to_string(hosts).ok().as_deref(), hostname) {
        if let Err(e) = std::fs::write(hosts, text) {
            problems.push(format!("write /etc/hosts: {e}"));
        }
    }
    if !net {
        return (false, problems);
    }
    let wait = if virtio_device_present(1) {
        Duration::from_secs(2)
    } else {
        Duration::from_millis(200)
    };
    if let Some(ip) = cluster {
        // Both NICs must be there before they are named by MAC.
        let _ = wait_for_iface("eth1", wait);
        name_nics(&ctl, &gatevm_abi::net::cluster_mac(ip), &mut problems);
        setup_cluster(&ctl, ip, &mut problems);
    }
    if !wait_for_iface(IFACE, wait) {
        problems.push(format!("{IFACE} did not appear"));
        return (false, problems);
    }
    if let Some(mtu) = mtu {
        if let Err(e) = ctl.set_mtu(IFACE, mtu) {
            problems.push(e.to_string());
        }
    }
    let addressed = ctl
        .set_addr(IFACE, GUEST_ADDR, NETMASK)
        .and_then(|_| ctl.up(IFACE));
    let configured = addressed.is_ok();
    if let Err(e) = addressed.and_then(|_| ctl.add_default_route(GATEWAY, IFACE)) {
        problems.push(e.to_string());
    }
    if let Err(e) = write_resolv_conf(Path::new("/etc/resolv.conf")) {
        problems.push(e.to_string());
    }
    (configured, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtentry_layout_matches_the_kernel() {
        // x86_64: 8 + 3*16 + 2 + 2 (+4 pad) + 8 + 8 + 2 (+6) + 8 + 8 + 8 + 2 (+6) = 120.
        assert_eq!(std::mem::size_of::<RtEntry>(), 120);
    }

    #[test]
    fn sockaddr_bytes() {
        let sa = sockaddr_in(GUEST_ADDR);
        assert_eq!(sa.sa_family as i32, libc::AF_INET);
        let data: Vec<u8> = sa.sa_data.iter().map(|&c| c as u8).collect();
        assert_eq!(&data[2..6], &[192, 168, 127, 2]);
    }

    #[test]
    fn hosts_editing() {
        assert_eq!(
            hosts_with(Some("127.0.0.1 localhost\n127.0.1.1 node\n"), "node"),
            None
        );
        assert_eq!(
            hosts_with(Some("127.0.0.1 localhost"), "node").unwrap(),
            "127.0.0.1 localhost\n127.0.1.1\tnode\n"
        );
        // A name inside a comment or as an address does not count.
        assert!(hosts_with(Some("# node\n"), "node").is_some());
        assert!(hosts_with(None, "gatevm")
            .unwrap()
            .contains("127.0.1.1\tgatevm"));
    }

    #[test]
    fn resolv_conf_written_once_and_symlink_replaced() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("resolv.conf");
        std::os::unix::fs::symlink("/nonexistent/stub", &p).unwrap();
        write_resolv_conf(&p).unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "nameserver 192.168.127.1\n"
        );
        assert!(!std::fs::symlink_metadata(&p)
            .unwrap()
            .file_type()
            .is_symlink());
        write_resolv_conf(&p).unwrap();
    }

    #[test]
    fn loopback_ioctls_work_here() {
        // Reading flags of lo is harmless and exercises the ifreq plumbing.
        let ctl = NetCtl::open().unwrap();
        let mut req = NetCtl::ifreq("lo").unwrap();
        ctl.ioctl("SIOCGIFFLAGS", "lo", libc::SIOCGIFFLAGS, &mut req)
            .unwrap();
        assert!(NetCtl::ifreq("").is_err());
        assert!(NetCtl::ifreq("a-very-long-interface-name").is_err());
    }
}
