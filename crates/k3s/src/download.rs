//! The pinned k3s release: on hosts with network access, the k3s profile can fetch k3s itself.
//! The file is checked against a sha256 pinned here before it is made executable or run; a
//! mismatch leaves nothing behind. `$GATEVM_K3S_URL` with `$GATEVM_K3S_SHA256` replaces the pin
//! (a mirror, or another release), and is verified the same way.

use crate::binary::{self, sha256_file, BinaryError, K3sBinary};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The pinned k3s release.
pub const PINNED_VERSION: &str = "v1.34.2+k3s1";

/// Release asset and sha256 (from the release's `sha256sum-<arch>.txt`) per host architecture.
const PINNED: &[(&str, &str, &str)] = &[
    (
        "x86_64",
        "k3s",
        "15811d34187e03fe29d0e46108c42cc33e62cec1b3d9d80f50944536ebcad40a",
    ),
    (
        "aarch64",
        "k3s-arm64",
        "2e1db0e54a8b0d0ab8a264a119c9c617561f9290e7bb2722d795f8bc91b24cf8",
    ),
];

/// Where the release's assets are published.
const RELEASES: &str = "https://github.com/k3s-io/k3s/releases/download";

/// Largest file accepted (the k3s binary is about 70 MiB).
const MAX_BYTES: u64 = 512 << 20;

