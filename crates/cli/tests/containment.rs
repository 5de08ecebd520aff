//! End-to-end tests that play the hostile guest against the network helper and the host's
//! footprint: the guest tries gvproxy's in-network API, fills its root, and the host checks that
//! nothing of its own changed. They boot real VMs (`GATEVM_E2E=1`).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What a guest process sends to gvproxy's API at the gateway: one HTTP request per JSON body,
/// each bounded by `timeout` (a dropped SYN never connects). Exits 0 only if some request got an
/// HTTP answer.
fn attack_script(bodies: &[String]) -> String {
    let mut s = String::from("answered=1\n");
    for b in bodies {
        s.push_str(&format!(
            "timeout 6 bash -c 'exec 3<>/dev/tcp/192.168.127.1/80 || exit 7; \
             printf \"POST /services/forwarder/expose HTTP/1.0\\r\\nContent-Type: application/json\\r\\nContent-Length: %d\\r\\n\\r\\n%s\" {len} '\"'\"'{b}'\"'\"' >&3; \
             head -c 200 <&3' && answered=0\n",
            len = b.len()
        ));
    }
    s.push_str("exit $answered\n");
    s
}

/// A file of the host the guest asks gvproxy to replace with a socket, in a directory anyone may
/// write (so only the confinement keeps it).
fn victim(test: &str) -> (PathBuf, tempfile::TempDir) {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::Builder::new().prefix(test).tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let f = d.path().join("precious");
    std::fs::write(&f, "host data\n").unwrap();
    (f, d)
}

fn nobody_listens(port: u16) -> bool {
    std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
}

