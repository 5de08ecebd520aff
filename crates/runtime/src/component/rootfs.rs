//! The base root filesystem: a Debian tree built with mmdebstrap, cached by a hash of its recipe
//! in `data_dir()/rootfs/<hash12>/`.
//!
//! A tree is built in a temporary directory next to its final place and renamed into it when
//! complete, so a directory named after a recipe hash is always whole. It carries its recipe in
//! `.gatevm-rootfs.json`. What VMs boot is the tree's read-only EROFS image next to it,
//! `<hash12>.erofs` ([`image_path`]), made the same way. Trees and images of older recipes are
//! left alone (instances may still use them).

use std::path::{Path, PathBuf};
use std::process::Command;

use gatevm_abi::error_chain;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::cmd::{self, CommandError};
use crate::component::kernel::KernelInfo;
use crate::error::{io_err, IoError};
use crate::util;
use std::time::Instant;

use crate::component::dir_size;
use crate::provenance::{Provenance, RootfsRecord};
use crate::setup::{Ctx, SetupAction, SetupError, SetupOptions};

/// Bump when the build steps change in a way that needs new trees.
pub(crate) const ROOTFS_RECIPE_REVISION: u32 = 4;
/// Name of the recipe file inside a built tree.
pub(crate) const RECIPE_FILE: &str = ".gatevm-rootfs.json";
/// The Debian suite of the base rootfs.
pub(crate) const ROOTFS_SUITE: &str = "trixie";
/// The mmdebstrap variant.
pub(crate) const ROOTFS_VARIANT: &str = "minbase";
/// Packages installed on top of the variant.
pub(crate) const ROOTFS_PACKAGES: &[&str] = &[
    "containerd",
    "runc",
    "containernetworking-plugins",
    "nftables",
    "iptables",
    "zstd",
    "iproute2",
    "ca-certificates",
    "e2fsprogs",
    "kmod",
    // k3s's datastore recovery at boot (a stale bootstrap lock row in kine's SQLite database).
    "sqlite3",
];

/// Errors of building or finding a rootfs.
#[derive(Debug, Error)]
pub enum RootfsError {
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// mmdebstrap or depmod failed.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// A build directory still has file systems mounted in it, so it was not deleted.
    #[error("{} still has mounts inside ({}); unmount them (umount -R) and delete it by hand", path.display(), mounts.iter().map(|m| m.display().to_string()).collect::<Vec<_>>().join(", "))]
    StillMounted {
        /// The build directory.
        path: PathBuf,
        /// The mount points inside it.
        mounts: Vec<PathBuf>,
    },
    /// The tree's read-only image could not be made.
    #[error(transparent)]
    Image(#[from] crate::erofs::ErofsError),
    /// The built tree lacks something it must have.
    #[error("built rootfs {} is incomplete: {what} is missing", path.display())]
    Incomplete {
        /// The tree.
        path: PathBuf,
        /// What is missing.
        what: String,
    },
}

/// Everything that decides the contents of a base rootfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootfsRecipe {
    /// [`ROOTFS_RECIPE_REVISION`] at build time.
    pub revision: u32,
    /// Debian suite.
    pub suite: String,
    /// mmdebstrap variant.
    pub variant: String,
    /// Extra packages, sorted.
    pub packages: Vec<String>,
    /// Release of the kernel whose modules are copied in.
    pub kernel_release: String,
}

impl RootfsRecipe {
    /// The recipe gatevm uses for a given kernel release.
    pub fn for_kernel(kernel_release: &str) -> Self {
        let mut packages: Vec<String> = ROOTFS_PACKAGES.iter().map(|s| s.to_string()).collect();
        packages.sort();
        packages.dedup();
        RootfsRecipe {
            revision: ROOTFS_RECIPE_REVISION,
            suite: ROOTFS_SUITE.to_string(),
            variant: ROOTFS_VARIANT.to_string(),
            packages,
            kernel_release: kernel_release.to_string(),
        }
    }

