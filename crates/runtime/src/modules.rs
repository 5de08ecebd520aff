//! Kernel module resolution for the initramfs: the dependency closure [`gatevm_kernel::kmod`] orders
//! from `modules.dep` and `modules.builtin`, with every problem of the index an error.

use std::path::{Path, PathBuf};

use gatevm_kernel::kmod::{Defect, ModuleIndex};
use thiserror::Error;

/// Errors of module resolution.
#[derive(Debug, Error)]
pub enum ModulesError {
    /// A module index file could not be read.
    #[error("cannot read {} (was depmod run on this module tree?)", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A requested module is neither a loadable module nor built in.
    #[error("kernel module {name} is neither in modules.dep nor in modules.builtin of {}", dir.display())]
    Unknown {
        /// The module name.
        name: String,
        /// The module tree.
        dir: PathBuf,
    },
    /// `modules.dep` names a dependency that has no entry of its own.
    #[error("modules.dep lists {dependency} (needed by {module}) but has no entry for it")]
    MissingDependency {
        /// The module that needs it.
        module: String,
        /// The dependency path.
        dependency: String,
    },
    /// The dependencies form a cycle.
    #[error("kernel module dependency cycle through {0}")]
    Cycle(String),
}

/// The result of resolving a set of modules.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct ModuleClosure {
    /// Module files (relative to the module tree) in load order: every module after its
    /// dependencies.
    pub load_order: Vec<String>,
    /// Requested modules that are built into the kernel (nothing to load).
    pub builtin: Vec<String>,
}

/// Reads the module index (`modules.dep`, and `modules.builtin` if present) of a module tree.
pub(crate) fn load_index(modules_dir: &Path) -> Result<ModuleIndex, ModulesError> {
    ModuleIndex::load(modules_dir).map_err(|e| ModulesError::Read {
        path: e.path,
        source: e.source,
    })
}

/// Resolves the modules to load for `names`: their loadable dependency closure in load order
/// (dependencies first, each once, order otherwise following the request). Built-in names are
/// reported in [`ModuleClosure::builtin`]; unknown names and defects of the index are errors (an
/// unknown name first, then the first defect met).
pub(crate) fn closure(index: &ModuleIndex, names: &[&str]) -> Result<ModuleClosure, ModulesError> {
    let c = index.closure(names, |_| false);
    if let Some(name) = c.missing.into_iter().next() {
        return Err(ModulesError::Unknown {
            name,
            dir: index.dir().map(Path::to_path_buf).unwrap_or_default(),
        });
    }
    if let Some(defect) = c.defects.into_iter().next() {
        return Err(match defect {
            Defect::MissingDependency { module, dependency } => {
                ModulesError::MissingDependency { module, dependency }
            }
            Defect::Cycle(name) => ModulesError::Cycle(name),
        });
    }
    Ok(ModuleClosure {
        load_order: c.files,
        builtin: c.builtin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/virtio/virtio_mmio.ko.xz:
kernel/net/core/failover.ko.xz:
kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko.xz
kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz kernel/net/core/failover.ko.xz
";
    const BUILTIN: &str = "kernel/fs/fuse/virtiofs.ko\nkernel/drivers/char/virtio_console.ko\n";

    #[test]
    fn closure_keeps_order_and_builtin() {
        let idx = ModuleIndex::parse(DEP, BUILTIN);
        let c = closure(
            &idx,
            &["virtio_mmio", "virtiofs", "virtio_net", "virtio_console"],
        )
        .unwrap();
        assert_eq!(
            c.load_order,
            vec![
                "kernel/drivers/virtio/virtio_mmio.ko.xz",
                "kernel/net/core/failover.ko.xz",
                "kernel/drivers/net/net_failover.ko.xz",
                "kernel/drivers/net/virtio_net.ko.xz",
            ]
        );
        assert_eq!(c.builtin, vec!["virtiofs", "virtio_console"]);
    }

    #[test]
    fn unknown_and_broken_indexes() {
        let idx = ModuleIndex::parse(DEP, BUILTIN);
        assert!(matches!(
            closure(&idx, &["nope"]),
            Err(ModulesError::Unknown { .. })
        ));
        let idx = ModuleIndex::parse("a.ko: b.ko\n", "");
        assert!(matches!(
            closure(&idx, &["a"]),
            Err(ModulesError::MissingDependency { .. })
        ));
        let idx = ModuleIndex::parse("a.ko: b.ko\nb.ko: a.ko\n", "");
        assert!(matches!(closure(&idx, &["a"]), Err(ModulesError::Cycle(_))));
    }

    #[test]
    fn unreadable_trees_are_read_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let err = load_index(tmp.path()).unwrap_err();
        assert!(
            matches!(&err, ModulesError::Read { path, .. } if *path == tmp.path().join("modules.dep"))
        );
        assert!(err.to_string().contains("was depmod run"), "{err}");
        std::fs::write(tmp.path().join("modules.dep"), DEP).unwrap();
        let idx = load_index(tmp.path()).unwrap();
        match closure(&idx, &["nope"]) {
            Err(ModulesError::Unknown { name, dir }) => {
                assert_eq!(name, "nope");
                assert_eq!(dir, tmp.path());
            }
            r => panic!("{r:?}"),
        }
    }
}
