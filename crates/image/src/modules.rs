//! Kernel module dependency resolution from `modules.dep` and `modules.builtin`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Errors of module resolution.
#[derive(Debug, Error)]
pub enum ModulesError {
    /// A module index file could not be read.
    #[error("cannot read {}: {source} (was depmod run on this module tree?)", path.display())]
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

/// The canonical name of a module: file stem without `.ko[.xz|.zst|.gz]`, `-` mapped to `_`.
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = [".ko.xz", ".ko.zst", ".ko.gz", ".ko"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))
        .unwrap_or(file);
    stem.replace('-', "_")
}

/// The parsed module index of one kernel release.
#[derive(Debug, Clone, Default)]
pub struct ModuleIndex {
    /// name -> (relative path, dependency paths)
    modules: HashMap<String, (String, Vec<String>)>,
    /// names of built-in modules
    builtin: HashSet<String>,
    dir: PathBuf,
}

/// The result of resolving a set of modules.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModuleClosure {
    /// Module files (relative to the module tree) in load order: every module after its
    /// dependencies.
    pub load_order: Vec<String>,
    /// Requested modules that are built into the kernel (nothing to load).
    pub builtin: Vec<String>,
}

impl ModuleIndex {
    /// Parses the texts of `modules.dep` and `modules.builtin`.
    pub fn parse(dep: &str, builtin: &str) -> Self {
        let mut modules = HashMap::new();
        for line in dep.lines() {
            let Some((path, deps)) = line.split_once(':') else {
                continue;
            };
            let path = path.trim();
            if path.is_empty() {
                continue;
            }
            let deps = deps.split_whitespace().map(str::to_string).collect();
            modules.insert(module_name(path), (path.to_string(), deps));
        }
        let builtin = builtin
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(module_name)
            .collect();
        ModuleIndex {
            modules,
            builtin,
            dir: PathBuf::new(),
        }
    }

