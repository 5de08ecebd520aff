//! Command lines of `container run|ps|rm`, names, namespaces and `--publish` specs.

use crate::cni::PortMapping;
use std::fmt;

/// A bad `container run|ps|rm` command line, name, namespace or `--publish` spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ArgsError {
    /// A port of a `--publish` spec is not a number 1-65535.
    #[error("invalid {what} {port:?} in --publish {spec:?}: expected a number 1-65535")]
    Port {
        /// `guest port` or `container port`.
        what: String,
        /// The port as given.
        port: String,
        /// The whole spec.
        spec: String,
    },
    /// A `--publish` spec names a protocol other than tcp or udp.
    #[error("invalid protocol {proto:?} in --publish {spec:?}: use tcp or udp")]
    Protocol {
        /// The protocol as given.
        proto: String,
        /// The whole spec.
        spec: String,
    },
    /// A `--publish` spec is not `GUESTPORT:CONTAINERPORT[/tcp|/udp]`.
    #[error("invalid --publish {0:?}: expected GUESTPORT:CONTAINERPORT[/tcp|/udp]")]
    Publish(String),
    /// A bad container name.
    #[error(
        "invalid container name {0:?}: use 1-63 characters of A-Z a-z 0-9 _ . -, starting with a letter or digit"
    )]
    Name(String),
    /// A bad containerd namespace.
    #[error("invalid namespace {0:?}: use 1-76 characters of A-Z a-z 0-9 _ . -")]
    Namespace(String),
    /// A flag that needs a value is last.
    #[error("flag {0} needs a value")]
    NeedsValue(String),
    /// A flag that takes no value was given one.
    #[error("flag {0} takes no value")]
    TakesNoValue(String),
    /// A flag that may be given once was given twice.
    #[error("flag {0} given twice")]
    Twice(String),
    /// A required flag is missing.
    #[error("{0} is required")]
    Required(&'static str),
    /// `run` without an image.
    #[error("an IMAGE is required")]
    NoImage,
    /// `rm` without a container name.
    #[error("a container name is required")]
    NoName,
    /// A bad `--env` entry.
    #[error("invalid --env {0:?}: expected KEY=VALUE")]
    Env(String),
    /// A relative or NUL-containing `--workdir`.
    #[error("invalid --workdir {0:?}: it must be an absolute path")]
    Workdir(String),
    /// A flag the command does not know.
    #[error("unknown flag {flag} for container {command}")]
    UnknownFlag {
        /// The flag as given.
        flag: String,
        /// `run`, `ps` or `rm`.
        command: &'static str,
    },
    /// A positional argument `ps` does not take.
    #[error("unexpected argument {0:?} for container ps")]
    PsArgument(String),
    /// A second container name for `rm`.
    #[error("unexpected argument {0:?}: container rm takes one container")]
    RmArgument(String),
    /// The same guest port and protocol published twice.
    #[error("guest port {port}/{proto} is published twice")]
    PublishedTwice {
        /// The guest port.
        port: u16,
        /// `tcp` or `udp`.
        proto: &'static str,
    },
    /// A NUL byte in the command.
    #[error("the command contains a NUL byte")]
    NulInCommand,
    /// A bad `--volume` spec.
    #[error("invalid --volume {spec:?}: {why}")]
    Volume {
        /// The spec as given.
        spec: String,
        /// What is wrong.
        why: String,
    },
}

/// One `--volume GUEST_DIR:CONTAINER_DIR[:ro]`: a guest directory (a share's, typically) bound
/// into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bind {
    pub src: String,
    pub dst: String,
    pub read_only: bool,
}

/// Checks one side of a `--volume`: absolute, no `.`/`..` component, not `/`, and none of the
/// characters ctr's `--mount` syntax splits on (`,` `=` `:`) or controls.
fn check_bind_path(p: &str, what: &str) -> Result<String, String> {
    if !p.starts_with('/') {
        return Err(format!("the {what} {p:?} is not an absolute path"));
    }
    if p.chars()
        .any(|c| c.is_control() || c == ',' || c == '=' || c == ':')
    {
        return Err(format!(
            "the {what} {p:?} contains ',', '=', ':' or a control character"
        ));
    }
    if p.split('/').any(|c| c == "." || c == "..") {
        return Err(format!("the {what} {p:?} contains \".\" or \"..\""));
    }
    let norm: Vec<&str> = p.split('/').filter(|c| !c.is_empty()).collect();
    if norm.is_empty() {
        return Err(format!("the {what} is \"/\""));
    }
    Ok(format!("/{}", norm.join("/")))
}