    /// The canonical text the hash is computed over (stable across serde versions and field
    /// order; package order does not matter).
    pub fn canonical(&self) -> String {
        let mut packages = self.packages.clone();
        packages.sort();
        packages.dedup();
        format!(
            "gatevm-rootfs\nrevision={}\nsuite={}\nvariant={}\npackages={}\nkernel={}\n",
            self.revision,
            self.suite,
            self.variant,
            packages.join(","),
            self.kernel_release
        )
    }

    /// SHA-256 of [`canonical`](Self::canonical), hex.
    pub fn hash(&self) -> String {
        hex::encode(Sha256::digest(self.canonical().as_bytes()))
    }

    /// The first 12 hex digits of the hash: the tree's directory name.
    pub fn id(&self) -> String {
        self.hash()[..12].to_string()
    }

    /// A one-line description for reports.
    pub fn describe(&self) -> String {
        format!(
            "debian {} {} + {} (kernel modules {}, recipe rev {})",
            self.suite,
            self.variant,
            self.packages.join(","),
            self.kernel_release,
            self.revision
        )
    }
}

/// The recipe file written into a built tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RootfsStamp {
    /// The recipe.
    pub recipe: RootfsRecipe,
    /// Its full hash.
    pub hash: String,
    /// Seconds since the epoch when the build finished.
    pub built_unix: u64,
}

/// A rootfs tree found under the rootfs root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RootfsEntry {
    /// Directory name (recipe id).
    pub id: String,
    /// Absolute path.
    pub path: PathBuf,
    /// Its recipe, when the recipe file is readable.
    pub recipe: Option<RootfsRecipe>,
}

/// Where the EROFS image of the tree for `recipe` under `root` lives.
pub fn image_path(root: &Path, recipe: &RootfsRecipe) -> PathBuf {
    root.join(format!("{}.erofs", recipe.id()))
}

/// The image of the tree `tree` for `recipe` under `root`: made when missing or older than the
/// tree's recipe stamp. Returns whether it was made.
pub(crate) fn ensure_image(
    root: &Path,
    recipe: &RootfsRecipe,
    tree: &Path,
) -> Result<bool, crate::erofs::ErofsError> {
    let img = image_path(root, recipe);
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(i), Some(t)) = (mtime(&img), mtime(&tree.join(RECIPE_FILE))) {
        if i >= t {
            return Ok(false);
        }
    }
    crate::erofs::make_image(tree, &img, crate::erofs::Owners::AsInTree)?;
    Ok(true)
}

/// The path of the tree for `recipe` under `root`, if it is built (its recipe file exists).
pub fn find_rootfs(root: &Path, recipe: &RootfsRecipe) -> Option<PathBuf> {
    let dir = root.join(recipe.id());
    dir.join(RECIPE_FILE).is_file().then_some(dir)
}

