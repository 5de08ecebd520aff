//! CNI without a library: gatevm's network configuration list, the per-plugin stdin documents of
//! `ADD` and `DEL`, and running the plugin binaries the way the CNI 1.0 specification describes.
//!
//! `ADD` runs the plugins of the list in order, each getting the previous plugin's result as
//! `prevResult`; the last result is the network's result. `DEL` runs them in reverse, each getting
//! the saved `ADD` result (when there is one) as `prevResult`. `runtimeConfig.portMappings` goes
//! only to plugins whose `capabilities` enable `portMappings`. A failing plugin prints a JSON error
//! (`{"code":…,"msg":…,"details":…}`) on its stdout; its `msg` is what the user sees.

use crate::reaper::{describe, Reaper};
use gatevm_abi::ExitStatus;
use serde_json::{json, Map, Value};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Name of gatevm's container network.
pub(crate) const NETWORK_NAME: &str = "gatevm";
/// Where the network configuration list is written.
pub(crate) const CONFLIST_PATH: &str = "/etc/cni/net.d/10-gatevm.conflist";
/// The bridge on the guest side.
pub(crate) const BRIDGE: &str = "gatevm0";
/// The containers' subnet (host-local IPAM).
pub(crate) const SUBNET: &str = "10.88.0.0/16";
/// Where plugin binaries are searched (Debian's containernetworking-plugins, then the usual place).
pub(crate) const CNI_PATH: &str = "/usr/lib/cni:/opt/cni/bin";
/// Interface name inside the container.
pub(crate) const IFNAME: &str = "eth0";
/// CNI specification version of the list.
pub(crate) const CNI_VERSION: &str = "1.0.0";
/// `PATH` given to plugins when this process has none (they run `iptables`, `ip`, …).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A CNI failure, already phrased for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CniError(pub String);

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CniError {}

/// One published port as CNI's `portMappings` capability describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PortMapping {
    /// Port on the guest (CNI calls it the host port).
    pub host_port: u16,
    /// Port inside the container.
    pub container_port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
}

/// The `CNI_COMMAND` verb.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verb {
    /// Attach the container to the network.
    Add,
    /// Detach it and release what ADD allocated.
    Del,
}

impl Verb {
    /// The `CNI_COMMAND` value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Verb::Add => "ADD",
            Verb::Del => "DEL",
        }
    }
}

