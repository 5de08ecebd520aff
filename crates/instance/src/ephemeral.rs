//! Throwaway instances (`gatevm vm-run`): a microVM whose workload is one command.
//!
//! [`run`] boots an ephemeral instance (named `vmrun-…`) on a root directory, an unpacked image
//! archive or gatevm's own rootfs, runs the command through the given exec function when the
//! guest is ready, stops the VM and deletes the instance; the result is the command's. The root
//! given is the read-only lower layer of an overlay, so the VM's writes never reach it. If the
//! calling process is killed, the VM dies with it (its processes carry a death signal) and the
//! next throwaway run removes what is left.

use crate::client::{self, EPHEMERAL_HOLD, EPHEMERAL_PREFIX};
use crate::config::{Ephemeral, InstanceConfig};
use crate::control::Progress;
use crate::paths::InstancePaths;
use crate::supervisor::{self, SuperviseOptions};
use gatevm_abi::ExecRequest;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default guest memory of a throwaway VM, in MiB.
pub const DEFAULT_MEMORY_MIB: u32 = 1024;

/// The error of a command run in the guest, as the exec function gave it.
pub type ExecError = Box<dyn std::error::Error + Send + Sync>;

/// Errors of a throwaway run; each message names what failed.
#[derive(Debug, thiserror::Error)]
pub enum EphemeralError {
    /// An input that cannot be used, or a step that did not work out (the message says which).
    #[error("{0}")]
    Invalid(String),
    #[error("--rootfs {}: cannot be opened", path.display())]
    RootOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The command's own error (from the exec function).
    #[error(transparent)]
    Exec(ExecError),
}

fn invalid(message: String) -> EphemeralError {
    EphemeralError::Invalid(message)
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> EphemeralError {
    move |source| EphemeralError::Io { what, source }
}

/// Checks a root directory for `--rootfs`: it must exist and be a directory other than `/`. (It is
/// copied into a read-only image for the VM, so any path name works.)
pub fn root_dir(dir: &Path) -> Result<PathBuf, EphemeralError> {
    let abs = std::fs::canonicalize(dir).map_err(|source| EphemeralError::RootOpen {
        path: dir.to_path_buf(),
        source,
    })?;
    if !abs.is_dir() {
        return Err(invalid(format!(
            "--rootfs {} is not a directory",
            dir.display()
        )));
    }
    if abs == Path::new("/") {
        return Err(invalid("--rootfs / would hand the host's whole filesystem to the guest: give a root directory of its own".into()));
    }
    Ok(abs)
}

/// Checks an image archive before anything is created: a non-empty file that reads as a
/// `docker save` or OCI archive with an image for this host (reading only its index and
/// documents; the layers are unpacked later).
pub fn check_image(img: &Path) -> Result<(), EphemeralError> {
    let meta = match std::fs::metadata(img) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(invalid(format!(
                "--image {} is not a file: it does not exist",
                img.display()
            )))
        }
        Err(e) => return Err(invalid(format!("--image {}: {e}", img.display()))),
    };
    if !meta.is_file() {
        return Err(invalid(format!("--image {} is not a file", img.display())));
    }
    if meta.len() == 0 {
        return Err(invalid(format!(
            "--image {} is empty: not an image archive",
            img.display()
        )));
    }
    gatevm_oci::inspect_archive(img).map_err(|e| archive_error(img, e))?;
    Ok(())
}

/// An archive error that names the archive (once).
fn archive_error(img: &std::path::Path, e: gatevm_oci::OciError) -> EphemeralError {
    let msg = gatevm_abi::error_chain(&e);
    if msg.contains(&*img.to_string_lossy()) {
        invalid(msg)
    } else {
        invalid(format!("image archive {}: {msg}", img.display()))
    }
}

/// A fresh name for a throwaway instance.
pub fn fresh_name() -> String {
    format!(
        "{EPHEMERAL_PREFIX}{}-{}",
        std::process::id(),
        crate::name::random_hex(4)
    )
}