fn hostile_guest_against(name: &'static str, net: &str) {
    let _guard = Instance(name);
    let _ = gatevm(&["delete", name, "--force"]);
    let user_port = free_port();
    ok(&[
        "start",
        name,
        "--net",
        net,
        "-p",
        &format!("{user_port}:8080"),
        "--memory",
        "512",
    ]);
    serve_in_guest(name, 8080);
    assert!(
        read_forward(user_port, "hello from", Duration::from_secs(20)).is_some(),
        "the user's forward works before the attack"
    );
    // The helper itself runs unprivileged (gvproxy: our confinement; passt drops to nobody).
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let st = status_of(name, net);
        let uid = field(&st, "Uid");
        assert!(
            uid.split_whitespace().all(|u| u != "0"),
            "{net} runs as root: {uid}"
        );
        if net == "gvproxy" {
            assert_eq!(field(&st, "CapEff"), "0000000000000000", "{net}: {st}");
        }
    }
    let (file, _dir) = victim(name);
    let wild = free_port();
    let bodies = [
        format!(
            r#"{{"protocol":"unix","local":"{}","remote":"tcp://192.168.127.2:9"}}"#,
            file.display()
        ),
        format!(r#"{{"local":"0.0.0.0:{wild}","remote":"192.168.127.2:8080"}}"#),
        format!(r#"{{"local":"127.0.0.1:{user_port}"}}"#),
    ];
    let unharmed = |who: &str| {
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            "host data\n",
            "{who}: the host file was touched"
        );
        assert!(
            nobody_listens(wild),
            "{who}: a listener on 0.0.0.0:{wild} appeared"
        );
        // The user's forward is still there (an unexpose would have removed it).
        assert!(
            read_forward(user_port, "hello from", Duration::from_secs(20)).is_some(),
            "{who}: the user's forward is gone after the attack"
        );
    };

    // From a container: its traffic leaves the guest through the guest's own NAT.
    if have_busybox(name) {
        let archive = _dir.path().join("image.tar");
        let mut layer = busybox_layer();
        for a in ["wget", "timeout"] {
            layer.push(symlink(&format!("bin/{a}"), "busybox"));
        }
        docker_archive_tagged(
            &archive,
            "gatevm-test/attacker:1",
            &[tar_of(&layer)],
            image_config(&[], &["sh"], &["PATH=/bin"], "/"),
        );
        ok(&["image", "import", name, archive.to_str().unwrap()]);
        for b in &bodies {
            // Not the shell's last command: as the container's PID 1, `timeout` would be exec'd
            // and its kill of the request ignored (PID 1 ignores signals it has no handler for).
            let script = format!(
                "timeout -s KILL 6 wget -q -O- --post-data='{b}' http://192.168.127.1/services/forwarder/expose; exit $?"
            );
            let out = gatevm(&[
                "run",
                name,
                "gatevm-test/attacker:1",
                "--",
                "sh",
                "-c",
                &script,
            ]);
            assert!(
                !out.status.success(),
                "the container got an answer from the API: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        unharmed("from a container");
        if net == "gvproxy" {
            let log = ok(&["logs", name, "--host=supervisor"]);
            assert!(
                log.contains("network filter: dropped a frame from the guest (GatewayService)"),
                "no drop in the supervisor log after the container's requests: {log}"
            );
        }
    }

    // From the guest itself (`gatevm exec`).
    let (code, out, err) = exec(name, &["sh", "-c", &attack_script(&bodies)], None);
    assert_ne!(code, 0, "the guest got an answer from the API: {out} {err}");
    unharmed("from the guest");
    if net == "gvproxy" {
        // The requests did not fail by accident: the filter saw them and dropped them.
        let log = ok(&["logs", name, "--host=supervisor"]);
        assert!(
            log.contains("network filter: dropped a frame from the guest (GatewayService)"),
            "no drop in the supervisor log: {log}"
        );
    }
}

#[test]
fn the_guest_cannot_reach_gvproxys_api() {
    if !enabled("the_guest_cannot_reach_gvproxys_api") {
        return;
    }
    hostile_guest_against("cont-gvproxy", "gvproxy");
    // Not with passt: see passt_runs_unprivileged_and_listens_only_on_forwards.
}

/// passt has no control plane inside the virtual network to attack, and it proxies every
/// destination through the host's own sockets: a guest connection to the gateway address would
/// leave the machine, so this test sends none. It checks what a hostile guest could gain from
/// passt instead: passt runs as another uid than root, and on the host it listens only on the
/// user's forwarded port.
#[test]
fn passt_runs_unprivileged_and_listens_only_on_forwards() {
    if !enabled("passt_runs_unprivileged_and_listens_only_on_forwards") {
        return;
    }
    let name = "cont-passt";
    let _guard = Instance(name);
    let _ = gatevm(&["delete", name, "--force"]);
    let user_port = free_port();
    ok(&[
        "start",
        name,
        "--net",
        "passt",
        "-p",
        &format!("{user_port}:8080"),
        "--memory",
        "512",
    ]);
    serve_in_guest(name, 8080);
    assert!(
        read_forward(user_port, "hello from", Duration::from_secs(20)).is_some(),
        "the user's forward works"
    );
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let st = status_of(name, "passt");
        let uid = field(&st, "Uid");
        assert!(
            uid.split_whitespace().all(|u| u != "0"),
            "passt runs as root: {uid}"
        );
    }
    let pids: Vec<String> = processes_of(name)
        .iter()
        .filter(|l| l.contains("passt"))
        .filter_map(|l| l.split(':').next().map(str::to_string))
        .collect();
    let Ok(out) = std::process::Command::new("ss").args(["-Hltnp"]).output() else {
        eprintln!(
            "passt_runs_unprivileged_and_listens_only_on_forwards: listener part NOT RUN: no ss"
        );
        return;
    };
    let listening = String::from_utf8_lossy(&out.stdout);
    let of_passt: Vec<&str> = listening
        .lines()
        .filter(|l| pids.iter().any(|p| l.contains(&format!("pid={p},"))))
        .collect();
    assert!(
        !of_passt.is_empty(),
        "no listener of passt ({pids:?}): {listening}"
    );
    for l in &of_passt {
        assert!(
            l.contains(&format!(":{user_port} ")),
            "passt listens where the user did not ask: {l}"
        );
    }
}

/// `/proc/PID/status` fields of the instance's process whose executable is named `exe`.
fn status_of(name: &str, exe: &str) -> String {
    for line in processes_of(name) {
        let pid = line.split(':').next().unwrap();
        let Ok(target) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
            continue;
        };
        if target.file_name().and_then(|n| n.to_str()) == Some(exe) {
            return std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        }
    }
    panic!("no {exe} process of {name}: {:?}", processes_of(name));
}

fn field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or("")
        .trim()
}

