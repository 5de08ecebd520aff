//! The system's apt sources: parsing `sources.list` and deb822 `.sources` files, and finding
//! the Debian archive mirrors the system already uses.

use std::path::{Path, PathBuf};

use super::AptError;

/// Environment variable that overrides the Debian mirror URI found in the system's apt sources.
pub(crate) const MIRROR_ENV: &str = "GATEVM_DEBIAN_MIRROR";

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
pub(crate) fn is_debian_codename(name: &str) -> bool {
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

/// One entry of an apt sources file (one `deb` line, or one deb822 paragraph).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AptSource {
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
pub(crate) fn parse_deb822(text: &str) -> Vec<AptSource> {
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
pub(crate) fn parse_one_line(text: &str) -> Vec<AptSource> {
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
pub(crate) fn debian_mirrors(sources: &[AptSource]) -> Vec<String> {
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
pub(crate) fn system_debian_mirrors() -> Result<Vec<String>, AptError> {
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

    proptest::proptest! {
        /// The same sources written in both formats (with comments, options, continuation
        /// lines and field names in any case) read back as those sources from either.
        #[test]
        fn both_formats_read_back_the_sources(
            sources in proptest::collection::vec((
                proptest::bool::ANY,
                "http://m[a-z]{1,6}\\.example/[a-z]{1,8}",
                "[a-z]{3,10}(-updates|-backports)?",
                proptest::collection::vec("[a-z-]{1,12}", 0..4),
                proptest::bool::ANY,
            ), 0..6),
        ) {
            let mut deb822 = String::from("# generated\n");
            let mut one_line = String::from("# generated\n\n");
            let mut want = Vec::new();
            for (src, uri, suite, components, enabled) in &sources {
                let ty = if *src { "deb-src" } else { "deb" };
                deb822.push_str(&format!("types: {ty}\nURIs: {uri}\nSuites:\n {suite}\nComponents: {}\n", components.join(" ")));
                if !*enabled {
                    deb822.push_str("Enabled: no\n");
                }
                deb822.push_str("Signed-By: /usr/share/keyrings/k.gpg\n\n");
                one_line.push_str(&format!("{ty} [arch=amd64 signed-by=/k.gpg] {uri} {suite} {} # note\n", components.join(" ")));
                want.push(AptSource {
                    types: vec![ty.to_string()],
                    uris: vec![uri.clone()],
                    suites: vec![suite.clone()],
                    components: components.clone(),
                    enabled: *enabled,
                });
            }
            proptest::prop_assert_eq!(parse_deb822(&deb822), want.clone());
            for w in &mut want {
                // The one-line format has no way to disable a line but a comment.
                w.enabled = true;
            }
            proptest::prop_assert_eq!(parse_one_line(&one_line), want);
        }

        /// Whatever the text: one-line entries are `deb` or `deb-src` with a URI and a suite,
        /// at most one a line; deb822 entries have types and URIs, at most one a paragraph.
        #[test]
        fn parsers_keep_only_complete_entries(s in "\\PC{0,200}|(deb |deb-src |\\[a\\] |[a-z:/]{1,6} |# |Types: |URIs: |\n| )*") {
            let lines = s.lines().count();
            let one = parse_one_line(&s);
            proptest::prop_assert!(one.len() <= lines);
            for e in &one {
                proptest::prop_assert!(e.types == ["deb"] || e.types == ["deb-src"], "{:?}", e);
                proptest::prop_assert!(e.uris.len() == 1 && e.suites.len() == 1 && e.enabled, "{:?}", e);
            }
            let paragraphs = parse_deb822(&s);
            proptest::prop_assert!(paragraphs.len() <= lines);
            for e in &paragraphs {
                proptest::prop_assert!(!e.types.is_empty() && !e.uris.is_empty(), "{:?}", e);
            }
        }
    }
}
