//! `gatevm run`, `gatevm ps`, `gatevm rm`: containers in an instance.
//!
//! The work happens in the guest (`gatevm-guest container ...`, run through the agent): a network
//! namespace per container on the `gatevm0` CNI bridge (portmap, masquerade), `ctr run` in it,
//! and clean-up of both when the container ends or is removed. Published ports are guest ports;
//! the instance's forwards (`gatevm start -p HOST:GUEST`) carry them to the host.

use super::exec::{capture, run_exec, ExecOpts, Limits};
use super::image::Namespace;
use crate::output::runtime;
use anyhow::bail;
use gatevm_instance::client;

/// Where the supervisor installs gatevm-guest in every instance.
use gatevm_abi::paths::GUEST_AGENT;

#[derive(clap::Args)]
pub(crate) struct RunArgs {
    /// Instance name.
    name: String,
    /// An imported image (see `gatevm image ls`; short forms like busybox:1 work).
    image: String,
    /// Container name [default: generated].
    #[arg(long = "name", value_name = "C")]
    container: Option<String>,
    /// Keep the container running in the background and print its name.
    #[arg(short, long)]
    detach: bool,
    /// Publish a container port on a guest port: GUESTPORT:CONTAINERPORT[/tcp|/udp]. Repeatable.
    /// The instance's forwards reach guest ports from the host.
    #[arg(short = 'p', long = "publish", value_name = "SPEC")]
    publish: Vec<String>,
    /// Bind a guest directory into the container: GUEST_DIR:CONTAINER_DIR[:ro]. A share of
    /// `gatevm start -v HOST_DIR:GUEST_DIR` puts host files there. Repeatable.
    #[arg(short = 'v', long = "volume", value_name = "SPEC")]
    volume: Vec<String>,
    #[command(flatten)]
    exec: ExecOpts,
    #[command(flatten)]
    ns: Namespace,
    /// Command and arguments [default: the image's].
    #[arg(last = true, value_name = "CMD")]
    cmd: Vec<String>,
}

#[derive(clap::Args)]
pub(crate) struct PsArgs {
    /// Instance name.
    name: String,
    #[command(flatten)]
    ns: Namespace,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub(crate) struct RmArgs {
    /// Instance name.
    name: String,
    /// Container names.
    #[arg(required = true, value_name = "C")]
    containers: Vec<String>,
    /// Kill running containers first.
    #[arg(short, long)]
    force: bool,
    #[command(flatten)]
    ns: Namespace,
}

/// A container port published on a guest port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Publish {
    pub guest: u16,
    pub container: u16,
    pub udp: bool,
}

/// Checks `GUEST_DIR:CONTAINER_DIR[:ro]` as far as the host can (the guest checks it again and
/// that the guest directory exists).
pub(crate) fn check_volume(s: &str) -> anyhow::Result<()> {
    let (src, dst, _) = gatevm_abi::settings::split_mount_spec(s).map_err(|e| {
        anyhow::anyhow!("invalid --volume {s:?}: {e} (GUEST_DIR:CONTAINER_DIR[:ro])")
    })?;
    for p in [src, dst] {
        if !p.starts_with('/') {
            bail!("invalid --volume {s:?}: {p:?} is not an absolute path");
        }
        if p.chars().any(|c| c.is_control() || c == ',' || c == '=') {
            bail!("invalid --volume {s:?}: {p:?} contains ',', '=' or a control character");
        }
    }
    Ok(())
}

/// Parses `GUESTPORT:CONTAINERPORT[/tcp|/udp]`.
pub(crate) fn parse_publish(s: &str) -> anyhow::Result<Publish> {
    let bad = |why: &str| anyhow::anyhow!("invalid --publish {s:?}: {why}");
    let (ports, proto) = match s.rsplit_once('/') {
        Some((p, proto)) => (p, proto),
        None => (s, "tcp"),
    };
    let udp = match proto {
        "tcp" => false,
        "udp" => true,
        _ => return Err(bad("the protocol must be tcp or udp")),
    };
    let Some((g, c)) = ports.split_once(':') else {
        return Err(bad("expected GUESTPORT:CONTAINERPORT"));
    };
    let port = |p: &str| -> anyhow::Result<u16> {
        match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(bad(&format!("{p:?} is not a port (1-65535)"))),
        }
    };
    Ok(Publish {
        guest: port(g)?,
        container: port(c)?,
        udp,
    })
}

