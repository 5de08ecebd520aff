//! Image import in the k3s profile: k3s imports its images directory only into the
//! containerd it embeds, so gatevm imports the archives it placed there into the VM's
//! containerd itself, once containerd is ready and before k3s starts.

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

/// Imports one archive into containerd's [`CRI_NAMESPACE`] namespace; the error is ctr's (or
/// the decompressor's) message.
fn import_one(path: &Path, method: &ImportMethod, reaper: &Reaper) -> Result<(), ImportError> {
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
    ctr.stdout(Stdio::null()).stderr(Stdio::piped());
    let spawned = reaper.spawn(&mut ctr).map_err(|source| ImportError::Spawn {
        prog: "ctr",
        source,
    });
    // The command holds our copy of the pipe from the decompressor: drop it so that the
    // decompressor sees a closed pipe if ctr exits early.
    drop(ctr);
    let spawned = spawned?;
    let mut stderr = Vec::new();
    if let Some(mut e) = spawned.stderr {
        let _ = e.read_to_end(&mut stderr);
    }
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
    Ok(())
}

/// Imports the archives gatevm placed in the images directory into containerd (k3s imports its
/// images directory only into the containerd it embeds). Each archive is imported at every boot,
/// as k3s does; content containerd already has is not stored twice. Returns one log line per
/// archive.
pub(crate) fn import_images(dir: &Path, names: &[String], reaper: &Reaper) -> Vec<String> {
    let mut lines = Vec::new();
    for name in names {
        let method = import_method(name);
        let t = Instant::now();
        match import_one(&dir.join(name), &method, reaper) {
            Ok(()) => lines.push(format!(
                "imported {name} into {CRI_NAMESPACE} in {}ms",
                t.elapsed().as_millis()
            )),
            Err(e) => lines.push(format!(
                "not imported {name}: {}",
                crate::log::error_chain(&e)
            )),
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
            Reaper::global(),
        );
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].starts_with("not imported a.zip: not an image archive"),
            "{lines:?}"
        );
    }
}
