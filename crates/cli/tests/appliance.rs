//! End-to-end tests of the containerd appliance: image import, containers, bad archives, warm
//! boot, and a VM killed during an import. They boot real VMs (`GATEVM_E2E=1`); the image archives
//! are built here from the host's static busybox, so no network is needed.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TAG: &str = "gatevm-test/busybox:1";
const REF: &str = "docker.io/gatevm-test/busybox:1";

fn busybox_image(path: &Path, tag: &str, extra: Vec<Entry>) {
    let mut layer = busybox_layer();
    layer.extend(extra);
    docker_archive_tagged(
        path,
        tag,
        &[tar_of(&layer)],
        image_config(&[], &["sh"], &["PATH=/bin"], "/"),
    );
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = gatevm(args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn images(name: &str) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["image", "ls", name, "--json"])).expect("image ls JSON");
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i["ref"].as_str().unwrap().to_string())
        .collect()
}

fn healthy(name: &str) -> bool {
    status(name)["healthy"].as_bool() == Some(true)
}

/// One line on stderr starting with `gatevm: error:`, and a failure exit code.
fn one_line_error(what: &str, r: &(i32, String, String)) {
    assert_ne!(r.0, 0, "{what}: should fail");
    assert_eq!(r.2.trim().lines().count(), 1, "{what}: {:?}", r.2);
    assert!(r.2.starts_with("gatevm: error:"), "{what}: {:?}", r.2);
}