/// Parses `GUEST_DIR:CONTAINER_DIR[:ro|:rw]`.
pub(crate) fn parse_bind(spec: &str) -> Result<Bind, ArgsError> {
    let err = |why: String| ArgsError::Volume {
        spec: spec.to_string(),
        why,
    };
    let (src, dst, ro) = gatevm_abi::settings::split_mount_spec(spec)
        .map_err(|e| err(format!("{e} (GUEST_DIR:CONTAINER_DIR[:ro])")))?;
    Ok(Bind {
        src: check_bind_path(src, "guest directory").map_err(err)?,
        dst: check_bind_path(dst, "container directory").map_err(err)?,
        read_only: ro,
    })
}

/// Transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Proto {
    /// TCP (the default).
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// `tcp` or `udp`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One `--publish GUESTPORT:CONTAINERPORT[/tcp|/udp]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Publish {
    /// Port on the guest's address.
    pub guest_port: u16,
    /// Port inside the container.
    pub container_port: u16,
    /// Protocol.
    pub proto: Proto,
}

impl fmt::Display for Publish {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}/{}",
            self.guest_port,
            self.container_port,
            self.proto.as_str()
        )
    }
}

impl Publish {
    /// As a CNI port mapping.
    pub(crate) fn mapping(&self) -> PortMapping {
        PortMapping {
            host_port: self.guest_port,
            container_port: self.container_port,
            protocol: self.proto.as_str().into(),
        }
    }
}

fn parse_port(s: &str, what: &str, spec: &str) -> Result<u16, ArgsError> {
    let invalid = || ArgsError::Port {
        what: what.into(),
        port: s.into(),
        spec: spec.into(),
    };
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    match s.parse::<u32>() {
        Ok(n @ 1..=65535) => Ok(n as u16),
        _ => Err(invalid()),
    }
}

/// Parses `GUESTPORT:CONTAINERPORT[/tcp|/udp]`.
pub(crate) fn parse_publish(spec: &str) -> Result<Publish, ArgsError> {
    let (ports, proto) = match spec.rsplit_once('/') {
        Some((p, "tcp")) => (p, Proto::Tcp),
        Some((p, "udp")) => (p, Proto::Udp),
        Some((_, other)) => {
            return Err(ArgsError::Protocol {
                proto: other.into(),
                spec: spec.into(),
            })
        }
        None => (spec, Proto::Tcp),
    };
    let mut parts = ports.split(':');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(g), Some(c), None) => Ok(Publish {
            guest_port: parse_port(g, "guest port", spec)?,
            container_port: parse_port(c, "container port", spec)?,
            proto,
        }),
        _ => Err(ArgsError::Publish(spec.into())),
    }
}

/// The `gatevm.ports` label value: specs joined by `,`.
pub(crate) fn ports_label(ports: &[Publish]) -> String {
    ports
        .iter()
        .map(Publish::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Reads a `gatevm.ports` label back, skipping entries that do not parse.
pub(crate) fn parse_ports_label(label: &str) -> Vec<Publish> {
    label
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .filter_map(|s| parse_publish(s).ok())
        .collect()
}

/// Checks a container name: 1-63 characters of `[A-Za-z0-9_.-]`, starting alphanumeric.
pub(crate) fn validate_name(name: &str) -> Result<(), ArgsError> {
    let ok = (1..=63).contains(&name.len())
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ArgsError::Name(name.into()))
    }
}

/// Checks a containerd namespace: 1-76 characters of `[A-Za-z0-9._-]`.
pub(crate) fn validate_namespace(ns: &str) -> Result<(), ArgsError> {
    let ok = (1..=76).contains(&ns.len())
        && ns
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ArgsError::Namespace(ns.into()))
    }
}

