//! The k3s profile (`gatevm.payload=k3s`): containerd configured for k3s's pods, then
//! `k3s server` using that containerd.
//!
//! What the host prepares in the instance root before boot:
//! - [`K3S_BIN`]: the k3s binary;
//! - [`PLAN_PATH`]: the plan, `{"args": [...], "data_dir": "...", "cni": null | {"file", "json"}}`
//!   (`args` is everything after `k3s server`; see [`parse_plan`]);
//! - [`STAGED_MANIFESTS`] (`*.yaml`, `*.yml`, `*.json`) and [`STAGED_IMAGES`] (image archives),
//!   either of which may be missing or empty.
//!
//! What the guest does with them:
//! 1. Before anything starts ([`Profile::load`]): reads the plan and writes containerd's
//!    configuration ([`containerd_config`]) to [`CONTAINERD_CONFIG`]. k3s runs with
//!    `--container-runtime-endpoint` pointing at the VM's containerd, so it is containerd's CRI
//!    plugin, not k3s, that runs CNI: the configuration points CNI at k3s's bundled plugins and
//!    at k3s's CNI configuration directory.
//! 2. Once the state disk is mounted ([`prepare`]): creates the data directory, places the
//!    staged manifests in k3s's auto-deploy directory and the staged images in its images
//!    directory ([`sync_staged`], which records what gatevm placed so that what is no longer
//!    staged is removed on a later boot, and never touches files k3s wrote itself), writes the
//!    CNI configuration list, removes stale SQLite companions of k3s's datastore
//!    ([`kine_stale_files`]) and the kubeconfig of an earlier boot (so readiness means "written
//!    by this boot's k3s").
//! 3. Supervises containerd (with `--config` [`CONTAINERD_CONFIG`]) and, once containerd is
//!    ready, imports the placed image archives into containerd's `k8s.io` namespace
//!    ([`import_images`]; k3s only imports its images directory into the containerd it embeds,
//!    never into an external one) and starts `k3s server <args>` ([`k3s_payload_config`]).
//!
//! When the plan or the binary is missing, or the data directory cannot be prepared, the k3s
//! payload is reported `Failed` with a message saying why, and is not started; containerd runs
//! either way, so `gatevm image import` and exec keep working.

use crate::payload::{Payload, PayloadConfig, Readiness, WaitOutcome};
use crate::reaper::{describe, Reaper};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The k3s binary the host installs.
pub const K3S_BIN: &str = "/usr/local/bin/k3s";
/// The plan the host writes.
pub const PLAN_PATH: &str = "/etc/gatevm/k3s/plan.json";
/// Manifests the host stages for k3s's auto-deploy directory.
pub const STAGED_MANIFESTS: &str = "/etc/gatevm/k3s/manifests";
/// Image archives the host stages.
pub const STAGED_IMAGES: &str = "/etc/gatevm/k3s/images";
/// containerd's configuration in the k3s profile, written at every boot.
pub const CONTAINERD_CONFIG: &str = "/run/gatevm/containerd-k3s.toml";
/// The admin kubeconfig k3s writes once its API server is up (unless the plan passes
/// `--write-kubeconfig`).
pub const KUBECONFIG: &str = "/etc/rancher/k3s/k3s.yaml";
/// k3s's log file.
pub const LOG: &str = "/var/log/k3s.log";
/// k3s's API port unless the plan passes `--https-listen-port`.
pub const DEFAULT_API_PORT: u16 = 6443;
/// containerd's pod sandbox image unless the plan passes `--pause-image`: k3s's own default
/// (what it gives the containerd it embeds), which k3s's airgap image archives contain.
/// containerd's built-in default (`registry.k8s.io/pause:…`) is in no k3s archive, so without
/// this an offline VM could start no pod.
pub const DEFAULT_PAUSE_IMAGE: &str = "docker.io/rancher/mirrored-pause:3.6";
/// The containerd namespace CRI (and so k3s) uses.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// Largest plan accepted.
pub const PLAN_MAX: u64 = 1024 * 1024;
/// Suffix of the temporary files [`sync_staged`] writes before renaming them into place.
const TMP_SUFFIX: &str = ".gatevm-tmp";

/// A CNI network configuration to place in k3s's CNI configuration directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniConflist {
    /// File name, e.g. `10-gatevm-bridge.conflist`.
    pub file: String,
    /// Its JSON text.
    pub json: String,
}

/// The host's plan for k3s ([`PLAN_PATH`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Arguments after `k3s server`.
    pub args: Vec<String>,
    /// k3s's data directory (normalized: absolute, no `.`/`..`, no trailing slash).
    pub data_dir: PathBuf,
    /// CNI configuration list to write, when flannel is off.
    pub cni: Option<CniConflist>,
    /// Things worth a log line (adjustments, doubtful settings).
    pub notes: Vec<String>,
}

/// Why the plan cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    /// The file does not exist.
    Missing(PathBuf),
    /// The file cannot be read.
    Read(PathBuf, String),
    /// The file is larger than [`PLAN_MAX`].
    TooLarge(PathBuf, u64),
    /// Not JSON.
    Json(String),
    /// JSON, but a field is missing or wrong.
    Invalid(String),
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanError::Missing(p) => write!(
                f,
                "{} not found: the host did not write the k3s plan into the instance root",
                p.display()
            ),
            PlanError::Read(p, e) => write!(f, "cannot read {}: {e}", p.display()),
            PlanError::TooLarge(p, n) => write!(
                f,
                "{} is {n} bytes, more than the {PLAN_MAX} a k3s plan may have",
                p.display()
            ),
            PlanError::Json(e) => write!(f, "k3s plan.json is not valid JSON: {e}"),
            PlanError::Invalid(e) => write!(f, "k3s plan.json: {e}"),
        }
    }
}

impl std::error::Error for PlanError {}

fn invalid(msg: impl Into<String>) -> PlanError {
    PlanError::Invalid(msg.into())
}

/// Whether `name` is a plain file name gatevm places or removes: not empty, at most 255 bytes,
/// no `/`, no control characters, not starting with `.` (no `.`/`..`, no hidden files, none of
/// gatevm's temporary files).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && !name.contains('/')
        && !name.chars().any(char::is_control)
}

/// Whether a staged manifest name is one k3s's deploy controller applies.
pub fn is_manifest_name(name: &str) -> bool {
    name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json")
}

/// Whether a CNI configuration file name is one containerd's CNI loader reads.
pub fn is_cni_name(name: &str) -> bool {
    name.ends_with(".conflist") || name.ends_with(".conf") || name.ends_with(".json")
}

/// The value of a k3s flag in `args`: `--flag=V`, `--flag V`, and the same for the short form;
/// the last occurrence wins (as in k3s's flag parser).
pub fn flag_value<'a>(args: &'a [String], long: &str, short: Option<&str>) -> Option<&'a str> {
    let mut found = None;
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let names = std::iter::once(long).chain(short);
        for name in names {
            if a == name {
                if let Some(v) = args.get(i + 1) {
                    found = Some(v.as_str());
                    i += 1;
                }
                break;
            }
            if let Some(v) = a.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
                found = Some(v);
                break;
            }
        }
        i += 1;
    }
    found
}

/// Checks and normalizes the data directory: absolute, no `..`, no control characters, not `/`.
fn check_data_dir(s: &str) -> Result<PathBuf, PlanError> {
    if s.chars().any(char::is_control) {
        return Err(invalid("\"data_dir\" contains control characters"));
    }
    let p = Path::new(s);
    if !p.is_absolute() {
        return Err(invalid(format!(
            "\"data_dir\" {s:?} is not an absolute path"
        )));
    }
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(invalid(format!("\"data_dir\" {s:?} contains \"..\"")))
            }
        }
    }
    if out == Path::new("/") {
        return Err(invalid("\"data_dir\" is \"/\""));
    }
    Ok(out)
}

