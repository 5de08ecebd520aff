//! The k3s binary: supplied with `--k3s PATH`, or cached in the runtime by `gatevm setup --k3s
//! FILE`. It is checked before use (an executable ELF file that answers `--version` like k3s), and
//! its version and sha256 are recorded next to the cached copy (`k3s.json`), which `doctor` and
//! the instance status report.

pub(crate) use gatevm_fsutil::sha256_file;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a k3s binary could not be checked, copied or cached.
#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    /// A file system operation on a path failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done ("creating", "reading", ...).
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file cannot be opened (the message is its path: callers say what it was for).
    #[error("{}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Copying the binary into the cache failed.
    #[error("copying {} into {}", src.display(), dir.display())]
    Copy {
        /// The binary.
        src: PathBuf,
        /// The cache directory.
        dir: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The path is not a regular file.
    #[error("{} is not a file", path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The file is not an ELF executable.
    #[error("{} is not a k3s binary (not an ELF executable)", path.display())]
    NotElf {
        /// The file.
        path: PathBuf,
    },
    /// The file has no execute permission.
    #[error("{} is not executable (chmod +x it)", path.display())]
    NotExecutable {
        /// The file.
        path: PathBuf,
    },
    /// `k3s --version` could not be started.
    #[error("running {} --version", path.display())]
    Run {
        /// The binary.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// `k3s --version` did not exit in time.
    #[error("{} --version did not answer within 10 s", path.display())]
    Timeout {
        /// The binary.
        path: PathBuf,
    },
    /// `--version` printed no k3s version.
    #[error("{} does not answer --version like k3s (\"k3s version v…\")", path.display())]
    NotK3s {
        /// The binary.
        path: PathBuf,
    },
    /// The copy's hash is not the checked binary's.
    #[error("{} changed while it was copied", path.display())]
    Changed {
        /// The binary.
        path: PathBuf,
    },
    /// The record of the cached binary could not be serialized.
    #[error("serializing k3s.json")]
    Record(#[source] serde_json::Error),
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BinaryError {
    let path = path.to_path_buf();
    move |source| BinaryError::Io { op, path, source }
}

/// A checked k3s binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct K3sBinary {
    pub path: PathBuf,
    /// e.g. `v1.31.4+k3s1`.
    pub version: String,
    pub sha256: String,
}

/// Where `gatevm setup --k3s` keeps the binary inside the runtime directory.
pub fn cache_dir(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("k3s")
}

/// The version in `k3s --version` output (`k3s version v1.31.4+k3s1 (a1b2c3d4)`).
pub fn parse_version(output: &str) -> Option<String> {
    let line = output.lines().find(|l| l.starts_with("k3s version "))?;
    let v = line
        .strip_prefix("k3s version ")?
        .split_whitespace()
        .next()?;
    (v.starts_with('v') && v.len() > 1).then(|| v.to_string())
}

/// Where `--k3s PATH` binaries are copied before they are checked and used:
/// `CACHE/k3s/supplied/<sha256>/k3s`.
pub fn supplied_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("k3s").join("supplied")
}

/// Takes a `--k3s PATH` binary: checks what can be checked without running it, copies it into
/// the cache (named by its hash), and inspects and returns **the copy**. The copy is what runs
/// (`--version` here, k3s in the guest later), so changing or replacing the user's file after
/// this does not change what runs.
pub fn import(src: &Path, cache_dir: &Path) -> Result<K3sBinary, BinaryError> {
    check_file(src)?;
    let dest = copy_to_cache(src, &supplied_dir(cache_dir))?;
    let b = inspect(&dest)?;
    Ok(b)
}

/// Copies `src` to `dir/<sha256>/k3s` (mode 0755, atomically, the directory synced) and returns
/// that path. An identical copy already there is kept.
pub fn copy_to_cache(src: &Path, dir: &Path) -> Result<PathBuf, BinaryError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    gatevm_fsutil::mkdir_private(dir).map_err(io_err("creating", dir))?;
    let tmp = dir.join(format!(".k3s.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let copied = (|| {
        let mut input = std::fs::File::open(src)?;
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o700)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        std::io::copy(&mut input, &mut out)?;
        out.set_permissions(std::fs::Permissions::from_mode(0o755))?;
        out.sync_all()
    })();
    if let Err(source) = copied {
        let _ = std::fs::remove_file(&tmp);
        return Err(BinaryError::Copy {
            src: src.to_path_buf(),
            dir: dir.to_path_buf(),
            source,
        });
    }
    // The hash of what was copied, not of the user's file (which may change meanwhile).
    let sha = sha256_file(&tmp).map_err(io_err("hashing", &tmp))?;
    let home = dir.join(&sha);
    let dest = home.join("k3s");
    let installed = (|| {
        gatevm_fsutil::mkdir_private(&home)?;
        if sha256_file(&dest).is_ok_and(|have| have == sha) {
            std::fs::remove_file(&tmp)
        } else {
            gatevm_fsutil::rename_durable(&tmp, &dest)
        }
    })();
    if let Err(e) = installed {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err("installing", &dest)(e));
    }
    Ok(dest)
}

