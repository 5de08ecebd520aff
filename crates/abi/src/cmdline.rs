//! The `gatevm.*` keys of the kernel command line (`/proc/cmdline`), and of the arguments when
//! libkrun's init starts the guest (libkrun writes the kernel command line itself).
//!
//! | key               | values                    | default      |
//! |-------------------|---------------------------|--------------|
//! | `gatevm.hostname` | a host name               | `gatevm`     |
//! | `gatevm.net`      | `0` or `1`                | `1`          |
//! | `gatevm.agent`    | `serial`/`vsock`          | `serial`     |
//! | `gatevm.payload`  | `containerd`/`k3s`/`none` | `containerd` |
//! | `gatevm.vmm`      | `qemu`/`krun`             | `qemu`       |

/// Default host name when the command line names none (or an invalid one).
pub const DEFAULT_HOSTNAME: &str = "gatevm";

/// Which channel carries the agent protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentTransport {
    /// The virtio-serial port named `gatevm.agent` (the protocol's `AGENT_PORT_NAME`) (QEMU).
    Serial,
    /// A vsock listener on the protocol's `AGENT_VSOCK_PORT` (libkrun).
    Vsock,
}

/// Which services the guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadKind {
    /// Nothing, and no state disk: a throwaway VM (`gatevm vm-run`), whose root may not even
    /// have containerd.
    None,
    /// containerd, with its state on the state disk.
    Containerd,
    /// containerd configured for k3s, then `k3s server` using it (the k3s profile).
    K3s,
}

impl PayloadKind {
    /// Whether any payload runs (and so the state disk is set up).
    pub fn runs_anything(self) -> bool {
        self != PayloadKind::None
    }
}

/// The MTUs `gatevm.mtu` accepts: IPv4's minimum to the largest an Ethernet frame on virtio-net
/// can carry.
pub const MIN_MTU: u32 = 68;
pub const MAX_MTU: u32 = 65535;

/// Settings taken from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmdline {
    /// Host name to set.
    pub hostname: String,
    /// Configure `eth0` with the static gvproxy/passt address.
    pub net: bool,
    /// Agent channel.
    pub agent: AgentTransport,
    /// What to run (and whether to keep state on the state disk).
    pub payload: PayloadKind,
    /// Started by libkrun's init: power-off is a reboot there (libkrun ends the VM on reset).
    pub krun: bool,
    /// MTU of `eth0` when not the device's default (passt: 65520).
    pub mtu: Option<u32>,
    /// The host attached a settings disk ([`crate::paths::disk::SETTINGS`]): wait for it.
    pub settings: bool,
}

impl Default for Cmdline {
    fn default() -> Self {
        Cmdline {
            hostname: DEFAULT_HOSTNAME.to_string(),
            net: true,
            agent: AgentTransport::Serial,
            payload: PayloadKind::Containerd,
            krun: false,
            mtu: None,
            settings: false,
        }
    }
}

impl Cmdline {
    /// The `gatevm.*` words for these settings, as the host puts them on the kernel command line:
    /// the host name always, every other key only when it differs from its default (so the line
    /// stays short and an older guest reads what it knows). [`parse`] of the result gives `self`
    /// back when the host name is valid.
    pub fn render(&self) -> String {
        let mut words = vec![format!("{KEY_HOSTNAME}={}", self.hostname)];
        if !self.net {
            words.push(format!("{KEY_NET}=0"));
        }
        if self.agent == AgentTransport::Vsock {
            words.push(format!("{KEY_AGENT}=vsock"));
        }
        let payload = match self.payload {
            PayloadKind::Containerd => None,
            PayloadKind::K3s => Some("k3s"),
            PayloadKind::None => Some("none"),
        };
        if let Some(p) = payload {
            words.push(format!("{KEY_PAYLOAD}={p}"));
        }
        if self.krun {
            words.push(format!("{KEY_VMM}=krun"));
        }
        if let Some(m) = self.mtu {
            words.push(format!("{KEY_MTU}={m}"));
        }
        if self.settings {
            words.push(format!("{KEY_SETTINGS}=1"));
        }
        words.join(" ")
    }
}

/// The prefix of every key gatevm reads.
pub const KEY_PREFIX: &str = "gatevm.";
/// Key of [`Cmdline::hostname`].
pub const KEY_HOSTNAME: &str = "gatevm.hostname";
/// Key of [`Cmdline::net`].
pub const KEY_NET: &str = "gatevm.net";
/// Key of [`Cmdline::agent`].
pub const KEY_AGENT: &str = "gatevm.agent";
/// Key of [`Cmdline::payload`].
pub const KEY_PAYLOAD: &str = "gatevm.payload";
/// Key of [`Cmdline::krun`].
pub const KEY_VMM: &str = "gatevm.vmm";
/// Key of [`Cmdline::mtu`].
pub const KEY_MTU: &str = "gatevm.mtu";
/// Key of [`Cmdline::settings`].
pub const KEY_SETTINGS: &str = "gatevm.settings";

