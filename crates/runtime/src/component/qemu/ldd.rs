//! Why a QEMU binary cannot start: the shared libraries `ldd` (or the dynamic loader) reports
//! missing, and the Debian package that provides each.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Serialize;

use super::choice::binary_version;
use super::{QemuError, QemuVersion};
use crate::cmd::{self, CommandError};

/// A shared library the bundled QEMU cannot find.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MissingLibrary {
    /// The soname, e.g. `libslirp.so.0`.
    pub soname: String,
    /// The Debian package that provides it.
    pub package: String,
    /// Whether `package` is one the QEMU packages depend on (else a guess from the soname).
    pub certain: bool,
}

pub(crate) fn list_missing(m: &[MissingLibrary]) -> String {
    m.iter()
        .map(|l| {
            if l.certain {
                format!("{} (package {})", l.soname, l.package)
            } else {
                format!("{} (probably package {})", l.soname, l.package)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn missing_packages(m: &[MissingLibrary]) -> String {
    let mut p: Vec<&str> = m.iter().map(|l| l.package.as_str()).collect();
    p.sort();
    p.dedup();
    p.join(" ")
}

/// The sonames `ldd` reports as `not found` for `binary` (empty when ldd is missing or fails).
pub(crate) fn missing_libraries(binary: &Path) -> Vec<String> {
    let ldd = cmd::find_program("ldd").unwrap_or_else(|| PathBuf::from("ldd"));
    let out = Command::new(ldd)
        .arg(binary)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    out.map(|o| parse_ldd_not_found(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or_default()
}

/// The sonames in `ldd` output lines of the form `libfoo.so.1 => not found`.
pub(crate) fn parse_ldd_not_found(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for l in text.lines() {
        if let Some((name, rest)) = l.split_once("=>") {
            let name = name.trim();
            if rest.trim() == "not found" && !name.is_empty() && !out.iter().any(|o| o == name) {
                out.push(name.to_string());
            }
        }
    }
    out
}

/// The soname in a dynamic loader error (`error while loading shared libraries: libfoo.so.1:
/// cannot open shared object file`).
pub(crate) fn parse_loader_error(stderr: &str) -> Option<String> {
    let key = "error while loading shared libraries: ";
    let start = stderr.find(key)? + key.len();
    let name = stderr[start..].split(':').next()?.trim();
    (!name.is_empty()).then(|| name.to_string())
}

/// The Debian package that provides soname `soname`: a known exception, else the Debian policy
/// name (`libfoo.so.1` → `libfoo1`, `libfoo3.so.3` → `libfoo3-3`), matched against `depends`
/// (the QEMU packages' dependencies: exact, or the first one that starts with the name, like
/// `libjpeg62-turbo`). The flag tells whether the package is one of `depends`.
pub(crate) fn package_for_soname(soname: &str, depends: &[String]) -> (String, bool) {
    const EXCEPTIONS: &[(&str, &str)] = &[
        ("libz.so.1", "zlib1g"),
        ("libglib-2.0.so.0", "libglib2.0-0"),
        ("libgio-2.0.so.0", "libglib2.0-0"),
        ("libgobject-2.0.so.0", "libglib2.0-0"),
        ("libgmodule-2.0.so.0", "libglib2.0-0"),
        ("libc.so.6", "libc6"),
        ("libm.so.6", "libc6"),
        ("libcrypto.so.3", "libssl3"),
        ("libssl.so.3", "libssl3"),
        ("libgcc_s.so.1", "libgcc-s1"),
        ("libstdc++.so.6", "libstdc++6"),
        ("libjpeg.so.62", "libjpeg62-turbo"),
    ];
    let guess = match EXCEPTIONS.iter().find(|(s, _)| *s == soname) {
        Some((_, p)) => p.to_string(),
        None => match soname.split_once(".so.") {
            Some((name, ver)) => {
                let major = ver.split('.').next().unwrap_or(ver);
                let sep = if name.ends_with(|c: char| c.is_ascii_digit()) {
                    "-"
                } else {
                    ""
                };
                format!("{name}{sep}{major}")
                    .to_ascii_lowercase()
                    .replace('_', "-")
            }
            None => soname.trim_end_matches(".so").to_ascii_lowercase(),
        },
    };
    if depends.contains(&guess) {
        return (guess, true);
    }
    if let Some(d) = depends.iter().find(|d| d.starts_with(&guess)) {
        return (d.clone(), true);
    }
    (guess, false)
}

/// Runs `binary --version` and checks the answer; a binary that cannot start for want of shared
/// libraries gives [`QemuError::MissingLibraries`], naming each library's Debian package (matched
/// against `depends`, the QEMU packages' dependencies, where possible).
pub(crate) fn check_binary(
    binary: &Path,
    depends: &[String],
) -> Result<(QemuVersion, Option<String>), QemuError> {
    match binary_version(binary) {
        Ok(v) => Ok(v),
        Err(QemuError::Run {
            binary: b,
            source:
                CommandError::Failed {
                    command,
                    status,
                    stderr_tail,
                    log,
                },
        }) => {
            let mut sonames = missing_libraries(&b);
            if sonames.is_empty() {
                sonames.extend(parse_loader_error(&stderr_tail));
            }
            if sonames.is_empty() {
                return Err(QemuError::Run {
                    binary: b,
                    source: CommandError::Failed {
                        command,
                        status,
                        stderr_tail,
                        log,
                    },
                });
            }
            let missing = sonames
                .into_iter()
                .map(|soname| {
                    let (package, certain) = package_for_soname(&soname, depends);
                    MissingLibrary {
                        soname,
                        package,
                        certain,
                    }
                })
                .collect();
            Err(QemuError::MissingLibraries { binary: b, missing })
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sonames_to_packages() {
        let deps: Vec<String> = [
            "libaio1",
            "libfuse3-3",
            "libjpeg62-turbo",
            "libpixman-1-0",
            "libslirp0",
            "zlib1g",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            package_for_soname("libslirp.so.0", &deps),
            ("libslirp0".into(), true)
        );
        assert_eq!(
            package_for_soname("libfuse3.so.3", &deps),
            ("libfuse3-3".into(), true)
        );
        assert_eq!(
            package_for_soname("libpixman-1.so.0", &deps),
            ("libpixman-1-0".into(), true)
        );
        assert_eq!(
            package_for_soname("libz.so.1", &deps),
            ("zlib1g".into(), true)
        );
        assert_eq!(
            package_for_soname("libjpeg.so.62", &deps),
            ("libjpeg62-turbo".into(), true)
        );
        assert_eq!(package_for_soname("libaio.so.1t64", &deps).0, "libaio1t64");
        assert_eq!(
            package_for_soname("libfdt.so.1", &deps),
            ("libfdt1".into(), false)
        );
        assert_eq!(
            package_for_soname("libpng16.so.16", &[]),
            ("libpng16-16".into(), false)
        );
        let e = QemuError::MissingLibraries {
            binary: PathBuf::from("/rt/qemu/usr/bin/qemu-system-x86_64"),
            missing: vec![
                MissingLibrary {
                    soname: "libslirp.so.0".into(),
                    package: "libslirp0".into(),
                    certain: true,
                },
                MissingLibrary {
                    soname: "libfdt.so.1".into(),
                    package: "libfdt1".into(),
                    certain: false,
                },
            ],
        };
        let m = e.to_string();
        assert!(m.contains("libslirp.so.0 (package libslirp0)"), "{m}");
        assert!(m.contains("libfdt.so.1 (probably package libfdt1)"), "{m}");
        assert!(m.contains("apt-get install libfdt1 libslirp0"), "{m}");
    }

    #[test]
    fn loader_output() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibslirp.so.0 => not found\n\
                   \tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f)\n\
                   \tlibfdt.so.1 => not found\n\tlibslirp.so.0 => not found\n";
        assert_eq!(
            parse_ldd_not_found(ldd),
            vec!["libslirp.so.0", "libfdt.so.1"]
        );
        assert_eq!(
            parse_loader_error(
                "/x/qemu-system-x86_64: error while loading shared libraries: libslirp.so.0: \
                 cannot open shared object file: No such file or directory"
            )
            .as_deref(),
            Some("libslirp.so.0")
        );
        assert_eq!(parse_loader_error("something else"), None);
    }

    #[test]
    fn missing_library_is_reported() {
        // A stand-in that fails the way the dynamic loader does (ldd finds nothing to report).
        let tmp = tempfile::tempdir().unwrap();
        let script = tmp.path().join("fake-qemu");
        std::fs::write(
            &script,
            "#!/bin/sh\necho \"$0: error while loading shared libraries: libgatevmtest.so.7: \
             cannot open shared object file: No such file or directory\" >&2\nexit 127\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = check_binary(&script, &["libgatevmtest7".to_string()]).unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, QemuError::MissingLibraries { .. }), "{m}");
        assert!(
            m.contains("libgatevmtest.so.7 (package libgatevmtest7)"),
            "{m}"
        );
    }

    proptest::proptest! {
        /// ldd's answer, one line per library, found or not: the missing ones come back once
        /// each, in the order of their first line (a simple model of the same rule).
        #[test]
        fn ldd_missing_libraries_match_a_model(
            libs in proptest::collection::vec(("lib[a-z0-9+_-]{1,10}\\.so\\.[0-9]{1,2}", proptest::bool::ANY), 0..12),
        ) {
            let mut text = String::from("\tlinux-vdso.so.1 (0x00007ffd)\n");
            let mut want: Vec<String> = Vec::new();
            for (soname, found) in &libs {
                if *found {
                    text.push_str(&format!("\t{soname} => /lib/x86_64-linux-gnu/{soname} (0x00007f)\n"));
                } else {
                    text.push_str(&format!("\t{soname} => not found\n"));
                    if !want.contains(soname) {
                        want.push(soname.clone());
                    }
                }
            }
            proptest::prop_assert_eq!(parse_ldd_not_found(&text), want);
        }

        /// Whatever the text: each name reported missing is non-empty, reported once, and
        /// written in the text on a line that says "not found"; there are never more names
        /// than lines.
        #[test]
        fn ldd_parser_reports_only_what_the_text_says(s in "[a-z. =>\n\t]{0,80}|\\PC{0,80}") {
            let names = parse_ldd_not_found(&s);
            proptest::prop_assert!(names.len() <= s.lines().count());
            for (i, n) in names.iter().enumerate() {
                proptest::prop_assert!(!n.is_empty());
                proptest::prop_assert!(!names[..i].contains(n), "{:?} twice", n);
                let said = s.lines().any(|l| l.contains(n.as_str()) && l.contains("not found"));
                proptest::prop_assert!(said, "{:?} is not on a 'not found' line of {:?}", n, s);
            }
        }

        /// The loader's message gives back exactly the soname it names, whatever comes before.
        #[test]
        fn loader_error_names_the_soname(
            prefix in "[^:]{0,30}",
            soname in "lib[a-z0-9+_.-]{1,16}\\.so\\.[0-9]{1,2}",
        ) {
            let stderr = format!(
                "{prefix}: error while loading shared libraries: {soname}: cannot open shared \
                 object file: No such file or directory"
            );
            proptest::prop_assert_eq!(parse_loader_error(&stderr), Some(soname));
            // Without the loader's words there is nothing to report.
            proptest::prop_assert_eq!(parse_loader_error(&prefix), None);
        }

        /// The flag says exactly whether the package named is one of the dependencies, and a
        /// policy-named soname (`libNAME.so.N`, NAME ending in a letter) maps to `libNAMEN`.
        #[test]
        fn package_flag_matches_the_dependencies(
            name in "lib[a-z]{1,8}",
            major in 0u32..100,
            listed in proptest::bool::ANY,
            others in proptest::collection::vec("[a-z0-9.+-]{1,12}", 0..4),
            junk in "\\PC{0,30}",
        ) {
            // The known exceptions follow no policy (tested by `sonames_to_packages`).
            proptest::prop_assume!(!["libz", "libm", "libcrypto", "libjpeg"].contains(&name.as_str()));
            let want = format!("{name}{major}");
            let mut deps = others.clone();
            deps.retain(|d| !d.starts_with(&want));
            if listed {
                deps.push(want.clone());
            }
            let soname = format!("{name}.so.{major}");
            proptest::prop_assert_eq!(package_for_soname(&soname, &deps), (want, listed));
            let (p, certain) = package_for_soname(&junk, &deps);
            proptest::prop_assert_eq!(certain, deps.contains(&p), "{:?} -> {:?}", junk, p);
        }
    }
}
