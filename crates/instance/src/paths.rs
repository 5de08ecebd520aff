//! Where an instance keeps its files.
//!
//! Persistent files live under `<data dir>/instances/<name>/` (config, state, logs, the state disk,
//! the writable rootfs layer); sockets live under a runtime directory (`$GATEVM_RUN_DIR`, else
//! `$XDG_RUNTIME_DIR/gatevm`, else `/run/gatevm` for root, else `/tmp/gatevm-<uid>`), because unix
//! socket paths are limited to 107 bytes and because they must not outlive a host reboot.

use std::io;
use std::path::{Path, PathBuf};

/// Longest unix socket path the kernel accepts (sun_path minus the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// All paths of one instance.
#[derive(Debug, Clone)]
pub struct InstancePaths {
    pub name: String,
    /// Persistent directory.
    pub dir: PathBuf,
    /// Runtime directory for sockets.
    pub run: PathBuf,
}

/// The directory holding all instances. Without any of `$GATEVM_DATA_DIR`, `$XDG_DATA_HOME` and
/// `$HOME` (which the CLI refuses up front) it falls back to `/var/lib/gatevm/instances`.
pub fn instances_dir() -> PathBuf {
    gatevm_runtime::dirs::data_dir()
        .unwrap_or_else(|_| PathBuf::from("/var/lib/gatevm"))
        .join("instances")
}

/// An absolute path from a variable, used only when it belongs to the calling user
/// ([`gatevm_runtime::dirs::env_dir`]); empty and relative values count as unset (as for the data
/// directory: a relative one would depend on the working directory). A `GATEVM_RUN_DIR` of
/// another user's is refused by the CLI before any command runs; here it is skipped.
fn abs_var(var: &'static str) -> Option<PathBuf> {
    match gatevm_runtime::dirs::env_dir(var) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("ignoring {var}: {}", gatevm_abi::error_chain(&e));
            None
        }
    }
}

/// The base runtime directory.
pub fn run_base() -> PathBuf {
    if let Some(d) = abs_var("GATEVM_RUN_DIR") {
        return d;
    }
    if let Some(d) = abs_var("XDG_RUNTIME_DIR") {
        return d.join("gatevm");
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        PathBuf::from("/run/gatevm")
    } else {
        PathBuf::from(format!("/tmp/gatevm-{uid}"))
    }
}