/// The checks of [`inspect`] that do not run the file: a regular file, an ELF, executable.
fn check_file(path: &Path) -> Result<(), BinaryError> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let open = |source| BinaryError::Open {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(open)?;
    if !meta.is_file() {
        return Err(BinaryError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mut magic = Vec::with_capacity(4);
    std::fs::File::open(path)
        .and_then(|f| f.take(4).read_to_end(&mut magic))
        .map_err(open)?;
    if magic != b"\x7fELF" {
        return Err(BinaryError::NotElf {
            path: path.to_path_buf(),
        });
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(BinaryError::NotExecutable {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Checks that `path` is a k3s binary and reads its version and hash.
pub fn inspect(path: &Path) -> Result<K3sBinary, BinaryError> {
    check_file(path)?;
    let version = run_version(path)?;
    let sha256 = sha256_file(path).map_err(io_err("hashing", path))?;
    Ok(K3sBinary {
        path: path.to_path_buf(),
        version,
        sha256,
    })
}

/// Runs `k3s --version` with a timeout and parses it.
fn run_version(path: &Path) -> Result<String, BinaryError> {
    let mut child = std::process::Command::new(path)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|source| BinaryError::Run {
            path: path.to_path_buf(),
            source,
        })?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(BinaryError::Timeout {
                    path: path.to_path_buf(),
                });
            }
        }
    }
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        use std::io::Read;
        let _ = o.read_to_string(&mut out);
    }
    parse_version(&out).ok_or_else(|| BinaryError::NotK3s {
        path: path.to_path_buf(),
    })
}

/// Copies a checked binary into the runtime's cache (atomically) and records it in `k3s.json`.
pub fn cache(bin: &K3sBinary, runtime_dir: &Path) -> Result<K3sBinary, BinaryError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = cache_dir(runtime_dir);
    std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
    let dest = dir.join("k3s");
    let tmp = dir.join(".k3s.tmp");
    std::fs::copy(&bin.path, &tmp).map_err(io_err("copying", &bin.path))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
        .map_err(io_err("chmod", &tmp))?;
    let copied = sha256_file(&tmp).map_err(io_err("hashing", &tmp))?;
    if copied != bin.sha256 {
        let _ = std::fs::remove_file(&tmp);
        return Err(BinaryError::Changed {
            path: bin.path.clone(),
        });
    }
    gatevm_fsutil::rename_durable(&tmp, &dest).map_err(io_err("installing", &dest))?;
    let cached = K3sBinary {
        path: dest,
        ..bin.clone()
    };
    let json = serde_json::to_vec_pretty(&cached).map_err(BinaryError::Record)?;
    let record = dir.join("k3s.json");
    std::fs::write(&record, json).map_err(io_err("writing", &record))?;
    Ok(cached)
}

