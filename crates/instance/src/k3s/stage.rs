//! The k3s profile, prepared on the host before boot: the k3s binary in the instance root, the
//! server plan (flags and CNI configuration chosen from the guest kernel's features), the user's
//! manifests and airgap images, and the gateway's TLS Secret, staged under `/etc/gatevm/k3s` of
//! the root, where gatevm-guest picks them up (`gatevm.payload=k3s`).
//!
//! The root is not trusted (the guest writes its upper layer), so every path into it is walked
//! without following symlinks, and the staging directory is rebuilt from scratch at every start.

use crate::config::K3sSettings;
use crate::paths::InstancePaths;
use crate::rootdir::RootDirError;
pub use crate::rootdir::{dir_in_root, write_new};
use gatevm_abi::paths::{self, rel};
use gatevm_abi::plan::{CniConflist, PlanFile};
use gatevm_k3s::flags::{self, K3sOptions};
use gatevm_k3s::pki::{self, PkiOptions};
use gatevm_kernel::kconfig::Capability;
use std::path::{Path, PathBuf};

/// Where the guest finds the k3s binary, relative to the root.
pub const K3S_GUEST_PATH: &str = rel(paths::K3S_BIN);
/// The staging directory in the root.
pub const STAGE_DIR: &str = rel(paths::K3S_STAGE_DIR);
/// k3s's state directory in the guest, on the state disk.
pub const DATA_DIR: &str = paths::K3S_DATA_DIR;