/// All built trees under `root`, sorted by id.
pub fn list_rootfs(root: &Path) -> Vec<RootfsEntry> {
    let mut out: Vec<RootfsEntry> = std::fs::read_dir(root)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    !n.starts_with('.') && e.path().join(RECIPE_FILE).is_file()
                })
                .map(|e| {
                    let path = e.path();
                    let recipe = std::fs::read_to_string(path.join(RECIPE_FILE))
                        .ok()
                        .and_then(|t| serde_json::from_str::<RootfsStamp>(&t).ok())
                        .map(|s| s.recipe);
                    RootfsEntry {
                        id: e.file_name().to_string_lossy().into_owned(),
                        path,
                        recipe,
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// Removes leftover build directories (`.build-*`) of earlier interrupted runs, unless something
/// is still mounted inside them.
fn clean_stale_builds(root: &Path) -> Result<(), RootfsError> {
    let Ok(rd) = std::fs::read_dir(root) else {
        return Ok(());
    };
    for e in rd.filter_map(|e| e.ok()) {
        if e.file_name().to_string_lossy().starts_with(".build-") {
            let path = e.path();
            util::remove_tree_safely(&path)
                .map_err(|mounts| RootfsError::StillMounted { path, mounts })?;
        }
    }
    Ok(())
}

/// Builds the tree for `recipe` under `root` and returns its path: mmdebstrap into
/// `root/.build-<id>-*`, copy `kernel`'s module tree to `usr/lib/modules/<release>` and run
/// depmod there, create `/usr/local/sbin`, write the recipe file, rename to `root/<id>`.
/// `log` receives the commands' output.
pub fn build_rootfs(
    root: &Path,
    recipe: &RootfsRecipe,
    kernel: &KernelInfo,
    log: &Path,
) -> Result<PathBuf, RootfsError> {
    use std::os::unix::fs::PermissionsExt;
    crate::dirs::ensure_dir(root).map_err(|e| {
        RootfsError::Io(IoError {
            action: "cannot create",
            path: root.to_path_buf(),
            source: std::io::Error::other(error_chain(&e)),
        })
    })?;
    clean_stale_builds(root)?;
    let id = recipe.id();
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".build-{id}-"))
        .tempdir_in(root)
        .map_err(io_err("cannot create a build directory in", root))?;
    // Keep the directory ourselves: TempDir's drop would recurse into mounts if mmdebstrap died
    // with /proc or /dev mounted inside.
    let build = tmp.keep();
    let result = build_into(&build, recipe, kernel, log);
    if let Err(e) = result {
        util::remove_tree_safely(&build).map_err(|mounts| RootfsError::StillMounted {
            path: build.clone(),
            mounts,
        })?;
        return Err(e);
    }
    std::fs::set_permissions(&build, std::fs::Permissions::from_mode(0o755))
        .map_err(io_err("cannot chmod", &build))?;
    let dest = root.join(&id);
    if dest.exists() {
        // A directory without a recipe file (find_rootfs said "not built"): not ours to trust.
        let stale = root.join(format!(".build-{id}-stale-{}", util::now_unix()));
        gatevm_fsutil::rename_durable(&dest, &stale).map_err(io_err("cannot move aside", &dest))?;
        util::remove_tree_safely(&stale).map_err(|mounts| RootfsError::StillMounted {
            path: stale.clone(),
            mounts,
        })?;
    }
    gatevm_fsutil::rename_durable(&build, &dest)
        .map_err(io_err("cannot rename the build into", &dest))?;
    Ok(dest)
}

fn build_into(
    dir: &Path,
    recipe: &RootfsRecipe,
    kernel: &KernelInfo,
    log: &Path,
) -> Result<(), RootfsError> {
    use std::os::unix::fs::PermissionsExt;
    // mmdebstrap uses the directory as the tree's root: it must be world-traversable.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .map_err(io_err("cannot chmod", dir))?;
    let mut c = Command::new("mmdebstrap");
    c.arg(format!("--variant={}", recipe.variant))
        .arg(format!("--include={}", recipe.packages.join(",")))
        .arg(&recipe.suite)
        .arg(dir)
        .env("LC_ALL", "C.UTF-8");
    cmd::run_logged(&mut c, log)?;

    install_modules(dir, kernel, log)?;

    let sbin = dir.join("usr/local/sbin");
    std::fs::create_dir_all(&sbin).map_err(io_err("cannot create", &sbin))?;

    write_guest_files(dir)?;
    check_complete(dir, kernel)?;
    write_stamp(dir, recipe)
}

/// Copies the kernel's module tree into the tree at `dir` (replacing one of the same release)
/// and runs depmod on it.
fn install_modules(dir: &Path, kernel: &KernelInfo, log: &Path) -> Result<(), RootfsError> {
    let modules_dest = dir.join("usr/lib/modules").join(&kernel.release);
    if let Some(parent) = modules_dest.parent() {
        std::fs::create_dir_all(parent).map_err(io_err("cannot create", parent))?;
    }
    if modules_dest.exists() {
        std::fs::remove_dir_all(&modules_dest).map_err(io_err("cannot replace", &modules_dest))?;
    }
    util::copy_tree(&kernel.modules_dir, &modules_dest)
        .map_err(io_err("cannot copy the kernel modules into", &modules_dest))?;
    let depmod = cmd::find_program("depmod").unwrap_or_else(|| PathBuf::from("depmod"));
    let mut c = Command::new(depmod);
    c.arg("-b").arg(dir).arg(&kernel.release);
    cmd::run_logged(&mut c, log)?;
    Ok(())
}

/// Writes the guest's own hostname, hosts and resolv.conf into the tree at `dir`.
fn write_guest_files(dir: &Path) -> Result<(), RootfsError> {
    use std::os::unix::fs::PermissionsExt;
    // mmdebstrap copies the build host's hostname, hosts and resolv.conf (with the host's modes):
    // the guest's own belong here instead (gatevm-guest sets the hostname and DNS at boot).
    let resolv = format!("nameserver {}\n", gatevm_abi::net::GATEWAY_IP);
    for (file, text) in [
        ("etc/hostname", "gatevm\n"),
        (
            "etc/hosts",
            "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n",
        ),
        ("etc/resolv.conf", resolv.as_str()),
    ] {
        let p = dir.join(file);
        let _ = std::fs::remove_file(&p);
        std::fs::write(&p, text).map_err(io_err("cannot write", &p))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644))
            .map_err(io_err("cannot chmod", &p))?;
    }
    Ok(())
}

