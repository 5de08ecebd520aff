//! Command-line behaviour that needs no VM: bad input is refused with one line and no state.

use std::process::{Command, Output};

fn gatevm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gatevm"))
        .args(args)
        .env(
            "GATEVM_DATA_DIR",
            std::env::temp_dir().join("gatevm-cli-test-data"),
        )
        .env(
            "GATEVM_RUN_DIR",
            std::env::temp_dir().join("gatevm-cli-test-run"),
        )
        .env_remove("RUST_LOG")
        .env_remove("GATEVM_RUNTIME_DIR")
        // Never the network: the pinned k3s download is pointed at a file that is not there.
        .env("GATEVM_K3S_URL", "file:///nonexistent/k3s")
        .env("GATEVM_K3S_SHA256", "0".repeat(64))
        .output()
        .expect("running gatevm")
}

/// A refused command: non-zero exit, one line on stderr containing `needle`, nothing on stdout.
fn refused(args: &[&str], code: i32, needle: &str) {
    let out = gatevm(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: stderr {err}");
    assert!(
        err.contains(needle),
        "{args:?}: stderr {err:?} lacks {needle:?}"
    );
    if code == 1 {
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: not one line: {err:?}"
        );
    }
    assert!(
        out.stdout.is_empty(),
        "{args:?}: stdout {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn bad_names() {
    let long = "a".repeat(64);
    for (name, needle) in [
        ("..", "may contain only"),
        ("a/b", "may contain only"),
        ("Upper", "may contain only"),
        ("trail-", "may contain only"),
        ("a_b", "may contain only"),
        (long.as_str(), "longer than 63"),
        ("", "is empty"),
    ] {
        refused(&["start", name], 1, needle);
        refused(&["stop", name], 1, needle);
        refused(&["status", name], 1, needle);
        refused(&["exec", name, "--", "true"], 1, needle);
        refused(&["delete", name], 1, needle);
    }
}

#[test]
fn bad_ports_and_sizes() {
    for (spec, needle) in [
        ("0:80", "not a number in 1-65535"),
        ("65536:80", "not a number in 1-65535"),
        ("80:99999", "not a number in 1-65535"),
        ("abc", "expected [ip:]hostport:guestport"),
        ("80:80/sctp", "is not tcp or udp"),
        ("300.1.1.1:80:80", "is not an IP address"),
    ] {
        refused(&["start", "x", "-p", spec], 1, needle);
    }
    refused(
        &["start", "x", "-p", "8080:80", "-p", "8080:81"],
        1,
        "forwarded twice",
    );
    refused(
        &["start", "x", "--cpus", "0"],
        1,
        "--cpus 0 is out of range",
    );
    refused(
        &["start", "x", "--cpus", "1000"],
        1,
        "--cpus 1000 is out of range",
    );
    refused(
        &["start", "x", "--memory", "10"],
        1,
        "--memory 10 MiB is out of range",
    );
    refused(
        &["start", "x", "--memory", "262144"],
        1,
        "more than this host's",
    );
    refused(&["start", "x", "--memory", "lots"], 2, "invalid value");
    refused(&["start", "x", "--cpus", "-1"], 2, "");
    refused(&["stop", "x", "--timeout", "99999"], 2, "");
}

#[test]
fn port_already_bound() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    refused(
        &["start", "x", "-p", &format!("{port}:80")],
        1,
        "is not available",
    );
}