/// The cached binary, if `gatevm setup --k3s` put one there.
pub fn cached(runtime_dir: &Path) -> Option<K3sBinary> {
    let dir = cache_dir(runtime_dir);
    let b: K3sBinary = serde_json::from_slice(&std::fs::read(dir.join("k3s.json")).ok()?).ok()?;
    b.path.is_file().then_some(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn version_parsing() {
        assert_eq!(
            parse_version("k3s version v1.31.4+k3s1 (a1b2c3d4)\ngo version go1.22.9\n").as_deref(),
            Some("v1.31.4+k3s1")
        );
        assert_eq!(parse_version("kubectl version"), None);
        assert_eq!(parse_version("k3s version "), None);
    }

    /// A stand-in k3s: a copy of /bin/sh would not answer --version, so use a script... which is
    /// not an ELF. Tests use the checks that do not need a real k3s.
    #[test]
    fn refuses_what_is_not_k3s() {
        let d = tempfile::tempdir().unwrap();
        let script = d.path().join("k3s");
        std::fs::write(&script, "#!/bin/sh\necho 'k3s version v1.31.4+k3s1 (x)'\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(inspect(&script)
            .unwrap_err()
            .to_string()
            .contains("not an ELF"));
        assert!(inspect(d.path())
            .unwrap_err()
            .to_string()
            .contains("not a file"));
        assert!(inspect(&d.path().join("none")).is_err());
        // An ELF that is not k3s.
        let sh = d.path().join("sh");
        std::fs::copy("/bin/true", &sh).unwrap();
        assert!(
            inspect(&sh).unwrap_err().to_string().contains("like k3s"),
            "{:?}",
            inspect(&sh)
        );
        std::fs::set_permissions(&sh, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(inspect(&sh)
            .unwrap_err()
            .to_string()
            .contains("not executable"));
    }

    /// A `--k3s` file is copied, by hash, and later changes of the user's file do not reach
    /// the copy; a file that is no binary is refused before anything is copied.
    #[test]
    fn supplied_binary_is_copied_and_pinned() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("k3s");
        std::fs::copy("/bin/true", &src).unwrap();
        let cache = d.path().join("cache");
        let dir = supplied_dir(&cache);
        let copy = copy_to_cache(&src, &dir).unwrap();
        let sha = sha256_file(&src).unwrap();
        assert_eq!(copy, dir.join(&sha).join("k3s"));
        assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&src).unwrap());
        assert_eq!(
            std::fs::metadata(&copy).unwrap().permissions().mode() & 0o777,
            0o755
        );
        // The user replaces their file: the copy stays what was checked.
        std::fs::copy("/bin/false", &src).unwrap();
        assert_eq!(sha256_file(&copy).unwrap(), sha);
        // Copying again gives the new content its own place, and leaves no temporary file.
        let again = copy_to_cache(&src, &dir).unwrap();
        assert_ne!(again, copy);
        assert_eq!(sha256_file(&copy).unwrap(), sha);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| n.len() == 64), "{names:?}");
        // import: the checks on the user's path come first, nothing is copied for a script.
        let script = d.path().join("script");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let other = d.path().join("other-cache");
        assert!(import(&script, &other)
            .unwrap_err()
            .to_string()
            .contains("not an ELF"));
        assert!(!other.exists());
        // An ELF that is no k3s: refused, naming the copy that was run.
        let e = import(&src, &other).unwrap_err().to_string();
        assert!(e.contains("like k3s") && e.contains("supplied"), "{e}");
    }

    #[test]
    fn cache_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::copy("/bin/true", &src).unwrap();
        let b = K3sBinary {
            path: src.clone(),
            version: "v1.31.4+k3s1".into(),
            sha256: sha256_file(&src).unwrap(),
        };
        let rt = d.path().join("rt");
        assert_eq!(cached(&rt), None);
        let c = cache(&b, &rt).unwrap();
        assert_eq!(c.path, rt.join("k3s/k3s"));
        assert_eq!(cached(&rt), Some(c.clone()));
        assert_eq!(
            std::fs::metadata(&c.path).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let wrong = K3sBinary {
            sha256: "0".repeat(64),
            ..b
        };
        assert!(cache(&wrong, &rt)
            .unwrap_err()
            .to_string()
            .contains("changed"));
    }
}