/// Checks that the tree at `dir` has what the guest needs (containerd, runc, the module index).
fn check_complete(dir: &Path, kernel: &KernelInfo) -> Result<(), RootfsError> {
    for must in [
        "usr/bin/containerd".to_string(),
        "usr/sbin/runc".to_string(),
        format!("usr/lib/modules/{}/modules.dep", kernel.release),
    ] {
        let p = dir.join(&must);
        // runc lives in /usr/sbin on Debian; accept /usr/bin too.
        let alt = dir.join(must.replace("usr/sbin", "usr/bin"));
        if !p.exists() && !alt.exists() {
            return Err(RootfsError::Incomplete {
                path: dir.to_path_buf(),
                what: must,
            });
        }
    }
    Ok(())
}

/// Writes the recipe stamp ([`RECIPE_FILE`]) into the tree at `dir`.
fn write_stamp(dir: &Path, recipe: &RootfsRecipe) -> Result<(), RootfsError> {
    let stamp = RootfsStamp {
        recipe: recipe.clone(),
        hash: recipe.hash(),
        built_unix: util::now_unix(),
    };
    let text = serde_json::to_string_pretty(&stamp).map_err(|e| {
        RootfsError::Io(IoError {
            action: "cannot serialize the recipe for",
            path: dir.to_path_buf(),
            source: std::io::Error::other(e),
        })
    })?;
    let stamp_path = dir.join(RECIPE_FILE);
    util::write_atomic(&stamp_path, text.as_bytes(), 0o644)
        .map_err(io_err("cannot write", &stamp_path))?;
    Ok(())
}

/// The `rootfs` step: builds the base root file system for the kernel's recipe unless one is
/// there (or asked to skip). Returns it and the trees of other recipes, left in place.
pub(crate) fn ensure(
    ctx: &mut Ctx<'_>,
    opts: &SetupOptions,
    kernel: &KernelInfo,
    prov: &mut Provenance,
) -> Result<(Option<PathBuf>, Vec<PathBuf>), SetupError> {
    const C: &str = "rootfs";
    let started = Instant::now();
    let root = ctx.data.join("rootfs");
    let recipe = RootfsRecipe::for_kernel(&kernel.release);
    let id = recipe.id();
    let others = |root: &Path| -> Vec<PathBuf> {
        list_rootfs(root)
            .into_iter()
            .filter(|e| e.id != id)
            .map(|e| e.path)
            .collect()
    };
    if opts.skip_rootfs {
        ctx.step(C, SetupAction::Skipped, "skipped as asked".into(), started);
        return Ok((find_rootfs(&root, &recipe), others(&root)));
    }
    if let Some(p) = find_rootfs(&root, &recipe) {
        if p.join("usr/bin/containerd").exists() {
            let made = ensure_image(&root, &recipe, &p).map_err(RootfsError::Image)?;
            ctx.step(
                C,
                if made {
                    SetupAction::Installed
                } else {
                    SetupAction::AlreadyPresent
                },
                format!(
                    "{} ({}){}",
                    p.display(),
                    recipe.describe(),
                    if made { "; its EROFS image made" } else { "" }
                ),
                started,
            );
            set_rootfs_record(prov, &recipe, &p);
            return Ok((Some(p), others(&root)));
        }
    }
    let previous = others(&root);
    (ctx.progress)(&format!(
        "building the base rootfs with mmdebstrap (Debian {} {}, about a minute)",
        recipe.suite, recipe.variant
    ));
    let p = build_rootfs(&root, &recipe, kernel, &ctx.log)?;
    ensure_image(&root, &recipe, &p).map_err(RootfsError::Image)?;
    set_rootfs_record(prov, &recipe, &p);
    prov.save(&ctx.runtime)?;
    let size = dir_size(&p);
    ctx.step(
        C,
        if previous.is_empty() {
            SetupAction::Installed
        } else {
            SetupAction::Rebuilt
        },
        format!(
            "{} ({}; {} MiB)",
            p.display(),
            recipe.describe(),
            size >> 20
        ),
        started,
    );
    Ok((Some(p), previous))
}