/// Parses the plan's text. Unknown fields are ignored. When `args` do not name the data
/// directory, `--data-dir=<data_dir>` is appended (so k3s uses the directory gatevm prepares);
/// when they name another one, that is an error.
pub fn parse_plan(text: &str) -> Result<Plan, PlanError> {
    let v: Value = serde_json::from_str(text).map_err(|e| PlanError::Json(e.to_string()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| invalid("expected a JSON object"))?;
    let mut notes = Vec::new();

    let mut args = match obj.get("args") {
        None => {
            return Err(invalid(
                "missing \"args\" (the arguments after `k3s server`)",
            ))
        }
        Some(Value::Array(a)) => {
            let mut args = Vec::with_capacity(a.len());
            for (i, x) in a.iter().enumerate() {
                match x.as_str() {
                    Some(s) if !s.contains('\0') => args.push(s.to_string()),
                    Some(_) => return Err(invalid(format!("\"args\"[{i}] contains a NUL byte"))),
                    None => return Err(invalid(format!("\"args\"[{i}] is not a string"))),
                }
            }
            args
        }
        Some(_) => return Err(invalid("\"args\" must be an array of strings")),
    };

    let data_dir = match obj.get("data_dir") {
        None => return Err(invalid("missing \"data_dir\" (k3s's --data-dir)")),
        Some(Value::String(s)) => check_data_dir(s)?,
        Some(_) => return Err(invalid("\"data_dir\" must be a string")),
    };

    let cni = match obj.get("cni") {
        None | Some(Value::Null) => None,
        Some(Value::Object(o)) => {
            let file = match o.get("file") {
                Some(Value::String(f)) => f.clone(),
                Some(_) => return Err(invalid("\"cni\".\"file\" must be a string")),
                None => return Err(invalid("missing \"cni\".\"file\"")),
            };
            if !valid_name(&file) || !is_cni_name(&file) {
                return Err(invalid(format!(
                    "\"cni\".\"file\" {file:?} is not a plain .conflist, .conf or .json file name"
                )));
            }
            let json = match o.get("json") {
                Some(Value::String(j)) => j.clone(),
                Some(_) => return Err(invalid("\"cni\".\"json\" must be a string")),
                None => return Err(invalid("missing \"cni\".\"json\"")),
            };
            if let Err(e) = serde_json::from_str::<Value>(&json) {
                return Err(invalid(format!("\"cni\".\"json\" is not valid JSON: {e}")));
            }
            Some(CniConflist { file, json })
        }
        Some(_) => {
            return Err(invalid(
                "\"cni\" must be null or an object with \"file\" and \"json\"",
            ))
        }
    };

    match flag_value(&args, "--data-dir", Some("-d")) {
        Some(d) => {
            if check_data_dir(d).ok().as_deref() != Some(data_dir.as_path()) {
                return Err(invalid(format!(
                    "\"args\" pass --data-dir {d:?} but \"data_dir\" is {:?}",
                    data_dir.display().to_string()
                )));
            }
        }
        None => {
            args.push(format!("--data-dir={}", data_dir.display()));
            notes.push(format!(
                "plan args had no --data-dir; added --data-dir={}",
                data_dir.display()
            ));
        }
    }
    if flag_value(&args, "--container-runtime-endpoint", None).is_none() {
        notes.push(
            "plan args do not set --container-runtime-endpoint: k3s will start its own \
             containerd, which does not see images imported with `gatevm image import`"
                .into(),
        );
    }
    if !data_dir.starts_with(crate::disk::STATE_DIR) {
        notes.push(format!(
            "k3s data_dir {} is not under {}: its state is not on the state disk",
            data_dir.display(),
            crate::disk::STATE_DIR
        ));
    }
    Ok(Plan {
        args,
        data_dir,
        cni,
        notes,
    })
}

/// Reads and parses a plan file.
pub fn load_plan(path: &Path) -> Result<Plan, PlanError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(PlanError::Missing(path.to_path_buf()))
        }
        Err(e) => return Err(PlanError::Read(path.to_path_buf(), e.to_string())),
    };
    let mut text = String::new();
    f.take(PLAN_MAX + 1)
        .read_to_string(&mut text)
        .map_err(|e| PlanError::Read(path.to_path_buf(), e.to_string()))?;
    if text.len() as u64 > PLAN_MAX {
        let size = fs::metadata(path).map(|m| m.len()).unwrap_or(PLAN_MAX + 1);
        return Err(PlanError::TooLarge(path.to_path_buf(), size));
    }
    parse_plan(&text)
}

impl Plan {
    /// k3s's auto-deploy directory.
    pub fn manifests_dir(&self) -> PathBuf {
        self.data_dir.join("server/manifests")
    }

    /// k3s's images directory.
    pub fn images_dir(&self) -> PathBuf {
        self.data_dir.join("agent/images")
    }

    /// Where k3s (flannel) and gatevm put CNI network configurations; containerd's `conf_dir`.
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.data_dir.join("agent/etc/cni/net.d")
    }

    /// k3s's bundled CNI plugins (present once k3s has unpacked its data); containerd's
    /// `bin_dir`.
    pub fn cni_bin_dir(&self) -> PathBuf {
        self.data_dir.join("data/current/bin")
    }

    /// k3s's datastore directory (kine on SQLite: `state.db`).
    pub fn db_dir(&self) -> PathBuf {
        self.data_dir.join("server/db")
    }

    /// Where gatevm records which files it placed (one JSON index per target directory).
    pub fn index_dir(&self) -> PathBuf {
        self.data_dir.join(".gatevm")
    }

    /// The API port (`--https-listen-port`, else 6443).
    pub fn api_port(&self) -> u16 {
        flag_value(&self.args, "--https-listen-port", None)
            .and_then(|p| p.parse().ok())
            .unwrap_or(DEFAULT_API_PORT)
    }

    /// The kubeconfig k3s writes (`--write-kubeconfig`/`-o`, else [`KUBECONFIG`]).
    pub fn kubeconfig(&self) -> PathBuf {
        flag_value(&self.args, "--write-kubeconfig", Some("-o"))
            .filter(|p| p.starts_with('/'))
            .unwrap_or(KUBECONFIG)
            .into()
    }

    /// containerd's sandbox image (`--pause-image`, else [`DEFAULT_PAUSE_IMAGE`]).
    pub fn pause_image(&self) -> &str {
        flag_value(&self.args, "--pause-image", None)
            .filter(|s| !s.is_empty())
            .unwrap_or(DEFAULT_PAUSE_IMAGE)
    }
}

/// A TOML basic string.
pub(crate) fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// containerd's configuration (1.7, `version = 2`) in the k3s profile. Everything not set here
/// keeps containerd's default; set are:
/// - the default root, state and socket, spelled out so the file says where containerd lives;
/// - CRI's CNI `bin_dir` = k3s's bundled plugins and `conf_dir` = k3s's CNI directory: with an
///   external runtime endpoint it is containerd's CRI plugin that sets up pod networking, with
///   the configuration k3s (flannel) or gatevm writes there. The plugins appear after k3s's
///   first start unpacks them; CNI is loaded per pod, so their absence at containerd's start
///   is fine;
/// - the `runc` runtime (its type and sandbox mode restated, since a table given here replaces
///   the default entry) with `SystemdCgroup = false`: no systemd in the guest, and k3s's kubelet
///   uses the cgroupfs driver;
/// - the sandbox (pause) image, see [`DEFAULT_PAUSE_IMAGE`];
/// - the plugins of [`crate::payload::DISABLED_PLUGINS`] turned off.
pub fn containerd_config(plan: &Plan) -> String {
    format!(
        "# Written by gatevm-guest at every boot of the k3s profile; changes are lost.\n\
         # containerd's defaults apply to everything not set here.\n\
         version = 2\n\
         root = \"/var/lib/containerd\"\n\
         state = \"/run/containerd\"\n\
         {disabled}\n\
         \n\
         [grpc]\n\
         \x20 address = \"/run/containerd/containerd.sock\"\n\
         \n\
         [plugins.\"io.containerd.grpc.v1.cri\"]\n\
         \x20 sandbox_image = {pause}\n\
         \n\
         [plugins.\"io.containerd.grpc.v1.cri\".cni]\n\
         \x20 bin_dir = {bin}\n\
         \x20 conf_dir = {conf}\n\
         \n\
         [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n\
         \x20 runtime_type = \"io.containerd.runc.v2\"\n\
         \x20 sandbox_mode = \"podsandbox\"\n\
         \n\
         [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]\n\
         \x20 SystemdCgroup = false\n",
        disabled = crate::payload::disabled_plugins_line(),
        pause = toml_string(plan.pause_image()),
        bin = toml_string(&plan.cni_bin_dir().to_string_lossy()),
        conf = toml_string(&plan.cni_conf_dir().to_string_lossy()),
    )
}

/// Creates a directory and its parents, new ones with mode 0700.
fn mkdir_private(p: &Path) -> io::Result<()> {
    if p.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new().recursive(true).mode(0o700).create(p)
}

/// Writes `data` to `path` through a temporary file renamed over it.
pub(crate) fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{}{TMP_SUFFIX}", name.unwrap_or_default()));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    let r = f.write_all(data).and_then(|_| f.sync_all());
    drop(f);
    if let Err(e) = r.and_then(|_| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(())
}

/// Writes containerd's configuration for `plan` to `path` (directory created as needed).
pub fn write_containerd_config(plan: &Plan, path: &Path) -> io::Result<()> {
    crate::payload::write_config(path, &containerd_config(plan))
}