/// Container names: 1 to 63 of `[A-Za-z0-9_.-]`, starting with a letter or digit.
pub(crate) fn valid_container_name(c: &str) -> bool {
    !c.is_empty()
        && c.len() <= 63
        && c.starts_with(|ch: char| ch.is_ascii_alphanumeric())
        && c.chars()
            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '_' | '.' | '-'))
}

/// A name for an unnamed container: the image's base name and a random suffix.
fn generated_name(image: &str) -> String {
    let base = image
        .rsplit('/')
        .next()
        .unwrap_or(image)
        .split([':', '@'])
        .next()
        .unwrap_or("c");
    let base: String = base
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(40)
        .collect();
    let base = if base.is_empty() {
        "c".to_string()
    } else {
        base
    };
    format!("{base}-{}", super::random_hex(3))
}

pub(crate) fn run(a: RunArgs) -> anyhow::Result<i32> {
    let name = super::name_arg(&a.name)?.to_string();
    if a.detach && (a.exec.tty || a.exec.interactive) {
        bail!("--detach runs the container in the background: it cannot take -t or -i");
    }
    let mut publish = Vec::new();
    for p in &a.publish {
        let p = parse_publish(p)?;
        if publish
            .iter()
            .any(|q: &Publish| q.guest == p.guest && q.udp == p.udp)
        {
            bail!("guest port {} is published twice", p.guest);
        }
        publish.push(p);
    }
    let container = match &a.container {
        Some(c) if !valid_container_name(c) => bail!(
            "invalid container name {c:?}: 1 to 63 of letters, digits, '_', '.', '-', starting with a letter or digit"
        ),
        Some(c) => c.clone(),
        None => generated_name(&a.image),
    };
    if a.image.is_empty() || a.image.contains(char::is_whitespace) {
        bail!("invalid image reference {:?}", a.image);
    }
    super::exec::require_running(&name)?;
    // A published port the host cannot reach is worth a word.
    if !publish.is_empty() {
        if let Ok(st) = runtime()?.block_on(client::status(&name)) {
            for p in &publish {
                let proto = if p.udp { "udp" } else { "tcp" };
                let suffix = format!(":{}/{proto}", p.guest);
                if !st.forwards.iter().any(|f| f.ends_with(&suffix)) {
                    eprintln!(
                        "note: no forward of {name:?} reaches guest port {}/{proto}; add one with `gatevm start {name} -p HOSTPORT:{}{}` (after a stop)",
                        p.guest,
                        p.guest,
                        if p.udp { "/udp" } else { "" }
                    );
                }
            }
        }
    }
    let mut argv: Vec<String> = vec![
        GUEST_AGENT.into(),
        "container".into(),
        "run".into(),
        "--namespace".into(),
        a.ns.namespace.clone(),
        "--name".into(),
        container.clone(),
    ];
    if a.detach {
        argv.push("--detach".into());
    }
    if a.exec.tty {
        argv.push("--tty".into());
    }
    for p in &publish {
        argv.push("--publish".into());
        argv.push(format!(
            "{}:{}/{}",
            p.guest,
            p.container,
            if p.udp { "udp" } else { "tcp" }
        ));
    }
    for v in &a.volume {
        check_volume(v)?;
        argv.push("--volume".into());
        argv.push(v.clone());
    }
    // The environment and working directory are the container's, not gatevm-guest's.
    let inner = a.exec.request(&a.cmd)?;
    for (k, v) in &inner.env {
        argv.push("--env".into());
        argv.push(format!("{k}={v}"));
    }
    if let Some(w) = &inner.cwd {
        argv.push("--workdir".into());
        argv.push(w.clone());
    }
    argv.push(a.image.clone());
    argv.push("--".into());
    argv.extend(a.cmd.iter().cloned());
    let mut req = inner;
    req.argv = argv;
    req.env = vec![];
    req.cwd = None;
    run_exec(&name, req)
}

