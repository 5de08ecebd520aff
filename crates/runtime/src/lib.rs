//! gatevm's runtime bundle: the guest kernel and its modules, libkrunfw, gvproxy, virtiofsd,
//! passt (built from Debian's source package; see [`component::passt`]) and QEMU (the host's when
//! it is 8 or newer, else Debian's backport; see [`component::qemu`]), each with its provenance; the base root
//! filesystem built from a recipe; the initramfs that boots the guest agent.
//!
//! - [`setup()`] acquires everything into [`dirs::runtime_dir`] (idempotent, reports each step).
//! - [`Runtime::load`] gives typed access to what setup installed.
//! - [`build_initramfs`] makes (or reuses) the initramfs for a guest binary.
//! - [`verify()`] re-hashes the installed files against `provenance.json`.
//!
//! Nothing here prints: progress goes through a callback, results come back as data.

#![warn(missing_docs)]

pub(crate) mod apt;
mod cmd;
pub(crate) mod component;
pub mod cpio;
pub mod dirs;
pub mod erofs;
pub(crate) mod error;
pub(crate) mod fsutil;
pub(crate) mod modules;
pub(crate) mod provenance;
pub(crate) mod runtime;
pub(crate) mod setup;
mod util;

pub use cmd::CommandError;
pub use component::initramfs::{build_initramfs, InitramfsError};
pub use component::kernel::KernelInfo;
pub use component::rootfs::{RootfsError, RootfsRecipe};
pub use component::{initramfs, rootfs};
pub use provenance::{Component, FileRecord, Provenance, ProvenanceError, VerifyReport};
pub use runtime::{verify, Runtime, RuntimeError};
pub use setup::{
    setup, setup_system, uses_system_runtime, SetupAction, SetupError, SetupOptions, SetupReport,
    SetupStep,
};
