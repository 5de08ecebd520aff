//! Command-line behaviour that needs no VM: bad input is refused with one line and no state.

use std::path::Path;
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
        // Never a system runtime of this host (`gatevm setup --system`).
        .env(
            "GATEVM_SYSTEM_DIR",
            std::env::temp_dir().join("gatevm-cli-test-system"),
        )
        // Never the network: the pinned k3s download is pointed at a file that is not there.
        .env("GATEVM_K3S_URL", "file:///nonexistent/k3s")
        .env("GATEVM_K3S_SHA256", "0".repeat(64))
        .output()
        .expect("running gatevm")
}

/// A refused command: exit `code`, nothing on stdout, and `line` as the first line of stderr,
/// exactly. A failure (1) prints only that line; a usage error (2) is clap's message, whose first
/// line names the argument and the problem, followed by usage hints.
fn refused(args: &[&str], code: i32, line: &str) {
    let err = refused_line(args, code);
    assert_eq!(
        err.lines().next().unwrap_or(""),
        line,
        "{args:?}: stderr {err:?}"
    );
}

/// As [`refused`], for a line with a part that depends on the host: it starts with `head` and
/// ends with `tail`.
fn refused_like(args: &[&str], code: i32, head: &str, tail: &str) {
    let err = refused_line(args, code);
    let first = err.lines().next().unwrap_or("");
    assert!(
        first.starts_with(head) && first.ends_with(tail) && first.len() >= head.len() + tail.len(),
        "{args:?}: stderr {err:?} is not {head:?}...{tail:?}"
    );
}

/// Runs a command that must be refused with `code` and returns its stderr.
fn refused_line(args: &[&str], code: i32) -> String {
    let out = gatevm(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{args:?}: stderr {err}");
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
    err
}

/// The one line of a refused instance name.
fn bad_name_line(name: &str) -> String {
    format!(
        "gatevm: error: instance name {name:?} may contain only a-z, 0-9 and '-', and must start and end with a letter or digit"
    )
}

/// The one line of a command on an instance that does not exist.
fn missing_line(name: &str) -> String {
    format!(
        "gatevm: error: instance {name:?} does not exist (create it with `gatevm start {name}`)"
    )
}

#[test]
fn bad_names() {
    let long = "a".repeat(64);
    let too_long = format!("gatevm: error: instance name {long:?} is longer than 63 characters");
    for (name, line) in [
        ("..", bad_name_line("..")),
        ("a/b", bad_name_line("a/b")),
        ("Upper", bad_name_line("Upper")),
        ("trail-", bad_name_line("trail-")),
        ("a_b", bad_name_line("a_b")),
        (long.as_str(), too_long.clone()),
        ("", "gatevm: error: instance name is empty".to_string()),
    ] {
        refused(&["start", name], 1, &line);
        refused(&["stop", name], 1, &line);
        refused(&["status", name], 1, &line);
        refused(&["exec", name, "--", "true"], 1, &line);
        refused(&["delete", name], 1, &line);
    }
}

#[test]
fn bad_ports_and_sizes() {
    for (spec, line) in [
        (
            "0:80",
            r#"gatevm: error: invalid port forward "0:80": host port "0" is not a number in 1-65535"#,
        ),
        (
            "65536:80",
            r#"gatevm: error: invalid port forward "65536:80": host port "65536" is not a number in 1-65535"#,
        ),
        (
            "80:99999",
            r#"gatevm: error: invalid port forward "80:99999": guest port "99999" is not a number in 1-65535"#,
        ),
        (
            "abc",
            r#"gatevm: error: invalid port forward "abc": expected [ip:]hostport:guestport[/tcp|/udp]"#,
        ),
        (
            "80:80/sctp",
            r#"gatevm: error: invalid port forward "80:80/sctp": protocol "sctp" is not tcp or udp"#,
        ),
        (
            "300.1.1.1:80:80",
            r#"gatevm: error: invalid port forward "300.1.1.1:80:80": "300.1.1.1" is not an IP address"#,
        ),
    ] {
        refused(&["start", "x", "-p", spec], 1, line);
    }
    refused(
        &["start", "x", "-p", "8080:80", "-p", "8080:81"],
        1,
        "gatevm: error: host port 127.0.0.1:8080/tcp is forwarded twice",
    );
    refused(
        &["start", "x", "--cpus", "0"],
        1,
        "gatevm: error: --cpus 0 is out of range: use 1 to 64",
    );
    refused(
        &["start", "x", "--cpus", "1000"],
        1,
        "gatevm: error: --cpus 1000 is out of range: use 1 to 64",
    );
    refused(
        &["start", "x", "--memory", "10"],
        1,
        "gatevm: error: --memory 10 MiB is out of range: use 256 to 262144 MiB",
    );
    // The host's RAM is part of the line.
    refused_like(
        &["start", "x", "--memory", "262144"],
        1,
        "gatevm: error: --memory 262144 MiB is more than this host's ",
        " MiB of RAM",
    );
    refused(
        &["start", "x", "--memory", "lots"],
        2,
        "error: invalid value 'lots' for '--memory <MEMORY>': invalid digit found in string",
    );
    refused(
        &["start", "x", "--cpus", "-1"],
        2,
        "error: invalid value '-1' for '--cpus <CPUS>': -1 is not in 0..=4294967295",
    );
    refused(
        &["start", "x", "--memory", "-5"],
        2,
        "error: invalid value '-5' for '--memory <MEMORY>': -5 is not in 0..=4294967295",
    );
    refused(
        &["stop", "x", "--timeout", "99999"],
        2,
        "error: invalid value '99999' for '--timeout <TIMEOUT>': 99999 is not in 0..=3600",
    );
}

#[test]
fn port_already_bound() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    refused(
        &["start", "x", "-p", &format!("{port}:80")],
        1,
        &format!(
            "gatevm: error: host port 127.0.0.1:{port} (tcp) is not available: Address already in use (os error 98)"
        ),
    );
}

