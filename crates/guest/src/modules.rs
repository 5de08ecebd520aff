//! Kernel modules: `modules.dep` parsing, dependency ordering and loading with `finit_module`
//! (compressed files are handed to the kernel as they are, `MODULE_INIT_COMPRESSED_FILE`).

use crate::sys;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// Modules stage 2 loads when the tree has them (missing or built-in ones are skipped).
pub const WANTED: &[&str] = &[
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
    "vxlan",
    "ip_vs",
    "vsock",
    "virtio_console",
];

/// Modules needed before the network and the state disk are set up (loaded in the foreground).
pub const EARLY: &[&str] = &["virtio_net", "virtio_blk"];

/// Module name of a module file path: the base name without `.ko[.xz|.zst|.gz]`, with `-` as `_`.
pub fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem = match base.find(".ko") {
        Some(i) => &base[..i],
        None => base,
    };
    normalize(stem)
}

/// Normalizes a module name the way the kernel does (`-` and `_` are the same).
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// The parsed `modules.dep` (and `modules.builtin`) of one module tree.
#[derive(Debug, Default, Clone)]
pub struct ModuleIndex {
    /// Module name -> (path relative to the tree, dependency paths as listed).
    entries: HashMap<String, (String, Vec<String>)>,
    /// Names of built-in modules.
    builtin: HashSet<String>,
}

/// What loading a list of modules needs: files in load order plus the names that were skipped.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Module files (relative to the tree) in dependency order, each once.
    pub files: Vec<String>,
    /// Requested names that are built into the kernel.
    pub builtin: Vec<String>,
    /// Requested names the tree does not have.
    pub missing: Vec<String>,
}

impl ModuleIndex {
    /// Parses the text of `modules.dep` and `modules.builtin`. Malformed lines are skipped.
    pub fn parse(dep: &str, builtin: &str) -> Self {
        let mut entries = HashMap::new();
        for line in dep.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((path, deps)) = line.split_once(':') else {
                continue;
            };
            let path = path.trim();
            if path.is_empty() {
                continue;
            }
            let deps = deps.split_whitespace().map(str::to_string).collect();
            entries.insert(module_name(path), (path.to_string(), deps));
        }
        let builtin = builtin
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(module_name)
            .collect();
        ModuleIndex { entries, builtin }
    }

    /// Reads `modules.dep` (required) and `modules.builtin` (optional) from a module tree.
    pub fn load(tree: &Path) -> io::Result<Self> {
        let dep = std::fs::read_to_string(tree.join("modules.dep")).map_err(|e| {
            io::Error::new(e.kind(), format!("{}/modules.dep: {e}", tree.display()))
        })?;
        let builtin = std::fs::read_to_string(tree.join("modules.builtin")).unwrap_or_default();
        Ok(Self::parse(&dep, &builtin))
    }

    /// Number of modules in the index.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Orders the files needed for `names`: each module after all of its dependencies, each file
    /// once, skipping names in `skip` (already loaded) and their subtrees where already loaded.
    pub fn plan(&self, names: &[&str], skip: &dyn Fn(&str) -> bool) -> Plan {
        let mut plan = Plan::default();
        let mut done: HashSet<String> = HashSet::new();
        for &name in names {
            let name = normalize(name);
            if skip(&name) {
                continue;
            }
            if !self.entries.contains_key(&name) {
                if self.builtin.contains(&name) {
                    plan.builtin.push(name);
                } else {
                    plan.missing.push(name);
                }
                continue;
            }
            let mut visiting = HashSet::new();
            self.visit(&name, skip, &mut done, &mut visiting, &mut plan.files);
        }
        plan
    }

    fn visit(
        &self,
        name: &str,
        skip: &dyn Fn(&str) -> bool,
        done: &mut HashSet<String>,
        visiting: &mut HashSet<String>,
        out: &mut Vec<String>,
    ) {
        if done.contains(name) || visiting.contains(name) || visiting.len() > 64 {
            return;
        }
        let Some((path, deps)) = self.entries.get(name) else {
            return;
        };
        visiting.insert(name.to_string());
        // depmod lists the deepest dependencies last; walking them in reverse loads them first.
        for dep in deps.iter().rev() {
            let dn = module_name(dep);
            if !skip(&dn) {
                self.visit(&dn, skip, done, visiting, out);
            }
        }
        visiting.remove(name);
        done.insert(name.to_string());
        out.push(path.clone());
    }
}

/// Whether a module is already present in the running kernel (loaded, or built in with a
/// `/sys/module` entry).
pub fn is_loaded(name: &str) -> bool {
    Path::new("/sys/module").join(name).exists()
}

/// Loads one module file; `EEXIST` (already loaded) counts as success.
pub fn load_file(path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    match sys::finit_module(&file, sys::module_flags(path)) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        r => r,
    }
}

/// Outcome of [`load`].
#[derive(Debug, Default)]
pub struct Report {
    /// Files loaded.
    pub loaded: usize,
    /// Requested names the tree does not have.
    pub missing: Vec<String>,
    /// Failures as `name: error`.
    pub failed: Vec<String>,
}

/// Loads `names` and their dependencies from the tree at `tree`.
pub fn load(index: &ModuleIndex, tree: &Path, names: &[&str]) -> Report {
    let plan = index.plan(names, &is_loaded);
    let mut report = Report {
        missing: plan.missing,
        ..Report::default()
    };
    for rel in &plan.files {
        let path: PathBuf = tree.join(rel);
        match load_file(&path) {
            Ok(()) => report.loaded += 1,
            Err(e) => report.failed.push(format!("{}: {e}", module_name(rel))),
        }
    }
    report
}

