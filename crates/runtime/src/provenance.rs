//! The provenance manifest of the runtime bundle (`provenance.json` in the runtime directory):
//! where every component came from and the SHA-256 of every file it installed.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::error::IoError;

use crate::util;

/// File name of the manifest inside the runtime directory.
pub(crate) const PROVENANCE_FILE: &str = "provenance.json";
/// Current manifest format.
pub(crate) const PROVENANCE_FORMAT: u32 = 1;

/// Component names used in the manifest.
pub(crate) mod component {
    /// The guest kernel (vmlinux, vmlinuz, config) and its module tree.
    pub(crate) const KERNEL: &str = "kernel";
    /// gvproxy.
    pub(crate) const GVPROXY: &str = "gvproxy";
    /// libkrunfw.
    pub(crate) const LIBKRUNFW: &str = "libkrunfw";
    /// virtiofsd.
    pub(crate) const VIRTIOFSD: &str = "virtiofsd";
    /// passt, built from Debian trixie's source package (see [`crate::component::passt`]).
    pub(crate) const PASST: &str = "passt";
    /// QEMU: Debian's backport unpacked into the runtime directory (binary and firmware), or the
    /// host's `qemu-system-x86_64` recorded by absolute path.
    pub(crate) const QEMU: &str = "qemu";
}

/// Errors reading, writing or verifying the manifest.
#[derive(Debug, Error)]
pub enum ProvenanceError {
    /// The manifest could not be read or written.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The manifest is not valid JSON of the expected shape.
    #[error("{} is not a valid gatevm provenance manifest (run `gatevm setup` to rewrite it)", path.display())]
    Parse {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// The manifest was written by a newer gatevm.
    #[error("{} has format {found}, this gatevm understands {PROVENANCE_FORMAT}; run `gatevm setup`", path.display())]
    Format {
        /// The path.
        path: PathBuf,
        /// The format found.
        found: u32,
    },
}

/// One installed file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Path relative to the runtime directory, or absolute for a file of the host's (the host's
    /// QEMU when it is used).
    pub path: String,
    /// SHA-256 of the contents, hex.
    pub sha256: String,
}

/// One component of the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Component {
    /// Component name (see [`component`]).
    pub name: String,
    /// Version (the Debian package version, the crate version).
    pub version: String,
    /// Where it came from, e.g. `debian trixie package gvproxy 0.8.1-3`.
    pub origin: String,
    /// Seconds since the epoch when it was installed.
    #[serde(default)]
    pub installed_unix: u64,
    /// Every file it installed.
    pub files: Vec<FileRecord>,
}

impl Component {
    /// A component installed now.
    pub(crate) fn installed_now(
        name: &str,
        version: &str,
        origin: &str,
        files: Vec<FileRecord>,
    ) -> Component {
        Component {
            name: name.to_string(),
            version: version.to_string(),
            origin: origin.to_string(),
            installed_unix: util::now_unix(),
            files,
        }
    }
}

/// The base root filesystem that setup built or found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootfsRecord {
    /// The recipe hash (12 hex digits), also the directory name.
    pub id: String,
    /// Absolute path of the tree.
    pub path: PathBuf,
    /// One line describing the recipe.
    pub recipe: String,
}

/// The whole manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// Manifest format version.
    pub format: u32,
    /// Seconds since the epoch of the last write.
    pub updated_unix: u64,
    /// Release of the installed guest kernel (`uname -r`).
    pub kernel_release: Option<String>,
    /// Installed components.
    pub components: Vec<Component>,
    /// The base rootfs of the last setup, if one was built.
    #[serde(default)]
    pub rootfs: Option<RootfsRecord>,
}

impl Default for Provenance {
    fn default() -> Self {
        Provenance {
            format: PROVENANCE_FORMAT,
            updated_unix: 0,
            kernel_release: None,
            components: Vec::new(),
            rootfs: None,
        }
    }
}

/// A file whose current state differs from the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileProblem {
    /// Component name.
    pub component: String,
    /// Path relative to the runtime directory.
    pub path: String,
    /// Hash in the manifest.
    pub expected: String,
    /// Hash now, or `None` when the file is missing or unreadable.
    pub actual: Option<String>,
}

/// The outcome of [`Provenance::verify`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Number of files hashed.
    pub checked: usize,
    /// Files that are missing or changed.
    pub problems: Vec<FileProblem>,
}

impl VerifyReport {
    /// Whether every file matched.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl Provenance {
    /// Path of the manifest in `runtime_dir`.
    pub fn path_in(runtime_dir: &Path) -> PathBuf {
        runtime_dir.join(PROVENANCE_FILE)
    }

