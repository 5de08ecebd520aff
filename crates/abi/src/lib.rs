//! The contract between the host and the guest agent, written once: both sides depend on this
//! crate and nothing here is restated elsewhere.
//!
//! - [`wire`] (re-exported at the root): the agent protocol's frames, messages and limits, and
//!   its flow control ([`flow`]);
//! - [`cmdline`]: the `gatevm.*` keys of the guest kernel command line (rendered by the host,
//!   parsed by the guest, round-trip tested);
//! - [`paths`]: where things are in the guest (the agent binary, the state disk, the k3s staging
//!   directory);
//! - [`net`]: the guest's fixed network (addresses, MAC, MTUs);
//! - [`plan`]: the k3s plan the host stages and the guest validates;
//! - [`settings`]: shared directories, registries and proxies, handed over on a small disk;
//! - [`error_chain`]: the one-line form of an error wherever it leaves a process (a frame to the
//!   host, a log line, the CLI's message).
//!
//! See ARCHITECTURE.md for where each side uses it.

pub mod cmdline;
pub mod wire;

pub use wire::*;

pub mod net;
pub mod paths;
pub mod plan;
pub mod settings;

/// An error and its causes on one line, `": "`-joined. Errors keep their cause in `source()`
/// only (never also in their own message); a cause whose text the line already holds (an error
/// from a library that does repeat it) is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::error_chain;
    use std::fmt;

    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);
    impl fmt::Display for E {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for E {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn causes_are_joined_once() {
        let leaf = E("permission denied", None);
        assert_eq!(error_chain(&leaf), "permission denied");
        let e = E("reading /x", Some(Box::new(leaf)));
        assert_eq!(error_chain(&e), "reading /x: permission denied");
        let repeated = E(
            "reading /x: permission denied",
            Some(Box::new(E("permission denied", None))),
        );
        assert_eq!(error_chain(&repeated), "reading /x: permission denied");
    }
}