/// Options of `container run`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct RunOpts {
    /// containerd namespace.
    pub namespace: String,
    /// Container name (and containerd id).
    pub name: String,
    /// Start it and return at once.
    pub detach: bool,
    /// Give the container a terminal.
    pub tty: bool,
    /// Published ports.
    pub publish: Vec<Publish>,
    /// `K=V` environment entries.
    pub env: Vec<String>,
    /// Guest directories bound into the container.
    pub volumes: Vec<Bind>,
    /// Working directory inside the container.
    pub workdir: Option<String>,
    /// Image reference as given.
    pub image: String,
    /// Command and arguments (empty: the image's default).
    pub command: Vec<String>,
}

/// Options of `container ps`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct PsOpts {
    /// containerd namespace.
    pub namespace: String,
    /// One JSON document instead of a table.
    pub json: bool,
}

/// Options of `container rm`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct RmOpts {
    /// containerd namespace.
    pub namespace: String,
    /// Kill a running container first.
    pub force: bool,
    /// Container name.
    pub name: String,
}

/// Splits `--flag=value` into the flag and its inline value.
fn split_flag(arg: &str) -> (&str, Option<&str>) {
    if arg.starts_with("--") {
        if let Some((f, v)) = arg.split_once('=') {
            return (f, Some(v));
        }
    }
    (arg, None)
}

/// Walks the leading flags of an argument list.
struct Flags<'a> {
    args: &'a [String],
    pos: usize,
}

impl<'a> Flags<'a> {
    fn new(args: &'a [String]) -> Self {
        Flags { args, pos: 0 }
    }

    /// The value of a flag: inline (`--x=v`) or the next argument.
    fn value(&mut self, flag: &str, inline: Option<&str>) -> Result<String, ArgsError> {
        if let Some(v) = inline {
            return Ok(v.to_string());
        }
        match self.args.get(self.pos) {
            Some(v) => {
                self.pos += 1;
                Ok(v.clone())
            }
            None => Err(ArgsError::NeedsValue(flag.into())),
        }
    }

    fn no_value(flag: &str, inline: Option<&str>) -> Result<(), ArgsError> {
        match inline {
            Some(_) => Err(ArgsError::TakesNoValue(flag.into())),
            None => Ok(()),
        }
    }
}

fn set_once(slot: &mut Option<String>, flag: &str, v: String) -> Result<(), ArgsError> {
    if slot.is_some() {
        return Err(ArgsError::Twice(flag.into()));
    }
    *slot = Some(v);
    Ok(())
}

fn required(slot: Option<String>, flag: &'static str) -> Result<String, ArgsError> {
    slot.ok_or(ArgsError::Required(flag))
}

/// Parses `run` arguments: flags, then `IMAGE [--] [CMD ARG...]` (everything after the image
/// belongs to the command). Validates names, ports and environment entries.
pub(crate) fn parse_run(args: &[String]) -> Result<RunOpts, ArgsError> {
    let mut o = RunOpts::default();
    let (mut ns, mut name, mut workdir) = (None, None, None);
    let mut f = Flags::new(args);
    while let Some(arg) = f.args.get(f.pos) {
        if arg == "--" {
            f.pos += 1;
            break;
        }
        if !arg.starts_with('-') || arg == "-" {
            break;
        }
        f.pos += 1;
        let (flag, inline) = split_flag(arg);
        match flag {
            "--namespace" | "-n" => set_once(&mut ns, flag, f.value(flag, inline)?)?,
            "--name" => set_once(&mut name, flag, f.value(flag, inline)?)?,
            "--detach" | "-d" => {
                Flags::no_value(flag, inline)?;
                o.detach = true;
            }
            "--tty" | "-t" => {
                Flags::no_value(flag, inline)?;
                o.tty = true;
            }
            "-dt" | "-td" => {
                o.detach = true;
                o.tty = true;
            }
            "--publish" | "-p" => o.publish.push(parse_publish(&f.value(flag, inline)?)?),
            "--volume" | "-v" => o.volumes.push(parse_bind(&f.value(flag, inline)?)?),
            "--env" | "-e" => {
                let e = f.value(flag, inline)?;
                match e.split_once('=') {
                    Some((k, _)) if !k.is_empty() && !e.contains('\0') => o.env.push(e),
                    _ => return Err(ArgsError::Env(e)),
                }
            }
            "--workdir" | "-w" => {
                let w = f.value(flag, inline)?;
                if !w.starts_with('/') || w.contains('\0') {
                    return Err(ArgsError::Workdir(w));
                }
                set_once(&mut workdir, flag, w)?;
            }
            _ => {
                return Err(ArgsError::UnknownFlag {
                    flag: flag.into(),
                    command: "run",
                })
            }
        }
    }
    let rest = &args[f.pos.min(args.len())..];
    let (image, command) = rest.split_first().ok_or(ArgsError::NoImage)?;
    o.image = image.clone();
    o.command = match command.split_first() {
        Some((first, tail)) if first == "--" => tail.to_vec(),
        _ => command.to_vec(),
    };
    o.namespace = required(ns, "--namespace")?;
    o.name = required(name, "--name")?;
    o.workdir = workdir;
    validate_namespace(&o.namespace)?;
    validate_name(&o.name)?;
    check_publish_unique(&o.publish)?;
    if o.command.iter().any(|a| a.contains('\0')) {
        return Err(ArgsError::NulInCommand);
    }
    Ok(o)
}

