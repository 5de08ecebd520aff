//! The k3s profile, prepared on the host before boot: the k3s binary, the server plan (flags and
//! CNI configuration chosen from the guest kernel's features), the user's manifests and airgap
//! images, and the gateway's TLS Secret, staged into a directory of the instance and made into a
//! read-only EROFS image at every start. The guest mounts it at `/etc/gatevm/k3s`, where
//! gatevm-guest picks them up (`gatevm.payload=k3s`). The guest cannot write it, and the host
//! never reads anything back from it.

use crate::config::K3sSettings;
use crate::paths::InstancePaths;
use crate::rootdir::RootDirError;
pub use crate::rootdir::{dir_in_root, write_new};
use gatevm_abi::paths::{self, rel};
use gatevm_abi::plan::{CniConflist, PlanFile, StagedImage};
use gatevm_k3s::flags::{self, K3sOptions};
use gatevm_k3s::pki::{self, PkiOptions};
use gatevm_kernel::kconfig::Capability;
use std::path::{Path, PathBuf};

/// A guest path under the staging directory, relative to it (`/etc/gatevm/k3s/k3s` → `k3s`).
pub fn in_stage(guest_path: &str) -> &str {
    guest_path
        .strip_prefix(paths::K3S_STAGE_DIR)
        .map(|r| r.trim_start_matches('/'))
        .unwrap_or_else(|| rel(guest_path))
}
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
    /// The staging image could not be made.
    #[error(transparent)]
    Image(#[from] gatevm_runtime::erofs::ErofsError),
    /// An agent's server has no cluster token yet.
    #[error("the cluster token of {server:?} is missing ({}): start {server:?} first", path.display())]
    NoToken {
        /// The server instance.
        server: String,
        /// Where its token would be.
        path: PathBuf,
    },
}

/// A cluster server's token (`paths.cluster_token()`, 0600): read, or made from 32 random bytes
/// (hex) on first use.
pub fn cluster_token(paths: &InstancePaths) -> Result<String, StageError> {
    let path = paths.cluster_token();
    let io = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| StageError::Io { op, path, source }
    };
    match std::fs::read_to_string(&path) {
        Ok(t) if t.trim().len() >= 32 => return Ok(t.trim().to_string()),
        // Never replaced behind the user's back: the cluster was made with it.
        Ok(_) => {
            return Err(io("reading", &path)(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not a cluster token (fewer than 32 characters); restore it, or delete it and \
                 the server's state (start --reset) for a new cluster",
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("reading", &path)(e)),
    }
    let mut bytes = [0u8; 32];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(io("reading", Path::new("/dev/urandom")))?;
    let token = hex::encode(bytes);
    gatevm_fsutil::write_atomic(&path, token.as_bytes(), 0o600).map_err(io("writing", &path))?;
    Ok(token)
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

/// Copies an image archive into the stage, streaming (archives are large), and returns the
/// SHA-256 of what was copied: the guest imports an archive once per digest.
fn copy_hashed(src: &Path, dest: &Path) -> Result<String, StageError> {
    use sha2::Digest;
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let io = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| StageError::Io { op, path, source }
    };
    let mut from = std::fs::File::open(src).map_err(io("reading", src))?;
    let mut to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dest)
        .map_err(io("creating", dest))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io("reading", src)(e)),
        };
        h.update(&buf[..n]);
        to.write_all(&buf[..n]).map_err(io("writing", dest))?;
    }
    Ok(hex::encode(h.finalize()))
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
        user_args: s.user_args.clone(),
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