    /// Reads `modules.dep` and `modules.builtin` (optional) from a module tree.
    pub fn load(modules_dir: &Path) -> Result<Self, ModulesError> {
        let dep_path = modules_dir.join("modules.dep");
        let dep = std::fs::read_to_string(&dep_path).map_err(|source| ModulesError::Read {
            path: dep_path,
            source,
        })?;
        let builtin_path = modules_dir.join("modules.builtin");
        let builtin = match std::fs::read_to_string(&builtin_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(ModulesError::Read {
                    path: builtin_path,
                    source,
                })
            }
        };
        let mut idx = Self::parse(&dep, &builtin);
        idx.dir = modules_dir.to_path_buf();
        Ok(idx)
    }

    /// Whether `name` is built into the kernel.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&module_name(name))
    }

    /// The relative path of a loadable module, if it is one.
    pub fn path_of(&self, name: &str) -> Option<&str> {
        self.modules
            .get(&module_name(name))
            .map(|(p, _)| p.as_str())
    }

    /// Resolves the modules to load for `names`: their loadable dependency closure in load
    /// order (dependencies first, each once, order otherwise following the request). Built-in
    /// names are reported in [`ModuleClosure::builtin`]; unknown names are an error.
    pub fn closure(&self, names: &[&str]) -> Result<ModuleClosure, ModulesError> {
        let mut out = ModuleClosure::default();
        let mut done: HashSet<String> = HashSet::new();
        let mut visiting: HashSet<String> = HashSet::new();
        for raw in names {
            let name = module_name(raw);
            if self.modules.contains_key(&name) {
                self.visit(&name, &mut done, &mut visiting, &mut out.load_order)?;
            } else if self.builtin.contains(&name) {
                if !out.builtin.contains(&name) {
                    out.builtin.push(name);
                }
            } else {
                return Err(ModulesError::Unknown {
                    name,
                    dir: self.dir.clone(),
                });
            }
        }
        Ok(out)
    }

    fn visit(
        &self,
        name: &str,
        done: &mut HashSet<String>,
        visiting: &mut HashSet<String>,
        order: &mut Vec<String>,
    ) -> Result<(), ModulesError> {
        if done.contains(name) {
            return Ok(());
        }
        if !visiting.insert(name.to_string()) {
            return Err(ModulesError::Cycle(name.to_string()));
        }
        let Some((path, deps)) = self.modules.get(name) else {
            return Err(ModulesError::Unknown {
                name: name.to_string(),
                dir: self.dir.clone(),
            });
        };
        // modules.dep lists dependencies so that loading them right to left works; visiting
        // them in reverse keeps that order for independent ones.
        for dep in deps.iter().rev() {
            let dname = module_name(dep);
            if !self.modules.contains_key(&dname) {
                return Err(ModulesError::MissingDependency {
                    module: name.to_string(),
                    dependency: dep.clone(),
                });
            }
            self.visit(&dname, done, visiting, order)?;
        }
        visiting.remove(name);
        done.insert(name.to_string());
        order.push(path.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/virtio/virtio_mmio.ko.xz:
kernel/drivers/block/virtio_blk.ko.xz:
kernel/net/core/failover.ko.xz:
kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko.xz
kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz kernel/net/core/failover.ko.xz
kernel/net/vmw_vsock/vsock.ko.xz:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko.xz: kernel/net/vmw_vsock/vsock.ko.xz
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko.xz: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko.xz kernel/net/vmw_vsock/vsock.ko.xz
kernel/x/nf-nat.ko:
";
    const BUILTIN: &str = "kernel/fs/fuse/virtiofs.ko\nkernel/drivers/char/virtio_console.ko\n";

    #[test]
    fn names() {
        assert_eq!(module_name("kernel/a/virtio_net.ko.xz"), "virtio_net");
        assert_eq!(module_name("virtio-rng.ko.zst"), "virtio_rng");
        assert_eq!(module_name("x.ko"), "x");
        assert_eq!(module_name("virtio_mmio"), "virtio_mmio");
    }

    #[test]
    fn closure_orders_dependencies_first() {
        let idx = ModuleIndex::parse(DEP, BUILTIN);
        let c = idx
            .closure(&[
                "virtio_mmio",
                "virtio_blk",
                "virtiofs",
                "virtio_net",
                "virtio_console",
            ])
            .unwrap();
        assert_eq!(
            c.load_order,
            vec![
                "kernel/drivers/virtio/virtio_mmio.ko.xz",
                "kernel/drivers/block/virtio_blk.ko.xz",
                "kernel/net/core/failover.ko.xz",
                "kernel/drivers/net/net_failover.ko.xz",
                "kernel/drivers/net/virtio_net.ko.xz",
            ]
        );
        assert_eq!(c.builtin, vec!["virtiofs", "virtio_console"]);

        let c = idx
            .closure(&["vmw_vsock_virtio_transport", "vsock", "nf_nat"])
            .unwrap();
        assert_eq!(
            c.load_order,
            vec![
                "kernel/net/vmw_vsock/vsock.ko.xz",
                "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko.xz",
                "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko.xz",
                "kernel/x/nf-nat.ko",
            ]
        );
    }

    #[test]
    fn unknown_and_broken_indexes() {
        let idx = ModuleIndex::parse(DEP, BUILTIN);
        assert!(matches!(
            idx.closure(&["nope"]),
            Err(ModulesError::Unknown { .. })
        ));
        let idx = ModuleIndex::parse("a.ko: b.ko\n", "");
        assert!(matches!(
            idx.closure(&["a"]),
            Err(ModulesError::MissingDependency { .. })
        ));
        let idx = ModuleIndex::parse("a.ko: b.ko\nb.ko: a.ko\n", "");
        assert!(matches!(idx.closure(&["a"]), Err(ModulesError::Cycle(_))));
    }

    proptest::proptest! {
        #[test]
        fn closure_is_topological(edges in proptest::collection::vec((0usize..12, 0usize..12), 0..40)) {
            // Build an acyclic graph: only edges from higher to lower numbers.
            let mut deps: Vec<Vec<usize>> = vec![Vec::new(); 12];
            for (a, b) in edges {
                if a > b && !deps[a].contains(&b) {
                    deps[a].push(b);
                }
            }
            let mut text = String::new();
            for (m, d) in deps.iter().enumerate() {
                text.push_str(&format!("m{m}.ko:"));
                for x in d {
                    text.push_str(&format!(" m{x}.ko"));
                }
                text.push('\n');
            }
            let idx = ModuleIndex::parse(&text, "");
            let all: Vec<String> = (0..12).rev().map(|i| format!("m{i}")).collect();
            let refs: Vec<&str> = all.iter().map(String::as_str).collect();
            let c = idx.closure(&refs).unwrap();
            proptest::prop_assert_eq!(c.load_order.len(), 12);
            let pos = |m: usize| c.load_order.iter().position(|p| p == &format!("m{m}.ko")).unwrap();
            for (m, d) in deps.iter().enumerate() {
                for x in d {
                    proptest::prop_assert!(pos(*x) < pos(m));
                }
            }
        }
    }
}
