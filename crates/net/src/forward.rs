//! Port forward specs: `[ip:]host:guest[/tcp|/udp]`.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

/// Transport protocol of a forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// One host-to-guest port forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Forward {
    /// Host address the listener binds (127.0.0.1 unless the user named one).
    pub host_ip: IpAddr,
    pub host_port: u16,
    pub guest_port: u16,
    pub proto: Proto,
}

impl Forward {
    /// The host socket address.
    pub fn host_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host_ip, self.host_port)
    }
}

impl fmt::Display for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host_ip {
            IpAddr::V6(ip) => write!(
                f,
                "[{ip}]:{}:{}/{}",
                self.host_port, self.guest_port, self.proto
            ),
            IpAddr::V4(ip) => write!(
                f,
                "{ip}:{}:{}/{}",
                self.host_port, self.guest_port, self.proto
            ),
        }
    }
}

/// Why a forward spec is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardSpecError {
    #[error("invalid port forward {spec:?}: expected [ip:]hostport:guestport[/tcp|/udp]")]
    Shape { spec: String },
    #[error("invalid port forward {spec:?}: protocol {proto:?} is not tcp or udp")]
    Proto { spec: String, proto: String },
    #[error("invalid port forward {spec:?}: {what} port {value:?} is not a number in 1-65535")]
    Port {
        spec: String,
        what: &'static str,
        value: String,
    },
    #[error("invalid port forward {spec:?}: {value:?} is not an IP address")]
    Addr { spec: String, value: String },
    #[error("host port {addr}/{proto} is forwarded twice")]
    Duplicate { addr: SocketAddr, proto: Proto },
}

fn port(spec: &str, what: &'static str, value: &str) -> Result<u16, ForwardSpecError> {
    let bad = || ForwardSpecError::Port {
        spec: spec.to_string(),
        what,
        value: value.to_string(),
    };
    if value.is_empty() || value.len() > 5 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match value.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        _ => Err(bad()),
    }
}

impl FromStr for Forward {
    type Err = ForwardSpecError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let shape = || ForwardSpecError::Shape {
            spec: spec.to_string(),
        };
        let (rest, proto) = match spec.rsplit_once('/') {
            Some((rest, p)) => {
                let proto = match p {
                    "tcp" => Proto::Tcp,
                    "udp" => Proto::Udp,
                    _ => {
                        return Err(ForwardSpecError::Proto {
                            spec: spec.to_string(),
                            proto: p.to_string(),
                        })
                    }
                };
                (rest, proto)
            }
            None => (spec, Proto::Tcp),
        };
        // Bracketed IPv6 host address: [::1]:8080:80
        let (ip_text, ports) = if let Some(stripped) = rest.strip_prefix('[') {
            let (ip, after) = stripped.split_once(']').ok_or_else(shape)?;
            let ports = after.strip_prefix(':').ok_or_else(shape)?;
            (Some(ip), ports)
        } else {
            let parts: Vec<&str> = rest.split(':').collect();
            match parts.len() {
                2 => (None, rest),
                3 => (Some(parts[0]), &rest[parts[0].len() + 1..]),
                _ => return Err(shape()),
            }
        };
        let (h, g) = ports.split_once(':').ok_or_else(shape)?;
        if g.contains(':') {
            return Err(shape());
        }
        let host_ip = match ip_text {
            None => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Some(t) => t.parse::<IpAddr>().map_err(|_| ForwardSpecError::Addr {
                spec: spec.to_string(),
                value: t.to_string(),
            })?,
        };
        Ok(Forward {
            host_ip,
            host_port: port(spec, "host", h)?,
            guest_port: port(spec, "guest", g)?,
            proto,
        })
    }
}

/// Parses a list of specs and refuses the same host address, port and protocol twice
/// (an unspecified address overlaps every address of its family).
pub fn parse_forwards<S: AsRef<str>>(specs: &[S]) -> Result<Vec<Forward>, ForwardSpecError> {
    let mut out: Vec<Forward> = Vec::with_capacity(specs.len());
    for s in specs {
        let f: Forward = s.as_ref().parse()?;
        let clash = out.iter().any(|o| {
            o.host_port == f.host_port
                && o.proto == f.proto
                && o.host_ip.is_ipv4() == f.host_ip.is_ipv4()
                && (o.host_ip == f.host_ip
                    || o.host_ip.is_unspecified()
                    || f.host_ip.is_unspecified())
        });
        if clash {
            return Err(ForwardSpecError::Duplicate {
                addr: f.host_addr(),
                proto: f.proto,
            });
        }
        out.push(f);
    }
    Ok(out)
}

