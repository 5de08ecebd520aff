//! `gatevm vm-run`: a throwaway microVM whose workload is one command.
//!
//! It boots an ephemeral instance (named `vmrun-…`) on a root directory, an unpacked image
//! archive or gatevm's own rootfs, runs the command through the guest agent with this process's
//! stdio, stops the VM and deletes the instance; the exit code is the command's. The root given
//! is the read-only lower layer of an overlay, so the VM's writes never reach it. If this process
//! is killed, the VM dies with it (its processes carry a death signal) and the next `vm-run`
//! removes what is left.

use crate::output::runtime;
use anyhow::{bail, Context};
use gatevm_instance::client::{self, EPHEMERAL_HOLD, EPHEMERAL_PREFIX};
use gatevm_instance::config::{host_memory_mib, Ephemeral, DEFAULT_CPUS};
use gatevm_instance::supervisor::{self, Progress, SuperviseOptions};
use gatevm_instance::{InstanceConfig, InstancePaths, VmmChoice};
use gatevm_protocol::ExecRequest;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default guest memory of a throwaway VM, in MiB.
pub const DEFAULT_MEMORY_MIB: u32 = 1024;

#[derive(clap::Args)]
pub struct Args {
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
    /// The network helper: gvproxy or passt [default: gvproxy].
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

/// Checks a root directory: it must exist and be usable as an overlay lower layer.
fn root_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    let abs = std::fs::canonicalize(dir)
        .with_context(|| format!("--rootfs {}: cannot be opened", dir.display()))?;
    if !abs.is_dir() {
        bail!("--rootfs {} is not a directory", dir.display());
    }
    let s = abs.to_string_lossy();
    if s.contains([',', ':', '\n']) || s.contains('\\') {
        bail!(
            "--rootfs {}: the path may not contain ',', ':' or '\\' (overlayfs option syntax)",
            abs.display()
        );
    }
    if abs == Path::new("/") {
        bail!("--rootfs / would hand the host's whole filesystem to the guest: give a root directory of its own");
    }
    Ok(abs)
}

/// Checks an image archive before anything is created: a non-empty file that reads as a
/// `docker save` or OCI archive with an image for this host (reading only its index and
/// documents; the layers are unpacked later).
fn check_image(img: &Path) -> anyhow::Result<()> {
    let meta = match std::fs::metadata(img) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("--image {} is not a file: it does not exist", img.display())
        }
        Err(e) => bail!("--image {}: {e}", img.display()),
    };
    if !meta.is_file() {
        bail!("--image {} is not a file", img.display());
    }
    if meta.len() == 0 {
        bail!("--image {} is empty: not an image archive", img.display());
    }
    gatevm_oci::inspect_archive(img).map_err(|e| archive_error(img, e))?;
    Ok(())
}

/// An archive error that names the archive (once).
fn archive_error(img: &std::path::Path, e: impl std::fmt::Display) -> anyhow::Error {
    let msg = e.to_string();
    if msg.contains(&*img.to_string_lossy()) {
        anyhow::anyhow!("{msg}")
    } else {
        anyhow::anyhow!("image archive {}: {msg}", img.display())
    }
}