/// Splits a command line into words the way the kernel does: whitespace separates, double quotes
/// group (and are removed).
pub fn split(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

/// Whether `name` is acceptable for `sethostname`: 1..=64 characters of letters, digits, `-` and
/// `.`, not starting or ending with `-` or `.`.
pub fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.'])
}

/// Parses the `gatevm.*` keys; returns the settings and one warning per rejected value. Later
/// occurrences of a key win, unknown words are ignored.
pub fn parse(line: &str) -> (Cmdline, Vec<String>) {
    let mut c = Cmdline::default();
    let mut warnings = Vec::new();
    for word in split(line) {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        match key {
            KEY_HOSTNAME => {
                if valid_hostname(value) {
                    c.hostname = value.to_string();
                } else {
                    warnings.push(format!(
                        "invalid gatevm.hostname {value:?}, using {DEFAULT_HOSTNAME}"
                    ));
                    c.hostname = DEFAULT_HOSTNAME.to_string();
                }
            }
            KEY_MTU => match value.parse::<u32>() {
                Ok(m) if (MIN_MTU..=MAX_MTU).contains(&m) => c.mtu = Some(m),
                _ => warnings.push(format!(
                    "invalid gatevm.mtu {value:?} (expected {MIN_MTU}-{MAX_MTU}), using the device's"
                )),
            },
            KEY_SETTINGS => match value {
                "0" => c.settings = false,
                "1" => c.settings = true,
                _ => warnings.push(format!("invalid gatevm.settings {value:?}, using 0")),
            },
            KEY_NET => match value {
                "0" | "off" | "no" | "false" => c.net = false,
                "1" | "on" | "yes" | "true" => c.net = true,
                _ => warnings.push(format!("invalid gatevm.net {value:?}, using 1")),
            },
            KEY_AGENT => match value {
                "serial" => c.agent = AgentTransport::Serial,
                "vsock" => c.agent = AgentTransport::Vsock,
                _ => warnings.push(format!("invalid gatevm.agent {value:?}, using serial")),
            },
            KEY_PAYLOAD => match value {
                "containerd" => c.payload = PayloadKind::Containerd,
                "k3s" => c.payload = PayloadKind::K3s,
                "none" => c.payload = PayloadKind::None,
                _ => warnings.push(format!(
                    "invalid gatevm.payload {value:?}, using containerd"
                )),
            },
            KEY_VMM => match value {
                "qemu" => c.krun = false,
                "krun" => c.krun = true,
                _ => warnings.push(format!("invalid gatevm.vmm {value:?}, using qemu")),
            },
            _ => {}
        }
    }
    (c, warnings)
}

