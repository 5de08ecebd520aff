//! End-to-end tests of per-stream flow control and of the bounded file read through the agent:
//! a reader that stalls stops only its own exec (issue 13, item 3), and `client::read_file`
//! reads a guest file without running a program there.
//!
//! They run when `GATEVM_E2E=1` (scripts/test.sh sets it after `gatevm setup`); otherwise each
//! prints that it did not run. `GATEVM_BIN` names the gatevm binary (default: the one cargo built).

mod common;

use common::*;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// "Within a few seconds": generous for a shared machine running the guest under TCG; the times
/// are printed so a run shows how far below it they are.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// Bytes waiting unread in a pipe.
fn unread(fd: &impl AsRawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int into `n`, which outlives the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    if rc == 0 {
        n.max(0) as usize
    } else {
        0
    }
}

/// Names of the processes running in the guest.
fn guest_processes(name: &str) -> String {
    let (code, out, err) = exec(
        name,
        &["sh", "-c", "cat /proc/[0-9]*/comm 2>/dev/null; true"],
        None,
    );
    assert_eq!(code, 0, "{err}");
    out
}

#[test]
fn a_stalled_reader_stops_only_its_own_exec_and_files_read_through_the_agent() {
    if !enabled("a_stalled_reader_stops_only_its_own_exec_and_files_read_through_the_agent") {
        return;
    }
    let name = "flow-e2e";
    let _guard = Instance(name);
    let _ = gatevm(&["delete", name, "--force"]);
    ok(&["start", name, "--memory", "1024"]);
    assert_eq!(status(name)["healthy"], true);

    // `gatevm exec NAME -- yes | (nobody reads)`: its stdout is a pipe we hold and never read.
    let mut stalled = Command::new(bin())
        .args(["exec", name, "--", "yes"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting the stalled exec");
    let pipe = stalled.stdout.take().expect("stdout pipe");
    // Wait until the pipe is full (the client then blocks, then the relay, then the guest's
    // window): measured, not slept.
    let t = Instant::now();
    let mut last = (0, Instant::now());
    loop {
        let n = unread(&pipe);
        if n != last.0 {
            last = (n, Instant::now());
        } else if n > 0 && last.1.elapsed() > Duration::from_millis(500) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the stalled exec's pipe did not fill ({n} bytes)"
        );
        assert!(
            stalled.try_wait().expect("try_wait").is_none(),
            "the stalled exec ended"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "stalled exec: its pipe holds {} bytes after {:?}",
        last.0,
        t.elapsed()
    );

    for round in 1..=3 {
        let t = Instant::now();
        let st = status(name);
        let status_time = t.elapsed();
        let t = Instant::now();
        let (code, out, err) = exec(name, &["echo", "hi"], None);
        let exec_time = t.elapsed();
        println!(
            "round {round} beside the stalled exec: status --json in {status_time:?}, exec echo hi in {exec_time:?}"
        );
        assert_eq!(st["healthy"], true, "{st}");
        assert_eq!(st["agent"]["responding"], true, "{st}");
        assert!(status_time < ANSWER_WITHIN, "status took {status_time:?}");
        assert_eq!((code, out.as_str()), (0, "hi\n"), "{err}");
        assert!(exec_time < ANSWER_WITHIN, "exec took {exec_time:?}");
    }
    assert!(
        stalled.try_wait().expect("try_wait").is_none(),
        "the stalled exec must still be running (it was stalled, not ended)"
    );

    // The stalled client goes away: its guest process is hung up on, the instance goes on.
    stalled.kill().expect("killing the stalled exec");
    let _ = stalled.wait();
    drop(pipe);
    let t = Instant::now();
    while guest_processes(name).lines().any(|l| l == "yes") {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "`yes` still runs in the guest after its client died"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "the guest's `yes` ended {:?} after its client was killed",
        t.elapsed()
    );
    assert_eq!(exec(name, &["echo", "still"], None).1, "still\n");
    assert_eq!(status(name)["healthy"], true);

    // A file written through exec is read back through the agent, larger than one window.
    let content: Vec<u8> = (0..700_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let (code, _, err) = exec(name, &["sh", "-c", "cat > /tmp/flow-file"], Some(&content));
    assert_eq!(code, 0, "{err}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let read = |path: &str, max: usize| {
        let t = Instant::now();
        let r = rt.block_on(gatevm_instance::client::read_file(
            name,
            path,
            max,
            Duration::from_secs(30),
        ));
        println!(
            "read_file {path} (max {max}): {:?} in {:?}",
            r.as_ref().map(|v| v.len()).map_err(|e| e.to_string()),
            t.elapsed()
        );
        r
    };
    let got = read("/tmp/flow-file", content.len()).expect("reading the file back");
    assert!(got == content, "read_file returned other bytes");
    let e = read("/tmp/flow-file", content.len() - 1)
        .expect_err("a file over max_bytes")
        .to_string();
    assert!(e.contains("more than the limit"), "{e}");
    let e = read("/tmp", 4096).expect_err("a directory").to_string();
    assert!(e.contains("directory"), "{e}");
    let e = read("/nonexistent-flow/file", 4096)
        .expect_err("a missing file")
        .to_string();
    assert!(
        e.contains("cannot open") && e.contains("No such file"),
        "{e}"
    );
    let e = read("tmp/flow-file", 4096)
        .expect_err("a relative path")
        .to_string();
    assert!(e.contains("absolute"), "{e}");
    // No program runs: a `cat` the guest put first on PATH changes nothing.
    let (code, _, err) = exec(
        name,
        &[
            "sh",
            "-c",
            "printf '#!/bin/sh\\necho owned\\n' > /usr/local/bin/cat && chmod +x /usr/local/bin/cat",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = exec(
        name,
        &["sh", "-c", "printf 'k3s: yes\\n' > /tmp/small"],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(read("/tmp/small", 64).expect("small file"), b"k3s: yes\n");
    let _ = exec(name, &["rm", "-f", "/usr/local/bin/cat"], None);

    ok(&["stop", name]);
}