/// A fresh name for a throwaway instance.
fn fresh_name() -> String {
    format!(
        "{EPHEMERAL_PREFIX}{}-{}",
        std::process::id(),
        super::random_hex(4)
    )
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    // Everything from the command line is checked before anything is created.
    let rootfs = a.rootfs.as_deref().map(root_dir).transpose()?;
    if let Some(img) = &a.image {
        check_image(img)?;
    }
    if a.cmd.is_empty() && a.image.is_none() {
        bail!("no command: give one after --, e.g. gatevm vm-run -- uname -a");
    }
    let mut req = a.exec.request(&a.cmd)?;
    let forwards = gatevm_net::parse_forwards(&a.publish)?;
    super::check_ports_free(&forwards)?;
    let mut name = fresh_name();
    let mut config = InstanceConfig {
        cpus: a.cpus,
        memory_mib: a.memory,
        forwards,
        allow_host_loopback: a.allow_host_loopback,
        vmm: a.vmm.unwrap_or_default(),
        net: a.net.unwrap_or_default(),
        disk_gib: 0,
        krun_kernel: a.krun_kernel.clone(),
        ephemeral: Some(Ephemeral { rootfs }),
        ..InstanceConfig::new(&name)
    };
    config.validate(host_memory_mib())?;
    super::start::check_krun_kernel(&config)?;
    let rt = gatevm_runtime::Runtime::load()?;
    super::start::check_backend(&config, &rt)?;
    let guest = super::guest_bin()?;

    client::sweep_ephemeral();
    // A concurrent vm-run's sweep may take a directory between its creation and its hold lock
    // (it sweeps only under that lock): then this run takes another name.
    let mut tries = 0;
    let (paths, hold) = loop {
        let paths = InstancePaths::new(&name);
        paths
            .create_dirs()
            .with_context(|| format!("creating {}", paths.dir.display()))?;
        match gatevm_instance::lock::try_lock(&paths.dir.join(EPHEMERAL_HOLD)) {
            Ok(Some(hold)) if paths.dir.is_dir() => break (paths, hold),
            Ok(_) | Err(_) if tries < 5 => {
                tries += 1;
                name = fresh_name();
                config.name = name.clone();
            }
            Ok(_) => bail!("cannot hold the throwaway instance {name}: it is being swept"),
            Err(e) => return Err(anyhow::Error::new(e).context("locking the throwaway instance")),
        }
    };
    let result = (|| {
        if let Some(img) = &a.image {
            let dir = paths.dir.join("image-root");
            std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let unpacked = gatevm_oci::unpack_archive(img, &dir, a.image_ref.as_deref())
                .map_err(|e| archive_error(img, e))?;
            for s in &unpacked.skipped {
                tracing::info!("image entry not unpacked: {s}");
            }
            apply_image_config(&mut req, &unpacked.config)?;
            config.ephemeral = Some(Ephemeral { rootfs: Some(dir) });
        }
        boot_and_exec(config.clone(), guest.clone(), req)
    })();
    // Whatever happened, nothing stays behind (the supervisor has ended: `boot_and_exec` joined
    // it).
    if let Err(e) = client::remove_ephemeral(&paths) {
        tracing::warn!("removing the throwaway instance {name}: {e}");
    }
    drop(hold);
    result
}

/// The image's entrypoint, command, environment and working directory under the user's choices.
fn apply_image_config(req: &mut ExecRequest, img: &gatevm_oci::ImageConfig) -> anyhow::Result<()> {
    if req.argv.is_empty() {
        req.argv = img.entrypoint.iter().chain(&img.cmd).cloned().collect();
        if req.argv.is_empty() {
            bail!("the image names no command (no Entrypoint or Cmd): give one after --");
        }
    } else if !img.entrypoint.is_empty() {
        // Like `docker run IMAGE ARGS`: arguments go to the entrypoint.
        req.argv = img.entrypoint.iter().chain(&req.argv).cloned().collect();
    }
    let user_env = std::mem::take(&mut req.env);
    for kv in &img.env {
        if let Some((k, v)) = kv.split_once('=') {
            if !k.is_empty() && !user_env.iter().any(|(uk, _)| uk == k) {
                req.env.push((k.to_string(), v.to_string()));
            }
        }
    }
    req.env.extend(user_env);
    if req.cwd.is_none() {
        req.cwd = img.working_dir.clone().filter(|w| !w.is_empty());
    }
    Ok(())
}

