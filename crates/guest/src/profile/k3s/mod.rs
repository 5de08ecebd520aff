//! The k3s profile (`gatevm.payload=k3s`): containerd configured for k3s's pods, then
//! `k3s server` using that containerd.
//!
//! What the host prepares in the instance root before boot:
//! - [`K3S_BIN`]: the k3s binary;
//! - [`plan::PLAN_PATH`]: the plan, `{"args": [...], "data_dir": "...", "cni": null | {"file",
//!   "json"}}` (`args` is everything after `k3s server`; see [`plan::parse_plan`]);
//! - [`STAGED_MANIFESTS`] (`*.yaml`, `*.yml`, `*.json`) and [`STAGED_IMAGES`] (image archives),
//!   either of which may be missing or empty.
//!
//! What the guest does with them:
//! 1. Before anything starts ([`Profile::load`]): reads the plan and writes containerd's
//!    configuration ([`containerd::containerd_config`]) to [`CONTAINERD_CONFIG`]. k3s runs with
//!    `--container-runtime-endpoint` pointing at the VM's containerd, so it is containerd's CRI
//!    plugin, not k3s, that runs CNI: the configuration points CNI at k3s's bundled plugins and
//!    at k3s's CNI configuration directory.
//! 2. Once the state disk is mounted ([`prepare`]): creates the data directory, places the
//!    staged manifests in k3s's auto-deploy directory and the staged images in its images
//!    directory ([`staging::sync_staged`], which records what gatevm placed so that what is no
//!    longer staged is removed on a later boot, and never touches files k3s wrote itself),
//!    writes the CNI configuration list ([`staging::place_cni`]), removes stale SQLite
//!    companions of k3s's datastore ([`kine::kine_stale_files`]) and the kubeconfig of an
//!    earlier boot (so readiness means "written by this boot's k3s").
//! 3. Supervises containerd (with `--config` [`CONTAINERD_CONFIG`]) and, once containerd is
//!    ready, imports the placed image archives into containerd's `k8s.io` namespace
//!    ([`images::import_images`]; k3s only imports its images directory into the containerd it
//!    embeds, never into an external one) and starts `k3s server <args>`
//!    ([`k3s_payload_config`]).
//!
//! When the plan or the binary is missing, or the data directory cannot be prepared, the k3s
//! payload is reported `Failed` with a message saying why, and is not started; containerd runs
//! either way, so `gatevm image import` and exec keep working.

pub(crate) mod containerd;
pub(crate) mod images;
pub(crate) mod kine;
pub(crate) mod plan;
pub(crate) mod staging;
#[cfg(test)]
mod testutil;

use self::containerd::write_containerd_config;
use self::images::import_images;
use self::kine::recover as recover_datastore;
use self::plan::{load_plan, Plan, DEFAULT_API_PORT, KUBECONFIG, PLAN_PATH};
use self::staging::{is_manifest_name, place_cni, sync_staged, SyncReport};
use crate::fsutil::mkdir_private;
use crate::payload::{Payload, PayloadConfig, Readiness, WaitOutcome};
use crate::profile::containerd::payload_config as base_containerd_config;
use crate::reaper::Reaper;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The k3s binary the host installs.
pub(crate) const K3S_BIN: &str = gatevm_abi::paths::K3S_BIN;
/// Manifests the host stages for k3s's auto-deploy directory.
pub(crate) const STAGED_MANIFESTS: &str = gatevm_abi::paths::K3S_STAGED_MANIFESTS;
/// Image archives the host stages.
pub(crate) const STAGED_IMAGES: &str = gatevm_abi::paths::K3S_STAGED_IMAGES;
/// containerd's configuration in the k3s profile, written at every boot.
pub(crate) const CONTAINERD_CONFIG: &str = "/run/gatevm/containerd-k3s.toml";
/// k3s's log file.
pub(crate) const LOG: &str = "/var/log/k3s.log";
/// What this boot's k3s profile did, for `gatevm status` ([`write_report`]).
pub(crate) const REPORT: &str = gatevm_abi::paths::K3S_REPORT;

