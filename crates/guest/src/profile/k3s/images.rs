//! Image import in the k3s profile: k3s imports its images directory only into the
//! containerd it embeds, so gatevm imports the archives it placed there into the VM's
//! containerd itself, once containerd is ready and before k3s starts.
//!
//! Each archive is imported once: the host sends its SHA-256 in the plan, and a successful
//! import is recorded by digest, with the image names ctr unpacked, on the state disk
//! ([`ImportRecord`]). At the next boot an archive whose digest is recorded is skipped while
//! every image it brought is still in containerd; a changed archive (another digest), or one
//! whose images were removed, is imported again. An archive without a digest (a host that sends
//! none) is imported at every boot, as k3s does.

use crate::reaper::{describe, Reaper};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// The containerd namespace CRI (and so k3s) uses.
pub(crate) const CRI_NAMESPACE: &str = "k8s.io";

/// How a placed image archive is handed to containerd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ImportMethod {
    /// `ctr images import FILE` (a tar archive).
    Tar,
    /// `tool -dc FILE | ctr images import -`.
    Compressed {
        /// The decompressor (`gzip`, `zstd`, `bzip2`, `lz4`).
        tool: &'static str,
    },
    /// Not imported; why.
    Unsupported(&'static str),
}

/// The import method for an archive name, by suffix (case-insensitive), as k3s decides for the
/// containerd it embeds.
pub(crate) fn import_method(name: &str) -> ImportMethod {
    let n = name.to_ascii_lowercase();
    let has = |suffixes: &[&str]| suffixes.iter().any(|s| n.ends_with(s));
    if has(&[".tar"]) {
        ImportMethod::Tar
    } else if has(&[".tar.gz", ".tgz"]) {
        ImportMethod::Compressed { tool: "gzip" }
    } else if has(&[".tar.zst", ".tzst"]) {
        ImportMethod::Compressed { tool: "zstd" }
    } else if has(&[".tar.bz2", ".tbz"]) {
        ImportMethod::Compressed { tool: "bzip2" }
    } else if has(&[".tar.lz4"]) {
        ImportMethod::Compressed { tool: "lz4" }
    } else if has(&[".txt"]) {
        ImportMethod::Unsupported(
            "a list of images to pull; gatevm imports archives only (pull the images on the host \
             and stage them as an archive)",
        )
    } else {
        ImportMethod::Unsupported(
            "not an image archive (.tar, .tar.gz, .tgz, .tar.zst, .tzst, .tar.bz2, .tbz, .tar.lz4)",
        )
    }
}

