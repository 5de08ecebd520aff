//! The k3s plan: what the host stages at [`K3S_PLAN`] for the guest's k3s profile, as JSON:
//! `{"args": [...], "data_dir": "...", "cni": null | {"file", "json"}, "notes": [...]}` (`args`
//! is everything after `k3s server`). The host writes a [`PlanFile`]; the guest reads it with
//! [`parse`], which checks every field (the root is writable by the guest, so the file may be
//! anything) and normalizes the data directory. Unknown fields are ignored, so host and guest of
//! neighbouring versions still understand each other.

#[cfg(doc)]
use crate::paths::K3S_PLAN;
use crate::paths::{K3S_KUBECONFIG, STATE_DIR};
use serde::Serialize;
use serde_json::Value;
use std::fmt;
use std::path::{Component, Path, PathBuf};

/// k3s's API port unless the plan passes `--https-listen-port`.
pub const DEFAULT_API_PORT: u16 = 6443;
/// containerd's pod sandbox image unless the plan passes `--pause-image`: k3s's own default
/// (what it gives the containerd it embeds), which k3s's airgap image archives contain.
/// containerd's built-in default (`registry.k8s.io/pause:…`) is in no k3s archive, so without
/// this an offline VM could start no pod.
pub const DEFAULT_PAUSE_IMAGE: &str = "docker.io/rancher/mirrored-pause:3.6";
/// Largest plan accepted.
pub const PLAN_MAX: u64 = 1024 * 1024;

/// The plan as the host writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlanFile {
    /// Arguments after `k3s server`.
    pub args: Vec<String>,
    /// k3s's data directory (the guest adds `--data-dir` to `args` when they name none).
    pub data_dir: String,
    /// CNI configuration list to write, when flannel is off.
    pub cni: Option<CniConflist>,
    /// Why the plan is as it is (logged by the guest; not read back).
    pub notes: Vec<String>,
    /// The staged image archives with their digests, so the guest imports each archive once.
    pub images: Vec<StagedImage>,
    /// `k3s server` or `k3s agent`.
    pub role: Role,
}

/// What k3s runs as.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// `k3s server` (the control plane, and a node).
    #[default]
    Server,
    /// `k3s agent`: a node joining a server.
    Agent,
}

impl Role {
    /// The k3s subcommand.
    pub fn subcommand(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Agent => "agent",
        }
    }
}

/// One staged image archive: its file name in the staged images directory and the SHA-256 of
/// its contents (lowercase hex), computed by the host while staging it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StagedImage {
    /// File name (a plain name, [`valid_name`]).
    pub file: String,
    /// SHA-256 of the archive, 64 lowercase hex digits.
    pub sha256: String,
}

/// At most this many staged image archives in a plan.
pub const STAGED_IMAGES_MAX: usize = 256;

impl PlanFile {
    /// The JSON text the guest reads.
    pub fn to_json(&self) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec_pretty(self)
    }
}

/// A CNI network configuration to place in k3s's CNI configuration directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CniConflist {
    /// File name, e.g. `10-gatevm-bridge.conflist`.
    pub file: String,
    /// Its JSON text.
    pub json: String,
}

