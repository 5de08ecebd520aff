//! `gatevm start`

use crate::output::{runtime, secs};
use anyhow::{bail, Context};
use gatevm_instance::config::host_memory_mib;
use gatevm_instance::control::Progress;
use gatevm_instance::{client, k3s};
use gatevm_instance::{InstanceConfig, InstancePaths, VmmChoice};
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Instance name: lowercase letters, digits and '-', at most 63 characters.
    #[arg(default_value = super::DEFAULT_NAME)]
    name: String,
    /// Virtual CPUs [default: 2, or what the instance last ran with].
    #[arg(long)]
    cpus: Option<u32>,
    /// Guest memory in MiB [default: 2048, or what the instance last ran with].
    #[arg(long)]
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
    /// Withdraw an earlier --allow-host-loopback.
    #[arg(long, conflicts_with = "allow_host_loopback")]
    deny_host_loopback: bool,
    /// The virtual machine monitor: auto (libkrun with hardware virtualization, else QEMU), krun
    /// or qemu [default: $GATEVM_VMM, or what the instance last ran with, or auto].
    #[arg(long, value_name = "VMM", env = "GATEVM_VMM", value_parser = parse_vmm)]
    vmm: Option<VmmChoice>,
    /// The network helper: gvproxy, or passt (the host's own sockets; forwards fixed at start)
    /// [default: what the instance last ran with, or gvproxy].
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

/// `--vmm` values.
pub fn parse_net(s: &str) -> Result<gatevm_instance::config::NetBackend, String> {
    s.parse()
}

pub fn parse_vmm(s: &str) -> Result<VmmChoice, String> {
    s.parse()
}

/// Fails when `--krun-kernel` (given or saved) is not a file.
pub fn check_krun_kernel(config: &InstanceConfig) -> anyhow::Result<()> {
    if let Some(k) = &config.krun_kernel {
        if !k.is_file() {
            bail!("--krun-kernel {} is not a file", k.display());
        }
    }
    Ok(())
}

/// Fails at once, naming the reason and the alternative, when the chosen backend or network helper
/// cannot run here.
pub fn check_backend(
    config: &InstanceConfig,
    runtime: &gatevm_runtime::Runtime,
) -> anyhow::Result<()> {
    check_krun_kernel(config)?;
    if config.net == gatevm_instance::config::NetBackend::Passt {
        gatevm_net::passt::check_forwards(&gatevm_instance::config::all_forwards(config))?;
        let passt = runtime.passt();
        if !passt.is_file() {
            bail!(
                "--net passt: {} is missing: run `gatevm setup` (it builds passt)",
                passt.display()
            );
        }
    }
    gatevm_instance::backend::choose(
        config.vmm,
        &gatevm_vmm::probe(),
        &runtime.libkrunfw(),
        config.krun_kernel.as_deref(),
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    Ok(())
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let name = super::name_arg(&a.name)?.to_string();
    if name.starts_with(client::EPHEMERAL_PREFIX) {
        bail!(
            "instance names starting with {:?} are reserved for gatevm vm-run",
            client::EPHEMERAL_PREFIX
        );
    }
    let forwards = gatevm_net::parse_forwards(&a.publish)?;
    // An existing instance starts as it last ran, with the flags given on top.
    let saved = client::saved_config(&name);
    let base = saved.unwrap_or_else(|| InstanceConfig::new(&name));
    let mut config = InstanceConfig {
        name: name.clone(),
        cpus: a.cpus.unwrap_or(base.cpus),
        memory_mib: a.memory.unwrap_or(base.memory_mib),
        forwards: if a.no_publish || !forwards.is_empty() {
            forwards
        } else {
            base.forwards
        },
        allow_host_loopback: (base.allow_host_loopback || a.allow_host_loopback)
            && !a.deny_host_loopback,
        vmm: a.vmm.unwrap_or(base.vmm),
        net: a.net.unwrap_or(base.net),
        disk_gib: a.disk.unwrap_or(base.disk_gib),
        root_mib: a.root_size.unwrap_or(base.root_mib),
        krun_kernel: a.krun_kernel.or(base.krun_kernel),
        ephemeral: None,
        k3s: None,
    };
    // The cheap checks first: resolving k3s may download it.
    config.validate(host_memory_mib())?;
    check_krun_kernel(&config)?;
    config.k3s = k3s::resolve(&a.k3s.request(), base.k3s.as_ref(), &mut super::k3s::show)?;
    gatevm_runtime::dirs::data_dir().context("finding the data directory")?;
    let paths = InstancePaths::new(&name);
    if client::is_running(&paths) {
        bail!("instance {name:?} is already running");
    }
    super::check_ports_free(&gatevm_instance::config::all_forwards(&config))?;
    if let Ok(meta) = std::fs::metadata(paths.state_disk()) {
        let have = meta.len() >> 30;
        if !a.reset && u64::from(config.disk_gib) < have {
            bail!(
                "the state disk of {name:?} is {have} GiB and cannot shrink to {} GiB (--reset discards it)",
                config.disk_gib
            );
        }
    }
    if let Ok(meta) = std::fs::metadata(paths.upper_image()) {
        let have = (meta.len() >> 20) as u32;
        if !a.reset && a.root_size.is_some_and(|m| m != have) {
            bail!(
                "the root budget of {name:?} is {have} MiB; it changes only with --reset (which discards the root's writable layer)"
            );
        }
        config.root_mib = have;
    }
    let rt = gatevm_runtime::Runtime::load()?;
    check_backend(&config, &rt)?;
    let guest = super::guest_bin()?;
    // Only now that the start can go ahead: a refused start keeps the instance's state.
    if a.reset {
        client::reset_state(&name)?;
        eprintln!("{name}: state discarded");
    }

    let show = Shower::new();
    let k3s = config.k3s.clone();
    if a.foreground {
        let mut show = show;
        let k3s_fg = k3s.clone();
        let name_fg = name.clone();
        let result = gatevm_instance::supervisor::run(
            gatevm_instance::supervisor::SuperviseOptions {
                config,
                guest_bin: guest,
                handle_signals: true,
            },
            Box::new(move |p| {
                show.event(&name, &p);
                if let (Progress::Ready { .. }, Some(s)) = (&p, &k3s_fg) {
                    let (n, s) = (name_fg.clone(), s.clone());
                    std::thread::spawn(move || {
                        if let Err(e) = k3s::after_ready(&n, &s, &mut super::k3s::show) {
                            let e = anyhow::Error::from(e);
                            eprintln!("gatevm: error: {}", crate::output::error_line(&e));
                        }
                    });
                }
            }),
        );
        return match result {
            Ok(()) => Ok(0),
            Err(e) => Err(e.into()),
        };
    }
    let exe = std::env::current_exe().context("locating the gatevm executable")?;
    let mut events = client::spawn_supervisor(&exe, &config, &guest)?;
    let mut show = show;
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
    bail!(
        "the supervisor of {name:?} ended without reporting (see {})",
        paths.log("supervisor").display()
    )
}

/// Shows start progress on stderr.
struct Shower {
    tty: bool,
}

impl Shower {
    fn new() -> Shower {
        Shower {
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
