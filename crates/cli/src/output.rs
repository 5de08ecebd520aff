//! Logging set-up and small output helpers shared by the commands.

use std::io::IsTerminal;

/// Logs go to stderr: warnings by default, info with -v, debug with -vv, or as `RUST_LOG` says.
/// The supervisor logs at info by default (its stderr is its log file).
/// With `log`, the lines go to that capped log instead of stderr.
pub(crate) fn init_logging(
    verbose: u8,
    supervisor: bool,
    log: Option<gatevm_instance::logcap::SharedLog>,
) {
    let default = match (verbose, supervisor) {
        (0, false) => "warn",
        (0, true) | (1, _) => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi =
        !supervisor && std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    let _ = match log {
        Some(log) => builder.with_writer(move || log.clone()).try_init(),
        None => builder.with_writer(std::io::stderr).try_init(),
    };
}

/// A single-threaded runtime for a command.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Seconds with one decimal.
pub(crate) fn secs(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

/// Prints a value as pretty JSON on stdout.
pub(crate) fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// An error and its causes on one line ([`gatevm_abi::error_chain`]: a cause whose text the line
/// already holds is not repeated).
pub(crate) fn error_line(e: &anyhow::Error) -> String {
    gatevm_abi::error_chain(&**e)
}

/// Most characters of an error message shown.
pub(crate) const MAX_ERROR_CHARS: usize = 2000;

/// The error line as it is printed: [`error_line`], stripped of terminal control sequences (a
/// message may quote the guest) and bounded.
pub(crate) fn shown_error(e: &anyhow::Error) -> String {
    gatevm_instance::text::line(&error_line(e), MAX_ERROR_CHARS)
}

/// Makes a status document safe to show (human or JSON): every string that comes from the
/// guest, or quotes it, is stripped of terminal control sequences and bounded. The supervisor
/// already does this for what the agent reports; this covers the CLI's own additions (the k3s
/// health details) and a supervisor that did not.
pub(crate) fn sanitize_status(st: &mut gatevm_instance::InstanceStatus) {
    use gatevm_instance::text::line;
    let opt = |s: &mut Option<String>, max: usize| {
        if let Some(v) = s.as_mut() {
            *v = line(v, max);
        }
    };
    opt(&mut st.agent.version, 100);
    opt(&mut st.agent.kernel, 100);
    st.payloads.truncate(16);
    for p in &mut st.payloads {
        p.name = line(&p.name, 100);
        opt(&mut p.last_exit, 1000);
    }
    if let Some(k) = st.k3s.as_mut() {
        k.version = line(&k.version, 100);
        opt(&mut k.detail, 1000);
        for v in [&mut k.images, &mut k.datastore] {
            v.truncate(64);
            for l in v.iter_mut() {
                *l = line(l, 512);
            }
        }
        if let Some(g) = k.gateway.as_mut() {
            opt(&mut g.detail, 1000);
        }
    }
    opt(&mut st.stop_reason, 1000);
    opt(&mut st.last_error, MAX_ERROR_CHARS);
    opt(&mut st.kernel, 200);
    opt(&mut st.backend, 100);
    opt(&mut st.backend_note, MAX_ERROR_CHARS);
    st.state = line(&st.state, 40);
    st.net = line(&st.net, 40);
    for f in &mut st.forwards {
        *f = line(f, 200);
    }
}

#[cfg(test)]
mod tests {
    use super::error_line;

    #[test]
    fn hostile_status_texts_are_made_safe() {
        use gatevm_abi::{PayloadState, PayloadStatus};
        let hostile = "x\u{1b}]52;c;aGk=\u{7}\u{1b}[2J\u{9b}31m\u{7}\u{8}\u{202e}y";
        let mut st: gatevm_instance::InstanceStatus =
            serde_json::from_value(serde_json::json!({
                "name": "n", "state": "running", "healthy": false, "net": "passt",
                "cpus": 1, "memory_mib": 512, "forwards": [], "agent": {"connected": true, "responding": true},
                "payloads": [], "logs": "/x"
            }))
            .unwrap();
        st.payloads = vec![
            PayloadStatus {
                name: format!("{hostile}{}", "n".repeat(5000)),
                state: PayloadState::Ready,
                pid: None,
                restarts: 0,
                last_exit: Some(hostile.into()),
            };
            40
        ];
        st.last_error = Some(hostile.into());
        st.agent.version = Some(hostile.into());
        // The guest's boot report (airgap imports, datastore recovery): many long hostile lines.
        let report: Vec<String> = (0..100)
            .map(|_| format!("{hostile}{}", "r".repeat(5000)))
            .collect();
        st.k3s = Some(gatevm_instance::control::K3sHealth {
            detail: Some(hostile.into()),
            images: report.clone(),
            datastore: report,
            ..Default::default()
        });
        super::sanitize_status(&mut st);
        assert_eq!(st.payloads.len(), 16);
        assert_eq!(st.payloads[0].name.chars().count(), 100);
        assert_eq!(st.payloads[0].last_exit.as_deref(), Some("x   y"));
        assert_eq!(st.last_error.as_deref(), Some("x   y"));
        let k = st.k3s.as_ref().unwrap();
        assert_eq!(k.detail.as_deref(), Some("x   y"));
        for lines in [&k.images, &k.datastore] {
            assert_eq!(lines.len(), 64);
            assert!(lines
                .iter()
                .all(|l| l.chars().count() <= 512 && l.starts_with("x   y")));
        }
        let json = serde_json::to_string(&st).unwrap();
        for bad in ["\\u001b", "\u{9b}", "\u{202e}", "\\u0007", "\\b"] {
            assert!(!json.contains(bad), "{bad:?} in {json}");
        }
        let e = anyhow::anyhow!("guest said {hostile}");
        assert_eq!(super::shown_error(&e), "guest said x   y");
    }

    /// Prints its source as part of its own message, as `#[error("passt: {0}")]` with
    /// `#[from]` does.
    #[derive(Debug)]
    struct Wraps(std::io::Error);
    impl std::fmt::Display for Wraps {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "passt: {}", self.0)
        }
    }
    impl std::error::Error for Wraps {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn causes_are_not_repeated() {
        let inner = std::io::Error::other("make failed (exit code 2)");
        let e = anyhow::Error::from(Wraps(inner)).context("setup");
        assert_eq!(error_line(&e), "setup: passt: make failed (exit code 2)");
        let plain = anyhow::anyhow!("disk full").context("importing x");
        assert_eq!(error_line(&plain), "importing x: disk full");
    }
}
