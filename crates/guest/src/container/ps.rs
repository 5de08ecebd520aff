//! `container ps`: the containers of a namespace joined with their tasks, and their published
//! ports (from the `gatevm.ports` label).

use super::args::{self, parse_ports_label};
use super::ctr::{self, ContainerRow, CtrError, TaskRow};
use super::network;
use super::run::PORTS_LABEL;
use super::{print, Failure};
use crate::log::error_chain;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// One listed container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// Container name.
    pub name: String,
    /// Image reference.
    pub image: String,
    /// `running`, `stopped`, `created` (no task), `paused`, …
    pub status: String,
    /// Pid of its init process while it has live processes.
    pub pid: Option<u32>,
    /// Published ports, `GUESTPORT:CONTAINERPORT/PROTO`.
    pub ports: Vec<String>,
}

/// Joins containers and tasks by id (sorted by name); `ports` maps ids to their port specs.
pub(crate) fn join(
    containers: &[ContainerRow],
    tasks: &[TaskRow],
    ports: &BTreeMap<String, Vec<String>>,
) -> Vec<Entry> {
    let mut out: Vec<Entry> = containers
        .iter()
        .map(|c| {
            let task = tasks.iter().find(|t| t.id == c.id);
            Entry {
                name: c.id.clone(),
                image: c.image.clone(),
                status: task.map_or_else(|| "created".to_string(), |t| t.status.clone()),
                pid: task.filter(|t| t.is_running() && t.pid > 0).map(|t| t.pid),
                ports: ports.get(&c.id).cloned().unwrap_or_default(),
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The `--json` document: an array of `{name, image, status, pid, ports}`.
pub(crate) fn render_json(entries: &[Entry]) -> String {
    let v: Vec<Value> = entries
        .iter()
        .map(|e| {
            json!({
                "name": e.name,
                "image": e.image,
                "status": e.status,
                "pid": e.pid,
                "ports": e.ports,
            })
        })
        .collect();
    let mut s = serde_json::to_string_pretty(&Value::Array(v)).unwrap_or_else(|_| "[]".into());
    s.push('\n');
    s
}

/// The table: `NAME IMAGE STATUS PORTS`, columns padded to their widest cell.
pub(crate) fn render_table(entries: &[Entry]) -> String {
    let rows: Vec<[String; 4]> = std::iter::once([
        "NAME".to_string(),
        "IMAGE".to_string(),
        "STATUS".to_string(),
        "PORTS".to_string(),
    ])
    .chain(entries.iter().map(|e| {
        [
            e.name.clone(),
            e.image.clone(),
            e.status.clone(),
            e.ports.join(", "),
        ]
    }))
    .collect();
    let mut widths = [0usize; 3];
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i < 3 {
                line.push_str(&format!("{cell:<w$}   ", w = widths[i]));
            } else {
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `gatevm-guest container ps ARGS…`.
pub(crate) fn main(argv: &[String]) -> i32 {
    let o = match args::parse_ps(argv) {
        Ok(o) => o,
        Err(e) => return Failure::new(2, error_chain(&e)).report(),
    };
    match list(&o.namespace) {
        Ok(entries) => {
            print(&if o.json {
                render_json(&entries)
            } else {
                render_table(&entries)
            });
            0
        }
        Err(e) => Failure::new(1, error_chain(&e)).report(),
    }
}

fn list(ns: &str) -> Result<Vec<Entry>, CtrError> {
    ctr::check_running()?;
    let containers = ctr::containers(ns)?;
    let tasks = ctr::tasks(ns)?;
    let mut ports = BTreeMap::new();
    for c in &containers {
        let label = ctr::labels(ns, &c.id)
            .ok()
            .and_then(|l| l.get(PORTS_LABEL).cloned());
        let specs: Vec<String> = match label {
            Some(l) => parse_ports_label(&l)
                .iter()
                .map(|p| p.to_string())
                .collect(),
            // Not labelled (or the label could not be read): the saved state, if it is ours.
            None => match network::load(&c.id) {
                Ok(Some(st)) if st.namespace == ns => {
                    st.ports.iter().map(|p| p.to_string()).collect()
                }
                _ => Vec::new(),
            },
        };
        ports.insert(c.id.clone(), specs);
    }
    Ok(join(&containers, &tasks, &ports))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Entry> {
        let containers = ctr::parse_containers(
            "CONTAINER    IMAGE                               RUNTIME\n\
             web          docker.io/library/nginx:latest      io.containerd.runc.v2\n\
             job          docker.io/library/busybox:latest    io.containerd.runc.v2\n\
             idle         docker.io/library/busybox:latest    io.containerd.runc.v2\n",
        );
        let tasks = ctr::parse_tasks(
            "TASK    PID     STATUS\n\
             web     4242    RUNNING\n\
             job     4300    STOPPED\n",
        );
        let mut ports = BTreeMap::new();
        ports.insert(
            "web".to_string(),
            vec!["8080:80/tcp".to_string(), "8443:443/tcp".to_string()],
        );
        join(&containers, &tasks, &ports)
    }

    #[test]
    fn join_by_id() {
        let e = sample();
        assert_eq!(
            e.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            ["idle", "job", "web"]
        );
        assert_eq!(e[0].status, "created");
        assert_eq!(e[0].pid, None);
        assert_eq!(e[1].status, "stopped");
        assert_eq!(e[1].pid, None);
        assert_eq!(e[2].status, "running");
        assert_eq!(e[2].pid, Some(4242));
        assert_eq!(e[2].ports, ["8080:80/tcp", "8443:443/tcp"]);
        assert!(e[1].ports.is_empty());
    }

    #[test]
    fn json_document() {
        let v: Value = serde_json::from_str(&render_json(&sample())).unwrap();
        assert_eq!(
            v[2],
            json!({
                "name": "web",
                "image": "docker.io/library/nginx:latest",
                "status": "running",
                "pid": 4242,
                "ports": ["8080:80/tcp", "8443:443/tcp"],
            })
        );
        assert_eq!(v[0]["pid"], Value::Null);
        assert_eq!(v[0]["ports"], json!([]));
        assert_eq!(render_json(&[]), "[]\n");
    }

    #[test]
    fn table() {
        let t = render_table(&sample());
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines,
            [
                "NAME   IMAGE                              STATUS    PORTS",
                "idle   docker.io/library/busybox:latest   created",
                "job    docker.io/library/busybox:latest   stopped",
                "web    docker.io/library/nginx:latest     running   8080:80/tcp, 8443:443/tcp",
            ]
        );
        assert_eq!(render_table(&[]), "NAME   IMAGE   STATUS   PORTS\n");
    }
}
