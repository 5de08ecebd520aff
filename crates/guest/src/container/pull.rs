//! `gatevm-guest container pull --namespace NS [--platform P] REF`: pulls an image through the
//! guest's containerd with the guest's own `ctr` (the fetch runs here, on the guest's network,
//! with the registry host files of `--registry-mirror`/`--insecure-registry` and the proxy
//! variables of `--proxy-env`).
//!
//! Output: `progress: …` lines on stdout at most once a second (what ctr's redrawn table says in
//! its last line: time and bytes), then `pulled REF`. A failure is one line on stderr naming what
//! happened (not found, registry unreachable, bad reference), exit 1, and whatever the failed
//! pull registered is removed again. Usage errors exit 2.

use super::{args, ctr, error, image, print};
use gatevm_abi::settings::CERTS_DIR;
use std::io::{BufRead, Read};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Parsed arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PullOpts {
    pub namespace: String,
    pub platform: Option<String>,
    pub reference: String,
}

/// Parses `--namespace NS [--platform P] REF`.
pub(crate) fn parse(a: &[String]) -> Result<PullOpts, String> {
    let (mut ns, mut platform, mut reference) = (None, None, None);
    let mut i = 0;
    while i < a.len() {
        let w = a[i].as_str();
        let (flag, inline) = match w.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (w, None),
        };
        let mut value = || -> Result<String, String> {
            if let Some(v) = inline.clone() {
                return Ok(v);
            }
            i += 1;
            a.get(i).cloned().ok_or(format!("{flag} needs a value"))
        };
        match flag {
            "--namespace" | "-n" => ns = Some(value()?),
            "--platform" => platform = Some(value()?),
            f if f.starts_with('-') => return Err(format!("unknown flag {f} for container pull")),
            _ if reference.is_none() => reference = Some(w.to_string()),
            _ => return Err(format!("unexpected argument {w:?}: pull takes one image")),
        }
        i += 1;
    }
    let namespace = ns.ok_or("--namespace is required")?;
    args::validate_namespace(&namespace).map_err(|e| e.to_string())?;
    if let Some(p) = &platform {
        gatevm_abi::settings::check_platform(p)?;
    }
    let reference = reference.ok_or("an image reference is required")?;
    let reference = image::normalize(&reference).map_err(|e| e.to_string())?;
    Ok(PullOpts {
        namespace,
        platform,
        reference,
    })
}

/// What a failed pull's last `ctr: …` line means, as one line for the user.
pub(crate) fn explain(reference: &str, ctr_line: &str) -> String {
    let l = ctr_line.trim().trim_start_matches("ctr: ");
    let lower = l.to_ascii_lowercase();
    if lower.contains(": not found") || lower.ends_with("not found") {
        return format!(
            "{reference}: no such image in the registry (repository or tag not found): {l}"
        );
    }
    if lower.contains("pull access denied")
        || lower.contains("insufficient_scope")
        || lower.contains("unauthorized")
    {
        return format!(
            "{reference}: no such image, or the registry wants credentials (gatevm keeps none): {l}"
        );
    }
    if [
        "connection refused",
        "no such host",
        "i/o timeout",
        "dial tcp",
        "network is unreachable",
        "server gave http response",
        "tls:",
        "x509:",
        "connection reset",
        "eof",
    ]
    .iter()
    .any(|n| lower.contains(n))
    {
        return format!(
            "cannot reach the registry of {reference}: {l} (see --insecure-registry, --registry-mirror and --proxy-env)"
        );
    }
    format!("pulling {reference} failed: {l}")
}

/// The summary of ctr's progress table: its `elapsed: … total: …` line, escapes removed.
pub(crate) fn progress_of(line: &str) -> Option<String> {
    let clean = strip_escapes(line);
    let t = clean.trim();
    let rest = t.strip_prefix("elapsed:")?;
    Some(format!(
        "elapsed {}",
        rest.split_whitespace().collect::<Vec<_>>().join(" ")
    ))
}

/// Removes ANSI escape sequences (`ESC [ … letter`) and other control characters.
pub(crate) fn strip_escapes(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for n in chars.by_ref() {
                    if n.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        if !c.is_control() || c == '\t' {
            out.push(c);
        }
    }
    out
}

/// `gatevm-guest container pull ARGS…`.
pub(crate) fn main(a: &[String]) -> i32 {
    let o = match parse(a) {
        Ok(o) => o,
        Err(e) => {
            error(&e);
            return 2;
        }
    };
    match pull(&o) {
        Ok(()) => {
            print(&format!("pulled {}\n", o.reference));
            0
        }
        Err(e) => {
            error(&e);
            1
        }
    }
}

