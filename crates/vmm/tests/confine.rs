//! The libkrun VM process's confinement, applied for real in a child process (the real VM needs
//! hardware virtualization; the confinement does not): the child confines itself with the plan
//! for an instance and reports what it can see and what it holds; the test plays the guest that
//! walks `..` out of its root.

use gatevm_vmm::confine::{for_krun, kept_mask};
use gatevm_vmm::krun::{KrunConfig, KrunKernel};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;

const DIR_VAR: &str = "GATEVM_CONFINE_PROBE_DIR";

fn config(dir: &Path) -> KrunConfig {
    KrunConfig {
        cpus: 1,
        memory_mib: 256,
        kernel: KrunKernel::External {
            path: dir.join("vmlinux"),
            initramfs: None,
            cmdline: String::new(),
        },
        root_dir: dir.join("boot"),
        disks: vec![
            gatevm_vmm::Disk::ro("gatevm-base", dir.join("base.erofs")),
            gatevm_vmm::Disk::rw("gatevm-state", dir.join("state.img")),
        ],
        agent_socket: dir.join("run/agent.sock"),
        net: Some(gatevm_vmm::NetAttach::Socket(dir.join("run/net.sock"))),
        mac: [0; 6],
        console_log: dir.join("logs/console.log"),
        exec: "/init".into(),
        args: vec![],
        env: vec![],
        shares: vec![],
    }
}

/// Reads a file of this thread under `/proc/thread-self` through a descriptor of the host's
/// procfs opened before the confinement (the confined root has no /proc).
fn thread_file(proc_fd: &OwnedFd, name: &str) -> String {
    let c = std::ffi::CString::new(format!("thread-self/{name}")).unwrap();
    // SAFETY: c is NUL-terminated; the descriptor is checked and then owned.
    let fd = unsafe { libc::openat(proc_fd.as_raw_fd(), c.as_ptr(), libc::O_RDONLY) };
    assert!(fd >= 0, "opening /proc/thread-self/{name}");
    // SAFETY: fd was just opened and is owned here only.
    let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    s
}

fn status_field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
        .unwrap_or("")
}

/// The child's side (run by `confinement_holds_in_a_child` with the directory in DIR_VAR).
#[test]
#[ignore = "helper: run by confinement_holds_in_a_child in a child process"]
fn child_helper() {
    let Some(dir) = std::env::var_os(DIR_VAR).map(PathBuf::from) else {
        return;
    };
    let cfg = config(&dir);
    let c = std::ffi::CString::new("/proc").unwrap();
    // SAFETY: c is NUL-terminated; the descriptor is checked and then owned.
    let proc_fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY) };
    assert!(proc_fd >= 0);
    // SAFETY: just opened, owned here only.
    let proc_fd = unsafe { OwnedFd::from_raw_fd(proc_fd) };
    if let Err(e) = for_krun(&cfg).apply() {
        println!(
            "PROBE apply-failed {e}: {:?}",
            std::error::Error::source(&e)
        );
        return;
    }
    for line in thread_file(&proc_fd, "mountinfo").lines() {
        if let Some(mp) = line.split_whitespace().nth(4) {
            println!("PROBE mount {mp}");
        }
    }
    let status = thread_file(&proc_fd, "status");
    for f in [
        "CapEff",
        "CapPrm",
        "CapInh",
        "CapBnd",
        "CapAmb",
        "NoNewPrivs",
    ] {
        println!("PROBE status {f} {}", status_field(&status, f));
    }
    let mut top: Vec<String> = std::fs::read_dir("/")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    println!("PROBE top {}", top.join(","));
    // The guest's view: names relative to the instance root, `..` included.
    let escape = cfg.root_dir.join("../../../../../../../../etc/shadow");
    println!("PROBE shadow {}", std::fs::metadata("/etc/shadow").is_ok());
    println!("PROBE escape {}", std::fs::metadata(&escape).is_ok());
    println!(
        "PROBE dotdot {}",
        std::fs::canonicalize(cfg.root_dir.join("../../../../../../../.."))
            .unwrap()
            .display()
    );
    println!("PROBE proc-sys {}", Path::new("/proc/sys").exists());
    // The guest writes through libkrun's virtio-fs and its disks: the boot directory and the
    // base image are read-only, the state disk is not.
    let writes = |p: &Path| std::fs::OpenOptions::new().write(true).open(p).is_ok();
    println!(
        "PROBE boot-write {}",
        std::fs::write(cfg.root_dir.join("from-inside"), b"x").is_ok()
    );
    println!(
        "PROBE boot-read {}",
        std::fs::read(cfg.root_dir.join("host-file")).is_ok()
    );
    println!("PROBE base-write {}", writes(&dir.join("base.erofs")));
    println!("PROBE state-write {}", writes(&dir.join("state.img")));
    // No CAP_SYS_ADMIN: no mount can undo the confinement.
    let t = std::ffi::CString::new("tmpfs").unwrap();
    let r = std::ffi::CString::new("/").unwrap();
    // SAFETY: NUL-terminated strings alive for the call.
    let rc = unsafe { libc::mount(t.as_ptr(), r.as_ptr(), t.as_ptr(), 0, std::ptr::null()) };
    println!("PROBE mount-allowed {}", rc == 0);
    println!("PROBE done");
}

