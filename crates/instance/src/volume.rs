//! Shared host directories (`start -v HOST_DIR:GUEST_DIR[:ro]`): the spec, the checks made before
//! anything starts, and whom the file server runs as.
//!
//! The guest is hostile, so a share is held to what the user named:
//! - the host directory must exist, be a directory, be given as an absolute path, and is shared
//!   by its resolved path (a symlink is followed once, here, never by the file server);
//! - never `/`, and never a directory that is, holds or lies inside gatevm's own directories
//!   (instances' keys, the runtime's binaries, the run directory's sockets): a writable share of
//!   the runtime would let a guest replace a binary the host runs;
//! - read-only is enforced by the host's file server (virtiofsd `--readonly`, libkrun's
//!   read-only virtio-fs), not trusted to the guest's mount;
//! - the file server runs as the directory's owner when gatevm runs as root, so files the guest
//!   creates belong to that owner; a writable share of a root-owned directory is refused as root
//!   (the guest would create root-owned, possibly set-user-ID, files on the host).

use gatevm_abi::settings::{check_guest_dir, related, MAX_VOLUMES};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// One shared directory as the instance keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// The host directory, resolved.
    pub host: PathBuf,
    /// Where the guest mounts it (normalized).
    pub guest: String,
    /// Shared read-only.
    #[serde(default)]
    pub read_only: bool,
}

impl Volume {
    /// `HOST:GUEST[:ro]` as the user writes it.
    pub fn spec(&self) -> String {
        format!(
            "{}:{}{}",
            self.host.display(),
            self.guest,
            if self.read_only { ":ro" } else { "" }
        )
    }
}

/// Why a share was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("-v {spec}: {why}")]
pub struct VolumeError {
    pub spec: String,
    pub why: String,
}

/// What the checks of a host directory need to know about this host.
#[derive(Debug, Clone)]
pub struct HostView {
    /// The effective uid of gatevm.
    pub euid: u32,
    /// gatevm's own directories (data, runtime, cache, run directory).
    pub protected: Vec<PathBuf>,
}

impl HostView {
    /// This process's view.
    pub fn current() -> HostView {
        let mut protected = vec![crate::paths::run_base()];
        use gatevm_runtime::dirs;
        for d in [dirs::data_dir(), dirs::runtime_dir(), dirs::cache_dir()]
            .into_iter()
            .flatten()
        {
            protected.push(d);
        }
        if let Ok(s) = dirs::system_dir() {
            protected.push(s.path);
        }
        protected.push(crate::paths::instances_dir());
        HostView {
            // SAFETY: geteuid has no preconditions.
            euid: unsafe { libc::geteuid() },
            protected,
        }
    }
}

/// Parses `HOST_DIR:GUEST_DIR[:ro|:rw]` and checks both sides.
pub fn parse(spec: &str, host: &HostView) -> Result<Volume, VolumeError> {
    let err = |why: String| VolumeError {
        spec: spec.to_string(),
        why,
    };
    let (h, g, ro) = gatevm_abi::settings::split_mount_spec(spec)
        .map_err(|e| err(format!("{e} (HOST_DIR:GUEST_DIR[:ro])")))?;
    let guest = check_guest_dir(g).map_err(err)?;
    let host_dir = check_host_dir(h, ro, host).map_err(err)?;
    Ok(Volume {
        host: host_dir,
        guest,
        read_only: ro,
    })
}

/// Parses every `-v` and checks them together: at most [`MAX_VOLUMES`], no guest directory
/// twice or inside another.
pub fn parse_all(specs: &[String], host: &HostView) -> Result<Vec<Volume>, VolumeError> {
    let vols = specs
        .iter()
        .map(|s| parse(s, host))
        .collect::<Result<Vec<_>, _>>()?;
    check_together(&vols)?;
    Ok(vols)
}

/// The checks across shares.
pub fn check_together(vols: &[Volume]) -> Result<(), VolumeError> {
    if vols.len() > MAX_VOLUMES {
        return Err(VolumeError {
            spec: vols[MAX_VOLUMES].spec(),
            why: format!("at most {MAX_VOLUMES} shared directories"),
        });
    }
    for (i, v) in vols.iter().enumerate() {
        if let Some(o) = vols[..i].iter().find(|o| related(&o.guest, &v.guest)) {
            return Err(VolumeError {
                spec: v.spec(),
                why: format!(
                    "its guest directory overlaps {}'s: give each share its own place",
                    o.spec()
                ),
            });
        }
    }
    Ok(())
}

