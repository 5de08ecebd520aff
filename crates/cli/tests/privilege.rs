//! Least privilege of the host processes: QEMU runs under its seccomp sandbox and, when gatevm
//! runs as root, as an unprivileged user with no capabilities; virtiofsd runs sandboxed in its
//! own namespaces; the instance still works.

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
fn qemu_and_virtiofsd_run_with_least_privilege() {
    if !enabled("qemu_and_virtiofsd_run_with_least_privilege") {
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

    // The instance works: agent, virtio-fs root, state disk, console.
    assert_eq!(exec(name, &["true"], None).0, 0);
    let (code, out, _) = exec(name, &["sh", "-c", "echo hi > /var/lib/vmmpriv-probe && cat /var/lib/vmmpriv-probe && mount | grep -c ' on / '"], None);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("hi\n"), "{out}");
    assert_eq!(status(name)["healthy"], true);

    // virtiofsd: sandboxed in namespaces of its own (--sandbox=namespace): whatever of its
    // processes serves the root has its own mount namespace and no_new_privs... as is true today.
    let vfs: Vec<u64> = processes_of(name)
        .iter()
        .filter(|l| l.contains("virtiofsd"))
        .filter_map(|l| l.split(':').next()?.parse().ok())
        .collect();
    assert!(!vfs.is_empty(), "no virtiofsd: {:?}", processes_of(name));
    let confined: Vec<gatevm_vmm::ProcessConfinement> = vfs
        .iter()
        .filter_map(|p| gatevm_vmm::confinement(*p as u32).ok())
        .collect();
    println!("virtiofsd: {confined:?}");
    assert!(
        confined.iter().any(|c| c.own_mount_namespace),
        "virtiofsd is not in a mount namespace of its own: {confined:?}"
    );
    ok(&["stop", name]);
}
