//! End-to-end tests: they boot real VMs through the `gatevm` binary, as a user would.
//!
//! They run when `GATEVM_E2E=1` (scripts/test.sh sets it after `gatevm setup`); otherwise each
//! prints that it did not run. `GATEVM_BIN` names the gatevm binary (default: the one cargo built).

mod common;

use common::*;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn lifecycle_exec_forward_stop_delete() {
    if !enabled("lifecycle_exec_forward_stop_delete") {
        return;
    }
    let name = "e2e-life";
    let _guard = Instance(name);
    let _ = gatevm(&["delete", name, "--force"]);
    let port = free_port();
    let uport = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    ok(&[
        "start",
        name,
        "-p",
        &format!("{port}:8080"),
        "-p",
        &format!("{uport}:9000/udp"),
        "--memory",
        "1024",
    ]);

    let st = status(name);
    assert_eq!(st["state"], "running", "{st}");
    assert_eq!(st["healthy"], true, "{st}");
    assert_eq!(st["agent"]["connected"], true);
    assert_eq!(st["payloads"][0]["name"], "containerd");
    assert_eq!(st["payloads"][0]["state"], "ready");
    assert_eq!(st["forwards"][0], format!("127.0.0.1:{port}:8080/tcp"));
    assert!(st["vm_pid"].as_u64().is_some());

    // exec: stdout, stderr, exit codes, stdin, not found, not executable.
    assert_eq!(
        exec(name, &["sh", "-c", "echo out; echo err >&2; exit 3"], None),
        (3, "out\n".into(), "err\n".into())
    );
    assert_eq!(
        exec(name, &["hostname"], None),
        (0, format!("{name}\n"), String::new())
    );
    let (code, out, _) = exec(name, &["cat"], Some(b"piped through the guest\n"));
    assert_eq!((code, out.as_str()), (0, "piped through the guest\n"));
    let big: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let (code, out, _) = exec(name, &["sha256sum"], Some(&big));
    assert_eq!(code, 0);
    let want = {
        let o = Command::new("sha256sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut o = o;
        o.stdin.take().unwrap().write_all(&big).unwrap();
        String::from_utf8(o.wait_with_output().unwrap().stdout).unwrap()
    };
    assert_eq!(
        out.split_whitespace().next(),
        want.split_whitespace().next()
    );
    let (code, _, err) = exec(name, &["no-such-command"], None);
    assert_eq!(code, 127, "{err}");
    assert!(err.contains("no-such-command"), "{err}");
    let (code, _, err) = exec(
        name,
        &[
            "sh",
            "-c",
            "echo 'echo run' > /tmp/noexec; chmod 644 /tmp/noexec",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = exec(name, &["/tmp/noexec"], None);
    assert_eq!((code, out.as_str()), (126, ""), "{err}");
    assert!(err.contains("/tmp/noexec"), "{err}");
    let (code, _, err) = exec(name, &["/etc"], None);
    assert_eq!(code, 126, "{err}");
    let (code, _, _) = exec(name, &["sh", "-c", "kill -9 $$"], None);
    assert_eq!(code, 137);
    let (code, out, _) = exec(name, &["ctr", "version"], None);
    assert_eq!(code, 0);
    assert!(out.contains("Server:"), "{out}");

    // The guest cannot reach the host's loopback by default.
    assert!(
        !guest_reaches_host_loopback(name),
        "the guest reached the host loopback"
    );

    // A guest TCP service through the forward.
    serve_in_guest(name, 8080);
    assert_eq!(
        fetch(port).as_deref(),
        Some(format!("hello from {name}\n").as_str())
    );

    // A guest UDP echo service through a UDP forward.
    let script = "nohup perl -MIO::Socket::INET -e '$s = IO::Socket::INET->new(LocalPort => 9000, Proto => \"udp\") or die; while ($s->recv($m, 1024)) { $s->send(\"echo:$m\") }' >/dev/null 2>&1 &";
    assert_eq!(exec(name, &["sh", "-c", script], None).0, 0);
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut answer = None;
    for _ in 0..40 {
        udp.send_to(b"ping", ("127.0.0.1", uport)).unwrap();
        let mut buf = [0u8; 64];
        if let Ok((n, _)) = udp.recv_from(&mut buf) {
            answer = Some(String::from_utf8_lossy(&buf[..n]).into_owned());
            break;
        }
    }
    assert_eq!(
        answer.as_deref(),
        Some("echo:ping"),
        "no UDP answer through the forward"
    );

    // Refusals that leave the instance as it was.
    fails(&["start", name], "already running");
    fails(&["delete", name], "stop it first or use --force");
    assert_eq!(status(name)["healthy"], true);

    ok(&["stop", name]);
    let st = status(name);
    assert_eq!(st["state"], "stopped", "{st}");
    assert_eq!(st["stop_reason"], "stopped on request", "{st}");
    assert_no_leftovers(name);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the forward outlived the instance"
    );
    fails(&["exec", name, "--", "true"], "is not running");
    fails(&["stop", name], "is not running");
    fails(&["logs", name], "is not running");
    let console = ok(&["logs", name, "--console"]);
    assert!(
        console.contains("gatevm-guest"),
        "console log lacks the guest's lines"
    );

    ok(&["delete", name]);
    fails(&["status", name], "does not exist");
    assert_no_leftovers(name);
}

#[test]
fn two_instances_and_a_vm_killed_from_outside() {
    if !enabled("two_instances_and_a_vm_killed_from_outside") {
        return;
    }
    let (a, b) = ("e2e-two-a", "e2e-two-b");
    let _ga = Instance(a);
    let _gb = Instance(b);
    for n in [a, b] {
        let _ = gatevm(&["delete", n, "--force"]);
    }
    // Both start at once.
    let ta = std::thread::spawn(move || {
        gatevm(&["start", a, "--memory", "768", "--allow-host-loopback"])
    });
    let tb = std::thread::spawn(move || gatevm(&["start", b, "--memory", "768"]));
    for (n, t) in [(a, ta), (b, tb)] {
        let out = t.join().unwrap();
        assert!(
            out.status.success(),
            "start {n}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(exec(a, &["hostname"], None).1, format!("{a}\n"));
    assert_eq!(exec(b, &["hostname"], None).1, format!("{b}\n"));
    // Asked for, the host loopback is reachable.
    assert!(
        guest_reaches_host_loopback(a),
        "--allow-host-loopback did not let the guest through"
    );

    // Kill a's VM from outside: status tells within two seconds, b is unaffected.
    let pid = status(a)["vm_pid"].as_u64().expect("vm pid") as i32;
    // SAFETY: plain kill(2) of a process id we just read.
    assert_eq!(unsafe { libc::kill(pid, 9) }, 0);
    let t = Instant::now();
    loop {
        let st = status(a);
        if st["state"] == "stopped" {
            let reason = st["stop_reason"].as_str().unwrap_or_default().to_string();
            assert!(reason.contains("signal 9"), "{st}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "status still says {st}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_no_leftovers(a);
    assert_eq!(status(b)["healthy"], true);

    // The next start works.
    ok(&["start", a, "--memory", "768"]);
    assert_eq!(exec(a, &["true"], None).0, 0);
    ok(&["stop", a]);
    ok(&["stop", b]);
    assert_no_leftovers(a);
    assert_no_leftovers(b);
}

#[test]
fn foreground_start_stops_on_sigterm() {
    if !enabled("foreground_start_stops_on_sigterm") {
        return;
    }
    let name = "e2e-fg";
    let _guard = Instance(name);
    let _ = gatevm(&["delete", name, "--force"]);
    let mut child = Command::new(bin())
        .args(["start", name, "--foreground", "--memory", "768"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    loop {
        let out = gatevm(&["status", name, "--json"]);
        if out.status.success() {
            let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if st["healthy"] == true {
                break;
            }
        }
        if let Some(code) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("foreground start exited early ({code}): {err}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "not healthy within 120 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(exec(name, &["true"], None).0, 0);
    // SAFETY: kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let t = Instant::now();
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "foreground start did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(exit.success(), "exit status {exit}");
    let st = status(name);
    assert_eq!(st["state"], "stopped", "{st}");
    assert_eq!(st["stop_reason"], "stopped on request", "{st}");
    assert_no_leftovers(name);
}

#[test]
fn passt_network_forwards_and_keeps_the_host_loopback_closed() {
    if !enabled("passt_network_forwards_and_keeps_the_host_loopback_closed") {
        return;
    }
    let name = "e2e-passt";
    let _guard = Instance(name);
    let _ = gatevm(&["delete", name, "--force"]);
    let port = free_port();
    // passt takes IPv4 forwards only: refused before anything starts.
    let v6 = format!("[::1]:{port}:8080");
    fails(&["start", name, "--net", "passt", "-p", &v6], "IPv4 only");
    assert!(
        !run_dir(name).exists(),
        "a refused start made a run directory"
    );
    let publish = format!("{port}:8080");
    ok(&[
        "start", name, "--memory", "768", "--net", "passt", "-p", &publish,
    ]);
    let st = status(name);
    assert_eq!(st["net"], "passt", "{st}");
    assert_eq!(st["healthy"], true, "{st}");
    assert!(
        processes_of(name).iter().any(|p| p.contains("passt")),
        "no passt process marked as the instance's"
    );
    // A forward into the guest, through passt.
    serve_in_guest(name, 8080);
    let got = fetch(port).expect("the forward did not answer");
    assert_eq!(got, format!("hello from {name}\n"));
    // The guest's outbound TCP goes through passt too: to a listener on the host's own address.
    // Neither the gateway (which passt would map to the host's loopback) nor gvproxy's alias
    // reaches the host's loopback.
    assert!(!guest_reaches_host_loopback_via(name, "192.168.127.1"));
    assert!(!guest_reaches_host_loopback_via(name, "192.168.127.254"));
    ok(&["stop", name]);
    assert_no_leftovers(name);

    // Allowed, passt maps the gateway address to the host's loopback.
    ok(&["start", name, "--allow-host-loopback"]);
    assert_eq!(status(name)["net"], "passt", "the choice is kept");
    assert!(guest_reaches_host_loopback_via(name, "192.168.127.1"));
    ok(&["stop", name]);
    assert_no_leftovers(name);
}
