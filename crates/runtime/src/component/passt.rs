//! passt built from Debian trixie's source package.
//!
//! bookworm's passt (0.0~git20230309) leaves inbound port-forwarded connections in SYN_RCVD, and
//! trixie's binary package needs a newer glibc than bookworm has; so setup fetches trixie's
//! source package through a private apt configuration with a `deb-src` entry
//! ([`crate::apt::IndexKind::Source`]), unpacks it as dpkg-source would (orig tarball, Debian
//! tarball, the patches of `debian/patches/series` in order), builds the `passt` binary with the
//! upstream Makefile and checks it, all in a work directory. Installing it is setup's business.

use std::path::{Path, PathBuf};
use std::process::Command;

use gatevm_abi::error_chain;
use thiserror::Error;

use crate::cmd::{self, CommandError};
use crate::error::{io_err, IoError};
use std::time::Instant;

use crate::component::present;
use crate::provenance::{self, component, Component, Provenance};
use crate::setup::{io, Ctx, SetupAction, SetupError, SetupOptions};
use crate::util;

/// The Debian suite whose source package is built.
pub(crate) const PASST_SOURCE_SUITE: &str = "trixie";
/// The source package.
pub(crate) const PASST_SOURCE_PACKAGE: &str = "passt";
/// Where the binary goes, relative to the runtime directory.
pub(crate) const PASST_BIN: &str = "bin/passt";
/// Long options gatevm's passt backend passes; the built binary's `--help` must list each.
pub(crate) const PASST_REQUIRED_FLAGS: &[&str] = &[
    "--foreground",
    "--quiet",
    "--ipv4-only",
    "--fd",
    "--vhost-user",
    "--socket",
    "--address",
    "--netmask",
    "--gateway",
    "--dns-forward",
    "--no-map-gw",
    "--tcp-ports",
    "--udp-ports",
];

/// Errors of building passt from its Debian source package.
#[derive(Debug, Error)]
pub enum PasstError {
    /// The downloaded source package lacks a tarball.
    #[error("source package passt {version} has no {what} (got: {files})")]
    MissingTarball {
        /// The version.
        version: String,
        /// Which tarball.
        what: &'static str,
        /// The files that were downloaded.
        files: String,
    },
    /// A file operation in the work directory failed.
    #[error(transparent)]
    Io(#[from] IoError),
    /// `debian/patches/series` names a patch that cannot be applied as asked.
    #[error("debian/patches/series of passt {version}: {problem}")]
    BadSeries {
        /// The version.
        version: String,
        /// What is wrong.
        problem: String,
    },
    /// Unpacking, patching or compiling failed.
    #[error("building passt {version} failed")]
    Build {
        /// The version.
        version: String,
        /// The failed command.
        #[source]
        source: Box<CommandError>,
    },
    /// The built binary does not run, or lacks an option gatevm uses.
    #[error("built passt at {} does not work: {problem}", path.display())]
    Broken {
        /// The binary.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

/// One patch of a quilt series.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SeriesEntry {
    /// Path of the patch relative to `debian/patches`.
    pub patch: String,
    /// Leading path components to strip (`-pN`; 1 unless given).
    pub strip: u32,
}

/// Parses a quilt `series` file the way dpkg-source reads it: `#` starts a comment (at the start
/// of a line or after white space), blank lines are skipped, a line is a patch path optionally
/// followed by `-pN`. Refuses absolute paths, `..` components and other options.
pub(crate) fn parse_series(text: &str) -> Result<Vec<SeriesEntry>, String> {
    let mut out = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let comment = raw
            .char_indices()
            .find(|&(i, c)| c == '#' && (i == 0 || raw[..i].ends_with(char::is_whitespace)))
            .map(|(i, _)| i);
        let line = &raw[..comment.unwrap_or(raw.len())];
        let mut words = line.split_whitespace();
        let Some(patch) = words.next() else {
            continue;
        };
        let at = || format!("line {}", n + 1);
        if patch.starts_with('/') || patch.split('/').any(|c| c == "..") {
            return Err(format!("{}: unsafe patch path {patch:?}", at()));
        }
        let mut strip = 1;
        for opt in words {
            match opt.strip_prefix("-p").map(str::parse::<u32>) {
                Some(Ok(p)) => strip = p,
                _ => return Err(format!("{}: unsupported option {opt:?} for {patch}", at())),
            }
        }
        out.push(SeriesEntry {
            patch: patch.to_string(),
            strip,
        });
    }
    Ok(out)
}

/// Picks the upstream (`.orig.tar.*`) and Debian (`.debian.tar.*`) tarballs out of a source
/// package's files.
fn tarballs(files: &[PathBuf], version: &str) -> Result<(PathBuf, PathBuf), PasstError> {
    let name = |p: &PathBuf| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let find = |what: &'static str, needle: &str| {
        files
            .iter()
            .find(|p| {
                let n = name(p);
                n.contains(needle) && !n.ends_with(".asc")
            })
            .cloned()
            .ok_or_else(|| PasstError::MissingTarball {
                version: version.to_string(),
                what,
                files: files.iter().map(name).collect::<Vec<_>>().join(", "),
            })
    };
    Ok((
        find("upstream tarball (.orig.tar.*)", ".orig.tar.")?,
        find("Debian tarball (.debian.tar.*)", ".debian.tar.")?,
    ))
}