/// What identifies one attachment: the environment every plugin gets besides `CNI_COMMAND`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Attachment {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`: path of the network namespace.
    pub netns: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_PATH`: where plugin binaries are searched.
    pub cni_path: String,
}

/// gatevm's network configuration list: a bridge with host-local IPAM, then portmap.
pub(crate) fn conflist() -> Value {
    json!({
        "cniVersion": CNI_VERSION,
        "name": NETWORK_NAME,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": SUBNET }]],
                    "routes": [{ "dst": "0.0.0.0/0" }]
                }
            },
            {
                "type": "portmap",
                "capabilities": { "portMappings": true }
            }
        ]
    })
}

/// The text written to [`CONFLIST_PATH`] (stable: serde_json sorts keys).
pub(crate) fn conflist_text(list: &Value) -> String {
    let mut s = serde_json::to_string_pretty(list).unwrap_or_else(|_| list.to_string());
    s.push('\n');
    s
}

/// Writes `text` to `path` unless the file already holds exactly that; true when it wrote.
pub(crate) fn ensure_file(path: &Path, text: &str) -> io::Result<bool> {
    if std::fs::read(path).ok().as_deref() == Some(text.as_bytes()) {
        return Ok(false);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| io::Error::new(e.kind(), format!("create {}: {e}", dir.display())))?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, text)
        .map_err(|e| io::Error::new(e.kind(), format!("write {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io::Error::new(e.kind(), format!("write {}: {e}", path.display()))
    })?;
    Ok(true)
}

/// The `portMappings` capability argument.
pub(crate) fn port_mappings_json(ports: &[PortMapping]) -> Value {
    Value::Array(
        ports
            .iter()
            .map(|p| {
                json!({
                    "hostPort": p.host_port,
                    "containerPort": p.container_port,
                    "protocol": p.protocol,
                })
            })
            .collect(),
    )
}

/// The plugin configurations of a list, checked: each is an object with a plain `type` name.
pub(crate) fn plugins(list: &Value) -> Result<Vec<&Map<String, Value>>, CniError> {
    let arr = list
        .get("plugins")
        .and_then(Value::as_array)
        .ok_or_else(|| CniError("network configuration has no plugins list".into()))?;
    if arr.is_empty() {
        return Err(CniError("network configuration has no plugins".into()));
    }
    arr.iter()
        .map(|p| {
            let obj = p
                .as_object()
                .ok_or_else(|| CniError("network configuration: plugin is not an object".into()))?;
            plugin_type(obj)?;
            Ok(obj)
        })
        .collect()
}

/// A plugin's `type`, which names its binary (so it must be a plain file name).
pub(crate) fn plugin_type(plugin: &Map<String, Value>) -> Result<&str, CniError> {
    match plugin.get("type").and_then(Value::as_str) {
        Some(t) if !t.is_empty() && !t.contains('/') && t != "." && t != ".." => Ok(t),
        _ => Err(CniError(
            "network configuration: plugin without a valid type".into(),
        )),
    }
}

/// Whether a plugin enables a capability (`"capabilities": {"portMappings": true}`).
pub(crate) fn has_capability(plugin: &Map<String, Value>, cap: &str) -> bool {
    plugin
        .get("capabilities")
        .and_then(|c| c.get(cap))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// The stdin document of one plugin: its configuration plus the list's `name` and `cniVersion`,
/// `prevResult` when given, and `runtimeConfig.portMappings` when it has that capability.
pub(crate) fn plugin_stdin(
    list: &Value,
    plugin: &Map<String, Value>,
    prev_result: Option<&Value>,
    port_mappings: &[PortMapping],
) -> Value {
    let mut conf = plugin.clone();
    if let Some(name) = list.get("name") {
        conf.insert("name".into(), name.clone());
    }
    if let Some(v) = list.get("cniVersion") {
        conf.insert("cniVersion".into(), v.clone());
    }
    match prev_result {
        Some(r) => {
            conf.insert("prevResult".into(), r.clone());
        }
        None => {
            conf.remove("prevResult");
        }
    }
    if has_capability(plugin, "portMappings") {
        let mut rc = match conf.remove("runtimeConfig") {
            Some(Value::Object(m)) => m,
            _ => Map::new(),
        };
        rc.insert("portMappings".into(), port_mappings_json(port_mappings));
        conf.insert("runtimeConfig".into(), Value::Object(rc));
    }
    Value::Object(conf)
}

/// The message of a plugin failure: `msg` (and `details` when present) of its JSON error on
/// stdout, else the last line of its stderr, else how it exited.
pub(crate) fn error_message(stdout: &[u8], stderr: &[u8], exit: &str) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(stdout) {
        let msg = v.get("msg").and_then(Value::as_str).unwrap_or("").trim();
        let details = v
            .get("details")
            .and_then(Value::as_str)
            .unwrap_or("")
            .trim();
        if !msg.is_empty() {
            return if details.is_empty() || details == msg {
                msg.to_string()
            } else {
                format!("{msg}: {details}")
            };
        }
        if let Some(code) = v.get("code").and_then(Value::as_u64) {
            return format!("error code {code}");
        }
    }
    let err = String::from_utf8_lossy(stderr);
    match err.lines().rev().map(str::trim).find(|l| !l.is_empty()) {
        Some(l) => l.to_string(),
        None => exit.to_string(),
    }
}

/// Finds a plugin binary in a `:`-separated search path.
pub(crate) fn find_plugin(ty: &str, cni_path: &str) -> Option<PathBuf> {
    cni_path
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(ty))
        .find(|p| p.is_file())
}

/// Runs one plugin binary with the CNI environment and `stdin`; returns its stdout on success.
pub(crate) fn exec_plugin(
    ty: &str,
    verb: Verb,
    att: &Attachment,
    stdin: &Value,
) -> Result<Vec<u8>, CniError> {
    let path = find_plugin(ty, &att.cni_path).ok_or_else(|| {
        CniError(format!(
            "CNI plugin {ty} not found in {}",
            att.cni_path.replace(':', ", ")
        ))
    })?;
    let mut cmd = Command::new(&path);
    cmd.env("CNI_COMMAND", verb.as_str())
        .env("CNI_CONTAINERID", &att.container_id)
        .env("CNI_NETNS", &att.netns)
        .env("CNI_IFNAME", &att.ifname)
        .env("CNI_PATH", &att.cni_path)
        .env_remove("CNI_ARGS");
    if std::env::var_os("PATH").is_none() {
        cmd.env("PATH", DEFAULT_PATH);
    }
    let out = run_captured(&mut cmd, Some(stdin.to_string().as_bytes())).map_err(|e| {
        CniError(format!(
            "CNI plugin {ty}: cannot run {}: {e}",
            path.display()
        ))
    })?;
    if out.success() {
        return Ok(out.stdout);
    }
    Err(CniError(format!(
        "CNI plugin {ty} ({}): {}",
        verb.as_str(),
        error_message(&out.stdout, &out.stderr, &describe(&out.status))
    )))
}

/// What a process run by [`run_captured`] left behind.
#[derive(Debug, Clone)]
pub(crate) struct Captured {
    /// How it ended.
    pub status: ExitStatus,
    /// Everything it wrote on stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote on stderr.
    pub stderr: Vec<u8>,
}

impl Captured {
    /// Whether it exited with status 0.
    pub(crate) fn success(&self) -> bool {
        self.status.code == Some(0)
    }
}

/// Runs a command to completion through the process's [`Reaper`] (the one place that waits),
/// feeding it `input` (else `/dev/null`) and capturing stdout and stderr. The child starts with
/// an empty signal mask.
pub(crate) fn run_captured(cmd: &mut Command, input: Option<&[u8]>) -> io::Result<Captured> {
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let spawned = Reaper::global().spawn(cmd)?;
    // Threads feed stdin and drain stderr while stdout is read here, so no pipe can fill up and
    // block the child. If a thread cannot start, its pipe is closed instead (no panic).
    let feeder = match (spawned.stdin, input) {
        (Some(mut w), Some(data)) => {
            let data = data.to_vec();
            // A child that exits without reading its stdin closes the pipe: its status tells.
            std::thread::Builder::new()
                .spawn(move || {
                    let _ = w.write_all(&data);
                })
                .ok()
        }
        _ => None,
    };
    let err_reader = spawned.stderr.and_then(|mut e| {
        std::thread::Builder::new()
            .spawn(move || {
                let mut buf = Vec::new();
                let _ = e.read_to_end(&mut buf);
                buf
            })
            .ok()
    });
    let mut stdout = Vec::new();
    if let Some(mut o) = spawned.stdout {
        let _ = o.read_to_end(&mut stdout);
    }
    let stderr = err_reader.and_then(|h| h.join().ok()).unwrap_or_default();
    if let Some(h) = feeder {
        let _ = h.join();
    }
    let status = spawned
        .exit
        .recv()
        .map_err(|_| io::Error::other("lost the exit status of a child process"))?;
    Ok(Captured {
        status,
        stdout,
        stderr,
    })
}

/// `ADD` through the whole list; returns the final result.
pub(crate) fn add(
    list: &Value,
    att: &Attachment,
    ports: &[PortMapping],
) -> Result<Value, CniError> {
    let mut prev: Option<Value> = None;
    for plugin in plugins(list)? {
        let ty = plugin_type(plugin)?;
        let input = plugin_stdin(list, plugin, prev.as_ref(), ports);
        let out = exec_plugin(ty, Verb::Add, att, &input)?;
        let result: Value = serde_json::from_slice(&out).map_err(|e| {
            CniError(format!(
                "CNI plugin {ty} (ADD) returned an unreadable result: {e}"
            ))
        })?;
        if !result.is_object() {
            return Err(CniError(format!(
                "CNI plugin {ty} (ADD) returned a result that is not an object"
            )));
        }
        prev = Some(result);
    }
    prev.ok_or_else(|| CniError("network configuration has no plugins".into()))
}

/// `DEL` through the list in reverse, every plugin getting `prev_result` (the saved ADD result,
/// when there is one). Runs every plugin even when one fails; returns the first failure.
pub(crate) fn del(
    list: &Value,
    att: &Attachment,
    ports: &[PortMapping],
    prev_result: Option<&Value>,
) -> Result<(), CniError> {
    let mut first_err = None;
    for plugin in plugins(list)?.into_iter().rev() {
        let ty = plugin_type(plugin)?;
        let input = plugin_stdin(list, plugin, prev_result, ports);
        if let Err(e) = exec_plugin(ty, Verb::Del, att, &input) {
            first_err.get_or_insert(e);
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn web() -> Vec<PortMapping> {
        vec![PortMapping {
            host_port: 8080,
            container_port: 80,
            protocol: "tcp".into(),
        }]
    }

    #[test]
    fn conflist_shape() {
        let l = conflist();
        assert_eq!(l["cniVersion"], "1.0.0");
        assert_eq!(l["name"], "gatevm");
        let p = plugins(&l).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0]["type"], "bridge");
        assert_eq!(p[0]["bridge"], "gatevm0");
        assert_eq!(p[0]["isGateway"], true);
        assert_eq!(p[0]["ipMasq"], true);
        assert_eq!(p[0]["hairpinMode"], true);
        assert_eq!(p[0]["ipam"]["type"], "host-local");
        assert_eq!(p[0]["ipam"]["ranges"][0][0]["subnet"], "10.88.0.0/16");
        assert_eq!(p[0]["ipam"]["routes"][0]["dst"], "0.0.0.0/0");
        assert_eq!(p[1]["type"], "portmap");
        assert!(has_capability(p[1], "portMappings"));
        assert!(!has_capability(p[0], "portMappings"));
        // The text is stable and parses back to the same document.
        let t = conflist_text(&l);
        assert_eq!(t, conflist_text(&conflist()));
        assert!(t.ends_with("}\n"));
        assert_eq!(serde_json::from_str::<Value>(&t).unwrap(), l);
    }

    #[test]
    fn ensure_file_writes_only_when_missing_or_different() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("net.d/10-gatevm.conflist");
        assert!(ensure_file(&p, "a\n").unwrap());
        assert!(!ensure_file(&p, "a\n").unwrap());
        assert!(ensure_file(&p, "b\n").unwrap());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "b\n");
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn stdin_of_first_add_plugin_has_name_version_and_no_prev_result() {
        let l = conflist();
        let p = plugins(&l).unwrap();
        let s = plugin_stdin(&l, p[0], None, &web());
        assert_eq!(s["name"], "gatevm");
        assert_eq!(s["cniVersion"], "1.0.0");
        assert_eq!(s["type"], "bridge");
        assert!(s.get("prevResult").is_none());
        // The bridge does not declare portMappings, so it gets no runtimeConfig.
        assert!(s.get("runtimeConfig").is_none());
    }

    #[test]
    fn stdin_of_portmap_has_prev_result_and_port_mappings() {
        let l = conflist();
        let p = plugins(&l).unwrap();
        let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.88.0.2/16"}]});
        let s = plugin_stdin(&l, p[1], Some(&prev), &web());
        assert_eq!(s["prevResult"], prev);
        assert_eq!(
            s["runtimeConfig"]["portMappings"],
            json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}])
        );
        assert_eq!(s["capabilities"]["portMappings"], true);
        // No ports: still the capability argument, as an empty list.
        let s = plugin_stdin(&l, p[1], None, &[]);
        assert_eq!(s["runtimeConfig"]["portMappings"], json!([]));
    }

    #[test]
    fn runtime_config_is_merged_not_replaced() {
        let l = json!({"cniVersion": "1.0.0", "name": "n", "plugins": [
            {"type": "portmap", "capabilities": {"portMappings": true},
             "runtimeConfig": {"other": 1}, "prevResult": {"stale": true}}
        ]});
        let p = plugins(&l).unwrap();
        let s = plugin_stdin(&l, p[0], None, &web());
        assert_eq!(s["runtimeConfig"]["other"], 1);
        assert_eq!(s["runtimeConfig"]["portMappings"][0]["hostPort"], 8080);
        assert!(s.get("prevResult").is_none());
    }

    #[test]
    fn bad_lists_are_rejected() {
        assert!(plugins(&json!({})).is_err());
        assert!(plugins(&json!({"plugins": []})).is_err());
        assert!(plugins(&json!({"plugins": [1]})).is_err());
        assert!(plugins(&json!({"plugins": [{"type": "../bin/sh"}]})).is_err());
        assert!(plugins(&json!({"plugins": [{"type": ""}]})).is_err());
        assert!(plugins(&json!({"plugins": [{"bridge": "x"}]})).is_err());
    }

    #[test]
    fn plugin_error_messages() {
        let out = br#"{"cniVersion":"1.0.0","code":11,"msg":"failed to allocate for range 0","details":"no IP addresses available"}"#;
        assert_eq!(
            error_message(out, b"", "exited with status 1"),
            "failed to allocate for range 0: no IP addresses available"
        );
        let out = br#"{"code":7,"msg":"invalid config"}"#;
        assert_eq!(error_message(out, b"", "x"), "invalid config");
        assert_eq!(error_message(br#"{"code":7}"#, b"", "x"), "error code 7");
        assert_eq!(
            error_message(b"garbage", b"first\nlast line\n\n", "x"),
            "last line"
        );
        assert_eq!(
            error_message(b"", b"", "exited with status 2"),
            "exited with status 2"
        );
    }

    /// A fake plugin: records its environment and stdin, answers a result naming itself.
    fn fake_plugin(dir: &Path, name: &str, body: &str) {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn attachment(dir: &Path) -> Attachment {
        Attachment {
            container_id: "web".into(),
            netns: "/run/netns/gatevm-web".into(),
            ifname: "eth0".into(),
            cni_path: format!("/nonexistent:{}", dir.display()),
        }
    }

    fn recording_plugin(dir: &Path, name: &str) {
        let log = dir.join("log");
        fake_plugin(
            dir,
            name,
            &format!(
                "cat > {log}.{name}.$CNI_COMMAND.in\n\
                 echo \"{name} $CNI_COMMAND $CNI_CONTAINERID $CNI_NETNS $CNI_IFNAME\" >> {log}\n\
                 [ \"$CNI_COMMAND\" = ADD ] && echo '{{\"cniVersion\":\"1.0.0\",\"from\":\"{name}\"}}'\n\
                 exit 0",
                log = log.display()
            ),
        );
    }

    #[test]
    fn add_chains_results_and_del_runs_in_reverse_with_the_add_result() {
        let d = tempfile::tempdir().unwrap();
        recording_plugin(d.path(), "bridge");
        recording_plugin(d.path(), "portmap");
        let att = attachment(d.path());
        let l = conflist();
        let result = add(&l, &att, &web()).unwrap();
        assert_eq!(result["from"], "portmap");
        let read = |f: &str| -> Value {
            serde_json::from_str(&std::fs::read_to_string(d.path().join(f)).unwrap()).unwrap()
        };
        let bridge_in = read("log.bridge.ADD.in");
        assert!(bridge_in.get("prevResult").is_none());
        assert_eq!(bridge_in["name"], "gatevm");
        let portmap_in = read("log.portmap.ADD.in");
        assert_eq!(portmap_in["prevResult"]["from"], "bridge");
        assert_eq!(
            portmap_in["runtimeConfig"]["portMappings"][0]["containerPort"],
            80
        );

        del(&l, &att, &web(), Some(&result)).unwrap();
        assert_eq!(read("log.bridge.DEL.in")["prevResult"]["from"], "portmap");
        assert_eq!(read("log.portmap.DEL.in")["prevResult"]["from"], "portmap");
        let log = std::fs::read_to_string(d.path().join("log")).unwrap();
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(
            lines,
            [
                "bridge ADD web /run/netns/gatevm-web eth0",
                "portmap ADD web /run/netns/gatevm-web eth0",
                "portmap DEL web /run/netns/gatevm-web eth0",
                "bridge DEL web /run/netns/gatevm-web eth0",
            ]
        );
    }

    #[test]
    fn add_reports_the_failing_plugins_msg_and_del_keeps_going() {
        let d = tempfile::tempdir().unwrap();
        fake_plugin(
            d.path(),
            "bridge",
            "cat >/dev/null\n[ \"$CNI_COMMAND\" = DEL ] && exit 0\n\
             echo '{\"cniVersion\":\"1.0.0\",\"code\":11,\"msg\":\"no IP addresses available\"}'\nexit 1",
        );
        fake_plugin(
            d.path(),
            "portmap",
            &format!(
                "cat >/dev/null\ntouch {}/portmap-ran\necho oops >&2\nexit 3",
                d.path().display()
            ),
        );
        let att = attachment(d.path());
        let e = add(&conflist(), &att, &[]).unwrap_err();
        assert_eq!(e.0, "CNI plugin bridge (ADD): no IP addresses available");
        assert!(!d.path().join("portmap-ran").exists());
        // DEL: portmap fails first (reverse order), bridge still runs.
        let e = del(&conflist(), &att, &[], None).unwrap_err();
        assert_eq!(e.0, "CNI plugin portmap (DEL): oops");
        assert!(d.path().join("portmap-ran").exists());
    }

    #[test]
    fn missing_plugin_and_bad_result() {
        let d = tempfile::tempdir().unwrap();
        let att = attachment(d.path());
        let e = add(&conflist(), &att, &[]).unwrap_err();
        assert!(
            e.0.starts_with("CNI plugin bridge not found in /nonexistent, "),
            "{e}"
        );
        fake_plugin(d.path(), "bridge", "cat >/dev/null\necho not-json");
        let e = add(&conflist(), &att, &[]).unwrap_err();
        assert!(e.0.contains("unreadable result"), "{e}");
    }
}
