//! Packages from newer Debian suites through a private apt configuration.
//!
//! gatevm needs a few packages that the host's release does not have (trixie's kernel and
//! gvproxy, sid's libkrunfw). They are fetched with `apt-get download` through an apt
//! configuration of our own (sources list, state and cache under the cache directory, passed with
//! `-c`) and unpacked with `dpkg-deb -x`; the system's sources, state and dpkg database are never
//! touched. The mirror is the one the system already uses for its Debian archive, read from its
//! apt sources at run time (or `GATEVM_DEBIAN_MIRROR`). A configuration can hold source entries
//! instead ([`IndexKind::Source`]), for what gatevm builds from a Debian source package
//! (`apt-get source --download-only`, checked against the signed `Sources` index).

use std::cmp::Ordering;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use thiserror::Error;

use crate::cmd::{self, CommandError};
use crate::util;

/// The keyring that signs the Debian archive (from `debian-archive-keyring`).
pub const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// Environment variable that overrides the Debian mirror URI found in the system's apt sources.
pub const MIRROR_ENV: &str = "GATEVM_DEBIAN_MIRROR";

/// Debian release codenames and aliases; a source whose suite is one of these (or one with an
/// `-updates`/`-backports`/`-proposed-updates` suffix) is an entry of the Debian archive.
const DEBIAN_SUITES: &[&str] = &[
    "buzz",
    "rex",
    "bo",
    "hamm",
    "slink",
    "potato",
    "woody",
    "sarge",
    "etch",
    "lenny",
    "squeeze",
    "wheezy",
    "jessie",
    "stretch",
    "buster",
    "bullseye",
    "bookworm",
    "trixie",
    "forky",
    "duke",
    "sid",
    "stable",
    "oldstable",
    "oldoldstable",
    "testing",
    "unstable",
    "experimental",
];

/// Whether `name` is the codename of a Debian release (one that can have a `-backports` suite):
/// not an alias such as `stable`, not `sid` or `experimental`.
pub fn is_debian_codename(name: &str) -> bool {
    const NOT_RELEASES: &[&str] = &[
        "sid",
        "stable",
        "oldstable",
        "oldoldstable",
        "testing",
        "unstable",
        "experimental",
    ];
    DEBIAN_SUITES.contains(&name) && !NOT_RELEASES.contains(&name)
}

/// Errors of the private apt configuration and of package fetching.
#[derive(Debug, Error)]
pub enum AptError {
    /// No Debian archive entry was found in the system's apt sources.
    #[error(
        "no Debian archive mirror found in the system's apt sources ({searched}); \
         set {MIRROR_ENV} to a Debian mirror URI"
    )]
    NoMirror {
        /// The files that were read.
        searched: String,
    },
    /// A file or directory of the private configuration could not be written or read.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A path cannot be written into an apt configuration file.
    #[error("path {} cannot be used in an apt configuration (contains a quote or newline)", .0.display())]
    BadPath(PathBuf),
    /// The archive keyring is missing.
    #[error("Debian archive keyring {DEBIAN_KEYRING} is missing: install the debian-archive-keyring package")]
    NoKeyring,
    /// `apt-get update` on the private configuration failed.
    #[error("cannot fetch the Debian {suites} package lists from {mirrors}: {source}; check network access to the mirror, or set {MIRROR_ENV}")]
    Update {
        /// The suites.
        suites: String,
        /// The mirrors.
        mirrors: String,
        /// The underlying error.
        #[source]
        source: Box<CommandError>,
    },
    /// An apt or dpkg command failed.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// A package is not in a suite's index.
    #[error("package {package} not found in Debian {suite} (private apt lists in {})", lists.display())]
    NotFound {
        /// The package.
        package: String,
        /// The suite.
        suite: String,
        /// The private lists directory.
        lists: PathBuf,
    },
    /// A package's index entry lacks a field we need or has an unexpected shape.
    #[error("package {package} in Debian {suite}: {problem}")]
    BadEntry {
        /// The package.
        package: String,
        /// The suite.
        suite: String,
        /// What is wrong.
        problem: String,
    },
    /// A file `apt-get source` left does not match the source package's index entry.
    #[error("source package {package}: {}: {problem}", file.display())]
    SourceFile {
        /// The source package and its version.
        package: String,
        /// The file.
        file: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// `apt-get download` succeeded but left no .deb file.
    #[error("apt-get download of {package} {version} left no .deb file in {}", dir.display())]
    NoDeb {
        /// The package.
        package: String,
        /// The version.
        version: String,
        /// The download directory.
        dir: PathBuf,
    },
}

/// One entry of an apt sources file (one `deb` line, or one deb822 paragraph).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AptSource {
    /// `deb`, `deb-src`.
    pub types: Vec<String>,
    /// Archive URIs.
    pub uris: Vec<String>,
    /// Suites (codenames, with suffixes such as `-updates`).
    pub suites: Vec<String>,
    /// Components (`main`, `contrib`, ...).
    pub components: Vec<String>,
    /// Whether the entry is enabled (`Enabled: no` disables a deb822 paragraph).
    pub enabled: bool,
}

