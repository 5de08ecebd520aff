//! A container's network: its named network namespace, the CNI attachment to the `gatevm`
//! network, and the state kept in `/run/gatevm/containers/NAME/` so it can be undone.
//!
//! `state.json` is written before anything is created (so a half-done setup can be undone) and
//! holds the namespace, the owning process, the published ports and the exact network list used;
//! `cni-result.json` is the ADD result, given back to the plugins as `prevResult` on DEL. After a
//! VM reboot `/run` is empty and the guest cleaned the IPAM state at boot, so a missing state
//! directory simply means there is nothing to undo.

use super::args::{parse_publish, Publish};
use crate::cni::{self, Attachment, PortMapping};
use crate::log::error_chain;
use serde_json::{json, Value};
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Root of the per-container state directories.
pub(crate) const STATE_ROOT: &str = "/run/gatevm/containers";
/// Where `ip netns` keeps named network namespaces.
pub(crate) const NETNS_DIR: &str = "/run/netns";
/// Where detached containers' output goes (the state disk, not the RAM-backed `/run`).
pub(crate) const LOG_DIR: &str = "/var/lib/gatevm/logs";

const STATE_FILE: &str = "state.json";
const RESULT_FILE: &str = "cni-result.json";

/// A container network step that failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NetworkError {
    /// `state.json` lacks a field.
    #[error("container state has no {0}")]
    MissingField(&'static str),
    /// A state file could not be read.
    #[error("read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A state file is not JSON.
    #[error("read {}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A state file could not be encoded.
    #[error(transparent)]
    Encode(serde_json::Error),
    /// A state file or directory could not be written.
    #[error("write {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A directory could not be created.
    #[error("create {}", path.display())]
    Create {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Another command holds the state directory of that name.
    #[error("container name {0:?} is being set up by another command")]
    Busy(String),
    /// A helper (`ip`) could not be started.
    #[error("cannot run {prog}")]
    Spawn {
        /// The helper.
        prog: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A helper failed: its command line and last stderr line.
    #[error("{prog} {args}: {line}")]
    Helper {
        /// The helper.
        prog: String,
        /// Its arguments, joined by spaces.
        args: String,
        /// Its last stderr line.
        line: String,
    },
    /// The network configuration file could not be written.
    #[error("network configuration")]
    Config(#[source] io::Error),
    /// CNI ADD failed.
    #[error("network setup failed")]
    Add(#[source] cni::CniError),
}

/// The state directory of a container.
pub(crate) fn state_dir(name: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(name)
}

/// The name of a container's network namespace (`gatevm-NAME`).
pub(crate) fn netns_name(name: &str) -> String {
    format!("gatevm-{name}")
}

/// The path of a container's network namespace.
pub(crate) fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(netns_name(name))
}

/// The output log of a detached container.
pub(crate) fn log_path(name: &str) -> PathBuf {
    Path::new(LOG_DIR).join(format!("{name}.log"))
}

/// What DEL needs, and who owns the container's setup.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct State {
    /// containerd namespace of the container.
    pub namespace: String,
    /// Container name.
    pub name: String,
    /// Pid of the `gatevm-guest` process that set it up (a foreground run owns it until it ends).
    pub owner_pid: u32,
    /// Network namespace path.
    pub netns: String,
    /// `CNI_CONTAINERID` used for ADD.
    pub cni_container_id: String,
    /// `CNI_IFNAME` used for ADD.
    pub ifname: String,
    /// Published ports.
    pub ports: Vec<Publish>,
    /// The network configuration list used for ADD.
    pub conflist: Value,
}

impl State {
    /// The state of a new container of `namespace` owned by this process.
    pub(crate) fn new(namespace: &str, name: &str, ports: &[Publish]) -> State {
        State {
            namespace: namespace.into(),
            name: name.into(),
            owner_pid: std::process::id(),
            netns: netns_path(name).display().to_string(),
            cni_container_id: name.into(),
            ifname: cni::IFNAME.into(),
            ports: ports.to_vec(),
            conflist: cni::conflist(),
        }
    }

    /// As `state.json`.
    pub(crate) fn to_json(&self) -> Value {
        json!({
            "namespace": self.namespace,
            "name": self.name,
            "owner_pid": self.owner_pid,
            "netns": self.netns,
            "cni_container_id": self.cni_container_id,
            "ifname": self.ifname,
            "ports": self.ports.iter().map(Publish::to_string).collect::<Vec<_>>(),
            "conflist": self.conflist,
        })
    }

    /// Reads `state.json`.
    pub(crate) fn from_json(v: &Value) -> Result<State, NetworkError> {
        let s = |k: &'static str| -> Result<String, NetworkError> {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or(NetworkError::MissingField(k))
        };
        let ports = v
            .get("ports")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .filter_map(|p| parse_publish(p).ok())
                    .collect()
            })
            .unwrap_or_default();
        Ok(State {
            namespace: s("namespace")?,
            name: s("name")?,
            owner_pid: v
                .get("owner_pid")
                .and_then(Value::as_u64)
                .and_then(|p| u32::try_from(p).ok())
                .unwrap_or(0),
            netns: s("netns")?,
            cni_container_id: s("cni_container_id")?,
            ifname: s("ifname")?,
            ports,
            conflist: v
                .get("conflist")
                .cloned()
                .ok_or(NetworkError::MissingField("conflist"))?,
        })
    }

    /// The CNI attachment this state describes.
    pub(crate) fn attachment(&self) -> Attachment {
        Attachment {
            container_id: self.cni_container_id.clone(),
            netns: self.netns.clone(),
            ifname: self.ifname.clone(),
            cni_path: cni::CNI_PATH.into(),
        }
    }

    /// The port mappings for the portmap plugin.
    pub(crate) fn mappings(&self) -> Vec<PortMapping> {
        self.ports.iter().map(Publish::mapping).collect()
    }
}