/// Rejects two `--publish` of the same guest port and protocol.
pub(crate) fn check_publish_unique(ports: &[Publish]) -> Result<(), ArgsError> {
    for (i, p) in ports.iter().enumerate() {
        if ports[..i]
            .iter()
            .any(|q| q.guest_port == p.guest_port && q.proto == p.proto)
        {
            return Err(ArgsError::PublishedTwice {
                port: p.guest_port,
                proto: p.proto.as_str(),
            });
        }
    }
    Ok(())
}

/// Parses `ps` arguments.
pub(crate) fn parse_ps(args: &[String]) -> Result<PsOpts, ArgsError> {
    let mut o = PsOpts::default();
    let mut ns = None;
    let mut f = Flags::new(args);
    while let Some(arg) = f.args.get(f.pos) {
        f.pos += 1;
        let (flag, inline) = split_flag(arg);
        match flag {
            "--namespace" | "-n" => set_once(&mut ns, flag, f.value(flag, inline)?)?,
            "--json" => {
                Flags::no_value(flag, inline)?;
                o.json = true;
            }
            _ if flag.starts_with('-') => {
                return Err(ArgsError::UnknownFlag {
                    flag: flag.into(),
                    command: "ps",
                })
            }
            _ => return Err(ArgsError::PsArgument(arg.clone())),
        }
    }
    o.namespace = required(ns, "--namespace")?;
    validate_namespace(&o.namespace)?;
    Ok(o)
}