#[test]
fn confinement_holds_in_a_child() {
    if !Path::new("/dev/kvm").exists() {
        gatevm_testkit::skip(
            "confinement_holds_in_a_child",
            "the plan binds /dev/kvm, which this host lacks",
        );
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    for sub in ["boot", "run", "logs"] {
        std::fs::create_dir(dir.join(sub)).unwrap();
    }
    std::fs::write(dir.join("boot/host-file"), b"h").unwrap();
    std::fs::write(dir.join("vmlinux"), b"kernel").unwrap();
    std::fs::write(dir.join("state.img"), b"disk").unwrap();
    std::fs::write(dir.join("base.erofs"), b"base").unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_helper",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(DIR_VAR, dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let probe: Vec<&str> = text
        .lines()
        .filter_map(|l| Some(l.split_once("PROBE ")?.1))
        .collect();
    if let Some(failed) = probe.iter().find(|l| l.starts_with("apply-failed")) {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 && failed.contains("namespace") {
            gatevm_testkit::skip(
                "confinement_holds_in_a_child",
                format!("not root, and this multi-threaded test child cannot enter a user namespace: {failed}"),
            );
            return;
        }
        panic!("confinement failed: {failed}\n{text}");
    }
    assert!(
        probe.contains(&"done"),
        "the child did not finish: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let get = |k: &str| -> Vec<&str> {
        probe
            .iter()
            .filter_map(|l| l.strip_prefix(k)?.strip_prefix(' '))
            .collect()
    };
    let mut mounts = get("mount");
    mounts.sort();
    let mut want: Vec<String> = vec![
        "/".into(),
        dir.join("boot").display().to_string(),
        dir.join("base.erofs").display().to_string(),
        dir.join("state.img").display().to_string(),
        dir.join("run").display().to_string(),
        dir.join("logs/console.log").display().to_string(),
        dir.join("vmlinux").display().to_string(),
        "/dev/kvm".into(),
        "/proc/self/fd".into(),
    ];
    want.sort();
    assert_eq!(mounts, want, "{text}");
    let mask = format!("{:016x}", kept_mask());
    assert_eq!(get("status CapEff"), [mask.as_str()], "{text}");
    assert_eq!(get("status CapPrm"), [mask.as_str()], "{text}");
    assert_eq!(get("status CapBnd"), [mask.as_str()], "{text}");
    assert_eq!(get("status CapInh"), ["0000000000000000"], "{text}");
    assert_eq!(get("status CapAmb"), ["0000000000000000"], "{text}");
    assert_eq!(get("status NoNewPrivs"), ["1"], "{text}");
    // Only the top directories of the bound paths are in the new root.
    let top_of = |p: &Path| {
        p.components()
            .nth(1)
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .into_owned()
    };
    let mut tops = vec![top_of(dir), "dev".to_string(), "proc".to_string()];
    tops.sort();
    tops.dedup();
    assert_eq!(get("top"), [tops.join(",").as_str()], "{text}");
    assert_eq!(get("shadow"), ["false"], "{text}");
    assert_eq!(get("escape"), ["false"], "`..` left the root: {text}");
    assert_eq!(get("dotdot"), ["/"], "{text}");
    assert_eq!(get("proc-sys"), ["false"], "{text}");
    assert_eq!(get("boot-write"), ["false"], "{text}");
    assert_eq!(get("boot-read"), ["true"], "{text}");
    assert_eq!(get("base-write"), ["false"], "{text}");
    assert_eq!(get("state-write"), ["true"], "{text}");
    assert_eq!(get("mount-allowed"), ["false"], "{text}");
    assert!(!dir.join("boot/from-inside").exists());
    assert_eq!(std::fs::read(dir.join("base.erofs")).unwrap(), b"base");
    // The console log was created for the VM.
    assert!(dir.join("logs/console.log").is_file());
}