/// Why no k3s could be pinned or fetched.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// `$GATEVM_K3S_SHA256` is not a sha256.
    #[error("GATEVM_K3S_SHA256 {0:?} is not a sha256 (64 hex digits)")]
    BadSha256(String),
    /// `$GATEVM_K3S_URL` without `$GATEVM_K3S_SHA256`.
    #[error("GATEVM_K3S_URL needs GATEVM_K3S_SHA256: gatevm does not run an unverified k3s")]
    UrlWithoutSha256,
    /// `$GATEVM_K3S_SHA256` without `$GATEVM_K3S_URL`.
    #[error("GATEVM_K3S_SHA256 is set without GATEVM_K3S_URL")]
    Sha256WithoutUrl,
    /// No release is pinned for the host's architecture.
    #[error("no k3s release is pinned for {0}: pass --k3s PATH, or cache one with `gatevm setup --k3s FILE`")]
    NotPinned(String),
    /// A file system operation failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// curl could not be started.
    #[error("running curl to fetch k3s (install curl, or pass --k3s PATH)")]
    Curl(#[source] std::io::Error),
    /// curl failed; `reason` is the last line it printed.
    #[error("fetching {url}: {reason}")]
    Fetch {
        /// What was fetched.
        url: String,
        /// curl's last line of error output.
        reason: String,
    },
    /// The file's hash is not the pinned one.
    #[error("{url} has sha256 {got}, not the pinned {want}: refusing to run it")]
    WrongSha256 {
        /// What was fetched.
        url: String,
        /// Its hash.
        got: String,
        /// The pinned hash.
        want: String,
    },
    /// The file is not a usable k3s binary, or could not be cached.
    #[error(transparent)]
    Binary(#[from] BinaryError),
    /// The binary reports another version than the pinned one.
    #[error("{url} reports k3s {got}, not the pinned {want}")]
    WrongVersion {
        /// What was fetched.
        url: String,
        /// The version it reports.
        got: String,
        /// The pinned version.
        want: String,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DownloadError {
    let path = path.to_path_buf();
    move |source| DownloadError::Io { op, path, source }
}

/// A file to fetch and the hash it must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    pub url: String,
    pub sha256: String,
    /// The version the binary must report, when known.
    pub version: Option<String>,
}

/// The built-in pin for an architecture (`std::env::consts::ARCH` spelling).
pub fn pinned(arch: &str) -> Option<Pin> {
    let (_, asset, sha) = PINNED.iter().find(|(a, _, _)| *a == arch)?;
    Some(Pin {
        url: format!("{RELEASES}/{}/{asset}", PINNED_VERSION.replace('+', "%2B")),
        sha256: sha.to_string(),
        version: Some(PINNED_VERSION.to_string()),
    })
}

/// The pin to use: `$GATEVM_K3S_URL` and `$GATEVM_K3S_SHA256` together, or the built-in one.
pub fn pin_from(
    url: Option<String>,
    sha256: Option<String>,
    arch: &str,
) -> Result<Pin, DownloadError> {
    match (url, sha256) {
        (Some(url), Some(sha)) => {
            let sha = sha.trim().to_ascii_lowercase();
            if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(DownloadError::BadSha256(sha));
            }
            Ok(Pin {
                url,
                sha256: sha,
                version: None,
            })
        }
        (Some(_), None) => Err(DownloadError::UrlWithoutSha256),
        (None, Some(_)) => Err(DownloadError::Sha256WithoutUrl),
        (None, None) => pinned(arch).ok_or_else(|| DownloadError::NotPinned(arch.to_string())),
    }
}

/// The pin for this host, from the environment or built in.
pub fn pin() -> Result<Pin, DownloadError> {
    pin_from(
        std::env::var("GATEVM_K3S_URL")
            .ok()
            .filter(|s| !s.is_empty()),
        std::env::var("GATEVM_K3S_SHA256")
            .ok()
            .filter(|s| !s.is_empty()),
        std::env::consts::ARCH,
    )
}

/// Fetches `pin` with curl into the runtime's k3s cache, verifies its sha256 before anything
/// else, checks that it is k3s (and the pinned version), and caches it like `setup --k3s`.
pub fn fetch(pin: &Pin, runtime_dir: &Path) -> Result<K3sBinary, DownloadError> {
    let dir = binary::cache_dir(runtime_dir);
    std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
    // Per process: two fetches at once do not share (or remove) each other's partial file.
    let tmp = dir.join(format!(".download-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let result = fetch_into(pin, &tmp, runtime_dir);
    let _ = std::fs::remove_file(&tmp);
    result
}

fn fetch_into(pin: &Pin, tmp: &Path, runtime_dir: &Path) -> Result<K3sBinary, DownloadError> {
    let out = Command::new("curl")
        .args([
            "--fail",
            "--silent",
            "--show-error",
            "--location",
            "--connect-timeout",
            "10",
            "--max-filesize",
            &MAX_BYTES.to_string(),
            "--output",
        ])
        .arg(tmp)
        .arg(&pin.url)
        .stdin(Stdio::null())
        .output()
        .map_err(DownloadError::Curl)?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let line = err
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .unwrap_or("failed");
        return Err(DownloadError::Fetch {
            url: pin.url.clone(),
            reason: line.trim().to_string(),
        });
    }
    let got = sha256_file(tmp).map_err(io_err("hashing", tmp))?;
    if got != pin.sha256 {
        return Err(DownloadError::WrongSha256 {
            url: pin.url.clone(),
            got,
            want: pin.sha256.clone(),
        });
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o755))
        .map_err(io_err("chmod", tmp))?;
    let bin = binary::inspect(tmp)?;
    if let Some(v) = &pin.version {
        if &bin.version != v {
            return Err(DownloadError::WrongVersion {
                url: pin.url.clone(),
                got: bin.version,
                want: v.clone(),
            });
        }
    }
    Ok(binary::cache(&bin, runtime_dir)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins() {
        let p = pinned("x86_64").unwrap();
        assert_eq!(
            p.url,
            format!("{RELEASES}/v1.34.2%2Bk3s1/k3s"),
            "the + of the tag is escaped"
        );
        // Each built-in pin passes the check a user's pin gets (a sha256: 64 lowercase hex
        // digits), unchanged.
        for arch in ["x86_64", "aarch64"] {
            let p = pinned(arch).unwrap();
            let again = pin_from(Some(p.url.clone()), Some(p.sha256.clone()), arch).unwrap();
            assert_eq!(again.sha256, p.sha256, "{arch}");
        }
        assert!(pinned("aarch64").unwrap().url.ends_with("/k3s-arm64"));
        assert!(pinned("riscv64").is_none());
        assert!(pin_from(None, None, "riscv64")
            .unwrap_err()
            .to_string()
            .contains("--k3s PATH"));
        assert!(pin_from(Some("file:///x".into()), None, "x86_64")
            .unwrap_err()
            .to_string()
            .contains("unverified"));
        assert!(pin_from(None, Some("0".repeat(64)), "x86_64").is_err());
        assert!(
            pin_from(Some("file:///x".into()), Some("xyz".into()), "x86_64")
                .unwrap_err()
                .to_string()
                .contains("64 hex")
        );
        let own = pin_from(Some("file:///x".into()), Some("AB".repeat(32)), "x86_64").unwrap();
        assert_eq!(own.sha256, "ab".repeat(32));
        assert_eq!(own.version, None);
    }

    #[test]
    fn the_hash_checked_is_the_sha256_of_the_bytes() {
        // The FIPS 180-2 example: the digest of "abc", and of nothing.
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("abc");
        std::fs::write(&f, b"abc").unwrap();
        assert_eq!(
            sha256_file(&f).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        std::fs::write(&f, b"").unwrap();
        assert_eq!(
            sha256_file(&f).unwrap(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        // A user's pin is compared in lowercase, whatever case it was given in; anything but
        // 64 hex digits is refused, naming what was given.
        let up = "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD";
        let p = pin_from(Some("file:///x".into()), Some(format!(" {up}\n")), "x86_64").unwrap();
        assert_eq!(p.sha256, up.to_ascii_lowercase());
        for bad in [&up[1..], &format!("{up}0"), &up.replace('B', "g")] {
            let e = pin_from(Some("file:///x".into()), Some(bad.to_string()), "x86_64")
                .unwrap_err()
                .to_string();
            let shown = bad.to_ascii_lowercase();
            assert_eq!(
                e,
                format!("GATEVM_K3S_SHA256 {shown:?} is not a sha256 (64 hex digits)")
            );
        }
    }

    #[test]
    fn a_wrong_hash_is_refused_and_nothing_is_kept() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("k3s");
        std::fs::copy("/bin/true", &src).unwrap();
        let rt = d.path().join("rt");
        let pin = Pin {
            url: format!("file://{}", src.display()),
            sha256: "0".repeat(64),
            version: None,
        };
        let e = fetch(&pin, &rt).unwrap_err().to_string();
        let got = sha256_file(&src).unwrap();
        assert_eq!(
            e,
            format!(
                "{} has sha256 {got}, not the pinned {}: refusing to run it",
                pin.url, pin.sha256
            )
        );
        assert_eq!(
            std::fs::read_dir(binary::cache_dir(&rt)).unwrap().count(),
            0
        );

        // The right hash, but not k3s: checked after the hash, still nothing kept.
        let pin = Pin {
            sha256: sha256_file(&src).unwrap(),
            ..pin
        };
        let e = fetch(&pin, &rt).unwrap_err().to_string();
        assert!(e.contains("like k3s"), "{e}");
        assert_eq!(
            std::fs::read_dir(binary::cache_dir(&rt)).unwrap().count(),
            0
        );
        assert_eq!(binary::cached(&rt), None);

        // Not there at all.
        let pin = Pin {
            url: format!("file://{}/none", d.path().display()),
            ..pin
        };
        let e = fetch(&pin, &rt).unwrap_err().to_string();
        assert!(e.starts_with("fetching file://"), "{e}");
    }
}
