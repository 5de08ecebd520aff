//! Typed access to an installed runtime bundle (what [`crate::setup()`] produced).

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::component::initramfs::{self, InitramfsError};
use crate::component::kernel::KernelInfo;
use crate::component::qemu::{self, RecordedQemu};
use crate::component::rootfs::{self, RootfsRecipe};
use crate::dirs::{self, DirsError};
use crate::provenance::{component, Provenance, ProvenanceError, VerifyReport};

/// Errors of loading or using the runtime bundle.
#[derive(Debug, Error)]
pub enum RuntimeError {
    /// A directory could not be resolved.
    #[error(transparent)]
    Dirs(#[from] DirsError),
    /// Setup has not run (no manifest).
    #[error("gatevm runtime is not set up ({} not found): run `gatevm setup`", path.display())]
    NotSetUp {
        /// The missing manifest.
        path: PathBuf,
    },
    /// The manifest lacks a component or one of its files is gone.
    #[error("gatevm runtime is incomplete ({what}): run `gatevm setup`")]
    Incomplete {
        /// What is missing.
        what: String,
    },
    /// The manifest could not be read.
    #[error(transparent)]
    Provenance(#[from] ProvenanceError),
    /// The base rootfs of the current recipe is not built.
    #[error("the base rootfs for kernel {kernel} is not built (expected {}): run `gatevm setup`", path.display())]
    RootfsNotBuilt {
        /// Where it is expected.
        path: PathBuf,
        /// The kernel release in the recipe.
        kernel: String,
    },
    /// Building the initramfs failed.
    #[error("initramfs")]
    Initramfs(#[from] InitramfsError),
}

/// The installed runtime bundle.
#[derive(Debug, Clone)]
pub struct Runtime {
    dir: PathBuf,
    rootfs_root: PathBuf,
    /// Where initramfs images are built and found: `dir/initramfs`, or the caller's cache when
    /// the runtime is the system one and the caller is not root (who cannot write there).
    initramfs_dir: PathBuf,
    provenance: Provenance,
    kernel: KernelInfo,
    qemu: RecordedQemu,
}

impl Runtime {
    /// Loads the bundle [`dirs::locate_runtime`] picks: the caller's own when complete, else the
    /// system one (`gatevm setup --system`).
    pub fn load() -> Result<Runtime, RuntimeError> {
        let at = dirs::locate_runtime()?;
        let mut rt = Self::load_from(&at.runtime, &at.rootfs_root)?;
        if at.source == dirs::RuntimeSource::System && dirs::caller_uid() != 0 {
            rt.initramfs_dir = dirs::cache_dir()?.join("initramfs");
        }
        Ok(rt)
    }

    /// Loads the bundle from `runtime_dir`, with base rootfs trees under `rootfs_root`. Checks
    /// that every component is recorded and its key files exist (no hashing).
    pub fn load_from(runtime_dir: &Path, rootfs_root: &Path) -> Result<Runtime, RuntimeError> {
        let provenance = Provenance::load(runtime_dir)?.ok_or_else(|| RuntimeError::NotSetUp {
            path: Provenance::path_in(runtime_dir),
        })?;
        for name in [
            component::KERNEL,
            component::GVPROXY,
            component::LIBKRUNFW,
            component::VIRTIOFSD,
            component::QEMU,
        ] {
            if provenance.component(name).is_none() {
                return Err(RuntimeError::Incomplete {
                    what: format!("{name} not installed"),
                });
            }
        }
        let release =
            provenance
                .kernel_release
                .clone()
                .ok_or_else(|| RuntimeError::Incomplete {
                    what: "no kernel release recorded".into(),
                })?;
        let kernel = KernelInfo {
            vmlinux: runtime_dir.join("kernel/vmlinux"),
            modules_dir: runtime_dir.join("kernel/lib/modules").join(&release),
            release,
        };
        let qemu = provenance
            .component(component::QEMU)
            .and_then(qemu::recorded_binary)
            .ok_or_else(|| RuntimeError::Incomplete {
                what: "the qemu component records no qemu-system-x86_64".into(),
            })?;
        let rt = Runtime {
            dir: runtime_dir.to_path_buf(),
            rootfs_root: rootfs_root.to_path_buf(),
            initramfs_dir: runtime_dir.join("initramfs"),
            provenance,
            kernel,
            qemu,
        };
        let mut required = vec![
            rt.kernel.vmlinux.clone(),
            rt.kernel.modules_dir.join("modules.dep"),
            rt.gvproxy(),
            rt.virtiofsd(),
            rt.libkrunfw(),
            rt.qemu_binary(),
        ];
        required.extend(rt.qemu_data_dirs());
        for p in required {
            if !p.exists() {
                return Err(RuntimeError::Incomplete {
                    what: format!("{} is missing", p.display()),
                });
            }
        }
        Ok(rt)
    }

    /// The runtime directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The guest kernel: release, vmlinux, module tree.
    pub fn kernel(&self) -> &KernelInfo {
        &self.kernel
    }

    /// The uncompressed ELF kernel to boot (`-kernel` for QEMU, `krun_set_kernel` for libkrun).
    pub fn kernel_path(&self) -> &Path {
        &self.kernel.vmlinux
    }

    /// The kernel release, e.g. `6.12.107+deb13-cloud-amd64`.
    pub fn kernel_release(&self) -> &str {
        &self.kernel.release
    }

    /// The kernel's build configuration (`config-<release>`), for capability reports.
    pub fn kernel_config(&self) -> PathBuf {
        self.dir
            .join("kernel")
            .join(format!("config-{}", self.kernel.release))
    }

    /// The module tree of the kernel (holds `modules.dep`).
    pub fn modules_dir(&self) -> &Path {
        &self.kernel.modules_dir
    }

    /// The gvproxy binary.
    pub fn gvproxy(&self) -> PathBuf {
        self.dir.join("bin/gvproxy")
    }

    /// The virtiofsd binary.
    pub fn virtiofsd(&self) -> PathBuf {
        self.dir.join("bin/virtiofsd")
    }

    /// The passt binary (built by setup from Debian trixie's source package; see
    /// [`crate::component::passt`]). Not checked by [`Runtime::load`]: a bundle set up before passt was
    /// part of it lacks the file until `gatevm setup` runs again.
    pub fn passt(&self) -> PathBuf {
        self.dir.join(crate::component::passt::PASST_BIN)
    }

    /// `libkrunfw.so.5` (a symlink to the versioned file in the same directory).
    pub fn libkrunfw(&self) -> PathBuf {
        self.lib_dir().join("libkrunfw.so.5")
    }

    /// The directory holding the bundle's shared libraries (for `LD_LIBRARY_PATH`).
    pub fn lib_dir(&self) -> PathBuf {
        self.dir.join("lib")
    }

    /// The `qemu-system-x86_64` to run: the bundled backport (`<runtime>/qemu/usr/bin/...`) or the
    /// host's, by absolute path (see [`crate::component::qemu`] for which and why).
    pub fn qemu_binary(&self) -> PathBuf {
        match &self.qemu {
            RecordedQemu::Bundled => self.dir.join(qemu::BUNDLED_BINARY),
            RecordedQemu::Host(p) => p.clone(),
        }
    }

    /// The firmware directories to pass to [`Runtime::qemu_binary`], each with `-L`, in order:
    /// the bundle's `usr/share/qemu` and `usr/share/seabios`; empty for the host's QEMU (which
    /// finds its own). Without them the bundled QEMU would load the host's older firmware.
    pub fn qemu_data_dirs(&self) -> Vec<PathBuf> {
        match &self.qemu {
            RecordedQemu::Bundled => qemu::BUNDLED_DATA_DIRS
                .iter()
                .map(|d| self.dir.join(d))
                .collect(),
            RecordedQemu::Host(_) => Vec::new(),
        }
    }

    /// Whether [`Runtime::qemu_binary`] is the bundled backport (not the host's QEMU).
    pub fn qemu_is_bundled(&self) -> bool {
        self.qemu == RecordedQemu::Bundled
    }

    /// The recipe of the base rootfs for the installed kernel.
    pub fn rootfs_recipe(&self) -> RootfsRecipe {
        RootfsRecipe::for_kernel(&self.kernel.release)
    }

    /// The base rootfs tree of the current recipe; an error when it is not built.
    pub fn rootfs(&self) -> Result<PathBuf, RuntimeError> {
        let recipe = self.rootfs_recipe();
        rootfs::find_rootfs(&self.rootfs_root, &recipe).ok_or_else(|| {
            RuntimeError::RootfsNotBuilt {
                path: self.rootfs_root.join(recipe.id()),
                kernel: self.kernel.release.clone(),
            }
        })
    }

    /// The read-only EROFS image of the base rootfs tree, which VMs boot; an error when it is not
    /// made (`gatevm setup` makes it).
    pub fn base_image(&self) -> Result<PathBuf, RuntimeError> {
        self.rootfs()?;
        let img = rootfs::image_path(&self.rootfs_root, &self.rootfs_recipe());
        if img.is_file() {
            return Ok(img);
        }
        Err(RuntimeError::RootfsNotBuilt {
            path: img,
            kernel: self.kernel.release.clone(),
        })
    }

    /// The initramfs for `guest_bin`: built on first use, then reused from
    /// `runtime_dir/initramfs/` (the caller's `cache_dir()/initramfs/` when the runtime is the
    /// system one and the caller is not root; the name carries a hash of the inputs).
    pub fn initramfs(&self, guest_bin: &Path) -> Result<PathBuf, RuntimeError> {
        Ok(initramfs::build_initramfs(
            guest_bin,
            &self.kernel,
            &self.initramfs_dir,
        )?)
    }

    /// The provenance manifest (components, versions, origins, file hashes).
    pub fn provenance(&self) -> &Provenance {
        &self.provenance
    }

    /// Re-hashes every installed file against the manifest.
    pub fn verify(&self) -> VerifyReport {
        self.provenance.verify(&self.dir)
    }
}

/// Re-hashes the files of the runtime bundle in the default directory against its manifest.
pub fn verify() -> Result<VerifyReport, RuntimeError> {
    let dir = dirs::runtime_dir()?;
    let p = Provenance::load(&dir)?.ok_or_else(|| RuntimeError::NotSetUp {
        path: Provenance::path_in(&dir),
    })?;
    Ok(p.verify(&dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provenance::Component;

    #[test]
    fn not_set_up_says_what_to_do() {
        let tmp = tempfile::tempdir().unwrap();
        let e = Runtime::load_from(tmp.path(), &tmp.path().join("rootfs")).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, RuntimeError::NotSetUp { .. }));
        assert!(msg.contains("run `gatevm setup`"), "{msg}");
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn loads_a_complete_bundle() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = tmp.path().join("rt");
        let rel = "6.0.0-test";
        for f in [
            "kernel/vmlinux".to_string(),
            format!("kernel/lib/modules/{rel}/modules.dep"),
            "bin/gvproxy".into(),
            "bin/virtiofsd".into(),
            "lib/libkrunfw.so.5.5.0".into(),
        ] {
            let p = rt.join(&f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, b"x").unwrap();
        }
        std::os::unix::fs::symlink("libkrunfw.so.5.5.0", rt.join("lib/libkrunfw.so.5")).unwrap();
        let mut p = Provenance {
            kernel_release: Some(rel.into()),
            ..Default::default()
        };
        for name in ["kernel", "gvproxy", "libkrunfw"] {
            p.set_component(Component {
                name: name.into(),
                version: "1".into(),
                origin: "test".into(),
                installed_unix: 0,
                files: vec![],
            });
        }
        p.save(&rt).unwrap();
        let e = Runtime::load_from(&rt, &tmp.path().join("rootfs")).unwrap_err();
        assert!(e.to_string().contains("virtiofsd"), "{e}");
        p.set_component(Component {
            name: "virtiofsd".into(),
            version: "1".into(),
            origin: "test".into(),
            installed_unix: 0,
            files: vec![],
        });
        p.save(&rt).unwrap();
        // A bundle set up before QEMU became a component: the usual one-line message.
        let e = Runtime::load_from(&rt, &tmp.path().join("rootfs")).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, RuntimeError::Incomplete { .. }), "{msg}");
        assert!(msg.contains("qemu not installed"), "{msg}");
        assert!(msg.contains("run `gatevm setup`"), "{msg}");
        assert!(!msg.contains('\n'));

        // The bundled backport.
        for f in [
            "qemu/usr/bin/qemu-system-x86_64",
            "qemu/usr/share/qemu/pvh.bin",
            "qemu/usr/share/seabios/bios-microvm.bin",
        ] {
            let p = rt.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, b"x").unwrap();
        }
        let bundled = crate::provenance::records_for(
            &rt,
            &[
                PathBuf::from("qemu/usr/bin/qemu-system-x86_64"),
                PathBuf::from("qemu/usr/share/seabios/bios-microvm.bin"),
            ],
        )
        .unwrap();
        p.set_component(Component {
            name: "qemu".into(),
            version: "1:10.0.2+ds-2+deb13u1~bpo12+1".into(),
            origin: "test".into(),
            installed_unix: 0,
            files: bundled,
        });
        p.save(&rt).unwrap();
        let r = Runtime::load_from(&rt, &tmp.path().join("rootfs")).unwrap();
        assert_eq!(r.kernel_release(), rel);
        assert_eq!(r.kernel_path(), rt.join("kernel/vmlinux"));
        assert!(r.libkrunfw().exists());
        assert_eq!(r.passt(), rt.join("bin/passt"));
        assert!(r.qemu_is_bundled());
        assert_eq!(r.qemu_binary(), rt.join("qemu/usr/bin/qemu-system-x86_64"));
        assert_eq!(
            r.qemu_data_dirs(),
            vec![
                rt.join("qemu/usr/share/qemu"),
                rt.join("qemu/usr/share/seabios")
            ]
        );
        let e = r.rootfs().unwrap_err();
        assert!(e.to_string().contains("gatevm setup"), "{e}");
        assert!(r.verify().ok());

        // The host's QEMU, by absolute path.
        let host_bin = tmp.path().join("host/usr/bin/qemu-system-x86_64");
        std::fs::create_dir_all(host_bin.parent().unwrap()).unwrap();
        std::fs::write(&host_bin, b"elf").unwrap();
        let files = crate::provenance::records_for(&rt, std::slice::from_ref(&host_bin)).unwrap();
        assert_eq!(files[0].path, host_bin.to_string_lossy());
        p.set_component(Component {
            name: "qemu".into(),
            version: "1:10.0.2+ds-2".into(),
            origin: "host package qemu-system-x86 1:10.0.2+ds-2".into(),
            installed_unix: 0,
            files,
        });
        p.save(&rt).unwrap();
        let r = Runtime::load_from(&rt, &tmp.path().join("rootfs")).unwrap();
        assert!(!r.qemu_is_bundled());
        assert_eq!(r.qemu_binary(), host_bin);
        assert!(r.qemu_data_dirs().is_empty());
        assert!(r.verify().ok());
        std::fs::remove_file(&host_bin).unwrap();
        let e = Runtime::load_from(&rt, &tmp.path().join("rootfs")).unwrap_err();
        assert!(
            e.to_string().contains("qemu-system-x86_64 is missing"),
            "{e}"
        );
        std::fs::write(&host_bin, b"elf").unwrap();

        std::fs::remove_file(rt.join("bin/gvproxy")).unwrap();
        let e = Runtime::load_from(&rt, &tmp.path().join("rootfs")).unwrap_err();
        assert!(e.to_string().contains("bin/gvproxy"), "{e}");
    }
}
