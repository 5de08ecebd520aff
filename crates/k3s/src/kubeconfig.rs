//! The instance's kubeconfig and its merge into the user's.
//!
//! k3s writes `/etc/rancher/k3s/k3s.yaml` in the guest: one cluster, one user and one context, all
//! named `default`, with the server at `https://127.0.0.1:6443` and the CA, client certificate and
//! client key embedded. The API server is reached from the host through a forwarded port, so
//! [`instance_kubeconfig`] points the server at `https://127.0.0.1:PORT` (k3s's serving
//! certificate carries `127.0.0.1` as a SAN, so TLS still verifies against the embedded CA) and
//! names everything `gatevm-NAME` so several instances and the user's own clusters can live side by
//! side in one file. That file comes from the guest, which is untrusted: the instance's kubeconfig
//! is rebuilt from an allowlist of its fields, each credential decoded and checked (`creds`); an
//! `exec` or `auth-provider` entry, which would run a program on the host, never gets through.
//!
//! [`merge`] and [`remove`] edit the user's kubeconfig (see [`target_path`]) the way kubectl
//! does, but conservatively:
//!
//! - documents are handled as [`serde_yaml::Value`], never as typed structs, so fields gatevm does
//!   not know (extensions, preferences, exec plugins, fields of newer Kubernetes releases) are
//!   written back as they were read. Comments and formatting are not preserved (no YAML library
//!   in reach does); the backup keeps the original text. The YAML is written by the `yaml` submodule so that
//!   kubectl, which reads YAML 1.1, sees the same strings (`on`, `yes`, `n` stay strings; a
//!   bare `on` in the user's file is read as YAML 1.2 reads it, a string, and written quoted).
//! - a file that is not a kubeconfig (not YAML, several documents, a top level that is not a
//!   mapping, lists that are not lists of named entries, a `kind` other than `Config`) is refused
//!   with a one-line error and left byte for byte as it was.
//! - before an existing file changes, its previous content is copied to `<target>.gatevm-backup`
//!   (mode 0600, overwritten each time).
//! - the new content is written to a temporary file in the same directory and renamed over the
//!   target, so a reader never sees half a file; the file keeps its mode, and a symlinked target
//!   (a dotfiles checkout) is written through, not replaced.
//! - the edit holds `<target>.lock`, the lock file client-go (kubectl) takes while it writes a
//!   kubeconfig, so gatevm and kubectl, or two gatevm commands, do not lose each other's changes.

use serde::Serialize;
use serde_yaml::{Mapping, Value};
use std::fmt::Display;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Prefix of every cluster, user and context gatevm adds to a kubeconfig.
pub const ENTRY_PREFIX: &str = "gatevm-";
/// Appended to the target's path to name the backup of its previous content.
pub const BACKUP_SUFFIX: &str = ".gatevm-backup";
/// Appended to the target's path to name the lock file (client-go's convention).
pub const LOCK_SUFFIX: &str = ".lock";

/// Mode of a kubeconfig gatevm creates: it holds a client key.
const NEW_FILE_MODE: u32 = 0o600;
/// Mode of a directory gatevm creates for it (`~/.kube`).
const NEW_DIR_MODE: u32 = 0o700;
/// How long to wait for another writer's lock before giving up (5 s; tests do not wait).
#[cfg(not(test))]
const LOCK_ATTEMPTS: u32 = 50;
#[cfg(test)]
const LOCK_ATTEMPTS: u32 = 3;
const LOCK_INTERVAL: Duration = Duration::from_millis(100);

/// The three lists of named entries, with the key holding each entry's body.
const LISTS: [(&str, &str); 3] = [
    ("clusters", "cluster"),
    ("users", "user"),
    ("contexts", "context"),
];