fn pull(o: &PullOpts) -> Result<(), String> {
    let ns = o.namespace.as_str();
    ctr::check_running().map_err(|e| e.to_string())?;
    let before = ctr::images(ns).map_err(|e| e.to_string())?;
    let mut args: Vec<&str> = vec!["images", "pull", "--hosts-dir", CERTS_DIR];
    if let Some(p) = &o.platform {
        args.extend(["--platform", p]);
    }
    args.push(&o.reference);
    let mut cmd = ctr::command(ns, &args);
    cmd.envs(crate::settings::get().proxy_env())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Through the reaper, which reaps every child of this process.
    let spawned = crate::reaper::Reaper::global()
        .spawn(&mut cmd)
        .map_err(|e| format!("cannot run ctr: {e}"))?;
    let stderr = spawned.stderr;
    // stderr in a thread (kept up to 64 KiB), stdout's progress table read here.
    let err_thread = stderr.map(|e| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = e.take(64 << 10).read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    });
    if let Some(out) = spawned.stdout {
        let mut last = Instant::now() - Duration::from_secs(2);
        let mut reader = std::io::BufReader::new(out);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line);
                    if let Some(p) = progress_of(&text) {
                        if last.elapsed() >= Duration::from_secs(1) {
                            print(&format!("progress: {p}\n"));
                            last = Instant::now();
                        }
                    }
                }
            }
        }
    }
    let status = spawned
        .exit
        .recv()
        .map_err(|_| "lost the exit status of ctr".to_string())?;
    let err_text = err_thread.and_then(|t| t.join().ok()).unwrap_or_default();
    if status.code == Some(0) {
        return Ok(());
    }
    // Nothing of a failed pull stays listed.
    if let Ok(now) = ctr::images(ns) {
        let new: Vec<&str> = now
            .iter()
            .map(String::as_str)
            .filter(|r| !before.iter().any(|b| b == r))
            .collect();
        if !new.is_empty() {
            let mut rm = vec!["images", "rm", "--sync"];
            rm.extend(new);
            let _ = ctr::output(ns, &rm);
        }
    }
    let line = ctr::error_line(&err_text);
    let line = if line.is_empty() {
        format!("ctr ended with {}", crate::reaper::describe(&status))
    } else {
        line
    };
    Err(explain(&o.reference, &line))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn arguments() {
        let o = parse(&v(&[
            "-n",
            "default",
            "--platform",
            "linux/arm64/v8",
            "busybox",
        ]))
        .unwrap();
        assert_eq!(o.namespace, "default");
        assert_eq!(o.platform.as_deref(), Some("linux/arm64/v8"));
        assert!(
            o.reference.ends_with("library/busybox:latest"),
            "{}",
            o.reference
        );
        let o = parse(&v(&["--namespace=k8s.io", "localhost:5000/a/b:1"])).unwrap();
        assert_eq!(o.reference, "localhost:5000/a/b:1");
        for (a, why) in [
            (v(&["busybox"]), "--namespace"),
            (v(&["-n", "d"]), "reference is required"),
            (v(&["-n", "d", "a", "b"]), "one image"),
            (v(&["-n", "d", "--bogus", "a"]), "unknown flag"),
            (v(&["-n", "d", "--platform"]), "needs a value"),
            (v(&["-n", "d", "--platform", "linux", "a"]), "OS/ARCH"),
            (v(&["-n", "d", "--platform", "Linux/AMD64", "a"]), "OS/ARCH"),
            (
                v(&["-n", "d", "--platform", "linux/amd64;rm", "a"]),
                "OS/ARCH",
            ),
            (v(&["-n", "d", "bad ref"]), "invalid image reference"),
            (v(&["-n", "d", "-rf"]), "unknown flag"),
            (v(&["-n", "../x", "a"]), "namespace"),
        ] {
            let e = parse(&a).unwrap_err();
            assert!(e.contains(why), "{a:?}: {e}");
        }
    }

    #[test]
    fn failures_are_named() {
        let r = "192.168.127.254:5000/t/img:nope";
        let e = explain(r, "ctr: 192.168.127.254:5000/t/img:nope: not found");
        assert!(e.contains("no such image") && e.starts_with(r), "{e}");
        let e = explain(
            r,
            "ctr: failed to resolve reference \"x\": failed to do request: Head \"https://192.168.127.254:5000/v2/t/img/manifests/nope\": dial tcp 192.168.127.254:5000: connect: connection refused",
        );
        assert!(
            e.starts_with("cannot reach the registry") && e.contains("--insecure-registry"),
            "{e}"
        );
        let e = explain(r, "ctr: failed to resolve reference: pull access denied, repository does not exist or may require authorization: server message: insufficient_scope");
        assert!(e.contains("credentials"), "{e}");
        let e = explain(r, "ctr: something else");
        assert_eq!(e, format!("pulling {r} failed: something else"));
    }

    #[test]
    fn progress_is_the_tables_last_line() {
        let l = "\x1b[2A\x1b[0Jelapsed: 10.9s                                    total:  2.0 Mi (188.8 KiB/s)\n";
        assert_eq!(
            progress_of(l).as_deref(),
            Some("elapsed 10.9s total: 2.0 Mi (188.8 KiB/s)")
        );
        assert_eq!(progress_of("layer-sha256:e5: done |+++|"), None);
        assert_eq!(strip_escapes("a\x1b[31mb\x07c"), "abc");
    }
}