/// Checks a saved share again before a start: the directory may have gone or changed.
pub fn recheck(v: &Volume, host: &HostView) -> Result<(), VolumeError> {
    let spec = v.spec();
    let resolved = check_host_dir(&v.host.to_string_lossy(), v.read_only, host).map_err(|why| {
        VolumeError {
            spec: spec.clone(),
            why,
        }
    })?;
    if resolved != v.host {
        return Err(VolumeError {
            spec,
            why: format!(
                "{} now resolves to {}: give -v again to share it",
                v.host.display(),
                resolved.display()
            ),
        });
    }
    Ok(())
}

/// Checks a host directory and returns it resolved.
fn check_host_dir(given: &str, read_only: bool, host: &HostView) -> Result<PathBuf, String> {
    if given.is_empty() {
        return Err("the host directory is empty".into());
    }
    if given.chars().any(char::is_control) {
        return Err("the host directory contains control characters".into());
    }
    if !given.starts_with('/') {
        return Err(format!(
            "host directory {given:?} is a relative path: give an absolute one"
        ));
    }
    let resolved = std::fs::canonicalize(given).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("host directory {given} does not exist"),
        _ => format!("cannot resolve host directory {given}: {e}"),
    })?;
    let meta = std::fs::metadata(&resolved)
        .map_err(|e| format!("cannot read host directory {}: {e}", resolved.display()))?;
    if !meta.is_dir() {
        return Err(format!(
            "{} is not a directory (a share is a directory)",
            resolved.display()
        ));
    }
    if resolved == Path::new("/") {
        return Err("sharing / would give the guest the whole host".into());
    }
    let r = resolved.to_string_lossy().into_owned();
    for p in &host.protected {
        let p = std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
        let ps = p.to_string_lossy();
        if ps == "/" || !related(&r, &ps) {
            continue;
        }
        let how = if r.len() > ps.len() || r == ps {
            "is inside"
        } else {
            "holds"
        };
        return Err(format!(
            "{} {how} gatevm's own directory {ps}: share a directory of your data instead",
            resolved.display()
        ));
    }
    if host.euid == 0 && !read_only && meta.uid() == 0 {
        return Err(format!(
            "{} belongs to root: a writable share would let the guest create root-owned (even set-user-ID) files on this host; share a directory owned by an ordinary user (the file server runs as that user), or add :ro",
            resolved.display()
        ));
    }
    Ok(resolved)
}