/// What went wrong preparing or editing a kubeconfig.
#[derive(Debug, thiserror::Error)]
pub enum KubeconfigError {
    /// The instance name is empty, so there is no `gatevm-NAME` to write.
    #[error("empty instance name: cannot name the kubeconfig entries")]
    EmptyName,
    /// The forwarded API port is 0.
    #[error("instance {name}: API server port 0 is not a forwarded port")]
    NoPort {
        /// The instance.
        name: String,
    },
    /// k3s's kubeconfig cannot be used (read from the guest: untrusted input).
    #[error("instance {name}: k3s's kubeconfig is unusable: {reason}")]
    K3sYaml {
        /// The instance.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The document handed to [`merge`] does not hold the instance's entries.
    #[error("instance {name}: not an instance kubeconfig: {reason}")]
    InstanceYaml {
        /// The instance.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The file to edit is not a kubeconfig; it was left untouched.
    #[error("{}: not a kubeconfig ({reason}); left untouched: fix or move it and retry", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Another writer holds the lock file.
    #[error("{}: locked by another writer (kubectl or gatevm); if none is running, remove {}", path.display(), lock.display())]
    Locked {
        /// The file to edit.
        path: PathBuf,
        /// The lock file.
        lock: PathBuf,
    },
    /// A file system operation failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done ("reading", "writing", ...).
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The edited document could not be written as YAML that reads back the same (a bug in
    /// gatevm; the file was left untouched).
    #[error("{}: cannot write the edited kubeconfig: {reason}", path.display())]
    Serialize {
        /// The file.
        path: PathBuf,
        /// The serializer's message.
        reason: String,
    },
}

/// Why a document is not a kubeconfig, or lacks an entry; becomes the `reason` of a
/// [`KubeconfigError`] through [`doc_reason`].
#[derive(Debug, thiserror::Error)]
enum DocError {
    #[error("not YAML")]
    NotYaml(#[source] serde_yaml::Error),
    #[error("the top level is {0}, not a mapping")]
    TopLevel(&'static str),
    #[error("{list}[{index}] is {kind}, not a mapping")]
    EntryNotMapping {
        list: &'static str,
        index: usize,
        kind: &'static str,
    },
    #[error("{list}[{index}] has no name")]
    NoName { list: &'static str, index: usize },
    #[error("{list} is {kind}, not a list")]
    NotList {
        list: &'static str,
        kind: &'static str,
    },
    #[error("current-context is {0}, not a string")]
    CurrentContext(&'static str),
    #[error("kind is {0:?}, not \"Config\"")]
    Kind(String),
    #[error("kind is {0}, not a string")]
    KindType(&'static str),
    #[error("no entry {name:?} in {list}")]
    NoEntry { name: String, list: String },
    #[error("{list} entry {name:?} has no {key} mapping")]
    NoBody {
        list: String,
        name: String,
        key: String,
    },
}

/// A [`DocError`] as the one line a `reason` holds (serde_yaml's messages may span several).
fn doc_reason(e: &DocError) -> String {
    match e {
        DocError::NotYaml(_) => one_line(crate::error_chain(e)),
        _ => crate::error_chain(e),
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> KubeconfigError {
    let path = path.to_path_buf();
    move |source| KubeconfigError::Io { op, path, source }
}

/// What [`merge`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MergeOutcome {
    /// The file written (the target, or where its symlink points).
    pub path: PathBuf,
    /// The name of the cluster, user and context: `gatevm-NAME`.
    pub context: String,
    /// The file did not exist and was created.
    pub created: bool,
    /// An earlier `gatevm-NAME` entry was replaced.
    pub replaced: bool,
    /// The file had no current context, and it is now `gatevm-NAME`. When false, the user's
    /// current context was left alone: `kubectl --context gatevm-NAME` selects the instance.
    pub current_context_set: bool,
    /// Where the previous content was saved, when an existing file changed.
    pub backup: Option<PathBuf>,
    /// The file changed (false when it already held exactly these entries).
    pub changed: bool,
}

/// `gatevm-NAME`: the name of the instance's cluster, user and context.
pub fn entry_name(name: &str) -> String {
    format!("{ENTRY_PREFIX}{name}")
}

/// Largest k3s kubeconfig accepted from the guest (k3s's is about 3 KiB).
pub const MAX_K3S_YAML: usize = 64 * 1024;

/// Fields of k3s's kubeconfig that are read; everything else the guest wrote is dropped.
const ALLOWED: [(&str, &[&str]); 3] = [
    ("cluster", &["certificate-authority-data", "server"]),
    (
        "user",
        &["client-certificate-data", "client-key-data", "token"],
    ),
    ("context", &["cluster", "user"]),
];

/// The instance's kubeconfig, rebuilt from an allowlist of what k3s's (read from the guest, so
/// untrusted) holds: nothing the guest wrote is copied as it is.
///
/// The context used is k3s's current context (or its only one); of its cluster and user only
/// these are taken, each checked by [`creds`] and re-encoded:
/// - the cluster's `certificate-authority-data` (CA certificates);
/// - the user's `client-certificate-data` with `client-key-data` (a certificate signed by a CA
///   of its bundle or of the cluster's CA data, and its private key), or else its `token`.
///
/// The server is always `https://127.0.0.1:PORT` (the forwarded port; k3s's serving certificate
/// has `127.0.0.1` as a SAN, so TLS verifies against the CA), never the guest's; cluster, user
/// and context are named `gatevm-NAME`. Every other field is dropped: `exec` and
/// `auth-provider` (which run programs on the host), `proxy-url`, `tls-server-name`,
/// `insecure-skip-tls-verify`, `username`/`password`, impersonation, file paths, extensions,
/// a context's namespace. The input is bounded ([`MAX_K3S_YAML`], each credential field
/// [`creds::MAX_FIELD`]); every refusal is one line naming the field.
pub fn instance_kubeconfig(
    k3s_yaml: &str,
    name: &str,
    port: u16,
) -> Result<String, KubeconfigError> {
    if name.is_empty() {
        return Err(KubeconfigError::EmptyName);
    }
    if port == 0 {
        return Err(KubeconfigError::NoPort { name: name.into() });
    }
    let bad = |reason: String| KubeconfigError::K3sYaml {
        name: name.into(),
        reason,
    };
    if k3s_yaml.len() > MAX_K3S_YAML {
        return Err(bad(format!(
            "{} bytes, more than {MAX_K3S_YAML}",
            k3s_yaml.len()
        )));
    }
    let doc = parse_doc(k3s_yaml).map_err(|e| bad(doc_reason(&e)))?;

    let context_name = match doc.get("current-context").and_then(Value::as_str) {
        Some(c) if !c.is_empty() => c.to_string(),
        _ => match entries(&doc, "contexts") {
            [only] => entry_name_of(only).unwrap_or_default().to_string(),
            _ => return Err(bad("no current-context and not exactly one context".into())),
        },
    };
    let shown_context = shown(&context_name);
    let context =
        body(&doc, "contexts", "context", &context_name).map_err(|e| bad(shown_error(&e)))?;
    let field = |key: &str| -> Result<String, KubeconfigError> {
        context
            .get(key)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| bad(format!("context {shown_context}: no {key}")))
    };
    let (cluster_name, user_name) = (field("cluster")?, field("user")?);
    let cluster =
        body(&doc, "clusters", "cluster", &cluster_name).map_err(|e| bad(shown_error(&e)))?;
    let user = body(&doc, "users", "user", &user_name).map_err(|e| bad(shown_error(&e)))?;
    let (cluster_name, user_name) = (shown(&cluster_name), shown(&user_name));
    for ((what, allowed), entry) in ALLOWED.iter().zip([&cluster, &user, &context]) {
        let dropped: Vec<String> = entry
            .keys()
            .filter(|k| !k.as_str().is_some_and(|k| allowed.contains(&k)))
            .map(|k| k.as_str().map_or_else(|| "?".into(), shown))
            .collect();
        if !dropped.is_empty() {
            tracing::warn!(
                instance = name,
                "k3s's kubeconfig: {what} fields not taken over: {}",
                dropped.join(", ")
            );
        }
    }

    // A field that is present must be a string; None when absent.
    let text =
        |entry: &Mapping, what: &str, key: &str| -> Result<Option<String>, KubeconfigError> {
            match entry.get(key) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(bad(format!("{what}: {key}: {}, not a string", kind(other)))),
            }
        };
    let cluster_what = format!("cluster {cluster_name}");
    let ca_text = text(&cluster, &cluster_what, "certificate-authority-data")?
        .ok_or_else(|| bad(format!("{cluster_what}: no certificate-authority-data")))?;
    let ca = creds::ca(&ca_text).map_err(|e| {
        bad(format!(
            "{cluster_what}: certificate-authority-data: {}",
            crate::error_chain(&e)
        ))
    })?;

    let user_what = format!("user {user_name}");
    let mut user_out = Mapping::new();
    match (
        text(&user, &user_what, "client-certificate-data")?,
        text(&user, &user_what, "client-key-data")?,
        text(&user, &user_what, "token")?,
    ) {
        (Some(cert), Some(key), _) => {
            let (cert, key) = creds::client(&cert, &key, &ca).map_err(|e| match e {
                creds::Field::Cert(e) => bad(format!(
                    "{user_what}: client-certificate-data: {}",
                    crate::error_chain(&e)
                )),
                creds::Field::Key(e) => bad(format!(
                    "{user_what}: client-key-data: {}",
                    crate::error_chain(&e)
                )),
            })?;
            user_out.insert("client-certificate-data".into(), cert.into());
            user_out.insert("client-key-data".into(), key.into());
        }
        (Some(_), None, _) => {
            return Err(bad(format!(
                "{user_what}: client-certificate-data without client-key-data"
            )))
        }
        (None, Some(_), _) => {
            return Err(bad(format!(
                "{user_what}: client-key-data without client-certificate-data"
            )))
        }
        (None, None, Some(token)) => {
            let token = creds::token(&token)
                .map_err(|e| bad(format!("{user_what}: token: {}", crate::error_chain(&e))))?;
            user_out.insert("token".into(), token.into());
        }
        (None, None, None) => {
            return Err(bad(format!(
                "{user_what}: neither client-certificate-data with client-key-data nor a token"
            )))
        }
    }

    let entry = entry_name(name);
    let mut cluster_out = Mapping::new();
    cluster_out.insert("certificate-authority-data".into(), ca.data.into());
    cluster_out.insert(
        "server".into(),
        Value::String(format!("https://127.0.0.1:{port}")),
    );
    let mut context_out = Mapping::new();
    context_out.insert("cluster".into(), Value::String(entry.clone()));
    context_out.insert("user".into(), Value::String(entry.clone()));

    let mut out = Mapping::new();
    out.insert("apiVersion".into(), "v1".into());
    out.insert("kind".into(), "Config".into());
    for ((list, key), body) in LISTS.iter().zip([cluster_out, user_out, context_out]) {
        out.insert(
            (*list).into(),
            Value::Sequence(vec![named(&entry, key, body)]),
        );
    }
    out.insert("current-context".into(), Value::String(entry.clone()));
    out.insert("preferences".into(), Value::Mapping(Mapping::new()));
    Ok(yaml::to_string(&Value::Mapping(out)))
}

/// A name from the guest as an error message shows it: quoted, escaped, at most 64 characters.
fn shown(s: &str) -> String {
    let cut: String = s.chars().take(64).collect();
    if cut.len() < s.len() {
        format!("{cut:?}...")
    } else {
        format!("{cut:?}")
    }
}

/// An error of [`body`], whose names come from the guest, cut short.
fn shown_error(e: &DocError) -> String {
    let cut: String = doc_reason(e).chars().take(200).collect();
    cut.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The file to merge into: the first path of `$KUBECONFIG` (split on `:`, empty parts skipped),
/// else `~/.kube/config`.
///
/// kubectl reads every file of the list; gatevm writes to the first, which kubectl also reads
/// first, so `gatevm-NAME` wins over an entry of the same name further down the list.
pub fn target_path(kubeconfig_env: Option<&str>, home: &Path) -> PathBuf {
    kubeconfig_env
        .and_then(|v| v.split(':').find(|p| !p.is_empty()))
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".kube").join("config"))
}

/// Merges the instance's cluster, user and context (from [`instance_kubeconfig`]'s output) into
/// `target`.
///
/// - A missing file is created with mode 0600 (and its directory with 0700).
/// - Other clusters, users and contexts and unknown fields are kept; an entry named `gatevm-NAME`
///   is replaced where it stands.
/// - current-context is set to `gatevm-NAME` only when the file had none (see
///   [`MergeOutcome::current_context_set`]): switching the user's cluster behind their back is
///   worse than one `--context` flag.
/// - Before an existing file changes, its content is copied to `<target>.gatevm-backup` (0600).
/// - A malformed file is refused with a one-line error and left untouched.
/// - Writing is atomic and keeps the file's mode.
pub fn merge(
    target: &Path,
    instance_yaml: &str,
    name: &str,
) -> Result<MergeOutcome, KubeconfigError> {
    if name.is_empty() {
        return Err(KubeconfigError::EmptyName);
    }
    let entry = entry_name(name);
    let new_entries = instance_entries(instance_yaml, name, &entry)?;

    if let Some(dir) = parent_dir(target) {
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(NEW_DIR_MODE)
                .create(dir)
                .map_err(io_err("creating directory", dir))?;
        }
    }
    let _lock = Lock::acquire(target)?;
    let existing = read_existing(target)?;
    let created = existing.is_none();
    let (mut doc, original) = match &existing {
        // An empty file gets the header a new one would have.
        Some(file) if file.doc.is_empty() => (new_document(), Some(&file.doc)),
        Some(file) => (file.doc.clone(), Some(&file.doc)),
        None => (new_document(), None),
    };

    let mut replaced = false;
    for ((list, _), new) in LISTS.iter().zip(new_entries) {
        replaced |= upsert(&mut doc, list, &entry, new);
    }
    let current_context_set = current_context(&doc).is_none();
    if current_context_set {
        doc.insert("current-context".into(), Value::String(entry.clone()));
    }

    let path = existing
        .as_ref()
        .map_or_else(|| target.to_path_buf(), |f| f.real_path.clone());
    let mut outcome = MergeOutcome {
        path,
        context: entry,
        created,
        replaced,
        current_context_set,
        backup: None,
        changed: original != Some(&doc),
    };
    if outcome.changed {
        outcome.backup = write_document(target, existing.as_ref(), &doc)?;
    }
    tracing::debug!(?outcome, "merged kubeconfig");
    Ok(outcome)
}

/// Removes `gatevm-NAME`'s cluster, user and context from `target`, and unsets current-context
/// if it pointed there. A missing file or missing entries is fine (returns false: nothing
/// changed); a malformed file is refused and left untouched. Like [`merge`], a changed file is
/// backed up first, written atomically and keeps its mode.
pub fn remove(target: &Path, name: &str) -> Result<bool, KubeconfigError> {
    if name.is_empty() {
        return Err(KubeconfigError::EmptyName);
    }
    let entry = entry_name(name);
    if !exists(target)? {
        return Ok(false);
    }
    let _lock = Lock::acquire(target)?;
    let Some(existing) = read_existing(target)? else {
        return Ok(false);
    };
    let mut doc = existing.doc.clone();
    let mut changed = false;
    for (list, _) in LISTS {
        if let Some(Value::Sequence(items)) = doc.get_mut(list) {
            let before = items.len();
            items.retain(|item| entry_name_of(item) != Some(&entry));
            changed |= items.len() != before;
        }
    }
    if current_context(&doc) == Some(entry.as_str()) {
        doc.remove("current-context");
        changed = true;
    }
    if changed {
        write_document(target, Some(&existing), &doc)?;
        tracing::debug!(path = %target.display(), %entry, "removed kubeconfig entries");
    }
    Ok(changed)
}

/// A kubeconfig file as read before editing it.
struct Existing {
    /// The file's bytes, for the backup.
    bytes: Vec<u8>,
    /// The parsed document.
    doc: Mapping,
    /// The file's permission bits.
    mode: u32,
    /// Where the content lives (the target, or where its symlink points).
    real_path: PathBuf,
}

fn exists(path: &Path) -> Result<bool, KubeconfigError> {
    match fs::metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("checking", path)(e)),
    }
}

/// Reads and validates the target; `None` when it does not exist.
fn read_existing(target: &Path) -> Result<Option<Existing>, KubeconfigError> {
    let bytes = match fs::read(target) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("reading", target)(e)),
    };
    let malformed = |reason: String| KubeconfigError::Malformed {
        path: target.to_path_buf(),
        reason,
    };
    let text = std::str::from_utf8(&bytes).map_err(|_| malformed("not UTF-8 text".into()))?;
    let doc = parse_doc(text).map_err(|e| malformed(doc_reason(&e)))?;
    let real_path = fs::canonicalize(target).map_err(io_err("resolving", target))?;
    let mode = fs::metadata(&real_path)
        .map_err(io_err("checking", &real_path))?
        .permissions()
        .mode()
        & 0o7777;
    Ok(Some(Existing {
        bytes,
        doc,
        mode,
        real_path,
    }))
}

/// Backs up the previous content (when there is some) and writes `doc` to the target.
/// Returns the backup's path.
fn write_document(
    target: &Path,
    existing: Option<&Existing>,
    doc: &Mapping,
) -> Result<Option<PathBuf>, KubeconfigError> {
    let value = Value::Mapping(doc.clone());
    let text = yaml::to_string(&value);
    // Defence in depth: never replace a user's file with text that reads back differently.
    match serde_yaml::from_str::<Value>(&text) {
        Ok(back) if back == value => {}
        Ok(_) => {
            return Err(KubeconfigError::Serialize {
                path: target.to_path_buf(),
                reason: "the YAML written would not read back the same".into(),
            })
        }
        Err(e) => {
            return Err(KubeconfigError::Serialize {
                path: target.to_path_buf(),
                reason: one_line(crate::error_chain(&e)),
            })
        }
    }
    let backup = match existing {
        Some(file) => {
            let backup = with_suffix(target, BACKUP_SUFFIX);
            write_atomic(&backup, &file.bytes, NEW_FILE_MODE)?;
            Some(backup)
        }
        None => None,
    };
    match existing {
        Some(file) => write_atomic(&file.real_path, text.as_bytes(), file.mode)?,
        None => write_atomic(target, text.as_bytes(), NEW_FILE_MODE)?,
    }
    Ok(backup)
}

/// Writes `contents` to `path` with exactly `mode`, atomically and durably
/// ([`gatevm_fsutil::write_atomic`]).
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), KubeconfigError> {
    gatevm_fsutil::write_atomic(path, contents, mode).map_err(io_err("replacing", path))
}

