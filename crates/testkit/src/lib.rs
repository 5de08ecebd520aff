//! Test support shared by gatevm's crates (a dev-dependency only).
//!
//! **Skips.** cargo's test runner hides what a passing test prints, and a test that returns early
//! is counted as passed. A test that cannot run here calls [`skip`] (or [`skip_part`] for one part
//! of it) and returns: the line goes to stderr and, when `GATEVM_SKIP_LOG` names a file, is
//! appended to it, one line per call. `scripts/test.sh` sets that variable and turns the file into
//! the summary's "N skipped" with each test's reason, subtracting them from cargo's "passed".
//!
//! **Bounds.** [`within`] runs a closure on its own thread and fails the test when it does not
//! return in time, for properties such as "a hostile peer never makes the decoder hang".

use std::fmt::Display;
use std::io::Write;
use std::sync::mpsc;
use std::time::Duration;

/// The variable naming the file that collects skips (see the crate's documentation).
pub const SKIP_LOG_ENV: &str = "GATEVM_SKIP_LOG";

/// Records that the test `test` did not run here, and why. The caller returns right after.
///
/// `test` is the name cargo shows for the test (`module::name` for unit tests, `name` for
/// integration tests), so the summary can say which one.
pub fn skip(test: &str, why: impl Display) {
    record("SKIP", test, &why.to_string());
}

/// Records that the part `part` of test `test` did not run here, and why; the rest of the test
/// goes on. The summary lists these apart and does not count them as skipped tests.
pub fn skip_part(test: &str, part: &str, why: impl Display) {
    record("PART", &format!("{test} ({part})"), &why.to_string());
}

fn record(kind: &str, test: &str, why: &str) {
    // One line each, without tabs or newlines, so the summary can split it.
    let clean = |s: &str| s.replace(['\t', '\n', '\r'], " ");
    let (test, why) = (clean(test), clean(why));
    eprintln!("NOT RUN {test}: {why}");
    let Some(path) = std::env::var_os(SKIP_LOG_ENV) else {
        return;
    };
    // O_APPEND: a single write of one short line lands whole even with tests on several threads
    // and several test binaries appending at once.
    let line = format!("{kind}\t{test}\t{why}\n");
    let res = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = res {
        // The summary would be wrong: fail loudly rather than count this test as passed.
        panic!(
            "recording the skip of {test} in {}: {e}",
            path.to_string_lossy()
        );
    }
}

/// Runs `f` on its own thread and returns its result, or panics naming `what` when it has not
/// returned within `limit`. A panic inside `f` is passed on. The thread of a closure that overran
/// is left behind (a test process ends soon after).
pub fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::Builder::new()
        .name(format!("within: {what}"))
        .spawn(move || {
            let out = f();
            let _ = tx.send(out);
        })
        .expect("spawning a thread for within()");
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: did not finish within {limit:?}")
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => panic!("{what}: the thread ended without a result"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_returns_the_value() {
        assert_eq!(within(Duration::from_secs(5), "add", || 2 + 2), 4);
    }

    #[test]
    #[should_panic(expected = "sleeper: did not finish within")]
    fn within_fails_a_closure_that_overruns() {
        within(Duration::from_millis(50), "sleeper", || {
            std::thread::sleep(Duration::from_secs(5))
        });
    }

    #[test]
    #[should_panic(expected = "inner boom")]
    fn within_passes_a_panic_on() {
        within(Duration::from_secs(5), "boom", || -> () {
            panic!("inner boom")
        });
    }

    #[test]
    fn skip_appends_one_line_per_call() {
        // The variable is process-wide: this test sets it only in a child process (itself).
        if std::env::var_os("GATEVM_TESTKIT_CHILD").is_some() {
            skip("child_a", "no\tsuch\nthing");
            skip_part("child_b", "listener", "no ss");
            return;
        }
        let dir = std::env::temp_dir().join(format!("gatevm-testkit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("skips");
        let _ = std::fs::remove_file(&log);
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "tests::skip_appends_one_line_per_call",
                "--test-threads=1",
            ])
            .env("GATEVM_TESTKIT_CHILD", "1")
            .env(SKIP_LOG_ENV, &log)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let text = std::fs::read_to_string(&log).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            text,
            "SKIP\tchild_a\tno such thing\nPART\tchild_b (listener)\tno ss\n"
        );
    }
}