/// Parses `rm` arguments (flags may follow the name).
pub(crate) fn parse_rm(args: &[String]) -> Result<RmOpts, ArgsError> {
    let mut o = RmOpts::default();
    let (mut ns, mut name) = (None, None);
    let mut f = Flags::new(args);
    let mut flags_done = false;
    while let Some(arg) = f.args.get(f.pos) {
        f.pos += 1;
        if !flags_done && arg == "--" {
            flags_done = true;
            continue;
        }
        if flags_done || !arg.starts_with('-') {
            if name.is_some() {
                return Err(ArgsError::RmArgument(arg.clone()));
            }
            name = Some(arg.clone());
            continue;
        }
        let (flag, inline) = split_flag(arg);
        match flag {
            "--namespace" | "-n" => set_once(&mut ns, flag, f.value(flag, inline)?)?,
            "--force" | "-f" => {
                Flags::no_value(flag, inline)?;
                o.force = true;
            }
            _ => {
                return Err(ArgsError::UnknownFlag {
                    flag: flag.into(),
                    command: "rm",
                })
            }
        }
    }
    o.namespace = required(ns, "--namespace")?;
    o.name = name.ok_or(ArgsError::NoName)?;
    validate_namespace(&o.namespace)?;
    validate_name(&o.name)?;
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn publish_specs() {
        let p = parse_publish("8080:80").unwrap();
        assert_eq!(
            (p.guest_port, p.container_port, p.proto),
            (8080, 80, Proto::Tcp)
        );
        assert_eq!(p.to_string(), "8080:80/tcp");
        assert_eq!(parse_publish("53:5353/udp").unwrap().proto, Proto::Udp);
        assert_eq!(parse_publish("1:65535/tcp").unwrap().container_port, 65535);
        for bad in [
            "",
            "80",
            "0:80",
            "80:0",
            "65536:80",
            "80:65536",
            "+80:80",
            "80:-1",
            "a:80",
            "80:80/sctp",
            "127.0.0.1:80:80",
            "80:80/",
            ":80",
            "80:",
            " 80:80",
            "99999999:1",
        ] {
            assert!(parse_publish(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(parse_publish("80:80/sctp")
            .unwrap_err()
            .to_string()
            .contains("tcp or udp"));
    }

    #[test]
    fn ports_label_round_trip() {
        let ps = vec![
            parse_publish("8080:80").unwrap(),
            parse_publish("53:53/udp").unwrap(),
        ];
        let l = ports_label(&ps);
        assert_eq!(l, "8080:80/tcp,53:53/udp");
        assert_eq!(parse_ports_label(&l), ps);
        assert_eq!(parse_ports_label(""), vec![]);
        assert_eq!(parse_ports_label("junk,8080:80/tcp"), ps[..1].to_vec());
        assert_eq!(
            ps[0].mapping(),
            PortMapping {
                host_port: 8080,
                container_port: 80,
                protocol: "tcp".into()
            }
        );
    }

    #[test]
    fn names_and_namespaces() {
        for ok in ["web", "a", "Web_1.x-y", "0abc", &"a".repeat(63)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-web",
            ".web",
            "_web",
            "we b",
            "we/b",
            "wé",
            &"a".repeat(64),
        ] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        for ok in ["default", "gatevm", "k8s.io", "a-b_c"] {
            assert!(validate_namespace(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a/b", "ns:x"] {
            assert!(validate_namespace(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn run_full_command_line() {
        let o = parse_run(&v(&[
            "--namespace",
            "default",
            "--name=web",
            "-d",
            "--tty",
            "--publish",
            "8080:80",
            "-p",
            "53:53/udp",
            "--env",
            "A=1",
            "-e",
            "B=x=y",
            "--workdir",
            "/srv",
            "nginx",
            "--",
            "nginx",
            "-g",
            "daemon off;",
        ]))
        .unwrap();
        assert_eq!(o.namespace, "default");
        assert_eq!(o.name, "web");
        assert!(o.detach && o.tty);
        assert_eq!(ports_label(&o.publish), "8080:80/tcp,53:53/udp");
        assert_eq!(o.env, v(&["A=1", "B=x=y"]));
        assert_eq!(o.workdir.as_deref(), Some("/srv"));
        assert_eq!(o.image, "nginx");
        assert_eq!(o.command, v(&["nginx", "-g", "daemon off;"]));
    }

    #[test]
    fn run_command_flags_belong_to_the_command() {
        let o = parse_run(&v(&[
            "-n", "ns", "--name", "c", "busybox", "ls", "--tty", "-l",
        ]))
        .unwrap();
        assert!(!o.tty);
        assert_eq!(o.command, v(&["ls", "--tty", "-l"]));
        let o = parse_run(&v(&["-n", "ns", "--name", "c", "busybox"])).unwrap();
        assert!(o.command.is_empty() && !o.detach && !o.tty);
        // `--` before the image ends the flags too.
        let o = parse_run(&v(&[
            "-n", "ns", "--name", "c", "--", "busybox", "--", "--x",
        ]))
        .unwrap();
        assert_eq!(o.image, "busybox");
        assert_eq!(o.command, v(&["--x"]));
        let o = parse_run(&v(&["-n", "ns", "--name", "c", "-dt", "busybox"])).unwrap();
        assert!(o.detach && o.tty);
    }

    #[test]
    fn run_errors() {
        let cases: &[(&[&str], &str)] = &[
            (&["--name", "c", "img"], "--namespace is required"),
            (&["-n", "ns", "img"], "--name is required"),
            (&["-n", "ns", "--name", "c"], "IMAGE is required"),
            (
                &["-n", "ns", "--name", "-c", "img"],
                "invalid container name",
            ),
            (&["-n", "", "--name", "c", "img"], "invalid namespace"),
            (
                &["-n", "ns", "--name", "c", "--bogus", "img"],
                "unknown flag --bogus",
            ),
            (&["-n", "ns", "--name", "c", "--publish"], "needs a value"),
            (
                &["-n", "ns", "--name", "c", "-p", "80", "img"],
                "GUESTPORT:CONTAINERPORT",
            ),
            (
                &[
                    "-n", "ns", "--name", "c", "-p", "80:1", "-p", "80:2/tcp", "img",
                ],
                "guest port 80/tcp is published twice",
            ),
            (
                &["-n", "ns", "--name", "c", "-e", "NOEQ", "img"],
                "KEY=VALUE",
            ),
            (&["-n", "ns", "--name", "c", "-e", "=v", "img"], "KEY=VALUE"),
            (&["-n", "ns", "--name", "c", "-w", "rel", "img"], "absolute"),
            (
                &["-n", "ns", "--name", "c", "--name", "d", "img"],
                "given twice",
            ),
            (
                &["-n", "ns", "--name", "c", "--detach=yes", "img"],
                "takes no value",
            ),
            (
                &["-n", "ns", "--name", "c", "-v", "/a", "img"],
                "GUEST_DIR:CONTAINER_DIR",
            ),
            (
                &["-n", "ns", "--name", "c", "-v", "a:/b", "img"],
                "not an absolute path",
            ),
            (
                &["-n", "ns", "--name", "c", "-v", "/a:/", "img"],
                "is \"/\"",
            ),
            (
                &["-n", "ns", "--name", "c", "-v", "/a:/b/../c", "img"],
                "\"..\"",
            ),
            (
                &[
                    "-n",
                    "ns",
                    "--name",
                    "c",
                    "-v",
                    "/a,options=rbind:rw:/b",
                    "img",
                ],
                "GUEST_DIR:CONTAINER_DIR",
            ),
            (
                &["-n", "ns", "--name", "c", "-v", "/a,dst=/etc:/b", "img"],
                "','",
            ),
            (
                &["-n", "ns", "--name", "c", "-v", "/a:/b:rx", "img"],
                "GUEST_DIR:CONTAINER_DIR",
            ),
        ];
        for (args, want) in cases {
            let e = parse_run(&v(args)).unwrap_err().to_string();
            assert!(e.contains(want), "{args:?}: {e}");
        }
        // The same port on both protocols is fine.
        assert!(parse_run(&v(&[
            "-n",
            "ns",
            "--name",
            "c",
            "-p",
            "53:53",
            "-p",
            "53:53/udp",
            "i"
        ]))
        .is_ok());
    }

    #[test]
    fn ps_and_rm_command_lines() {
        assert_eq!(
            parse_ps(&v(&["--namespace", "default", "--json"])).unwrap(),
            PsOpts {
                namespace: "default".into(),
                json: true
            }
        );
        assert!(!parse_ps(&v(&["-n", "x"])).unwrap().json);
        assert!(parse_ps(&v(&[]))
            .unwrap_err()
            .to_string()
            .contains("--namespace is required"));
        assert!(parse_ps(&v(&["-n", "x", "extra"])).is_err());
        assert!(parse_ps(&v(&["-n", "x", "-q"])).is_err());

        let o = parse_rm(&v(&["--namespace", "default", "--force", "web"])).unwrap();
        assert_eq!(
            (o.namespace.as_str(), o.force, o.name.as_str()),
            ("default", true, "web")
        );
        let o = parse_rm(&v(&["web", "-n", "default"])).unwrap();
        assert!(!o.force);
        assert!(parse_rm(&v(&["-n", "d"]))
            .unwrap_err()
            .to_string()
            .contains("name is required"));
        assert!(parse_rm(&v(&["-n", "d", "a", "b"]))
            .unwrap_err()
            .to_string()
            .contains("one container"));
        assert!(parse_rm(&v(&["-n", "d", "-x", "a"])).is_err());
        assert!(parse_rm(&v(&["-n", "d", "--", "-a"]))
            .unwrap_err()
            .to_string()
            .contains("invalid container name"));
    }

    proptest! {
        #[test]
        fn publish_never_panics_and_round_trips(s in "\\PC{0,24}") {
            if let Ok(p) = parse_publish(&s) {
                prop_assert_eq!(parse_publish(&p.to_string()).unwrap(), p);
                prop_assert!(p.guest_port >= 1 && p.container_port >= 1);
            }
        }

        #[test]
        fn valid_ports_parse(g in 1u16..=65535, c in 1u16..=65535, udp: bool) {
            let spec = format!("{g}:{c}{}", if udp { "/udp" } else { "" });
            let p = parse_publish(&spec).unwrap();
            prop_assert_eq!((p.guest_port, p.container_port), (g, c));
        }

        /// The name and namespace checks agree with the rules their documentation states, and
        /// a refusal quotes the value refused.
        #[test]
        fn name_checks_match_a_simple_model(s in "[A-Za-z0-9_.-]{0,80}|\\PC{0,70}") {
            let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
            let name_ok = (1..=63).contains(&s.len())
                && s.starts_with(|c: char| c.is_ascii_alphanumeric())
                && s.chars().all(allowed);
            let ns_ok = (1..=76).contains(&s.len()) && s.chars().all(allowed);
            let quoted = format!("{s:?}");
            match validate_name(&s) {
                Ok(()) => prop_assert!(name_ok, "{:?} accepted as a name", s),
                Err(e) => {
                    prop_assert!(!name_ok, "{:?} refused as a name", s);
                    prop_assert!(e.to_string().contains(&quoted), "{}", e);
                }
            }
            match validate_namespace(&s) {
                Ok(()) => prop_assert!(ns_ok, "{:?} accepted as a namespace", s),
                Err(e) => {
                    prop_assert!(!ns_ok, "{:?} refused as a namespace", s);
                    prop_assert!(e.to_string().contains(&quoted), "{}", e);
                }
            }
        }

        /// A `run` command line written with any spelling of the flags (`--name x`,
        /// `--name=x`, short forms, `-dt`) reads back as the options written; the command
        /// after the image is kept word for word.
        #[test]
        fn run_arguments_round_trip(
            ns in "[a-z0-9][a-z0-9._-]{0,10}",
            name in "[a-z0-9][a-z0-9._-]{0,10}",
            detach in any::<bool>(),
            tty in any::<bool>(),
            env in proptest::collection::vec("[A-Z_]{1,6}=[ -~]{0,8}", 0..3),
            workdir in proptest::option::of("/[a-z/]{0,10}"),
            image in "[a-z0-9][a-z0-9./:-]{0,16}",
            dashdash in any::<bool>(),
            command in proptest::collection::vec("[a-z/][ -~]{0,8}", 0..4),
            inline in any::<bool>(),
        ) {
            let pair = |long: &str, short: &str, v: &str| -> Vec<String> {
                if inline {
                    vec![format!("{long}={v}")]
                } else {
                    vec![short.to_string(), v.to_string()]
                }
            };
            let mut args = Vec::new();
            args.extend(pair("--namespace", "-n", &ns));
            match (detach, tty) {
                (true, true) => args.push("-dt".to_string()),
                (true, false) => args.push("--detach".to_string()),
                (false, true) => args.push("-t".to_string()),
                (false, false) => {}
            }
            for e in &env {
                args.extend(pair("--env", "-e", e));
            }
            if let Some(w) = &workdir {
                args.extend(pair("--workdir", "-w", w));
            }
            args.extend(pair("--name", "--name", &name));
            args.push(image.clone());
            if dashdash {
                args.push("--".to_string());
            }
            args.extend(command.iter().cloned());
            let want = RunOpts {
                namespace: ns,
                name,
                detach,
                tty,
                publish: Vec::new(),
                env,
                volumes: Vec::new(),
                workdir,
                image,
                command,
            };
            prop_assert_eq!(parse_run(&args), Ok(want));
        }

        /// Whatever the words: what `run`, `ps` and `rm` accept passes the name and namespace
        /// checks, the image is one of the words and the command is exactly the words after
        /// it; a refusal has a message.
        #[test]
        fn parsers_accept_only_valid_names(args in proptest::collection::vec("\\PC{0,12}|-[-a-z]{1,10}(=[a-z]{0,3})?|[a-z]{1,4}", 0..8)) {
            match parse_run(&args) {
                Ok(o) => {
                    prop_assert!(validate_name(&o.name).is_ok() && validate_namespace(&o.namespace).is_ok());
                    let at = args.iter().position(|a| *a == o.image);
                    prop_assert!(at.is_some(), "image {:?} is not among {:?}", o.image, args);
                    prop_assert!(args.ends_with(&o.command), "{:?} does not end {:?}", o.command, args);
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
            match parse_ps(&args) {
                Ok(o) => prop_assert!(validate_namespace(&o.namespace).is_ok()),
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
            match parse_rm(&args) {
                Ok(o) => {
                    prop_assert!(validate_name(&o.name).is_ok() && validate_namespace(&o.namespace).is_ok());
                    prop_assert!(args.contains(&o.name));
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }
    }
}
