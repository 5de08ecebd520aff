//! The kernel-module index of one module tree (`/lib/modules/<release>`), shared by the guest
//! agent (which loads modules at boot) and the host side (which picks the initramfs modules).
//!
//! It parses `modules.dep` and `modules.builtin` as `depmod` writes them, normalizes module names
//! the way the kernel does, and orders the dependency closure of a list of wanted modules so that
//! every module comes after its dependencies. Loading the modules is left to the caller.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// The module name of a module file path or of a name as given: the base name up to a `.ko`
/// suffix (`.ko`, or `.ko.` followed by a compression suffix such as `.ko.xz`), with `-`
/// mapped to `_` (the kernel treats the two as the same).
///
/// `kernel/drivers/virtio/virtio_mmio.ko.xz` and `virtio-mmio` both give `virtio_mmio`.
pub fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem = base
        .match_indices(".ko")
        .find(|&(i, _)| {
            let rest = &base[i + 3..];
            rest.is_empty() || rest.starts_with('.')
        })
        .map_or(base, |(i, _)| &base[..i]);
    stem.replace('-', "_")
}

/// One `modules.dep` entry.
#[derive(Debug, Clone)]
struct Entry {
    /// The module file, relative to the module tree.
    path: String,
    /// Its dependencies' paths as listed (`depmod` lists the deepest ones last).
    deps: Vec<String>,
}

/// The parsed `modules.dep` and `modules.builtin` of one module tree.
#[derive(Debug, Clone, Default)]
pub struct ModuleIndex {
    /// Module name -> entry.
    entries: HashMap<String, Entry>,
    /// Names of the built-in modules.
    builtin: HashSet<String>,
    /// The module tree the index was loaded from (`None` when parsed from text).
    dir: Option<PathBuf>,
}

/// A module index file that could not be read; the cause is its [`std::error::Error::source`].
#[derive(Debug)]
pub struct ReadError {
    /// The file.
    pub path: PathBuf,
    /// The underlying error.
    pub source: io::Error,
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot read {}", self.path.display())
    }
}

impl std::error::Error for ReadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// A defect of the index met while ordering a closure. The walk goes on past it: the module
/// that has the defect is still ordered, without the dependency that could not be followed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Defect {
    /// `modules.dep` lists `dependency` for `module` but has no entry for it.
    MissingDependency {
        /// The module (name) that needs it.
        module: String,
        /// The dependency path as listed.
        dependency: String,
    },
    /// The dependencies form a cycle through this module (name).
    Cycle(String),
}

/// The dependency-ordered closure of a list of wanted modules, see [`ModuleIndex::closure`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Closure {
    /// Module files (relative to the module tree) in load order: every module after its
    /// dependencies, each once, otherwise in the order requested.
    pub files: Vec<String>,
    /// Requested names that are built into the kernel (nothing to load), each once.
    pub builtin: Vec<String>,
    /// Requested names that are neither in `modules.dep` nor built in, each once.
    pub missing: Vec<String>,
    /// Defects of the index met on the way, in the order found.
    pub defects: Vec<Defect>,
}

