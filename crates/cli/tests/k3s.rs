//! End-to-end test of the k3s profile. It needs a k3s binary, which no package registry this
//! project can reach carries: it runs when `GATEVM_K3S_BIN` names one (and `GATEVM_E2E=1`), and
//! otherwise prints that it did not run.

mod common;

use common::*;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

fn k3s_bin(test: &str) -> Option<PathBuf> {
    match std::env::var_os("GATEVM_K3S_BIN") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!("e2e {test}: NOT RUN: set GATEVM_K3S_BIN to a k3s binary (none is available from the package registries here)");
            None
        }
    }
}

fn kubectl(name: &str, args: &[&str], stdin: Option<&[u8]>) -> (i32, String, String) {
    let mut full = vec!["k3s", "kubectl"];
    full.extend_from_slice(args);
    exec(name, &full, stdin)
}

const MANIFEST: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: hello}
spec:
  replicas: 1
  selector: {matchLabels: {app: hello}}
  template:
    metadata: {labels: {app: hello}}
    spec:
      containers:
      - name: hello
        image: docker.io/gatevm-test/busybox:1
        imagePullPolicy: Never
        command: ["sh", "-c", "mkdir -p /www && echo hello-from-k3s > /www/index.html && exec httpd -f -p 8080 -h /www"]
        ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: hello}
spec:
  type: NodePort
  selector: {app: hello}
  ports: [{port: 8080, targetPort: 8080, nodePort: 30080}]
"#;

fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    panic!("{what} did not happen within {} s", within.as_secs());
}

#[test]
fn k3s_gateway_with_a_nodeport_across_a_restart() {
    const NAME: &str = "e2e-k3s";
    let test = "k3s_gateway_with_a_nodeport_across_a_restart";
    if !enabled(test) || !have_busybox(test) {
        return;
    }
    let Some(k3s) = k3s_bin(test) else { return };
    let _guard = Instance(NAME);
    let _ = gatevm(&["delete", NAME, "--force"]);
    let t = tempfile::tempdir().unwrap();
    let kubeconfig = t.path().join("kubeconfig");
    let manifest = t.path().join("marker.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: e2e-marker, namespace: default}\ndata: {placed: by-gatevm}\n",
    )
    .unwrap();
    let archive = t.path().join("busybox.tar");
    docker_archive_tagged(
        &archive,
        "gatevm-test/busybox:1",
        &[tar_of(&busybox_layer())],
        image_config(&[], &["sh"], &["PATH=/bin"], "/"),
    );
    let port = free_port();
    let fwd = format!("{port}:30080");
    let start = |extra: &[&str]| {
        let mut args = vec!["start", NAME];
        args.extend_from_slice(extra);
        let out = Command::new(bin())
            .args(&args)
            .env("KUBECONFIG", &kubeconfig)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    start(&[
        "--profile",
        "k3s",
        "--k3s",
        k3s.to_str().unwrap(),
        "-p",
        &fwd,
        "--memory",
        "3072",
        "--manifest",
        manifest.to_str().unwrap(),
    ]);
    let st = status(NAME);
    assert_eq!(st["healthy"], true, "{st}");
    // The context was merged into $KUBECONFIG's file.
    let merged = std::fs::read_to_string(&kubeconfig).unwrap();
    assert!(merged.contains(&format!("gatevm-{NAME}")), "{merged}");
    assert!(ok(&["kubeconfig", NAME]).contains("https://127.0.0.1:"));

    wait_for("the node to be Ready", Duration::from_secs(600), || {
        let (_, out, _) = kubectl(
            NAME,
            &[
                "get",
                "nodes",
                "-o",
                "jsonpath={.items[0].status.conditions[?(@.type==\"Ready\")].status}",
            ],
            None,
        );
        out.trim() == "True"
    });
    // The --manifest and the gateway's TLS Secret were deployed by k3s.
    wait_for(
        "the staged manifests to be applied",
        Duration::from_secs(300),
        || {
            let (a, _, _) = kubectl(NAME, &["get", "configmap", "e2e-marker"], None);
            let (b, _, _) = kubectl(
                NAME,
                &["-n", "gatevm", "get", "secret", "gateway-tls"],
                None,
            );
            a == 0 && b == 0
        },
    );
    ok(&["image", "import", NAME, archive.to_str().unwrap()]);
    let (code, _, err) = kubectl(NAME, &["apply", "-f", "-"], Some(MANIFEST.as_bytes()));
    assert_eq!(code, 0, "{err}");
    let got = read_forward(port, "hello-from-k3s", Duration::from_secs(600));
    assert!(
        got.is_some(),
        "the NodePort did not answer through the forward"
    );

    // A restart keeps the workload.
    ok(&["stop", NAME]);
    start(&[]);
    let got = read_forward(port, "hello-from-k3s", Duration::from_secs(600));
    assert!(
        got.is_some(),
        "the workload did not come back after a restart"
    );

    // Delete removes the context again.
    let out = Command::new(bin())
        .args(["delete", NAME, "--force"])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .unwrap();
    assert!(out.status.success());
    let after = std::fs::read_to_string(&kubeconfig).unwrap_or_default();
    assert!(!after.contains(&format!("gatevm-{NAME}")), "{after}");
}
