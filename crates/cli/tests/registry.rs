//! End-to-end tests of `gatevm image pull` with per-instance registry settings and proxies,
//! against a real registry (Debian's docker-registry) on the host's 127.0.0.1, filled with
//! Debian's skopeo. The guest reaches the host's loopback through passt's gateway address
//! (`--allow-host-loopback`); nothing leaves the host.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NAME: &str = "e2e-pull";
/// The host's loopback as the guest sees it through passt with `--allow-host-loopback`.
const HOST: &str = "192.168.127.1";

/// A registry on 127.0.0.1 for the test's life.
struct Registry {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tools(test: &str) -> Option<PathBuf> {
    let reg = std::env::var_os("GATEVM_HOST_REGISTRY").map(PathBuf::from);
    let skopeo = Command::new("skopeo").arg("--version").output().is_ok();
    match reg {
        Some(p) if p.is_file() && skopeo => Some(p),
        _ => {
            gatevm_testkit::skip(
                test,
                "needs Debian's docker-registry (GATEVM_HOST_REGISTRY, set by scripts/test.sh from scripts/host-registry.sh) and skopeo",
            );
            None
        }
    }
}

fn start_registry(bin: &Path) -> Registry {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let child = Command::new(bin)
        .args(["serve", &config.display().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting docker-registry");
    let reg = Registry {
        child,
        port,
        _dir: dir,
    };
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the registry did not listen"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    reg
}

/// Pushes a docker archive into the registry as `repo:tag` with skopeo.
fn push(archive: &Path, port: u16, repo_tag: &str) {
    let out = Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            "--dest-tls-verify=false",
            &format!("docker-archive:{}", archive.display()),
            &format!("docker://127.0.0.1:{port}/{repo_tag}"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo copy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A forwarding HTTP proxy on 127.0.0.1 that records each connection's first request line and
/// sends everything to `upstream` (the registry takes absolute-form requests as they come).
fn start_proxy(upstream: u16) -> (u16, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let rec = seen.clone();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let rec = rec.clone();
            std::thread::spawn(move || {
                let mut client = conn;
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n") && head.len() < 8192 {
                    if client.read(&mut b).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let line = String::from_utf8_lossy(&head).trim().to_string();
                rec.lock().unwrap().push(line.clone());
                let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    return;
                };
                if line.starts_with("CONNECT ") {
                    // A tunnel (containerd tries HTTPS first): the rest of the request head
                    // goes, then the bytes flow to the registry as they are.
                    let mut rest = Vec::new();
                    while !rest.ends_with(b"\r\n\r\n") && rest.len() < 65536 {
                        if client.read(&mut b).unwrap_or(0) == 0 {
                            return;
                        }
                        rest.push(b[0]);
                        if rest == b"\r\n" {
                            break;
                        }
                    }
                    let _ = client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
                } else {
                    let _ = up.write_all(&head);
                }
                let (mut c2, mut u2) = (client.try_clone().unwrap(), up.try_clone().unwrap());
                let t = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c2, &mut u2);
                    let _ = u2.shutdown(std::net::Shutdown::Write);
                });
                let _ = std::io::copy(&mut up, &mut client);
                let _ = client.shutdown(std::net::Shutdown::Write);
                let _ = t.join();
            });
        }
    });
    (port, seen)
}

fn run(args: &[&str]) -> (i32, String, String) {
    run_gatevm(args)
}

fn listed(ns_ref: &str) -> bool {
    ok(&["image", "ls", NAME]).contains(ns_ref)
}

