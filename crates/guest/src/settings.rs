//! The host's settings for this boot ([`gatevm_abi::settings`]): read from the settings disk
//! when the command line says one is attached, then applied: shared directories mounted,
//! containerd's registry host files written, proxy variables kept for the payloads and pulls.

use gatevm_abi::paths::disk;
use gatevm_abi::settings::{GuestSettings, RegistryHost, CERTS_DIR, SETTINGS_MAX};
use std::io::Read;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

static SETTINGS: OnceLock<GuestSettings> = OnceLock::new();

/// Where PID 1 leaves the settings for the commands the host runs later (`container pull` needs
/// the proxy variables): root's only, on the guest's tmpfs.
pub(crate) const SETTINGS_COPY: &str = "/run/gatevm/settings.json";

/// The settings of this boot: PID 1's from [`load`]; in any other process of the guest the copy
/// PID 1 left (none without a settings disk).
pub(crate) fn get() -> &'static GuestSettings {
    SETTINGS.get_or_init(|| {
        std::fs::read(SETTINGS_COPY)
            .ok()
            .and_then(|b| GuestSettings::from_image(&b).ok())
            .unwrap_or_default()
    })
}

/// Reads the settings disk (waiting up to 10 s for it when `attached`). An unreadable or invalid
/// disk is an error: booting without the shares or registries the user asked for would put data
/// in the wrong place.
pub(crate) fn load(attached: bool) -> Result<(), String> {
    if !attached {
        let _ = SETTINGS.set(GuestSettings::default());
        return Ok(());
    }
    let dev = crate::blockdev::wait_for(disk::SETTINGS, Duration::from_secs(10))?;
    let mut buf = Vec::with_capacity(SETTINGS_MAX + 1);
    std::fs::File::open(&dev)
        .and_then(|f| f.take(SETTINGS_MAX as u64 + 1).read_to_end(&mut buf))
        .map_err(|e| format!("reading the settings disk {}: {e}", dev.display()))?;
    let s = GuestSettings::from_image(&buf)
        .map_err(|e| format!("the settings disk {}: {e}", dev.display()))?;
    crate::glog!(
        "settings: {} share(s), {} registry host(s), {} proxy variable(s)",
        s.volumes.len(),
        s.registries.len(),
        s.proxy.len()
    );
    let text = serde_json::to_vec(&s).map_err(|e| format!("the settings: {e}"))?;
    write_private(Path::new(SETTINGS_COPY), &text)
        .map_err(|e| format!("writing {SETTINGS_COPY}: {e}"))?;
    let _ = SETTINGS.set(s);
    Ok(())
}

/// Writes a file only root can read (it may hold a proxy password).
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// Mounts the shares (virtio-fs, `nosuid,nodev`, read-only where asked) at their guest
/// directories, created as needed. The first failure is returned.
pub(crate) fn mount_volumes(s: &GuestSettings) -> Result<(), String> {
    use nix::mount::{mount, MsFlags};
    for v in &s.volumes {
        std::fs::create_dir_all(&v.guest_dir)
            .map_err(|e| format!("share {}: creating {}: {e}", v.tag, v.guest_dir))?;
        let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        if v.read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        mount(
            Some(v.tag.as_str()),
            v.guest_dir.as_str(),
            Some("virtiofs"),
            flags,
            None::<&str>,
        )
        .map_err(|e| format!("share {}: mounting it at {}: {e}", v.tag, v.guest_dir))?;
        crate::glog!(
            "share {} mounted at {}{}",
            v.tag,
            v.guest_dir,
            if v.read_only { " (read-only)" } else { "" }
        );
    }
    Ok(())
}

/// Writes `dir/<host>/hosts.toml` for each registry host (containerd's `config_path` layout).
pub(crate) fn write_registry_hosts(s: &GuestSettings, dir: &Path) -> Result<(), String> {
    let insecure = s.insecure_hosts();
    for r in &s.registries {
        write_one(r, &insecure, dir)?;
    }
    Ok(())
}

fn write_one(r: &RegistryHost, insecure: &[&str], dir: &Path) -> Result<(), String> {
    // The host name was checked (no '/', no ".."): it is one directory name.
    let d = dir.join(&r.host);
    std::fs::create_dir_all(&d).map_err(|e| format!("creating {}: {e}", d.display()))?;
    crate::fsutil::write_config(&d.join("hosts.toml"), &r.hosts_toml(insecure))
        .map_err(|e| format!("writing {}/hosts.toml: {e}", d.display()))
}

/// k3s's registries file (see [`GuestSettings::registries_yaml`]).
pub(crate) const K3S_REGISTRIES: &str = "/etc/rancher/k3s/registries.yaml";

/// Applies what needs no payload: registry host files into [`CERTS_DIR`] (and, for k3s,
/// [`K3S_REGISTRIES`]), then the shares.
pub(crate) fn apply(k3s: bool) -> Result<(), String> {
    let s = get();
    write_registry_hosts(s, Path::new(CERTS_DIR))?;
    if k3s && !s.registries.is_empty() {
        crate::fsutil::write_config(Path::new(K3S_REGISTRIES), &s.registries_yaml())
            .map_err(|e| format!("writing {K3S_REGISTRIES}: {e}"))?;
    }
    mount_volumes(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_host_files_land_one_per_host() {
        let d = tempfile::tempdir().unwrap();
        let s = GuestSettings {
            registries: vec![
                RegistryHost {
                    host: "192.168.127.254:5000".into(),
                    mirrors: vec![],
                    insecure: true,
                },
                RegistryHost {
                    host: "localhost:1".into(),
                    mirrors: vec!["http://192.168.127.254:5000".into()],
                    insecure: false,
                },
            ],
            ..Default::default()
        };
        write_registry_hosts(&s, d.path()).unwrap();
        let a = std::fs::read_to_string(d.path().join("192.168.127.254:5000/hosts.toml")).unwrap();
        assert!(
            a.contains("server = \"http://192.168.127.254:5000\""),
            "{a}"
        );
        let b = std::fs::read_to_string(d.path().join("localhost:1/hosts.toml")).unwrap();
        assert!(b.contains("[host.\"http://192.168.127.254:5000\"]"), "{b}");
        // The mirror is on an insecure host: its entry skips verification too.
        assert!(b.contains("skip_verify = true"), "{b}");
        // Written again at the next boot: replaced, not appended.
        write_registry_hosts(&s, d.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(d.path().join("localhost:1/hosts.toml")).unwrap(),
            b
        );
    }

    #[test]
    fn without_a_disk_there_are_no_settings() {
        assert!(load(false).is_ok());
        assert!(get().is_empty());
    }
}