/// Reads a container's saved state; `Ok(None)` when there is none.
pub(crate) fn load(name: &str) -> Result<Option<State>, NetworkError> {
    let path = state_dir(name).join(STATE_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(NetworkError::Read { path, source }),
    };
    let v: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(source) => return Err(NetworkError::Parse { path, source }),
    };
    State::from_json(&v).map(Some)
}

fn load_result(name: &str) -> Option<Value> {
    let text = std::fs::read_to_string(state_dir(name).join(RESULT_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Whether a pid belongs to a live `gatevm-guest` process other than this one.
pub(crate) fn owner_alive(pid: u32) -> bool {
    if pid == 0 || pid == std::process::id() {
        return false;
    }
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim() == "gatevm-guest")
        .unwrap_or(false)
}

/// Runs a helper (`ip`) to completion; its last stderr line on failure.
fn run(prog: &str, args: &[&str]) -> Result<(), NetworkError> {
    let out = cni::run_captured(Command::new(prog).args(args), None).map_err(|source| {
        NetworkError::Spawn {
            prog: prog.into(),
            source,
        }
    })?;
    if out.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    Err(NetworkError::Helper {
        prog: prog.into(),
        args: args.join(" "),
        line: line.into(),
    })
}

fn write_json(path: &Path, v: &Value) -> Result<(), NetworkError> {
    let text = serde_json::to_string_pretty(v).map_err(NetworkError::Encode)?;
    std::fs::write(path, text + "\n").map_err(|source| NetworkError::Write {
        path: path.into(),
        source,
    })
}

/// Claims the state directory of a new container (fails when it exists: the name is taken or
/// being set up) and records `state` in it.
pub(crate) fn claim(state: &State) -> Result<(), NetworkError> {
    std::fs::create_dir_all(STATE_ROOT).map_err(|source| NetworkError::Create {
        path: STATE_ROOT.into(),
        source,
    })?;
    let dir = state_dir(&state.name);
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(NetworkError::Busy(state.name.clone()))
        }
        Err(source) => return Err(NetworkError::Create { path: dir, source }),
    }
    write_json(&dir.join(STATE_FILE), &state.to_json())
}

