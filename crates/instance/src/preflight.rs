//! The checks made before anything is created: the environment that places gatevm's files, a
//! start's settings against the host and the instance's files, the chosen backend and network
//! helper. Each fails at once with one line naming what is wrong and, when known, what to do.

use crate::client::{self, EPHEMERAL_PREFIX};
use crate::config::{self, ConfigError, InstanceConfig, NetBackend};
use crate::paths::InstancePaths;
use gatevm_net::Forward;
use gatevm_runtime::dirs::DirsError;
use gatevm_runtime::{Runtime, RuntimeError};
use std::path::{Path, PathBuf};

/// Why a command cannot go ahead.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// A `GATEVM_*_DIR` override is relative.
    #[error("{var}={} is not an absolute path: give the full path (or unset it)", .path.display())]
    RelativeDir { var: &'static str, path: PathBuf },
    /// A `GATEVM_*_DIR` override names something that is not a directory.
    #[error("{var}={} is not a directory", .path.display())]
    DirNotDirectory { var: &'static str, path: PathBuf },
    /// A `GATEVM_*_DIR` override cannot be looked at.
    #[error("{var}={} cannot be used", .path.display())]
    DirUnusable {
        var: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The data directory is not a directory.
    #[error("the data directory {} is not a directory", .0.display())]
    DataDirNotDirectory(PathBuf),
    /// The data directory cannot be looked at.
    #[error("the data directory {} cannot be used", .path.display())]
    DataDirUnusable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The directories could not be found or are refused.
    #[error(transparent)]
    Dirs(#[from] DirsError),
    /// The data directory could not be found (a start).
    #[error("finding the data directory")]
    FindDataDir(#[source] DirsError),
    /// The name is one `gatevm vm-run` reserves.
    #[error("instance names starting with {EPHEMERAL_PREFIX:?} are reserved for gatevm vm-run")]
    ReservedName,
    /// The settings are out of range.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `--krun-kernel` (given or saved) is not a file.
    #[error("--krun-kernel {} is not a file", .0.display())]
    KrunKernel(PathBuf),
    /// The instance runs already.
    #[error("instance {0:?} is already running")]
    AlreadyRunning(String),
    /// A forward's host port is taken.
    #[error("host port {addr} ({proto}) is not available")]
    PortTaken {
        addr: std::net::SocketAddr,
        proto: gatevm_net::forward::Proto,
        #[source]
        source: std::io::Error,
    },
    /// `--disk` is smaller than the existing state disk.
    #[error("the state disk of {name:?} is {have} GiB and cannot shrink to {want} GiB (--reset discards it)")]
    DiskShrink { name: String, have: u64, want: u32 },
    /// `--root-size` differs from the existing root budget without `--reset`.
    #[error("the root budget of {name:?} is {have} MiB; it changes only with --reset (which discards the root's writable layer)")]
    RootBudget { name: String, have: u32 },
    /// The runtime bundle cannot be loaded.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// passt cannot carry a forward.
    #[error(transparent)]
    PasstForwards(#[from] gatevm_net::passt::PasstError),
    /// A shared directory is refused.
    #[error(transparent)]
    Volume(#[from] crate::volume::VolumeError),
    /// virtiofsd is not in the runtime (QEMU shares need it).
    #[error("-v needs virtiofsd, and {} is missing: run `gatevm setup`", .0.display())]
    VirtiofsdMissing(PathBuf),
    /// passt is not in the runtime.
    #[error("--net passt: {} is missing: run `gatevm setup` (it builds passt)", .0.display())]
    PasstMissing(PathBuf),
    /// The chosen VMM cannot run here: the reason and the alternative.
    #[error("{0}")]
    Backend(String),
    /// The network helper asked for (or saved) cannot keep its guarantee here.
    #[error(transparent)]
    Net(#[from] crate::backend::NetChoiceError),
    /// A forward's host port needs root.
    #[error("forward {forward}: host port {port} is below net.ipv4.ip_unprivileged_port_start ({start}), so only root can bind it: use a host port of {start} or more, or lower that sysctl (sysctl net.ipv4.ip_unprivileged_port_start={port})")]
    PrivilegedPort {
        forward: Forward,
        port: u16,
        start: u16,
    },
}

/// What the calling process may do, as far as a start's network is concerned: probed once per
/// command ([`Caller::probe`]), given to the checks below (tests give their own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// It can attach the loopback guard (cgroup BPF): root with cgroup v2.
    pub can_guard: bool,
    /// It is root, so it can bind host ports below `net.ipv4.ip_unprivileged_port_start`.
    pub root: bool,
}

impl Caller {
    /// This process: whether it is root, and whether it can attach the loopback guard (a real
    /// attempt on a cgroup of its own, removed again).
    pub fn probe() -> Caller {
        let can_guard = match gatevm_net::loopback::LoopbackGuard::probe() {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!("the loopback guard cannot be attached: {e}");
                false
            }
        };
        Caller {
            can_guard,
            // SAFETY: geteuid has no preconditions and cannot fail.
            root: unsafe { libc::geteuid() } == 0,
        }
    }
}

/// The network helper of a start, chosen once ([`crate::backend::choose_net`]): `asked` with
/// `--net`, else what the instance `saved` last ran with, else gvproxy where the caller can attach
/// the loopback guard and passt where it cannot. gvproxy without its guard is refused unless
/// `allow_host_loopback`.
pub fn choose_net(
    name: &str,
    asked: Option<NetBackend>,
    saved: Option<NetBackend>,
    allow_host_loopback: bool,
    caller: Caller,
) -> Result<NetBackend, PreflightError> {
    Ok(crate::backend::choose_net(
        name,
        asked,
        saved,
        allow_host_loopback,
        caller.can_guard,
    )?)
}

/// Fails naming the first forward whose host port only root can bind, when the caller is not
/// root: ports below `unprivileged_start` (`net.ipv4.ip_unprivileged_port_start`).
pub fn check_low_ports(
    forwards: &[Forward],
    caller: Caller,
    unprivileged_start: u16,
) -> Result<(), PreflightError> {
    if caller.root {
        return Ok(());
    }
    match forwards.iter().find(|f| f.host_port < unprivileged_start) {
        Some(f) => Err(PreflightError::PrivilegedPort {
            forward: *f,
            port: f.host_port,
            start: unprivileged_start,
        }),
        None => Ok(()),
    }
}

/// Variables that place gatevm's files; each, when set and not empty, must be an absolute path.
const DIR_VARS: &[&str] = &[
    "GATEVM_DATA_DIR",
    "GATEVM_RUNTIME_DIR",
    "GATEVM_CACHE_DIR",
    "GATEVM_RUN_DIR",
];

/// Checks the environment that places gatevm's files before a command reads or writes any:
/// a `GATEVM_*_DIR` override that is set must be an absolute path that is a directory or does not
/// exist yet (the library would otherwise ignore a relative one and use the default), and the
/// data directory must be found (`$HOME` unset is refused here rather than falling back to a
/// system-wide directory).
pub fn check_env() -> Result<(), PreflightError> {
    for &var in DIR_VARS {
        let Some(value) = std::env::var_os(var).filter(|v| !v.is_empty()) else {
            continue;
        };
        let path = PathBuf::from(value);
        if !path.is_absolute() {
            return Err(PreflightError::RelativeDir { var, path });
        }
        match dir_state(&path) {
            DirState::Usable => {}
            DirState::NotDirectory => return Err(PreflightError::DirNotDirectory { var, path }),
            DirState::Unusable(source) => {
                return Err(PreflightError::DirUnusable { var, path, source })
            }
        }
        // Another user's directory is refused (root included: `sudo -E` passes them on).
        gatevm_runtime::dirs::env_dir(var)?;
    }
    let data = gatevm_runtime::dirs::data_dir()?;
    match dir_state(&data) {
        DirState::Usable => Ok(()),
        DirState::NotDirectory => Err(PreflightError::DataDirNotDirectory(data)),
        DirState::Unusable(source) => Err(PreflightError::DataDirUnusable { path: data, source }),
    }
}

/// Whether a path can be a directory of gatevm's.
enum DirState {
    /// It is one (through symlinks) or does not exist.
    Usable,
    NotDirectory,
    Unusable(std::io::Error),
}

fn dir_state(p: &Path) -> DirState {
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => DirState::Usable,
        Ok(_) => DirState::NotDirectory,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => DirState::Usable,
        Err(e) => DirState::Unusable(e),
    }
}

/// Refuses a name `gatevm vm-run` reserves for its throwaway instances.
pub fn check_start_name(name: &str) -> Result<(), PreflightError> {
    if name.starts_with(EPHEMERAL_PREFIX) {
        return Err(PreflightError::ReservedName);
    }
    Ok(())
}

/// The cheap checks of a configuration, made before anything slow (resolving k3s may download
/// it): its settings against the host's memory, and `--krun-kernel`.
pub fn check_config(config: &InstanceConfig) -> Result<(), PreflightError> {
    config.validate(config::host_memory_mib())?;
    check_krun_kernel(config)?;
    // A saved share is checked again: its directory may have gone or changed.
    let host = crate::volume::HostView::current();
    for v in &config.volumes {
        crate::volume::recheck(v, &host)?;
    }
    crate::volume::check_together(&config.volumes)?;
    config.guest_settings().validate().map_err(|e| {
        PreflightError::Volume(crate::volume::VolumeError {
            spec: "(saved settings)".into(),
            why: e.to_string(),
        })
    })?;
    Ok(())
}

/// Fails when `--krun-kernel` (given or saved) is not a file.
pub fn check_krun_kernel(config: &InstanceConfig) -> Result<(), PreflightError> {
    match &config.krun_kernel {
        Some(k) if !k.is_file() => Err(PreflightError::KrunKernel(k.clone())),
        _ => Ok(()),
    }
}

/// Fails naming the first forward whose host port only root can bind (when the caller is not
/// root), then the first whose host port is taken.
pub fn check_ports_free(forwards: &[Forward], caller: Caller) -> Result<(), PreflightError> {
    check_low_ports(
        forwards,
        caller,
        gatevm_net::confine::unprivileged_port_start(),
    )?;
    for f in forwards {
        gatevm_net::forward::check_host_port_free(f).map_err(|source| {
            PreflightError::PortTaken {
                addr: f.host_addr(),
                proto: f.proto,
                source,
            }
        })?;
    }
    Ok(())
}

/// Fails at once, naming the reason and the alternative, when the chosen backend or network helper
/// cannot run here (loading the runtime bundle to know).
pub fn check_backend(config: &InstanceConfig) -> Result<(), PreflightError> {
    let runtime = Runtime::load()?;
    check_backend_with(config, &runtime)
}

/// [`check_backend`] with a loaded runtime bundle.
fn check_backend_with(config: &InstanceConfig, runtime: &Runtime) -> Result<(), PreflightError> {
    check_krun_kernel(config)?;
    if config.net == NetBackend::Passt {
        gatevm_net::passt::check_forwards(&config::all_forwards(config))?;
        let passt = runtime.passt();
        if !passt.is_file() {
            return Err(PreflightError::PasstMissing(passt));
        }
    }
    let chosen = crate::backend::choose(
        config.vmm,
        &gatevm_vmm::probe(),
        &runtime.libkrunfw(),
        config.krun_kernel.as_deref(),
    )
    .map_err(PreflightError::Backend)?;
    if !config.volumes.is_empty()
        && matches!(chosen, crate::backend::VmmBackend::Qemu(_))
        && !runtime.virtiofsd().is_file()
    {
        return Err(PreflightError::VirtiofsdMissing(runtime.virtiofsd()));
    }
    Ok(())
}

/// The checks of a start against the host and the instance's files, after [`check_config`]:
/// the data directory is found, the instance is not running, its forwards' host ports can be
/// bound by the `caller` and are free, its state disk does not shrink and its root budget changes
/// only with `reset` (`root_size_given`: the budget was asked for), and the backend can run. An
/// existing root budget is kept in `config`.
pub fn check_start(
    config: &mut InstanceConfig,
    reset: bool,
    root_size_given: bool,
    caller: Caller,
) -> Result<(), PreflightError> {
    gatevm_runtime::dirs::data_dir().map_err(PreflightError::FindDataDir)?;
    let name = config.name.clone();
    let paths = InstancePaths::new(&name);
    if client::is_running(&paths) {
        return Err(PreflightError::AlreadyRunning(name));
    }
    check_ports_free(&config::all_forwards(config), caller)?;
    if let Ok(meta) = std::fs::metadata(paths.state_disk()) {
        let have = meta.len() >> 30;
        if !reset && u64::from(config.disk_gib) < have {
            return Err(PreflightError::DiskShrink {
                name,
                have,
                want: config.disk_gib,
            });
        }
    }
    if let Ok(meta) = std::fs::metadata(paths.upper_image()) {
        let have = (meta.len() >> 20) as u32;
        if !reset && root_size_given && config.root_mib != have {
            return Err(PreflightError::RootBudget { name, have });
        }
        config.root_mib = have;
    }
    check_backend(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    const USER: Caller = Caller {
        can_guard: false,
        root: false,
    };
    const ROOT: Caller = Caller {
        can_guard: true,
        root: true,
    };

    fn fwd(spec: &str) -> Forward {
        gatevm_net::parse_forwards(&[spec.to_string()])
            .unwrap()
            .remove(0)
    }

    #[test]
    fn an_ordinary_user_is_told_which_forwards_need_root() {
        let low = [fwd("80:80")];
        assert_eq!(
            check_low_ports(&low, USER, 1024).unwrap_err().to_string(),
            "forward 127.0.0.1:80:80/tcp: host port 80 is below net.ipv4.ip_unprivileged_port_start (1024), so only root can bind it: use a host port of 1024 or more, or lower that sysctl (sysctl net.ipv4.ip_unprivileged_port_start=80)"
        );
        // The first low one is named, UDP too; the sysctl's value is the one given.
        let mixed = [fwd("8080:80"), fwd("0.0.0.0:53:53/udp"), fwd("22:22")];
        assert_eq!(
            check_low_ports(&mixed, USER, 600).unwrap_err().to_string(),
            "forward 0.0.0.0:53:53/udp: host port 53 is below net.ipv4.ip_unprivileged_port_start (600), so only root can bind it: use a host port of 600 or more, or lower that sysctl (sysctl net.ipv4.ip_unprivileged_port_start=53)"
        );
        // The boundary: the sysctl's port itself is unprivileged.
        assert!(check_low_ports(&[fwd("1024:80")], USER, 1024).is_ok());
        assert!(check_low_ports(&[fwd("1023:80")], USER, 1024).is_err());
        // A host that lowered the sysctl lets the user bind them.
        assert!(check_low_ports(&mixed, USER, 0).is_ok());
        // Root binds any.
        assert!(check_low_ports(&mixed, ROOT, 1024).is_ok());
        assert!(check_low_ports(&[], USER, 1024).is_ok());
    }

    #[test]
    fn the_network_helper_is_chosen_by_what_the_caller_can_attach() {
        assert_eq!(
            choose_net("a", None, None, false, ROOT).unwrap(),
            NetBackend::Gvproxy
        );
        assert_eq!(
            choose_net("a", None, None, false, USER).unwrap(),
            NetBackend::Passt
        );
        let err = choose_net("a", Some(NetBackend::Gvproxy), None, false, USER).unwrap_err();
        assert!(
            matches!(
                err,
                PreflightError::Net(crate::backend::NetChoiceError::GvproxyUnguarded)
            ),
            "{err:?}"
        );
        // The preflight error is the choice's own line, nothing added.
        assert!(
            err.to_string().starts_with("--net gvproxy cannot keep"),
            "{err}"
        );
    }

    #[test]
    fn the_probe_matches_who_runs_the_tests() {
        let me = Caller::probe();
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        assert_eq!(me.root, root);
        if !root {
            // An ordinary user cannot attach cgroup BPF.
            assert!(!me.can_guard, "{me:?}");
        }
    }
}