/// Why one archive was not imported.
#[derive(Debug, thiserror::Error)]
enum ImportError {
    /// The archive's decompressor is not in the root.
    #[error("needs {0}, which the root filesystem lacks (stage a plain .tar)")]
    MissingTool(&'static str),
    /// A program could not be started.
    #[error("cannot run {prog}")]
    Spawn {
        /// `ctr` or the decompressor.
        prog: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The decompressor's output pipe is missing.
    #[error("cannot read {0}'s output")]
    NoOutput(&'static str),
    /// Not something gatevm imports (why).
    #[error("{0}")]
    Unsupported(&'static str),
    /// The reaper lost ctr's exit status.
    #[error("ctr's exit status was lost")]
    LostStatus,
    /// ctr failed and said why.
    #[error("{0}")]
    Ctr(String),
    /// ctr failed without a message (how it ended).
    #[error("ctr images import failed ({0})")]
    CtrStatus(String),
    /// The decompressor failed (how it ended).
    #[error("{tool} failed ({status})")]
    Tool {
        /// The decompressor.
        tool: &'static str,
        /// How it ended.
        status: String,
    },
}

/// Where a decompressor is looked for in the root.
fn find_tool(tool: &str) -> Option<PathBuf> {
    ["/usr/bin", "/bin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// The image names in `ctr images import`'s output (`unpacking NAME (sha256:…)...done`), at most
/// 256.
pub(crate) fn unpacked_names(stdout: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for l in stdout.lines() {
        let Some(rest) = l.trim().strip_prefix("unpacking ") else {
            continue;
        };
        let name = rest.split(" (sha256:").next().unwrap_or("").trim();
        if !name.is_empty()
            && !name.contains(char::is_whitespace)
            && !names.iter().any(|n| n == name)
            && names.len() < 256
        {
            names.push(name.to_string());
        }
    }
    names
}

/// Imports one archive into containerd's [`CRI_NAMESPACE`] namespace and returns the names of
/// the images ctr unpacked; the error is ctr's (or the decompressor's) message.
fn import_one(
    path: &Path,
    method: &ImportMethod,
    reaper: &Reaper,
) -> Result<Vec<String>, ImportError> {
    let path_s = path.to_string_lossy().into_owned();
    let mut decompressor = None;
    let mut ctr = match method {
        ImportMethod::Tar => {
            let mut c =
                crate::container::ctr::command(CRI_NAMESPACE, &["images", "import", &path_s]);
            c.stdin(Stdio::null());
            c
        }
        ImportMethod::Compressed { tool } => {
            let prog = find_tool(tool).ok_or(ImportError::MissingTool(tool))?;
            let mut d = Command::new(prog);
            d.arg("-dc")
                .arg(path)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            let d = reaper
                .spawn(&mut d)
                .map_err(|source| ImportError::Spawn { prog: tool, source })?;
            let mut c = crate::container::ctr::command(CRI_NAMESPACE, &["images", "import", "-"]);
            match d.stdout {
                Some(out) => {
                    c.stdin(Stdio::from(out));
                }
                None => return Err(ImportError::NoOutput(tool)),
            }
            decompressor = Some((tool, d.exit));
            c
        }
        ImportMethod::Unsupported(why) => return Err(ImportError::Unsupported(why)),
    };
    ctr.stdout(Stdio::piped()).stderr(Stdio::piped());
    let spawned = reaper.spawn(&mut ctr).map_err(|source| ImportError::Spawn {
        prog: "ctr",
        source,
    });
    // The command holds our copy of the pipe from the decompressor: drop it so that the
    // decompressor sees a closed pipe if ctr exits early.
    drop(ctr);
    let spawned = spawned?;
    // stdout on a thread of its own, so that neither pipe can fill up and stall ctr; kept up
    // to 1 MiB (the names), the rest read and dropped.
    let out_reader = spawned.stdout.map(|mut o| {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            let _ = (&mut o).take(1 << 20).read_to_end(&mut kept);
            let _ = std::io::copy(&mut o, &mut std::io::sink());
            kept
        })
    });
    let mut stderr = Vec::new();
    if let Some(mut e) = spawned.stderr {
        let _ = e.read_to_end(&mut stderr);
    }
    let stdout = out_reader.and_then(|t| t.join().ok()).unwrap_or_default();
    let status = spawned.exit.recv().map_err(|_| ImportError::LostStatus)?;
    let tool_status = decompressor.map(|(tool, rx)| (tool, rx.recv().ok()));
    if status.code != Some(0) {
        let msg = crate::container::ctr::error_line(&String::from_utf8_lossy(&stderr));
        return Err(if msg.is_empty() {
            ImportError::CtrStatus(describe(&status))
        } else {
            ImportError::Ctr(msg)
        });
    }
    if let Some((tool, Some(st))) = tool_status {
        if st.code != Some(0) {
            return Err(ImportError::Tool {
                tool,
                status: describe(&st),
            });
        }
    }
    Ok(unpacked_names(&String::from_utf8_lossy(&stdout)))
}

/// What was imported, by archive digest, kept on the state disk
/// (`<data-dir>/.gatevm/imported-images.json`): `{"SHA256": {"file": NAME, "images": [...]}}`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct ImportRecord {
    /// Digest → (file name when imported, image names it brought).
    entries: std::collections::BTreeMap<String, (String, Vec<String>)>,
}

/// At most this many digests are remembered (the oldest-named beyond that are forgotten, which
/// only means one more import).
const RECORD_MAX: usize = 1024;

impl ImportRecord {
    /// Reads the record; a missing, unreadable or malformed one is empty (the archives are then
    /// imported again, which is safe).
    pub(crate) fn load(path: &Path) -> ImportRecord {
        let Ok(text) = std::fs::read(path) else {
            return ImportRecord::default();
        };
        let Ok(serde_json::Value::Object(m)) = serde_json::from_slice(&text) else {
            return ImportRecord::default();
        };
        let mut entries = std::collections::BTreeMap::new();
        for (digest, v) in m.into_iter().take(RECORD_MAX) {
            let file = v.get("file").and_then(|f| f.as_str()).unwrap_or("");
            let images = v
                .get("images")
                .and_then(|i| i.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            entries.insert(digest, (file.to_string(), images));
        }
        ImportRecord { entries }
    }

    /// Writes the record (atomically, 0600).
    pub(crate) fn save(&self, path: &Path) -> std::io::Result<()> {
        let m: serde_json::Map<String, serde_json::Value> = self
            .entries
            .iter()
            .map(|(d, (file, images))| {
                (
                    d.clone(),
                    serde_json::json!({ "file": file, "images": images }),
                )
            })
            .collect();
        let text = serde_json::to_vec_pretty(&serde_json::Value::Object(m))
            .map_err(std::io::Error::other)?;
        if let Some(dir) = path.parent() {
            crate::fsutil::mkdir_private(dir)?;
        }
        gatevm_fsutil::write_atomic(path, &text, 0o600)
    }

    /// The images a recorded digest brought, if it is recorded.
    pub(crate) fn images_of(&self, sha256: &str) -> Option<&[String]> {
        self.entries.get(sha256).map(|(_, i)| i.as_slice())
    }

    /// Records a successful import.
    pub(crate) fn add(&mut self, sha256: &str, file: &str, images: Vec<String>) {
        self.entries
            .insert(sha256.to_string(), (file.to_string(), images));
        while self.entries.len() > RECORD_MAX {
            let Some(k) = self.entries.keys().next().cloned() else {
                break;
            };
            self.entries.remove(&k);
        }
    }
}

/// The image names containerd's [`CRI_NAMESPACE`] holds, or None when ctr cannot say.
fn present_images() -> Option<std::collections::BTreeSet<String>> {
    let out = crate::container::ctr::output(CRI_NAMESPACE, &["images", "ls", "-q"]).ok()?;
    Some(out.lines().map(|l| l.trim().to_string()).collect())
}

/// Whether a recorded import can be skipped: every image it brought is still there (an import
/// that named no images is trusted by its digest alone).
pub(crate) fn still_present(
    recorded: &[String],
    present: Option<&std::collections::BTreeSet<String>>,
) -> bool {
    match present {
        _ if recorded.is_empty() => true,
        Some(p) => recorded.iter().all(|n| p.contains(n)),
        None => false,
    }
}

/// Imports the archives gatevm placed in the images directory into containerd (k3s imports its
/// images directory only into the containerd it embeds): each once per digest (`digests`, file
/// name → SHA-256, from the plan), as the module docs say, recorded in `record`. Returns one
/// line per archive (for the log and `gatevm status`).
pub(crate) fn import_images(
    dir: &Path,
    names: &[String],
    digests: &[(String, String)],
    record: &Path,
    reaper: &Reaper,
) -> Vec<String> {
    let mut lines = Vec::new();
    let mut rec = ImportRecord::load(record);
    let digest_of = |name: &str| {
        digests
            .iter()
            .find(|(f, _)| f == name)
            .map(|(_, d)| d.clone())
    };
    // One listing of containerd's images, only when a recorded archive needs it.
    let needs_listing = names.iter().any(|n| {
        digest_of(n)
            .and_then(|d| rec.images_of(&d).map(|i| !i.is_empty()))
            .unwrap_or(false)
    });
    let present = if needs_listing {
        present_images()
    } else {
        None
    };
    let mut changed = false;
    for name in names {
        let digest = digest_of(name);
        let short = digest
            .as_deref()
            .map(|d| format!(" (sha256:{})", &d[..12.min(d.len())]))
            .unwrap_or_default();
        if let Some(d) = &digest {
            if let Some(imgs) = rec.images_of(d) {
                if still_present(imgs, present.as_ref()) {
                    lines.push(format!(
                        "{name}{short}: already imported ({} images), skipped",
                        imgs.len()
                    ));
                    continue;
                }
            }
        }
        let method = import_method(name);
        let t = Instant::now();
        match import_one(&dir.join(name), &method, reaper) {
            Ok(images) => {
                lines.push(format!(
                    "{name}{short}: imported {} images into {CRI_NAMESPACE} in {}ms",
                    images.len(),
                    t.elapsed().as_millis()
                ));
                if let Some(d) = &digest {
                    rec.add(d, name, images);
                    changed = true;
                }
            }
            Err(e) => lines.push(format!(
                "{name}{short}: not imported: {}",
                crate::log::error_chain(&e)
            )),
        }
    }
    if changed {
        if let Err(e) = rec.save(record) {
            lines.push(format!(
                "cannot record the imports in {}: {e} (they run again at the next boot)",
                record.display()
            ));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_methods() {
        assert_eq!(import_method("a.tar"), ImportMethod::Tar);
        assert_eq!(import_method("A.TAR"), ImportMethod::Tar);
        for (n, tool) in [
            ("a.tar.gz", "gzip"),
            ("a.tgz", "gzip"),
            ("k3s-airgap-images-amd64.tar.zst", "zstd"),
            ("a.tzst", "zstd"),
            ("a.tar.bz2", "bzip2"),
            ("a.tbz", "bzip2"),
            ("a.tar.lz4", "lz4"),
        ] {
            assert_eq!(import_method(n), ImportMethod::Compressed { tool }, "{n}");
        }
        assert!(matches!(import_method("images.txt"),
                ImportMethod::Unsupported(w) if w.contains("pull")));
        assert!(matches!(
            import_method("a.zip"),
            ImportMethod::Unsupported(_)
        ));
        // Unsupported names are reported, not run.
        let lines = import_images(
            Path::new("/nonexistent"),
            &["a.zip".to_string()],
            &[],
            Path::new("/nonexistent/record.json"),
            Reaper::global(),
        );
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].starts_with("a.zip: not imported: not an image archive"),
            "{lines:?}"
        );
    }

    #[test]
    fn names_from_ctr_import_output() {
        let out = "unpacking docker.io/library/busybox:1.36 (sha256:abc)...done\n\
                   unpacking docker.io/rancher/mirrored-pause:3.6 (sha256:def)...done\n\
                   unpacking docker.io/library/busybox:1.36 (sha256:abc)...done\n\
                   something else\nunpacking  (sha256:x)\n";
        assert_eq!(
            unpacked_names(out),
            [
                "docker.io/library/busybox:1.36",
                "docker.io/rancher/mirrored-pause:3.6"
            ]
        );
        assert!(unpacked_names("").is_empty());
    }

    #[test]
    fn the_record_decides_what_is_skipped() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join(".gatevm/imported-images.json");
        // Missing or malformed: empty.
        assert_eq!(ImportRecord::load(&path), ImportRecord::default());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "not json").unwrap();
        assert_eq!(ImportRecord::load(&path), ImportRecord::default());

        let mut r = ImportRecord::default();
        r.add(
            &"a".repeat(64),
            "00-app.tar",
            vec!["docker.io/x/app:1".into()],
        );
        r.add(&"b".repeat(64), "01-untagged.tar", vec![]);
        r.save(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let back = ImportRecord::load(&path);
        assert_eq!(back, r);
        assert_eq!(
            back.images_of(&"a".repeat(64)),
            Some(&["docker.io/x/app:1".to_string()][..])
        );
        assert_eq!(back.images_of(&"c".repeat(64)), None);

        let present: std::collections::BTreeSet<String> =
            ["docker.io/x/app:1".to_string()].into_iter().collect();
        let none = std::collections::BTreeSet::new();
        let imgs = back.images_of(&"a".repeat(64)).unwrap();
        assert!(still_present(imgs, Some(&present)));
        // Removed since: imported again; containerd cannot say: imported again.
        assert!(!still_present(imgs, Some(&none)));
        assert!(!still_present(imgs, None));
        // An import that named no images stands on its digest.
        assert!(still_present(&[], None));

        // Bounded.
        let mut big = ImportRecord::default();
        for i in 0..RECORD_MAX + 5 {
            big.add(&format!("{i:064}"), "f", vec![]);
        }
        assert_eq!(big.entries.len(), RECORD_MAX);
    }
}