/// Creates the network namespace, writes the network list when missing or different, and
/// attaches the namespace (CNI ADD); the result is saved for DEL.
pub(crate) fn setup(state: &State) -> Result<(), NetworkError> {
    let ns = netns_name(&state.name);
    if Path::new(&state.netns).exists() {
        // A leftover of an earlier container of that name whose state is gone.
        let _ = run("ip", &["netns", "delete", &ns]);
    }
    run("ip", &["netns", "add", &ns])?;
    run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
    cni::ensure_file(
        Path::new(cni::CONFLIST_PATH),
        &cni::conflist_text(&state.conflist),
    )
    .map_err(NetworkError::Config)?;
    let result = cni::add(&state.conflist, &state.attachment(), &state.mappings())
        .map_err(NetworkError::Add)?;
    write_json(&state_dir(&state.name).join(RESULT_FILE), &result)
}

/// Undoes whatever [`setup`] did for `name` (CNI DEL with the saved state, namespace deletion,
/// state directory removal), tolerating each part being absent. Returns problems as messages.
pub(crate) fn teardown(name: &str) -> Vec<String> {
    let mut problems = Vec::new();
    match load(name) {
        Ok(Some(state)) => {
            let prev = load_result(name);
            if let Err(e) = cni::del(
                &state.conflist,
                &state.attachment(),
                &state.mappings(),
                prev.as_ref(),
            ) {
                problems.push(format!("network teardown: {e}"));
            }
        }
        Ok(None) => {}
        Err(e) => problems.push(format!("network teardown: {}", error_chain(&e))),
    }
    if netns_path(name).exists() {
        if let Err(e) = run("ip", &["netns", "delete", &netns_name(name)]) {
            problems.push(error_chain(&e));
        }
    }
    let dir = state_dir(name);
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        if e.kind() != io::ErrorKind::NotFound {
            problems.push(format!("remove {}: {e}", dir.display()));
        }
    }
    problems
}

/// Whether anything of a container's network is left (state directory or namespace).
pub(crate) fn exists(name: &str) -> bool {
    state_dir(name).exists() || netns_path(name).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths() {
        assert_eq!(netns_name("web"), "gatevm-web");
        assert_eq!(netns_path("web"), Path::new("/run/netns/gatevm-web"));
        assert_eq!(state_dir("web"), Path::new("/run/gatevm/containers/web"));
        assert_eq!(log_path("web"), Path::new("/var/lib/gatevm/logs/web.log"));
    }

    #[test]
    fn state_round_trip() {
        let ports = vec![
            parse_publish("8080:80").unwrap(),
            parse_publish("53:53/udp").unwrap(),
        ];
        let s = State::new("default", "web", &ports);
        assert_eq!(s.netns, "/run/netns/gatevm-web");
        assert_eq!(s.owner_pid, std::process::id());
        let v = s.to_json();
        assert_eq!(v["ports"], json!(["8080:80/tcp", "53:53/udp"]));
        assert_eq!(v["conflist"]["name"], "gatevm");
        assert_eq!(State::from_json(&v).unwrap(), s);
        let att = s.attachment();
        assert_eq!(att.container_id, "web");
        assert_eq!(att.ifname, "eth0");
        assert_eq!(att.cni_path, "/usr/lib/cni:/opt/cni/bin");
        assert_eq!(s.mappings()[1].protocol, "udp");
        assert!(State::from_json(&json!({"name": "x"})).is_err());
    }

    #[test]
    fn owner_liveness() {
        assert!(!owner_alive(0));
        assert!(!owner_alive(std::process::id()));
        // A process that is not gatevm-guest does not own anything.
        let reaper = crate::reaper::Reaper::global();
        let child = reaper.spawn(Command::new("sleep").arg("5")).unwrap();
        assert!(!owner_alive(child.pid as u32));
        reaper.signal(child.pid, libc::SIGKILL, false);
        let _ = child.exit.recv();
    }
}