/// Writes [`REPORT`]: the airgap import lines and the datastore lines (at most 64 of each, each
/// at most 512 bytes). Failing to write it only loses the report.
pub(crate) fn write_report(path: &Path, images: &[String], datastore: &[String]) {
    let cut = |v: &[String]| -> Vec<String> {
        v.iter()
            .take(64)
            .map(|l| {
                let mut l = l.clone();
                if l.len() > 512 {
                    let mut end = 512;
                    while !l.is_char_boundary(end) {
                        end -= 1;
                    }
                    l.truncate(end);
                }
                l
            })
            .collect()
    };
    let v = serde_json::json!({ "images": cut(images), "datastore": cut(datastore) });
    let text = serde_json::to_vec(&v).unwrap_or_default();
    if let Err(e) = gatevm_fsutil::write_atomic(path, &text, 0o644) {
        crate::glog!("k3s: cannot write {}: {e}", path.display());
    }
}

/// Where [`prepare`] reads the staged files, and the kubeconfig it clears (the real paths for a
/// plan, see [`Staging::for_plan`]; tests point them into temporary directories).
#[derive(Debug, Clone)]
pub(crate) struct Staging {
    /// Staged manifests.
    pub manifests: PathBuf,
    /// Staged image archives.
    pub images: PathBuf,
    /// The kubeconfig k3s writes.
    pub kubeconfig: PathBuf,
}

impl Staging {
    /// The real paths for `plan`.
    pub(crate) fn for_plan(plan: &Plan) -> Staging {
        Staging {
            manifests: STAGED_MANIFESTS.into(),
            images: STAGED_IMAGES.into(),
            kubeconfig: plan.kubeconfig(),
        }
    }
}

/// What [`prepare`] did.
#[derive(Debug, Default, Clone)]
pub(crate) struct Prepared {
    /// Log lines.
    pub notes: Vec<String>,
    /// Problems that did not stop k3s from starting.
    pub problems: Vec<String>,
    /// Image archives in the images directory that gatevm placed (to import).
    pub images: Vec<String>,
    /// What the datastore's recovery did and found (for `gatevm status`).
    pub datastore: Vec<String>,
}

fn report_into(what: &str, r: &SyncReport, out: &mut Prepared) {
    out.notes.push(format!("{what}: {}", r.summary()));
    for i in &r.ignored {
        out.notes.push(format!("{what}: ignored {i}"));
    }
    for p in &r.problems {
        out.problems.push(format!("{what}: {p}"));
    }
}

