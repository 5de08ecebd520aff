//! `gatevm vm-run`: a throwaway microVM whose workload is one command, run with this process's
//! stdio; the exit code is the command's. The lifecycle is [`gatevm_instance::ephemeral`].

use anyhow::bail;
use gatevm_instance::config::{Ephemeral, DEFAULT_CPUS};
use gatevm_instance::ephemeral::{self, Image, DEFAULT_MEMORY_MIB};
use gatevm_instance::{preflight, InstanceConfig, VmmChoice};
use std::path::PathBuf;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Boot on this root directory (read-only: the VM writes to a private layer on top).
    #[arg(long, value_name = "DIR", conflicts_with = "image")]
    rootfs: Option<PathBuf>,
    /// Boot on the layers of a `docker save` or OCI image archive (tar, or gzip-compressed tar),
    /// unpacked into a private root.
    #[arg(long, value_name = "ARCHIVE")]
    image: Option<PathBuf>,
    /// Which image of a multi-image archive (a tag such as busybox:latest).
    #[arg(long, value_name = "REF", requires = "image")]
    image_ref: Option<String>,
    /// Virtual CPUs.
    #[arg(long, default_value_t = DEFAULT_CPUS)]
    cpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = DEFAULT_MEMORY_MIB)]
    memory: u32,
    /// Forward a host port to the guest: [ip:]hostport:guestport[/tcp|/udp] (127.0.0.1 unless an
    /// address is given). Repeatable.
    #[arg(short = 'p', long = "publish", value_name = "SPEC")]
    publish: Vec<String>,
    /// Let the guest reach services on the host's loopback through 192.168.127.254.
    #[arg(long)]
    allow_host_loopback: bool,
    /// The virtual machine monitor: auto, krun or qemu [default: $GATEVM_VMM, or auto].
    #[arg(long, value_name = "VMM", env = "GATEVM_VMM", value_parser = super::start::parse_vmm)]
    vmm: Option<VmmChoice>,
    /// The network helper: gvproxy or passt [default: gvproxy as root, passt as an ordinary user,
    /// who cannot attach gvproxy's loopback guard].
    #[arg(long, value_name = "HELPER", value_parser = super::start::parse_net)]
    net: Option<gatevm_instance::config::NetBackend>,
    /// A kernel (uncompressed ELF) for the krun backend instead of libkrunfw's.
    #[arg(long, value_name = "PATH")]
    krun_kernel: Option<PathBuf>,
    #[command(flatten)]
    exec: super::exec::ExecOpts,
    /// The command and its arguments [default with --image: the image's entrypoint and command].
    #[arg(last = true, value_name = "CMD")]
    cmd: Vec<String>,
}

pub(crate) fn run(a: Args) -> anyhow::Result<i32> {
    // Everything from the command line is checked before anything is created.
    let rootfs = a.rootfs.as_deref().map(ephemeral::root_dir).transpose()?;
    if let Some(img) = &a.image {
        ephemeral::check_image(img)?;
    }
    if a.cmd.is_empty() && a.image.is_none() {
        bail!("no command: give one after --, e.g. gatevm vm-run -- uname -a");
    }
    let req = a.exec.request(&a.cmd)?;
    let forwards = gatevm_instance::net::parse_forwards(&a.publish)?;
    let caller = preflight::Caller::probe();
    preflight::check_ports_free(&forwards, caller)?;
    let name = ephemeral::fresh_name();
    let net = preflight::choose_net(&name, a.net, None, a.allow_host_loopback, caller)?;
    let config = InstanceConfig {
        cpus: a.cpus,
        memory_mib: a.memory,
        forwards,
        allow_host_loopback: a.allow_host_loopback,
        vmm: a.vmm.unwrap_or_default(),
        net,
        disk_gib: 0,
        krun_kernel: a.krun_kernel.clone(),
        ephemeral: Some(Ephemeral { rootfs }),
        ..InstanceConfig::new(&name)
    };
    preflight::check_config(&config)?;
    preflight::check_backend(&config)?;
    let guest = super::guest_bin()?;

    let image = Image {
        archive: a.image.clone(),
        reference: a.image_ref.clone(),
    };
    Ok(ephemeral::run(config, guest, &image, req, |name, req| {
        super::exec::run_exec(name, req).map_err(Into::into)
    })?)
}
