//! `gatevm start`

use crate::output::{runtime, secs};
use anyhow::{bail, Context};
use gatevm_instance::control::Progress;
use gatevm_instance::{client, k3s, preflight};
use gatevm_instance::{InstanceConfig, InstancePaths, VmmChoice};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Instance name: lowercase letters, digits and '-', at most 63 characters.
    #[arg(default_value = super::DEFAULT_NAME)]
    name: String,
    /// Virtual CPUs [default: 2, or what the instance last ran with].
    #[arg(long, allow_negative_numbers = true)]
    cpus: Option<u32>,
    /// Guest memory in MiB [default: 2048, or what the instance last ran with].
    #[arg(long, allow_negative_numbers = true)]
    memory: Option<u32>,
    /// Forward a host port to the guest: [ip:]hostport:guestport[/tcp|/udp]. The host side binds
    /// 127.0.0.1 unless an address is given. Repeatable; replaces the instance's previous forwards
    /// (without -p an existing instance keeps them).
    #[arg(short = 'p', long = "publish", value_name = "SPEC")]
    publish: Vec<String>,
    /// Drop the instance's previous forwards.
    #[arg(long, conflicts_with = "publish")]
    no_publish: bool,
    /// Let the guest reach services on the host's loopback through 192.168.127.254 (kept for
    /// later starts until --deny-host-loopback).
    #[arg(long)]
    allow_host_loopback: bool,
    /// Share a host directory with the guest: HOST_DIR:GUEST_DIR[:ro] (virtio-fs; read-only is
    /// enforced on the host). Repeatable; replaces the instance's previous shares (without -v an
    /// existing instance keeps them). Containers get them with `gatevm run -v GUEST_DIR:DIR`.
    #[arg(short = 'v', long = "volume", value_name = "SPEC")]
    volume: Vec<String>,
    /// Drop the instance's previous shares.
    #[arg(long, conflicts_with = "volume")]
    no_volumes: bool,
    /// Pull REGISTRY's images through a mirror first: REGISTRY=URL (containerd hosts.toml; the
    /// registry itself stays the fallback). Repeatable; with --insecure-registry, replaces the
    /// instance's previous registry settings.
    #[arg(long, value_name = "REGISTRY=URL")]
    registry_mirror: Vec<String>,
    /// Reach a registry over plain HTTP, or HTTPS without certificate checks: HOST[:PORT].
    /// Repeatable.
    #[arg(long, value_name = "HOST[:PORT]")]
    insecure_registry: Vec<String>,
    /// Drop the instance's previous registry settings.
    #[arg(long, conflicts_with_all = ["registry_mirror", "insecure_registry"])]
    no_registries: bool,
    /// Hand this shell's HTTP_PROXY, HTTPS_PROXY and NO_PROXY to containerd and k3s in the guest
    /// (kept for later starts until --no-proxy-env; the guest's own network is added to
    /// NO_PROXY). Off unless asked: the guest sees the values, a password in them included.
    #[arg(long)]
    proxy_env: bool,
    /// Withdraw an earlier --proxy-env.
    #[arg(long, conflicts_with = "proxy_env")]
    no_proxy_env: bool,
    /// Withdraw an earlier --allow-host-loopback.
    #[arg(long, conflicts_with = "allow_host_loopback")]
    deny_host_loopback: bool,
    /// The virtual machine monitor: auto (libkrun with hardware virtualization, else QEMU), krun
    /// or qemu [default: $GATEVM_VMM, or what the instance last ran with, or auto].
    #[arg(long, value_name = "VMM", env = "GATEVM_VMM", value_parser = parse_vmm)]
    vmm: Option<VmmChoice>,
    /// The network helper: gvproxy, or passt (the host's own sockets; forwards fixed at start)
    /// [default: what the instance last ran with, or gvproxy as root and passt as an ordinary
    /// user, who cannot attach gvproxy's loopback guard].
    #[arg(long, value_name = "HELPER", value_parser = parse_net)]
    net: Option<gatevm_instance::config::NetBackend>,
    /// A kernel (uncompressed ELF) for the krun backend instead of libkrunfw's.
    #[arg(long, value_name = "PATH")]
    krun_kernel: Option<PathBuf>,
    /// Size of the state disk (containerd's images, containers and data), a sparse file: GiB, or
    /// with a G/T suffix [default: 32G for a new instance]. An existing disk can grow, not shrink.
    #[arg(long, value_name = "SIZE", value_parser = gatevm_instance::config::parse_disk_size)]
    disk: Option<u32>,
    /// Budget of the guest's writes to its root filesystem, a sparse file: MiB with M, GiB plain
    /// or with G [default: 8G for a new instance]. A guest that fills it gets "no space left on
    /// device"; the host keeps its space. Set when the instance is created (or with --reset).
    #[arg(long, value_name = "SIZE", value_parser = gatevm_instance::config::parse_root_size)]
    root_size: Option<u32>,
    /// Discard the instance's state (state disk and the root's writable layer) and start afresh
    /// with the same settings.
    #[arg(long)]
    reset: bool,
    #[command(flatten)]
    k3s: super::k3s::K3sArgs,
    /// Stay attached: stop the VM on SIGINT/SIGTERM and exit when it stops (for systemd or a
    /// calling tool).
    #[arg(long)]
    foreground: bool,
}