#[test]
fn missing_instances() {
    let missing = missing_line("nosuch");
    refused(&["stop", "nosuch"], 1, &missing);
    refused(&["status", "nosuch"], 1, &missing);
    refused(&["exec", "nosuch", "--", "true"], 1, &missing);
    refused(&["logs", "nosuch"], 1, &missing);
    refused(&["delete", "nosuch"], 1, &missing);
    refused(
        &["exec", "x"],
        2,
        "error: the following required arguments were not provided:",
    );
    let err = refused_line(&["exec", "x"], 2);
    assert_eq!(err.lines().nth(1), Some("  <CMD>..."), "{err}");
    refused(
        &["exec", "x", "-e", "=v", "--", "true"],
        1,
        r#"gatevm: error: invalid --env "=v": expected KEY=VALUE with a non-empty KEY"#,
    );
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
    // The first finding is the missing runtime, with the command that fixes it.
    assert_eq!(v["runtime_source"], "not-set-up", "{v}");
    let f = &v["findings"][0];
    let own = std::env::temp_dir().join("gatevm-cli-test-data/runtime/v1");
    if nix::unistd::geteuid().is_root() {
        assert_eq!(
            f["problem"],
            format!("no gatevm runtime: {} is not set up", own.display()),
            "{v}"
        );
        assert_eq!(f["fix"], "gatevm setup", "{v}");
    } else {
        assert_eq!(f["fix"], "sudo gatevm setup --system", "{v}");
    }
}

