//! Talking to containerd through `ctr`: running it, and reading its whitespace tables.

use crate::cni::run_captured;
use crate::reaper::describe;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// containerd's socket; its absence means containerd is not running.
pub(crate) const SOCKET: &str = "/run/containerd/containerd.sock";
/// Where Debian installs `ctr`.
pub(crate) const CTR: &str = "/usr/bin/ctr";

/// A failed `ctr` call, or containerd not running.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CtrError {
    /// `ctr` could not be started.
    #[error("cannot run ctr")]
    Spawn(#[source] std::io::Error),
    /// `ctr` failed and said why (its message, see [`error_line`]).
    #[error("{0}")]
    Failed(String),
    /// `ctr` failed without a message.
    #[error("ctr {args} failed ({status})")]
    Status {
        /// Its arguments, joined by spaces.
        args: String,
        /// How it ended.
        status: String,
    },
    /// containerd's socket is missing.
    #[error("containerd is not running (no {SOCKET})")]
    NotRunning,
}

/// A `ctr` command for a namespace (`ctr --address SOCKET --namespace NS ARGS…`).
pub(crate) fn command(ns: &str, args: &[&str]) -> Command {
    let prog = if Path::new(CTR).exists() { CTR } else { "ctr" };
    let mut cmd = Command::new(prog);
    cmd.arg("--address")
        .arg(SOCKET)
        .arg("--namespace")
        .arg(ns)
        .args(args);
    cmd
}

/// Runs `ctr` to completion with captured output; stdout on success, else ctr's error message.
pub(crate) fn output(ns: &str, args: &[&str]) -> Result<String, CtrError> {
    let out = run_captured(&mut command(ns, args), None).map_err(CtrError::Spawn)?;
    if out.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let err = error_line(&String::from_utf8_lossy(&out.stderr));
        Err(if err.is_empty() {
            CtrError::Status {
                args: args.join(" "),
                status: describe(&out.status),
            }
        } else {
            CtrError::Failed(err)
        })
    }
}

/// The message of a ctr failure: its last non-empty stderr line without the `ctr: ` prefix
/// (logrus lines: their `msg="…"`).
pub(crate) fn error_line(stderr: &str) -> String {
    let line = stderr
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    if let Some(m) = line.strip_prefix("ctr: ") {
        return m.trim().to_string();
    }
    if let Some(i) = line.find("msg=\"") {
        let rest = &line[i + 5..];
        let mut msg = String::new();
        let mut chars = rest.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        msg.push(n);
                    }
                }
                '"' => break,
                c => msg.push(c),
            }
        }
        return msg;
    }
    line.to_string()
}

/// One row of `ctr containers ls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ContainerRow {
    /// Container id (gatevm's name).
    pub id: String,
    /// Image reference (`-` when none).
    pub image: String,
}

/// One row of `ctr tasks ls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TaskRow {
    /// Container id.
    pub id: String,
    /// Pid of the task's init process.
    pub pid: u32,
    /// Status in lower case: `running`, `stopped`, `created`, `paused`, `pausing`, `unknown`.
    pub status: String,
}

impl TaskRow {
    /// Whether the task has live processes (anything but `stopped` and `created`).
    pub(crate) fn is_running(&self) -> bool {
        !matches!(self.status.as_str(), "stopped" | "created")
    }
}

/// Rows of a tabwriter table, without its header line (the first line, starting with `header`).
fn rows<'a>(out: &'a str, header: &str) -> Vec<Vec<&'a str>> {
    let mut lines = out
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|cols| !cols.is_empty())
        .peekable();
    if lines.peek().is_some_and(|cols| cols[0] == header) {
        lines.next();
    }
    lines.collect()
}

/// Parses `ctr containers ls` (`CONTAINER IMAGE RUNTIME`).
pub(crate) fn parse_containers(out: &str) -> Vec<ContainerRow> {
    rows(out, "CONTAINER")
        .into_iter()
        .filter(|c| c.len() >= 2)
        .map(|c| ContainerRow {
            id: c[0].to_string(),
            image: c[1].to_string(),
        })
        .collect()
}

/// Parses `ctr tasks ls` (`TASK PID STATUS`).
pub(crate) fn parse_tasks(out: &str) -> Vec<TaskRow> {
    rows(out, "TASK")
        .into_iter()
        .filter(|c| c.len() >= 3)
        .filter_map(|c| {
            Some(TaskRow {
                id: c[0].to_string(),
                pid: c[1].parse().ok()?,
                status: c[2].to_ascii_lowercase(),
            })
        })
        .collect()
}

