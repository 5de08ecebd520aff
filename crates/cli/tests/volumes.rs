//! End-to-end tests of shared host directories (`start -v HOST_DIR:GUEST_DIR[:ro]`, `run -v`).
//! They boot real VMs (`GATEVM_E2E=1`) and play a hostile guest against the share: writing
//! through a read-only share remounted read-write, symlinks and `..` out of it, device nodes.

mod common;

use common::*;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const NAME: &str = "e2e-vol";
const TAG: &str = "gatevm-test/busybox:1";

/// Whom the share belongs to: as root an ordinary user (gvtest, made when missing; root's own
/// directories can only be shared read-only), else this user.
fn share_owner() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let id = |flag: &str| -> Option<u32> {
        let o = Command::new("id").args([flag, "gvtest"]).output().ok()?;
        String::from_utf8_lossy(&o.stdout).trim().parse().ok()
    };
    if id("-u").is_none() {
        let _ = Command::new("useradd")
            .args(["-m", "-s", "/bin/bash", "gvtest"])
            .output();
    }
    Some((
        id("-u").expect("user gvtest"),
        id("-g").expect("group gvtest"),
    ))
}

fn chown_tree(p: &Path, owner: Option<(u32, u32)>) {
    if let Some((u, g)) = owner {
        let st = Command::new("chown")
            .args(["-R", &format!("{u}:{g}"), &p.display().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }
}

/// Runs a shell script in the guest.
fn sh(script: &str) -> (i32, String, String) {
    exec(NAME, &["sh", "-c", script], None)
}

fn run(args: &[&str]) -> (i32, String, String) {
    run_gatevm(args)
}

#[test]
fn shares_reach_guest_and_containers_and_hold_a_hostile_guest_in() {
    const TEST: &str = "shares_reach_guest_and_containers_and_hold_a_hostile_guest_in";
    if !enabled(TEST) || !have_busybox(TEST) {
        return;
    }
    let owner = share_owner();
    let _guard = Instance(NAME);
    let _ = gatevm(&["delete", NAME, "--force"]);
    let t = tempfile::tempdir().unwrap();
    let (data, ro) = (t.path().join("data"), t.path().join("ro"));
    std::fs::create_dir(&data).unwrap();
    std::fs::create_dir(&ro).unwrap();
    std::fs::write(data.join("host.txt"), "from-host\n").unwrap();
    std::fs::write(ro.join("r.txt"), "read-only\n").unwrap();
    // Beside the share, never reachable from it.
    std::fs::write(t.path().join("outside.txt"), "secret\n").unwrap();
    chown_tree(t.path(), owner);
    let (d, r) = (data.display().to_string(), ro.display().to_string());

    // Bad specs are refused with one line before anything starts.
    std::fs::write(t.path().join("file"), "x").unwrap();
    for (spec, why) in [
        ("relative:/data".to_string(), "relative path"),
        (
            format!("{}/missing:/data", t.path().display()),
            "does not exist",
        ),
        (
            format!("{}/file:/data", t.path().display()),
            "is not a directory",
        ),
        ("/:/host".to_string(), "whole host"),
        (format!("{d}:/etc"), "/etc"),
        (format!("{d}:/var/lib/containerd"), "/var/lib"),
        (format!("{d}:/"), "whole system"),
        (format!("{d}:/data/../x"), "\"..\""),
        (format!("{d}:/data:rx"), "unknown mode"),
    ] {
        fails(&["start", NAME, "-v", &spec], why);
    }
    let st = gatevm(&["status", NAME]);
    assert!(!st.status.success(), "a refused start made the instance");
    if owner.is_some() {
        // Root's own directory, writable: refused; read-only would do.
        let rootdir = tempfile::tempdir().unwrap();
        fails(
            &[
                "start",
                NAME,
                "-v",
                &format!("{}:/x", rootdir.path().display()),
            ],
            "belongs to root",
        );
    }

    ok(&[
        "start",
        NAME,
        "--memory",
        "1024",
        "-v",
        &format!("{d}:/data"),
        "-v",
        &format!("{r}:/ro:ro"),
    ]);
    let st = status(NAME);
    let vols: Vec<&str> = st["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    let real = |p: &Path| std::fs::canonicalize(p).unwrap().display().to_string();
    assert_eq!(
        vols,
        [
            format!("{}:/data", real(&data)),
            format!("{}:/ro:ro", real(&ro))
        ],
        "{st}"
    );
    // One file server per share, tracked as the instance's.
    let procs = processes_of(NAME).join("\n");
    assert!(procs.matches("virtiofsd").count() >= 2, "{procs}");

    // Host to guest and back.
    let (code, out, err) = sh("cat /data/host.txt /ro/r.txt");
    assert_eq!((code, out.as_str()), (0, "from-host\nread-only\n"), "{err}");
    let (code, _, err) = sh("echo from-guest > /data/guest.txt");
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read_to_string(data.join("guest.txt")).unwrap(),
        "from-guest\n"
    );
    // The guest's root writes as the share's owner on the host.
    // SAFETY: geteuid has no preconditions.
    let want_uid = owner.map(|(u, _)| u).unwrap_or(unsafe { libc::geteuid() });
    assert_eq!(
        std::fs::metadata(data.join("guest.txt")).unwrap().uid(),
        want_uid,
        "owner of a file the guest created"
    );
    // No set-user-ID or set-group-ID file comes out of a share, whatever the guest asks.
    let (_, out, _) = sh(
        "chmod u+s /data/guest.txt; echo suid=$?; chmod g+s /data/guest.txt; echo sgid=$?; \
         install -m 4755 /bin/true /data/t; echo install=$?",
    );
    assert!(
        !out.contains("suid=0") && !out.contains("sgid=0") && !out.contains("install=0"),
        "{out}"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        for f in ["guest.txt", "t"] {
            if let Ok(m) = std::fs::metadata(data.join(f)) {
                assert_eq!(
                    m.permissions().mode() & 0o6000,
                    0,
                    "{f} is set-ID on the host"
                );
            }
        }
    }
    std::fs::write(data.join("later.txt"), "later\n").unwrap();
    let t0 = Instant::now();
    loop {
        let (code, out, _) = sh("cat /data/later.txt");
        if code == 0 {
            assert_eq!(out, "later\n");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "a host write never reached the guest"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Read-only is the host's: the guest remounting its mount read-write gains nothing.
    let (_, out, err) =
        sh("mount -o remount,rw /ro && echo remounted; echo x > /ro/new; echo rc=$?");
    assert!(out.contains("remounted"), "{out} {err}");
    assert!(
        !out.contains("rc=0"),
        "a write through a read-only share: {out} {err}"
    );
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(!ro.join("new").exists(), "the write reached the host");

    // Escapes: a symlink to / is resolved by the guest in the guest; `..` stays in the guest;
    // device nodes cannot be made.
    let (code, out, err) = sh("ln -s / /data/esc && cat /data/esc/proc/sys/kernel/hostname");
    assert_eq!((code, out.trim()), (0, NAME), "{err}");
    assert_eq!(
        std::fs::read_link(data.join("esc")).unwrap(),
        Path::new("/"),
        "the symlink is a symlink on the host"
    );
    let (code, out, _) = sh("cat /data/../outside.txt; cat /data/esc/../outside.txt");
    assert_ne!(code, 0);
    assert!(
        !out.contains("secret"),
        "the guest read beside the share: {out}"
    );
    let (code, _, _) = sh("mknod /data/null c 1 3");
    assert_ne!(code, 0, "a device node in a share");
    assert!(!data.join("null").exists());

    // Containers: the share bound in, read-write and read-only.
    let archive = t.path().join("busybox.tar");
    docker_archive_tagged(
        &archive,
        TAG,
        &[tar_of(&busybox_layer())],
        image_config(&[], &["sh"], &["PATH=/bin"], "/"),
    );
    ok(&["image", "import", NAME, archive.to_str().unwrap()]);
    let (code, out, err) = run(&[
        "run",
        NAME,
        "-v",
        "/data:/mnt/d",
        TAG,
        "--",
        "sh",
        "-c",
        "cat /mnt/d/host.txt; echo from-container > /mnt/d/c.txt",
    ]);
    assert_eq!((code, out.as_str()), (0, "from-host\n"), "{err}");
    assert_eq!(
        std::fs::read_to_string(data.join("c.txt")).unwrap(),
        "from-container\n"
    );
    let (code, _, err) = run(&[
        "run",
        NAME,
        "-v",
        "/data:/mnt/d:ro",
        TAG,
        "--",
        "sh",
        "-c",
        "echo x > /mnt/d/x",
    ]);
    assert_ne!(code, 0, "a write through a read-only bind");
    assert!(!data.join("x").exists(), "{err}");
    let (code, _, err) = run(&["run", NAME, "-v", "/nothere:/x", TAG, "--", "true"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("/nothere") && err.lines().count() == 1,
        "{err}"
    );
    let (code, _, err) = run(&["run", NAME, "-v", "rel:/x", TAG, "--", "true"]);
    assert_ne!(code, 0);
    assert!(err.contains("absolute"), "{err}");

    // The shares are kept for the next start; a share that went is named at the next start.
    ok(&["stop", NAME]);
    assert_eq!(status(NAME)["volumes"].as_array().unwrap().len(), 2);
    std::fs::rename(&ro, t.path().join("ro-moved")).unwrap();
    fails(&["start", NAME], "does not exist");
    ok(&["start", NAME, "--no-volumes"]);
    assert!(status(NAME)["volumes"].as_array().unwrap().is_empty());
    let (code, out, _) = sh("ls /data 2>&1; mount | grep -c virtiofs");
    assert!(code != 0 || out.trim().ends_with('0'), "{out}");
    ok(&["stop", NAME]);
    ok(&["delete", NAME]);
    assert_no_leftovers(NAME);
}