/// Why k3s's data directory could not be prepared.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PrepareError {
    /// The data directory could not be created.
    #[error("cannot create the k3s data directory {}", path.display())]
    DataDir {
        /// The data directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Prepares k3s's data directory for this boot (see the module docs). Fails only when the data
/// directory cannot be created; other problems are reported and k3s starts anyway.
pub(crate) fn prepare(plan: &Plan, staging: &Staging) -> Result<Prepared, PrepareError> {
    let mut out = Prepared::default();
    mkdir_private(&plan.data_dir).map_err(|source| PrepareError::DataDir {
        path: plan.data_dir.clone(),
        source,
    })?;
    let idx = plan.index_dir();

    let r = sync_staged(
        &staging.manifests,
        &plan.manifests_dir(),
        &idx.join("manifests.json"),
        is_manifest_name,
        "a .yaml, .yml or .json file",
    );
    report_into("manifests", &r, &mut out);

    let r = sync_staged(
        &staging.images,
        &plan.images_dir(),
        &idx.join("images.json"),
        |_| true,
        "a regular file",
    );
    report_into("images", &r, &mut out);
    out.images = r.placed();

    let r = place_cni(
        plan.cni.as_ref(),
        &plan.cni_conf_dir(),
        &idx.join("cni.json"),
    );
    report_into("cni", &r, &mut out);

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (notes, problems) = recover_datastore(&plan.db_dir(), now);
    for n in notes {
        out.notes.push(format!("datastore: {n}"));
        out.datastore.push(n);
    }
    for p in problems {
        out.problems.push(format!("datastore: {p}"));
        out.datastore.push(p);
    }

    // A kubeconfig of an earlier boot would make readiness (and the host) believe this boot's
    // API server is up before it is; k3s writes it anew at every start.
    let kubeconfig = &staging.kubeconfig;
    if fs::symlink_metadata(kubeconfig).is_ok_and(|m| !m.file_type().is_dir()) {
        match fs::remove_file(kubeconfig) {
            Ok(()) => out.notes.push(format!(
                "removed {} of an earlier boot",
                kubeconfig.display()
            )),
            Err(e) => out
                .problems
                .push(format!("cannot remove {}: {e}", kubeconfig.display())),
        }
    }
    Ok(out)
}

/// containerd in the k3s profile: as in the containerd profile, plus `--config`
/// [`CONTAINERD_CONFIG`].
pub(crate) fn containerd_payload_config() -> PayloadConfig {
    let mut c = base_containerd_config();
    c.args = vec!["--config".into(), CONTAINERD_CONFIG.into()];
    c
}

/// The kubelet's health port, which a k3s agent's readiness probes.
pub(crate) const KUBELET_HEALTHZ_PORT: u16 = 10248;

/// k3s as gatevm runs it: `k3s server <plan args>`, ready when its kubeconfig exists and its
/// API port accepts TCP connections on 127.0.0.1 (`k3s agent <plan args>` for an agent node:
/// ready when its kubelet's health port accepts them), log in [`LOG`], restarts and rotation as
/// for containerd. Without a plan (k3s cannot run), just `k3s server` on the default port.
pub(crate) fn k3s_payload_config(plan: Option<&Plan>) -> PayloadConfig {
    let role = plan.map(|p| p.role).unwrap_or_default();
    let mut args = vec![role.subcommand().to_string()];
    let (port, kubeconfig) = match plan {
        Some(p) => {
            args.extend(p.args.iter().cloned());
            (p.api_port(), p.kubeconfig())
        }
        None => (DEFAULT_API_PORT, PathBuf::from(KUBECONFIG)),
    };
    let readiness = match role {
        gatevm_abi::plan::Role::Server => {
            Readiness::TcpAndFile(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), kubeconfig)
        }
        gatevm_abi::plan::Role::Agent => Readiness::Tcp(SocketAddr::from((
            Ipv4Addr::LOCALHOST,
            KUBELET_HEALTHZ_PORT,
        ))),
    };
    let base = base_containerd_config();
    PayloadConfig {
        name: "k3s".into(),
        program: K3S_BIN.into(),
        args,
        readiness,
        log: LOG.into(),
        // k3s takes seconds to start: probe less often than containerd.
        probe_interval: Duration::from_millis(250),
        ..base
    }
}

/// The two payloads of the k3s profile and what starting k3s needs.
pub(crate) struct Profile {
    /// containerd (started first).
    pub containerd: Arc<Payload>,
    /// k3s (started once containerd is ready).
    pub k3s: Arc<Payload>,
    /// The plan, while k3s can still run.
    plan: Option<Plan>,
    /// Archives to import before k3s starts.
    images: Vec<String>,
    /// What the datastore's recovery did (for the report).
    datastore: Vec<String>,
}

impl Profile {
    /// Reads the plan and writes containerd's configuration (before the state disk: the plan
    /// is in the root, the configuration in `/run`). A missing or bad plan, a configuration
    /// that cannot be written, or a missing k3s binary mark k3s `Failed` right away; containerd
    /// then runs without `--config` when it has no configuration.
    pub(crate) fn load() -> Profile {
        let plan = match load_plan(Path::new(PLAN_PATH)) {
            Ok(p) => p,
            Err(e) => return Self::without_k3s(base_containerd_config(), None, &e.to_string()),
        };
        for n in &plan.notes {
            crate::glog!("k3s: {n}");
        }
        if let Err(e) = write_containerd_config(&plan, Path::new(CONTAINERD_CONFIG)) {
            let msg = format!("cannot write containerd's configuration {CONTAINERD_CONFIG}: {e}");
            return Self::without_k3s(base_containerd_config(), Some(&plan), &msg);
        }
        if !Path::new(K3S_BIN).is_file() {
            let msg = format!(
                "{K3S_BIN} not found: the host did not install the k3s binary into the \
                 instance root"
            );
            return Self::without_k3s(containerd_payload_config(), Some(&plan), &msg);
        }
        Profile {
            containerd: Payload::new(containerd_payload_config()),
            k3s: Payload::new(k3s_payload_config(Some(&plan))),
            plan: Some(plan),
            images: Vec::new(),
            datastore: Vec::new(),
        }
    }