impl InstancePaths {
    /// Paths for a (validated) instance name.
    pub fn new(name: &str) -> InstancePaths {
        InstancePaths {
            name: name.to_string(),
            dir: instances_dir().join(name),
            run: run_base().join(name),
        }
    }

    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    pub fn lock(&self) -> PathBuf {
        self.dir.join("lock")
    }
    pub fn logs(&self) -> PathBuf {
        self.dir.join("logs")
    }
    pub fn log(&self, which: &str) -> PathBuf {
        self.logs().join(format!("{which}.log"))
    }
    pub fn state_disk(&self) -> PathBuf {
        self.dir.join("state.img")
    }
    /// The writable layer of an instance created before root budgets: a plain directory, used
    /// as it is (no budget) while it exists.
    pub fn legacy_upper(&self) -> PathBuf {
        self.dir.join("rootfs-upper")
    }
    /// The image holding the root's writable layer (sparse ext4 of the root budget's size), the
    /// guest's disk [`gatevm_abi::paths::disk::UPPER`].
    pub fn upper_image(&self) -> PathBuf {
        self.dir.join("rootfs-rw.img")
    }
    /// Where an earlier gatevm mounted [`Self::upper_image`] on the host (cleaned up only).
    pub fn upper_mount(&self) -> PathBuf {
        self.dir.join("rootfs-rw")
    }
    /// Whether the instance keeps its writable layer in the old unbudgeted directory.
    pub fn is_legacy_upper(&self) -> bool {
        !self.upper_image().exists() && self.legacy_upper().is_dir()
    }
    /// Where an earlier gatevm mounted the merged root on the host (cleaned up only).
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }
    /// A throwaway VM's own root (`vm-run --rootfs` or an unpacked image) as a read-only image.
    pub fn root_image(&self) -> PathBuf {
        self.dir.join("root.erofs")
    }
    /// The k3s profile's staging directory, made into [`Self::stage_image`] at every start.
    pub fn stage_dir(&self) -> PathBuf {
        self.dir.join("k3s-stage")
    }
    /// The k3s profile's staging image, the guest's read-only disk
    /// [`gatevm_abi::paths::disk::STAGE`].
    pub fn stage_image(&self) -> PathBuf {
        self.dir.join("k3s-stage.erofs")
    }
    /// The host's settings for the guest (shares, registries, proxies), the guest's read-only
    /// disk [`gatevm_abi::paths::disk::SETTINGS`].
    pub fn settings_image(&self) -> PathBuf {
        self.dir.join("settings.img")
    }
    /// The shares' file server sockets (virtiofsd, one per share).
    pub fn fs_dir(&self) -> PathBuf {
        self.run.join("fs")
    }
    /// The socket of the `index`-th share's file server.
    pub fn fs_socket(&self, index: usize) -> PathBuf {
        self.fs_dir().join(format!("vol{index}.sock"))
    }
    /// libkrun's boot directory: only the guest agent, which builds the root from the disks.
    pub fn boot_dir(&self) -> PathBuf {
        self.dir.join("boot")
    }
    pub fn control_socket(&self) -> PathBuf {
        self.run.join("ctl.sock")
    }
    pub fn agent_socket(&self) -> PathBuf {
        self.run.join("agent.sock")
    }
    /// containerd's API on the host, relayed to the guest's over the agent channel.
    pub fn containerd_socket(&self) -> PathBuf {
        self.run.join("containerd.sock")
    }
    /// The network helper's own directory: the only place a confined gvproxy may create or
    /// remove files (owned by the helper's uid when gatevm runs as root).
    pub fn net_dir(&self) -> PathBuf {
        self.run.join("net")
    }
    pub fn net_socket(&self) -> PathBuf {
        self.net_dir().join("net.sock")
    }
    pub fn net_api_socket(&self) -> PathBuf {
        self.net_dir().join("netapi.sock")
    }
    /// A k3s cluster server's switch: agents' supervisors connect here to put their VMs on the
    /// cluster network (owner only).
    pub fn cluster_socket(&self) -> PathBuf {
        self.run.join("cluster.sock")
    }
    /// The cluster token of a k3s server's cluster (0600), which its agents join with.
    pub fn cluster_token(&self) -> PathBuf {
        self.dir.join("cluster-token")
    }
    /// The FIFO the VMM writes the guest console into (the supervisor drains it into the
    /// capped `console.log`).
    pub fn console_fifo(&self) -> PathBuf {
        self.run.join("console.fifo")
    }

    /// Every socket path, for cleanup.
    pub fn sockets(&self) -> Vec<PathBuf> {
        vec![
            self.control_socket(),
            self.agent_socket(),
            self.containerd_socket(),
            self.cluster_socket(),
            self.net_socket(),
            self.net_api_socket(),
            self.console_fifo(),
        ]
    }

    /// Whether the instance exists on disk.
    pub fn exists(&self) -> bool {
        self.config().exists()
    }

    /// Creates the directories (0700) and checks the socket paths fit.
    pub fn create_dirs(&self) -> io::Result<()> {
        for d in [&self.dir, &self.logs(), &self.run] {
            mkdir_private(d)
                .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", d.display())))?;
        }
        for s in self.sockets() {
            if s.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "socket path {} is longer than {MAX_SOCKET_PATH} bytes: set GATEVM_RUN_DIR to a shorter directory",
                        s.display()
                    ),
                ));
            }
        }
        Ok(())
    }
}

pub use gatevm_fsutil::mkdir_private;

/// Writes a file atomically and durably with mode 0600 ([`gatevm_fsutil::write_atomic`]); the
/// error names the file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    gatevm_fsutil::write_atomic(path, bytes, 0o600)
        .map_err(|e| io::Error::new(e.kind(), format!("replacing {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn write_atomic_replaces_files_and_empty_directories() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("state.json");
        write_atomic(&f, b"one").unwrap();
        write_atomic(&f, b"two").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"two");
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let empty = d.path().join("config.json");
        std::fs::create_dir(&empty).unwrap();
        write_atomic(&empty, b"{}").unwrap();
        assert_eq!(std::fs::read(&empty).unwrap(), b"{}");

        let full = d.path().join("lock");
        std::fs::create_dir(&full).unwrap();
        std::fs::write(full.join("x"), b"").unwrap();
        let e = write_atomic(&full, b"{}").unwrap_err();
        assert!(e.to_string().contains("lock"), "{e}");
        assert!(full.join("x").exists());
        // No temporary file stays behind.
        let left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left.len(), 3, "{left:?}");
    }
}