/// What a reconciliation of a target directory did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    /// Files written (new or changed).
    pub copied: Vec<String>,
    /// Files already up to date.
    pub unchanged: Vec<String>,
    /// Files gatevm had placed earlier and removed because they are no longer staged.
    pub removed: Vec<String>,
    /// Staged entries not placed, with the reason (symbolic links, directories, other names).
    pub ignored: Vec<String>,
    /// Failures (the rest went on).
    pub problems: Vec<String>,
}

impl SyncReport {
    /// Names now in the target that gatevm placed and that are staged (copied or unchanged).
    pub fn placed(&self) -> Vec<String> {
        let mut v: Vec<String> = self.copied.iter().chain(&self.unchanged).cloned().collect();
        v.sort();
        v
    }

    /// One log line, e.g. `2 copied, 1 unchanged, 1 removed, 1 ignored`.
    pub fn summary(&self) -> String {
        format!(
            "{} copied, {} unchanged, {} removed, {} ignored, {} problems",
            self.copied.len(),
            self.unchanged.len(),
            self.removed.len(),
            self.ignored.len(),
            self.problems.len()
        )
    }
}

/// The content of one file gatevm wants in a target directory.
enum Source {
    /// A staged regular file, with its metadata from the listing.
    Staged(PathBuf, fs::Metadata),
    /// Generated text.
    Text(String),
}

/// Reads an index of placed names; missing means none. Names that are not [`valid_name`] are
/// dropped, so a damaged index can never make gatevm remove anything outside the target.
/// `None` when the index exists but cannot be read or parsed (reported in `problems`).
fn read_index(index: &Path, problems: &mut Vec<String>) -> Option<BTreeSet<String>> {
    let text = match fs::read_to_string(index) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Some(BTreeSet::new()),
        Err(e) => {
            problems.push(format!("cannot read {}: {e}", index.display()));
            return None;
        }
    };
    let files = serde_json::from_str::<Value>(&text).ok().and_then(|v| {
        v.get("files").and_then(Value::as_array).map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .filter(|n| valid_name(n))
                .map(str::to_string)
                .collect()
        })
    });
    if files.is_none() {
        problems.push(format!(
            "{} is damaged; files gatevm placed earlier are no longer known",
            index.display()
        ));
    }
    files
}

fn write_index(index: &Path, names: &BTreeSet<String>) -> io::Result<()> {
    if let Some(dir) = index.parent() {
        mkdir_private(dir)?;
    }
    let mut text = json!({ "version": 1, "files": names }).to_string();
    text.push('\n');
    write_atomic(index, text.as_bytes(), 0o600)
}

/// Whether `dst` already holds what `src` describes (same size and modification time; gatevm
/// gives its copies the staged file's time).
fn up_to_date(src: &fs::Metadata, dst: &Path) -> bool {
    match fs::symlink_metadata(dst) {
        Ok(d) => {
            d.file_type().is_file()
                && d.len() == src.len()
                && matches!((src.modified(), d.modified()), (Ok(a), Ok(b)) if a == b)
        }
        Err(_) => false,
    }
}

/// Copies a staged file to `dst` through a temporary file: the source is opened without
/// following a symbolic link (a link swapped in after the listing fails the copy), must be a
/// regular file, and its modification time goes to the copy.
fn copy_staged(src: &Path, dst: &Path) -> io::Result<()> {
    let mut from = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(src)?;
    let meta = from.metadata()?;
    if !meta.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let dir = dst.parent().unwrap_or(Path::new("/"));
    let name = dst.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{}{TMP_SUFFIX}", name.unwrap_or_default()));
    let r = (|| {
        let mut to = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        io::copy(&mut from, &mut to)?;
        if let Ok(t) = meta.modified() {
            to.set_modified(t)?;
        }
        to.sync_all()?;
        drop(to);
        fs::rename(&tmp, dst)
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}

/// Makes `dst` hold exactly `want` among the files gatevm manages there (recorded in `index`):
/// writes new and changed ones, removes those placed earlier but no longer wanted (only when
/// `complete`: a staging directory that could not be read fully removes nothing), and leaves
/// every other file alone.
fn reconcile(
    dst: &Path,
    index: &Path,
    want: BTreeMap<String, Source>,
    complete: bool,
    report: &mut SyncReport,
) {
    let read = read_index(index, &mut report.problems);
    // What the index on disk says (`None`: unknown, rewrite it).
    let mut recorded = read.clone();
    let previous = read.unwrap_or_default();
    if let Err(e) = mkdir_private(dst) {
        report
            .problems
            .push(format!("cannot create {}: {e}", dst.display()));
        return;
    }
    // Temporary files of an interrupted earlier run.
    if let Ok(rd) = fs::read_dir(dst) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with('.') && n.ends_with(TMP_SUFFIX) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    // Record everything that may be placed before placing it, so an interrupted run still lets
    // a later boot remove what is no longer staged.
    let mut all = previous.clone();
    all.extend(want.keys().cloned());
    if recorded.as_ref() != Some(&all) {
        if let Err(e) = write_index(index, &all) {
            report
                .problems
                .push(format!("cannot write {}: {e}", index.display()));
            // Without an index, files placed now could never be removed again: place nothing.
            return;
        }
        recorded = Some(all);
    }

    let mut keep = BTreeSet::new();
    for (name, source) in &want {
        let target = dst.join(name);
        let result = match source {
            Source::Staged(src, meta) => {
                if up_to_date(meta, &target) {
                    report.unchanged.push(name.clone());
                    keep.insert(name.clone());
                    continue;
                }
                copy_staged(src, &target)
            }
            Source::Text(text) => {
                if fs::symlink_metadata(&target).is_ok_and(|m| m.file_type().is_file())
                    && fs::read(&target).is_ok_and(|b| b == text.as_bytes())
                {
                    report.unchanged.push(name.clone());
                    keep.insert(name.clone());
                    continue;
                }
                write_atomic(&target, text.as_bytes(), 0o644)
            }
        };
        match result {
            Ok(()) => {
                report.copied.push(name.clone());
                keep.insert(name.clone());
            }
            Err(e) => {
                report
                    .problems
                    .push(format!("cannot place {}: {e}", target.display()));
                // An older copy may still be there: keep it recorded so it can go later.
                if fs::symlink_metadata(&target).is_ok() && previous.contains(name) {
                    keep.insert(name.clone());
                }
            }
        }
    }
    for name in previous.difference(&want.keys().cloned().collect()) {
        let target = dst.join(name);
        if !complete {
            if fs::symlink_metadata(&target).is_ok() {
                keep.insert(name.clone());
            }
            continue;
        }
        match fs::symlink_metadata(&target) {
            Err(_) => {}
            Ok(m) if m.file_type().is_dir() => report.problems.push(format!(
                "{} is a directory now, not gatevm's file; left alone",
                target.display()
            )),
            Ok(_) => match fs::remove_file(&target) {
                Ok(()) => report.removed.push(name.clone()),
                Err(e) => {
                    report
                        .problems
                        .push(format!("cannot remove {}: {e}", target.display()));
                    keep.insert(name.clone());
                }
            },
        }
    }
    if recorded.as_ref() != Some(&keep) {
        if let Err(e) = write_index(index, &keep) {
            report
                .problems
                .push(format!("cannot write {}: {e}", index.display()));
        }
    }
}

/// Places the regular files of the staging directory `src` whose names `accept` takes into
/// `dst`, replacing same-named files, and removes from `dst` the files an earlier call placed
/// (recorded in `index`) that are no longer staged. Files in `dst` that gatevm did not place
/// (k3s's own, like its packaged `coredns.yaml`) are never touched. Symbolic links in the
/// staging directory are not followed (they are ignored), nor are subdirectories; a missing
/// staging directory stages nothing (so everything placed earlier goes), while one that cannot
/// be read fully (or is a symbolic link) removes nothing. Unchanged files (same size and time)
/// are not copied again.
pub fn sync_staged(
    src: &Path,
    dst: &Path,
    index: &Path,
    accept: fn(&str) -> bool,
    accepted: &str,
) -> SyncReport {
    let mut report = SyncReport::default();
    let mut want = BTreeMap::new();
    match fs::symlink_metadata(src) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => report
            .problems
            .push(format!("cannot read {}: {e}", src.display())),
        Ok(m) if !m.file_type().is_dir() => report.problems.push(format!(
            "{} is not a directory (symbolic links are not followed); nothing staged, \
             nothing removed",
            src.display()
        )),
        Ok(_) => match fs::read_dir(src) {
            Err(e) => report
                .problems
                .push(format!("cannot read {}: {e}", src.display())),
            Ok(rd) => {
                for entry in rd {
                    let entry = match entry {
                        Ok(e) => e,
                        Err(e) => {
                            report
                                .problems
                                .push(format!("cannot read {}: {e}", src.display()));
                            continue;
                        }
                    };
                    let raw = entry.file_name();
                    let Some(name) = raw.to_str().map(str::to_string) else {
                        report
                            .ignored
                            .push(format!("{raw:?}: the name is not UTF-8"));
                        continue;
                    };
                    let meta = match fs::symlink_metadata(entry.path()) {
                        Ok(m) => m,
                        Err(e) => {
                            report.problems.push(format!("{name}: {e}"));
                            continue;
                        }
                    };
                    let ft = meta.file_type();
                    if ft.is_symlink() {
                        report
                            .ignored
                            .push(format!("{name}: a symbolic link (not followed)"));
                    } else if !ft.is_file() {
                        report.ignored.push(format!("{name}: not a regular file"));
                    } else if !valid_name(&name) {
                        report
                            .ignored
                            .push(format!("{name:?}: not a plain visible file name"));
                    } else if !accept(&name) {
                        report.ignored.push(format!("{name}: not {accepted}"));
                    } else {
                        want.insert(name, Source::Staged(entry.path(), meta));
                    }
                }
            }
        },
    }
    // Any problem reading the staging directory: place what was read, remove nothing.
    let complete = report.problems.is_empty();
    reconcile(dst, index, want, complete, &mut report);
    report
}

/// Writes the plan's CNI configuration list into `dir` (or none), removing a list gatevm wrote
/// on an earlier boot under another name (or when flannel now provides the network), never
/// touching flannel's own `10-flannel.conflist`.
pub fn place_cni(cni: Option<&CniConflist>, dir: &Path, index: &Path) -> SyncReport {
    let mut report = SyncReport::default();
    let want = cni
        .map(|c| (c.file.clone(), Source::Text(c.json.clone())))
        .into_iter()
        .collect();
    reconcile(dir, index, want, true, &mut report);
    report
}

/// k3s's datastore with its default SQLite backend (kine) is `<data-dir>/server/db/state.db`,
/// opened in WAL mode, so next to it may be `state.db-wal` (committed transactions not yet
/// copied into the database) and `state.db-shm` (the WAL's index, shared memory between
/// connections). This returns the files that are stale at boot and safe to delete. It runs
/// before k3s starts in this boot, when nothing has the database open.
///
/// - `state.db` exists (a regular file): only `state.db-shm`. It holds no data, only an index
///   of the WAL, which the first connection rebuilds from `state.db-wal` (SQLite would also
///   discard a stale one by itself; removing it makes certain no index of a crashed run is
///   reused). `state.db-wal` is kept: deleting it loses the transactions committed since the
///   last checkpoint. A `state.db-journal` is kept too: a hot rollback journal is what undoes a
///   half-written transaction. `state.db` itself is never deleted.
/// - `state.db` does not exist (first boot, or a reset that removed only the database):
///   `state.db-wal`, `state.db-shm` and `state.db-journal`, left without their database. SQLite
///   ignores and deletes a WAL or journal whose database is missing or empty, so they hold
///   nothing; they are removed so that no leftover of an earlier datastore sits next to the new
///   one.
/// - `state.db` is something else (a directory, a symbolic link): nothing; gatevm does not
///   guess.
///
/// Never removed: `*.lock` files. SQLite's default unix VFS locks with POSIX advisory locks,
/// which die with the process (and the VM), and kine creates no lock files, so a lock file here
/// is not SQLite's or kine's. k3s's "bootstrap lock" is not a file either: it is a row of the
/// `kine` table (the key `/bootstrap/<token hash>` with an empty value, created before k3s
/// writes its encrypted bootstrap data, left behind when k3s dies in between). Removing that row
/// needs a SQLite engine, which the guest does not have; deleting every `/bootstrap/%` row, as
/// some scripts do, would also delete the populated bootstrap data. Current k3s deletes an
/// empty bootstrap key itself after five one-second waits ("Bootstrap key lock timed out -
/// deleting lock and retrying"), so gatevm leaves the row to k3s.
///
/// Only regular files are returned (never symbolic links or directories).
pub fn kine_stale_files(db_dir: &Path) -> Vec<PathBuf> {
    let db = db_dir.join("state.db");
    let candidates: &[&str] = match fs::symlink_metadata(&db) {
        Ok(m) if m.file_type().is_file() => &["state.db-shm"],
        Ok(_) => &[],
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            &["state.db-wal", "state.db-shm", "state.db-journal"]
        }
        Err(_) => &[],
    };
    candidates
        .iter()
        .map(|n| db_dir.join(n))
        .filter(|p| fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_file()))
        .collect()
}

