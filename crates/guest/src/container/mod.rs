//! `gatevm-guest container run|ps|rm`: docker-like containers on the guest's containerd, driven
//! through `ctr`, each in its own network namespace attached to the `gatevm` CNI bridge network
//! (see [`crate::cni`]), with ports published on the guest's address by the portmap plugin.
//!
//! The host runs these commands through the agent's exec channel as an ordinary process. Errors
//! are one line on stderr prefixed `gatevm-guest: `. Exit codes:
//! - `run`: 125 when gatevm or ctr could not set the container up (bad arguments, image not
//!   imported, name taken, network or ctr failure), 126/127 when the command cannot be run /
//!   found in the image, otherwise the container's own code (128+N when it or ctr was killed by
//!   signal N); `--detach` exits 0 once it started.
//! - `ps`: 0, 1 on failure, 2 on a usage error.
//! - `rm`: 0, 1 on failure (unknown container, running without `--force`), 2 on a usage error.

pub(crate) mod args;
pub(crate) mod ctr;
pub(crate) mod image;
pub(crate) mod network;
pub(crate) mod ps;
pub(crate) mod pull;
pub(crate) mod rm;
pub(crate) mod run;
pub(crate) mod signals;

use std::io::Write;

/// Usage of the `container` subcommands.
pub(crate) const USAGE: &str = "\
usage:
  gatevm-guest container run --namespace NS --name C [--detach] [--tty]
      [--publish GUESTPORT:CONTAINERPORT[/tcp|/udp]]... [--env K=V]... [--workdir DIR]
      IMAGE [--] [CMD ARG...]
  gatevm-guest container ps --namespace NS [--json]
  gatevm-guest container rm --namespace NS [--force] C
  gatevm-guest container pull --namespace NS [--platform OS/ARCH[/VARIANT]] REF";

/// A failed command: its exit code and a one-line message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    /// Exit code.
    pub code: i32,
    /// What went wrong.
    pub message: String,
}

impl Failure {
    /// A failure with `code`.
    pub(crate) fn new(code: i32, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }

    /// Prints the message and returns the code.
    pub(crate) fn report(&self) -> i32 {
        error(&self.message);
        self.code
    }
}

/// Makes a message a single line.
pub(crate) fn one_line(msg: &str) -> String {
    msg.split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Prints `gatevm-guest: MSG` on stderr (one line).
pub(crate) fn error(msg: &str) {
    let _ = writeln!(std::io::stderr().lock(), "gatevm-guest: {}", one_line(msg));
}

/// Prints to stdout, ignoring a closed pipe (no panics).
pub(crate) fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// The exit code of a finished process: its code, or 128+N when killed by signal N.
pub(crate) fn exit_code(status: &gatevm_abi::ExitStatus) -> i32 {
    match (status.code, status.signal) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        (None, None) => 125,
    }
}

/// `gatevm-guest container ARGS…`; returns the exit code.
pub(crate) fn main(args: &[String]) -> i32 {
    match args.first().map(String::as_str) {
        Some("run") => run::main(&args[1..]),
        Some("ps") => ps::main(&args[1..]),
        Some("rm") => rm::main(&args[1..]),
        Some("pull") => pull::main(&args[1..]),
        Some("--help") | Some("-h") | Some("help") => {
            print(&format!("{USAGE}\n"));
            0
        }
        Some(other) => {
            error(&format!(
                "unknown container command {other:?}: use run, ps, rm or pull"
            ));
            2
        }
        None => {
            error("container needs a command: run, ps or rm (see gatevm-guest container --help)");
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn messages_are_one_line() {
        assert_eq!(one_line("a\nb\r\n\n c "), "a; b; c");
        assert_eq!(one_line("plain"), "plain");
    }

    #[test]
    fn exit_codes_of_processes() {
        let st = |code, signal| gatevm_abi::ExitStatus { code, signal };
        assert_eq!(exit_code(&st(Some(3), None)), 3);
        assert_eq!(exit_code(&st(None, Some(9))), 137);
        assert_eq!(exit_code(&st(Some(0), None)), 0);
        assert_eq!(exit_code(&st(None, None)), 125);
    }

    #[test]
    fn dispatch_usage_errors() {
        assert_eq!(main(&[]), 2);
        assert_eq!(main(&["bogus".into()]), 2);
        assert_eq!(main(&["--help".into()]), 0);
        // Usage errors of the subcommands, before anything touches containerd.
        assert_eq!(main(&["run".into(), "--name".into(), "c".into()]), 125);
        assert_eq!(main(&["ps".into()]), 2);
        assert_eq!(main(&["rm".into(), "-n".into(), "x".into()]), 2);
    }
}