impl ModuleIndex {
    /// Parses the texts of `modules.dep` and `modules.builtin`. Blank lines, `#` comments and
    /// malformed lines (no `:`, or no path before it) are skipped.
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
            let entry = Entry {
                path: path.to_string(),
                deps: deps.split_whitespace().map(str::to_string).collect(),
            };
            entries.insert(module_name(path), entry);
        }
        let builtin = builtin
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(module_name)
            .collect();
        ModuleIndex {
            entries,
            builtin,
            dir: None,
        }
    }

    /// Reads `modules.dep` (required) and `modules.builtin` (optional: a missing file means no
    /// built-in modules) from the module tree `dir`.
    pub fn load(dir: &Path) -> Result<Self, ReadError> {
        let read = |path: PathBuf, optional: bool| match std::fs::read_to_string(&path) {
            Ok(text) => Ok(text),
            Err(e) if optional && e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
            Err(source) => Err(ReadError { path, source }),
        };
        let dep = read(dir.join("modules.dep"), false)?;
        let builtin = read(dir.join("modules.builtin"), true)?;
        let mut index = Self::parse(&dep, &builtin);
        index.dir = Some(dir.to_path_buf());
        Ok(index)
    }

    /// The module tree the index was loaded from; `None` for a parsed one.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Number of loadable modules (entries of `modules.dep`).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether `modules.dep` had no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The file (relative to the module tree) of a loadable module, by name or path.
    pub fn path_of(&self, name: &str) -> Option<&str> {
        self.entries
            .get(&module_name(name))
            .map(|e| e.path.as_str())
    }

    /// Whether a module (by name or path) is built into the kernel.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&module_name(name))
    }

    /// Orders the modules needed for `names` (names or paths): each loadable one after all of its
    /// dependencies, each file once. Names for which `skip` (given the normalized name) is true
    /// are left out together with the dependencies only they need (the guest passes "already
    /// loaded"; pass `|_| false` to skip nothing). Built-in and unknown names are reported, not
    /// ordered; defects of the index are reported and walked past.
    pub fn closure(&self, names: &[&str], skip: impl Fn(&str) -> bool) -> Closure {
        let mut out = Closure::default();
        let mut done: HashSet<&str> = HashSet::new();
        for raw in names {
            let name = module_name(raw);
            if skip(&name) {
                continue;
            }
            if let Some((key, entry)) = self.entries.get_key_value(&name) {
                self.visit(key, entry, &skip, &mut done, &mut out);
            } else if self.builtin.contains(&name) {
                if !out.builtin.contains(&name) {
                    out.builtin.push(name);
                }
            } else if !out.missing.contains(&name) {
                out.missing.push(name);
            }
        }
        out
    }

    /// Depth-first post-order walk from `root` (iterative, so a deep chain cannot overflow the
    /// stack), appending files to `out.files`.
    fn visit<'a>(
        &'a self,
        root: &'a str,
        entry: &'a Entry,
        skip: &impl Fn(&str) -> bool,
        done: &mut HashSet<&'a str>,
        out: &mut Closure,
    ) {
        if done.contains(root) {
            return;
        }
        let mut visiting: HashSet<&str> = HashSet::from([root]);
        // (name, entry, dependencies not yet visited): depmod lists the deepest dependencies
        // last, so they are visited from the end and load first.
        let mut stack: Vec<(&str, &Entry, usize)> = vec![(root, entry, entry.deps.len())];
        while let Some(top) = stack.last_mut() {
            let (name, entry, left) = *top;
            if left == 0 {
                stack.pop();
                visiting.remove(name);
                done.insert(name);
                out.files.push(entry.path.clone());
                continue;
            }
            top.2 -= 1;
            let dep = &entry.deps[left - 1];
            let dep_name = module_name(dep);
            if skip(&dep_name) || done.contains(dep_name.as_str()) {
                continue;
            }
            match self.entries.get_key_value(&dep_name) {
                None => out.defects.push(Defect::MissingDependency {
                    module: name.to_string(),
                    dependency: dep.clone(),
                }),
                Some((key, _)) if visiting.contains(key.as_str()) => {
                    out.defects.push(Defect::Cycle(key.clone()));
                }
                Some((key, dep_entry)) => {
                    visiting.insert(key);
                    stack.push((key, dep_entry, dep_entry.deps.len()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A network/netfilter tree with malformed lines (from the guest's tests).
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

    /// A virtio/vsock tree (from the image crate's tests).
    const VIRTIO_DEP: &str = "\
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
    const VIRTIO_BUILTIN: &str =
        "kernel/fs/fuse/virtiofs.ko\nkernel/drivers/char/virtio_console.ko\n";

    fn pos(c: &Closure, name: &str) -> usize {
        c.files
            .iter()
            .position(|f| module_name(f) == name)
            .unwrap_or_else(|| panic!("{name} not in closure {:?}", c.files))
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
        assert_eq!(module_name("kernel/a/virtio_net.ko.xz"), "virtio_net");
        assert_eq!(module_name("virtio-rng.ko.zst"), "virtio_rng");
        assert_eq!(module_name("x.ko"), "x");
        assert_eq!(module_name("virtio_mmio"), "virtio_mmio");
        assert_eq!(
            module_name("kernel/drivers/virtio/virtio_mmio.ko.xz"),
            "virtio_mmio"
        );
        assert_eq!(module_name("virtio-mmio"), "virtio_mmio");
        assert_eq!(module_name("m.ko.gz"), "m");
        // `.ko` only counts as the suffix.
        assert_eq!(module_name("a.kobj.ko"), "a.kobj");
    }

    #[test]
    fn lookups() {
        let idx = ModuleIndex::parse(DEP, BUILTIN);
        assert_eq!(idx.len(), 14);
        assert!(!idx.is_empty());
        assert_eq!(idx.dir(), None);
        assert_eq!(
            idx.path_of("virtio_net"),
            Some("kernel/drivers/net/virtio_net.ko.xz")
        );
        assert_eq!(idx.path_of("my_dash"), Some("kernel/fs/my-dash.ko.zst"));
        assert_eq!(idx.path_of("my-dash"), Some("kernel/fs/my-dash.ko.zst"));
        assert_eq!(idx.path_of("overlay"), None);
        assert!(idx.is_builtin("overlay"));
        assert!(idx.is_builtin("virtio-blk"));
        assert!(!idx.is_builtin("virtio_net"));
        assert!(ModuleIndex::parse("", "").is_empty());
        // Comments are not entries.
        assert_eq!(ModuleIndex::parse("# x.ko: y.ko\nx.ko:\n", "").len(), 1);
    }

    #[test]
    fn parses_and_orders_dependencies_first() {
        let idx = ModuleIndex::parse(DEP, BUILTIN);
        assert_eq!(idx.len(), 14);
        let c = idx.closure(
            &[
                "virtio_net",
                "br_netfilter",
                "nft_compat",
                "xt_MASQUERADE",
                "bridge",
            ],
            |_| false,
        );
        // Every file once.
        let mut uniq = c.files.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), c.files.len());
        assert!(pos(&c, "failover") < pos(&c, "net_failover"));
        assert!(pos(&c, "net_failover") < pos(&c, "virtio_net"));
        assert!(pos(&c, "llc") < pos(&c, "stp"));
        assert!(pos(&c, "stp") < pos(&c, "bridge"));
        assert!(pos(&c, "bridge") < pos(&c, "br_netfilter"));
        assert!(pos(&c, "nfnetlink") < pos(&c, "nf_tables"));
        assert!(pos(&c, "libcrc32c") < pos(&c, "nf_tables"));
        assert!(pos(&c, "nf_tables") < pos(&c, "nft_compat"));
        assert!(pos(&c, "x_tables") < pos(&c, "nft_compat"));
        assert!(pos(&c, "x_tables") < pos(&c, "xt_MASQUERADE"));
        assert_eq!(c.files.len(), 13);
        assert!(c.missing.is_empty());
        assert!(c.builtin.is_empty());
        assert!(c.defects.is_empty());
    }

    #[test]
    fn builtin_missing_and_skipped_are_left_out() {
        let idx = ModuleIndex::parse(DEP, BUILTIN);
        let c = idx.closure(
            &["overlay", "virtio-blk", "ip_vs", "my-dash", "virtio_net"],
            |n| n == "failover" || n == "virtio_net",
        );
        assert_eq!(c.builtin, vec!["overlay", "virtio_blk"]);
        assert_eq!(c.missing, vec!["ip_vs"]);
        assert_eq!(c.files, vec!["kernel/fs/my-dash.ko.zst"]);
        // A skipped (loaded) dependency is not reloaded, its dependents still are.
        let c = idx.closure(&["virtio_net"], |n| n == "failover");
        assert_eq!(
            c.files,
            vec![
                "kernel/drivers/net/net_failover.ko.xz",
                "kernel/drivers/net/virtio_net.ko.xz"
            ]
        );
        assert!(c.defects.is_empty());
        // Repeated names are reported once.
        let c = idx.closure(&["overlay", "ip_vs", "overlay", "ip-vs"], |_| false);
        assert_eq!(c.builtin, vec!["overlay"]);
        assert_eq!(c.missing, vec!["ip_vs"]);
    }

    #[test]
    fn cycles_do_not_loop() {
        let idx = ModuleIndex::parse("a.ko: b.ko\nb.ko: a.ko\n", "");
        let c = idx.closure(&["a"], |_| false);
        assert_eq!(c.files, vec!["b.ko", "a.ko"]);
        assert_eq!(c.defects, vec![Defect::Cycle("a".into())]);
    }

    #[test]
    fn closure_orders_dependencies_first() {
        let idx = ModuleIndex::parse(VIRTIO_DEP, VIRTIO_BUILTIN);
        let c = idx.closure(
            &[
                "virtio_mmio",
                "virtio_blk",
                "virtiofs",
                "virtio_net",
                "virtio_console",
            ],
            |_| false,
        );
        assert_eq!(
            c.files,
            vec![
                "kernel/drivers/virtio/virtio_mmio.ko.xz",
                "kernel/drivers/block/virtio_blk.ko.xz",
                "kernel/net/core/failover.ko.xz",
                "kernel/drivers/net/net_failover.ko.xz",
                "kernel/drivers/net/virtio_net.ko.xz",
            ]
        );
        assert_eq!(c.builtin, vec!["virtiofs", "virtio_console"]);
        assert!(c.missing.is_empty());
        assert!(c.defects.is_empty());

        let c = idx.closure(&["vmw_vsock_virtio_transport", "vsock", "nf_nat"], |_| {
            false
        });
        assert_eq!(
            c.files,
            vec![
                "kernel/net/vmw_vsock/vsock.ko.xz",
                "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko.xz",
                "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko.xz",
                "kernel/x/nf-nat.ko",
            ]
        );
        assert!(c.defects.is_empty());
    }

    #[test]
    fn unknown_and_broken_indexes() {
        let idx = ModuleIndex::parse(VIRTIO_DEP, VIRTIO_BUILTIN);
        let c = idx.closure(&["nope"], |_| false);
        assert_eq!(c.missing, vec!["nope"]);
        assert!(c.files.is_empty());
        let idx = ModuleIndex::parse("a.ko: b.ko\n", "");
        let c = idx.closure(&["a"], |_| false);
        assert_eq!(
            c.defects,
            vec![Defect::MissingDependency {
                module: "a".into(),
                dependency: "b.ko".into()
            }]
        );
        assert_eq!(c.files, vec!["a.ko"]);
        // A skipped dependency without an entry is not a defect.
        assert!(idx.closure(&["a"], |n| n == "b").defects.is_empty());
        let idx = ModuleIndex::parse("a.ko: b.ko\nb.ko: a.ko\n", "");
        let c = idx.closure(&["a"], |_| false);
        assert!(matches!(c.defects.as_slice(), [Defect::Cycle(_)]));
    }

    #[test]
    fn deep_chains_are_ordered() {
        let n = 100_000;
        let text: String = (0..n)
            .map(|i| {
                if i == 0 {
                    "m0.ko:\n".to_string()
                } else {
                    format!("m{i}.ko: m{}.ko\n", i - 1)
                }
            })
            .collect();
        let idx = ModuleIndex::parse(&text, "");
        let c = idx.closure(&[&format!("m{}", n - 1)], |_| false);
        assert_eq!(c.files.len(), n);
        assert_eq!(c.files[0], "m0.ko");
        assert_eq!(c.files[n - 1], format!("m{}.ko", n - 1));
    }

    #[test]
    fn load_reads_the_tree() {
        let dir =
            std::env::temp_dir().join(format!("gatevm-kernel-kmod-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = ModuleIndex::load(&dir).unwrap_err();
        assert_eq!(err.path, dir.join("modules.dep"));
        assert_eq!(err.source.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("modules.dep"), "{err}");

        std::fs::write(dir.join("modules.dep"), VIRTIO_DEP).unwrap();
        let idx = ModuleIndex::load(&dir).unwrap();
        assert_eq!(idx.dir(), Some(dir.as_path()));
        assert_eq!(idx.len(), 9);
        assert!(!idx.is_builtin("virtiofs"));

        std::fs::write(dir.join("modules.builtin"), VIRTIO_BUILTIN).unwrap();
        let idx = ModuleIndex::load(&dir).unwrap();
        assert!(idx.is_builtin("virtiofs"));
        std::fs::remove_dir_all(&dir).unwrap();
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
            let c = idx.closure(&refs, |_| false);
            proptest::prop_assert!(c.missing.is_empty());
            proptest::prop_assert!(c.defects.is_empty());
            proptest::prop_assert_eq!(c.files.len(), 12);
            let pos = |m: usize| c.files.iter().position(|p| p == &format!("m{m}.ko")).unwrap();
            for (m, d) in deps.iter().enumerate() {
                for x in d {
                    proptest::prop_assert!(pos(*x) < pos(m));
                }
            }
        }
    }
}