/// The host's plan for k3s ([`K3S_PLAN`]) as the guest takes it: validated and normalized.
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
    /// The staged image archives' digests (empty from a host that sends none: every archive is
    /// then imported at every boot).
    pub images: Vec<StagedImage>,
    /// `k3s server` (absent from older hosts) or `k3s agent`.
    pub role: Role,
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
pub fn check_data_dir(s: &str) -> Result<PathBuf, PlanError> {
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
pub fn parse(text: &str) -> Result<Plan, PlanError> {
    let v: Value = serde_json::from_str(text).map_err(|e| PlanError::Json(e.to_string()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| invalid("expected a JSON object"))?;
    let mut args = parse_args(obj.get("args"))?;
    let data_dir = match obj.get("data_dir") {
        None => return Err(invalid("missing \"data_dir\" (k3s's --data-dir)")),
        Some(Value::String(s)) => check_data_dir(s)?,
        Some(_) => return Err(invalid("\"data_dir\" must be a string")),
    };
    let cni = parse_cni(obj.get("cni"))?;
    let images = parse_images(obj.get("images"))?;
    let role = match obj.get("role") {
        None | Some(Value::Null) => Role::Server,
        Some(Value::String(r)) if r == "server" => Role::Server,
        Some(Value::String(r)) if r == "agent" => Role::Agent,
        Some(_) => return Err(invalid("\"role\" must be \"server\" or \"agent\"")),
    };
    let notes = settle_args(&mut args, &data_dir)?;
    Ok(Plan {
        args,
        data_dir,
        cni,
        notes,
        images,
        role,
    })
}

/// `"images"`: absent, or an array of at most [`STAGED_IMAGES_MAX`] `{"file", "sha256"}`, each
/// file a plain name named once, each digest 64 lowercase hex digits.
fn parse_images(v: Option<&Value>) -> Result<Vec<StagedImage>, PlanError> {
    let a = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(invalid("\"images\" must be an array")),
    };
    if a.len() > STAGED_IMAGES_MAX {
        return Err(invalid(format!(
            "\"images\" has {} entries, at most {STAGED_IMAGES_MAX}",
            a.len()
        )));
    }
    let mut out: Vec<StagedImage> = Vec::with_capacity(a.len());
    for (i, x) in a.iter().enumerate() {
        let field = |k: &str| x.get(k).and_then(Value::as_str);
        let (Some(file), Some(sha256)) = (field("file"), field("sha256")) else {
            return Err(invalid(format!(
                "\"images\"[{i}] must be {{\"file\": NAME, \"sha256\": HEX}}"
            )));
        };
        if !valid_name(file) {
            return Err(invalid(format!(
                "\"images\"[{i}].\"file\" {file:?} is not a plain file name"
            )));
        }
        if sha256.len() != 64
            || !sha256
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(invalid(format!(
                "\"images\"[{i}].\"sha256\" is not 64 lowercase hex digits"
            )));
        }
        if out.iter().any(|o| o.file == file) {
            return Err(invalid(format!("\"images\" names {file:?} twice")));
        }
        out.push(StagedImage {
            file: file.to_string(),
            sha256: sha256.to_string(),
        });
    }
    Ok(out)
}

/// `"args"`: an array of strings without NUL bytes.
fn parse_args(v: Option<&Value>) -> Result<Vec<String>, PlanError> {
    let a = match v {
        None => {
            return Err(invalid(
                "missing \"args\" (the arguments after `k3s server`)",
            ))
        }
        Some(Value::Array(a)) => a,
        Some(_) => return Err(invalid("\"args\" must be an array of strings")),
    };
    let mut args = Vec::with_capacity(a.len());
    for (i, x) in a.iter().enumerate() {
        match x.as_str() {
            Some(s) if !s.contains('\0') => args.push(s.to_string()),
            Some(_) => return Err(invalid(format!("\"args\"[{i}] contains a NUL byte"))),
            None => return Err(invalid(format!("\"args\"[{i}] is not a string"))),
        }
    }
    Ok(args)
}

/// `"cni"`: null, absent, or `{"file": a plain CNI file name, "json": valid JSON text}`.
fn parse_cni(v: Option<&Value>) -> Result<Option<CniConflist>, PlanError> {
    let o = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(o)) => o,
        Some(_) => {
            return Err(invalid(
                "\"cni\" must be null or an object with \"file\" and \"json\"",
            ))
        }
    };
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
    Ok(Some(CniConflist { file, json }))
}

