//! A stand-in for k3s, for the k3s profile's end-to-end test on machines without k3s (no package
//! registry carries it). It is not Kubernetes: it does what gatevm relies on k3s doing.
//!
//! - `fake-k3s --version` prints a k3s-style version line.
//! - `fake-k3s server ARGS...` records its arguments and the manifests it finds in
//!   `<data-dir>/server/manifests` in `/run/fake-k3s.json`, writes a k3s-shaped kubeconfig to
//!   `/etc/rancher/k3s/k3s.yaml` (embedded CA and client credentials, real certificates and key
//!   generated at start, shaped like k3s's), and accepts TCP connections on the API port (6443
//!   or `--https-listen-port`, noted in `/run/fake-k3s.api-port`), answering each with
//!   `fake-k3s\n`, until it is terminated.
//! - `fake-k3s kubectl get --raw=/readyz` connects to that API port and prints `ok` when the
//!   server answers; otherwise it fails (exit 1) with kubectl's `Unable to connect to the
//!   server 127.0.0.1:PORT: ...` on stderr. `kubectl drain NODE ...` and `kubectl delete node
//!   NODE` are recorded, one line each, in `/run/fake-k3s-kubectl.log`.
//! - `fake-k3s agent ARGS...` reaches the server named by `--server https://IP:PORT` over TCP
//!   (retrying for a minute), records its arguments and the server's answer in
//!   `/run/fake-k3s.json` (`role`, `args`, `server_answer`), then serves the kubelet's health
//!   port 127.0.0.1:10248 (gatevm's readiness for an agent). `fake-k3s kubectl get nodes ...` asks the same way
//!   and prints `True` (the node's Ready condition, as gatevm's status asks for it).
//! - As a stand-in for a gateway workload, when the manifests hold gatevm's TLS Secret
//!   (`gatevm-gateway-tls.yaml`), it serves TLS with that Secret's server pair on port
//!   [`GATEWAY_PORT`], requiring a client certificate signed by the Secret's `ca.crt`, and
//!   answers `gateway\n`.
//!
//! # Failing on purpose
//!
//! Tests make it fail by writing words into [`SWITCHES`] (`/run/fake-k3s.fail`, in the guest:
//! `gatevm exec NAME -- sh -c 'echo api-down > /run/fake-k3s.fail'`). The file is read on every
//! request, so a switch takes effect at the next one and is undone by removing the word (or the
//! file); `/run` is emptied at each boot, so a restart clears them all.
//!
//! - `api-down`: the API server closes each connection without answering, so `/readyz` fails
//!   with `Unable to connect to the server 127.0.0.1:PORT: EOF`.
//! - `node-not-ready`: `kubectl get nodes` prints `False`.
//! - `gateway-other-ca`: the gateway serves a certificate of a CA of its own (made at start),
//!   not the Secret's.
//! - `gateway-refuse-client`: the gateway requires a client certificate of that other CA, so it
//!   turns the instance's client certificate away after the handshake.

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

/// Standard base64 with padding.
fn base64_encode(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A kubeconfig shaped like k3s's, with real credentials made at start: a server CA, a client
/// CA, and a client certificate for `system:admin` signed by the client CA, bundled with it
/// (k3s puts both in `client-certificate-data`), and its key.
fn kubeconfig() -> Result<String, rcgen::Error> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    };
    let ca = |cn: &str| -> Result<(rcgen::Certificate, KeyPair), rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(vec![])?;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, cn);
        Ok((p.self_signed(&key)?, key))
    };
    let (server_ca, _) = ca("k3s-server-ca@fake")?;
    let (client_ca, client_ca_key) = ca("k3s-client-ca@fake")?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(vec![])?;
    p.distinguished_name
        .push(DnType::CommonName, "system:admin");
    p.distinguished_name
        .push(DnType::OrganizationName, "system:masters");
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client = p.signed_by(&key, &client_ca, &client_ca_key)?;
    let ca_data = base64_encode(server_ca.pem().as_bytes());
    let cert_data = base64_encode(format!("{}{}", client.pem(), client_ca.pem()).as_bytes());
    let key_data = base64_encode(key.serialize_pem().as_bytes());
    Ok(format!(
        "apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: {ca_data}
    server: https://127.0.0.1:6443
  name: default
contexts:
- context:
    cluster: default
    user: default
  name: default
current-context: default
kind: Config
preferences: {{}}
users:
- name: default
  user:
    client-certificate-data: {cert_data}
    client-key-data: {key_data}
"
    ))
}

/// Where the stand-in gateway listens (in the NodePort range, like a real gateway Service).
const GATEWAY_PORT: u16 = 30443;

/// Standard base64, as in Secret data.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// A `key: value` of the Secret's data.
fn secret_field(yaml: &str, key: &str) -> Option<Vec<u8>> {
    let want = format!("{key}:");
    let line = yaml.lines().find(|l| l.trim_start().starts_with(&want))?;
    base64_decode(line.trim_start()[want.len()..].trim())
}