#[test]
fn gvproxy_runs_unprivileged_and_confined() {
    if !enabled("gvproxy_runs_unprivileged_and_confined") {
        return;
    }
    let name = "cont-gvpriv";
    let _guard = Instance(name);
    let _ = gatevm(&["delete", name, "--force"]);
    ok(&["start", name, "--memory", "512"]);
    let st = status_of(name, "gvproxy");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        let uid = field(&st, "Uid");
        assert!(
            uid.split_whitespace().all(|u| u != "0"),
            "gvproxy runs as root: {uid}"
        );
    }
    assert_eq!(field(&st, "CapEff"), "0000000000000000", "{st}");
    assert_eq!(field(&st, "NoNewPrivs"), "1", "{st}");
    // Its directory is the only one it has; the instance's run directory stays private.
    let run = run_dir(name);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&run).unwrap().mode() & 0o777, 0o700);
    assert_eq!(
        std::fs::metadata(run.join("net")).unwrap().mode() & 0o777,
        0o700
    );
    // status --json says the same.
    let st = status(name);
    let procs = st["processes"].as_array().expect("processes in status");
    let gv = procs
        .iter()
        .find(|p| p["role"] == "gvproxy")
        .unwrap_or_else(|| panic!("no gvproxy in {procs:?}"));
    assert_eq!(gv["confinement"]["no_new_privs"], true, "{gv}");
    assert_eq!(gv["confinement"]["cap_eff"], "0000000000000000", "{gv}");
    if root {
        assert_ne!(gv["confinement"]["uid"], 0, "{gv}");
    }
    let policy = gv["policy"].as_str().unwrap_or("");
    if policy.contains("no Landlock") {
        eprintln!("gvproxy_runs_unprivileged_and_confined: Landlock part NOT RUN: {policy}");
    } else {
        assert!(
            policy.contains("Landlock ABI") && policy.contains("files only in its directory"),
            "{gv}"
        );
    }
    for role in ["supervisor", "vmm", "virtiofsd"] {
        assert!(
            procs
                .iter()
                .any(|p| p["role"] == role && p["confinement"].is_object()),
            "{role} missing in {procs:?}"
        );
    }
    assert_eq!(exec(name, &["true"], None).0, 0);
}

fn mount_options(mountpoint: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = mountpoint.display().to_string();
    info.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(4) == Some(&want.as_str())).then(|| f[5].to_string())
    })
}

#[test]
fn guest_root_writes_stop_at_the_budget() {
    if !enabled("guest_root_writes_stop_at_the_budget") {
        return;
    }
    let name = "cont-budget";
    let _guard = Instance(name);
    let _ = gatevm(&["delete", name, "--force"]);
    ok(&["start", name, "--memory", "512", "--root-size", "256M"]);
    let st = status(name);
    let dir = PathBuf::from(st["logs"].as_str().unwrap())
        .parent()
        .unwrap()
        .to_path_buf();
    let img = dir.join("rootfs-rw.img");
    // The host mounts of guest-written data are nosuid,nodev.
    for m in [dir.join("rootfs-rw"), dir.join("rootfs")] {
        let opts = mount_options(&m).unwrap_or_else(|| panic!("{} not mounted", m.display()));
        assert!(
            opts.contains("nosuid") && opts.contains("nodev"),
            "{}: {opts}",
            m.display()
        );
    }
    let (code, _, err) = exec(
        name,
        &[
            "sh",
            "-c",
            "dd if=/dev/zero of=/fill bs=1M count=400 conv=fsync",
        ],
        None,
    );
    assert_ne!(code, 0, "400 MiB fit a 256 MiB budget");
    assert!(err.contains("No space left on device"), "{err}");
    use std::os::unix::fs::MetadataExt;
    let used = std::fs::metadata(&img).unwrap().blocks() * 512;
    assert!(
        used <= 256 << 20,
        "the host spent {used} bytes on a 256 MiB budget"
    );
    // The guest recovers by removing its file; the instance keeps working.
    let (code, _, err) = exec(name, &["sh", "-c", "rm /fill && echo ok > /after"], None);
    assert_eq!(code, 0, "{err}");
    // Another size for an existing budget is refused without --reset.
    ok(&["stop", name]);
    fails(
        &["start", name, "--root-size", "512M"],
        "changes only with --reset",
    );
    ok(&["start", name]);
    assert_eq!(
        exec(name, &["cat", "/after"], None),
        (0, "ok\n".into(), String::new())
    );
}
