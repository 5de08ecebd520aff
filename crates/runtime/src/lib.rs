//! gatevm's runtime bundle: the guest kernel and its modules, libkrunfw, gvproxy, virtiofsd,
//! passt (built from Debian's source package; see [`passt`]) and QEMU (the host's when it is 8 or
//! newer, else Debian's backport; see [`qemu`]), each with its provenance; the base root
//! filesystem built from a recipe; the initramfs that boots the guest agent.
//!
//! - [`setup()`] acquires everything into [`dirs::runtime_dir`] (idempotent, reports each step).
//! - [`Runtime::load`] gives typed access to what setup installed.
//! - [`build_initramfs`] makes (or reuses) the initramfs for a guest binary.
//! - [`verify()`] re-hashes the installed files against `provenance.json`.
//!
//! Nothing here prints: progress goes through a callback, results come back as data.

#![warn(missing_docs)]

pub mod apt;
mod cmd;
pub mod cpio;
pub mod dirs;
pub mod error;
pub mod fsutil;
pub mod host;
pub mod initramfs;
pub mod kernel;
pub mod modules;
pub mod passt;
pub mod provenance;
pub mod qemu;
pub mod rootfs;
pub mod runtime;
pub mod setup;
mod util;
pub mod virtiofsd;

pub use cmd::{find_program, CommandError};
pub use initramfs::{build_initramfs, InitramfsError, INITRAMFS_MODULES};
pub use kernel::{KernelError, KernelInfo};
pub use provenance::{Component, FileRecord, Provenance, ProvenanceError, VerifyReport};
pub use rootfs::{RootfsError, RootfsRecipe};
pub use runtime::{verify, Runtime, RuntimeError};
pub use setup::{setup, SetupAction, SetupError, SetupOptions, SetupReport, SetupStep};
pub use virtiofsd::VIRTIOFSD_VERSION;