/// A command line followed by arguments (each quoted, so one argument stays one word).
pub fn with_args(line: &str, args: &[String]) -> String {
    let mut s = line.trim_end().to_string();
    for a in args.iter().filter(|a| !a.contains('"')) {
        s.push_str(&format!(" \"{a}\""));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtu_is_taken_when_in_range() {
        assert_eq!(parse("gatevm.mtu=65520").0.mtu, Some(65520));
        assert_eq!(parse("quiet").0.mtu, None);
        for bad in [
            "gatevm.mtu=67",
            "gatevm.mtu=65536",
            "gatevm.mtu=big",
            "gatevm.mtu=",
        ] {
            let (c, warnings) = parse(bad);
            assert_eq!(c.mtu, None, "{bad}");
            assert!(
                warnings[0].contains("invalid gatevm.mtu"),
                "{bad}: {warnings:?}"
            );
        }
    }

    #[test]
    fn defaults() {
        let (c, w) = parse("console=ttyS0 quiet panic=-1\n");
        assert_eq!(c, Cmdline::default());
        assert!(w.is_empty());
        assert_eq!(parse("").0, Cmdline::default());
    }

    #[test]
    fn keys() {
        let (c, w) = parse(
            "console=ttyS0 gatevm.hostname=box-1.local gatevm.net=0 gatevm.agent=vsock quiet",
        );
        assert!(w.is_empty());
        assert_eq!(c.hostname, "box-1.local");
        assert!(!c.net);
        assert_eq!(c.agent, AgentTransport::Vsock);
        // Last one wins.
        assert!(parse("gatevm.net=0 gatevm.net=1").0.net);
        let (c, w) = parse("gatevm.payload=none gatevm.vmm=krun");
        assert!(w.is_empty());
        assert!(c.payload == PayloadKind::None && c.krun);
        assert!(!c.payload.runs_anything());
        assert_eq!(Cmdline::default().payload, PayloadKind::Containerd);
        assert!(!Cmdline::default().krun);
    }

    #[test]
    fn payload_values() {
        let (c, w) = parse("quiet gatevm.payload=k3s");
        assert!(w.is_empty());
        assert_eq!(c.payload, PayloadKind::K3s);
        assert!(c.payload.runs_anything());
        assert_eq!(
            parse("gatevm.payload=containerd").0.payload,
            PayloadKind::Containerd
        );
        assert_eq!(
            parse("gatevm.payload=k3s gatevm.payload=none").0.payload,
            PayloadKind::None
        );
        // Under libkrun the value comes as an argument.
        let line = with_args("reboot=k", &["gatevm.payload=k3s".into()]);
        assert_eq!(parse(&line).0.payload, PayloadKind::K3s);
        // Case matters; a bad value warns and keeps the default.
        let (c, w) = parse("gatevm.payload=K3S");
        assert_eq!(c.payload, PayloadKind::Containerd);
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn arguments_follow_the_command_line() {
        // Under libkrun, /proc/cmdline holds libkrun's line; the arguments carry the settings.
        let line = with_args(
            "reboot=k KRUN_INIT=/usr/local/sbin/gatevm-guest -- x\n",
            &[
                "gatevm.hostname=gw".into(),
                "gatevm.agent=vsock".into(),
                "a b".into(),
            ],
        );
        let (c, w) = parse(&line);
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(c.hostname, "gw");
        assert_eq!(c.agent, AgentTransport::Vsock);
        assert!(split(&line).contains(&"a b".to_string()));
    }

    #[test]
    fn bad_values_warn_and_default() {
        let (c, w) = parse(
            "gatevm.hostname=-bad gatevm.net=maybe gatevm.agent=tcp gatevm.payload=k8s gatevm.vmm=x",
        );
        assert_eq!(c, Cmdline::default());
        assert_eq!(w.len(), 5);
        let (c, w) = parse(&format!("gatevm.hostname={}", "a".repeat(65)));
        assert_eq!(c.hostname, DEFAULT_HOSTNAME);
        assert_eq!(w.len(), 1);
        assert!(!valid_hostname("a b"));
        assert!(!valid_hostname(""));
        assert!(valid_hostname("k3s-node0"));
    }

    #[test]
    fn render_is_what_the_host_always_wrote() {
        let c = Cmdline {
            hostname: "gw".into(),
            ..Cmdline::default()
        };
        assert_eq!(c.render(), "gatevm.hostname=gw");
        let c = Cmdline {
            hostname: "gw".into(),
            payload: PayloadKind::K3s,
            mtu: Some(65520),
            ..Cmdline::default()
        };
        assert_eq!(
            c.render(),
            "gatevm.hostname=gw gatevm.payload=k3s gatevm.mtu=65520"
        );
    }

    fn any_cmdline() -> impl proptest::strategy::Strategy<Value = Cmdline> {
        use proptest::prelude::*;
        (
            "[a-z0-9]([a-z0-9.-]{0,62}[a-z0-9])?",
            any::<bool>(),
            any::<bool>(),
            0u8..3,
            any::<bool>(),
            proptest::option::of(MIN_MTU..=MAX_MTU),
            any::<bool>(),
        )
            .prop_map(
                |(hostname, net, vsock, payload, krun, mtu, settings)| Cmdline {
                    hostname,
                    net,
                    agent: if vsock {
                        AgentTransport::Vsock
                    } else {
                        AgentTransport::Serial
                    },
                    payload: [PayloadKind::None, PayloadKind::Containerd, PayloadKind::K3s]
                        [usize::from(payload)],
                    krun,
                    mtu,
                    settings,
                },
            )
    }

    proptest::proptest! {
        #[test]
        fn render_then_parse_round_trips(c in any_cmdline(), noise in "[a-z=0-9 ]{0,30}") {
            // Other words around gatevm's (the console, the user's GATEVM_KERNEL_APPEND) do not
            // disturb it.
            let line = format!("console=ttyS0 {} {noise}", c.render());
            let (back, warnings) = parse(&line);
            proptest::prop_assert!(warnings.is_empty(), "{:?}", warnings);
            proptest::prop_assert_eq!(back, c);
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(
            split("a \"b c\" d=\"e f\"  g\t\n"),
            vec!["a", "b c", "d=e f", "g"]
        );
        assert_eq!(split("\"\""), vec![""]);
        assert!(split("   ").is_empty());
        let (c, _) = parse("gatevm.hostname=\"node\"");
        assert_eq!(c.hostname, "node");
    }
}