/// Parses a deb822 `.sources` file. Comment lines start with `#`; paragraphs are separated by
/// blank lines; field names are case-insensitive; continuation lines start with whitespace.
pub fn parse_deb822(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    let mut fields: Vec<(String, String)> = Vec::new();
    let flush = |fields: &mut Vec<(String, String)>, out: &mut Vec<AptSource>| {
        if fields.is_empty() {
            return;
        }
        let get = |name: &str| -> Vec<String> {
            fields
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .flat_map(|(_, v)| v.split_whitespace().map(str::to_string))
                .collect()
        };
        let enabled = get("Enabled")
            .first()
            .map(|v| !v.eq_ignore_ascii_case("no"))
            .unwrap_or(true);
        let src = AptSource {
            types: get("Types"),
            uris: get("URIs"),
            suites: get("Suites"),
            components: get("Components"),
            enabled,
        };
        if !src.types.is_empty() && !src.uris.is_empty() {
            out.push(src);
        }
        fields.clear();
    };
    for raw in text.lines() {
        if raw.trim_start().starts_with('#') {
            continue;
        }
        if raw.trim().is_empty() {
            flush(&mut fields, &mut out);
            continue;
        }
        if raw.starts_with(' ') || raw.starts_with('\t') {
            if let Some(last) = fields.last_mut() {
                last.1.push(' ');
                last.1.push_str(raw.trim());
            }
            continue;
        }
        if let Some((k, v)) = raw.split_once(':') {
            fields.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    flush(&mut fields, &mut out);
    out
}

/// Parses a one-line-format `sources.list` (`deb [options] URI suite [component...]`).
pub fn parse_one_line(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    for raw in text.lines() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let (ty, rest) = match line.split_once(char::is_whitespace) {
            Some(x) => x,
            None => continue,
        };
        if ty != "deb" && ty != "deb-src" {
            continue;
        }
        let mut rest = rest.trim_start();
        if rest.starts_with('[') {
            match rest.find(']') {
                Some(end) => rest = rest[end + 1..].trim_start(),
                None => continue,
            }
        }
        let mut words = rest.split_whitespace();
        let (uri, suite) = match (words.next(), words.next()) {
            (Some(u), Some(s)) => (u, s),
            _ => continue,
        };
        out.push(AptSource {
            types: vec![ty.to_string()],
            uris: vec![uri.to_string()],
            suites: vec![suite.to_string()],
            components: words.map(str::to_string).collect(),
            enabled: true,
        });
    }
    out
}

/// Whether `suite` names a (non-security) suite of the Debian archive.
fn is_debian_archive_suite(suite: &str) -> bool {
    let base = suite.trim_end_matches('/');
    if base.ends_with("-security") || base.contains("/updates") {
        return false;
    }
    let base = base.split('-').next().unwrap_or(base);
    DEBIAN_SUITES.contains(&base)
}

/// Picks the URIs of the main Debian archive out of parsed sources: enabled binary (`deb`)
/// entries whose suites are Debian codenames, not the security archive; deduplicated, in order.
pub fn debian_mirrors(sources: &[AptSource]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in sources {
        if !s.enabled || !s.types.iter().any(|t| t == "deb") {
            continue;
        }
        if !s.suites.iter().any(|x| is_debian_archive_suite(x)) {
            continue;
        }
        for uri in &s.uris {
            let u = uri.trim_end_matches('/');
            if u.contains("debian-security") || u.starts_with("cdrom:") {
                continue;
            }
            if !out.iter().any(|o| o == u) {
                out.push(u.to_string());
            }
        }
    }
    out
}

/// Reads the system's apt sources (`/etc/apt/sources.list`, `/etc/apt/sources.list.d/*.list`
/// and `*.sources`) and returns the Debian archive mirror URIs. `GATEVM_DEBIAN_MIRROR`, when set,
/// wins.
pub fn system_debian_mirrors() -> Result<Vec<String>, AptError> {
    if let Some(m) = std::env::var_os(MIRROR_ENV) {
        let m = m.to_string_lossy().trim().trim_end_matches('/').to_string();
        if !m.is_empty() {
            return Ok(vec![m]);
        }
    }
    let etc = Path::new("/etc/apt");
    let mut searched = Vec::new();
    let mut sources = Vec::new();
    let main = etc.join("sources.list");
    if let Ok(text) = std::fs::read_to_string(&main) {
        sources.extend(parse_one_line(&text));
    }
    searched.push(main.display().to_string());
    let parts = etc.join("sources.list.d");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&parts)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    names.sort();
    for p in names {
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
        let Ok(text) = std::fs::read_to_string(&p) else {
            continue;
        };
        match ext {
            "list" => sources.extend(parse_one_line(&text)),
            "sources" => sources.extend(parse_deb822(&text)),
            _ => continue,
        }
    }
    searched.push(format!("{}/*.list, *.sources", parts.display()));
    let mirrors = debian_mirrors(&sources);
    if mirrors.is_empty() {
        return Err(AptError::NoMirror {
            searched: searched.join(", "),
        });
    }
    Ok(mirrors)
}