/// The lock file client-go creates (`O_EXCL`) while it writes a kubeconfig; removed on drop.
struct Lock(PathBuf);

impl Lock {
    fn acquire(target: &Path) -> Result<Lock, KubeconfigError> {
        let lock = with_suffix(target, LOCK_SUFFIX);
        for attempt in 0..LOCK_ATTEMPTS {
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(NEW_FILE_MODE)
                .open(&lock)
            {
                Ok(_) => return Ok(Lock(lock)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    if attempt + 1 < LOCK_ATTEMPTS {
                        std::thread::sleep(LOCK_INTERVAL);
                    }
                }
                Err(e) => return Err(io_err("creating lock file", &lock)(e)),
            }
        }
        Err(KubeconfigError::Locked {
            path: target.to_path_buf(),
            lock,
        })
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_file(&self.0) {
            tracing::warn!(lock = %self.0.display(), error = %e, "could not remove kubeconfig lock");
        }
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn parent_dir(path: &Path) -> Option<&Path> {
    path.parent().filter(|p| !p.as_os_str().is_empty())
}

/// An empty kubeconfig, as kubectl would create it.
fn new_document() -> Mapping {
    let mut doc = Mapping::new();
    doc.insert("apiVersion".into(), "v1".into());
    doc.insert("kind".into(), "Config".into());
    for (list, _) in LISTS {
        doc.insert(list.into(), Value::Sequence(Vec::new()));
    }
    doc.insert("preferences".into(), Value::Mapping(Mapping::new()));
    doc
}

/// Parses a kubeconfig and checks its shape. An empty (or comment-only) document is an empty
/// kubeconfig, as kubectl treats it.
fn parse_doc(text: &str) -> Result<Mapping, DocError> {
    let value: Value = serde_yaml::from_str(text).map_err(DocError::NotYaml)?;
    let doc = match value {
        Value::Null => Mapping::new(),
        Value::Mapping(m) => m,
        other => return Err(DocError::TopLevel(kind(&other))),
    };
    for (list, _) in LISTS {
        match doc.get(list) {
            None | Some(Value::Null) => {}
            Some(Value::Sequence(items)) => {
                for (i, item) in items.iter().enumerate() {
                    if !item.is_mapping() {
                        return Err(DocError::EntryNotMapping {
                            list,
                            index: i,
                            kind: kind(item),
                        });
                    }
                    if entry_name_of(item).is_none() {
                        return Err(DocError::NoName { list, index: i });
                    }
                }
            }
            Some(other) => {
                return Err(DocError::NotList {
                    list,
                    kind: kind(other),
                })
            }
        }
    }
    match doc.get("current-context") {
        None | Some(Value::Null | Value::String(_)) => {}
        Some(other) => return Err(DocError::CurrentContext(kind(other))),
    }
    match doc.get("kind") {
        None | Some(Value::Null) => {}
        Some(Value::String(k)) if k == "Config" => {}
        Some(Value::String(k)) => return Err(DocError::Kind(k.clone())),
        Some(other) => return Err(DocError::KindType(kind(other))),
    }
    Ok(doc)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// The entries of a list (empty when absent or null). Only for validated documents.
fn entries<'a>(doc: &'a Mapping, list: &str) -> &'a [Value] {
    match doc.get(list) {
        Some(Value::Sequence(items)) => items,
        _ => &[],
    }
}

fn entry_name_of(item: &Value) -> Option<&str> {
    item.get("name").and_then(Value::as_str)
}

/// The body (`cluster:`, `user:`, `context:`) of the entry named `name` in `list`.
fn body(doc: &Mapping, list: &str, key: &str, name: &str) -> Result<Mapping, DocError> {
    let item = entries(doc, list)
        .iter()
        .find(|i| entry_name_of(i) == Some(name))
        .ok_or_else(|| DocError::NoEntry {
            name: name.to_string(),
            list: list.to_string(),
        })?;
    match item.get(key) {
        Some(Value::Mapping(m)) => Ok(m.clone()),
        _ => Err(DocError::NoBody {
            list: list.to_string(),
            name: name.to_string(),
            key: key.to_string(),
        }),
    }
}

fn named(name: &str, key: &str, body: Mapping) -> Value {
    let mut m = Mapping::new();
    m.insert("name".into(), Value::String(name.into()));
    m.insert(key.into(), Value::Mapping(body));
    Value::Mapping(m)
}

/// The non-empty current context.
fn current_context(doc: &Mapping) -> Option<&str> {
    doc.get("current-context")
        .and_then(Value::as_str)
        .filter(|c| !c.is_empty())
}

/// The instance's cluster, user and context entries, in [`LISTS`] order.
fn instance_entries(
    instance_yaml: &str,
    name: &str,
    entry: &str,
) -> Result<[Value; 3], KubeconfigError> {
    let bad = |reason: String| KubeconfigError::InstanceYaml {
        name: name.into(),
        reason,
    };
    let doc = parse_doc(instance_yaml).map_err(|e| bad(doc_reason(&e)))?;
    let get = |(list, key): (&str, &str)| -> Result<Value, KubeconfigError> {
        body(&doc, list, key, entry)
            .map(|b| named(entry, key, b))
            .map_err(|e| bad(doc_reason(&e)))
    };
    Ok([get(LISTS[0])?, get(LISTS[1])?, get(LISTS[2])?])
}

/// Replaces every entry named `name` in `list` by `new` (at the first one's place) or appends
/// it. Returns whether one was replaced.
fn upsert(doc: &mut Mapping, list: &str, name: &str, new: Value) -> bool {
    let items = match doc.get_mut(list) {
        Some(Value::Sequence(items)) => items,
        _ => {
            doc.insert(list.into(), Value::Sequence(vec![new]));
            return false;
        }
    };
    match items.iter().position(|i| entry_name_of(i) == Some(name)) {
        Some(first) => {
            items[first] = new;
            let mut index = 0;
            items.retain(|i| {
                index += 1;
                index - 1 == first || entry_name_of(i) != Some(name)
            });
            true
        }
        None => {
            items.push(new);
            false
        }
    }
}

/// An error message on one line (serde_yaml's may span several).
fn one_line(e: impl Display) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

mod creds;
mod yaml;

#[cfg(test)]
mod tests;