/// Runs the supervisor of the throwaway instance on a thread of this process, runs the command
/// when the guest is ready, then stops the VM.
fn boot_and_exec(config: InstanceConfig, guest: PathBuf, req: ExecRequest) -> anyhow::Result<i32> {
    let name = config.name.clone();
    let (tx, rx) = std::sync::mpsc::channel::<Progress>();
    let sup = std::thread::Builder::new()
        .name("supervisor".into())
        .spawn(move || {
            supervisor::run(
                SuperviseOptions {
                    config,
                    guest_bin: guest,
                    handle_signals: false,
                },
                Box::new(move |p| {
                    let _ = tx.send(p);
                }),
            )
        })
        .context("starting the supervisor thread")?;
    let mut ready = false;
    let mut failure = None;
    for p in rx.iter() {
        match p {
            Progress::Ready { ready_ms, .. } => {
                tracing::info!("guest ready at {ready_ms} ms");
                ready = true;
                break;
            }
            Progress::Failed { message } => {
                failure = Some(message);
                break;
            }
            Progress::Notice { message } => tracing::info!("{message}"),
            Progress::Phase { phase, elapsed_ms } => tracing::info!("{phase} at {elapsed_ms} ms"),
        }
    }
    let code = if ready {
        Some(super::exec::run_exec(&name, req))
    } else {
        None
    };
    if ready {
        tracing::info!("command ended; stopping the VM");
        let _ = runtime()?.block_on(client::stop(&name, Duration::from_secs(10)));
    }
    let joined = sup.join();
    match code {
        Some(c) => c,
        None => {
            let why = match joined {
                Ok(Err(e)) => e.to_string(),
                Err(_) => "the supervisor thread panicked".into(),
                Ok(Ok(())) => failure.unwrap_or_else(|| "the VM ended during boot".into()),
            };
            bail!("the VM did not start: {why}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_config_fills_what_the_user_left_open() {
        let img = gatevm_oci::ImageConfig {
            entrypoint: vec!["/bin/tini".into(), "--".into()],
            cmd: vec!["sh".into()],
            env: vec!["PATH=/bin".into(), "A=1".into(), "junk".into()],
            working_dir: Some("/app".into()),
            user: None,
        };
        let mut req = ExecRequest {
            argv: vec![],
            env: vec![("A".into(), "2".into())],
            cwd: None,
            tty: false,
            rows: 0,
            cols: 0,
            stdin: false,
        };
        apply_image_config(&mut req, &img).unwrap();
        assert_eq!(req.argv, ["/bin/tini", "--", "sh"]);
        assert_eq!(
            req.env,
            [
                ("PATH".to_string(), "/bin".to_string()),
                ("A".into(), "2".into())
            ]
        );
        assert_eq!(req.cwd.as_deref(), Some("/app"));

        let mut req2 = ExecRequest {
            argv: vec!["echo".into(), "hi".into()],
            cwd: Some("/".into()),
            ..req.clone()
        };
        apply_image_config(&mut req2, &img).unwrap();
        assert_eq!(req2.argv, ["/bin/tini", "--", "echo", "hi"]);
        assert_eq!(req2.cwd.as_deref(), Some("/"));

        let empty = gatevm_oci::ImageConfig {
            entrypoint: vec![],
            cmd: vec![],
            env: vec![],
            working_dir: None,
            user: None,
        };
        let mut req3 = ExecRequest {
            argv: vec![],
            ..req
        };
        assert!(apply_image_config(&mut req3, &empty)
            .unwrap_err()
            .to_string()
            .contains("no command"));
    }

    #[test]
    fn root_directories_are_checked() {
        assert!(root_dir(Path::new("/nonexistent/x")).is_err());
        assert!(root_dir(Path::new("/"))
            .unwrap_err()
            .to_string()
            .contains("whole filesystem"));
        let d = tempfile::tempdir().unwrap();
        let odd = d.path().join("a,b");
        std::fs::create_dir(&odd).unwrap();
        assert!(root_dir(&odd)
            .unwrap_err()
            .to_string()
            .contains("may not contain"));
        let f = d.path().join("file");
        std::fs::write(&f, b"").unwrap();
        assert!(root_dir(&f)
            .unwrap_err()
            .to_string()
            .contains("not a directory"));
        assert_eq!(
            root_dir(d.path()).unwrap(),
            std::fs::canonicalize(d.path()).unwrap()
        );
    }

    #[test]
    fn fresh_names_are_valid_and_distinct() {
        let a = fresh_name();
        let b = fresh_name();
        assert!(gatevm_instance::name::validate(&a).is_ok(), "{a}");
        assert!(a.starts_with(EPHEMERAL_PREFIX));
        assert_ne!(a, b);
    }
}