/// `--net` values.
pub(crate) fn parse_net(
    s: &str,
) -> Result<gatevm_instance::config::NetBackend, gatevm_instance::config::ConfigValueError> {
    s.parse()
}

/// `--vmm` values.
pub(crate) fn parse_vmm(s: &str) -> Result<VmmChoice, gatevm_instance::config::ConfigValueError> {
    s.parse()
}

impl Args {
    /// The configuration to start with: an existing instance's saved one (`base`) with the flags
    /// given on top; the network helper is `base`'s until [`preflight::choose_net`] picks it.
    fn config(&self, name: &str, base: InstanceConfig) -> anyhow::Result<InstanceConfig> {
        let forwards = gatevm_instance::net::parse_forwards(&self.publish)?;
        let host = gatevm_instance::volume::HostView::current();
        let volumes = if self.no_volumes || !self.volume.is_empty() {
            gatevm_instance::volume::parse_all(&self.volume, &host)?
        } else {
            base.volumes.clone()
        };
        let registries = if self.no_registries
            || !self.registry_mirror.is_empty()
            || !self.insecure_registry.is_empty()
        {
            registries(&self.registry_mirror, &self.insecure_registry)?
        } else {
            base.registries.clone()
        };
        let proxy = if self.proxy_env {
            proxy_from_env(&|k| std::env::var(k).ok())?
        } else if self.no_proxy_env {
            vec![]
        } else {
            base.proxy.clone()
        };
        Ok(InstanceConfig {
            name: name.to_string(),
            cpus: self.cpus.unwrap_or(base.cpus),
            memory_mib: self.memory.unwrap_or(base.memory_mib),
            forwards: if self.no_publish || !forwards.is_empty() {
                forwards
            } else {
                base.forwards
            },
            allow_host_loopback: (base.allow_host_loopback || self.allow_host_loopback)
                && !self.deny_host_loopback,
            vmm: self.vmm.unwrap_or(base.vmm),
            net: base.net,
            disk_gib: self.disk.unwrap_or(base.disk_gib),
            root_mib: self.root_size.unwrap_or(base.root_mib),
            krun_kernel: self.krun_kernel.clone().or(base.krun_kernel),
            ephemeral: None,
            k3s: None,
            volumes,
            registries,
            proxy,
        })
    }
}

/// The registry settings of `--registry-mirror REGISTRY=URL` and `--insecure-registry HOST`.
pub(crate) fn registries(
    mirrors: &[String],
    insecure: &[String],
) -> anyhow::Result<Vec<gatevm_abi::settings::RegistryHost>> {
    use gatevm_abi::settings::{check_mirror_url, check_registry_host, RegistryHost};
    let mut out: Vec<RegistryHost> = Vec::new();
    fn entry<'a>(out: &'a mut Vec<RegistryHost>, host: &str) -> &'a mut RegistryHost {
        if let Some(i) = out.iter().position(|r| r.host == host) {
            return &mut out[i];
        }
        out.push(RegistryHost {
            host: host.to_string(),
            ..Default::default()
        });
        out.last_mut().expect("just pushed")
    }
    for m in mirrors {
        let Some((reg, url)) = m.split_once('=') else {
            bail!("--registry-mirror {m:?}: expected REGISTRY=URL, e.g. registry.example=https://mirror.example");
        };
        check_registry_host(reg).map_err(|e| anyhow::anyhow!("--registry-mirror {m:?}: {e}"))?;
        check_mirror_url(url).map_err(|e| anyhow::anyhow!("--registry-mirror {m:?}: {e}"))?;
        let r = entry(&mut out, reg);
        if !r.mirrors.iter().any(|x| x == url) {
            r.mirrors.push(url.to_string());
        }
    }
    for h in insecure {
        check_registry_host(h).map_err(|e| anyhow::anyhow!("--insecure-registry {h:?}: {e}"))?;
        entry(&mut out, h).insecure = true;
    }
    Ok(out)
}

