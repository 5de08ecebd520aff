//! Faults: the crash of any part (the VM, gvproxy, virtiofsd, the supervisor, the CLI) during boot
//! and while running, durability of fsynced data, concurrent use, stops of a hung guest, and
//! leaks over repeated cycles. Every test boots real VMs.

mod common;
use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A process of the instance, by what its command line shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Vm,
    Gvproxy,
    Virtiofsd,
    Supervisor,
}

impl Part {
    fn matches(self, cmd: &str) -> bool {
        match self {
            Part::Vm => cmd.contains("qemu-system"),
            Part::Gvproxy => cmd.contains("gvproxy"),
            Part::Virtiofsd => cmd.contains("virtiofsd"),
            Part::Supervisor => cmd.contains("__supervise"),
        }
    }
}

/// Pids of a part of the instance (virtiofsd may show as more than one process).
fn pids_of(name: &str, part: Part) -> Vec<i32> {
    let mut v: Vec<i32> = processes_of(name)
        .iter()
        .chain(supervisors_of(name).iter())
        .filter(|l| part.matches(l))
        .filter_map(|l| l.split(':').next()?.parse().ok())
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The supervisor's command line names the instance by its config, not its run directory.
fn supervisors_of(name: &str) -> Vec<String> {
    let mut found = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmd.contains("__supervise") && cmd.contains(&format!("\"name\":\"{name}\"")) {
            found.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
        }
    }
    found
}

fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) of a pid read from /proc a moment ago.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Waits until `f` holds, polling; panics with `what` after `within`.
fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Status says stopped within two seconds of the kill, naming a reason.
fn stopped_within_2s(name: &str, killed: Instant, what: &str) -> serde_json::Value {
    loop {
        let st = status(name);
        if st["state"] == "stopped" {
            assert!(
                st["stop_reason"].is_string(),
                "{what}: stopped without a reason: {st}"
            );
            return st;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(2),
            "{what}: status still says {st} 2 s after the kill"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn crash_matrix_each_part_during_boot_and_while_running() {
    let test = "crash_matrix_each_part_during_boot_and_while_running";
    if !enabled(test) {
        return;
    }
    const NAME: &str = "e2e-crash";
    let _guard = Instance(NAME);
    let _ = gatevm(&["delete", NAME, "--force"]);
    for part in [Part::Vm, Part::Gvproxy, Part::Virtiofsd, Part::Supervisor] {
        // During boot: kill the part as soon as it exists.
        let what = format!("{part:?} killed during boot");
        let mut start = Command::new(bin())
            .args(["start", NAME, "--memory", "768"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut victims = vec![];
        wait_until(
            &format!("{what}: the process appears"),
            Duration::from_secs(60),
            || {
                victims = pids_of(NAME, part);
                !victims.is_empty()
            },
        );
        let killed = Instant::now();
        for p in &victims {
            kill(*p, libc::SIGKILL);
        }
        let st = stopped_within_2s(NAME, killed, &what);
        let out = wait_output(&mut start, Duration::from_secs(60), &what);
        let err = String::from_utf8_lossy(&out.1);
        assert_ne!(out.0, 0, "{what}: start succeeded: {err}");
        assert_eq!(
            err.lines()
                .filter(|l| l.starts_with("gatevm: error"))
                .count(),
            1,
            "{what}: start's error is not one line: {err}"
        );
        eprintln!(
            "{what}: start exited {} ({}); stop_reason {}",
            out.0,
            err.trim(),
            st["stop_reason"]
        );
        assert_no_leftovers(NAME);

        // The next start succeeds; then the same part dies while running.
        let what = format!("{part:?} killed while running");
        ok(&["start", NAME, "--memory", "768"]);
        assert_eq!(
            exec(NAME, &["true"], None).0,
            0,
            "{what}: exec before the kill"
        );
        let victims = pids_of(NAME, part);
        assert!(!victims.is_empty(), "{what}: no {part:?} process found");
        let killed = Instant::now();
        for p in &victims {
            kill(*p, libc::SIGKILL);
        }
        let st = stopped_within_2s(NAME, killed, &what);
        eprintln!("{what}: stop_reason {}", st["stop_reason"]);
        assert_no_leftovers(NAME);
    }
    // After all that, a normal life.
    ok(&["start", NAME, "--memory", "768"]);
    assert_eq!(exec(NAME, &["echo", "fine"], None).1, "fine\n");
    ok(&["stop", NAME]);
    assert_no_leftovers(NAME);
}

/// Waits for a child with a deadline; returns (exit code, stderr).
fn wait_output(child: &mut std::process::Child, within: Duration, what: &str) -> (i32, Vec<u8>) {
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = vec![];
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_end(&mut err);
            }
            return (st.code().unwrap_or(-1), err);
        }
        if t.elapsed() > within {
            let _ = child.kill();
            panic!("{what}: the command did not end within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes `text` to `path` in the guest and fsyncs it before returning.
fn write_synced(name: &str, path: &str, text: &str) {
    let script = format!("printf %s '{text}' > {path} && sync {path}");
    let (code, _, err) = exec(name, &["sh", "-c", &script], None);
    assert_eq!(code, 0, "writing {path}: {err}");
}

fn read_guest(name: &str, path: &str) -> String {
    let (code, out, err) = exec(name, &["cat", path], None);
    assert_eq!(code, 0, "reading {path}: {err}");
    out
}

#[test]
fn fsynced_data_survives_stop_and_a_killed_vm() {
    let test = "fsynced_data_survives_stop_and_a_killed_vm";
    if !enabled(test) {
        return;
    }
    const NAME: &str = "e2e-durable";
    let _guard = Instance(NAME);
    let _ = gatevm(&["delete", NAME, "--force"]);
    // The state disk is /var/lib/gatevm; the root filesystem is the instance's writable layer.
    let (disk, root) = ("/var/lib/gatevm", "/root");
    ok(&["start", NAME, "--memory", "768"]);
    write_synced(NAME, &format!("{disk}/one"), "on the disk");
    write_synced(NAME, &format!("{root}/one"), "in the root");
    ok(&["stop", NAME]);
    ok(&["start", NAME, "--memory", "768"]);
    assert_eq!(read_guest(NAME, &format!("{disk}/one")), "on the disk");
    assert_eq!(read_guest(NAME, &format!("{root}/one")), "in the root");

    // The VM killed right after the fsync returned.
    write_synced(NAME, &format!("{disk}/two"), "disk, then kill");
    write_synced(NAME, &format!("{root}/two"), "root, then kill");
    for p in pids_of(NAME, Part::Vm) {
        kill(p, libc::SIGKILL);
    }
    wait_until("stopped after the kill", Duration::from_secs(10), || {
        status(NAME)["state"] == "stopped"
    });
    ok(&["start", NAME, "--memory", "768"]);
    assert_eq!(read_guest(NAME, &format!("{disk}/two")), "disk, then kill");
    assert_eq!(read_guest(NAME, &format!("{root}/two")), "root, then kill");
    assert_eq!(read_guest(NAME, &format!("{disk}/one")), "on the disk");
    ok(&["stop", NAME]);
    assert_no_leftovers(NAME);
}

#[test]
fn concurrent_starts_execs_and_lifecycle_races() {
    let test = "concurrent_starts_execs_and_lifecycle_races";
    if !enabled(test) {
        return;
    }
    const NAME: &str = "e2e-race";
    let _guard = Instance(NAME);
    let _ = gatevm(&["delete", NAME, "--force"]);

    // Ten starts of one name at once: one VM; every other start fails saying it is running.
    let starts: Vec<_> = (0..10)
        .map(|_| std::thread::spawn(|| gatevm(&["start", NAME, "--memory", "768"])))
        .collect();
    let outs: Vec<_> = starts.into_iter().map(|t| t.join().unwrap()).collect();
    let won = outs.iter().filter(|o| o.status.success()).count();
    assert_eq!(won, 1, "{} starts succeeded", won);
    for o in outs.iter().filter(|o| !o.status.success()) {
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains("already running"), "{err}");
    }
    assert_eq!(pids_of(NAME, Part::Vm).len(), 1, "{:?}", processes_of(NAME));
    assert_eq!(pids_of(NAME, Part::Supervisor).len(), 1);
    assert_eq!(status(NAME)["healthy"], true);

    // Ten execs at once: each its own output and exit code.
    let execs: Vec<_> = (0..10)
        .map(|i| {
            std::thread::spawn(move || {
                let s = i.to_string();
                exec(
                    NAME,
                    &["sh", "-c", "echo out-$0; echo err-$0 >&2; exit $0", &s],
                    None,
                )
            })
        })
        .collect();
    for (i, t) in execs.into_iter().enumerate() {
        let (code, out, err) = t.join().unwrap();
        assert_eq!(code, i as i32, "exec {i}: {err}");
        assert_eq!(out, format!("out-{i}\n"));
        assert!(err.contains(&format!("err-{i}")), "exec {i}: {err}");
    }
    ok(&["stop", NAME]);

    // start, stop and delete racing, with the stop and delete landing at different points of the
    // boot: whatever wins, the end state is consistent.
    for delay_ms in [0u64, 700, 2500, 6000] {
        let start = std::thread::spawn(|| gatevm(&["start", NAME, "--memory", "768"]));
        std::thread::sleep(Duration::from_millis(delay_ms));
        let stop = std::thread::spawn(|| gatevm(&["stop", NAME, "--timeout", "5"]));
        let delete = std::thread::spawn(|| gatevm(&["delete", NAME, "--force"]));
        let outs = [
            start.join().unwrap(),
            stop.join().unwrap(),
            delete.join().unwrap(),
        ];
        for (what, o) in ["start", "stop", "delete"].iter().zip(&outs) {
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                !err.contains("panicked"),
                "{what} after {delay_ms} ms panicked: {err}"
            );
            eprintln!(
                "race at {delay_ms} ms: {what} exited {:?}: {}",
                o.status.code(),
                err.lines().last().unwrap_or("")
            );
        }
        assert_consistent(NAME);
        let _ = gatevm(&["delete", NAME, "--force"]);
        assert_no_leftovers(NAME);
        let listed = ok(&["list", "--json"]);
        assert!(!listed.contains(&format!("\"{NAME}\"")), "{listed}");
    }
}

/// The instance is either gone, stopped with nothing running, or running and answering.
fn assert_consistent(name: &str) {
    let out = gatevm(&["status", name, "--json"]);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("does not exist"), "{err}");
        assert_no_leftovers(name);
        return;
    }
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    match st["state"].as_str() {
        Some("stopped") => assert_no_leftovers(name),
        Some("running") => {
            assert_eq!(exec(name, &["true"], None).0, 0, "{st}");
        }
        // A start that is still booting (the racing stop arrived before its supervisor).
        Some("starting") => {
            wait_until("the start to settle", Duration::from_secs(90), || {
                status(name)["state"] != "starting"
            });
            assert_consistent(name);
        }
        other => panic!("inconsistent state {other:?}: {st}"),
    }
}

#[test]
fn stop_is_graceful_and_a_hung_guest_still_stops() {
    let test = "stop_is_graceful_and_a_hung_guest_still_stops";
    if !enabled(test) {
        return;
    }
    const NAME: &str = "e2e-hung";
    let _guard = Instance(NAME);
    let _ = gatevm(&["delete", NAME, "--force"]);
    ok(&["start", NAME, "--memory", "768"]);
    ok(&["stop", NAME]);
    let st = status(NAME);
    assert_eq!(st["stop_reason"], "stopped on request", "{st}");
    assert_no_leftovers(NAME);

    // A guest that does nothing at all: its VM process is frozen.
    ok(&["start", NAME, "--memory", "768"]);
    for p in pids_of(NAME, Part::Vm) {
        kill(p, libc::SIGSTOP);
    }
    let t = Instant::now();
    ok(&["stop", NAME, "--timeout", "3"]);
    eprintln!("stop of a frozen guest took {:?}", t.elapsed());
    let st = status(NAME);
    assert_eq!(st["state"], "stopped", "{st}");
    assert!(
        st["stop_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("forced"),
        "{st}"
    );
    assert_no_leftovers(NAME);
    // And the next start is clean.
    ok(&["start", NAME, "--memory", "768"]);
    assert_eq!(exec(NAME, &["true"], None).0, 0);
    ok(&["stop", NAME]);
}

/// Inodes of the TCP sockets a process holds.
fn socket_inodes(pid: i32) -> Vec<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Listening TCP sockets on the host: (inode, local address as hex "ADDR:PORT").
fn tcp_listeners() -> Vec<(u64, String)> {
    let mut v = vec![];
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(f)
            .unwrap_or_default()
            .lines()
            .skip(1)
        {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() > 9 && cols[3] == "0A" {
                if let Ok(inode) = cols[9].parse() {
                    v.push((inode, cols[1].to_string()));
                }
            }
        }
    }
    v
}

fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn exposure_listeners_modes_and_virtiofsd_confinement() {
    let test = "exposure_listeners_modes_and_virtiofsd_confinement";
    if !enabled(test) {
        return;
    }
    const NAME: &str = "e2e-expose";
    let _guard = Instance(NAME);
    let _ = gatevm(&["delete", NAME, "--force"]);
    let port = free_port().to_string();
    ok(&[
        "start",
        NAME,
        "--memory",
        "768",
        "-p",
        &format!("{port}:80"),
    ]);

    // Every TCP listener of the instance's processes is on 127.0.0.1 (0100007F in /proc).
    let listeners = tcp_listeners();
    let mut pids: Vec<i32> = [Part::Vm, Part::Gvproxy, Part::Virtiofsd, Part::Supervisor]
        .iter()
        .flat_map(|p| pids_of(NAME, *p))
        .collect();
    pids.sort();
    pids.dedup();
    let mut seen = 0;
    for pid in &pids {
        for inode in socket_inodes(*pid) {
            if let Some((_, addr)) = listeners.iter().find(|(i, _)| *i == inode) {
                seen += 1;
                assert!(
                    addr.starts_with("0100007F:")
                        || addr.starts_with("0000000000000000FFFF00000100007F:")
                        || addr.starts_with("00000000000000000000000001000000:"),
                    "process {pid} listens on {addr} (not loopback)"
                );
            }
        }
    }
    assert!(
        seen >= 1,
        "no listener found for the forward (pids {pids:?})"
    );

    // Directories 0700, sockets 0600 (or inside a 0700 directory).
    let st = status(NAME);
    let logs = std::path::PathBuf::from(st["logs"].as_str().unwrap());
    let instance_dir = logs.parent().unwrap().to_path_buf();
    assert_eq!(mode(&instance_dir), 0o700, "{}", instance_dir.display());
    assert_eq!(
        mode(instance_dir.parent().unwrap()),
        0o700,
        "instances directory"
    );
    let data_dir = instance_dir.parent().unwrap().parent().unwrap();
    assert_eq!(
        mode(data_dir),
        0o700,
        "data directory {}",
        data_dir.display()
    );
    let run = run_dir(NAME);
    assert_eq!(mode(&run), 0o700, "{}", run.display());
    for e in std::fs::read_dir(&run).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "sock") {
            let m = mode(&p);
            assert_eq!(m & 0o077, 0, "{} is {m:o}", p.display());
        }
    }

    // virtiofsd serves the instance's root and nothing else: sandboxed into it.
    let vfs = pids_of(NAME, Part::Virtiofsd);
    assert!(!vfs.is_empty());
    let cmdline = processes_of(NAME)
        .into_iter()
        .find(|l| l.contains("virtiofsd"))
        .unwrap();
    assert!(cmdline.contains("--sandbox=namespace"), "{cmdline}");
    assert!(
        cmdline.contains(&format!("--shared-dir={}/rootfs", instance_dir.display())),
        "{cmdline}"
    );
    // Its serving process lives in its own mount namespace, rooted at the shared directory.
    let own_ns = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let confined = vfs
        .iter()
        .any(|p| std::fs::read_link(format!("/proc/{p}/ns/mnt")).is_ok_and(|ns| ns != own_ns));
    assert!(
        confined,
        "no virtiofsd process in a mount namespace of its own"
    );
    ok(&["stop", NAME]);
}