#[test]
fn images_and_containers_survive_restarts() {
    const NAME: &str = "e2e-appl";
    if !enabled("images_and_containers_survive_restarts")
        || !have_busybox("images_and_containers_survive_restarts")
    {
        return;
    }
    let _guard = Instance(NAME);
    let _ = gatevm(&["delete", NAME, "--force"]);
    let t = tempfile::tempdir().unwrap();
    let archive = t.path().join("busybox.tar");
    busybox_image(&archive, TAG, vec![]);
    let a = archive.to_str().unwrap();

    // Import into a missing and a stopped instance: clear errors.
    one_line_error("import, no instance", &run(&["image", "import", NAME, a]));
    let port = free_port();
    let fwd = format!("{port}:8080");
    ok(&["start", NAME, "-p", &fwd, "--disk", "1G"]);
    let cold_ms = status(NAME)["ready_ms"].as_u64().unwrap();

    let out = ok(&["image", "import", NAME, a]);
    assert!(out.contains(REF), "{out}");
    assert_eq!(images(NAME), [REF]);

    // A container in the foreground: output and exit code.
    let (code, out, err) = run(&[
        "run",
        NAME,
        TAG,
        "--",
        "sh",
        "-c",
        "echo from-container; exit 3",
    ]);
    assert_eq!(code, 3, "{err}");
    assert_eq!(out, "from-container\n");

    // A detached one serving TCP, reached from the host through the instance's forward.
    let (code, out, err) = run(&[
        "run",
        NAME,
        TAG,
        "--name",
        "web",
        "-d",
        "-p",
        "8080:80",
        "--",
        "sh",
        "-c",
        "while true; do echo hello-from-web | nc -l -p 80; done",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "web");
    let got = read_forward(port, "hello-from-web", Duration::from_secs(30)).unwrap_or_default();
    assert!(got.contains("hello-from-web"), "{got:?}");
    let ps: serde_json::Value = serde_json::from_str(&ok(&["ps", NAME, "--json"])).unwrap();
    let web = ps
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "web")
        .expect("web in ps");
    assert_eq!(web["status"], "running", "{ps}");
    let (code, _, err) = run(&["rm", NAME, "web"]);
    assert_ne!(code, 0);
    assert!(err.contains("running"), "{err}");
    let (code, _, err) = run(&["rm", NAME, "web", "--force"]);
    assert_eq!(code, 0, "{err}");

    // An image that is not there.
    let (code, _, err) = run(&["run", NAME, "nothere:1", "--", "true"]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("not in this VM"), "{err}");

    // Bad archives: one-line errors, the instance keeps running, nothing partial is listed.
    let junk = t.path().join("junk.tar");
    std::fs::write(
        &junk,
        (0..65536u32)
            .map(|i| (i * 7919 % 251) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let empty = t.path().join("empty.tar");
    std::fs::write(&empty, b"").unwrap();
    let mut bytes = std::fs::read(&archive).unwrap();
    bytes.truncate(bytes.len() * 2 / 3);
    let truncated = t.path().join("truncated.tar");
    std::fs::write(&truncated, &bytes).unwrap();
    // A layer whose content does not match its diff ID: only containerd can tell.
    let corrupt = t.path().join("corrupt.tar");
    {
        let mut layer = busybox_layer();
        layer.push(file("etc/marker", b"original"));
        let good = tar_of(&layer);
        let mut config = image_config(&[], &["sh"], &["PATH=/bin"], "/");
        let tmp = t.path().join("tmp.tar");
        docker_archive_tagged(
            &tmp,
            "gatevm-test/corrupt:1",
            std::slice::from_ref(&good),
            config.take(),
        );
        let mut whole = std::fs::read(&tmp).unwrap();
        let at = find(&whole, b"original").expect("marker in the archive");
        whole[at..at + 8].copy_from_slice(b"tampered");
        std::fs::write(&corrupt, whole).unwrap();
    }
    // Larger than the 1 GiB state disk can take (content plus unpacked layers).
    let big = t.path().join("big.tar");
    busybox_image(
        &big,
        "gatevm-test/big:1",
        vec![file("big.bin", &vec![0u8; 600 << 20])],
    );
    for (what, f) in [
        ("random bytes", &junk),
        ("zero bytes", &empty),
        ("truncated", &truncated),
        ("corrupt layer", &corrupt),
        ("too large", &big),
    ] {
        let r = run(&["image", "import", NAME, f.to_str().unwrap()]);
        eprintln!("{what}: {}", r.2.trim());
        one_line_error(what, &r);
        assert!(healthy(NAME), "{what}: the instance is no longer healthy");
        assert_eq!(images(NAME), [REF], "{what}: image list changed");
    }
    std::fs::remove_file(&big).unwrap();

    // Warm boot: the image is still there, and nothing was re-extracted.
    ok(&["stop", NAME]);
    one_line_error("import, stopped", &run(&["image", "import", NAME, a]));
    ok(&["start", NAME]);
    let warm_ms = status(NAME)["ready_ms"].as_u64().unwrap();
    eprintln!("start to ready: cold {cold_ms} ms, warm {warm_ms} ms");
    assert_eq!(images(NAME), [REF]);
    let (code, out, err) = run(&["run", NAME, REF, "--", "sh", "-c", "echo warm-ok"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "warm-ok\n");
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn vm_killed_during_an_import() {
    const NAME: &str = "e2e-killimport";
    if !enabled("vm_killed_during_an_import") || !have_busybox("vm_killed_during_an_import") {
        return;
    }
    let _guard = Instance(NAME);
    let _ = gatevm(&["delete", NAME, "--force"]);
    let t = tempfile::tempdir().unwrap();
    let archive = t.path().join("big.tar");
    // Random data so the import takes a while (it streams through the agent channel).
    let noise: Vec<u8> = (0..(96u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    busybox_image(
        &archive,
        "gatevm-test/killed:1",
        vec![file("noise.bin", &noise)],
    );
    ok(&["start", NAME]);
    let import = Command::new(bin())
        .args(["image", "import", NAME, archive.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let vm = status(NAME)["vm_pid"].as_u64().expect("vm pid");
    // SAFETY: kill has no memory effects; the pid is the instance's VM.
    unsafe { libc::kill(vm as i32, libc::SIGKILL) };
    let out = import.wait_with_output().unwrap();
    eprintln!(
        "import when the VM was killed: {:?} {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(NAME)["state"] != "stopped" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(status(NAME)["state"], "stopped");
    ok(&["start", NAME]);
    assert!(healthy(NAME));
    let listed = images(NAME);
    if listed.iter().any(|r| r.contains("killed")) {
        // Present means complete.
        let (code, out, _) = exec(NAME, &["ctr", "-n", "k8s.io", "images", "check"], None);
        assert_eq!(code, 0);
        assert!(out.contains("complete"), "{out}");
    }
    eprintln!(
        "after the kill the image is {}",
        if listed.is_empty() {
            "absent"
        } else {
            "present"
        }
    );
    // The instance imports fine afterwards.
    let small = t.path().join("small.tar");
    busybox_image(&small, TAG, vec![]);
    ok(&["image", "import", NAME, small.to_str().unwrap()]);
    assert!(images(NAME).contains(&REF.to_string()));
}