/// Where the switches are read (see the crate's doc).
const SWITCHES: &str = "/run/fake-k3s.fail";

/// Where `server` notes its API port for `kubectl`.
const API_PORT_FILE: &str = "/run/fake-k3s.api-port";

/// Where `kubectl drain` and `kubectl delete node` are recorded.
const KUBECTL_LOG: &str = "/run/fake-k3s-kubectl.log";

/// `agent ARGS`: records its arguments in `/run/fake-k3s.json`, reaches the server named by
/// `--server https://IP:PORT` over TCP (retrying for a minute) and records what it answered
/// (`server_answer`), then serves the kubelet's health port (127.0.0.1:10248, gatevm's
/// readiness for an agent) until it is terminated.
fn agent(args: &[String]) -> std::io::Result<()> {
    use std::io::Read;
    let url = arg_value(args, "--server").unwrap_or_default();
    let hostport = url
        .strip_prefix("https://")
        .unwrap_or(&url)
        .trim_end_matches('/')
        .to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let answer = loop {
        let got = std::net::ToSocketAddrs::to_socket_addrs(&hostport)
            .ok()
            .and_then(|mut a| a.next())
            .and_then(|addr| {
                std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)).ok()
            })
            .and_then(|c| {
                c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                    .ok()?;
                let mut got = Vec::new();
                let _ = c.take(64).read_to_end(&mut got);
                Some(String::from_utf8_lossy(&got).trim().to_string())
            })
            .filter(|s| !s.is_empty());
        match got {
            Some(a) => break a,
            None if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(500))
            }
            None => break String::new(),
        }
    };
    let report = format!(
        "{{\"role\": \"agent\", \"args\": [{}], \"server_answer\": {}}}\n",
        args.iter()
            .map(|a| json_str(a))
            .collect::<Vec<_>>()
            .join(", "),
        json_str(&answer)
    );
    std::fs::write("/run/fake-k3s.json", report)?;
    if answer.is_empty() {
        return Err(std::io::Error::other(format!(
            "cannot reach the server {url}"
        )));
    }
    let listener = std::net::TcpListener::bind(("127.0.0.1", 10248))?;
    for mut c in listener.incoming().flatten() {
        let _ = c.write_all(b"ok\n");
    }
    Ok(())
}

/// Whether the switch `word` is on now.
fn switched(word: &str) -> bool {
    std::fs::read_to_string(SWITCHES).is_ok_and(|s| s.split_whitespace().any(|w| w == word))
}

/// A CA of the stand-in's own and a server certificate it signed for 127.0.0.1 and localhost,
/// as PEM: what a gateway serves when it was not given the instance's Secret.
fn other_ca() -> Result<(String, String, String), rcgen::Error> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate()?;
    let mut p = CertificateParams::new(vec![])?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(DnType::CommonName, "fake-k3s other CA");
    let ca = p.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(vec!["localhost".to_string()])?;
    p.subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    let leaf = p.signed_by(&key, &ca, &ca_key)?;
    Ok((ca.pem(), leaf.pem(), key.serialize_pem()))
}

/// A TLS server configuration: the pair `crt`/`key`, requiring a client certificate of `ca`.
fn tls_config(crt: &[u8], key: &[u8], ca: &[u8]) -> Result<rustls::ServerConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider.clone())
            .build()
            .map_err(|e| e.to_string())?;
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(crt).map_err(|e| e.to_string())?],
            PrivateKeyDer::from_pem_slice(key).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())
}

/// Serves TLS with the Secret's server pair, requiring a client certificate of its CA (or, as
/// the switches say, failing: see the crate's doc).
fn gateway(secret_yaml: &str) -> Result<(), String> {
    use std::sync::Arc;
    let field = |k: &str| secret_field(secret_yaml, k).ok_or(format!("no {k} in the Secret"));
    let (crt, key, ca) = (field("tls.crt")?, field("tls.key")?, field("ca.crt")?);
    let (other_ca, other_crt, other_key) = other_ca().map_err(|e| e.to_string())?;
    let (other_ca, other_crt, other_key) = (
        other_ca.as_bytes(),
        other_crt.as_bytes(),
        other_key.as_bytes(),
    );
    let good = Arc::new(tls_config(&crt, &key, &ca)?);
    let wrong_server = Arc::new(tls_config(other_crt, other_key, &ca)?);
    let wrong_client = Arc::new(tls_config(&crt, &key, other_ca)?);
    let l = std::net::TcpListener::bind(("0.0.0.0", GATEWAY_PORT)).map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let cfg = if switched("gateway-other-ca") {
                wrong_server.clone()
            } else if switched("gateway-refuse-client") {
                wrong_client.clone()
            } else {
                good.clone()
            };
            std::thread::spawn(move || {
                s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                    .ok();
                if let Ok(mut c) = rustls::ServerConnection::new(cfg) {
                    let mut t = rustls::Stream::new(&mut c, &mut s);
                    let _ = t.write_all(b"gateway\n");
                    let _ = t.flush();
                }
            });
        }
    });
    Ok(())
}

