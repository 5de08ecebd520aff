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

/// Whether a `ctr images import` runs in the guest now (read from the guest's /proc; the
/// pattern is split so this script's own command line does not match it).
fn guest_import_running(name: &str) -> bool {
    let script = r#"for p in /proc/[0-9]*; do c=$(tr '\0' ' ' < "$p/cmdline" 2>/dev/null); case "$c" in *"images imp""ort -"*) echo "$c";; esac; done"#;
    let (code, out, err) = exec(name, &["sh", "-c", script], None);
    assert_eq!(code, 0, "{err}");
    !out.trim().is_empty()
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
    // A valid archive whose layer is large enough that its first half is a stream of its own; the
    // manifest comes last, so no image can be registered before the whole archive arrived.
    let noise: Vec<u8> = (0..(16u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    busybox_image(
        &archive,
        "gatevm-test/killed:1",
        vec![file("noise.bin", &noise)],
    );
    let bytes = std::fs::read(&archive).unwrap();
    let (first, rest) = bytes.split_at(bytes.len() / 2);
    let (first, rest) = (first.to_vec(), rest.to_vec());
    ok(&["start", NAME]);
    let vm = status(NAME)["vm_pid"].as_u64().expect("vm pid") as i32;

    // The import reads stdin, and the test holds the second half back until the VM is dead: the
    // kill lands while the import is in flight, however fast the import is.
    let mut import = Command::new(bin())
        .args(["image", "import", NAME, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = import.stdin.take().unwrap();
    let (sent_tx, sent_rx) = std::sync::mpsc::channel();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        // Returns once the CLI has read all but a pipe buffer (64 KiB) of it.
        let r = input.write_all(&first);
        let _ = sent_tx.send(r.map_err(|e| e.to_string()));
        input
    });
    match sent_rx.recv_timeout(Duration::from_secs(300)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let out = import.wait_with_output().unwrap();
            panic!(
                "the import stopped reading its input ({e}): {:?} {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(_) => panic!("the import did not read the first half of the archive in 300 s"),
    }
    let mut input = writer.join().unwrap();
    assert!(
        guest_import_running(NAME),
        "no `ctr images import` runs in the guest while its input is held back"
    );
    assert!(
        import.try_wait().unwrap().is_none(),
        "the import ended before the VM was killed"
    );
    // SAFETY: kill has no memory effects; the pid is the instance's VM.
    assert_eq!(unsafe { libc::kill(vm, libc::SIGKILL) }, 0);

    // The import ends on the VM's death, without waiting for more input.
    let deadline = Instant::now() + Duration::from_secs(60);
    while import.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the import did not end within 60 s of the VM's death"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The rest of the archive: nobody reads it any more.
    {
        use std::io::Write;
        assert!(
            input.write_all(&rest).is_err(),
            "the ended import's stdin is still read"
        );
    }
    drop(input);
    let out = import.wait_with_output().unwrap();
    let r = (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    eprintln!("import when the VM was killed: {:?} {}", r.0, r.2.trim());
    one_line_error("import cut off by the VM's death", &r);
    assert_eq!(r.0, 1, "{r:?}");
    assert!(
        r.2.starts_with(&format!(
            "gatevm: error: importing stdin into {NAME:?} failed"
        )),
        "{:?}",
        r.2
    );
    assert_eq!(r.1, "", "the failed import printed an image");

    // status tells the truth within 2 s.
    let deadline = Instant::now() + Duration::from_secs(2);
    while status(NAME)["state"] != "stopped" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let st = status(NAME);
    assert_eq!(st["state"], "stopped", "{st}");
    assert_eq!(
        st["stop_reason"], "the VM process was killed by signal 9 from outside",
        "{st}"
    );

    // The next start works, and no partial image is listed.
    ok(&["start", NAME]);
    assert!(healthy(NAME));
    assert_eq!(images(NAME), Vec::<String>::new());
    // The instance imports fine afterwards.
    let small = t.path().join("small.tar");
    busybox_image(&small, TAG, vec![]);
    let out = ok(&["image", "import", NAME, small.to_str().unwrap()]);
    assert_eq!(out, format!("imported {REF}\n"));
    assert_eq!(images(NAME), [REF]);
}