    fn without_k3s(containerd: PayloadConfig, plan: Option<&Plan>, why: &str) -> Profile {
        let k3s = Payload::new(k3s_payload_config(plan));
        k3s.fail(why);
        Profile {
            containerd: Payload::new(containerd),
            k3s,
            plan: None,
            images: Vec::new(),
            datastore: Vec::new(),
        }
    }

    /// Both payloads in start order.
    pub(crate) fn payloads(&self) -> Vec<Arc<Payload>> {
        vec![self.containerd.clone(), self.k3s.clone()]
    }

    /// Prepares the data directory once the state disk is mounted (see [`prepare`]); a failure
    /// marks k3s `Failed`.
    pub(crate) fn prepare(&mut self) {
        let Some(plan) = &self.plan else { return };
        match prepare(plan, &Staging::for_plan(plan)) {
            Ok(p) => {
                for n in &p.notes {
                    crate::glog!("k3s: {n}");
                }
                for n in p.problems.iter().take(8) {
                    crate::glog!("k3s: {n}");
                }
                if p.problems.len() > 8 {
                    crate::glog!("k3s: {} more problems", p.problems.len() - 8);
                }
                self.images = p.images;
                self.datastore = p.datastore;
                let pending: Vec<String> = self
                    .images
                    .iter()
                    .map(|i| format!("{i}: waiting for containerd"))
                    .collect();
                write_report(Path::new(REPORT), &pending, &self.datastore);
            }
            Err(e) => {
                self.k3s.fail(&crate::log::error_chain(&e));
                self.plan = None;
            }
        }
    }

    /// Starts containerd's supervisor and a thread that waits for containerd to be ready,
    /// imports the images and starts k3s's supervisor.
    pub(crate) fn start(&self, reaper: &'static Reaper) {
        if let Err(e) = self.containerd.start(reaper) {
            crate::glog!("cannot start the containerd supervisor: {e}");
        }
        let Some(plan) = &self.plan else { return };
        let containerd = self.containerd.clone();
        let k3s = self.k3s.clone();
        let imports = Imports {
            dir: plan.images_dir(),
            names: self.images.clone(),
            digests: plan
                .images
                .iter()
                .map(|i| (i.file.clone(), i.sha256.clone()))
                .collect(),
            record: plan.index_dir().join("imported-images.json"),
            datastore: self.datastore.clone(),
        };
        let spawned = std::thread::Builder::new()
            .name("k3s-start".into())
            .spawn(move || launch(&containerd, &k3s, &imports, reaper));
        if let Err(e) = spawned {
            self.k3s.fail(&format!("cannot start a thread: {e}"));
        }
    }
}

/// The airgap archives to import before k3s starts, and what the report says besides.
struct Imports {
    /// k3s's images directory, where they were placed.
    dir: PathBuf,
    /// The placed archives.
    names: Vec<String>,
    /// File name → SHA-256, from the plan.
    digests: Vec<(String, String)>,
    /// The import record on the state disk.
    record: PathBuf,
    /// The datastore's lines for the report.
    datastore: Vec<String>,
}