/// Runs `gatevm-guest container ARGS` in the instance for the host (bounded by
/// [`Limits::DEFAULT`]) and shows what it printed: the guest wrote it, so terminal control
/// sequences are stripped (lines and tabs kept) before it reaches the user's terminal. Returns
/// its exit code.
fn guest_command(name: &str, args: Vec<String>) -> anyhow::Result<i32> {
    super::exec::require_running(name)?;
    let mut argv = vec![GUEST_AGENT.to_string(), "container".to_string()];
    argv.extend(args);
    ExecOpts {
        interactive: false,
        tty: false,
        env: vec![],
        workdir: None,
    }
    .request(&argv)?;
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = runtime()?.block_on(capture::<tokio::io::Empty>(
        name,
        &argv,
        None,
        Limits::DEFAULT,
    ))?;
    let (stdout, stderr) = shown_output(&out.stdout, &out.stderr);
    print!("{stdout}");
    eprint!("{stderr}");
    Ok(out.code)
}

/// Guest output as it is shown: see [`guest_command`].
fn shown_output(stdout: &str, stderr: &str) -> (String, String) {
    let max = Limits::DEFAULT.max_stdout;
    (
        gatevm_instance::text::text(stdout, max),
        gatevm_instance::text::text(stderr, max),
    )
}

pub(crate) fn ps(a: PsArgs) -> anyhow::Result<i32> {
    let name = super::name_arg(&a.name)?;
    let mut args = vec!["ps".to_string(), "--namespace".into(), a.ns.namespace];
    if a.json {
        args.push("--json".into());
    }
    guest_command(name, args)
}

pub(crate) fn rm(a: RmArgs) -> anyhow::Result<i32> {
    let name = super::name_arg(&a.name)?;
    for c in &a.containers {
        if !valid_container_name(c) {
            bail!("invalid container name {c:?}");
        }
    }
    let mut worst = 0;
    for c in &a.containers {
        let mut args = vec![
            "rm".to_string(),
            "--namespace".into(),
            a.ns.namespace.clone(),
        ];
        if a.force {
            args.push("--force".into());
        }
        args.push(c.clone());
        let code = guest_command(name, args)?;
        if code != 0 {
            worst = code;
        }
    }
    Ok(worst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_specs() {
        assert_eq!(
            parse_publish("8080:80").unwrap(),
            Publish {
                guest: 8080,
                container: 80,
                udp: false
            }
        );
        assert!(parse_publish("53:53/udp").unwrap().udp);
        for bad in [
            "80",
            "0:80",
            "80:0",
            "x:80",
            "80:80/sctp",
            "70000:80",
            ":80",
            "80:",
        ] {
            assert!(parse_publish(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn container_listings_from_the_guest_are_shown_safely() {
        let ps = "NAME\tIMAGE\tSTATUS\nweb\u{1b}]52;c;aGk=\u{7}\u{1b}[2J\tbusybox:1\trunning\u{9b}1;1H\r\n\u{202e}evil\u{8}\u{8}\n";
        let (out, err) = shown_output(ps, "warn\u{1b}]0;title\u{7}ing\n");
        assert_eq!(
            out,
            "NAME\tIMAGE\tSTATUS\nweb\tbusybox:1\trunning\n evil  \n"
        );
        assert_eq!(err, "warning\n");
    }

    #[test]
    fn container_names() {
        assert!(valid_container_name("web-1"));
        assert!(valid_container_name("a.b_c"));
        for bad in ["", "-a", "a b", "a/b", &"x".repeat(64)] {
            assert!(!valid_container_name(bad), "{bad:?}");
        }
        let g = generated_name("docker.io/library/busybox:1");
        assert!(g.starts_with("busybox-") && valid_container_name(&g), "{g}");
        assert!(valid_container_name(&generated_name("@@@")));
    }
}
