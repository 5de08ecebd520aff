//! Helpers of the k3s profile's tests.

use super::plan::{parse_plan, Plan};
use serde_json::json;
use std::fs;
use std::path::Path;

/// A complete plan as the host writes it.
pub(crate) const FULL: &str = r#"{
    "args": ["--write-kubeconfig-mode=0600", "--data-dir=/var/lib/gatevm/k3s",
             "--https-listen-port=6443",
             "--container-runtime-endpoint=unix:///run/containerd/containerd.sock"],
    "data_dir": "/var/lib/gatevm/k3s",
    "cni": {"file": "10-gatevm-bridge.conflist", "json": "{\"cniVersion\":\"1.0.0\"}"},
    "notes": ["ignored by the guest"]
}"#;

/// A plan for `data_dir` with the usual arguments plus `extra`.
pub(crate) fn plan_for(data_dir: &Path, extra: &[&str]) -> Plan {
    let mut args = vec![
        format!("--data-dir={}", data_dir.display()),
        "--container-runtime-endpoint=unix:///run/containerd/containerd.sock".to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let v = json!({ "args": args, "data_dir": data_dir, "cni": null });
    parse_plan(&v.to_string()).unwrap()
}

/// Writes `text` to `p`, creating its directory.
pub(crate) fn write(p: &Path, text: &str) {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, text).unwrap();
}

/// The sorted names in `dir`.
pub(crate) fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}