    /// Reads the manifest from `runtime_dir`; `Ok(None)` when it does not exist.
    pub fn load(runtime_dir: &Path) -> Result<Option<Provenance>, ProvenanceError> {
        let path = Self::path_in(runtime_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ProvenanceError::Io(IoError {
                    action: "cannot read",
                    path,
                    source,
                }))
            }
        };
        let p: Provenance =
            serde_json::from_str(&text).map_err(|source| ProvenanceError::Parse {
                path: path.clone(),
                source,
            })?;
        if p.format > PROVENANCE_FORMAT {
            return Err(ProvenanceError::Format {
                path,
                found: p.format,
            });
        }
        Ok(Some(p))
    }

    /// Writes the manifest into `runtime_dir` atomically (temporary file, then rename).
    pub fn save(&mut self, runtime_dir: &Path) -> Result<(), ProvenanceError> {
        self.format = PROVENANCE_FORMAT;
        self.updated_unix = util::now_unix();
        let path = Self::path_in(runtime_dir);
        let mut text =
            serde_json::to_string_pretty(self).map_err(|source| ProvenanceError::Parse {
                path: path.clone(),
                source,
            })?;
        text.push('\n');
        util::write_atomic(&path, text.as_bytes(), 0o644).map_err(|source| {
            ProvenanceError::Io(IoError {
                action: "cannot write",
                path,
                source,
            })
        })
    }

    /// The component named `name`.
    pub fn component(&self, name: &str) -> Option<&Component> {
        self.components.iter().find(|c| c.name == name)
    }

    /// Adds or replaces a component.
    pub fn set_component(&mut self, c: Component) {
        match self.components.iter_mut().find(|x| x.name == c.name) {
            Some(slot) => *slot = c,
            None => self.components.push(c),
        }
    }

    /// Names of the files of component `name` that do not exist in `runtime_dir` (fast: no
    /// hashing). `None` when the component is not in the manifest.
    pub fn missing_files(&self, runtime_dir: &Path, name: &str) -> Option<Vec<String>> {
        let c = self.component(name)?;
        Some(
            c.files
                .iter()
                .filter(|f| !runtime_dir.join(&f.path).exists())
                .map(|f| f.path.clone())
                .collect(),
        )
    }

    /// Re-hashes every file of every component and reports the ones that are missing or differ.
    pub fn verify(&self, runtime_dir: &Path) -> VerifyReport {
        let mut report = VerifyReport::default();
        for c in &self.components {
            for f in &c.files {
                report.checked += 1;
                let actual = util::sha256_file(&runtime_dir.join(&f.path)).ok();
                if actual.as_deref() != Some(f.sha256.as_str()) {
                    report.problems.push(FileProblem {
                        component: c.name.clone(),
                        path: f.path.clone(),
                        expected: f.sha256.clone(),
                        actual,
                    });
                }
            }
        }
        report
    }
}

/// Hashes the given files (paths relative to `runtime_dir`) into records.
pub(crate) fn records_for(
    runtime_dir: &Path,
    rel_paths: &[PathBuf],
) -> Result<Vec<FileRecord>, ProvenanceError> {
    rel_paths
        .iter()
        .map(|rel| {
            let abs = runtime_dir.join(rel);
            let sha256 = util::sha256_file(&abs).map_err(|source| {
                ProvenanceError::Io(IoError {
                    action: "cannot hash",
                    path: abs.clone(),
                    source,
                })
            })?;
            Ok(FileRecord {
                path: rel.to_string_lossy().into_owned(),
                sha256,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_verify() {
        let tmp = tempfile::tempdir().unwrap();
        let rt = tmp.path();
        assert_eq!(Provenance::load(rt).unwrap(), None);
        std::fs::create_dir_all(rt.join("bin")).unwrap();
        std::fs::write(rt.join("bin/gvproxy"), b"elf").unwrap();
        std::fs::write(rt.join("bin/virtiofsd"), b"elf2").unwrap();
        let mut p = Provenance {
            kernel_release: Some("6.12.107+deb13-cloud-amd64".into()),
            ..Default::default()
        };
        p.set_component(Component {
            name: component::GVPROXY.into(),
            version: "0.8.1-3".into(),
            origin: "debian trixie package gvproxy 0.8.1-3".into(),
            installed_unix: 1,
            files: records_for(rt, &[PathBuf::from("bin/gvproxy")]).unwrap(),
        });
        p.set_component(Component {
            name: component::VIRTIOFSD.into(),
            version: "1.14.0".into(),
            origin: "crates-io virtiofsd 1.14.0".into(),
            installed_unix: 1,
            files: records_for(rt, &[PathBuf::from("bin/virtiofsd")]).unwrap(),
        });
        p.save(rt).unwrap();
        let q = Provenance::load(rt).unwrap().unwrap();
        assert_eq!(p, q);
        assert_eq!(q.component("gvproxy").unwrap().version, "0.8.1-3");
        assert!(q.verify(rt).ok());
        assert_eq!(q.verify(rt).checked, 2);
        assert_eq!(q.missing_files(rt, "gvproxy"), Some(vec![]));
        assert_eq!(q.missing_files(rt, "kernel"), None);

        std::fs::write(rt.join("bin/gvproxy"), b"tampered").unwrap();
        std::fs::remove_file(rt.join("bin/virtiofsd")).unwrap();
        let r = q.verify(rt);
        assert_eq!(r.problems.len(), 2);
        assert!(r.problems[0].actual.is_some());
        assert!(r.problems[1].actual.is_none());
        assert_eq!(
            q.missing_files(rt, "virtiofsd"),
            Some(vec!["bin/virtiofsd".to_string()])
        );

        // replacing keeps one entry per name
        p.set_component(Component {
            name: component::GVPROXY.into(),
            version: "0.8.1-4".into(),
            origin: "x".into(),
            installed_unix: 2,
            files: vec![],
        });
        assert_eq!(p.components.len(), 2);
    }

    #[test]
    fn bad_manifests() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(PROVENANCE_FILE), "{not json").unwrap();
        let e = Provenance::load(tmp.path()).unwrap_err();
        assert!(e.to_string().contains("gatevm setup"), "{e}");
        let mut p = Provenance::default();
        p.save(tmp.path()).unwrap();
        let text = std::fs::read_to_string(tmp.path().join(PROVENANCE_FILE)).unwrap();
        std::fs::write(
            tmp.path().join(PROVENANCE_FILE),
            text.replace("\"format\": 1", "\"format\": 99"),
        )
        .unwrap();
        assert!(matches!(
            Provenance::load(tmp.path()),
            Err(ProvenanceError::Format { .. })
        ));
    }
}
