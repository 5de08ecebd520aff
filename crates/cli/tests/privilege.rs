//! Least privilege of the host processes: QEMU runs under its seccomp sandbox and, when gatevm
//! runs as root, as an unprivileged user with no capabilities; no virtiofsd runs (the root is the
//! VM's own disks); the instance still works.

mod common;
use common::*;

fn status_of(pid: u64) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading the process status")
}

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
        .unwrap_or("")
}

#[test]
fn qemu_runs_with_least_privilege_and_no_virtiofsd() {
    if !enabled("qemu_runs_with_least_privilege_and_no_virtiofsd") {
        return;
    }
    let name = "vmmpriv-qemu";
    let _guard = Instance(name);
    let _ = gatevm(&["delete", name, "--force"]);
    ok(&["start", name, "--vmm", "qemu", "--memory", "1024"]);
    let st = status(name);
    let pid = st["vm_pid"].as_u64().expect("vm_pid in status");
    let s = status_of(pid);
    println!(
        "qemu {pid}: {}",
        s.lines()
            .filter(|l| l.starts_with("Uid")
                || l.starts_with("Cap")
                || l.starts_with("Seccomp")
                || l.starts_with("NoNewPrivs"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    assert_eq!(
        field(&s, "Seccomp"),
        "2",
        "QEMU is not under a seccomp filter: {s}"
    );
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let uids: Vec<&str> = field(&s, "Uid").split_whitespace().collect();
    if root {
        assert!(
            uids.iter().all(|u| *u != "0"),
            "QEMU runs as root: {uids:?}"
        );
        assert_eq!(field(&s, "CapEff"), "0000000000000000", "{s}");
        assert_eq!(field(&s, "CapPrm"), "0000000000000000", "{s}");
        assert_eq!(
            field(&s, "Groups"),
            "",
            "QEMU kept supplementary groups: {s}"
        );
    } else {
        println!("not root: QEMU runs as the user already ({uids:?})");
    }
    // The library's view agrees.
    let c = gatevm_vmm::confinement(pid as u32).unwrap();
    assert_eq!(c.seccomp, "filter");
    if root {
        assert_ne!(c.uid, 0);
        assert_eq!(c.cap_eff, "0000000000000000");
    }

    // The instance works: agent, the overlay root the guest built from its disks, state disk.
    assert_eq!(exec(name, &["true"], None).0, 0);
    let (code, out, err) = exec(
        name,
        &[
            "sh",
            "-c",
            "echo hi > /var/lib/vmmpriv-probe && cat /var/lib/vmmpriv-probe && \
             grep ' / ' /proc/mounts | tail -n 1 | cut -d ' ' -f 3",
        ],
        None,
    );
    assert_eq!((code, out.as_str()), (0, "hi\noverlay\n"), "{err}");
    assert_eq!(status(name)["healthy"], true);

    // No virtiofsd belongs to the instance: not among its processes, not in status.
    let procs = processes_of(name);
    println!("processes of {name}: {procs:?}");
    assert!(
        !procs.iter().any(|l| l.contains("virtiofsd")),
        "a virtiofsd runs for the instance: {procs:?}"
    );
    let roles: Vec<String> = status(name)["processes"]
        .as_array()
        .expect("processes in status")
        .iter()
        .map(|p| p["role"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        roles.iter().any(|r| r == "vmm") && !roles.iter().any(|r| r == "virtiofsd"),
        "{roles:?}"
    );
    ok(&["stop", name]);
}
