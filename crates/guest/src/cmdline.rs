//! The `gatevm.*` settings this guest was started with: the kernel command line (`/proc/cmdline`)
//! and, under libkrun (which writes the kernel command line itself), this process's arguments.
//! The keys, their values and their parsing are the contract in [`gatevm_abi::cmdline`].

use gatevm_abi::cmdline::with_args;
pub(crate) use gatevm_abi::cmdline::{parse, AgentTransport, Cmdline, PayloadKind};

/// Reads and parses `/proc/cmdline` and then this process's arguments (which win); defaults when
/// neither can be read.
pub(crate) fn read() -> (Cmdline, Vec<String>) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match std::fs::read_to_string("/proc/cmdline") {
        Ok(s) => parse(&with_args(&s, &args)),
        Err(e) => {
            let (c, mut w) = parse(&with_args("", &args));
            w.push(format!("/proc/cmdline: {e}"));
            (c, w)
        }
    }
}