#[test]
fn missing_instances() {
    refused(&["stop", "nosuch"], 1, "does not exist");
    refused(&["status", "nosuch"], 1, "does not exist");
    refused(&["exec", "nosuch", "--", "true"], 1, "does not exist");
    refused(&["logs", "nosuch"], 1, "does not exist");
    refused(&["delete", "nosuch"], 1, "does not exist");
    refused(&["exec", "x"], 2, "required");
    refused(&["exec", "x", "-e", "=v", "--", "true"], 1, "invalid --env");
    let out = gatevm(&["list", "--json"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
}

#[test]
fn help_documents_exit_codes() {
    let out = gatevm(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for w in ["Exit codes", "127", "start", "exec", "status"] {
        assert!(text.contains(w), "help lacks {w}");
    }
}

#[test]
fn doctor_reports_without_a_runtime() {
    let out = gatevm(&["doctor", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("doctor JSON");
    assert!(v["host"]["kvm_device"].is_boolean());
    assert!(v["hardware_virtualization"].is_boolean());
    assert!(
        v["runtime_error"]
            .as_str()
            .unwrap_or_default()
            .contains("gatevm setup"),
        "{v}"
    );
    assert_eq!(v["backends"][0]["name"], "qemu");
    assert_eq!(v["backends"][0]["available"], false);
    assert_eq!(v["backends"][1]["name"], "krun");
}

#[test]
fn k3s_profile_and_appliance_inputs() {
    refused(
        &["start", "k1", "--profile", "k3s", "--k3s", "/bin/true"],
        1,
        "like k3s",
    );
    // The pinned download is tried (one progress line), fails, and says how to supply k3s.
    let out = gatevm(&["start", "k1", "--profile", "k3s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.trim_end().lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(lines[0].starts_with("fetching k3s"), "{err}");
    assert!(
        lines[1].contains("needs a k3s binary: pass --k3s PATH")
            && lines[1].contains("the pinned download failed: fetching file:///nonexistent/k3s"),
        "{err}"
    );
    refused(&["start", "k1", "--no-kubeconfig"], 1, "--profile k3s");
    refused(
        &["start", "k1", "--gateway-port", "30443"],
        1,
        "--profile k3s",
    );
    let k3s = |extra: &[&str], needle: &str| {
        let mut args = vec!["start", "k1", "--profile", "k3s"];
        args.extend_from_slice(extra);
        refused(&args, 1, needle);
    };
    k3s(&["--gateway-port", "0"], "not a port");
    k3s(&["--gateway-port", "x:30443"], "not a port");
    k3s(&["--gateway-port", "8443:70000"], "not a port");
    k3s(&["--gateway-port", "6443"], "Kubernetes API");
    k3s(&["--gateway-secret", "noslash"], "NAMESPACE/NAME");
    k3s(&["--gateway-secret", "Bad/x"], "invalid namespace");
    k3s(&["--gateway-secret", "ns/"], "invalid secret name");
    k3s(&["--gateway-service", "nodot"], "NAME.NAMESPACE");
    k3s(&["--gateway-service", "a.B"], "NAME.NAMESPACE");
    k3s(&["--tls-san", "bad name"], "--tls-san");
    k3s(
        &["--api-port", "18443", "--gateway-port", "18443:30443"],
        "both use host port 18443",
    );
    refused(
        &["start", "k1", "--profile", "k3s", "--enable", "istio"],
        1,
        "istio",
    );
    refused(
        &[
            "start",
            "k1",
            "--profile",
            "k3s",
            "--manifest",
            "/nonexistent.yaml",
        ],
        1,
        "--manifest",
    );
    refused(&["start", "k1", "--profile", "docker"], 2, "docker");
    refused(&["start", "vmrun-1"], 1, "reserved for gatevm vm-run");
    refused(&["start", "k1", "--disk", "0"], 2, "out of range");
    refused(&["start", "k1", "--disk", "12M"], 2, "invalid disk size");
    refused(&["start", "k1", "--vmm", "xen"], 2, "unknown VMM");
    refused(&["setup", "--k3s", "/bin/true"], 1, "like k3s");
    refused(&["kubeconfig", "nothere"], 1, "does not exist");
    refused(
        &["image", "import", "nothere", "/etc/hostname"],
        1,
        "does not exist",
    );
    refused(&["image", "ls", "nothere"], 1, "does not exist");
    refused(
        &["image", "import", "x", "f", "--namespace", "a b"],
        2,
        "invalid namespace",
    );
    refused(&["run", "nothere", "busybox"], 1, "does not exist");
    refused(
        &["run", "x", "busybox", "-p", "80"],
        1,
        "GUESTPORT:CONTAINERPORT",
    );
    refused(
        &["run", "x", "busybox", "--name", "a/b"],
        1,
        "invalid container name",
    );
    refused(&["run", "x", "busybox", "-d", "-t"], 1, "--detach");
    refused(&["ps", "nothere"], 1, "does not exist");
    refused(&["rm", "nothere", "c"], 1, "does not exist");
    refused(
        &["vm-run", "--rootfs", "/nonexistent", "--", "true"],
        1,
        "--rootfs",
    );
    refused(&["vm-run"], 1, "no command");
    refused(&["vm-run", "--image", "/nonexistent.tar"], 1, "not a file");
    refused(
        &["vm-run", "--rootfs", "/tmp", "--image", "/x"],
        2,
        "cannot be used with",
    );
}
