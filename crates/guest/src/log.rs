//! Console logging: one short line per milestone, prefixed `gatevm-guest:` and stamped with the
//! guest uptime in milliseconds. PID 1's stderr is `/dev/console`, which the host keeps in a log
//! file; benchmarks read these lines, so keep their shape stable.

use std::fmt;

/// Milliseconds since boot (`CLOCK_BOOTTIME`), the same clock as `/proc/uptime`.
pub(crate) fn uptime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_BOOTTIME is always valid on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec.max(0) as u64) * 1000 + (ts.tv_nsec.max(0) as u64) / 1_000_000
}

/// Formats one console line (without writing it).
pub(crate) fn format_line(uptime_ms: u64, msg: fmt::Arguments<'_>) -> String {
    format!("gatevm-guest: [{uptime_ms:>5}ms] {msg}\n")
}

/// Writes one line to stderr in a single write.
pub(crate) fn line(msg: fmt::Arguments<'_>) {
    let s = format_line(uptime_ms(), msg);
    eprint!("{s}");
}

pub(crate) use gatevm_abi::error_chain;

/// Logs one line to the console: `glog!("agent listening on {}", path)`.
#[macro_export]
macro_rules! glog {
    ($($t:tt)*) => {
        $crate::log::line(format_args!($($t)*))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_shape() {
        assert_eq!(
            format_line(812, format_args!("agent listening on {}", "/dev/vport1p1")),
            "gatevm-guest: [  812ms] agent listening on /dev/vport1p1\n"
        );
        assert!(uptime_ms() > 0);
    }

    #[test]
    fn chain_names_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot open /x")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("no such thing"));
        assert_eq!(error_chain(&e), "cannot open /x: no such thing");
        assert_eq!(error_chain(&std::io::Error::other("plain")), "plain");
    }
}