/// The top directory of an unpacked upstream tarball: its only entry when that is a directory
/// (the usual `passt-<date>.<commit>/`), else `dir` itself.
fn source_root(dir: &Path) -> Result<PathBuf, PasstError> {
    let entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err("cannot read", dir))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .collect();
    match entries.as_slice() {
        [only] if only.is_dir() => Ok(only.clone()),
        _ => Ok(dir.to_path_buf()),
    }
}

/// Unpacks the source package `files` (as [`crate::apt::PrivateApt::download_source`] left them)
/// of passt `version` under `work`, applies the Debian patches, runs `make passt
/// VERSION=<version>` and checks the binary ([`check_binary`]). Returns the binary's path (inside
/// `work`). Every command's output goes to `log`.
pub(crate) fn build_passt(
    work: &Path,
    files: &[PathBuf],
    version: &str,
    log: &Path,
    progress: &dyn Fn(&str),
) -> Result<PathBuf, PasstError> {
    let root = unpack_source(work, files, version, log)?;
    apply_patches(&root, version, log, progress)?;
    progress(&format!(
        "building passt {version} from Debian {PASST_SOURCE_SUITE}'s source package"
    ));
    let mut c = Command::new("make");
    c.current_dir(&root)
        .arg("passt")
        // The Makefile would otherwise ask git for a version; Debian's rules pass its own too.
        .arg(format!("VERSION={version}"));
    cmd::run_logged(&mut c, log).map_err(|e| build_error(version, e))?;
    let bin = root.join("passt");
    check_binary(&bin, version)?;
    Ok(bin)
}

/// A failed command of the build of passt `version`.
fn build_error(version: &str, source: CommandError) -> PasstError {
    PasstError::Build {
        version: version.to_string(),
        source: Box::new(source),
    }
}

/// Unpacks the upstream tarball under `work/src` and the Debian tarball over it (its `debian/`
/// replacing any upstream one, as dpkg-source does for format 3.0); returns the source root.
fn unpack_source(
    work: &Path,
    files: &[PathBuf],
    version: &str,
    log: &Path,
) -> Result<PathBuf, PasstError> {
    let (orig, debian) = tarballs(files, version)?;
    let src = work.join("src");
    std::fs::create_dir_all(&src).map_err(io_err("cannot create", &src))?;
    let untar = |tarball: &Path, into: &Path| {
        let mut c = Command::new("tar");
        c.arg("-xf")
            .arg(tarball)
            .arg("-C")
            .arg(into)
            .arg("--no-same-owner");
        cmd::run_logged(&mut c, log).map_err(|e| build_error(version, e))
    };
    untar(&orig, &src)?;
    let root = source_root(&src)?;
    // As dpkg-source does for format 3.0: the Debian tarball's debian/ replaces any upstream one.
    let upstream_debian = root.join("debian");
    if upstream_debian.exists() {
        std::fs::remove_dir_all(&upstream_debian)
            .map_err(io_err("cannot remove", &upstream_debian))?;
    }
    untar(&debian, &root)?;
    Ok(root)
}

