//! Logging set-up and small output helpers shared by the commands.

use std::io::IsTerminal;

/// Logs go to stderr: warnings by default, info with -v, debug with -vv, or as `RUST_LOG` says.
/// The supervisor logs at info by default (its stderr is its log file).
/// With `log`, the lines go to that capped log instead of stderr.
pub fn init_logging(
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
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Seconds with one decimal.
pub fn secs(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

/// Prints a value as pretty JSON on stdout.
pub fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// An error and its causes on one line, like `{:#}`, but a cause whose text the line already
/// holds (an error that prints its source as part of its own message) is not repeated.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::error_line;

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
