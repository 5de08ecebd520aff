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