/// Applies the patches `debian/patches/series` lists (none when it is absent) to the source
/// tree at `root`, as dpkg-source does for 3.0 (quilt).
fn apply_patches(
    root: &Path,
    version: &str,
    log: &Path,
    progress: &dyn Fn(&str),
) -> Result<(), PasstError> {
    let patches = root.join("debian/patches");
    let series_path = patches.join("series");
    let series = match std::fs::read_to_string(&series_path) {
        Ok(text) => parse_series(&text).map_err(|problem| PasstError::BadSeries {
            version: version.to_string(),
            problem,
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_err("cannot read", &series_path)(e).into()),
    };
    if !series.is_empty() {
        progress(&format!(
            "applying {} Debian patch(es) to passt {version}",
            series.len()
        ));
    }
    for entry in &series {
        let file = patches.join(&entry.patch);
        if !file.is_file() {
            return Err(PasstError::BadSeries {
                version: version.to_string(),
                problem: format!("patch {} is not in debian/patches", entry.patch),
            });
        }
        // dpkg-source's way for 3.0 (quilt): no fuzz, no backup files.
        let mut c = Command::new("patch");
        c.current_dir(root)
            .arg(format!("-p{}", entry.strip))
            .args([
                "--batch",
                "--forward",
                "--fuzz=0",
                "--no-backup-if-mismatch",
            ])
            .arg("-i")
            .arg(&file);
        cmd::run_logged(&mut c, log).map_err(|e| build_error(version, e))?;
    }
    Ok(())
}

/// Runs `bin --version` and `bin --help` with an unbuffered stdout: the version line must be
/// `passt <version>`, the help must list every option of [`PASST_REQUIRED_FLAGS`].
///
/// This passt prints both with stdio and leaves with `_exit()`, so into a pipe they come out cut
/// short or empty; `stdbuf -o0` (coreutils) makes every write go out at once.
pub(crate) fn check_binary(bin: &Path, version: &str) -> Result<(), PasstError> {
    let broken = |problem: String| PasstError::Broken {
        path: bin.to_path_buf(),
        problem,
    };
    let run = |arg: &str| {
        let mut c = Command::new("stdbuf");
        c.arg("-o0").arg(bin).arg(arg);
        cmd::run_captured(&mut c)
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .map_err(|e| broken(error_chain(&e)))
    };
    let out = run("--version")?;
    let first = out.lines().next().unwrap_or("").trim();
    if first != format!("passt {version}") {
        return Err(broken(format!(
            "--version printed {first:?}, expected \"passt {version}\""
        )));
    }
    let help = run("--help")?;
    let missing = missing_flags(&help);
    if !missing.is_empty() {
        return Err(broken(format!(
            "--help does not list {} (gatevm passes them)",
            missing.join(", ")
        )));
    }
    Ok(())
}

/// The options of [`PASST_REQUIRED_FLAGS`] that `help` does not list.
fn missing_flags(help: &str) -> Vec<&'static str> {
    PASST_REQUIRED_FLAGS
        .iter()
        .copied()
        .filter(|flag| {
            !help
                .split(|c: char| c.is_whitespace() || c == ',')
                .any(|w| w == *flag)
        })
        .collect()
}

