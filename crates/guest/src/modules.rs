//! Kernel modules: loading with `finit_module` (compressed files are handed to the kernel as they
//! are, `MODULE_INIT_COMPRESSED_FILE`) in the dependency order [`gatevm_kernel::kmod`] computes from
//! `modules.dep`, skipping modules the running kernel already has.

use crate::sys;
use gatevm_kernel::kmod::{module_name, ModuleIndex};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// Modules stage 2 loads when the tree has them (missing or built-in ones are skipped): the
/// network and disk devices, overlayfs for containerd's snapshotter, and what CNI's bridge,
/// portmap and masquerade need.
pub(crate) const WANTED: &[&str] = &[
    "virtio_net",
    "virtio_blk",
    "overlay",
    "bridge",
    "veth",
    "br_netfilter",
    "nf_tables",
    "nft_compat",
    "nf_nat",
    "nf_conntrack",
    "xt_MASQUERADE",
    "virtio_console",
];

/// What only the k3s profile loads: flannel's vxlan backend and kube-proxy's IPVS mode. Left
/// out elsewhere, they are ~18% of the module bytes a boot links (under QEMU TCG, linking modules
/// is most of the ~2 s the module thread takes).
pub(crate) const K3S_ONLY: &[&str] = &["vxlan", "ip_vs"];

/// What containerd needs loaded before it starts: overlayfs, which its default snapshotter
/// checks at start-up.
pub(crate) const FOR_CONTAINERD: &[&str] = &["overlay"];

/// The modules a guest loads in the background, in two batches: `first` before the payload
/// starts, `rest` beside it. Together they are [`WANTED`] without [`EARLY`], plus
/// [`K3S_ONLY`] for k3s and `vsock` when the agent talks over vsock (libkrun).
///
/// containerd needs only [`FOR_CONTAINERD`] (and the agent `vsock`); bridges, veths and
/// netfilter are for containers' networks, which wait for [`LOADED_MARKER`]. k3s's kubelet,
/// flannel and kube-proxy check the kernel as they start, so for k3s everything is `first`.
pub(crate) fn background(k3s: bool, vsock: bool) -> Batches {
    let mut all: Vec<&str> = WANTED
        .iter()
        .copied()
        .filter(|m| !EARLY.contains(m))
        .collect();
    if k3s {
        all.extend_from_slice(K3S_ONLY);
    }
    if vsock {
        all.push("vsock");
    }
    if k3s {
        return Batches {
            first: all,
            rest: Vec::new(),
        };
    }
    let (first, rest) = all
        .into_iter()
        .partition(|m| FOR_CONTAINERD.contains(m) || *m == "vsock");
    Batches { first, rest }
}

/// The two batches of [`background`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Batches {
    /// Loaded before the payload starts.
    pub first: Vec<&'static str>,
    /// Loaded while the payload starts.
    pub rest: Vec<&'static str>,
}

/// Created by stage 2 once every background module is loaded (or given up on).
pub(crate) const LOADED_MARKER: &str = "/run/gatevm/modules-loaded";

/// Marks the background modules as loaded ([`LOADED_MARKER`]).
pub(crate) fn mark_loaded() {
    let path = Path::new(LOADED_MARKER);
    let r = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|_| std::fs::write(path, b""));
    if let Err(e) = r {
        crate::glog!("cannot create {LOADED_MARKER}: {e}");
    }
}

/// Waits up to `timeout` for [`LOADED_MARKER`]; whether it appeared.
pub(crate) fn wait_loaded(timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if Path::new(LOADED_MARKER).exists() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Modules needed before the network and the state disk are set up (loaded in the foreground).
pub(crate) const EARLY: &[&str] = &["virtio_net", "virtio_blk"];

/// Whether a module is already present in the running kernel (loaded, or built in with a
/// `/sys/module` entry).
pub(crate) fn is_loaded(name: &str) -> bool {
    Path::new("/sys/module").join(name).exists()
}

/// Loads one module file; `EEXIST` (already loaded) counts as success.
pub(crate) fn load_file(path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    match sys::finit_module(&file, sys::module_flags(path)) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        r => r,
    }
}

/// Outcome of [`load`].
#[derive(Debug, Default)]
pub(crate) struct Report {
    /// Files loaded.
    pub loaded: usize,
    /// Requested names the tree does not have.
    pub missing: Vec<String>,
    /// Failures as `name: error`.
    pub failed: Vec<String>,
}

/// Loads `names` and their dependencies from the tree at `tree`, leaving out those already
/// loaded; built-in names and defects of the index are passed over.
pub(crate) fn load(index: &ModuleIndex, tree: &Path, names: &[&str]) -> Report {
    let closure = index.closure(names, is_loaded);
    let mut report = Report {
        missing: closure.missing,
        ..Report::default()
    };
    for rel in &closure.files {
        let path: PathBuf = tree.join(rel);
        match load_file(&path) {
            Ok(()) => report.loaded += 1,
            Err(e) => report.failed.push(format!("{}: {e}", module_name(rel))),
        }
    }
    report
}

/// The module tree of the running kernel, `/lib/modules/$(uname -r)`.
pub(crate) fn running_tree() -> Option<PathBuf> {
    sys::kernel_release().map(|r| Path::new("/lib/modules").join(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_by_extension() {
        assert_eq!(
            sys::module_flags(Path::new("x.ko.xz")),
            sys::MODULE_INIT_COMPRESSED_FILE
        );
        assert_eq!(sys::module_flags(Path::new("x.ko")), 0);
    }

    #[test]
    fn background_modules_follow_profile_and_transport() {
        let plain = background(false, false);
        assert_eq!(plain.first, FOR_CONTAINERD);
        assert!(plain.rest.contains(&"br_netfilter") && plain.rest.contains(&"nf_tables"));
        let all: Vec<&str> = plain.first.iter().chain(&plain.rest).copied().collect();
        assert_eq!(all.len(), WANTED.len() - EARLY.len(), "{all:?}");
        assert!(!all.iter().any(|m| EARLY.contains(m)), "{all:?}");
        assert!(!all.iter().any(|m| K3S_ONLY.contains(m) || *m == "vsock"));

        let k3s = background(true, false);
        assert!(k3s.rest.is_empty(), "{k3s:?}");
        assert!(K3S_ONLY.iter().all(|m| k3s.first.contains(m)), "{k3s:?}");
        assert!(k3s.first.contains(&"overlay") && k3s.first.contains(&"br_netfilter"));

        let vsock = background(false, true);
        assert!(vsock.first.contains(&"vsock"), "{vsock:?}");
        assert!(!vsock.rest.contains(&"vsock"), "{vsock:?}");
    }
}