/// A package's entry in a suite's index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageEntry {
    /// Package name.
    pub package: String,
    /// Version.
    pub version: String,
    /// Names of the packages in `Depends` (alternatives flattened, version constraints dropped).
    pub depends: Vec<String>,
    /// SHA256 of the .deb as the index states it.
    pub sha256: Option<String>,
}

/// Parses the first stanza of `apt-cache show` output.
pub(crate) fn parse_show(text: &str) -> Option<PackageEntry> {
    let stanza = text.split("\n\n").find(|s| !s.trim().is_empty())?;
    let mut package = None;
    let mut version = None;
    let mut depends = Vec::new();
    let mut sha256 = None;
    for line in stanza.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        if line.starts_with(' ') {
            continue;
        }
        let v = v.trim();
        match k {
            "Package" => package = Some(v.to_string()),
            "Version" => version = Some(v.to_string()),
            "SHA256" => sha256 = Some(v.to_string()),
            "Depends" | "Pre-Depends" => {
                for alt in v.split([',', '|']) {
                    let name = alt.split_whitespace().next().unwrap_or("");
                    let name = name.split(':').next().unwrap_or(name);
                    if !name.is_empty() && !depends.iter().any(|d| d == name) {
                        depends.push(name.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    Some(PackageEntry {
        package: package?,
        version: version?,
        depends,
        sha256,
    })
}

/// One file of a source package, as its `Sources` index entry lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    /// File name (no directory part).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the contents, hex.
    pub sha256: String,
}

/// A source package's entry in a suite's `Sources` index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceEntry {
    /// Source package name.
    pub package: String,
    /// Version.
    pub version: String,
    /// Its files (`.dsc`, tarballs), from `Checksums-Sha256`.
    pub files: Vec<SourceFile>,
}

/// Whether `name` is a bare file name that is safe to join to a directory.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && !name.starts_with('.')
}

/// Parses `Sources` stanzas (as `apt-cache showsrc` prints them). Stanzas without a package or
/// version, and `Extra-Source-Only: yes` ones (kept in the archive only because other packages
/// were built from them), are left out; so are file lines that do not name a plain file.
pub fn parse_sources(text: &str) -> Vec<SourceEntry> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let mut package = None;
        let mut version = None;
        let mut extra_only = false;
        let mut files = Vec::new();
        let mut field = String::new();
        for line in stanza.lines() {
            if line.starts_with(' ') || line.starts_with('\t') {
                if field.eq_ignore_ascii_case("Checksums-Sha256") {
                    let words: Vec<&str> = line.split_whitespace().collect();
                    if let [sha256, size, name] = words[..] {
                        if let (Ok(size), true) = (size.parse(), is_plain_file_name(name)) {
                            files.push(SourceFile {
                                name: name.to_string(),
                                size,
                                sha256: sha256.to_ascii_lowercase(),
                            });
                        }
                    }
                }
                continue;
            }
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            field = k.trim().to_string();
            let v = v.trim();
            match field.as_str() {
                "Package" => package = Some(v.to_string()),
                "Version" => version = Some(v.to_string()),
                "Extra-Source-Only" => extra_only = v.eq_ignore_ascii_case("yes"),
                _ => {}
            }
        }
        if let (Some(package), Some(version), false) = (package, version, extra_only) {
            out.push(SourceEntry {
                package,
                version,
                files,
            });
        }
    }
    out
}

/// The entry of source package `package` with the highest version among `entries`.
pub fn select_source(entries: &[SourceEntry], package: &str) -> Option<SourceEntry> {
    entries
        .iter()
        .filter(|e| e.package == package)
        .max_by(|a, b| compare_versions(&a.version, &b.version))
        .cloned()
}

/// Orders two Debian version strings as dpkg does (`[epoch:]upstream[-revision]`, `~` sorting
/// before everything, letters before other characters, digit runs compared as numbers).
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    fn split(v: &str) -> (u64, &str, &str) {
        let (epoch, rest) = match v.split_once(':') {
            Some((e, r)) if !e.is_empty() && e.bytes().all(|c| c.is_ascii_digit()) => {
                (e.parse().unwrap_or(u64::MAX), r)
            }
            _ => (0, v),
        };
        match rest.rsplit_once('-') {
            Some((up, rev)) => (epoch, up, rev),
            None => (epoch, rest, ""),
        }
    }
    fn order(c: u8) -> i32 {
        match c {
            0 => 0,
            b'~' => -1,
            c if c.is_ascii_digit() => 0,
            c if c.is_ascii_alphabetic() => i32::from(c),
            c => i32::from(c) + 256,
        }
    }
    fn part(a: &str, b: &str) -> Ordering {
        let (a, b) = (a.as_bytes(), b.as_bytes());
        let at = |i: usize| a.get(i).copied().unwrap_or(0);
        let bt = |j: usize| b.get(j).copied().unwrap_or(0);
        let (mut i, mut j) = (0, 0);
        while i < a.len() || j < b.len() {
            while (i < a.len() && !at(i).is_ascii_digit())
                || (j < b.len() && !bt(j).is_ascii_digit())
            {
                let (ac, bc) = (order(at(i)), order(bt(j)));
                if ac != bc {
                    return ac.cmp(&bc);
                }
                i += 1;
                j += 1;
            }
            while at(i) == b'0' {
                i += 1;
            }
            while bt(j) == b'0' {
                j += 1;
            }
            let mut first_diff = Ordering::Equal;
            while at(i).is_ascii_digit() && bt(j).is_ascii_digit() {
                if first_diff == Ordering::Equal {
                    first_diff = at(i).cmp(&bt(j));
                }
                i += 1;
                j += 1;
            }
            if at(i).is_ascii_digit() {
                return Ordering::Greater;
            }
            if bt(j).is_ascii_digit() {
                return Ordering::Less;
            }
            if first_diff != Ordering::Equal {
                return first_diff;
            }
        }
        Ordering::Equal
    }
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb)
        .then_with(|| part(ua, ub))
        .then_with(|| part(ra, rb))
}