/// The `passt` step: passt built from [`PASST_SOURCE_SUITE`]'s source package (see the module
/// docs). Left alone, without network access, when it is recorded and its binary is
/// there; with `refresh`, rebuilt when the suite has another version.
pub(crate) fn ensure(
    ctx: &mut Ctx<'_>,
    opts: &SetupOptions,
    prov: &mut Provenance,
) -> Result<(), SetupError> {
    const C: &str = component::PASST;
    let started = Instant::now();
    (ctx.progress)("checking passt");
    let wrap = |source| SetupError::Apt {
        component: C,
        source,
    };
    let had = prov.component(C).is_some();
    let recorded = prov
        .component(C)
        .filter(|_| present(prov, &ctx.runtime, C))
        .cloned();
    if let (Some(c), false) = (&recorded, opts.refresh) {
        let detail = format!("{} ({})", c.version, c.origin);
        ctx.step(C, SetupAction::AlreadyPresent, detail, started);
        return Ok(());
    }
    let entry = ctx
        .source_apt()
        .and_then(|a| a.showsrc(PASST_SOURCE_PACKAGE))
        .map_err(wrap)?;
    if let Some(c) = recorded.filter(|c| c.version == entry.version) {
        let detail = format!("{} ({}; up to date)", c.version, c.origin);
        ctx.step(C, SetupAction::AlreadyPresent, detail, started);
        return Ok(());
    }

    let work = ctx.work_dir(C)?;
    (ctx.progress)(&format!(
        "downloading source package {PASST_SOURCE_PACKAGE} {} (Debian {PASST_SOURCE_SUITE})",
        entry.version
    ));
    let log = ctx.log.clone();
    let files = ctx
        .source_apt()
        .and_then(|a| a.download_source(&entry, &work.path().join("dl"), &log))
        .map_err(wrap)?;
    let bin = build_passt(
        &work.path().join("build"),
        &files,
        &entry.version,
        &log,
        ctx.progress,
    )?;
    let dest = ctx.runtime.join(PASST_BIN);
    util::copy_atomic(&bin, &dest, 0o755).map_err(io(C, "cannot install", &dest))?;
    let files = provenance::records_for(&ctx.runtime, &[PathBuf::from(PASST_BIN)])?;
    let origin = format!(
        "Debian {PASST_SOURCE_SUITE} source package {PASST_SOURCE_PACKAGE} {} (built with make)",
        entry.version
    );
    ctx.record(
        prov,
        Component::installed_now(C, &entry.version, &origin, files),
        had,
        format!("{} from {origin}", dest.display()),
        started,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_parsing() {
        let text = "\
# leading comment
fix-podman-issue-26073.patch

backports/apparmor-Upgrade-ABI.patch   # why: newer apparmor
  other.patch -p0
name#with-hash.patch
a#b.patch #c # d
";
        let s = parse_series(text).unwrap();
        assert_eq!(
            s,
            vec![
                SeriesEntry {
                    patch: "fix-podman-issue-26073.patch".into(),
                    strip: 1
                },
                SeriesEntry {
                    patch: "backports/apparmor-Upgrade-ABI.patch".into(),
                    strip: 1
                },
                SeriesEntry {
                    patch: "other.patch".into(),
                    strip: 0
                },
                SeriesEntry {
                    patch: "name#with-hash.patch".into(),
                    strip: 1
                },
                SeriesEntry {
                    patch: "a#b.patch".into(),
                    strip: 1
                },
            ]
        );
        assert_eq!(parse_series("").unwrap(), vec![]);
        assert_eq!(parse_series("# only\n\n   \n").unwrap(), vec![]);
    }

    #[test]
    fn series_refuses_unsafe_or_unknown() {
        for bad in [
            "../outside.patch",
            "dir/../../x.patch",
            "/etc/passwd",
            "x.patch -R",
            "x.patch -px",
        ] {
            let e = parse_series(&format!("ok.patch\n{bad}\n")).unwrap_err();
            assert!(e.starts_with("line 2:"), "{bad}: {e}");
        }
    }

    #[test]
    fn tarball_selection() {
        let files: Vec<PathBuf> = [
            "dl/passt_1.0-2.debian.tar.xz",
            "dl/passt_1.0.orig.tar.xz",
            "dl/passt_1.0.orig.tar.xz.asc",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        let (orig, deb) = tarballs(&files, "1.0-2").unwrap();
        assert_eq!(orig, PathBuf::from("dl/passt_1.0.orig.tar.xz"));
        assert_eq!(deb, PathBuf::from("dl/passt_1.0-2.debian.tar.xz"));
        let e = tarballs(&files[..1], "1.0-2").unwrap_err().to_string();
        assert!(e.contains("no upstream tarball"), "{e}");
        assert!(e.contains("passt_1.0-2.debian.tar.xz"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn source_root_is_the_single_top_directory() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("passt-2025_05_03.587980c")).unwrap();
        assert_eq!(
            source_root(tmp.path()).unwrap(),
            tmp.path().join("passt-2025_05_03.587980c")
        );
        std::fs::write(tmp.path().join("Makefile"), "").unwrap();
        assert_eq!(source_root(tmp.path()).unwrap(), tmp.path());
    }

    #[test]
    fn help_flags() {
        let help =
            "Usage: passt [OPTION]...\n  -F, --fd FD\t\tUse FD\n  --no-map-gw\t\tDon't map\n";
        let missing = missing_flags(help);
        assert!(!missing.contains(&"--fd"));
        assert!(!missing.contains(&"--no-map-gw"));
        assert!(missing.contains(&"--udp-ports"));
        // `--no-tcp` is not `--tcp-ports`, `--fdx` is not `--fd`.
        assert!(missing_flags("--fdx --no-tcp").contains(&"--fd"));
        let all = PASST_REQUIRED_FLAGS.join("\n");
        assert!(missing_flags(&all).is_empty());
    }

    proptest::proptest! {
        /// A series file written with comments, blank lines and `-pN` options reads back as
        /// the patches written, in order.
        #[test]
        fn series_round_trips(
            entries in proptest::collection::vec(("[a-z0-9_-]{1,8}(/[a-z0-9_-]{1,12}){0,2}\\.patch", proptest::option::of(0u32..5)), 0..10),
            comments in proptest::collection::vec(proptest::bool::ANY, 10),
        ) {
            let mut text = String::from("# patches, in order\n");
            let mut want = Vec::new();
            for (i, (patch, strip)) in entries.iter().enumerate() {
                match strip {
                    Some(p) => text.push_str(&format!("{patch} -p{p}")),
                    None => text.push_str(patch),
                }
                if comments[i] {
                    text.push_str("   # why #this one\n\n");
                } else {
                    text.push('\n');
                }
                want.push(SeriesEntry { patch: patch.clone(), strip: strip.unwrap_or(1) });
            }
            proptest::prop_assert_eq!(parse_series(&text), Ok(want));
        }

        /// Whatever the text: accepted patches are relative paths without `..`, at most one a
        /// line; a refusal names the line (within the text) on one line.
        #[test]
        fn series_parser_accepts_only_safe_paths(s in "\\PC{0,120}|([a-z./# -]|-p[0-9x]|\n)*") {
            let lines = s.lines().count();
            match parse_series(&s) {
                Ok(entries) => {
                    proptest::prop_assert!(entries.len() <= lines);
                    for e in &entries {
                        proptest::prop_assert!(!e.patch.is_empty() && !e.patch.starts_with('/'), "{:?}", e);
                        proptest::prop_assert!(!e.patch.split('/').any(|c| c == ".."), "{:?}", e);
                        proptest::prop_assert!(!e.patch.contains(char::is_whitespace), "{:?}", e);
                    }
                }
                Err(msg) => {
                    proptest::prop_assert!(!msg.contains('\n'), "{:?}", msg);
                    let n: usize = msg
                        .strip_prefix("line ")
                        .and_then(|r| r.split(':').next())
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                    proptest::prop_assert!(n >= 1 && n <= lines, "{:?} for {} lines", msg, lines);
                }
            }
        }
    }
}