/// Loopback-guard cgroups of an instance (gatevm-NAME-net) anywhere under the cgroup root.
fn guard_cgroups(name: &str) -> usize {
    fn walk(dir: &std::path::Path, want: &str, depth: u32, n: &mut usize) {
        if depth > 6 {
            return;
        }
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                if e.file_name().to_string_lossy() == want {
                    *n += 1;
                }
                walk(&e.path(), want, depth + 1, n);
            }
        }
    }
    let mut n = 0;
    walk(
        std::path::Path::new("/sys/fs/cgroup"),
        &format!("gatevm-{name}-net"),
        0,
        &mut n,
    );
    n
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| rd.count())
        .unwrap_or(0)
}

/// Repeated start/exec/stop cycles leave nothing growing: no processes, mounts, sockets or
/// cgroups after each stop, no file descriptors growing in the supervisor under exec load, and
/// the instance directory's file count steady. `GATEVM_LEAK_CYCLES` sets the count (3 by
/// default; `GATEVM_LEAK_CYCLES=100 scripts/leaks.sh` runs the long one).
#[test]
fn no_leaks_over_repeated_cycles() {
    let test = "no_leaks_over_repeated_cycles";
    if !enabled(test) {
        return;
    }
    const NAME: &str = "e2e-leaks";
    let cycles: usize = std::env::var("GATEVM_LEAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let _guard = Instance(NAME);
    let _ = gatevm(&["delete", NAME, "--force"]);
    // The instance's own mounts: other instances on the machine (a user's, another test's) come
    // and go meanwhile.
    let mounts = || {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(&format!("/{NAME}")))
            .count()
    };
    let count_files = |dir: &std::path::Path| -> usize {
        fn walk(d: &std::path::Path, n: &mut usize) {
            for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
                *n += 1;
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), n);
                }
            }
        }
        let mut n = 0;
        walk(dir, &mut n);
        n
    };
    let mut first_files = None;
    let mut instance_dir = None;
    let mounts_before = mounts();
    for cycle in 0..cycles {
        ok(&["start", NAME, "--memory", "768"]);
        let sup = pids_of(NAME, Part::Supervisor)[0];
        assert_eq!(exec(NAME, &["true"], None).0, 0);
        let fds_after_one = fd_count(sup);
        for i in 0..10 {
            let (code, out, _) = exec(NAME, &["echo", &i.to_string()], None);
            assert_eq!((code, out), (0, format!("{i}\n")));
        }
        let fds_after_many = fd_count(sup);
        assert!(
            fds_after_many <= fds_after_one + 2,
            "cycle {cycle}: the supervisor's fds grew from {fds_after_one} to {fds_after_many} over 10 execs"
        );
        let dir = instance_dir
            .get_or_insert_with(|| {
                std::path::PathBuf::from(status(NAME)["logs"].as_str().unwrap())
                    .parent()
                    .unwrap()
                    .to_path_buf()
            })
            .clone();
        ok(&["stop", NAME]);
        assert_no_leftovers(NAME);
        assert_eq!(
            guard_cgroups(NAME),
            0,
            "cycle {cycle}: a loopback-guard cgroup is left"
        );
        assert_eq!(mounts(), mounts_before, "cycle {cycle}: mounts changed");
        // Files in the instance directory: steady after the first cycle (the upper layer of
        // the root gets what the first boot writes).
        let files = count_files(&dir);
        match first_files {
            None => first_files = Some(files),
            Some(f) => assert!(
                files <= f + 2,
                "cycle {cycle}: the instance directory grew from {f} to {files} entries"
            ),
        }
        eprintln!(
            "leak cycle {}/{cycles}: supervisor fds {fds_after_one}->{fds_after_many}, instance entries {files}",
            cycle + 1
        );
    }
}