/// Why the k3s profile could not be staged in the instance root.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// A path in the root could not be made or written.
    #[error(transparent)]
    RootDir(#[from] RootDirError),
    /// A `--manifest` path could not be read.
    #[error("--manifest {}", path.display())]
    Manifest {
        /// The path given.
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file system operation failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done ("reading", "clearing").
        op: &'static str,
        /// On what.
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The server plan does not encode.
    #[error("encoding the k3s plan")]
    Plan(#[source] serde_json::Error),
    /// A manifest named like the ones gatevm writes itself.
    #[error("manifest {}: names starting with gatevm- are reserved", .0.display())]
    Reserved(PathBuf),
    /// The gateway's certificates could not be made.
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
}

/// Copies a host file into the root (no-follow on the root side).
fn copy_in(src: &Path, dest: &Path, mode: u32) -> Result<(), StageError> {
    let bytes = std::fs::read(src).map_err(|source| StageError::Io {
        op: "reading",
        path: src.to_path_buf(),
        source,
    })?;
    Ok(write_new(dest, &bytes, mode)?)
}

/// The manifest files a `--manifest` names: the file itself, or a directory's `*.yaml`, `*.yml`
/// and `*.json` files (not recursive), sorted.
pub fn manifest_files(p: &Path) -> Result<Vec<PathBuf>, StageError> {
    let bad = |source| StageError::Manifest {
        path: p.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(p).map_err(bad)?;
    if meta.is_file() {
        return Ok(vec![p.to_path_buf()]);
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(p)
        .map_err(bad)?
        .flatten()
        .map(|e| e.path())
        .filter(|f| {
            f.is_file()
                && f.extension()
                    .is_some_and(|x| x == "yaml" || x == "yml" || x == "json")
        })
        .collect();
    v.sort();
    Ok(v)
}

/// The server options for an instance.
pub fn options(name: &str, s: &K3sSettings) -> K3sOptions {
    K3sOptions {
        node_name: name.to_string(),
        data_dir: DATA_DIR.into(),
        enable_traefik: s.enable.iter().any(|e| e == "traefik"),
        enable_servicelb: s.enable.iter().any(|e| e == "servicelb"),
        enable_metrics_server: s.enable.iter().any(|e| e == "metrics-server"),
        ..K3sOptions::default()
    }
}

/// The gateway PKI's options for an instance: its service names and extra SANs.
pub fn pki_options(name: &str, s: &K3sSettings) -> PkiOptions {
    PkiOptions {
        service_names: s.service_dns_names(),
        extra_sans: s.tls_sans.clone(),
        ..PkiOptions::new(name)
    }
}

/// Prepares the k3s profile in the mounted instance root. `caps` are the guest kernel's features
/// (empty when unknown: every feature then counts as missing and the plan is the conservative
/// one).
pub fn stage(
    paths: &InstancePaths,
    s: &K3sSettings,
    caps: &[Capability],
) -> Result<(), StageError> {
    let root = paths.rootfs();
    // The binary, checked against what `start` saw.
    let (bin_dir, bin_name) = K3S_GUEST_PATH
        .rsplit_once('/')
        .unwrap_or(("", K3S_GUEST_PATH));
    let dir = dir_in_root(&root, bin_dir)?;
    crate::rootdir::install(&s.binary, &dir.join(bin_name), 0o755)?;

    // A fresh staging directory.
    let stage_parent = dir_in_root(&root, "etc/gatevm")?;
    let stage = stage_parent.join("k3s");
    if std::fs::symlink_metadata(&stage).is_ok() {
        if std::fs::symlink_metadata(&stage).is_ok_and(|m| m.is_dir()) {
            std::fs::remove_dir_all(&stage)
        } else {
            std::fs::remove_file(&stage)
        }
        .map_err(|source| StageError::Io {
            op: "clearing",
            path: stage.clone(),
            source,
        })?;
    }
    let stage = dir_in_root(&root, STAGE_DIR)?;
    let manifests = dir_in_root(&root, rel(paths::K3S_STAGED_MANIFESTS))?;
    let images = dir_in_root(&root, rel(paths::K3S_STAGED_IMAGES))?;

    let plan = flags::plan(caps, &options(&paths.name, s));
    let staged = PlanFile {
        args: plan.args,
        data_dir: DATA_DIR.into(),
        cni: plan
            .cni_conflist
            .map(|(file, json)| CniConflist { file, json }),
        notes: plan.notes,
    };
    let json = staged.to_json().map_err(StageError::Plan)?;
    write_new(&stage.join("plan.json"), &json, 0o644)?;

    for m in &s.manifests {
        for f in manifest_files(m)? {
            let name = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.starts_with("gatevm-") {
                return Err(StageError::Reserved(f));
            }
            copy_in(&f, &manifests.join(&name), 0o644)?;
        }
    }
    for (i, img) in s.images.iter().enumerate() {
        let base = img
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("images-{i}.tar"));
        copy_in(img, &images.join(format!("{i:02}-{base}")), 0o644)?;
    }

    // The gateway's certificates: made on the host, so they exist before the guest boots.
    let pki_dir = paths.dir.join("pki");
    let pki = pki::load_or_create(&pki_dir, &pki_options(&paths.name, s))?;
    let secret = pki::tls_secret_manifest(&s.secret_namespace, &s.secret_name, &pki)?;
    write_new(
        &manifests.join("gatevm-gateway-tls.yaml"),
        secret.as_bytes(),
        0o600,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(bin: &Path) -> K3sSettings {
        K3sSettings {
            binary: bin.to_path_buf(),
            version: "v1.31.4+k3s1".into(),
            sha256: String::new(),
            api_port: 16443,
            manifests: vec![],
            images: vec![],
            enable: vec!["traefik".into()],
            merge_kubeconfig: true,
            secret_namespace: "gatevm".into(),
            secret_name: "gateway-tls".into(),
            services: vec![],
            tls_sans: vec![],
            gateway: None,
        }
    }

    #[test]
    fn stages_binary_plan_manifests_images_and_secret() {
        let d = tempfile::tempdir().unwrap();
        let paths = InstancePaths {
            name: "k3stest".into(),
            dir: d.path().join("data/instances/k3stest"),
            run: d.path().join("run/k3stest"),
        };
        std::fs::create_dir_all(paths.rootfs()).unwrap();
        let bin = d.path().join("k3s");
        std::fs::write(&bin, b"\x7fELF fake").unwrap();
        let mdir = d.path().join("m");
        std::fs::create_dir(&mdir).unwrap();
        std::fs::write(mdir.join("a.yaml"), "kind: ConfigMap\n").unwrap();
        std::fs::write(mdir.join("notes.txt"), "ignored").unwrap();
        let img = d.path().join("airgap.tar");
        std::fs::write(&img, b"tar").unwrap();
        let mut s = settings(&bin);
        s.manifests = vec![mdir.clone()];
        s.images = vec![img];
        // An old staging file and a guest-planted symlink are replaced, not followed.
        let outside = d.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::create_dir_all(paths.rootfs().join("etc/gatevm/k3s/manifests")).unwrap();
        std::fs::write(
            paths.rootfs().join("etc/gatevm/k3s/manifests/old.yaml"),
            "x",
        )
        .unwrap();
        std::os::unix::fs::symlink(&outside, paths.rootfs().join("etc/gatevm/k3s/images")).unwrap();

        stage(&paths, &s, &[]).unwrap();
        let r = paths.rootfs();
        assert_eq!(
            std::fs::read(r.join(K3S_GUEST_PATH)).unwrap(),
            b"\x7fELF fake"
        );
        let plan: serde_json::Value =
            serde_json::from_slice(&std::fs::read(r.join("etc/gatevm/k3s/plan.json")).unwrap())
                .unwrap();
        assert_eq!(plan["data_dir"], DATA_DIR);
        // Where and what the guest reads: its parser takes the staged plan as it is.
        let text = std::fs::read_to_string(r.join(rel(paths::K3S_PLAN))).unwrap();
        let parsed = gatevm_abi::plan::parse(&text).unwrap();
        assert_eq!(parsed.data_dir, Path::new(DATA_DIR));
        let args: Vec<&str> = plan["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert!(
            args.iter()
                .any(|a| a.starts_with("--node-name=k3stest") || *a == "k3stest"),
            "{args:?}"
        );
        // No kernel features known: the conservative plan brings its own bridge CNI.
        assert!(plan["cni"]["file"].is_string(), "{plan}");
        let m = r.join("etc/gatevm/k3s/manifests");
        assert!(m.join("a.yaml").is_file());
        assert!(!m.join("notes.txt").exists());
        assert!(!m.join("old.yaml").exists());
        assert!(std::fs::read_to_string(m.join("gatevm-gateway-tls.yaml"))
            .unwrap()
            .contains("kubernetes.io/tls"));
        assert!(r.join("etc/gatevm/k3s/images/00-airgap.tar").is_file());
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "wrote through a symlink"
        );
        assert!(paths.dir.join("pki/ca.crt").is_file());

        // A symlinked directory on the way to the binary is refused.
        std::fs::remove_dir_all(r.join("usr")).unwrap();
        std::os::unix::fs::symlink(&outside, r.join("usr")).unwrap();
        assert!(
            gatevm_abi::error_chain(&stage(&paths, &s, &[]).unwrap_err())
                .contains("not a directory")
        );
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);

        // Reserved manifest names.
        std::fs::remove_file(r.join("usr")).unwrap();
        std::fs::write(mdir.join("gatevm-x.yaml"), "x").unwrap();
        assert!(gatevm_abi::error_chain(&stage(&paths, &s, &[]).unwrap_err()).contains("reserved"));
    }

    #[test]
    fn manifest_selection() {
        let d = tempfile::tempdir().unwrap();
        assert!(manifest_files(&d.path().join("none")).is_err());
        std::fs::write(d.path().join("b.yml"), "").unwrap();
        std::fs::write(d.path().join("a.json"), "").unwrap();
        std::fs::write(d.path().join("c.txt"), "").unwrap();
        let v = manifest_files(d.path()).unwrap();
        let names: Vec<_> = v
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["a.json", "b.yml"]);
        assert_eq!(manifest_files(&d.path().join("c.txt")).unwrap().len(), 1);
    }

    #[test]
    fn options_follow_the_settings() {
        let s = settings(Path::new("/k3s"));
        let o = options("gw", &s);
        assert_eq!(o.node_name, "gw");
        assert!(o.enable_traefik && !o.enable_servicelb && !o.enable_metrics_server);
        assert_eq!(o.data_dir, DATA_DIR);
    }
}
