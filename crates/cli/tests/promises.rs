//! End-to-end tests of promises the README makes about instances over their life: what a restart
//! keeps and drops, `start --reset`, image namespaces and container networking (growing the state
//! disk is in `footprint.rs`). They boot real VMs (`GATEVM_E2E=1`); image archives are built here from the host's
//! static busybox, so no network is needed.

mod common;

use common::*;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TAG: &str = "gatevm-test/busybox:1";
const REF: &str = "docker.io/gatevm-test/busybox:1";

/// A busybox image archive tagged [`TAG`].
fn busybox_archive(dir: &Path) -> PathBuf {
    let path = dir.join("busybox.tar");
    docker_archive_tagged(
        &path,
        TAG,
        &[tar_of(&busybox_layer())],
        image_config(&[], &["sh"], &["PATH=/bin"], "/"),
    );
    path
}

/// Runs gatevm with extra environment; returns (exit code, stdout, stderr).
fn run_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("running gatevm");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn run(args: &[&str]) -> (i32, String, String) {
    run_env(args, &[])
}

/// The image references `image ls --json` lists, with extra arguments and environment.
fn images_with(name: &str, extra: &[&str], env: &[(&str, &str)]) -> Vec<String> {
    let mut args = vec!["image", "ls", name, "--json"];
    args.extend_from_slice(extra);
    let (code, out, err) = run_env(&args, env);
    assert_eq!(code, 0, "image ls {extra:?}: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("image ls JSON");
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i["ref"].as_str().unwrap().to_string())
        .collect()
}

fn images(name: &str) -> Vec<String> {
    images_with(name, &[], &[])
}

fn images_in(name: &str, ns: &str) -> Vec<String> {
    images_with(name, &["--namespace", ns], &[])
}

/// `ps --json` as (name, status, pid) triples.
fn containers(name: &str) -> Vec<(String, String, serde_json::Value)> {
    let v: serde_json::Value = serde_json::from_str(&ok(&["ps", name, "--json"])).expect("ps JSON");
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["status"].as_str().unwrap().to_string(),
                c["pid"].clone(),
            )
        })
        .collect()
}