#[test]
fn pulls_through_insecure_registries_mirrors_and_a_proxy() {
    const TEST: &str = "pulls_through_insecure_registries_mirrors_and_a_proxy";
    if !enabled(TEST) || !have_busybox(TEST) {
        return;
    }
    let Some(registry_bin) = tools(TEST) else {
        return;
    };
    let reg = start_registry(&registry_bin);
    let t = tempfile::tempdir().unwrap();
    let archive = t.path().join("bb.tar");
    docker_archive_tagged(
        &archive,
        "gatevm-test/busybox:1",
        &[tar_of(&busybox_layer())],
        image_config(&[], &["sh"], &["PATH=/bin"], "/"),
    );
    push(&archive, reg.port, "test/bb:1");
    let (proxy_port, seen) = start_proxy(reg.port);
    let closed = free_port();

    let _guard = Instance(NAME);
    let _ = gatevm(&["delete", NAME, "--force"]);
    // Bad registry settings are refused before anything starts.
    fails(&["start", NAME, "--insecure-registry", "a/b"], "registry");
    fails(&["start", NAME, "--registry-mirror", "x"], "REGISTRY=URL");
    fails(
        &["start", NAME, "--registry-mirror", "r.example=ftp://m"],
        "http://",
    );
    fails(
        &[
            "start",
            NAME,
            "--registry-mirror",
            "r.example=https://u:pw@m.example",
        ],
        "password",
    );
    let no_proxy = Command::new(bin())
        .args(["start", NAME, "--proxy-env"])
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&no_proxy.stderr).contains("neither HTTP_PROXY"),
        "{}",
        String::from_utf8_lossy(&no_proxy.stderr)
    );

    let insecure = format!("{HOST}:{}", reg.port);
    let mirror = format!("localhost:1=http://{HOST}:{}", reg.port);
    let proxy = format!("http://{HOST}:{proxy_port}");
    let out = Command::new(bin())
        .args([
            "start",
            NAME,
            "--memory",
            "1024",
            "--net",
            "passt",
            "--allow-host-loopback",
            "--insecure-registry",
            &insecure,
            "--insecure-registry",
            "proxied.invalid:5000",
            "--registry-mirror",
            &mirror,
            "--proxy-env",
        ])
        .env("HTTP_PROXY", &proxy)
        .env("HTTPS_PROXY", &proxy)
        .env("NO_PROXY", "corp.example")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = status(NAME);
    assert_eq!(
        st["proxy_env"],
        serde_json::json!(["HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"]),
        "{st}"
    );
    assert!(
        !st.to_string().contains(&proxy),
        "status shows proxy values: {st}"
    );
    assert_eq!(st["registries"].as_array().unwrap().len(), 3, "{st}");

    // Straight from an insecure registry (the guest network is in NO_PROXY: no proxy).
    let r1 = format!("{HOST}:{}/test/bb:1", reg.port);
    let out = ok(&["image", "pull", NAME, &r1]);
    assert!(out.contains(&format!("pulled {r1}")), "{out}");
    assert!(listed(&r1));
    assert!(
        seen.lock().unwrap().is_empty(),
        "{:?}",
        seen.lock().unwrap()
    );

    // Only on the mirror: localhost:1 itself would refuse (port 1 in the guest).
    let r2 = "localhost:1/test/bb:1";
    let out = ok(&["image", "pull", NAME, r2]);
    assert!(out.contains("pulled localhost:1/test/bb:1"), "{out}");
    assert!(listed(r2));

    // Through the proxy: the guest's ctr asks it for the registry by a name only the proxy knows
    // (no name is looked up: a proxied request names its host to the proxy).
    let r3 = "proxied.invalid:5000/test/bb:1";
    let out = ok(&["image", "pull", NAME, r3, "--platform", "linux/amd64"]);
    assert!(
        out.contains("pulled proxied.invalid:5000/test/bb:1"),
        "{out}"
    );
    let asked = seen.lock().unwrap().clone();
    assert!(
        asked
            .iter()
            .any(|l| l.contains("http://proxied.invalid:5000/v2/")),
        "the proxy saw {asked:?}"
    );
    // containerd itself has the variables too (for k3s's pulls), NO_PROXY completed.
    let (code, env, err) = exec(
        NAME,
        &[
            "sh",
            "-c",
            "tr '\\0' '\\n' < /proc/$(pidof containerd)/environ | grep -i proxy",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(env.contains(&format!("HTTP_PROXY={proxy}")), "{env}");
    assert!(env.contains(&format!("http_proxy={proxy}")), "{env}");
    assert!(
        env.contains("NO_PROXY=corp.example,localhost,127.0.0.0/8")
            && env.contains("192.168.127.0/24"),
        "{env}"
    );

    // Failures: one line each, nothing left listed.
    let before = ok(&["image", "ls", NAME]);
    for (reference, want) in [
        (format!("{HOST}:{}/test/bb:nope", reg.port), "no such image"),
        (
            format!("{HOST}:{}/test/missing:1", reg.port),
            "no such image",
        ),
        (
            format!("{HOST}:{closed}/test/bb:1"),
            "cannot reach the registry",
        ),
    ] {
        let (code, _, err) = run(&["image", "pull", NAME, &reference]);
        assert_eq!(code, 1, "{reference}: {err}");
        assert!(err.contains(want), "{reference}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    for (reference, want) in [
        ("Bad Ref", "invalid image reference"),
        ("-x", "invalid image reference"),
    ] {
        let (code, _, err) = run(&["image", "pull", NAME, "--", reference]);
        assert_ne!(code, 0);
        assert!(err.contains(want), "{reference}: {err}");
    }
    let (code, _, err) = run(&["image", "pull", NAME, &r1, "--platform", "linux"]);
    assert_ne!(code, 0);
    assert!(err.contains("OS/ARCH"), "{err}");
    assert_eq!(
        ok(&["image", "ls", NAME]),
        before,
        "a failed pull left something listed"
    );

    // A pulled image runs.
    let (code, out, err) = run(&["run", NAME, &r1, "--", "sh", "-c", "echo pulled-runs"]);
    assert_eq!((code, out.as_str()), (0, "pulled-runs\n"), "{err}");
    ok(&["stop", NAME]);
    ok(&["delete", NAME]);
    assert_no_leftovers(NAME);
}