/// Which indexes a [`PrivateApt`] configuration fetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexKind {
    /// Binary packages: `deb` entries, `Packages` indexes.
    Binary,
    /// Source packages: `deb-src` entries, `Sources` indexes.
    Source,
}

/// The sources.list line for `suite` on `mirror`: component main, only `kind`'s indexes, signed
/// by the Debian archive keyring.
pub fn source_line(kind: IndexKind, mirror: &str, suite: &str) -> String {
    let (ty, target) = match kind {
        IndexKind::Binary => ("deb", "Packages"),
        IndexKind::Source => ("deb-src", "Sources"),
    };
    format!("{ty} [signed-by={DEBIAN_KEYRING} target={target}] {mirror} {suite} main")
}

/// A private apt configuration rooted in a directory of its own.
#[derive(Debug, Clone)]
pub struct PrivateApt {
    root: PathBuf,
    mirrors: Vec<String>,
    suites: Vec<String>,
    kind: IndexKind,
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> AptError {
    let path = path.to_path_buf();
    move |source| AptError::Io {
        action,
        path,
        source,
    }
}

fn conf_path(p: &Path) -> Result<String, AptError> {
    let s = p.to_string_lossy();
    if s.contains('"') || s.contains('\n') {
        return Err(AptError::BadPath(p.to_path_buf()));
    }
    Ok(s.into_owned())
}

impl PrivateApt {
    /// Writes (or rewrites) the configuration under `root`: `sources.list` with one `deb` line per
    /// mirror and suite (component main, Packages indexes only, signed by the Debian archive
    /// keyring), `apt.conf` pointing apt's state, cache and source parts into `root`, an empty
    /// dpkg status and an empty parts directory.
    pub fn new(root: &Path, mirrors: &[String], suites: &[&str]) -> Result<Self, AptError> {
        Self::with_kind(root, mirrors, suites, IndexKind::Binary)
    }

    /// Like [`PrivateApt::new`], for `kind`'s indexes: [`IndexKind::Source`] writes `deb-src`
    /// lines (Sources indexes only) instead.
    pub fn with_kind(
        root: &Path,
        mirrors: &[String],
        suites: &[&str],
        kind: IndexKind,
    ) -> Result<Self, AptError> {
        if !Path::new(DEBIAN_KEYRING).exists() {
            return Err(AptError::NoKeyring);
        }
        for d in [
            root.to_path_buf(),
            root.join("parts"),
            root.join("state/lists/partial"),
            root.join("cache/archives/partial"),
        ] {
            std::fs::create_dir_all(&d).map_err(io_err("cannot create", &d))?;
        }
        let mut list = String::from(match kind {
            IndexKind::Binary => "# generated by gatevm: Debian suites newer than the host's\n",
            IndexKind::Source => "# generated by gatevm: Debian source packages gatevm builds\n",
        });
        for m in mirrors {
            for s in suites {
                let _ = writeln!(list, "{}", source_line(kind, m, s));
            }
        }
        let list_path = root.join("sources.list");
        if write_if_changed(&list_path, &list)? {
            // Indexes fetched for other sources would make `lists_complete` true after an update
            // that failed for the new ones; drop them (apt would on its next good update anyway).
            clear_lists(&root.join("state/lists"))?;
        }
        let status = root.join("state/status");
        if !status.exists() {
            std::fs::write(&status, "").map_err(io_err("cannot write", &status))?;
        }
        let conf = format!(
            "// generated by gatevm: a private apt configuration (see sources.list beside it)\n\
             Dir::Etc::SourceList \"{list}\";\n\
             Dir::Etc::SourceParts \"{parts}\";\n\
             Dir::Etc::Preferences \"/dev/null\";\n\
             Dir::Etc::PreferencesParts \"{parts}\";\n\
             Dir::State \"{state}\";\n\
             Dir::State::status \"{status}\";\n\
             Dir::Cache \"{cache}\";\n\
             Dir::Cache::pkgcache \"pkgcache.bin\";\n\
             Dir::Cache::srcpkgcache \"\";\n\
             Acquire::Languages \"none\";\n\
             Acquire::Retries \"3\";\n\
             APT::Sandbox::User \"root\";\n\
             APT::Get::AllowUnauthenticated \"false\";\n\
             #clear APT::Update::Pre-Invoke;\n\
             #clear APT::Update::Post-Invoke;\n\
             #clear APT::Update::Post-Invoke-Success;\n\
             #clear DPkg::Pre-Invoke;\n\
             #clear DPkg::Post-Invoke;\n",
            list = conf_path(&list_path)?,
            parts = conf_path(&root.join("parts"))?,
            state = conf_path(&root.join("state"))?,
            status = conf_path(&status)?,
            cache = conf_path(&root.join("cache"))?,
        );
        write_if_changed(&root.join("apt.conf"), &conf)?;
        Ok(PrivateApt {
            root: root.to_path_buf(),
            mirrors: mirrors.to_vec(),
            suites: suites.iter().map(|s| s.to_string()).collect(),
            kind,
        })
    }