/// Checks that the host side of a forward can be bound right now (nothing else holds it).
pub fn check_host_port_free(f: &Forward) -> std::io::Result<()> {
    match f.proto {
        Proto::Tcp => std::net::TcpListener::bind(f.host_addr()).map(drop),
        Proto::Udp => std::net::UdpSocket::bind(f.host_addr()).map(drop),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_valid_specs() {
        let f: Forward = "8080:80".parse().unwrap();
        assert_eq!(f.host_ip, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!((f.host_port, f.guest_port, f.proto), (8080, 80, Proto::Tcp));
        let f: Forward = "0.0.0.0:53:53/udp".parse().unwrap();
        assert!(f.host_ip.is_unspecified());
        assert_eq!(f.proto, Proto::Udp);
        let f: Forward = "[::1]:1:65535/tcp".parse().unwrap();
        assert_eq!(f.host_ip, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(f.to_string(), "[::1]:1:65535/tcp");
        assert_eq!(
            "8080:80".parse::<Forward>().unwrap().to_string(),
            "127.0.0.1:8080:80/tcp"
        );
    }

    #[test]
    fn refuses_bad_specs() {
        for bad in [
            "",
            "80",
            "0:80",
            "80:0",
            "65536:80",
            "80:70000",
            "a:80",
            "80:b",
            "-1:80",
            "80:80/sctp",
            "80:80/",
            "1.2.3:80:80",
            "x:80:80",
            "::1:80:80",
            "[::1]80:80",
            "[::1:80:80",
            "1:2:3:4",
            "+80:80",
            " 80:80",
            "080080:80",
            "80:80/tcp/udp",
        ] {
            assert!(bad.parse::<Forward>().is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn duplicates_refused() {
        assert!(parse_forwards(&["8080:80", "8081:80"]).is_ok());
        assert!(parse_forwards(&["8080:80", "8080:80/udp"]).is_ok());
        assert!(matches!(
            parse_forwards(&["8080:80", "8080:81"]),
            Err(ForwardSpecError::Duplicate { .. })
        ));
        assert!(matches!(
            parse_forwards(&["0.0.0.0:8080:80", "127.0.0.1:8080:81"]),
            Err(ForwardSpecError::Duplicate { .. })
        ));
    }

    #[test]
    fn port_in_use_detected() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        let f: Forward = format!("{p}:80").parse().unwrap();
        assert!(check_host_port_free(&f).is_err());
        drop(l);
        // Free now, unless a parallel test took the port meanwhile: then it must be in use.
        assert!(
            check_host_port_free(&f).is_ok()
                || std::net::TcpListener::bind(("127.0.0.1", p)).is_err()
        );
    }

    /// Port numbers, often at and around the edges of 1-65535.
    fn port_number() -> impl Strategy<Value = u32> {
        prop_oneof![0u32..3, 65_533u32..65_539, 0u32..70_000]
    }

    proptest! {
        /// Whatever the text: what is accepted has ports in 1-65535 and prints back to a spec
        /// that parses to the same forward; what is refused is named in a one-line message.
        #[test]
        fn any_spec_is_accepted_whole_or_refused_by_name(s in ".{0,40}|[0-9:./\\[\\]a-fudpt]{0,24}") {
            match s.parse::<Forward>() {
                Ok(f) => {
                    prop_assert!(f.host_port >= 1 && f.guest_port >= 1);
                    prop_assert_eq!(f.to_string().parse::<Forward>(), Ok(f));
                }
                Err(e) => {
                    let msg = e.to_string();
                    prop_assert!(msg.starts_with(&format!("invalid port forward {s:?}: ")), "{}", msg);
                    prop_assert!(!msg.contains('\n'), "{}", msg);
                }
            }
        }

        /// `host:guest[/proto]` with any numbers: accepted exactly when both are in 1-65535,
        /// else the error names the first port out of range and its text.
        #[test]
        fn ports_are_checked_against_their_range(h in port_number(), g in port_number(), proto in "|/tcp|/udp") {
            let spec = format!("{h}:{g}{proto}");
            let ok = |p: u32| (1..=65535).contains(&p);
            match spec.parse::<Forward>() {
                Ok(f) => {
                    prop_assert!(ok(h) && ok(g));
                    prop_assert_eq!((u32::from(f.host_port), u32::from(f.guest_port)), (h, g));
                    prop_assert_eq!(f.host_ip, IpAddr::from([127, 0, 0, 1]));
                    prop_assert_eq!(f.proto, if proto == "/udp" { Proto::Udp } else { Proto::Tcp });
                }
                Err(e) => {
                    let (what, value) = if ok(h) { ("guest", g) } else { ("host", h) };
                    prop_assert!(!ok(h) || !ok(g));
                    prop_assert_eq!(e, ForwardSpecError::Port { spec: spec.clone(), what, value: value.to_string() });
                }
            }
        }

        #[test]
        fn display_roundtrips(a in any::<[u8;4]>(), h in 1u16.., g in 1u16.., udp in any::<bool>()) {
            let f = Forward { host_ip: IpAddr::from(a), host_port: h, guest_port: g, proto: if udp { Proto::Udp } else { Proto::Tcp } };
            prop_assert_eq!(f.to_string().parse::<Forward>().unwrap(), f);
        }
    }
}