/// What `kubectl` does first: reach the API server, which answers `fake-k3s`. `Err` is
/// kubectl's line for a server it cannot reach.
fn reach_api() -> Result<(), String> {
    use std::io::Read;
    let port: u16 = std::fs::read_to_string(API_PORT_FILE)
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or(6443);
    let unable = |why: &str| format!("Unable to connect to the server 127.0.0.1:{port}: {why}");
    let addr = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port));
    let t = std::time::Duration::from_secs(5);
    let c = std::net::TcpStream::connect_timeout(&addr, t)
        .map_err(|e| unable(&format!("connect: {e}")))?;
    c.set_read_timeout(Some(t)).ok();
    let mut got = Vec::new();
    let _ = c.take(64).read_to_end(&mut got);
    match got.as_slice() {
        b"fake-k3s\n" => Ok(()),
        b"" => Err(unable("EOF")),
        other => Err(unable(&format!(
            "unexpected answer {:?}",
            String::from_utf8_lossy(other)
        ))),
    }
}

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
    let secret = format!("{data_dir}/server/manifests/gatevm-gateway-tls.yaml");
    if let Ok(y) = std::fs::read_to_string(&secret) {
        if let Err(e) = gateway(&y) {
            eprintln!("fake-k3s: gateway: {e}");
        }
    }
    let listener = std::net::TcpListener::bind(("0.0.0.0", port))?;
    std::fs::write(API_PORT_FILE, format!("{port}\n"))?;
    std::fs::create_dir_all("/etc/rancher/k3s")?;
    let kubeconfig = kubeconfig().map_err(std::io::Error::other)?;
    std::fs::write("/etc/rancher/k3s/k3s.yaml", kubeconfig)?;
    for mut c in listener.incoming().flatten() {
        // Down: the connection is closed at once, unanswered.
        if !switched("api-down") {
            let _ = c.write_all(b"fake-k3s\n");
        }
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
        // What gatevm's status asks: `kubectl get --raw=/readyz` and the node's Ready condition;
        // what an agent's delete asks: `kubectl drain NODE ...` and `kubectl delete node NODE`
        // (recorded in KUBECTL_LOG, one line each).
        Some("kubectl") => {
            let rest = args.get(1..).unwrap_or_default();
            let readyz = matches!(rest, [get, raw] if get == "get" && raw == "--raw=/readyz");
            let nodes = matches!(rest,
                [get, nodes, ..] if get == "get" && (nodes == "nodes" || nodes == "node"));
            let removal = matches!(rest, [drain, _, ..] if drain == "drain")
                || matches!(rest, [delete, node, _] if delete == "delete" && node == "node");
            if !readyz && !nodes && !removal {
                eprintln!(
                    "fake-k3s: kubectl: only get --raw=/readyz, get node(s), drain and delete node"
                );
                std::process::exit(1);
            }
            if let Err(e) = reach_api() {
                eprintln!("{e}");
                std::process::exit(1);
            }
            if removal {
                use std::io::Write as _;
                let line = format!("{}\n", rest.join(" "));
                let logged = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(KUBECTL_LOG)
                    .and_then(|mut f| f.write_all(line.as_bytes()));
                if let Err(e) = logged {
                    eprintln!("fake-k3s: {KUBECTL_LOG}: {e}");
                    std::process::exit(1);
                }
                return;
            }
            if let Err(e) = reach_api() {
                eprintln!("{e}");
                std::process::exit(1);
            }
            if readyz {
                println!("ok");
            } else if switched("node-not-ready") {
                print!("False");
            } else {
                print!("True");
            }
        }
        Some("server") => {
            if let Err(e) = server(&args[1..]) {
                eprintln!("fake-k3s: {e}");
                std::process::exit(1);
            }
        }
        Some("agent") => {
            if let Err(e) = agent(&args[1..]) {
                eprintln!("fake-k3s: {e}");
                std::process::exit(1);
            }
        }
        _ => {
            eprintln!("fake-k3s: usage: fake-k3s --version | server [ARGS] | agent [ARGS]");
            std::process::exit(2);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_round_trips() {
        for s in ["", "f", "fo", "foo", "foob", "fooba", "foobar"] {
            let e = super::base64_encode(s.as_bytes());
            assert_eq!(super::base64_decode(&e).unwrap(), s.as_bytes(), "{e}");
        }
        assert_eq!(super::base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(super::base64_encode(b"fo"), "Zm8=");
    }

    /// gatevm takes the stand-in's kubeconfig as it takes k3s's (the end-to-end test relies on it).
    #[test]
    fn its_kubeconfig_passes_gatevm_checks() {
        let yaml = super::kubeconfig().unwrap();
        let out = gatevm_k3s::kubeconfig::instance_kubeconfig(&yaml, "t", 7000).unwrap();
        assert!(out.contains("client-key-data: "), "{out}");
    }
}