    /// The directory the configuration lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The mirrors in the sources list.
    pub fn mirrors(&self) -> &[String] {
        &self.mirrors
    }

    /// The suites in the sources list.
    pub fn suites(&self) -> &[String] {
        &self.suites
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.arg("-c")
            .arg(self.root.join("apt.conf"))
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("LC_ALL", "C.UTF-8");
        c
    }

    /// Runs `apt-get update` on the private configuration, retrying twice with a pause on
    /// failure (mirrors sync, networks hiccup).
    pub fn update(&self, log: &Path) -> Result<(), AptError> {
        let mut attempt = 0u64;
        loop {
            let mut c = self.command("apt-get");
            c.args(["-q", "update"]);
            let err = match cmd::run_logged(&mut c, log) {
                // apt-get update exits 0 on some fetch failures ("W: Failed to fetch"); make sure
                // each suite's index is really there.
                Ok(()) if self.lists_complete() => return Ok(()),
                Ok(()) => CommandError::Failed {
                    command: cmd::describe(&c),
                    status: "exit code 0, but package indexes are missing".into(),
                    stderr_tail: cmd::log_tail(log, &["E:", "W:", "Err:"], 4),
                    log: Some(log.to_path_buf()),
                },
                Err(e) => e,
            };
            attempt += 1;
            if attempt >= 3 {
                return Err(AptError::Update {
                    suites: self.suites.join(", "),
                    mirrors: self.mirrors.join(", "),
                    source: Box::new(err),
                });
            }
            std::thread::sleep(Duration::from_secs(2 * attempt));
        }
    }

    /// Whether every suite's package index has been downloaded (by an earlier `update`).
    pub fn lists_complete(&self) -> bool {
        let lists = self.root.join("state/lists");
        let names: Vec<String> = std::fs::read_dir(&lists)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        self.suites.iter().all(|s| {
            let (needle, index) = match self.kind {
                IndexKind::Binary => (format!("_dists_{s}_main_binary-"), "_Packages"),
                IndexKind::Source => (format!("_dists_{s}_main_source_"), "_Sources"),
            };
            names
                .iter()
                .any(|n| n.contains(&needle) && n.contains(index))
        })
    }

    /// Looks a package up in one suite (`apt-cache show pkg/suite`).
    pub fn show(&self, package: &str, suite: &str) -> Result<PackageEntry, AptError> {
        let mut c = self.command("apt-cache");
        c.args(["show", "--no-all-versions", &format!("{package}/{suite}")]);
        let not_found = || AptError::NotFound {
            package: package.to_string(),
            suite: suite.to_string(),
            lists: self.root.join("state/lists"),
        };
        let out = match cmd::run_captured(&mut c) {
            Ok(o) => o,
            Err(CommandError::Failed { .. }) => return Err(not_found()),
            Err(e) => return Err(e.into()),
        };
        parse_show(&String::from_utf8_lossy(&out.stdout)).ok_or_else(not_found)
    }

