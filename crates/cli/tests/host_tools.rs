//! End-to-end tests of the host's own tools against an instance: Debian's `ctr` through the
//! instance's containerd socket (`status`'s `containerd_socket`, `gatevm env`). They boot real
//! VMs (`GATEVM_E2E=1`) and need a host `ctr` named by `GATEVM_HOST_CTR` (`scripts/test.sh` takes
//! it out of Debian's containerd package with `scripts/host-ctr.sh`).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const NAME: &str = "e2e-ctr";
const TAG: &str = "gatevm-test/busybox:1";
const BIG_TAG: &str = "gatevm-test/big:1";

/// The host's `ctr`, or None (recorded as skipped) when none is named.
fn host_ctr(test: &str) -> Option<PathBuf> {
    match std::env::var_os("GATEVM_HOST_CTR").map(PathBuf::from) {
        Some(p) if p.is_file() => Some(p),
        other => {
            gatevm_testkit::skip(
                test,
                format!(
                    "needs the host's ctr: set GATEVM_HOST_CTR (scripts/test.sh does, from Debian's containerd package){}",
                    other.map(|p| format!("; {} is not a file", p.display())).unwrap_or_default()
                ),
            );
            None
        }
    }
}

/// Runs the host's ctr against `sock`; returns (exit code, stdout, stderr).
fn ctr(ctr: &Path, sock: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(ctr)
        .args(["--address", sock, "--namespace", "k8s.io"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running ctr");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A layer of one file of `mib` MiB of bytes that do not repeat (xorshift).
fn big_layer(mib: usize) -> Vec<u8> {
    let mut data = vec![0u8; mib << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    tar_of(&[file("big.bin", &data)])
}

#[test]
fn host_ctr_through_the_instance_socket() {
    const TEST: &str = "host_ctr_through_the_instance_socket";
    if !enabled(TEST) || !have_busybox(TEST) {
        return;
    }
    let Some(ctr_bin) = host_ctr(TEST) else {
        return;
    };
    let _guard = Instance(NAME);
    let _ = gatevm(&["delete", NAME, "--force"]);
    fails(&["env", NAME], "does not exist");
    ok(&["start", NAME, "--memory", "1024"]);

    // The socket: in the run directory, the caller's, owner only; `env` names it.
    let st = status(NAME);
    let sock = st["containerd_socket"]
        .as_str()
        .unwrap_or_else(|| panic!("no containerd_socket in {st}"))
        .to_string();
    assert_eq!(
        Path::new(&sock),
        run_dir(NAME).join("containerd.sock"),
        "{st}"
    );
    {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&sock).unwrap();
        assert_eq!(m.mode() & 0o777, 0o600, "mode of {sock}");
        // SAFETY: geteuid has no preconditions.
        assert_eq!(m.uid(), unsafe { libc::geteuid() }, "owner of {sock}");
    }
    let env = ok(&["env", NAME]);
    assert!(env.contains("CONTAINERD_NAMESPACE=k8s.io"), "{env}");
    let script = format!("{env}\nexec {} version", ctr_bin.display());
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("Server:"),
        "ctr version through `eval \"$(gatevm env)\"`: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Several clients at once.
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let (c, s) = (ctr_bin.clone(), sock.clone());
            std::thread::spawn(move || ctr(&c, &s, &["version"]))
        })
        .collect();
    for c in clients {
        let (code, out, err) = c.join().unwrap();
        assert_eq!(code, 0, "a concurrent ctr version: {out} {err}");
        assert!(out.contains("Server:"), "{out}");
    }

    // images import, images ls, run --rm (no FIFOs across the VM: --null-io).
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("busybox.tar");
    docker_archive_tagged(
        &small,
        TAG,
        &[tar_of(&busybox_layer())],
        image_config(&[], &["sh"], &["PATH=/bin"], "/"),
    );
    let small_s = small.display().to_string();
    let (code, out, err) = ctr(&ctr_bin, &sock, &["images", "import", &small_s]);
    assert_eq!(code, 0, "ctr images import: {out} {err}");
    let (code, listed, err) = ctr(&ctr_bin, &sock, &["images", "ls", "-q"]);
    assert_eq!(code, 0, "{err}");
    let reference = listed
        .lines()
        .find(|l| l.ends_with(TAG))
        .unwrap_or_else(|| panic!("{TAG} not listed by ctr: {listed}"))
        .to_string();
    // The image ctr imported is gatevm's too: its own `image ls` lists it and `run` runs it. (The
    // host's `ctr run` cannot: it mounts the image's snapshot on the client to read its users and
    // groups, and hands the container FIFOs made on the host; README, "The host's own tools".)
    assert!(ok(&["image", "ls", NAME]).contains(TAG));
    let out = Command::new(bin())
        .args(["run", NAME, &reference, "--", "sh", "-c", "exit 7"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "gatevm run of the image ctr imported: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A content stream of a few hundred MiB.
    let big = dir.path().join("big.tar");
    docker_archive_tagged(
        &big,
        BIG_TAG,
        &[big_layer(256)],
        image_config(&[], &["sh"], &[], "/"),
    );
    let big_s = big.display().to_string();
    let t = Instant::now();
    let (code, out, err) = ctr(
        &ctr_bin,
        &sock,
        &["images", "import", "--no-unpack", &big_s],
    );
    assert_eq!(code, 0, "ctr images import of 256 MiB: {out} {err}");
    eprintln!("256 MiB imported through the socket in {:?}", t.elapsed());
    let (_, listed, _) = ctr(&ctr_bin, &sock, &["images", "ls", "-q"]);
    assert!(listed.lines().any(|l| l.ends_with(BIG_TAG)), "{listed}");
    drop(dir);

    // containerd restarts in the guest: a client in the middle of a stream gets a clean end
    // (not a hang), and the relay serves the new one.
    let mut events = Command::new(&ctr_bin)
        .args(["--address", &sock, "events"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ctr events");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        events.try_wait().unwrap().is_none(),
        "ctr events ended before containerd did"
    );
    let (code, _, err) = exec(
        NAME,
        &[
            "sh",
            "-c",
            "kill $(cat /run/containerd/containerd.pid 2>/dev/null || pidof containerd)",
        ],
        None,
    );
    assert_eq!(code, 0, "killing containerd in the guest: {err}");
    let t0 = Instant::now();
    let ended = loop {
        if let Some(st) = events.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = events.kill();
            panic!("a streaming client hung after containerd went away");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut why = String::new();
    if let Some(mut e) = events.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut why);
    }
    assert!(!ended.success(), "ctr events ended cleanly?: {why}");
    assert!(why.contains("ctr:"), "ctr events said: {why}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (code, out, _) = ctr(&ctr_bin, &sock, &["version"]);
        if code == 0 && out.contains("Server:") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ctr never reached the restarted containerd"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let st = status(NAME);
    let restarts = st["payloads"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "containerd"))
        .and_then(|p| p["restarts"].as_u64())
        .unwrap_or(0);
    assert!(restarts >= 1, "containerd was not restarted: {st}");
    let (_, listed, _) = ctr(&ctr_bin, &sock, &["images", "ls", "-q"]);
    assert!(
        listed.lines().any(|l| l.ends_with(TAG)),
        "images after the restart: {listed}"
    );

    // Stopped: no socket, and `env` says why.
    ok(&["stop", NAME]);
    assert!(!Path::new(&sock).exists(), "{sock} left after stop");
    assert!(status(NAME)["containerd_socket"].is_null());
    fails(&["env", NAME], "is not running");
    assert_no_leftovers(NAME);
}