/// Waits for containerd, imports the images, starts k3s (unless a shutdown began).
fn launch(containerd: &Payload, k3s: &Arc<Payload>, imports: &Imports, reaper: &'static Reaper) {
    loop {
        match containerd.wait_ready(Duration::from_secs(3600)) {
            WaitOutcome::Ready => break,
            WaitOutcome::Timeout => {}
            WaitOutcome::Stopping => return,
            WaitOutcome::Failed(why) => {
                k3s.fail(&format!("not started: containerd failed ({why})"));
                return;
            }
        }
    }
    let lines = import_images(
        &imports.dir,
        &imports.names,
        &imports.digests,
        &imports.record,
        reaper,
    );
    for line in &lines {
        crate::glog!("k3s: {line}");
    }
    write_report(Path::new(REPORT), &lines, &imports.datastore);
    if crate::shutdown::in_progress() {
        return;
    }
    if let Err(e) = k3s.start(reaper) {
        k3s.fail(&format!("cannot start the k3s supervisor: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::{names, plan_for, write};
    use super::*;
    use crate::profile::k3s::plan::CniConflist;

    #[test]
    fn prepare_places_everything() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("state/k3s");
        let mut plan = plan_for(&data, &[]);
        plan.cni = Some(CniConflist {
            file: "10-gatevm-bridge.conflist".into(),
            json: "{}".into(),
        });
        let staging = Staging {
            manifests: d.path().join("etc/manifests"),
            images: d.path().join("etc/images"),
            kubeconfig: d.path().join("rancher/k3s.yaml"),
        };
        write(&staging.manifests.join("gw.yaml"), "kind: x\n");
        write(&staging.images.join("app.tar"), "tar");
        write(&staging.kubeconfig, "old");
        // An empty database is a valid one (SQLite's header comes with the first write).
        write(&data.join("server/db/state.db"), "");
        write(&data.join("server/db/state.db-shm"), "shm");

        let p = prepare(&plan, &staging).unwrap();
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        assert_eq!(p.images, vec!["app.tar"]);
        assert!(data.join("server/manifests/gw.yaml").is_file());
        assert!(data.join("agent/images/app.tar").is_file());
        assert!(data
            .join("agent/etc/cni/net.d/10-gatevm-bridge.conflist")
            .is_file());
        assert!(!data.join("server/db/state.db-shm").exists());
        assert!(data.join("server/db/state.db").exists());
        assert!(!staging.kubeconfig.exists());
        assert_eq!(
            names(&data.join(".gatevm")),
            vec!["cni.json", "images.json", "manifests.json"]
        );
        let notes = p.notes.join("\n");
        assert!(notes.contains("manifests: 1 copied"), "{notes}");
        assert!(notes.contains("removed stale"), "{notes}");

        // A data directory that cannot be created is fatal.
        write(&d.path().join("file"), "x");
        let bad = plan_for(&d.path().join("file/k3s"), &[]);
        let e = crate::log::error_chain(&prepare(&bad, &staging).unwrap_err());
        assert!(e.contains("cannot create the k3s data directory"), "{e}");
    }

    #[test]
    fn payload_configs() {
        let p = plan_for(
            Path::new("/var/lib/gatevm/k3s"),
            &["--https-listen-port=7443"],
        );
        let c = k3s_payload_config(Some(&p));
        assert_eq!(c.name, "k3s");
        assert_eq!(c.program, PathBuf::from("/etc/gatevm/k3s/k3s"));
        assert_eq!(c.args[0], "server");
        assert_eq!(&c.args[1..], p.args.as_slice());
        assert_eq!(
            c.readiness,
            Readiness::TcpAndFile(
                "127.0.0.1:7443".parse().unwrap(),
                PathBuf::from("/etc/rancher/k3s/k3s.yaml")
            )
        );
        assert_eq!(c.log, PathBuf::from("/var/log/k3s.log"));
        let base = base_containerd_config();
        assert_eq!(c.log_max, base.log_max);
        assert_eq!(c.backoff_initial, base.backoff_initial);
        assert_eq!(c.backoff_max, base.backoff_max);
        assert_eq!(c.stop_timeout, crate::payload::PAYLOAD_STOP_TIMEOUT);

        // An agent: `k3s agent`, ready when its kubelet answers.
        let mut agent = p.clone();
        agent.role = gatevm_abi::plan::Role::Agent;
        let c = k3s_payload_config(Some(&agent));
        assert_eq!(c.args[0], "agent");
        assert_eq!(
            c.readiness,
            Readiness::Tcp("127.0.0.1:10248".parse().unwrap())
        );

        let c = k3s_payload_config(None);
        assert_eq!(c.args, vec!["server"]);
        assert_eq!(
            c.readiness,
            Readiness::TcpAndFile("127.0.0.1:6443".parse().unwrap(), PathBuf::from(KUBECONFIG))
        );

        let c = containerd_payload_config();
        assert_eq!(c.name, "containerd");
        assert_eq!(c.program, PathBuf::from("/usr/bin/containerd"));
        assert_eq!(c.args, vec!["--config", "/run/gatevm/containerd-k3s.toml"]);
        assert_eq!(
            c.readiness,
            Readiness::UnixSocket("/run/containerd/containerd.sock".into())
        );
        // The containerd profile stays as it was.
        assert!(base_containerd_config().args.is_empty());
    }
}