    /// Downloads `package` at exactly `version` into `dir` (which should be empty) and returns the
    /// .deb's path; retries twice on failure. apt checks the file against the signed index.
    pub fn download(
        &self,
        package: &str,
        version: &str,
        dir: &Path,
        log: &Path,
    ) -> Result<PathBuf, AptError> {
        std::fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
        self.run_retrying(dir, &["download", &format!("{package}={version}")], log)?;
        let prefix = format!("{package}_");
        let found = std::fs::read_dir(dir)
            .map_err(io_err("cannot read", dir))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                n.starts_with(&prefix) && n.ends_with(".deb")
            });
        found.ok_or_else(|| AptError::NoDeb {
            package: package.to_string(),
            version: version.to_string(),
            dir: dir.to_path_buf(),
        })
    }

    /// Runs `apt-get -q <args>` in `dir`, retrying twice with a pause on failure.
    fn run_retrying(&self, dir: &Path, args: &[&str], log: &Path) -> Result<(), AptError> {
        let mut attempt = 0u64;
        loop {
            let mut c = self.command("apt-get");
            c.current_dir(dir).arg("-q").args(args);
            match cmd::run_logged(&mut c, log) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    attempt += 1;
                    if attempt >= 3 {
                        return Err(e.into());
                    }
                    std::thread::sleep(Duration::from_secs(2 * attempt));
                }
            }
        }
    }

    /// Looks source package `package` up in the `Sources` indexes of a configuration made with
    /// [`IndexKind::Source`] (`apt-cache showsrc --only-source`); the highest version when they
    /// list several.
    pub fn showsrc(&self, package: &str) -> Result<SourceEntry, AptError> {
        let mut c = self.command("apt-cache");
        c.args(["showsrc", "--only-source", package]);
        let not_found = || AptError::NotFound {
            package: format!("source package {package}"),
            suite: self.suites.join(", "),
            lists: self.root.join("state/lists"),
        };
        let out = match cmd::run_captured(&mut c) {
            Ok(o) => o,
            Err(CommandError::Failed { .. }) => return Err(not_found()),
            Err(e) => return Err(e.into()),
        };
        let entries = parse_sources(&String::from_utf8_lossy(&out.stdout));
        select_source(&entries, package).ok_or_else(not_found)
    }

    /// Downloads the tarballs of source package `entry` into `dir` (which should be empty) with
    /// `apt-get source --download-only` (apt checks each file against the signed index; no
    /// dpkg-dev needed) and checks every file it left against the entry's SHA-256 too. Returns
    /// their paths, sorted.
    ///
    /// Only the tarballs are fetched (`--tar-only`, then `--diff-only` for the Debian tarball):
    /// the `.dsc` adds nothing the signed index does not already vouch for, the build does not
    /// read it, and some mirrors serve the pool only in part.
    pub fn download_source(
        &self,
        entry: &SourceEntry,
        dir: &Path,
        log: &Path,
    ) -> Result<Vec<PathBuf>, AptError> {
        std::fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
        let spec = format!("{}={}", entry.package, entry.version);
        for only in ["--tar-only", "--diff-only"] {
            let args = ["source", "--download-only", "--only-source", only, &spec];
            self.run_retrying(dir, &args, log)?;
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io_err("cannot read", dir))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        let problem = |file: &Path, problem: String| AptError::SourceFile {
            package: format!("{} {}", entry.package, entry.version),
            file: file.to_path_buf(),
            problem,
        };
        for f in &files {
            let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
            let listed = entry
                .files
                .iter()
                .find(|s| Some(&s.name) == name.as_ref())
                .ok_or_else(|| problem(f, "not listed in the Sources index".into()))?;
            let actual = util::sha256_file(f).map_err(io_err("cannot hash", f))?;
            if actual != listed.sha256 {
                return Err(problem(
                    f,
                    format!(
                        "SHA-256 {actual} differs from the index's {}",
                        listed.sha256
                    ),
                ));
            }
        }
        if files.is_empty() {
            return Err(problem(dir, "apt-get source left no files".into()));
        }
        Ok(files)
    }
}

/// Writes `content` unless the file holds it already; returns whether it wrote.
fn write_if_changed(path: &Path, content: &str) -> Result<bool, AptError> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(content) {
        return Ok(false);
    }
    std::fs::write(path, content).map_err(io_err("cannot write", path))?;
    Ok(true)
}

/// Removes the downloaded indexes (`*_dists_*` files) from an apt lists directory.
fn clear_lists(lists: &Path) -> Result<(), AptError> {
    let rd = std::fs::read_dir(lists).map_err(io_err("cannot read", lists))?;
    for e in rd.filter_map(|e| e.ok()) {
        let name = e.file_name();
        if name.to_string_lossy().contains("_dists_") && e.path().is_file() {
            std::fs::remove_file(e.path()).map_err(io_err("cannot remove", &e.path()))?;
        }
    }
    Ok(())
}