/// Parses a `-q` listing: one name per line.
pub(crate) fn parse_quiet(out: &str) -> Vec<String> {
    out.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// The labels in `ctr containers info` output (`{"Labels": {...}, ...}`).
pub(crate) fn parse_info_labels(out: &str) -> BTreeMap<String, String> {
    let Ok(v) = serde_json::from_str::<Value>(out) else {
        return BTreeMap::new();
    };
    v.get("Labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// Image names stored in a namespace.
pub(crate) fn images(ns: &str) -> Result<Vec<String>, CtrError> {
    output(ns, &["images", "ls", "-q"]).map(|o| parse_quiet(&o))
}

/// Container ids of a namespace.
pub(crate) fn container_ids(ns: &str) -> Result<Vec<String>, CtrError> {
    output(ns, &["containers", "ls", "-q"]).map(|o| parse_quiet(&o))
}

/// Containers of a namespace with their images.
pub(crate) fn containers(ns: &str) -> Result<Vec<ContainerRow>, CtrError> {
    output(ns, &["containers", "ls"]).map(|o| parse_containers(&o))
}

/// Tasks of a namespace.
pub(crate) fn tasks(ns: &str) -> Result<Vec<TaskRow>, CtrError> {
    output(ns, &["tasks", "ls"]).map(|o| parse_tasks(&o))
}

/// The task of one container, if it has one.
pub(crate) fn task(ns: &str, id: &str) -> Result<Option<TaskRow>, CtrError> {
    Ok(tasks(ns)?.into_iter().find(|t| t.id == id))
}

/// Labels of one container.
pub(crate) fn labels(ns: &str, id: &str) -> Result<BTreeMap<String, String>, CtrError> {
    output(ns, &["containers", "info", id]).map(|o| parse_info_labels(&o))
}

/// Whether containerd's socket exists.
pub(crate) fn check_running() -> Result<(), CtrError> {
    if Path::new(SOCKET).exists() {
        Ok(())
    } else {
        Err(CtrError::NotRunning)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containers_table() {
        let out = "CONTAINER    IMAGE                                RUNTIME                  \n\
                   web          docker.io/library/nginx:latest       io.containerd.runc.v2    \n\
                   raw          -                                    io.containerd.runc.v2    \n\
                   \n";
        assert_eq!(
            parse_containers(out),
            vec![
                ContainerRow {
                    id: "web".into(),
                    image: "docker.io/library/nginx:latest".into()
                },
                ContainerRow {
                    id: "raw".into(),
                    image: "-".into()
                },
            ]
        );
        assert!(parse_containers("CONTAINER    IMAGE    RUNTIME    \n").is_empty());
        assert!(parse_containers("").is_empty());
        // Only the first line is the header.
        let out = "CONTAINER    IMAGE    RUNTIME\nCONTAINER    img      io.containerd.runc.v2\n";
        assert_eq!(parse_containers(out)[0].id, "CONTAINER");
    }

    #[test]
    fn tasks_table() {
        let out = "TASK    PID     STATUS    \n\
                   web     1234    RUNNING\n\
                   job     0       STOPPED\n\
                   new     77      CREATED\n\
                   frz     88      PAUSED\n\
                   bad     x       RUNNING\n";
        let t = parse_tasks(out);
        assert_eq!(t.len(), 4);
        assert_eq!(
            t[0],
            TaskRow {
                id: "web".into(),
                pid: 1234,
                status: "running".into()
            }
        );
        assert_eq!(t[1].status, "stopped");
        assert!(t[0].is_running());
        assert!(!t[1].is_running());
        assert!(!t[2].is_running());
        assert!(t[3].is_running());
    }

    #[test]
    fn quiet_lists() {
        assert_eq!(
            parse_quiet("docker.io/library/busybox:latest\n\nweb\n"),
            vec!["docker.io/library/busybox:latest", "web"]
        );
    }

    #[test]
    fn info_labels() {
        let out = r#"{
            "ID": "web",
            "Labels": {"gatevm.ports": "8080:80/tcp", "io.containerd.image.config.stop-signal": "SIGQUIT", "n": 1},
            "Image": "docker.io/library/nginx:latest"
        }"#;
        let l = parse_info_labels(out);
        assert_eq!(
            l.get("gatevm.ports").map(String::as_str),
            Some("8080:80/tcp")
        );
        assert_eq!(l.len(), 2);
        assert!(parse_info_labels(r#"{"ID":"x"}"#).is_empty());
        assert!(parse_info_labels("not json").is_empty());
    }

    #[test]
    fn ctr_error_lines() {
        assert_eq!(
            error_line("ctr: container \"web\": already exists\n"),
            "container \"web\": already exists"
        );
        assert_eq!(
            error_line(
                "some output\nctr: failed to create shim task: OCI runtime create failed\n\n"
            ),
            "failed to create shim task: OCI runtime create failed"
        );
        assert_eq!(
            error_line(
                r#"time="2024-01-01T00:00:00Z" level=fatal msg="failed to dial \"/run/x\": context deadline exceeded""#
            ),
            r#"failed to dial "/run/x": context deadline exceeded"#
        );
        assert_eq!(error_line("plain"), "plain");
        assert_eq!(error_line(""), "");
    }
}