/// The instance's directory (the parent of its log directory, as `status --json` names it).
fn instance_dir(name: &str) -> PathBuf {
    let st = status(name);
    Path::new(st["logs"].as_str().expect("logs directory"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .len()
}

/// The settings `start` keeps: CPUs, memory and forwards as `status --json` shows them.
fn settings(name: &str) -> (serde_json::Value, serde_json::Value, serde_json::Value) {
    let st = status(name);
    (
        st["cpus"].clone(),
        st["memory_mib"].clone(),
        st["forwards"].clone(),
    )
}

/// The body of a successful `GET /` on 127.0.0.1:`port`, retried until it comes or `within`
/// passes (gvproxy accepts and closes connections while nothing listens behind the forward).
fn http_get(port: u16, within: Duration) -> Option<String> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut text = String::new();
            if s.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
                .is_ok()
                && s.read_to_string(&mut text).is_ok()
            {
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    if head.starts_with("HTTP/1.") && head.lines().next().unwrap().contains(" 200")
                    {
                        return Some(body.to_string());
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

#[test]
fn restart_drops_containers_keeps_images_settings_and_forwards() {
    const TEST: &str = "restart_drops_containers_keeps_images_settings_and_forwards";
    const NAME: &str = "e2e-prom-restart";
    if !enabled(TEST) || !have_busybox(TEST) {
        return;
    }
    let _guard = Instance(NAME);
    let _ = gatevm(&["delete", NAME, "--force"]);
    let t = tempfile::tempdir().unwrap();
    let archive = busybox_archive(t.path());
    let port = free_port();
    let fwd = format!("{port}:8080");
    // Settings other than the defaults, so that keeping them is seen.
    ok(&[
        "start",
        NAME,
        "--cpus",
        "1",
        "--memory",
        "1024",
        "-p",
        &fwd,
        "--allow-host-loopback",
        "--disk",
        "2G",
    ]);
    let first = settings(NAME);
    assert_eq!(
        first,
        (
            serde_json::json!(1),
            serde_json::json!(1024),
            serde_json::json!([format!("127.0.0.1:{port}:8080/tcp")])
        )
    );
    assert!(
        guest_reaches_host_loopback(NAME),
        "--allow-host-loopback did not let the guest through"
    );
    assert_eq!(
        ok(&["image", "import", NAME, archive.to_str().unwrap()]),
        format!("imported {REF}\n")
    );
    let (code, out, err) = run(&[
        "run", NAME, TAG, "--name", "srv", "-d", "--", "sleep", "600",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "srv\n");
    let before = containers(NAME);
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(
        (before[0].0.as_str(), before[0].1.as_str()),
        ("srv", "running")
    );
    assert!(
        before[0].2.is_u64(),
        "a running container has a pid: {before:?}"
    );

    // A plain start: no flags.
    ok(&["stop", NAME]);
    ok(&["start", NAME]);

    // The settings are those it last ran with, and they work.
    assert_eq!(settings(NAME), first);
    assert!(
        guest_reaches_host_loopback(NAME),
        "a plain start dropped --allow-host-loopback"
    );
    serve_in_guest(NAME, 8080);
    let want = format!("hello from {NAME}");
    let got = read_forward(port, &want, Duration::from_secs(30)).unwrap_or_default();
    assert!(
        got.contains(&want),
        "the kept forward did not answer: {got:?}"
    );

    // The container is there without a task; rm removes it.
    assert_eq!(
        containers(NAME),
        [(
            "srv".to_string(),
            "created".to_string(),
            serde_json::Value::Null
        )]
    );
    let (code, _, err) = run(&["rm", NAME, "srv"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(containers(NAME), []);

    // The image survived and runs.
    assert_eq!(images(NAME), [REF]);
    let (code, out, err) = run(&["run", NAME, REF, "--", "echo", "survived"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "survived\n");
}

#[test]
fn reset_discards_the_state_and_keeps_the_settings() {
    const TEST: &str = "reset_discards_the_state_and_keeps_the_settings";
    const NAME: &str = "e2e-prom-reset";
    if !enabled(TEST) || !have_busybox(TEST) {
        return;
    }
    let _guard = Instance(NAME);
    let _ = gatevm(&["delete", NAME, "--force"]);
    let t = tempfile::tempdir().unwrap();
    let archive = busybox_archive(t.path());
    let port = free_port();
    let fwd = format!("{port}:8080");
    ok(&[
        "start",
        NAME,
        "--cpus",
        "1",
        "--memory",
        "1024",
        "-p",
        &fwd,
        "--allow-host-loopback",
        "--disk",
        "2G",
        "--root-size",
        "1G",
    ]);
    let first = settings(NAME);
    let dir = instance_dir(NAME);
    assert_eq!(file_len(&dir.join("state.img")), 2 << 30);
    assert_eq!(file_len(&dir.join("rootfs-rw.img")), 1 << 30);

    // State: an image on the state disk, a file in the root's writable layer.
    assert_eq!(
        ok(&["image", "import", NAME, archive.to_str().unwrap()]),
        format!("imported {REF}\n")
    );
    assert_eq!(images(NAME), [REF]);
    let (code, _, err) = exec(
        NAME,
        &[
            "sh",
            "-c",
            "echo before-reset > /etc/promise-marker && sync",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    // The root's writable layer is the guest's own disk: the host mounts none of it.
    assert_eq!(mounts_under(&dir), Vec::<String>::new());
    // The file is in the writable layer: it survives a plain restart.
    ok(&["stop", NAME]);
    ok(&["start", NAME]);
    assert_eq!(
        exec(NAME, &["cat", "/etc/promise-marker"], None),
        (0, "before-reset\n".into(), String::new()),
        "the guest's write did not survive a restart"
    );
    assert_eq!(mounts_under(&dir), Vec::<String>::new());

    ok(&["stop", NAME]);
    let (code, _, err) = run(&["start", NAME, "--reset"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&format!("{NAME}: state discarded")), "{err}");

    // Afresh: no image, no file.
    assert_eq!(images(NAME), Vec::<String>::new());
    let (code, out, err) = exec(NAME, &["cat", "/etc/promise-marker"], None);
    assert_eq!(code, 1, "the file survived the reset: {out:?} {err:?}");
    assert!(
        err.contains("No such file or directory"),
        "the file survived the reset: {err:?}"
    );
    assert_eq!(mounts_under(&dir), Vec::<String>::new());

    // The same settings: CPUs, memory, forwards, loopback access, disk and root sizes.
    assert_eq!(settings(NAME), first);
    assert!(
        guest_reaches_host_loopback(NAME),
        "--reset dropped --allow-host-loopback"
    );
    assert_eq!(file_len(&dir.join("state.img")), 2 << 30);
    assert_eq!(file_len(&dir.join("rootfs-rw.img")), 1 << 30);
    serve_in_guest(NAME, 8080);
    let want = format!("hello from {NAME}");
    let got = read_forward(port, &want, Duration::from_secs(30)).unwrap_or_default();
    assert!(
        got.contains(&want),
        "the forward did not answer after the reset: {got:?}"
    );
}

#[test]
fn image_namespaces_and_container_networking() {
    const TEST: &str = "image_namespaces_and_container_networking";
    const NAME: &str = "e2e-prom-net";
    if !enabled(TEST) || !have_busybox(TEST) {
        return;
    }
    let _guard = Instance(NAME);
    let _ = gatevm(&["delete", NAME, "--force"]);
    let t = tempfile::tempdir().unwrap();
    let archive = busybox_archive(t.path());
    let a = archive.to_str().unwrap();
    let port = free_port();
    let fwd = format!("{port}:8080");
    ok(&["start", NAME, "-p", &fwd, "--disk", "2G"]);

    // --namespace: listed there, not in k8s.io.
    assert_eq!(
        ok(&["image", "import", NAME, a, "--namespace", "other"]),
        format!("imported {REF}\n")
    );
    assert_eq!(images_in(NAME, "other"), [REF]);
    assert_eq!(images(NAME), Vec::<String>::new());
    assert_eq!(images_in(NAME, "k8s.io"), Vec::<String>::new());
    // $GATEVM_NAMESPACE works the same, for import and ls.
    let third = [("GATEVM_NAMESPACE", "third")];
    let (code, out, err) = run_env(&["image", "import", NAME, a], &third);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("imported {REF}\n"));
    assert_eq!(images_with(NAME, &[], &third), [REF]);
    assert_eq!(images_in(NAME, "third"), [REF]);
    assert_eq!(images(NAME), Vec::<String>::new());
    assert_eq!(images_in(NAME, "other"), [REF]);
    // The default namespace.
    ok(&["image", "import", NAME, a]);
    assert_eq!(images(NAME), [REF]);

    // A server container published on guest port 8080, which the instance forwards: it serves
    // its own address on the gatevm0 bridge.
    let (code, out, err) = run(&[
        "run",
        NAME,
        TAG,
        "--name",
        "srv",
        "-d",
        "-p",
        "8080:80",
        "--",
        "sh",
        "-c",
        "mkdir -p /www && busybox ip -4 -o addr show eth0 | busybox awk '{print $4}' | busybox cut -d/ -f1 > /www/index.html && exec httpd -f -p 80 -h /www",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "srv\n");
    let body = http_get(port, Duration::from_secs(60))
        .expect("the published port did not answer from the host");
    let srv_ip = body.trim().to_string();
    assert!(
        srv_ip.starts_with("10.88.") && srv_ip.parse::<std::net::Ipv4Addr>().is_ok(),
        "the server's address {body:?} is not on the gatevm0 bridge"
    );

    // Another container reaches it by that address, from an address of its own. (No `wget -T`:
    // Debian bookworm's static busybox 1.35 crashes with it.)
    let (code, out, err) = run(&[
        "run",
        NAME,
        TAG,
        "--",
        "sh",
        "-c",
        &format!(
            "busybox ip -4 -o addr show eth0 | busybox awk '{{print $4}}' | busybox cut -d/ -f1 && busybox wget -q -O- http://{srv_ip}/"
        ),
    ]);
    assert_eq!(code, 0, "{out:?} {err:?}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out:?}");
    assert!(
        lines[0].starts_with("10.88.") && lines[0] != srv_ip,
        "the client's address {:?} (server {srv_ip})",
        lines[0]
    );
    assert_eq!(lines[1], srv_ip, "{out:?}");
    let (code, _, err) = run(&["rm", NAME, "srv", "--force"]);
    assert_eq!(code, 0, "{err}");
}