/// Unpacks a .deb's files into `dest` with `dpkg-deb -x`.
pub fn unpack_deb(deb: &Path, dest: &Path, log: &Path) -> Result<(), AptError> {
    std::fs::create_dir_all(dest).map_err(io_err("cannot create", dest))?;
    let mut c = Command::new("dpkg-deb");
    c.arg("-x").arg(deb).arg(dest);
    cmd::run_logged(&mut c, log)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEB822: &str = "\
Types: deb
# http://snapshot.example/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb deb-src
URIs: http://other.example/apt
Suites: nodistro
Components: main

Types: deb
uris: http://second.example/debian/
 http://third.example/debian
suites: trixie
enabled: yes

Types: deb
URIs: http://disabled.example/debian
Suites: sid
Enabled: no
";

    #[test]
    fn deb822_parsing() {
        let s = parse_deb822(DEB822);
        assert_eq!(s.len(), 5);
        assert_eq!(s[0].suites, vec!["bookworm", "bookworm-updates"]);
        assert_eq!(s[0].uris, vec!["http://mirror.example/debian"]);
        assert_eq!(s[2].types, vec!["deb", "deb-src"]);
        assert_eq!(
            s[3].uris,
            vec![
                "http://second.example/debian/",
                "http://third.example/debian"
            ]
        );
        assert!(!s[4].enabled);
        assert_eq!(
            debian_mirrors(&s),
            vec![
                "http://mirror.example/debian",
                "http://second.example/debian",
                "http://third.example/debian"
            ]
        );
    }

    #[test]
    fn one_line_parsing() {
        let text = "\
# comment
deb http://mirror.example/debian bookworm main contrib # trailing
deb-src http://mirror.example/debian bookworm main
deb [arch=amd64 signed-by=/k.gpg] http://opts.example/debian bookworm-updates main
deb http://security.example/debian-security bookworm-security main
deb http://mirror.example/debian-security bookworm/updates main
deb [signed-by=/x.gpg] https://vendor.example/apt cloud-sdk-bookworm main
deb http://mirror.example/debian bookworm-backports main
deb [broken
garbage line
";
        let s = parse_one_line(text);
        assert_eq!(s.len(), 7);
        assert_eq!(s[0].components, vec!["main", "contrib"]);
        assert_eq!(s[2].uris, vec!["http://opts.example/debian"]);
        assert_eq!(
            debian_mirrors(&s),
            vec!["http://mirror.example/debian", "http://opts.example/debian"]
        );
    }

    #[test]
    fn suites() {
        assert!(is_debian_archive_suite("bookworm"));
        assert!(is_debian_archive_suite("bookworm-updates"));
        assert!(is_debian_archive_suite("stable"));
        assert!(!is_debian_archive_suite("bookworm-security"));
        assert!(!is_debian_archive_suite("cloud-sdk-bookworm"));
        assert!(!is_debian_archive_suite("nodistro"));
        assert!(!is_debian_archive_suite("jammy"));
        assert!(is_debian_codename("bookworm"));
        assert!(is_debian_codename("bullseye"));
        assert!(!is_debian_codename("sid"));
        assert!(!is_debian_codename("stable"));
        assert!(!is_debian_codename("noble"));
        assert!(!is_debian_codename("bookworm-backports"));
    }

    #[test]
    fn changed_sources_drop_old_indexes() {
        if !Path::new(DEBIAN_KEYRING).exists() {
            eprintln!("SKIPPED changed_sources_drop_old_indexes: no {DEBIAN_KEYRING}");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("apt");
        let a = PrivateApt::new(&root, &["http://one.example/debian".into()], &["trixie"]).unwrap();
        let lists = root.join("state/lists");
        let index = lists.join("one.example_debian_dists_trixie_main_binary-amd64_Packages");
        std::fs::write(&index, "").unwrap();
        std::fs::write(lists.join("lock"), "").unwrap();
        assert!(a.lists_complete());
        // Same sources: the index stays.
        let a = PrivateApt::new(&root, &["http://one.example/debian".into()], &["trixie"]).unwrap();
        assert!(a.lists_complete());
        // Another mirror: the old index must not count as this one's.
        let a = PrivateApt::new(&root, &["http://two.example/debian".into()], &["trixie"]).unwrap();
        assert!(!a.lists_complete());
        assert!(!index.exists());
        assert!(lists.join("lock").exists());
        assert!(lists.join("partial").is_dir());
    }

    #[test]
    fn show_parsing() {
        let text = "Package: linux-image-cloud-amd64\nSource: linux-signed-amd64 (6.12.107+1)\n\
Version: 6.12.107-1\nDepends: linux-image-6.12.107+deb13-cloud-amd64 (= 6.12.107-1), a | b:any (>= 1)\n\
Description: x\n multi: line\nSHA256: abc\n\nPackage: other\nVersion: 1\n";
        let e = parse_show(text).unwrap();
        assert_eq!(e.package, "linux-image-cloud-amd64");
        assert_eq!(e.version, "6.12.107-1");
        assert_eq!(
            e.depends,
            vec!["linux-image-6.12.107+deb13-cloud-amd64", "a", "b"]
        );
        assert_eq!(e.sha256.as_deref(), Some("abc"));
        assert!(parse_show("").is_none());
        assert!(parse_show("Package: x\n").is_none());
    }

    /// `apt-cache showsrc --only-source passt` output: trixie's entry, an older
    /// `Extra-Source-Only` one with a higher version (must be ignored), a second mirror's copy.
    const SHOWSRC: &str = "\
Package: passt
Binary: passt
Version: 0.0~git20250503.587980c-2+deb13u1
Maintainer: Someone <someone@example.org>
Format: 3.0 (quilt)
Files:
 4cfc703735498412f3b64071ecc02555 1975 passt_0.0~git20250503.587980c-2+deb13u1.dsc
Checksums-Sha256:
 4edfbb2bf4d12db992af4b2f82cde87140d01ace3c9c55d93afd61d23034a8b4 1975 passt_0.0~git20250503.587980c-2+deb13u1.dsc
 69D5EB843F7D648C2CC60BFBCA6EA7B5014C6B6F07CDEE362C2A8CF490515A49 261392 passt_0.0~git20250503.587980c.orig.tar.xz
 f8d9fdfc1ba89e7dde48705ae68d1dfa8a40477cb85184d41194487f2902b77d 9192 passt_0.0~git20250503.587980c-2+deb13u1.debian.tar.xz
 0000 1 ../escape.tar.xz
Directory: pool/main/p/passt

Package: passt
Version: 1:9.0-1
Extra-Source-Only: yes
Checksums-Sha256:
 aa 1 passt_9.0-1.dsc

Package: passt
Version: 0.0~git20250217.a1e48a0-1
Checksums-Sha256:
 bb 1 passt_0.0~git20250217.a1e48a0-1.dsc

Package: passt-other
Version: 99
";

    #[test]
    fn source_selection() {
        let entries = parse_sources(SHOWSRC);
        assert_eq!(entries.len(), 3, "{entries:?}");
        let e = select_source(&entries, "passt").unwrap();
        assert_eq!(e.version, "0.0~git20250503.587980c-2+deb13u1");
        let names: Vec<&str> = e.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "passt_0.0~git20250503.587980c-2+deb13u1.dsc",
                "passt_0.0~git20250503.587980c.orig.tar.xz",
                "passt_0.0~git20250503.587980c-2+deb13u1.debian.tar.xz",
            ]
        );
        assert_eq!(e.files[1].size, 261392);
        assert_eq!(
            e.files[1].sha256,
            "69d5eb843f7d648c2cc60bfbca6ea7b5014c6b6f07cdee362c2a8cf490515a49"
        );
        assert_eq!(
            select_source(&entries, "passt-other").unwrap().version,
            "99"
        );
        assert!(select_source(&entries, "pass").is_none());
        assert!(parse_sources("").is_empty());
        assert!(parse_sources("Package: x\n").is_empty());
    }

    #[test]
    fn debian_version_order() {
        use Ordering::*;
        for (a, b, want) in [
            ("1.0", "1.0", Equal),
            ("1.0", "1.1", Less),
            ("1.10", "1.9", Greater),
            ("1.0~rc1", "1.0", Less),
            ("1.0~~", "1.0~", Less),
            ("1.0", "1.0+b1", Less),
            ("1.0a", "1.0+", Less),
            ("1:0.1", "2.0", Greater),
            ("0:1.0", "1.0", Equal),
            ("1.0-1", "1.0-2", Less),
            ("1.0-10", "1.0-9", Greater),
            ("1.001", "1.1", Equal),
            ("1.0", "1.0-0", Equal),
            (
                "0.0~git20250503.587980c-2+deb13u1",
                "0.0~git20250503.587980c-2",
                Greater,
            ),
            (
                "0.0~git20250503.587980c-2",
                "0.0~git20250217.a1e48a0-1",
                Greater,
            ),
            ("0.0~git20230309.7c7625d-1", "0.0", Less),
            ("1.2-3-4", "1.2-3-5", Less),
        ] {
            assert_eq!(compare_versions(a, b), want, "{a} vs {b}");
            assert_eq!(compare_versions(b, a), want.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn deb_src_line() {
        assert_eq!(
            source_line(IndexKind::Source, "http://mirror.example/debian", "trixie"),
            format!(
                "deb-src [signed-by={DEBIAN_KEYRING} target=Sources] \
                 http://mirror.example/debian trixie main"
            )
        );
        assert_eq!(
            source_line(IndexKind::Binary, "http://mirror.example/debian", "sid"),
            format!(
                "deb [signed-by={DEBIAN_KEYRING} target=Packages] http://mirror.example/debian sid main"
            )
        );
        // The lines parse back as what they say.
        let s = parse_one_line(&source_line(
            IndexKind::Source,
            "http://m.example/debian",
            "trixie",
        ));
        assert_eq!(s[0].types, vec!["deb-src"]);
        assert_eq!(s[0].suites, vec!["trixie"]);
        assert_eq!(s[0].components, vec!["main"]);
    }

    #[test]
    fn source_config_and_lists() {
        if !Path::new(DEBIAN_KEYRING).exists() {
            eprintln!("SKIPPED source_config_and_lists: no {DEBIAN_KEYRING}");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("apt-src");
        let mirrors = ["http://one.example/debian".to_string()];
        let a = PrivateApt::with_kind(&root, &mirrors, &["trixie"], IndexKind::Source).unwrap();
        let list = std::fs::read_to_string(root.join("sources.list")).unwrap();
        let lines: Vec<&str> = list.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            vec![source_line(IndexKind::Source, &mirrors[0], "trixie")]
        );
        assert!(!a.lists_complete());
        let lists = root.join("state/lists");
        // A binary index does not make a source configuration complete, a Sources one does.
        std::fs::write(
            lists.join("one.example_debian_dists_trixie_main_binary-amd64_Packages"),
            "",
        )
        .unwrap();
        assert!(!a.lists_complete());
        std::fs::write(
            lists.join("one.example_debian_dists_trixie_main_source_Sources.lz4"),
            "",
        )
        .unwrap();
        assert!(a.lists_complete());
        // The binary configuration's file is unchanged by the source option.
        let b = tmp.path().join("apt");
        PrivateApt::new(&b, &mirrors, &["trixie"]).unwrap();
        let list = std::fs::read_to_string(b.join("sources.list")).unwrap();
        assert!(list.starts_with("# generated by gatevm: Debian suites newer than the host's\n"));
        assert!(list.contains("\ndeb [signed-by="), "{list}");
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(s in "\\PC*") {
            let _ = parse_deb822(&s);
            let _ = parse_one_line(&s);
            let _ = parse_show(&s);
            let _ = parse_sources(&s);
        }

        #[test]
        fn version_order_is_antisymmetric(a in "[0-9a-z.+~:-]{0,12}", b in "[0-9a-z.+~:-]{0,12}") {
            proptest::prop_assert_eq!(compare_versions(&a, &b), compare_versions(&b, &a).reverse());
            proptest::prop_assert_eq!(compare_versions(&a, &a), Ordering::Equal);
        }
    }
}