/// Whether a process running `sleep 301` exists in the guest.
fn guest_sleeper(name: &str) -> bool {
    let (code, out, err) = exec(
        name,
        &[
            "sh",
            "-c",
            "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' ' | grep -c 'sleep 30[1]' || true",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    out.trim() != "0"
}

#[test]
fn killing_the_cli_leaves_the_instance_sound() {
    let test = "killing_the_cli_leaves_the_instance_sound";
    if !enabled(test) {
        return;
    }
    const NAME: &str = "e2e-cli-kill";
    let _guard = Instance(NAME);
    let _ = gatevm(&["delete", NAME, "--force"]);

    // `start` killed during boot: the supervisor is its own process and finishes the boot.
    let mut start = Command::new(bin())
        .args(["start", NAME, "--memory", "768"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the supervisor appears", Duration::from_secs(30), || {
        !pids_of(NAME, Part::Supervisor).is_empty()
    });
    start.kill().unwrap();
    start.wait().unwrap();
    let mut last = serde_json::Value::Null;
    let t = Instant::now();
    while last["healthy"] != true {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "not healthy after the starting CLI was killed: {last}"
        );
        std::thread::sleep(Duration::from_millis(200));
        last = status(NAME);
    }

    // `exec` killed: the guest process is hung up on and goes away.
    let mut ex = Command::new(bin())
        .args(["exec", NAME, "--", "sleep", "301"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the guest command starts", Duration::from_secs(30), || {
        guest_sleeper(NAME)
    });
    ex.kill().unwrap();
    ex.wait().unwrap();
    wait_until("the guest command ends", Duration::from_secs(15), || {
        !guest_sleeper(NAME)
    });
    assert_eq!(status(NAME)["healthy"], true);
    ok(&["stop", NAME]);
    assert_no_leftovers(NAME);

    // `start --foreground` is the supervisor: killed, it is the supervisor dying.
    let mut fg = Command::new(bin())
        .args(["start", NAME, "--foreground"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        "the foreground instance becomes healthy",
        Duration::from_secs(120),
        || status(NAME)["healthy"] == true,
    );
    fg.kill().unwrap();
    let killed = Instant::now();
    fg.wait().unwrap();
    let st = stopped_within_2s(NAME, killed, "foreground start killed");
    assert!(
        st["stop_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("died"),
        "{st}"
    );
    assert_no_leftovers(NAME);
    ok(&["start", NAME, "--memory", "768"]);
    assert_eq!(exec(NAME, &["true"], None).0, 0);
    ok(&["stop", NAME]);
    assert_no_leftovers(NAME);
}