/// Makes `args` name `data_dir` (adding `--data-dir` when they name none; naming another is an
/// error) and returns the notes on doubtful settings.
fn settle_args(args: &mut Vec<String>, data_dir: &Path) -> Result<Vec<String>, PlanError> {
    let mut notes = Vec::new();
    match flag_value(args, "--data-dir", Some("-d")) {
        Some(d) => {
            if check_data_dir(d).ok().as_deref() != Some(data_dir) {
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
    if flag_value(args, "--container-runtime-endpoint", None).is_none() {
        notes.push(
            "plan args do not set --container-runtime-endpoint: k3s will start its own \
             containerd, which does not see images imported with `gatevm image import`"
                .into(),
        );
    }
    if !data_dir.starts_with(STATE_DIR) {
        notes.push(format!(
            "k3s data_dir {} is not under {}: its state is not on the state disk",
            data_dir.display(),
            STATE_DIR
        ));
    }
    Ok(notes)
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

    /// The kubeconfig k3s writes (`--write-kubeconfig`/`-o`, else [`K3S_KUBECONFIG`]).
    pub fn kubeconfig(&self) -> PathBuf {
        flag_value(&self.args, "--write-kubeconfig", Some("-o"))
            .filter(|p| p.starts_with('/'))
            .unwrap_or(K3S_KUBECONFIG)
            .into()
    }

    /// containerd's sandbox image (`--pause-image`, else [`DEFAULT_PAUSE_IMAGE`]).
    pub fn pause_image(&self) -> &str {
        flag_value(&self.args, "--pause-image", None)
            .filter(|s| !s.is_empty())
            .unwrap_or(DEFAULT_PAUSE_IMAGE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
        parse(&v.to_string()).unwrap()
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn staged_image_digests() {
        let base = |images: serde_json::Value| {
            json!({"args": [], "data_dir": "/var/lib/gatevm/k3s", "images": images}).to_string()
        };
        let h = "ab".repeat(32);
        let p = parse(&base(json!([{"file": "00-a.tar", "sha256": h}]))).unwrap();
        assert_eq!(
            p.images,
            vec![StagedImage {
                file: "00-a.tar".into(),
                sha256: h.clone()
            }]
        );
        assert!(parse(&base(json!(null))).unwrap().images.is_empty());
        assert!(parse(FULL).unwrap().images.is_empty());
        for (bad, want) in [
            (json!("x"), "must be an array"),
            (json!([{"file": "a.tar"}]), "must be {"),
            (
                json!([{"file": "../a.tar", "sha256": h}]),
                "not a plain file name",
            ),
            (
                json!([{"file": "a.tar", "sha256": "AB".repeat(32)}]),
                "lowercase hex",
            ),
            (json!([{"file": "a.tar", "sha256": "ab"}]), "lowercase hex"),
            (
                json!([{"file": "a.tar", "sha256": h}, {"file": "a.tar", "sha256": h}]),
                "twice",
            ),
        ] {
            let e = err(&base(bad.clone()));
            assert!(e.contains(want), "{bad}: {e}");
        }
        let many: Vec<_> = (0..=STAGED_IMAGES_MAX)
            .map(|i| json!({"file": format!("{i}.tar"), "sha256": h}))
            .collect();
        assert!(err(&base(json!(many))).contains("at most"));
    }

    #[test]
    fn plan_parses() {
        let p = parse(FULL).unwrap();
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
        assert_eq!(p.kubeconfig(), PathBuf::from(K3S_KUBECONFIG));
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
            let p = parse(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(p.cni, None);
            assert_eq!(p.data_dir, PathBuf::from("/var/lib/gatevm/k3s"));
            assert!(p.notes.is_empty(), "{:?}", p.notes);
        }
    }

    #[test]
    fn plan_adds_a_missing_data_dir_and_notes_doubtful_settings() {
        let p = parse(r#"{"args": ["--node-name=gw"], "data_dir": "/srv/k3s"}"#).unwrap();
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
    fn what_the_host_writes_the_guest_reads() {
        let file = PlanFile {
            args: vec![
                "--data-dir=/var/lib/gatevm/k3s".into(),
                "--container-runtime-endpoint=unix:///run/containerd/containerd.sock".into(),
            ],
            data_dir: crate::paths::K3S_DATA_DIR.into(),
            cni: Some(CniConflist {
                file: "10-gatevm-bridge.conflist".into(),
                json: "{\"cniVersion\":\"1.0.0\"}".into(),
            }),
            notes: vec!["flannel off".into()],
            images: vec![StagedImage {
                file: "00-airgap.tar.zst".into(),
                sha256: "0f".repeat(32),
            }],
            role: Role::Agent,
        };
        let text = String::from_utf8(file.to_json().unwrap()).unwrap();
        let plan = parse(&text).unwrap();
        assert_eq!(plan.images, file.images);
        assert_eq!(plan.role, Role::Agent);
        assert_eq!(parse(FULL).unwrap().role, Role::Server);
        let bad = json!({"args": [], "data_dir": "/var/lib/gatevm/k3s", "role": "boss"});
        assert!(err(&bad.to_string()).contains("\"role\""));
        assert_eq!(plan.args, file.args);
        assert_eq!(plan.data_dir, Path::new(crate::paths::K3S_DATA_DIR));
        assert_eq!(plan.cni, file.cni);
        // The host's notes are for the host's log; the guest starts its own.
        assert!(plan.notes.is_empty(), "{:?}", plan.notes);
    }

    proptest::proptest! {
        #[test]
        fn any_plan_text_is_parsed_or_rejected(text in "\\PC{0,200}") {
            match parse(&text) {
                // What is accepted is usable: an absolute data directory other than "/", named
                // to k3s by the arguments.
                Ok(p) => {
                    proptest::prop_assert!(p.data_dir.is_absolute() && p.data_dir != Path::new("/"));
                    let named = flag_value(&p.args, "--data-dir", Some("-d"));
                    let named = named.and_then(|d| check_data_dir(d).ok());
                    proptest::prop_assert_eq!(named, Some(p.data_dir.clone()));
                }
                // What is refused says so on one line.
                Err(e) => {
                    let msg = e.to_string();
                    proptest::prop_assert!(msg.starts_with("k3s plan.json"), "{}", msg);
                    proptest::prop_assert!(!msg.contains('\n'), "{}", msg);
                }
            }
        }
    }
}