/// `--proxy-env`: HTTP_PROXY, HTTPS_PROXY and NO_PROXY from the caller's environment (the
/// upper-case spelling first, as curl and Go read them).
pub(crate) fn proxy_from_env(
    get: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<Vec<gatevm_abi::settings::ProxyVar>> {
    use gatevm_abi::settings::{check_proxy_value, ProxyVar, PROXY_VARS};
    let mut out = Vec::new();
    for name in PROXY_VARS {
        let value = get(name)
            .filter(|v| !v.is_empty())
            .or_else(|| get(&name.to_ascii_lowercase()).filter(|v| !v.is_empty()));
        if let Some(value) = value {
            check_proxy_value(name, &value).map_err(|e| anyhow::anyhow!("--proxy-env: {e}"))?;
            out.push(ProxyVar {
                name: name.to_string(),
                value,
            });
        }
    }
    if !out.iter().any(|p| p.name != "NO_PROXY") {
        bail!("--proxy-env: neither HTTP_PROXY nor HTTPS_PROXY (nor their lower-case forms) is set in this environment");
    }
    Ok(out)
}

/// One warning per forward published beyond the host's loopback (`-p 0.0.0.0:...`): whoever
/// reaches that address reaches the guest; for a k3s server's API port, joining the cluster is
/// one token away.
fn beyond_loopback(config: &InstanceConfig) -> Vec<String> {
    gatevm_instance::config::all_forwards(config)
        .into_iter()
        .filter(|f| !f.host_ip.is_loopback())
        .map(|f| {
            let what = if config.k3s.is_some() && f.guest_port == 6443 {
                " (the Kubernetes API: with the cluster token, `gatevm cluster-token`, a machine that reaches it can join the cluster)"
            } else {
                ""
            };
            format!(
                "{f} publishes guest port {} beyond loopback: whoever reaches {}:{} reaches the guest{what}",
                f.guest_port, f.host_ip, f.host_port
            )
        })
        .collect()
}

/// An agent starts only beside its running server, and both on QEMU (the cluster network is a
/// QEMU device).
fn check_server_for_agent(server: &str, vmm: gatevm_instance::VmmChoice) -> anyhow::Result<()> {
    if vmm == gatevm_instance::VmmChoice::Krun {
        bail!("--vmm krun: a k3s agent needs QEMU, since gatevm gives libkrun VMs no cluster network yet (use --vmm qemu or auto)");
    }
    let st = runtime()?.block_on(client::status(server))?;
    if st.state != "running" {
        bail!(
            "the cluster's server {server:?} is {}: start it first (gatevm start {server})",
            st.state
        );
    }
    if st.backend.as_deref().is_some_and(|b| b.starts_with("krun")) {
        bail!("the cluster's server {server:?} runs on krun, which has no cluster network in gatevm yet: restart it with --vmm qemu");
    }
    Ok(())
}

pub(crate) fn run(a: Args) -> anyhow::Result<i32> {
    let name = super::name_arg(&a.name)?.to_string();
    preflight::check_start_name(&name)?;
    // An existing instance starts as it last ran, with the flags given on top.
    let saved = client::saved_config(&name);
    let saved_net = saved.as_ref().map(|c| c.net);
    let base = saved.unwrap_or_else(|| InstanceConfig::new(&name));
    let base_k3s = base.k3s.clone();
    let mut config = a.config(&name, base)?;
    // The cheap checks first: resolving k3s may download it.
    let caller = preflight::Caller::probe();
    config.net =
        preflight::choose_net(&name, a.net, saved_net, config.allow_host_loopback, caller)?;
    preflight::check_low_ports(
        &config.forwards,
        caller,
        gatevm_instance::net::confine::unprivileged_port_start(),
    )?;
    preflight::check_config(&config)?;
    config.k3s = k3s::resolve(
        &name,
        &a.k3s.request(),
        base_k3s.as_ref(),
        &mut super::k3s::show,
    )?;
    if let Some(j) = config.k3s.as_ref().and_then(|k| k.join.as_ref()) {
        check_server_for_agent(&j.server, config.vmm)?;
    }
    preflight::check_start(&mut config, a.reset, a.root_size.is_some(), caller)?;
    let guest = super::guest_bin()?;
    // The start goes ahead: say what it exposes.
    for w in beyond_loopback(&config) {
        eprintln!("gatevm: warning: {w}");
    }
    // Only now that the start can go ahead: a refused start keeps the instance's state.
    if a.reset {
        client::reset_state(&name)?;
        eprintln!("{name}: state discarded");
    }
    if a.foreground {
        run_foreground(config, guest)
    } else {
        run_detached(config, &guest)
    }
}

/// `--foreground`: this process is the supervisor; k3s's set-up runs once the guest is ready.
fn run_foreground(config: InstanceConfig, guest: PathBuf) -> anyhow::Result<i32> {
    let mut show = ProgressPrinter::new();
    let name = config.name.clone();
    let k3s = config.k3s.clone();
    gatevm_instance::supervisor::run(
        gatevm_instance::supervisor::SuperviseOptions {
            config,
            guest_bin: guest,
            handle_signals: true,
        },
        Box::new(move |p| {
            show.event(&name, &p);
            if let (Progress::Ready { .. }, Some(s)) = (&p, &k3s) {
                let (n, s) = (name.clone(), s.clone());
                std::thread::spawn(move || {
                    if let Err(e) = k3s::after_ready(&n, &s, &mut super::k3s::show) {
                        let e = anyhow::Error::from(e);
                        eprintln!("gatevm: error: {}", crate::output::error_line(&e));
                    }
                });
            }
        }),
    )?;
    Ok(0)
}

/// A detached supervisor: shows its progress until the guest is ready (then the forwards and
/// k3s's set-up) or the start fails.
fn run_detached(config: InstanceConfig, guest: &Path) -> anyhow::Result<i32> {
    let name = config.name.clone();
    let k3s = config.k3s.clone();
    let exe = std::env::current_exe().context("locating the gatevm executable")?;
    let spawned_at_ms = gatevm_instance::state::now_ms();
    let mut events = client::spawn_supervisor(&exe, &config, guest)?;
    let mut show = ProgressPrinter::new();
    while let Some(p) = client::next_progress(&mut events) {
        show.event(&name, &p);
        match p {
            Progress::Ready { .. } => {
                let st = runtime()?.block_on(client::status(&name))?;
                if !st.forwards.is_empty() {
                    eprintln!("forwards: {}", st.forwards.join(", "));
                }
                if let Some(s) = &k3s {
                    k3s::after_ready(&name, s, &mut super::k3s::show)?;
                }
                return Ok(0);
            }
            Progress::Failed { message } => bail!("{message}"),
            _ => {}
        }
    }
    // Killed before it recorded anything: status must not show the previous run's stop reason.
    client::record_silent_supervisor_death(&name, spawned_at_ms);
    bail!(
        "the supervisor of {name:?} ended without reporting (see {})",
        InstancePaths::new(&name).log("supervisor").display()
    )
}

/// Prints a start's progress events on stderr (one line each, redrawn in place on a terminal).
struct ProgressPrinter {
    tty: bool,
}

impl ProgressPrinter {
    fn new() -> ProgressPrinter {
        ProgressPrinter {
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn event(&mut self, name: &str, p: &Progress) {
        match p {
            Progress::Phase { phase, elapsed_ms } => {
                if self.tty {
                    eprint!("\r\x1b[2K[{}] {name}: {phase}…", secs(*elapsed_ms));
                } else {
                    eprintln!("[{}] {name}: {phase}", secs(*elapsed_ms));
                }
            }
            Progress::Notice { message } => {
                if self.tty {
                    eprint!("\r\x1b[2K");
                }
                eprintln!("notice: {message}");
            }
            Progress::Ready {
                agent_ready_ms,
                ready_ms,
            } => {
                if self.tty {
                    eprint!("\r\x1b[2K");
                }
                eprintln!(
                    "{name} is ready in {} (guest agent after {})",
                    secs(*ready_ms),
                    secs(*agent_ready_ms)
                );
            }
            Progress::Failed { .. } => {
                if self.tty {
                    eprint!("\r\x1b[2K");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishing_beyond_loopback_is_warned_about() {
        let mut c = InstanceConfig::new("w");
        c.forwards = gatevm_instance::net::parse_forwards(&[
            "8080:80".to_string(),
            "0.0.0.0:16443:6443".to_string(),
        ])
        .unwrap();
        let w = beyond_loopback(&c);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("0.0.0.0:16443") && w[0].contains("beyond loopback"),
            "{w:?}"
        );
        assert!(!w[0].contains("cluster token"), "{w:?}");
        c.k3s = Some(gatevm_instance::config::K3sSettings {
            binary: "/k3s".into(),
            version: "v1".into(),
            sha256: String::new(),
            api_port: 16444,
            manifests: vec![],
            images: vec![],
            enable: vec![],
            merge_kubeconfig: false,
            secret_namespace: "gatevm".into(),
            secret_name: "gateway-tls".into(),
            services: vec![],
            tls_sans: vec![],
            gateway: None,
            user_args: vec![],
            join: None,
        });
        let w = beyond_loopback(&c);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("cluster token"), "{w:?}");
    }
}
