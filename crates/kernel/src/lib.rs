//! What gatevm knows of a Linux guest kernel, shared by the host and the statically linked guest
//! agent, so it stays free of heavy dependencies:
//!
//! - [`kmod`]: the kernel-module index of one module tree (`modules.dep`, `modules.builtin`) and
//!   the dependency order of the modules to load.
//! - [`kconfig`]: what the kernel can do for the payloads, read from its build configuration.
//! - [`libkrunfw`]: libkrunfw's kernel, whose configuration is recorded here (it ships none).

#![warn(missing_docs)]

pub mod kconfig;
pub mod kmod;
pub mod libkrunfw;
