//! What a suite's package indexes say of a package: `apt-cache show` and `apt-cache showsrc`
//! output, and the choice of a source package's entry.

use super::version::compare_versions;

/// A package's entry in a suite's index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PackageEntry {
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
pub(crate) struct SourceFile {
    /// File name (no directory part).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the contents, hex.
    pub sha256: String,
}

/// A source package's entry in a suite's `Sources` index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SourceEntry {
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
pub(crate) fn parse_sources(text: &str) -> Vec<SourceEntry> {
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
pub(crate) fn select_source(entries: &[SourceEntry], package: &str) -> Option<SourceEntry> {
    entries
        .iter()
        .filter(|e| e.package == package)
        .max_by(|a, b| compare_versions(&a.version, &b.version))
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

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

    proptest::proptest! {
        /// An `apt-cache show` stanza written with any dependencies (alternatives, version
        /// constraints, architecture qualifiers) reads back as the package, version, digest and
        /// the dependency names once each, in order.
        #[test]
        fn show_round_trips(
            package in "[a-z0-9][a-z0-9.+-]{0,20}",
            version in "([0-9]:)?[0-9][0-9a-z.+~-]{0,12}",
            deps in proptest::collection::vec(("[a-z0-9][a-z0-9.+-]{0,12}", 0usize..3, proptest::bool::ANY), 0..8),
            sha256 in proptest::option::of("[0-9a-f]{64}"),
        ) {
            let mut depends_field = Vec::new();
            let mut want: Vec<String> = Vec::new();
            for (name, extra, alt) in &deps {
                let word = format!("{name}{}", ["", " (>= 1.2~rc1)", ":any"][*extra]);
                if *alt && !depends_field.is_empty() {
                    let last: &mut String = depends_field.last_mut().unwrap();
                    last.push_str(&format!(" | {word}"));
                } else {
                    depends_field.push(word);
                }
                if !want.contains(name) {
                    want.push(name.clone());
                }
            }
            let mut text = format!("Package: {package}\nVersion: {version}\n");
            if !depends_field.is_empty() {
                text.push_str(&format!("Depends: {}\n", depends_field.join(", ")));
            }
            text.push_str("Description: a package\n with: a colon in its long description\n");
            if let Some(d) = &sha256 {
                text.push_str(&format!("SHA256: {d}\n"));
            }
            text.push_str("\nPackage: next\nVersion: 9\nDepends: other\n");
            let want = PackageEntry { package, version, depends: want, sha256 };
            proptest::prop_assert_eq!(parse_show(&text), Some(want));
        }

        /// `Sources` stanzas written for any packages read back as those that are not
        /// `Extra-Source-Only`, files and all; a file line naming no plain file is left out.
        #[test]
        fn sources_round_trip(
            stanzas in proptest::collection::vec((
                "[a-z0-9][a-z0-9.+-]{0,12}",
                "[0-9][0-9a-z.+~-]{0,10}",
                proptest::bool::ANY,
                proptest::collection::vec(("[0-9A-F]{64}", 0u64..1_000_000_000, "[a-z0-9][a-z0-9_.+~-]{0,16}"), 0..4),
            ), 0..5),
        ) {
            let mut text = String::new();
            let mut want = Vec::new();
            for (package, version, extra, files) in &stanzas {
                text.push_str(&format!("Package: {package}\nBinary: {package}\nVersion: {version}\n"));
                if *extra {
                    text.push_str("Extra-Source-Only: yes\n");
                }
                text.push_str("Checksums-Sha256:\n");
                for (sha, size, name) in files {
                    text.push_str(&format!(" {sha} {size} {name}\n"));
                }
                // Neither a path nor a hidden file is a plain file name.
                text.push_str(&format!(" {} 1 ../escape\n {} 1 .hidden\n", "0".repeat(64), "0".repeat(64)));
                text.push_str("Directory: pool/main\n\n");
                if !*extra {
                    let files = files
                        .iter()
                        .map(|(sha, size, name)| SourceFile { name: name.clone(), size: *size, sha256: sha.to_ascii_lowercase() })
                        .collect();
                    want.push(SourceEntry { package: package.clone(), version: version.clone(), files });
                }
            }
            proptest::prop_assert_eq!(parse_sources(&text), want);
        }

        /// Whatever the text: at most one entry per stanza, and every file named is a plain
        /// name safe to join to a directory.
        #[test]
        fn sources_parser_keeps_only_plain_file_names(s in "\\PC{0,200}|(Package: a\n|Version: 1\n|Checksums-Sha256:\n| [0-9a-f./ ]{0,12}\n|\n)*") {
            let entries = parse_sources(&s);
            proptest::prop_assert!(entries.len() <= s.split("\n\n").count());
            for f in entries.iter().flat_map(|e| &e.files) {
                proptest::prop_assert!(is_plain_file_name(&f.name), "{:?}", f);
                proptest::prop_assert!(!f.name.contains('/') && !f.name.starts_with('.'), "{:?}", f);
            }
            if let Some(e) = parse_show(&s) {
                proptest::prop_assert!(s.contains("Package:") && s.contains("Version:"));
                proptest::prop_assert!(s.contains(&e.package) && s.contains(&e.version));
            }
        }
    }
}