/// The module tree of the running kernel, `/lib/modules/$(uname -r)`.
pub fn running_tree() -> Option<PathBuf> {
    sys::kernel_release().map(|r| Path::new("/lib/modules").join(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz kernel/net/core/failover.ko.xz
kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko.xz
kernel/net/core/failover.ko.xz:
kernel/net/netfilter/nft_compat.ko.xz: kernel/net/netfilter/nf_tables.ko.xz kernel/net/netfilter/x_tables.ko.xz kernel/lib/libcrc32c.ko.xz kernel/net/netfilter/nfnetlink.ko.xz
kernel/net/netfilter/nf_tables.ko.xz: kernel/lib/libcrc32c.ko.xz kernel/net/netfilter/nfnetlink.ko.xz
kernel/net/netfilter/x_tables.ko.xz:
kernel/net/netfilter/nfnetlink.ko.xz:
kernel/lib/libcrc32c.ko.xz:
kernel/net/bridge/br_netfilter.ko.xz: kernel/net/bridge/bridge.ko.xz kernel/net/802/stp.ko.xz kernel/net/llc/llc.ko.xz
kernel/net/bridge/bridge.ko.xz: kernel/net/802/stp.ko.xz kernel/net/llc/llc.ko.xz
kernel/net/802/stp.ko.xz: kernel/net/llc/llc.ko.xz
kernel/net/llc/llc.ko.xz:
kernel/net/netfilter/xt_MASQUERADE.ko.xz: kernel/net/netfilter/x_tables.ko.xz
kernel/fs/my-dash.ko.zst:
garbage line without colon
: nothing
";
    const BUILTIN: &str = "kernel/fs/overlayfs/overlay.ko\nkernel/drivers/block/virtio_blk.ko\n";

    fn pos(plan: &Plan, name: &str) -> usize {
        plan.files
            .iter()
            .position(|f| module_name(f) == name)
            .unwrap_or_else(|| panic!("{name} not in plan {:?}", plan.files))
    }

    #[test]
    fn names() {
        assert_eq!(
            module_name("kernel/net/netfilter/xt_MASQUERADE.ko.xz"),
            "xt_MASQUERADE"
        );
        assert_eq!(module_name("a/b/my-dash.ko.zst"), "my_dash");
        assert_eq!(module_name("plain.ko"), "plain");
        assert_eq!(module_name("noext"), "noext");
    }

    #[test]
    fn parses_and_orders_dependencies_first() {
        let idx = ModuleIndex::parse(DEP, BUILTIN);
        assert_eq!(idx.len(), 14);
        let plan = idx.plan(
            &[
                "virtio_net",
                "br_netfilter",
                "nft_compat",
                "xt_MASQUERADE",
                "bridge",
            ],
            &|_| false,
        );
        // Every file once.
        let mut uniq = plan.files.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), plan.files.len());
        assert!(pos(&plan, "failover") < pos(&plan, "net_failover"));
        assert!(pos(&plan, "net_failover") < pos(&plan, "virtio_net"));
        assert!(pos(&plan, "llc") < pos(&plan, "stp"));
        assert!(pos(&plan, "stp") < pos(&plan, "bridge"));
        assert!(pos(&plan, "bridge") < pos(&plan, "br_netfilter"));
        assert!(pos(&plan, "nfnetlink") < pos(&plan, "nf_tables"));
        assert!(pos(&plan, "libcrc32c") < pos(&plan, "nf_tables"));
        assert!(pos(&plan, "nf_tables") < pos(&plan, "nft_compat"));
        assert!(pos(&plan, "x_tables") < pos(&plan, "nft_compat"));
        assert!(pos(&plan, "x_tables") < pos(&plan, "xt_MASQUERADE"));
        assert_eq!(plan.files.len(), 13);
        assert!(plan.missing.is_empty());
    }

    #[test]
    fn builtin_missing_and_loaded_are_skipped() {
        let idx = ModuleIndex::parse(DEP, BUILTIN);
        let plan = idx.plan(
            &["overlay", "virtio-blk", "ip_vs", "my-dash", "virtio_net"],
            &|n| n == "failover" || n == "virtio_net",
        );
        assert_eq!(plan.builtin, vec!["overlay", "virtio_blk"]);
        assert_eq!(plan.missing, vec!["ip_vs"]);
        assert_eq!(plan.files, vec!["kernel/fs/my-dash.ko.zst"]);
        // A loaded dependency is not reloaded, its dependents still are.
        let plan = idx.plan(&["virtio_net"], &|n| n == "failover");
        assert_eq!(
            plan.files,
            vec![
                "kernel/drivers/net/net_failover.ko.xz",
                "kernel/drivers/net/virtio_net.ko.xz"
            ]
        );
    }

    #[test]
    fn cycles_do_not_loop() {
        let idx = ModuleIndex::parse("a.ko: b.ko\nb.ko: a.ko\n", "");
        let plan = idx.plan(&["a"], &|_| false);
        assert_eq!(plan.files, vec!["b.ko", "a.ko"]);
    }

    #[test]
    fn flags_by_extension() {
        assert_eq!(
            sys::module_flags(Path::new("x.ko.xz")),
            sys::MODULE_INIT_COMPRESSED_FILE
        );
        assert_eq!(sys::module_flags(Path::new("x.ko")), 0);
    }
}