/// What a throwaway run boots on besides its configuration: an image archive to unpack as its
/// root (with the image's command, environment and working directory under the user's).
#[derive(Debug, Clone, Default)]
pub struct Image {
    /// The archive (`docker save` or OCI), checked with [`check_image`].
    pub archive: Option<PathBuf>,
    /// Which image of a multi-image archive.
    pub reference: Option<String>,
}

/// Runs a throwaway instance of `config` (its name is replaced by a fresh `vmrun-…` one): clears
/// what killed runs left, takes the new instance's hold lock, unpacks the image, boots, runs
/// `req` through `exec` once the guest is ready, stops the VM and removes the instance whatever
/// happened. Returns the command's exit code.
pub fn run(
    mut config: InstanceConfig,
    guest: PathBuf,
    image: &Image,
    mut req: ExecRequest,
    exec: impl FnOnce(&str, ExecRequest) -> Result<i32, ExecError>,
) -> Result<i32, EphemeralError> {
    client::sweep_ephemeral();
    let mut name = fresh_name();
    config.name = name.clone();
    // A concurrent vm-run's sweep may take a directory between its creation and its hold lock
    // (it sweeps only under that lock): then this run takes another name.
    let mut tries = 0;
    let (paths, hold) = loop {
        let paths = InstancePaths::new(&name);
        paths
            .create_dirs()
            .map_err(io_err(format!("creating {}", paths.dir.display())))?;
        match crate::lock::try_lock(&paths.dir.join(EPHEMERAL_HOLD)) {
            Ok(Some(hold)) if paths.dir.is_dir() => break (paths, hold),
            Ok(_) | Err(_) if tries < 5 => {
                tries += 1;
                name = fresh_name();
                config.name = name.clone();
            }
            Ok(_) => {
                return Err(invalid(format!(
                    "cannot hold the throwaway instance {name}: it is being swept"
                )))
            }
            Err(e) => return Err(io_err("locking the throwaway instance".into())(e)),
        }
    };
    let result = (|| {
        if let Some(img) = &image.archive {
            let dir = paths.dir.join("image-root");
            std::fs::create_dir(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
            let unpacked = gatevm_oci::unpack_archive(img, &dir, image.reference.as_deref())
                .map_err(|e| archive_error(img, e))?;
            for s in &unpacked.skipped {
                tracing::info!("image entry not unpacked: {s}");
            }
            apply_image_config(&mut req, &unpacked.config)?;
            config.ephemeral = Some(Ephemeral { rootfs: Some(dir) });
        }
        boot_and_exec(config.clone(), guest.clone(), req, exec)
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
fn apply_image_config(
    req: &mut ExecRequest,
    img: &gatevm_oci::ImageConfig,
) -> Result<(), EphemeralError> {
    if req.argv.is_empty() {
        req.argv = img.entrypoint.iter().chain(&img.cmd).cloned().collect();
        if req.argv.is_empty() {
            return Err(invalid(
                "the image names no command (no Entrypoint or Cmd): give one after --".into(),
            ));
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
fn boot_and_exec(
    config: InstanceConfig,
    guest: PathBuf,
    req: ExecRequest,
    exec: impl FnOnce(&str, ExecRequest) -> Result<i32, ExecError>,
) -> Result<i32, EphemeralError> {
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
        .map_err(io_err("starting the supervisor thread".into()))?;
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
        Some(exec(&name, req).map_err(EphemeralError::Exec))
    } else {
        None
    };
    if ready {
        tracing::info!("command ended; stopping the VM");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io_err("building the async runtime".into()))?;
        let _ = rt.block_on(client::stop(&name, Duration::from_secs(10)));
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
            Err(invalid(format!("the VM did not start: {why}")))
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
        // No overlay option string is built from the path any more: any name works.
        let odd = d.path().join("a,b:c\\d");
        std::fs::create_dir(&odd).unwrap();
        assert_eq!(
            root_dir(&odd).unwrap(),
            std::fs::canonicalize(&odd).unwrap()
        );
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
        assert!(crate::name::validate(&a).is_ok(), "{a}");
        assert!(a.starts_with(EPHEMERAL_PREFIX));
        assert_ne!(a, b);
    }
}