/// Whom the file server of a share runs as: the directory's owner when gatevm runs as root (None:
/// as gatevm itself).
pub fn server_identity(v: &Volume, euid: u32) -> std::io::Result<Option<(u32, u32)>> {
    if euid != 0 {
        return Ok(None);
    }
    let m = std::fs::metadata(&v.host)?;
    if m.uid() == 0 {
        // Only read-only shares of root's directories pass the checks.
        return Ok(None);
    }
    Ok(Some((m.uid(), m.gid())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(protected: Vec<PathBuf>, euid: u32) -> HostView {
        HostView { euid, protected }
    }

    #[test]
    fn specs_parse_and_bad_ones_are_named() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let real = std::fs::canonicalize(&data).unwrap();
        let v = view(vec![], 1000);
        let spec = format!("{}:/data", data.display());
        let vol = parse(&spec, &v).unwrap();
        assert_eq!(vol.host, real);
        assert_eq!(vol.guest, "/data");
        assert!(!vol.read_only);
        let ro = parse(&format!("{}:/mnt/x/:ro", data.display()), &v).unwrap();
        assert!(ro.read_only);
        assert_eq!(ro.guest, "/mnt/x");
        assert_eq!(ro.spec(), format!("{}:/mnt/x:ro", real.display()));

        std::fs::write(d.path().join("file"), b"x").unwrap();
        std::os::unix::fs::symlink(&data, d.path().join("link")).unwrap();
        let linked = parse(&format!("{}/link:/l", d.path().display()), &v).unwrap();
        assert_eq!(linked.host, real, "a symlink is resolved once, here");
        let e = |s: String| parse(&s, &v).unwrap_err().to_string();
        let p = d.path().display();
        for (spec, why) in [
            (format!("{p}/missing:/data"), "does not exist"),
            (format!("{p}/file:/data"), "is not a directory"),
            ("data:/data".to_string(), "relative path"),
            ("/:/host".to_string(), "whole host"),
            (format!("{p}/data:data"), "not an absolute path"),
            (format!("{p}/data:/etc"), "/etc"),
            (format!("{p}/data:/"), "whole system"),
            (format!("{p}/data:/mnt/../etc"), "\"..\""),
            (format!("{p}/data:/data:rx"), "unknown mode"),
            (format!("{p}/data"), "expected SOURCE:TARGET"),
            (format!("{p}/data:/a:ro:x"), "expected SOURCE:TARGET"),
            (":/data".to_string(), "empty"),
        ] {
            let msg = e(spec.clone());
            assert!(msg.contains(why), "{spec}: {msg}");
            assert!(msg.starts_with(&format!("-v {spec}: ")), "{msg}");
            assert!(!msg.contains('\n'), "{msg}");
        }
    }

    #[test]
    fn gatevms_own_directories_are_never_shared() {
        let d = tempfile::tempdir().unwrap();
        let own = d.path().join("home/.local/share/gatevm");
        std::fs::create_dir_all(own.join("instances/a")).unwrap();
        let v = view(vec![own.clone()], 1000);
        for (dir, how) in [
            (own.join("instances/a"), "is inside"),
            (own.clone(), "is inside"),
            (d.path().join("home"), "holds"),
        ] {
            let msg = parse(&format!("{}:/data", dir.display()), &v)
                .unwrap_err()
                .to_string();
            assert!(msg.contains(how) && msg.contains("gatevm's own"), "{msg}");
        }
        // A sibling is fine.
        std::fs::create_dir_all(d.path().join("home/src")).unwrap();
        parse(&format!("{}/home/src:/src", d.path().display()), &v).unwrap();
    }

    #[test]
    fn as_root_a_writable_share_of_roots_directory_is_refused() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let owner = std::fs::metadata(d.path()).unwrap().uid();
        let spec = format!("{}:/data", d.path().display());
        let root = view(vec![], 0);
        if owner == 0 {
            let msg = parse(&spec, &root).unwrap_err().to_string();
            assert!(
                msg.contains("belongs to root") && msg.contains(":ro"),
                "{msg}"
            );
            parse(&format!("{spec}:ro"), &root).unwrap();
        } else {
            println!("not root: the directory belongs to uid {owner}; checking the owner rule");
            let vol = parse(&spec, &root).unwrap();
            assert_eq!(
                server_identity(&vol, 0).unwrap().map(|(u, _)| u),
                Some(owner)
            );
        }
        // Not root: never refused for the owner, and the server runs as gatevm itself.
        let vol = parse(&spec, &view(vec![], 1000)).unwrap();
        assert_eq!(server_identity(&vol, 1000).unwrap(), None);
    }

    #[test]
    fn guest_directories_may_not_overlap_and_are_bounded() {
        let d = tempfile::tempdir().unwrap();
        let v = view(vec![], 1000);
        let p = d.path().display();
        let specs = vec![format!("{p}:/data"), format!("{p}:/data/sub:ro")];
        let msg = parse_all(&specs, &v).unwrap_err().to_string();
        assert!(msg.contains("overlaps"), "{msg}");
        let many: Vec<String> = (0..17).map(|i| format!("{p}:/m{i}")).collect();
        let msg = parse_all(&many, &v).unwrap_err().to_string();
        assert!(msg.contains("at most 16"), "{msg}");
        assert_eq!(parse_all(&many[..16], &v).unwrap().len(), 16);
    }

    #[test]
    fn a_saved_share_is_checked_again() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let v = view(vec![], 1000);
        let vol = parse(&format!("{}:/data", data.display()), &v).unwrap();
        recheck(&vol, &v).unwrap();
        std::fs::remove_dir(&data).unwrap();
        let msg = recheck(&vol, &v).unwrap_err().to_string();
        assert!(msg.contains("does not exist"), "{msg}");
        std::fs::create_dir(d.path().join("other")).unwrap();
        std::os::unix::fs::symlink(d.path().join("other"), &data).unwrap();
        let msg = recheck(&vol, &v).unwrap_err().to_string();
        assert!(msg.contains("now resolves to"), "{msg}");
    }
}