/// Prepares the k3s profile: stages it ([`stage_tree`]) and makes the staging image the guest
/// mounts (`paths.stage_image()`); the staging directory goes again. `caps` are the guest
/// kernel's features (empty when unknown: every feature then counts as missing and the plan is
/// the conservative one).
pub fn stage(
    paths: &InstancePaths,
    s: &K3sSettings,
    caps: &[Capability],
    cluster_ip: Option<std::net::Ipv4Addr>,
) -> Result<(), StageError> {
    stage_tree(paths, s, caps, cluster_ip)?;
    let dir = paths.stage_dir();
    let made = gatevm_runtime::erofs::make_image(
        &dir,
        &paths.stage_image(),
        gatevm_runtime::erofs::Owners::AllRoot,
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(made?)
}

/// Stages the k3s profile into a fresh `paths.stage_dir()`, laid out as the guest sees it under
/// `/etc/gatevm/k3s`. With `cluster_ip` (the VM has a cluster NIC) the cluster token is staged
/// too (0600): the server's own, made on first use, or, for an agent, its server's.
pub fn stage_tree(
    paths: &InstancePaths,
    s: &K3sSettings,
    caps: &[Capability],
    cluster_ip: Option<std::net::Ipv4Addr>,
) -> Result<(), StageError> {
    let stage = paths.stage_dir();
    if std::fs::symlink_metadata(&stage).is_ok() {
        std::fs::remove_dir_all(&stage).map_err(|source| StageError::Io {
            op: "clearing",
            path: stage.clone(),
            source,
        })?;
    }
    crate::paths::mkdir_private(&stage).map_err(|source| StageError::Io {
        op: "creating",
        path: stage.clone(),
        source,
    })?;
    // The binary, checked against what `start` saw.
    let bin = in_stage(paths::K3S_BIN);
    crate::rootdir::install(&s.binary, &stage.join(bin), 0o755)?;
    let manifests = dir_in_root(&stage, in_stage(paths::K3S_STAGED_MANIFESTS))?;
    let images = dir_in_root(&stage, in_stage(paths::K3S_STAGED_IMAGES))?;

    let mut staged_images = Vec::new();
    for (i, img) in s.images.iter().enumerate() {
        let base = img
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("images-{i}.tar"));
        let file = format!("{i:02}-{base}");
        let sha256 = copy_hashed(img, &images.join(&file))?;
        staged_images.push(StagedImage { file, sha256 });
    }

    let mut opts = options(&paths.name, s);
    if let Some(ip) = cluster_ip {
        let token = match &s.join {
            None => cluster_token(paths)?,
            Some(j) => {
                let server = InstancePaths::new(&j.server);
                let path = server.cluster_token();
                match std::fs::read_to_string(&path) {
                    Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
                    _ => {
                        return Err(StageError::NoToken {
                            server: j.server.clone(),
                            path,
                        })
                    }
                }
            }
        };
        write_new(
            &stage.join(in_stage(paths::K3S_TOKEN)),
            token.as_bytes(),
            0o600,
        )?;
        opts.cluster = Some(flags::ClusterNode {
            node_ip: ip,
            token_file: paths::K3S_TOKEN.into(),
            server_url: s
                .join
                .as_ref()
                .map(|_| flags::ClusterNode::server_url_default()),
        });
    }
    let plan = flags::plan(caps, &opts);
    let staged = PlanFile {
        args: plan.args,
        data_dir: DATA_DIR.into(),
        cni: plan
            .cni_conflist
            .map(|(file, json)| CniConflist { file, json }),
        notes: plan.notes,
        images: staged_images,
        role: if s.join.is_some() {
            gatevm_abi::plan::Role::Agent
        } else {
            gatevm_abi::plan::Role::Server
        },
    };
    let json = staged.to_json().map_err(StageError::Plan)?;
    write_new(&stage.join(in_stage(paths::K3S_PLAN)), &json, 0o644)?;

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

    // An agent deploys nothing and serves no gateway: its server does.
    if s.join.is_some() {
        return Ok(());
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
            user_args: vec![],
            join: None,
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
        std::fs::create_dir_all(&paths.dir).unwrap();
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
        // What an earlier start staged goes.
        std::fs::create_dir_all(paths.stage_dir().join("manifests")).unwrap();
        std::fs::write(paths.stage_dir().join("manifests/old.yaml"), "x").unwrap();

        stage_tree(&paths, &s, &[], None).unwrap();
        let r = paths.stage_dir();
        assert_eq!(in_stage(paths::K3S_BIN), "k3s");
        assert_eq!(std::fs::read(r.join("k3s")).unwrap(), b"\x7fELF fake");
        // Where and what the guest reads: its parser takes the staged plan as it is.
        let text = std::fs::read_to_string(r.join(in_stage(paths::K3S_PLAN))).unwrap();
        assert_eq!(in_stage(paths::K3S_PLAN), "plan.json");
        let plan: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(plan["data_dir"], DATA_DIR);
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
        let m = r.join("manifests");
        assert!(m.join("a.yaml").is_file());
        assert!(!m.join("notes.txt").exists());
        assert!(!m.join("old.yaml").exists());
        assert!(std::fs::read_to_string(m.join("gatevm-gateway-tls.yaml"))
            .unwrap()
            .contains("kubernetes.io/tls"));
        assert!(r.join("images/00-airgap.tar").is_file());
        // The plan carries the archive's digest.
        assert_eq!(plan["images"][0]["file"], "00-airgap.tar");
        // sha256("tar"), the archive's three bytes.
        assert_eq!(
            plan["images"][0]["sha256"],
            "90aebae315675cbf04612de4f7d5874850f48e0b8dd82becbeaa47ca93f5ebfb"
        );
        assert_eq!(parsed.images.len(), 1);
        assert!(paths.dir.join("pki/ca.crt").is_file());

        // The image: made, and the staging directory gone.
        if gatevm_runtime::erofs::mkfs_erofs().is_some() {
            stage(&paths, &s, &[], None).unwrap();
            assert!(!paths.stage_dir().exists());
            let bytes = std::fs::read(paths.stage_image()).unwrap();
            assert_eq!(&bytes[1024..1028], &[0xe2, 0xe1, 0xf5, 0xe0], "not EROFS");
        } else {
            gatevm_testkit::skip_part(
                "stages_binary_plan_manifests_images_and_secret",
                "the staging image",
                "mkfs.erofs is not installed (erofs-utils)",
            );
        }

        // Reserved manifest names.
        std::fs::write(mdir.join("gatevm-x.yaml"), "x").unwrap();
        assert!(
            gatevm_abi::error_chain(&stage_tree(&paths, &s, &[], None).unwrap_err())
                .contains("reserved")
        );
    }

    #[test]
    fn a_cluster_server_makes_its_token_and_an_agent_stages_it() {
        let d = tempfile::tempdir().unwrap();
        let inst = |name: &str| {
            let p = InstancePaths {
                name: name.into(),
                dir: d.path().join(format!("data/instances/{name}")),
                run: d.path().join(format!("run/{name}")),
            };
            std::fs::create_dir_all(&p.dir).unwrap();
            p
        };
        let bin = d.path().join("k3s");
        std::fs::write(&bin, b"\x7fELF fake").unwrap();
        let server = inst("srv");
        let s = settings(&bin);
        let ip = gatevm_abi::net::CLUSTER_SERVER_IP;
        stage_tree(&server, &s, &[], Some(ip)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let token = std::fs::read_to_string(server.cluster_token()).unwrap();
        assert_eq!(token.len(), 64);
        for f in [server.cluster_token(), server.stage_dir().join("token")] {
            assert_eq!(
                std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
                0o600,
                "{}",
                f.display()
            );
        }
        assert_eq!(
            std::fs::read_to_string(server.stage_dir().join("token")).unwrap(),
            token
        );
        let plan = |p: &InstancePaths| {
            gatevm_abi::plan::parse(
                &std::fs::read_to_string(p.stage_dir().join("plan.json")).unwrap(),
            )
            .unwrap()
        };
        let sp = plan(&server);
        assert_eq!(sp.role, gatevm_abi::plan::Role::Server);
        assert!(sp
            .args
            .iter()
            .any(|a| a == "--token-file=/etc/gatevm/k3s/token"));
        assert!(sp.args.iter().any(|a| a == "--node-ip=192.168.200.10"));
        // The token is kept across starts.
        stage_tree(&server, &s, &[], Some(ip)).unwrap();
        assert_eq!(
            std::fs::read_to_string(server.cluster_token()).unwrap(),
            token
        );
        // A damaged token is refused, never replaced: the cluster was made with it.
        std::fs::write(server.cluster_token(), "short").unwrap();
        let e = gatevm_abi::error_chain(&stage_tree(&server, &s, &[], Some(ip)).unwrap_err());
        assert!(e.contains("not a cluster token"), "{e}");
        assert_eq!(
            std::fs::read_to_string(server.cluster_token()).unwrap(),
            "short"
        );
        std::fs::write(server.cluster_token(), &token).unwrap();

        // An agent: its server's token, no manifests or certificates of its own. A server that
        // never started has no token: the start says which to start first.
        let agent = inst("wrk");
        let mut a = settings(&bin);
        a.join = Some(crate::config::Join {
            server: "gatevm-test-no-such-server".into(),
            node_ip: "192.168.200.11".parse().unwrap(),
        });
        let e = stage_tree(&agent, &a, &[], Some("192.168.200.11".parse().unwrap())).unwrap_err();
        assert!(
            gatevm_abi::error_chain(&e).contains("start \"gatevm-test-no-such-server\" first"),
            "{e}"
        );
        stage_tree(&agent, &a, &[], None).unwrap();
        let ap = plan(&agent);
        assert_eq!(ap.role, gatevm_abi::plan::Role::Agent);
        assert!(!agent.dir.join("pki").exists());
        assert!(!agent
            .stage_dir()
            .join("manifests/gatevm-gateway-tls.yaml")
            .exists());
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
