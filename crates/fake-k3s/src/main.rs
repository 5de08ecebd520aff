//! A stand-in for k3s, for the k3s profile's end-to-end test on machines without k3s (no package
//! registry carries it). It is not Kubernetes: it does what gatevm relies on k3s doing.
//!
//! - `fake-k3s --version` prints a k3s-style version line.
//! - `fake-k3s kubectl get --raw=/readyz` prints `ok`; `fake-k3s kubectl get nodes ...` prints
//!   `True` (the node's Ready condition, as gatevm's status asks for it).
//! - `fake-k3s server ARGS...` records its arguments and the manifests it finds in
//!   `<data-dir>/server/manifests` in `/run/fake-k3s.json`, writes a k3s-shaped kubeconfig to
//!   `/etc/rancher/k3s/k3s.yaml` (embedded CA and client credentials; the data is not a real
//!   certificate), and accepts TCP connections on the API port (6443 or `--https-listen-port`),
//!   answering each with `fake-k3s\n`, until it is terminated.

use std::io::Write;

fn arg_value(args: &[String], flag: &str) -> Option<String> {
    let eq = format!("{flag}=");
    for (i, a) in args.iter().enumerate() {
        if let Some(v) = a.strip_prefix(&eq) {
            return Some(v.to_string());
        }
        if a == flag {
            return args.get(i + 1).cloned();
        }
    }
    None
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

const KUBECONFIG: &str = "apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: ZmFrZS1jYQ==
    server: https://127.0.0.1:6443
  name: default
contexts:
- context:
    cluster: default
    user: default
  name: default
current-context: default
kind: Config
preferences: {}
users:
- name: default
  user:
    client-certificate-data: ZmFrZS1jZXJ0
    client-key-data: ZmFrZS1rZXk=
";

fn server(args: &[String]) -> std::io::Result<()> {
    let data_dir = arg_value(args, "--data-dir").unwrap_or_else(|| "/var/lib/rancher/k3s".into());
    let port: u16 = arg_value(args, "--https-listen-port")
        .and_then(|p| p.parse().ok())
        .unwrap_or(6443);
    let mut manifests: Vec<String> = std::fs::read_dir(format!("{data_dir}/server/manifests"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    manifests.sort();
    let report = format!(
        "{{\"args\": [{}], \"manifests\": [{}]}}\n",
        args.iter()
            .map(|a| json_str(a))
            .collect::<Vec<_>>()
            .join(", "),
        manifests
            .iter()
            .map(|m| json_str(m))
            .collect::<Vec<_>>()
            .join(", ")
    );
    std::fs::write("/run/fake-k3s.json", report)?;
    let listener = std::net::TcpListener::bind(("0.0.0.0", port))?;
    std::fs::create_dir_all("/etc/rancher/k3s")?;
    std::fs::write("/etc/rancher/k3s/k3s.yaml", KUBECONFIG)?;
    for mut c in listener.incoming().flatten() {
        let _ = c.write_all(b"fake-k3s\n");
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--version") | Some("-v") => {
            println!("k3s version v1.31.0+k3s1 (fake0000)");
            println!("go version go1.22.0 (a stand-in for tests)");
        }
        // What gatevm's status asks: `kubectl get --raw=/readyz` and the node's Ready condition.
        Some("kubectl") => match args.get(1..).unwrap_or_default() {
            [get, raw] if get == "get" && raw == "--raw=/readyz" => println!("ok"),
            [get, nodes, ..] if get == "get" && nodes == "nodes" => print!("True"),
            _ => {
                eprintln!("fake-k3s: kubectl: only get --raw=/readyz and get nodes");
                std::process::exit(1);
            }
        },
        Some("server") => {
            if let Err(e) = server(&args[1..]) {
                eprintln!("fake-k3s: {e}");
                std::process::exit(1);
            }
        }
        _ => {
            eprintln!("fake-k3s: usage: fake-k3s --version | server [ARGS]");
            std::process::exit(2);
        }
    }
}
