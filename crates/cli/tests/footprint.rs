//! The host footprint of a hostile guest: a console flood stays within the log caps (rotated,
//! newest kept) while the instance keeps answering; a larger state disk is grown by the host as
//! a file only, its file system by the guest (no file system tool runs on the host), and a smaller
//! one is refused.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The caps the README states (`gatevm_instance::logcap`).
const CONSOLE_CAP: u64 = 4 * 1024 * 1024;
const HELPER_CAP: u64 = 2 * 1024 * 1024;

fn instance_dir(name: &str) -> PathBuf {
    let data = std::env::var_os("GATEVM_DATA_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_DATA_HOME").map(|x| PathBuf::from(x).join("gatevm")))
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".local/share/gatevm")
        });
    data.join("instances").join(name)
}

fn size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Every log of the instance and its previous generation is within its cap.
fn assert_logs_capped(logs: &Path) {
    for e in std::fs::read_dir(logs).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let cap = if name.starts_with("console.") {
            CONSOLE_CAP
        } else {
            HELPER_CAP
        };
        let len = size(&e.path());
        assert!(len <= cap, "{name} is {len} bytes, over its cap of {cap}");
    }
}

#[test]
fn console_flood_stays_under_the_cap_and_the_guest_answers() {
    const NAME: &str = "hygiene-flood";
    if !enabled("console_flood_stays_under_the_cap_and_the_guest_answers") {
        return;
    }
    let _guard = Instance(NAME);
    let _ = gatevm(&["delete", NAME, "--force"]);
    ok(&["start", NAME]);
    let logs = instance_dir(NAME).join("logs");
    let console = logs.join("console.log");
    let old = logs.join("console.log.1");
    // `logs -f` follows the console from before the flood, across the rotation.
    let followed = tempfile::NamedTempFile::new().unwrap();
    let mut follower = std::process::Command::new(bin())
        .args(["logs", NAME, "--console", "-f"])
        .stdin(std::process::Stdio::null())
        .stdout(followed.reopen().unwrap())
        .spawn()
        .unwrap();
    // The flood runs in the background in the guest (its own session, so the exec ending does
    // not end it), at most 120 s.
    let (code, _, err) = exec(
        NAME,
        &[
            "sh",
            "-c",
            "setsid sh -c 'echo $$ > /tmp/flood.pid; exec timeout 120 sh -c \"yes FLOOD > /dev/ttyS0\"' </dev/null >/dev/null 2>&1 &",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    // Watch the files while the guest writes: never over the cap; go on until the console has
    // rotated and the new generation has grown again (writing continues after a rotation).
    let start = Instant::now();
    let mut max_seen = 0;
    loop {
        assert_logs_capped(&logs);
        max_seen = max_seen.max(size(&console));
        if size(&old) > 0 && size(&console) > 64 * 1024 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(115),
            "the console did not rotate within 115 s of flooding (console.log {} bytes, largest seen {max_seen})",
            size(&console)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let flooded = start.elapsed();
    // The instance answers while the flood goes on.
    let t = Instant::now();
    let (code, out, err) = exec(NAME, &["echo", "still here"], None);
    assert_eq!((code, out.trim()), (0, "still here"), "{err}");
    eprintln!(
        "console rotated after {:.1} s of flooding; exec answered in {:.1} s meanwhile",
        flooded.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    let (code, _, err) = exec(
        NAME,
        &["sh", "-c", "kill -TERM -$(cat /tmp/flood.pid)"],
        None,
    );
    assert_eq!(code, 0, "{err}");
    std::thread::sleep(Duration::from_secs(2));
    let _ = follower.kill();
    let _ = follower.wait();
    assert_logs_capped(&logs);
    // One generation holds at most the cap: more than that came through the rotation.
    let got = size(followed.path());
    assert!(
        got > CONSOLE_CAP,
        "logs -f printed {got} bytes: it did not follow the console across its rotation"
    );
    assert_eq!(
        size(&old),
        CONSOLE_CAP,
        "a rotated generation is cut at the cap"
    );
    // Only the newest generation is kept besides the current one.
    assert!(!logs.join("console.log.2").exists());
    // `logs --console` shows both generations, older first.
    let out = gatevm(&["logs", NAME, "--console"]);
    assert!(out.status.success());
    let shown = out.stdout;
    let (a, b) = (
        std::fs::read(&old).unwrap(),
        std::fs::read(&console).unwrap(),
    );
    assert!(
        shown.len() >= a.len() + b.len() - 4096 && shown.starts_with(&a[..4096]),
        "logs --console printed {} bytes, the two generations hold {} + {}",
        shown.len(),
        a.len(),
        b.len()
    );
    // (The guest's tty turns each newline into CR LF.)
    assert!(String::from_utf8_lossy(&shown).contains("FLOOD\r\nFLOOD\r\n"));
    let st = status(NAME);
    assert_eq!(st["healthy"], true, "{st}");
    ok(&["stop", NAME]);
    assert_logs_capped(&logs);
}

/// A fake e2fsck and resize2fs that leave a mark when the host runs them.
fn fake_fs_tools(dir: &Path, mark: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for tool in ["e2fsck", "resize2fs", "fsck.ext4"] {
        let p = dir.join(tool);
        std::fs::write(
            &p,
            format!(
                "#!/bin/sh\necho \"{tool} $*\" >> {}\nexit 1\n",
                mark.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

fn guest_disk_bytes(name: &str) -> u64 {
    let (code, out, err) = exec(
        name,
        &[
            "sh",
            "-c",
            "df -B1 --output=size /var/lib/gatevm | tail -n 1",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("df said {out:?}"))
}

#[test]
fn the_state_disk_is_grown_by_the_guest_and_never_shrinks() {
    const NAME: &str = "hygiene-disk";
    if !enabled("the_state_disk_is_grown_by_the_guest_and_never_shrinks") {
        return;
    }
    let _guard = Instance(NAME);
    let _ = gatevm(&["delete", NAME, "--force"]);
    ok(&["start", NAME, "--disk", "1G"]);
    let before = guest_disk_bytes(NAME);
    assert!(before < 1 << 30, "{before}");
    let (code, _, err) = exec(
        NAME,
        &["sh", "-c", "echo kept > /var/lib/gatevm/kept && sync"],
        None,
    );
    assert_eq!(code, 0, "{err}");
    ok(&["stop", NAME]);

    // The host's PATH leads to tools that would leave a mark if the host ran them.
    let tools = tempfile::tempdir().unwrap();
    let mark = tools.path().join("ran");
    fake_fs_tools(tools.path(), &mark);
    let path = format!(
        "{}:{}",
        tools.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = std::process::Command::new(bin())
        .args(["start", NAME, "--disk", "3G"])
        .env("PATH", &path)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "start --disk 3G: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !mark.exists(),
        "the host ran a file system tool on the guest's disk: {}",
        std::fs::read_to_string(&mark).unwrap_or_default()
    );
    let img = instance_dir(NAME).join("state.img");
    assert_eq!(size(&img), 3 << 30, "the image file was not grown");
    // The guest grew its file system to the device at boot.
    let after = guest_disk_bytes(NAME);
    assert!(
        after > (5 << 30) / 2,
        "the guest's file system is {after} bytes after growing the disk to 3 GiB (was {before})"
    );
    let (code, out, err) = exec(NAME, &["cat", "/var/lib/gatevm/kept"], None);
    assert_eq!((code, out.trim()), (0, "kept"), "{err}");
    let console =
        String::from_utf8_lossy(&gatevm(&["logs", NAME, "--console"]).stdout).into_owned();
    eprintln!(
        "state disk grew from {before} to {after} bytes inside the guest{}",
        if console.contains("growing the file system") {
            " (guest log says so)"
        } else {
            ""
        }
    );
    ok(&["stop", NAME]);

    // Smaller: refused in one line before anything starts; the disk keeps its size.
    let out = gatevm(&["start", NAME, "--disk", "2G"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "gatevm: error: the state disk of {NAME:?} is 3 GiB and cannot shrink to 2 GiB (--reset discards it)\n"
        )
    );
    assert_eq!(size(&img), 3 << 30);
    assert_eq!(status(NAME)["state"], "stopped");
}
