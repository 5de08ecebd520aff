//! The k3s profile, host side: what gatevm prepares on the host for k3s in the guest.
//!
//! - [`pki`]: the gateway's CA, server and client certificates, the Kubernetes TLS Secret that
//!   hands them to the guest, and the gateway metadata clients read.
//! - [`kubeconfig`]: the instance's kubeconfig and its merge into the user's.
//! - [`binary`]: the k3s binary: checked, cached by `gatevm setup --k3s`, version and hash.
//! - [`download`]: the pinned k3s release, fetched and verified against its pinned sha256.
//! - [`tls`]: the gateway health check: does a port accept TLS signed by the instance's CA?
//! - [`flags`]: k3s server flags and CNI configuration chosen from the guest kernel's features.

pub mod binary;
mod cert;
pub mod download;
pub mod flags;
pub mod kubeconfig;
pub mod pki;
pub mod tls;

pub(crate) use gatevm_abi::error_chain;