#[test]
fn k3s_profile_and_appliance_inputs() {
    // The supplied binary is checked as its copy in the cache directory, which the line names.
    let err = refused_line(
        &["start", "k1", "--profile", "k3s", "--k3s", "/bin/true"],
        1,
    );
    let line = err.trim_end();
    assert!(
        line.starts_with("gatevm: error: --k3s /")
            && line.contains("/k3s/supplied/")
            && line.ends_with(r#"/k3s does not answer --version like k3s ("k3s version v…")"#),
        "{line}"
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
    let k3s_only = "gatevm: error: --k3s, --api-port, --manifest, --images, --enable, --no-kubeconfig, --k3s-arg, --join and the --gateway-*/--tls-san flags belong to --profile k3s";
    refused(&["start", "k1", "--no-kubeconfig"], 1, k3s_only);
    refused(&["start", "k1", "--gateway-port", "30443"], 1, k3s_only);
    let k3s = |extra: &[&str], line: &str| {
        let mut args = vec!["start", "k1", "--profile", "k3s"];
        args.extend_from_slice(extra);
        refused(&args, 1, line);
    };
    k3s(
        &["--gateway-port", "0"],
        r#"gatevm: error: --gateway-port "0": "0" is not a port (1 to 65535)"#,
    );
    k3s(
        &["--gateway-port", "x:30443"],
        r#"gatevm: error: --gateway-port "x:30443": "x" is not a port (1 to 65535)"#,
    );
    k3s(
        &["--gateway-port", "8443:70000"],
        r#"gatevm: error: --gateway-port "8443:70000": "70000" is not a port (1 to 65535)"#,
    );
    k3s(
        &["--gateway-port", "6443"],
        r#"gatevm: error: --gateway-port "6443": guest port 6443 is the Kubernetes API (see --api-port)"#,
    );
    k3s(
        &["--gateway-secret", "noslash"],
        r#"gatevm: error: --gateway-secret "noslash": use NAMESPACE/NAME"#,
    );
    k3s(
        &["--gateway-secret", "Bad/x"],
        r#"gatevm: error: --gateway-secret: invalid namespace "Bad": contains 'B'; only lowercase letters, digits and '-' are allowed"#,
    );
    k3s(
        &["--gateway-secret", "ns/"],
        r#"gatevm: error: --gateway-secret: invalid secret name "": must not be empty"#,
    );
    k3s(
        &["--gateway-service", "nodot"],
        r#"gatevm: error: --gateway-service "nodot": use NAME.NAMESPACE, each lowercase letters, digits and '-'"#,
    );
    k3s(
        &["--gateway-service", "a.B"],
        r#"gatevm: error: --gateway-service "a.B": use NAME.NAMESPACE, each lowercase letters, digits and '-'"#,
    );
    k3s(
        &["--tls-san", "bad name"],
        r#"gatevm: error: --tls-san: invalid SAN "bad name": is neither an IP address nor a DNS name: ' ' is not allowed in a DNS name (letters, digits, '-' and '.' only)"#,
    );
    k3s(
        &["--api-port", "18443", "--gateway-port", "18443:30443"],
        "gatevm: error: --gateway-port and --api-port both use host port 18443",
    );
    k3s(
        &["--enable", "istio"],
        r#"gatevm: error: --enable "istio": not a k3s component gatevm turns off; use one of traefik, servicelb, metrics-server"#,
    );
    k3s(
        &["--manifest", "/nonexistent.yaml"],
        "gatevm: error: --manifest /nonexistent.yaml: No such file or directory (os error 2)",
    );
    refused(
        &["start", "k1", "--profile", "docker"],
        2,
        "error: invalid value 'docker' for '--profile <PROFILE>'",
    );
    let err = refused_line(&["start", "k1", "--profile", "docker"], 2);
    assert_eq!(
        err.lines().nth(1),
        Some("  [possible values: containerd, k3s]"),
        "{err}"
    );
    refused(
        &["start", "vmrun-1"],
        1,
        r#"gatevm: error: instance names starting with "vmrun-" are reserved for gatevm vm-run"#,
    );
    refused(
        &["start", "k1", "--disk", "0"],
        2,
        r#"error: invalid value '0' for '--disk <SIZE>': disk size "0" is out of range: use 1G to 16T"#,
    );
    refused(
        &["start", "k1", "--disk", "12M"],
        2,
        r#"error: invalid value '12M' for '--disk <SIZE>': invalid disk size "12M": use GiB, e.g. 32 or 32G or 1T"#,
    );
    refused(
        &["start", "k1", "--vmm", "xen"],
        2,
        r#"error: invalid value 'xen' for '--vmm <VMM>': unknown VMM "xen": use auto, krun or qemu"#,
    );
    refused(
        &["setup", "--k3s", "/bin/true"],
        1,
        r#"gatevm: error: --k3s /bin/true does not answer --version like k3s ("k3s version v…")"#,
    );
    let missing = missing_line("nothere");
    refused(&["kubeconfig", "nothere"], 1, &missing);
    refused(
        &["image", "import", "nothere", "/etc/hostname"],
        1,
        &missing,
    );
    refused(&["image", "ls", "nothere"], 1, &missing);
    refused(
        &["image", "import", "x", "f", "--namespace", "a b"],
        2,
        r#"error: invalid value 'a b' for '--namespace <NAMESPACE>': invalid namespace "a b": letters, digits, '.', '_' and '-', starting with a letter or digit"#,
    );
    refused(&["run", "nothere", "busybox"], 1, &missing);
    refused(
        &["run", "x", "busybox", "-p", "80"],
        1,
        r#"gatevm: error: invalid --publish "80": expected GUESTPORT:CONTAINERPORT"#,
    );
    refused(
        &["run", "x", "busybox", "--name", "a/b"],
        1,
        r#"gatevm: error: invalid container name "a/b": 1 to 63 of letters, digits, '_', '.', '-', starting with a letter or digit"#,
    );
    refused(
        &["run", "x", "busybox", "-d", "-t"],
        1,
        "gatevm: error: --detach runs the container in the background: it cannot take -t or -i",
    );
    refused(&["ps", "nothere"], 1, &missing);
    refused(&["rm", "nothere", "c"], 1, &missing);
    refused(
        &["vm-run", "--rootfs", "/nonexistent", "--", "true"],
        1,
        "gatevm: error: --rootfs /nonexistent: cannot be opened: No such file or directory (os error 2)",
    );
    refused(
        &["vm-run"],
        1,
        "gatevm: error: no command: give one after --, e.g. gatevm vm-run -- uname -a",
    );
    refused(
        &["vm-run", "--image", "/nonexistent.tar"],
        1,
        "gatevm: error: --image /nonexistent.tar is not a file: it does not exist",
    );
    refused(
        &["vm-run", "--rootfs", "/tmp", "--image", "/x"],
        2,
        "error: the argument '--rootfs <DIR>' cannot be used with '--image <ARCHIVE>'",
    );
}

/// Runs gatevm as an ordinary user, in data, run and cache directories of that user's: this
/// process when it is not root, else the user `gvtest` through `runuser`.
struct OrdinaryUser {
    /// Through `runuser -u gvtest` (this process is root).
    runuser: bool,
    dir: tempfile::TempDir,
    /// The user's uid and gid (for the files a test puts in its directories as root).
    ids: (u32, u32),
}

impl OrdinaryUser {
    /// None (and the test is reported skipped) where no ordinary user can run the binary.
    fn new(test: &str) -> Option<OrdinaryUser> {
        use std::os::unix::fs::chown;
        // SAFETY: geteuid and getegid have no preconditions and cannot fail.
        let me = unsafe { (libc::geteuid(), libc::getegid()) };
        let dir = tempfile::tempdir().unwrap();
        if me.0 != 0 {
            return Some(OrdinaryUser {
                runuser: false,
                dir,
                ids: me,
            });
        }
        if let Err(why) = ensure_gvtest() {
            gatevm_testkit::skip(test, why);
            return None;
        }
        let id = |flag: &str| -> Option<u32> {
            let out = Command::new("id").args([flag, "gvtest"]).output().ok()?;
            String::from_utf8_lossy(&out.stdout).trim().parse().ok()
        };
        let (Some(uid), Some(gid)) = (id("-u"), id("-g")) else {
            gatevm_testkit::skip(
                test,
                "running as root and there is no user gvtest to run as",
            );
            return None;
        };
        let bin = env!("CARGO_BIN_EXE_gatevm");
        let runs = Command::new("runuser")
            .args(["-u", "gvtest", "--", "test", "-x", bin])
            .status()
            .is_ok_and(|s| s.success());
        if !runs {
            gatevm_testkit::skip(test, format!("the user gvtest cannot run {bin}"));
            return None;
        }
        chown(dir.path(), Some(uid), Some(gid)).unwrap();
        Some(OrdinaryUser {
            runuser: true,
            dir,
            ids: (uid, gid),
        })
    }

    fn gatevm(&self, args: &[&str]) -> Output {
        let d = self.dir.path().display();
        let mut cmd = if self.runuser {
            let mut c = Command::new("runuser");
            c.args(["-u", "gvtest", "--", "env"]);
            c
        } else {
            Command::new("env")
        };
        cmd.args(["-u", "RUST_LOG", "-u", "GATEVM_RUNTIME_DIR"])
            .arg(format!("GATEVM_DATA_DIR={d}/data"))
            .arg(format!("GATEVM_RUN_DIR={d}/run"))
            .arg(format!("GATEVM_CACHE_DIR={d}/cache"))
            .arg("GATEVM_K3S_URL=file:///nonexistent/k3s")
            .arg(format!("GATEVM_K3S_SHA256={}", "0".repeat(64)))
            .arg(env!("CARGO_BIN_EXE_gatevm"))
            .args(args)
            .output()
            .expect("running gatevm")
    }

    /// As [`refused`], run as the user.
    fn refused(&self, args: &[&str], line: &str) {
        let out = self.gatevm(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: stderr {err}");
        assert_eq!(err.trim_end(), line, "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }

    /// An instance saved by an earlier start with `net` and the exposure `allowed` or not, as the
    /// supervisor leaves it (directory 0700, config.json 0600).
    fn saved(&self, name: &str, net: &str, allowed: bool) {
        use std::os::unix::fs::{chown, PermissionsExt};
        let data = self.dir.path().join("data");
        let dir = data.join("instances").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = format!(
            r#"{{"name":"{name}","cpus":2,"memory_mib":2048,"forwards":[],"allow_host_loopback":{allowed},"vmm":"auto","net":"{net}","disk_gib":2}}"#
        );
        std::fs::write(dir.join("config.json"), cfg).unwrap();
        let (uid, gid) = self.ids;
        for (p, mode) in [
            (data.clone(), 0o700),
            (data.join("instances"), 0o700),
            (dir.clone(), 0o700),
            (dir.join("config.json"), 0o600),
        ] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            chown(&p, Some(uid), Some(gid)).unwrap();
        }
    }
}

const GVPROXY_REFUSED: &str = "gatevm: error: --net gvproxy cannot keep the guest off the host's loopback here: its guard is a cgroup BPF program, which only root (with cgroup v2) can attach; use --net passt, or --allow-host-loopback to accept the exposure";

/// The one line of a memory setting out of range: the checks after the network's.
const LOW_MEMORY: &str = "gatevm: error: --memory 100 MiB is out of range: use 256 to 262144 MiB";

/// An ordinary user cannot attach gvproxy's loopback guard: gvproxy is refused unless the exposure
/// is accepted, asked for or saved, before anything starts; passt (the user's default) and an
/// accepted exposure go on to the next check.
#[test]
fn an_ordinary_user_gets_passt_and_gvproxy_only_with_the_exposure_accepted() {
    let test = "an_ordinary_user_gets_passt_and_gvproxy_only_with_the_exposure_accepted";
    let Some(user) = OrdinaryUser::new(test) else {
        return;
    };
    user.refused(&["start", "x", "--net", "gvproxy"], GVPROXY_REFUSED);
    user.refused(
        &["start", "x", "--net", "gvproxy", "--memory", "100"],
        GVPROXY_REFUSED,
    );
    user.refused(
        &["vm-run", "--net", "gvproxy", "--", "true"],
        GVPROXY_REFUSED,
    );
    user.saved("saved-gv", "gvproxy", false);
    user.refused(
        &["start", "saved-gv"],
        "gatevm: error: instance \"saved-gv\" was saved with --net gvproxy, which cannot keep the guest off the host's loopback here: its guard is a cgroup BPF program, which only root (with cgroup v2) can attach; start it with --net passt, or --allow-host-loopback to accept the exposure",
    );
    // Past the network's checks, each is stopped by the next one (nothing boots).
    user.saved("saved-gv-open", "gvproxy", true);
    for args in [
        &["start", "x", "--memory", "100"][..],
        &["start", "x", "--net", "passt", "--memory", "100"],
        &[
            "start",
            "x",
            "--net",
            "gvproxy",
            "--allow-host-loopback",
            "--memory",
            "100",
        ],
        &["start", "saved-gv", "--net", "passt", "--memory", "100"],
        &[
            "start",
            "saved-gv",
            "--allow-host-loopback",
            "--memory",
            "100",
        ],
        &["start", "saved-gv-open", "--memory", "100"],
    ] {
        user.refused(args, LOW_MEMORY);
    }
}

/// Forwards from host ports below net.ipv4.ip_unprivileged_port_start are refused for an
/// ordinary user at once, naming the port and the sysctl; the sysctl's own port is not.
#[test]
fn an_ordinary_user_is_refused_privileged_host_ports() {
    let test = "an_ordinary_user_is_refused_privileged_host_ports";
    let start: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    if start == 0 {
        gatevm_testkit::skip(
            test,
            "net.ipv4.ip_unprivileged_port_start is 0 here: every port is unprivileged",
        );
        return;
    }
    let Some(user) = OrdinaryUser::new(test) else {
        return;
    };
    let low = start - 1;
    let line = |fwd: &str| {
        format!(
            "gatevm: error: forward {fwd}: host port {low} is below net.ipv4.ip_unprivileged_port_start ({start}), so only root can bind it: use a host port of {start} or more, or lower that sysctl (sysctl net.ipv4.ip_unprivileged_port_start={low})"
        )
    };
    let tcp = format!("{low}:80");
    user.refused(
        &["start", "x", "-p", &tcp],
        &line(&format!("127.0.0.1:{low}:80/tcp")),
    );
    let udp = format!("0.0.0.0:{low}:53/udp");
    user.refused(
        &["start", "x", "--net", "passt", "-p", "8080:80", "-p", &udp],
        &line(&format!("0.0.0.0:{low}:53/udp")),
    );
    user.refused(
        &["vm-run", "-p", &tcp, "--", "true"],
        &line(&format!("127.0.0.1:{low}:80/tcp")),
    );
    // The sysctl's port is the first the user may bind (if it is free, the next check stops it).
    let l = std::net::TcpListener::bind(("127.0.0.1", start));
    if l.is_ok() {
        drop(l);
        let first = format!("{start}:80");
        user.refused(&["start", "x", "-p", &first, "--memory", "100"], LOW_MEMORY);
    } else {
        gatevm_testkit::skip_part(test, "the first unprivileged port", "it is taken here");
    }
}

/// Creates the ordinary user gvtest when it is missing (tests running as root run gatevm as it).
fn ensure_gvtest() -> Result<(), String> {
    let exists = || {
        Command::new("id")
            .args(["-u", "gvtest"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if exists() {
        return Ok(());
    }
    let made = Command::new("useradd")
        .args(["-m", "-s", "/bin/bash", "gvtest"])
        .output()
        .map_err(|e| format!("user gvtest is missing and useradd cannot run: {e}"))?;
    if !made.status.success() && !exists() {
        return Err(format!(
            "user gvtest is missing and useradd failed: {}",
            String::from_utf8_lossy(&made.stderr).trim()
        ));
    }
    Ok(())
}

/// Runs the built `gatevm` as an ordinary user with only `envs` set: as user gvtest through
/// `runuser` when this test runs as root (creating gvtest when missing), as this user otherwise.
/// `None` (with the reason) when no ordinary user is to be had.
fn as_ordinary_user(args: &[&str], envs: &[(&str, &Path)]) -> Result<Output, String> {
    let bin = env!("CARGO_BIN_EXE_gatevm");
    let mut c = if nix::unistd::geteuid().is_root() {
        ensure_gvtest()?;
        let reach = Command::new("runuser")
            .args(["-u", "gvtest", "--", "test", "-x", bin])
            .status()
            .map_err(|e| format!("runuser cannot run: {e}"))?;
        if !reach.success() {
            return Err(format!("user gvtest cannot execute {bin}"));
        }
        let mut c = Command::new("runuser");
        c.args(["-u", "gvtest", "--", bin]);
        c
    } else {
        Command::new(bin)
    };
    c.args(args)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        .env("HOME", "/nonexistent")
        .env("GATEVM_K3S_URL", "file:///nonexistent/k3s")
        .env("GATEVM_K3S_SHA256", "0".repeat(64));
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().map_err(|e| format!("cannot run gatevm: {e}"))
}

/// A world-readable temporary directory (its children do not exist yet: an ordinary user may
/// name them in GATEVM_*_DIR, as their nearest existing ancestor belongs to root or to them).
fn public_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::Builder::new()
        .prefix("gatevm-cli-user-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// A complete system runtime (fake files, the host QEMU recorded by path) with the base rootfs
/// of its recipe, under `sys`, with the modes `setup --system` gives it.
fn fake_system_runtime(sys: &Path) {
    use gatevm_runtime::{Component, FileRecord, Provenance, RootfsRecipe};
    let rt = sys.join("runtime/v1");
    let rel = "6.0.0-test";
    let qemu = sys.join("host/qemu-system-x86_64");
    for f in [
        "kernel/vmlinux".to_string(),
        format!("kernel/lib/modules/{rel}/modules.dep"),
        "bin/gvproxy".into(),
        "bin/virtiofsd".into(),
        "bin/passt".into(),
        "lib/libkrunfw.so.5".into(),
    ]
    .iter()
    .map(|f| rt.join(f))
    .chain([
        qemu.clone(),
        sys.join("rootfs")
            .join(RootfsRecipe::for_kernel(rel).id())
            .join(".gatevm-rootfs.json"),
        gatevm_runtime::rootfs::image_path(&sys.join("rootfs"), &RootfsRecipe::for_kernel(rel)),
    ]) {
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, b"x").unwrap();
    }
    let mut p = Provenance {
        kernel_release: Some(rel.into()),
        ..Default::default()
    };
    for name in ["kernel", "gvproxy", "libkrunfw", "virtiofsd", "qemu"] {
        p.set_component(Component {
            name: name.into(),
            version: "1".into(),
            origin: "test".into(),
            installed_unix: 0,
            files: if name == "qemu" {
                vec![FileRecord {
                    path: qemu.to_string_lossy().into_owned(),
                    sha256: "0".repeat(64),
                }]
            } else {
                vec![]
            },
        });
    }
    p.save(&rt).unwrap();
    publish(sys);
}

/// Directories 0755, files 0644, from `p` down.
fn publish(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let m = std::fs::metadata(p).unwrap();
    let mode = if m.is_dir() { 0o755 } else { 0o644 };
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    if m.is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            publish(&e.unwrap().path());
        }
    }
}

/// The one privileged step: `gatevm setup --system` by an ordinary user is refused in one line
/// naming `sudo gatevm setup --system`, before anything is written; a plain `gatevm setup` with
/// no system runtime asks for it the same way, and `doctor` names it as the fix; with a system
/// runtime in place, `setup` says it uses it and builds nothing.
#[test]
fn setup_system_as_user_is_refused() {
    const T: &str = "setup_system_as_user_is_refused";
    let tmp = public_tempdir();
    let sys = tmp.path().join("sys");
    let data = tmp.path().join("data");
    let cache = tmp.path().join("cache");
    let run = tmp.path().join("run");
    let envs = [
        ("GATEVM_DATA_DIR", data.as_path()),
        ("GATEVM_CACHE_DIR", cache.as_path()),
        ("GATEVM_SYSTEM_DIR", sys.as_path()),
        ("GATEVM_RUN_DIR", run.as_path()),
    ];
    let out = match as_ordinary_user(&["setup", "--system"], &[]) {
        Ok(o) => o,
        Err(why) => {
            gatevm_testkit::skip(T, why);
            return;
        }
    };
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "gatevm: error: setup --system installs host packages and writes /var/lib/gatevm: run it as root: `sudo gatevm setup --system`\n"
    );
    assert!(out.stdout.is_empty());
    // With GATEVM_SYSTEM_DIR too, and nothing created there.
    let out = as_ordinary_user(&["setup", "--system"], &envs).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "gatevm: error: setup --system installs host packages and writes {}: run it as root: `sudo gatevm setup --system`\n",
            sys.display()
        )
    );
    assert!(!sys.exists() && !data.exists() && !cache.exists());

    // Plain setup, no system runtime.
    let out = as_ordinary_user(&["setup"], &envs).unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "gatevm: error: no system runtime in {}: as an ordinary user, setup cannot install host packages or build the base rootfs; run `sudo gatevm setup --system` once\n",
            sys.join("runtime/v1").display()
        )
    );
    let out = as_ordinary_user(&["doctor", "--json"], &envs).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("doctor JSON");
    assert_eq!(
        v["findings"][0]["problem"],
        format!(
            "no gatevm runtime: the system runtime ({}) is not set up, and an ordinary user cannot build one",
            sys.join("runtime/v1").display()
        ),
        "{v}"
    );
    assert_eq!(v["findings"][0]["fix"], "sudo gatevm setup --system", "{v}");

    // A system runtime in place (root's files when this runs as root): used, nothing built.
    fake_system_runtime(&sys);
    let out = as_ordinary_user(&["setup"], &envs).unwrap();
    assert_eq!(
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned()
        ),
        (
            Some(0),
            format!(
                "setup: using the system runtime in {}; nothing to build\n",
                sys.join("runtime/v1").display()
            )
        )
    );
    assert!(!data.join("runtime").exists());
    let out = as_ordinary_user(&["doctor", "--json"], &envs).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("doctor JSON");
    assert_eq!(v["runtime_source"], "system", "{v}");
    assert_eq!(
        v["runtime_dir"],
        sys.join("runtime/v1").to_string_lossy().as_ref(),
        "{v}"
    );
    // Writable by others: refused with the reason.
    {
        use std::os::unix::fs::PermissionsExt;
        let bin = sys.join("runtime/v1/bin");
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o777)).unwrap();
        let out = as_ordinary_user(&["setup"], &envs).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!(
                "gatevm: error: the system runtime {} is not used: {} is writable by its group and others (mode 0777); repair it with `sudo gatevm setup --system`\n",
                sys.join("runtime/v1").display(),
                bin.display()
            )
        );
    }
}