/// Removes [`kine_stale_files`]; returns what was removed and the problems.
pub fn clean_kine(db_dir: &Path) -> (Vec<String>, Vec<String>) {
    let mut removed = Vec::new();
    let mut problems = Vec::new();
    for p in kine_stale_files(db_dir) {
        match fs::remove_file(&p) {
            Ok(()) => removed.push(p.display().to_string()),
            Err(e) => problems.push(format!("cannot remove {}: {e}", p.display())),
        }
    }
    (removed, problems)
}

/// Where [`prepare`] reads the staged files, and the kubeconfig it clears (the real paths for a
/// plan, see [`Staging::for_plan`]; tests point them into temporary directories).
#[derive(Debug, Clone)]
pub struct Staging {
    /// Staged manifests.
    pub manifests: PathBuf,
    /// Staged image archives.
    pub images: PathBuf,
    /// The kubeconfig k3s writes.
    pub kubeconfig: PathBuf,
}

impl Staging {
    /// The real paths for `plan`.
    pub fn for_plan(plan: &Plan) -> Staging {
        Staging {
            manifests: STAGED_MANIFESTS.into(),
            images: STAGED_IMAGES.into(),
            kubeconfig: plan.kubeconfig(),
        }
    }
}

/// What [`prepare`] did.
#[derive(Debug, Default, Clone)]
pub struct Prepared {
    /// Log lines.
    pub notes: Vec<String>,
    /// Problems that did not stop k3s from starting.
    pub problems: Vec<String>,
    /// Image archives in the images directory that gatevm placed (to import).
    pub images: Vec<String>,
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

/// Prepares k3s's data directory for this boot (see the module docs). Fails only when the data
/// directory cannot be created; other problems are reported and k3s starts anyway.
pub fn prepare(plan: &Plan, staging: &Staging) -> Result<Prepared, String> {
    let mut out = Prepared::default();
    mkdir_private(&plan.data_dir).map_err(|e| {
        format!(
            "cannot create the k3s data directory {}: {e}",
            plan.data_dir.display()
        )
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

    let (removed, problems) = clean_kine(&plan.db_dir());
    for r in removed {
        out.notes.push(format!("datastore: removed stale {r}"));
    }
    out.problems
        .extend(problems.into_iter().map(|p| format!("datastore: {p}")));

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

/// How a placed image archive is handed to containerd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportMethod {
    /// `ctr images import FILE` (a tar archive).
    Tar,
    /// `tool -dc FILE | ctr images import -`.
    Compressed {
        /// The decompressor (`gzip`, `zstd`, `bzip2`, `lz4`).
        tool: &'static str,
    },
    /// Not imported; why.
    Unsupported(&'static str),
}

/// The import method for an archive name, by suffix (case-insensitive), as k3s decides for the
/// containerd it embeds.
pub fn import_method(name: &str) -> ImportMethod {
    let n = name.to_ascii_lowercase();
    let has = |suffixes: &[&str]| suffixes.iter().any(|s| n.ends_with(s));
    if has(&[".tar"]) {
        ImportMethod::Tar
    } else if has(&[".tar.gz", ".tgz"]) {
        ImportMethod::Compressed { tool: "gzip" }
    } else if has(&[".tar.zst", ".tzst"]) {
        ImportMethod::Compressed { tool: "zstd" }
    } else if has(&[".tar.bz2", ".tbz"]) {
        ImportMethod::Compressed { tool: "bzip2" }
    } else if has(&[".tar.lz4"]) {
        ImportMethod::Compressed { tool: "lz4" }
    } else if has(&[".txt"]) {
        ImportMethod::Unsupported(
            "a list of images to pull; gatevm imports archives only (pull the images on the host \
             and stage them as an archive)",
        )
    } else {
        ImportMethod::Unsupported(
            "not an image archive (.tar, .tar.gz, .tgz, .tar.zst, .tzst, .tar.bz2, .tbz, .tar.lz4)",
        )
    }
}

/// Where a decompressor is looked for in the root.
fn find_tool(tool: &str) -> Option<PathBuf> {
    ["/usr/bin", "/bin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// Imports one archive into containerd's [`CRI_NAMESPACE`] namespace; the error is ctr's (or
/// the decompressor's) message.
fn import_one(path: &Path, method: &ImportMethod, reaper: &Reaper) -> Result<(), String> {
    let path_s = path.to_string_lossy().into_owned();
    let mut decompressor = None;
    let mut ctr = match method {
        ImportMethod::Tar => {
            let mut c =
                crate::container::ctr::command(CRI_NAMESPACE, &["images", "import", &path_s]);
            c.stdin(Stdio::null());
            c
        }
        ImportMethod::Compressed { tool } => {
            let prog = find_tool(tool).ok_or_else(|| {
                format!("needs {tool}, which the root filesystem lacks (stage a plain .tar)")
            })?;
            let mut d = Command::new(prog);
            d.arg("-dc")
                .arg(path)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            let d = reaper
                .spawn(&mut d)
                .map_err(|e| format!("cannot run {tool}: {e}"))?;
            let mut c = crate::container::ctr::command(CRI_NAMESPACE, &["images", "import", "-"]);
            match d.stdout {
                Some(out) => {
                    c.stdin(Stdio::from(out));
                }
                None => return Err(format!("cannot read {tool}'s output")),
            }
            decompressor = Some((tool, d.exit));
            c
        }
        ImportMethod::Unsupported(why) => return Err(why.to_string()),
    };
    ctr.stdout(Stdio::null()).stderr(Stdio::piped());
    let spawned = reaper
        .spawn(&mut ctr)
        .map_err(|e| format!("cannot run ctr: {e}"));
    // The command holds our copy of the pipe from the decompressor: drop it so that the
    // decompressor sees a closed pipe if ctr exits early.
    drop(ctr);
    let spawned = spawned?;
    let mut stderr = Vec::new();
    if let Some(mut e) = spawned.stderr {
        let _ = e.read_to_end(&mut stderr);
    }
    let status = spawned
        .exit
        .recv()
        .map_err(|_| "ctr's exit status was lost".to_string())?;
    let tool_status = decompressor.map(|(tool, rx)| (tool, rx.recv().ok()));
    if status.code != Some(0) {
        let msg = crate::container::ctr::error_line(&String::from_utf8_lossy(&stderr));
        return Err(if msg.is_empty() {
            format!("ctr images import failed ({})", describe(&status))
        } else {
            msg
        });
    }
    if let Some((tool, Some(st))) = tool_status {
        if st.code != Some(0) {
            return Err(format!("{tool} failed ({})", describe(&st)));
        }
    }
    Ok(())
}

/// Imports the archives gatevm placed in the images directory into containerd (k3s imports its
/// images directory only into the containerd it embeds). Each archive is imported at every boot,
/// as k3s does; content containerd already has is not stored twice. Returns one log line per
/// archive.
pub fn import_images(dir: &Path, names: &[String], reaper: &Reaper) -> Vec<String> {
    let mut lines = Vec::new();
    for name in names {
        let method = import_method(name);
        let t = Instant::now();
        match import_one(&dir.join(name), &method, reaper) {
            Ok(()) => lines.push(format!(
                "imported {name} into {CRI_NAMESPACE} in {}ms",
                t.elapsed().as_millis()
            )),
            Err(e) => lines.push(format!("not imported {name}: {e}")),
        }
    }
    lines
}

/// containerd in the k3s profile: as in the containerd profile, plus `--config`
/// [`CONTAINERD_CONFIG`].
pub fn containerd_payload_config() -> PayloadConfig {
    let mut c = PayloadConfig::containerd();
    c.args = vec!["--config".into(), CONTAINERD_CONFIG.into()];
    c
}

/// k3s as gatevm runs it: `k3s server <plan args>`, ready when its kubeconfig exists and its
/// API port accepts TCP connections on 127.0.0.1, log in [`LOG`], restarts and rotation as for
/// containerd. Without a plan (k3s cannot run), just `k3s server` on the default port.
pub fn k3s_payload_config(plan: Option<&Plan>) -> PayloadConfig {
    let mut args = vec!["server".to_string()];
    let (port, kubeconfig) = match plan {
        Some(p) => {
            args.extend(p.args.iter().cloned());
            (p.api_port(), p.kubeconfig())
        }
        None => (DEFAULT_API_PORT, PathBuf::from(KUBECONFIG)),
    };
    let base = PayloadConfig::containerd();
    PayloadConfig {
        name: "k3s".into(),
        program: K3S_BIN.into(),
        args,
        readiness: Readiness::TcpAndFile(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), kubeconfig),
        log: LOG.into(),
        // k3s takes seconds to start: probe less often than containerd.
        probe_interval: Duration::from_millis(250),
        ..base
    }
}

/// The two payloads of the k3s profile and what starting k3s needs.
pub struct Profile {
    /// containerd (started first).
    pub containerd: Arc<Payload>,
    /// k3s (started once containerd is ready).
    pub k3s: Arc<Payload>,
    /// The plan, while k3s can still run.
    plan: Option<Plan>,
    /// Archives to import before k3s starts.
    images: Vec<String>,
}

impl Profile {
    /// Reads the plan and writes containerd's configuration (before the state disk: the plan
    /// is in the root, the configuration in `/run`). A missing or bad plan, a configuration
    /// that cannot be written, or a missing k3s binary mark k3s `Failed` right away; containerd
    /// then runs without `--config` when it has no configuration.
    pub fn load() -> Profile {
        let plan = match load_plan(Path::new(PLAN_PATH)) {
            Ok(p) => p,
            Err(e) => return Self::without_k3s(PayloadConfig::containerd(), None, &e.to_string()),
        };
        for n in &plan.notes {
            crate::glog!("k3s: {n}");
        }
        if let Err(e) = write_containerd_config(&plan, Path::new(CONTAINERD_CONFIG)) {
            let msg = format!("cannot write containerd's configuration {CONTAINERD_CONFIG}: {e}");
            return Self::without_k3s(PayloadConfig::containerd(), Some(&plan), &msg);
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
        }
    }

    /// Both payloads in start order.
    pub fn payloads(&self) -> Vec<Arc<Payload>> {
        vec![self.containerd.clone(), self.k3s.clone()]
    }

    /// Prepares the data directory once the state disk is mounted (see [`prepare`]); a failure
    /// marks k3s `Failed`.
    pub fn prepare(&mut self) {
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
            }
            Err(e) => {
                self.k3s.fail(&e);
                self.plan = None;
            }
        }
    }

    /// Starts containerd's supervisor and a thread that waits for containerd to be ready,
    /// imports the images and starts k3s's supervisor.
    pub fn start(&self, reaper: &'static Reaper) {
        if let Err(e) = self.containerd.start(reaper) {
            crate::glog!("cannot start the containerd supervisor: {e}");
        }
        let Some(plan) = &self.plan else { return };
        let containerd = self.containerd.clone();
        let k3s = self.k3s.clone();
        let images_dir = plan.images_dir();
        let images = self.images.clone();
        let spawned = std::thread::Builder::new()
            .name("k3s-start".into())
            .spawn(move || launch(&containerd, &k3s, &images_dir, &images, reaper));
        if let Err(e) = spawned {
            self.k3s.fail(&format!("cannot start a thread: {e}"));
        }
    }
}

/// Waits for containerd, imports the images, starts k3s (unless a shutdown began).
fn launch(
    containerd: &Payload,
    k3s: &Arc<Payload>,
    images_dir: &Path,
    images: &[String],
    reaper: &'static Reaper,
) {
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
    for line in import_images(images_dir, images, reaper) {
        crate::glog!("k3s: {line}");
    }
    if crate::shutdown::in_progress() {
        return;
    }
    if let Err(e) = k3s.start(reaper) {
        k3s.fail(&format!("cannot start the k3s supervisor: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const FULL: &str = r#"{
        "args": ["--write-kubeconfig-mode=0600", "--data-dir=/var/lib/gatevm/k3s",
                 "--https-listen-port=6443",
                 "--container-runtime-endpoint=unix:///run/containerd/containerd.sock"],
        "data_dir": "/var/lib/gatevm/k3s",
        "cni": {"file": "10-gatevm-bridge.conflist", "json": "{\"cniVersion\":\"1.0.0\"}"},
        "notes": ["ignored by the guest"]
    }"#;

    fn plan_for(data_dir: &Path, extra: &[&str]) -> Plan {
        let mut args = vec![
            format!("--data-dir={}", data_dir.display()),
            "--container-runtime-endpoint=unix:///run/containerd/containerd.sock".to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let v = json!({ "args": args, "data_dir": data_dir, "cni": null });
        parse_plan(&v.to_string()).unwrap()
    }

    fn err(text: &str) -> String {
        parse_plan(text).unwrap_err().to_string()
    }

    fn write(p: &Path, text: &str) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn plan_parses() {
        let p = parse_plan(FULL).unwrap();
        assert_eq!(p.data_dir, PathBuf::from("/var/lib/gatevm/k3s"));
        assert_eq!(p.args.len(), 4);
        assert_eq!(p.args[1], "--data-dir=/var/lib/gatevm/k3s");
        assert_eq!(
            p.cni,
            Some(CniConflist {
                file: "10-gatevm-bridge.conflist".into(),
                json: "{\"cniVersion\":\"1.0.0\"}".into()
            })
        );
        assert!(p.notes.is_empty(), "{:?}", p.notes);
        assert_eq!(p.api_port(), 6443);
        assert_eq!(p.kubeconfig(), PathBuf::from(KUBECONFIG));
        assert_eq!(p.pause_image(), DEFAULT_PAUSE_IMAGE);
        assert_eq!(
            p.manifests_dir(),
            PathBuf::from("/var/lib/gatevm/k3s/server/manifests")
        );
        assert_eq!(
            p.images_dir(),
            PathBuf::from("/var/lib/gatevm/k3s/agent/images")
        );
        assert_eq!(
            p.cni_conf_dir(),
            PathBuf::from("/var/lib/gatevm/k3s/agent/etc/cni/net.d")
        );
        assert_eq!(
            p.cni_bin_dir(),
            PathBuf::from("/var/lib/gatevm/k3s/data/current/bin")
        );
        assert_eq!(p.db_dir(), PathBuf::from("/var/lib/gatevm/k3s/server/db"));

        // cni null or absent; data_dir normalized; other --data-dir spellings accepted.
        for (cni, dd, arg) in [
            (
                "\"cni\": null,",
                "/var/lib/gatevm/k3s/",
                "\"--data-dir\", \"/var/lib/gatevm/k3s\"",
            ),
            ("", "//var/lib/gatevm/./k3s", "\"-d=/var/lib/gatevm/k3s/\""),
            ("", "/var/lib/gatevm/k3s", "\"-d\", \"/var/lib/gatevm/k3s\""),
        ] {
            let text = format!(
                "{{{cni} \"args\": [{arg}, \"--container-runtime-endpoint=x\"], \
                 \"data_dir\": \"{dd}\"}}"
            );
            let p = parse_plan(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(p.cni, None);
            assert_eq!(p.data_dir, PathBuf::from("/var/lib/gatevm/k3s"));
            assert!(p.notes.is_empty(), "{:?}", p.notes);
        }
    }

    #[test]
    fn plan_adds_a_missing_data_dir_and_notes_doubtful_settings() {
        let p = parse_plan(r#"{"args": ["--node-name=gw"], "data_dir": "/srv/k3s"}"#).unwrap();
        assert_eq!(p.args, vec!["--node-name=gw", "--data-dir=/srv/k3s"]);
        let notes = p.notes.join("\n");
        assert!(notes.contains("added --data-dir=/srv/k3s"), "{notes}");
        assert!(notes.contains("--container-runtime-endpoint"), "{notes}");
        assert!(notes.contains("not under /var/lib/gatevm"), "{notes}");
    }

    #[test]
    fn plan_errors_are_clear() {
        assert!(err("{").starts_with("k3s plan.json is not valid JSON: "));
        assert!(err("").contains("not valid JSON"));
        assert_eq!(err("[]"), "k3s plan.json: expected a JSON object");
        assert!(err(r#"{"data_dir": "/x"}"#).contains("missing \"args\""));
        assert!(err(r#"{"args": []}"#).contains("missing \"data_dir\""));
        assert!(err(r#"{"args": "--x", "data_dir": "/x"}"#)
            .contains("\"args\" must be an array of strings"));
        assert!(
            err(r#"{"args": ["a", 1], "data_dir": "/x"}"#).contains("\"args\"[1] is not a string")
        );
        assert!(err(r#"{"args": ["a\u0000"], "data_dir": "/x"}"#).contains("NUL"));
        assert!(err(r#"{"args": [], "data_dir": 5}"#).contains("\"data_dir\" must be a string"));
        assert!(err(r#"{"args": [], "data_dir": "var/lib"}"#).contains("not an absolute path"));
        assert!(err(r#"{"args": [], "data_dir": "/var/../etc"}"#).contains(".."));
        assert!(err(r#"{"args": [], "data_dir": "/"}"#).contains("is \"/\""));
        assert!(err(r#"{"args": [], "data_dir": "/a\nb"}"#).contains("control"));
        assert!(err(r#"{"args": ["--data-dir=/other"], "data_dir": "/x"}"#)
            .contains("pass --data-dir \"/other\" but \"data_dir\" is \"/x\""));
        assert!(err(r#"{"args": [], "data_dir": "/x", "cni": "bridge"}"#)
            .contains("\"cni\" must be null or an object"));
        assert!(
            err(r#"{"args": [], "data_dir": "/x", "cni": {"json": "{}"}}"#)
                .contains("missing \"cni\".\"file\"")
        );
        assert!(
            err(r#"{"args": [], "data_dir": "/x", "cni": {"file": "a.conflist"}}"#)
                .contains("missing \"cni\".\"json\"")
        );
        assert!(
            err(r#"{"args": [], "data_dir": "/x", "cni": {"file": 1, "json": "{}"}}"#)
                .contains("\"cni\".\"file\" must be a string")
        );
        for bad in [
            "../10.conflist",
            "a/b.conflist",
            ".hidden.conflist",
            "10-bridge.txt",
            "",
        ] {
            let text = json!({"args": [], "data_dir": "/x", "cni": {"file": bad, "json": "{}"}});
            assert!(
                err(&text.to_string()).contains("not a plain .conflist"),
                "{bad}"
            );
        }
        assert!(err(
            r#"{"args": [], "data_dir": "/x", "cni": {"file": "a.conflist", "json": "{"}}"#
        )
        .contains("\"cni\".\"json\" is not valid JSON"));
    }

    #[test]
    fn plan_file_missing_large_and_good() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("plan.json");
        let e = load_plan(&path).unwrap_err();
        assert_eq!(e, PlanError::Missing(path.clone()));
        assert!(e.to_string().contains("did not write the k3s plan"));
        fs::write(&path, vec![b' '; PLAN_MAX as usize + 1]).unwrap();
        assert!(matches!(load_plan(&path), Err(PlanError::TooLarge(_, _))));
        fs::write(&path, FULL).unwrap();
        assert_eq!(load_plan(&path).unwrap(), parse_plan(FULL).unwrap());
        let e = load_plan(d.path()).unwrap_err();
        assert!(matches!(e, PlanError::Read(_, _)), "{e:?}");
    }

    #[test]
    fn flags() {
        let strs = [
            "--https-listen-port=7443",
            "--pause-image",
            "registry.local/pause:3.9",
            "-o",
            "/tmp/kc.yaml",
            "--https-listen-portx=1",
            "--data-dir",
        ];
        let a: Vec<String> = strs.iter().map(|s| s.to_string()).collect();
        assert_eq!(flag_value(&a, "--https-listen-port", None), Some("7443"));
        assert_eq!(
            flag_value(&a, "--pause-image", None),
            Some("registry.local/pause:3.9")
        );
        assert_eq!(
            flag_value(&a, "--write-kubeconfig", Some("-o")),
            Some("/tmp/kc.yaml")
        );
        // A flag without its value at the end has none.
        assert_eq!(flag_value(&a, "--data-dir", Some("-d")), None);
        assert_eq!(flag_value(&a, "--node-name", None), None);
        let later: Vec<String> = vec!["--node-name=a".into(), "--node-name=b".into()];
        assert_eq!(flag_value(&later, "--node-name", None), Some("b"));

        let p = plan_for(Path::new("/var/lib/gatevm/k3s"), &strs[..5]);
        assert_eq!(p.api_port(), 7443);
        assert_eq!(p.pause_image(), "registry.local/pause:3.9");
        assert_eq!(p.kubeconfig(), PathBuf::from("/tmp/kc.yaml"));
        let p = plan_for(Path::new("/var/lib/gatevm/k3s"), &["--https-listen-port=x"]);
        assert_eq!(p.api_port(), DEFAULT_API_PORT);
    }

    #[test]
    fn containerd_config_text() {
        let p = parse_plan(FULL).unwrap();
        let text = containerd_config(&p);
        let expected = "version = 2\n\
            root = \"/var/lib/containerd\"\n\
            state = \"/run/containerd\"\n\
            disabled_plugins = [\"io.containerd.snapshotter.v1.aufs\", \
            \"io.containerd.snapshotter.v1.btrfs\", \"io.containerd.snapshotter.v1.zfs\", \
            \"io.containerd.snapshotter.v1.devmapper\", \
            \"io.containerd.snapshotter.v1.blockfile\"]\n\
            \n\
            [grpc]\n\
            \x20 address = \"/run/containerd/containerd.sock\"\n\
            \n\
            [plugins.\"io.containerd.grpc.v1.cri\"]\n\
            \x20 sandbox_image = \"docker.io/rancher/mirrored-pause:3.6\"\n\
            \n\
            [plugins.\"io.containerd.grpc.v1.cri\".cni]\n\
            \x20 bin_dir = \"/var/lib/gatevm/k3s/data/current/bin\"\n\
            \x20 conf_dir = \"/var/lib/gatevm/k3s/agent/etc/cni/net.d\"\n\
            \n\
            [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n\
            \x20 runtime_type = \"io.containerd.runc.v2\"\n\
            \x20 sandbox_mode = \"podsandbox\"\n\
            \n\
            [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]\n\
            \x20 SystemdCgroup = false\n";
        assert!(text.ends_with(expected), "{text}");
        // Only comments before the settings.
        let head = &text[..text.len() - expected.len()];
        assert!(head.lines().all(|l| l.starts_with("# ")), "{head}");
        // Each table appears once.
        let tables: Vec<&str> = text.lines().filter(|l| l.starts_with('[')).collect();
        let unique: BTreeSet<&&str> = tables.iter().collect();
        assert_eq!(tables.len(), unique.len());

        // Strings are escaped.
        let p = plan_for(Path::new("/srv/a\"b\\c"), &["--pause-image=reg/p\"x:1"]);
        let text = containerd_config(&p);
        assert!(
            text.contains("bin_dir = \"/srv/a\\\"b\\\\c/data/current/bin\""),
            "{text}"
        );
        assert!(text.contains("sandbox_image = \"reg/p\\\"x:1\""), "{text}");
        assert_eq!(toml_string("a\u{7f}\tb"), "\"a\\u007F\\u0009b\"");

        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("run/gatevm/containerd-k3s.toml");
        write_containerd_config(&p, &path).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), text);
        assert_eq!(names(path.parent().unwrap()), vec!["containerd-k3s.toml"]);
    }

    fn manifests(src: &Path, dst: &Path, index: &Path) -> SyncReport {
        sync_staged(
            src,
            dst,
            index,
            is_manifest_name,
            "a .yaml, .yml or .json file",
        )
    }

    #[test]
    fn sync_copies_replaces_and_removes_only_what_it_placed() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("staged");
        let dst = d.path().join("k3s/server/manifests");
        let index = d.path().join("k3s/.gatevm/manifests.json");
        write(&src.join("app.yaml"), "app: 1\n");
        write(&src.join("tls.json"), "{}");
        write(&src.join("coredns.yaml"), "mine\n");
        // k3s's own files.
        write(&dst.join("coredns.yaml"), "k3s's\n");
        write(&dst.join("local-storage.yaml"), "k3s's\n");

        let r = manifests(&src, &dst, &index);
        assert_eq!(r.copied, vec!["app.yaml", "coredns.yaml", "tls.json"]);
        assert!(r.removed.is_empty() && r.problems.is_empty(), "{r:?}");
        assert_eq!(
            fs::read_to_string(dst.join("coredns.yaml")).unwrap(),
            "mine\n"
        );
        assert_eq!(
            fs::read_to_string(dst.join("app.yaml")).unwrap(),
            "app: 1\n"
        );

        // Nothing changed: nothing copied.
        let r = manifests(&src, &dst, &index);
        assert_eq!(r.unchanged, vec!["app.yaml", "coredns.yaml", "tls.json"]);
        assert!(r.copied.is_empty());

        // A changed file is copied again (different size, then same size but another time).
        write(&src.join("app.yaml"), "app: 22\n");
        let r = manifests(&src, &dst, &index);
        assert_eq!(r.copied, vec!["app.yaml"]);
        write(&src.join("app.yaml"), "app: 33\n");
        let f = File::options()
            .write(true)
            .open(src.join("app.yaml"))
            .unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000))
            .unwrap();
        let r = manifests(&src, &dst, &index);
        assert_eq!(r.copied, vec!["app.yaml"]);
        assert_eq!(
            fs::read_to_string(dst.join("app.yaml")).unwrap(),
            "app: 33\n"
        );

        // Unstaged files gatevm placed go; k3s's own stay.
        fs::remove_file(src.join("tls.json")).unwrap();
        fs::remove_file(src.join("coredns.yaml")).unwrap();
        let r = manifests(&src, &dst, &index);
        assert_eq!(r.removed, vec!["coredns.yaml", "tls.json"]);
        assert_eq!(names(&dst), vec!["app.yaml", "local-storage.yaml"]);

        // No staging directory at all: everything gatevm placed goes.
        fs::remove_dir_all(&src).unwrap();
        let r = manifests(&src, &dst, &index);
        assert_eq!(r.removed, vec!["app.yaml"]);
        assert!(r.problems.is_empty(), "{r:?}");
        assert_eq!(names(&dst), vec!["local-storage.yaml"]);
        let idx: Value = serde_json::from_str(&fs::read_to_string(&index).unwrap()).unwrap();
        assert_eq!(idx["files"], json!([]));
    }

    #[test]
    fn sync_does_not_follow_symlinks_or_take_other_entries() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("staged");
        let dst = d.path().join("dst");
        let index = d.path().join("idx/manifests.json");
        let outside = d.path().join("secret.yaml");
        write(&outside, "secret\n");
        write(&src.join("ok.yml"), "ok\n");
        write(&src.join("notes.txt"), "x");
        write(&src.join(".hidden.yaml"), "x");
        fs::create_dir_all(src.join("dir.yaml")).unwrap();
        symlink(&outside, src.join("link.yaml")).unwrap();
        symlink(d.path(), src.join("dirlink.yaml")).unwrap();

        let r = manifests(&src, &dst, &index);
        assert_eq!(r.copied, vec!["ok.yml"]);
        assert_eq!(names(&dst), vec!["ok.yml"]);
        let ignored = r.ignored.join("\n");
        for n in [
            "notes.txt",
            ".hidden.yaml",
            "dir.yaml",
            "link.yaml",
            "dirlink.yaml",
        ] {
            assert!(ignored.contains(n), "{n} not reported: {ignored}");
        }
        assert!(ignored.contains("link.yaml: a symbolic link (not followed)"));

        // A staging directory that is itself a symbolic link stages nothing.
        let real = d.path().join("real");
        write(&real.join("x.yaml"), "x");
        let linked = d.path().join("linked");
        symlink(&real, &linked).unwrap();
        let r = manifests(&linked, &dst, &index);
        assert!(r.copied.is_empty());
        assert!(r.problems[0].contains("not a directory"), "{r:?}");
        // Nor does it count as "nothing staged": what gatevm placed stays.
        assert!(r.removed.is_empty(), "{r:?}");
        assert_eq!(names(&dst), vec!["ok.yml"]);
        // The record is kept: once the directory is readable and empty, the file goes.
        fs::remove_dir_all(&src).unwrap();
        fs::create_dir(&src).unwrap();
        assert_eq!(manifests(&src, &dst, &index).removed, vec!["ok.yml"]);
    }

    #[test]
    fn sync_keeps_a_damaged_index_from_deleting_anything() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("staged");
        let dst = d.path().join("dst");
        let index = d.path().join("idx.json");
        fs::create_dir_all(&src).unwrap();
        write(&dst.join("keep.yaml"), "k3s's\n");
        write(&d.path().join("outside.yaml"), "x");
        // Names that are not plain file names are never acted on.
        write(
            &index,
            r#"{"version":1,"files":["../outside.yaml","/etc/passwd",".x","keep/..","a\nb"]}"#,
        );
        let r = manifests(&src, &dst, &index);
        assert!(r.removed.is_empty(), "{r:?}");
        assert!(d.path().join("outside.yaml").exists());
        assert!(dst.join("keep.yaml").exists());

        write(&index, "not json");
        let r = manifests(&src, &dst, &index);
        assert!(r.problems[0].contains("damaged"), "{r:?}");
        assert!(dst.join("keep.yaml").exists());
        // The index is rewritten, so the next run is clean.
        let r = manifests(&src, &dst, &index);
        assert!(r.problems.is_empty(), "{r:?}");
    }

    #[test]
    fn sync_reports_a_directory_in_the_way_and_cleans_temporaries() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("staged");
        let dst = d.path().join("dst");
        let index = d.path().join("idx.json");
        write(&src.join("a.yaml"), "a");
        write(&src.join("b.yaml"), "b");
        fs::create_dir_all(dst.join("a.yaml/sub")).unwrap();
        write(&dst.join(".b.yaml.gatevm-tmp"), "half");
        let r = manifests(&src, &dst, &index);
        assert_eq!(r.copied, vec!["b.yaml"]);
        assert_eq!(r.problems.len(), 1, "{r:?}");
        assert!(r.problems[0].contains("a.yaml"));
        assert_eq!(names(&dst), vec!["a.yaml", "b.yaml"]);
        // Unstaged later: the directory is not gatevm's file and stays.
        fs::remove_file(src.join("a.yaml")).unwrap();
        let r = manifests(&src, &dst, &index);
        assert!(dst.join("a.yaml/sub").is_dir());
        assert!(r.removed.is_empty(), "{r:?}");
    }

    #[test]
    fn images_sync_takes_any_name() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("images");
        let dst = d.path().join("agent/images");
        let index = d.path().join("images.json");
        write(&src.join("k3s-airgap-images-amd64.tar.zst"), "zst");
        write(&src.join("app.tar"), "tar");
        write(&src.join("list.txt"), "img");
        let r = sync_staged(&src, &dst, &index, |_| true, "a regular file");
        assert_eq!(
            r.placed(),
            vec!["app.tar", "k3s-airgap-images-amd64.tar.zst", "list.txt"]
        );
        assert_eq!(
            r.summary(),
            "3 copied, 0 unchanged, 0 removed, 0 ignored, 0 problems"
        );
    }

    #[test]
    fn cni_conflist_is_placed_and_replaced() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("net.d");
        let index = d.path().join("cni.json");
        let a = CniConflist {
            file: "10-gatevm-bridge.conflist".into(),
            json: "{\"a\":1}".into(),
        };
        let r = place_cni(Some(&a), &dir, &index);
        assert_eq!(r.copied, vec!["10-gatevm-bridge.conflist"]);
        assert_eq!(
            fs::read_to_string(dir.join("10-gatevm-bridge.conflist")).unwrap(),
            "{\"a\":1}"
        );
        assert_eq!(place_cni(Some(&a), &dir, &index).unchanged.len(), 1);
        let b = CniConflist {
            file: "20-other.conflist".into(),
            json: "{}".into(),
        };
        let r = place_cni(Some(&b), &dir, &index);
        assert_eq!(r.removed, vec!["10-gatevm-bridge.conflist"]);
        // Flannel's own file (k3s wrote it) is never touched.
        write(&dir.join("10-flannel.conflist"), "flannel");
        let r = place_cni(None, &dir, &index);
        assert_eq!(r.removed, vec!["20-other.conflist"]);
        assert_eq!(names(&dir), vec!["10-flannel.conflist"]);
    }

    #[test]
    fn kine_cleanup_decision() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("server/db");
        fs::create_dir_all(&db).unwrap();
        for n in [
            "state.db-wal",
            "state.db-shm",
            "state.db-journal",
            "state.db.lock",
        ] {
            write(&db.join(n), "x");
        }
        // No database: its companions are orphans, and only they go.
        let stale = kine_stale_files(&db);
        assert_eq!(
            stale,
            vec![
                db.join("state.db-wal"),
                db.join("state.db-shm"),
                db.join("state.db-journal")
            ]
        );

        // With the database: only the shared-memory index; never the database or its WAL.
        write(&db.join("state.db"), "SQLite format 3\0");
        assert_eq!(kine_stale_files(&db), vec![db.join("state.db-shm")]);
        let (removed, problems) = clean_kine(&db);
        assert_eq!(removed, vec![db.join("state.db-shm").display().to_string()]);
        assert!(problems.is_empty());
        assert_eq!(
            names(&db),
            vec![
                "state.db",
                "state.db-journal",
                "state.db-wal",
                "state.db.lock"
            ]
        );
        assert!(kine_stale_files(&db).is_empty());

        // A symbolic link in place of a companion is not removed.
        symlink(d.path(), db.join("state.db-shm")).unwrap();
        assert!(kine_stale_files(&db).is_empty());

        // Something odd in place of the database: no guessing.
        let odd = d.path().join("odd");
        fs::create_dir_all(odd.join("state.db")).unwrap();
        write(&odd.join("state.db-wal"), "x");
        assert!(kine_stale_files(&odd).is_empty());
        // No directory at all (first boot).
        assert!(kine_stale_files(&d.path().join("none")).is_empty());
    }

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
        write(&data.join("server/db/state.db"), "db");
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
        let e = prepare(&bad, &staging).unwrap_err();
        assert!(e.contains("cannot create the k3s data directory"), "{e}");
    }

    #[test]
    fn import_methods() {
        assert_eq!(import_method("a.tar"), ImportMethod::Tar);
        assert_eq!(import_method("A.TAR"), ImportMethod::Tar);
        for (n, tool) in [
            ("a.tar.gz", "gzip"),
            ("a.tgz", "gzip"),
            ("k3s-airgap-images-amd64.tar.zst", "zstd"),
            ("a.tzst", "zstd"),
            ("a.tar.bz2", "bzip2"),
            ("a.tbz", "bzip2"),
            ("a.tar.lz4", "lz4"),
        ] {
            assert_eq!(import_method(n), ImportMethod::Compressed { tool }, "{n}");
        }
        assert!(matches!(import_method("images.txt"),
                ImportMethod::Unsupported(w) if w.contains("pull")));
        assert!(matches!(
            import_method("a.zip"),
            ImportMethod::Unsupported(_)
        ));
        // Unsupported names are reported, not run.
        let lines = import_images(
            Path::new("/nonexistent"),
            &["a.zip".to_string()],
            Reaper::global(),
        );
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].starts_with("not imported a.zip: not an image archive"),
            "{lines:?}"
        );
    }

    #[test]
    fn payload_configs() {
        let p = plan_for(
            Path::new("/var/lib/gatevm/k3s"),
            &["--https-listen-port=7443"],
        );
        let c = k3s_payload_config(Some(&p));
        assert_eq!(c.name, "k3s");
        assert_eq!(c.program, PathBuf::from("/usr/local/bin/k3s"));
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
        let base = PayloadConfig::containerd();
        assert_eq!(c.log_max, base.log_max);
        assert_eq!(c.backoff_initial, base.backoff_initial);
        assert_eq!(c.backoff_max, base.backoff_max);
        assert_eq!(c.stop_timeout, crate::shutdown::PAYLOAD_STOP_TIMEOUT);

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
        assert!(PayloadConfig::containerd().args.is_empty());
    }

    #[test]
    fn names_are_checked() {
        for ok in [
            "a.yaml",
            "10-gatevm-bridge.conflist",
            "k3s airgap.tar",
            "ü.yml",
        ] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", ".x", "a/b", "a\nb", &"a".repeat(256)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(
            is_manifest_name("a.yaml") && is_manifest_name("a.yml") && is_manifest_name("a.json")
        );
        assert!(!is_manifest_name("a.yaml.skip") && !is_manifest_name("a.YAML"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        #[test]
        fn any_plan_text_is_parsed_or_rejected(text in "\\PC{0,200}") {
            let _ = parse_plan(&text);
        }

        #[test]
        fn accepted_plans_are_usable(
            args in proptest::collection::vec("[-a-z=/.0-9 ]{0,20}", 0..6),
            dir in "/[a-z./]{1,20}",
            file in "[a-z0-9.-]{0,12}",
        ) {
            let v = json!({"args": args, "data_dir": dir, "cni": {"file": file, "json": "{}"}});
            if let Ok(p) = parse_plan(&v.to_string()) {
                // The data directory is absolute, not "/", and k3s is told to use it.
                proptest::prop_assert!(p.data_dir.is_absolute() && p.data_dir != Path::new("/"));
                proptest::prop_assert!(!p.data_dir.components().any(|c| c == Component::ParentDir));
                let named = flag_value(&p.args, "--data-dir", Some("-d")).map(PathBuf::from);
                let named = named.and_then(|d| check_data_dir(&d.to_string_lossy()).ok());
                proptest::prop_assert_eq!(named, Some(p.data_dir.clone()));
                // The CNI file stays a plain name inside the directory.
                let _ = containerd_config(&p);
                let conf_dir = p.cni_conf_dir();
                let c = p.cni.clone().unwrap();
                proptest::prop_assert!(valid_name(&c.file));
                let placed = conf_dir.join(&c.file);
                proptest::prop_assert_eq!(placed.parent(), Some(conf_dir.as_path()));
            }
        }
    }
}