fn set_rootfs_record(prov: &mut Provenance, recipe: &RootfsRecipe, path: &Path) {
    prov.rootfs = Some(RootfsRecord {
        id: recipe.id(),
        path: path.to_path_buf(),
        recipe: recipe.describe(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipe_hash_is_stable() {
        let r = RootfsRecipe {
            revision: 1,
            suite: "trixie".into(),
            variant: "minbase".into(),
            packages: vec!["b".into(), "a".into()],
            kernel_release: "6.12.107+deb13-cloud-amd64".into(),
        };
        assert_eq!(
            r.canonical(),
            "gatevm-rootfs\nrevision=1\nsuite=trixie\nvariant=minbase\npackages=a,b\nkernel=6.12.107+deb13-cloud-amd64\n"
        );
        // The hash must never change for the same recipe: trees on disk are named after it.
        assert_eq!(
            r.hash(),
            hex::encode(Sha256::digest(r.canonical().as_bytes()))
        );
        assert_eq!(r.id(), STABLE_ID);
        let mut swapped = r.clone();
        swapped.packages = vec!["a".into(), "b".into(), "a".into()];
        assert_eq!(swapped.id(), r.id());
        let mut other = r.clone();
        other.kernel_release = "6.12.108+deb13-cloud-amd64".into();
        assert_ne!(other.id(), r.id());
        let mut other = r.clone();
        other.revision = 2;
        assert_ne!(other.id(), r.id());
        assert_eq!(r.id().len(), 12);
    }

    /// The id of the recipe in `recipe_hash_is_stable`, computed once and pinned.
    const STABLE_ID: &str = "fa3373f34261";

    #[test]
    fn default_recipe() {
        let r = RootfsRecipe::for_kernel("k");
        assert_eq!(r.suite, "trixie");
        assert!(r.packages.windows(2).all(|w| w[0] < w[1]));
        assert!(r.packages.contains(&"containerd".to_string()));
    }

    #[test]
    fn listing_and_finding() {
        let tmp = tempfile::tempdir().unwrap();
        let r = RootfsRecipe::for_kernel("k");
        assert_eq!(find_rootfs(tmp.path(), &r), None);
        let dir = tmp.path().join(r.id());
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(find_rootfs(tmp.path(), &r), None);
        let stamp = RootfsStamp {
            recipe: r.clone(),
            hash: r.hash(),
            built_unix: 0,
        };
        std::fs::write(
            dir.join(RECIPE_FILE),
            serde_json::to_string(&stamp).unwrap(),
        )
        .unwrap();
        std::fs::create_dir_all(tmp.path().join(".build-x")).unwrap();
        assert_eq!(find_rootfs(tmp.path(), &r), Some(dir.clone()));
        let l = list_rootfs(tmp.path());
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].recipe.as_ref(), Some(&r));
        clean_stale_builds(tmp.path()).unwrap();
        assert!(!tmp.path().join(".build-x").exists());
    }
}
