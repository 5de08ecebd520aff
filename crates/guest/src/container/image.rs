//! Image references: docker-style short names normalized the way containerd names images imported
//! from `docker save` archives (`busybox` is stored as `docker.io/library/busybox:latest`).

/// A reference that is not a docker-style image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference {0:?}")]
pub(crate) struct InvalidReference(pub String);

/// Normalizes a docker-style reference: adds `docker.io` when the first component is not a
/// registry (no `.` or `:`, not `localhost`, lower case), `library/` for official images on
/// docker.io, and `:latest` when there is neither a tag nor a digest. Digests are kept.
pub(crate) fn normalize(reference: &str) -> Result<String, InvalidReference> {
    let invalid = || InvalidReference(reference.into());
    if reference.is_empty()
        || reference.starts_with('-')
        || reference
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(invalid());
    }
    let (name, digest) = match reference.split_once('@') {
        Some((n, d)) if !d.is_empty() && d.contains(':') && !d.contains('@') => (n, Some(d)),
        Some(_) => return Err(invalid()),
        None => (reference, None),
    };
    let (domain, remainder) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.')
                || first.contains(':')
                || first == "localhost"
                || first.to_lowercase() != first =>
        {
            (first, rest)
        }
        _ => ("docker.io", name),
    };
    let domain = if domain == "index.docker.io" {
        "docker.io"
    } else {
        domain
    };
    if remainder.is_empty()
        || remainder.starts_with('/')
        || remainder.ends_with('/')
        || remainder.contains("//")
    {
        return Err(invalid());
    }
    let path = if domain == "docker.io" && !remainder.contains('/') {
        format!("library/{remainder}")
    } else {
        remainder.to_string()
    };
    // After the domain a `:` can only start the tag.
    let has_tag = match path.rsplit_once(':') {
        Some((p, tag)) => {
            if p.is_empty() || p.ends_with('/') || tag.is_empty() || tag.contains('/') {
                return Err(invalid());
            }
            true
        }
        None => false,
    };
    let mut out = format!("{domain}/{path}");
    if !has_tag && digest.is_none() {
        out.push_str(":latest");
    }
    if let Some(d) = digest {
        out.push('@');
        out.push_str(d);
    }
    Ok(out)
}

/// Picks the stored image that `reference` names: the normalized reference, or the reference
/// exactly as given.
pub(crate) fn find<'a>(reference: &str, stored: &'a [String]) -> Option<&'a str> {
    let normalized = normalize(reference).ok();
    stored
        .iter()
        .find(|s| Some(s.as_str()) == normalized.as_deref())
        .or_else(|| stored.iter().find(|s| s.as_str() == reference))
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn docker_style_references() {
        let cases = [
            ("busybox", "docker.io/library/busybox:latest"),
            ("busybox:1.36", "docker.io/library/busybox:1.36"),
            ("user/app:1", "docker.io/user/app:1"),
            ("user/app", "docker.io/user/app:latest"),
            ("docker.io/busybox", "docker.io/library/busybox:latest"),
            (
                "index.docker.io/library/busybox:1",
                "docker.io/library/busybox:1",
            ),
            (
                "docker.io/library/busybox:latest",
                "docker.io/library/busybox:latest",
            ),
            ("registry.example:5000/x", "registry.example:5000/x:latest"),
            ("registry.example:5000/x:2", "registry.example:5000/x:2"),
            ("ghcr.io/owner/repo/sub:v1", "ghcr.io/owner/repo/sub:v1"),
            ("localhost/app", "localhost/app:latest"),
            ("localhost:5000/app:dev", "localhost:5000/app:dev"),
            ("Registry/app", "Registry/app:latest"),
            (
                "busybox@sha256:0123abcd",
                "docker.io/library/busybox@sha256:0123abcd",
            ),
            (
                "busybox:1.36@sha256:0123abcd",
                "docker.io/library/busybox:1.36@sha256:0123abcd",
            ),
            ("quay.io/x/y@sha256:ff", "quay.io/x/y@sha256:ff"),
        ];
        for (given, want) in cases {
            assert_eq!(normalize(given).unwrap(), want, "{given}");
        }
    }

    #[test]
    fn bad_references() {
        for bad in [
            "",
            "-x",
            "a b",
            "busybox@",
            "busybox@sha256",
            "a@b@c:d",
            "docker.io/",
            "x//y",
            "user/",
            "busybox:",
            ":tag",
            "reg.io/a:b/c",
        ] {
            assert!(normalize(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn finding_stored_images() {
        let stored = vec![
            "docker.io/library/busybox:latest".to_string(),
            "my-local-name".to_string(),
            "docker.io/user/app:1".to_string(),
        ];
        assert_eq!(
            find("busybox", &stored),
            Some("docker.io/library/busybox:latest")
        );
        assert_eq!(find("user/app:1", &stored), Some("docker.io/user/app:1"));
        // Stored under a name that is not a normalized reference: the exact name matches.
        assert_eq!(find("my-local-name", &stored), Some("my-local-name"));
        assert_eq!(find("busybox:1.36", &stored), None);
        assert_eq!(find("nginx", &stored), None);
        assert_eq!(find("", &stored), None);
    }

    proptest! {
        #[test]
        fn normalization_is_idempotent(s in "[a-z0-9./:@-]{0,30}") {
            if let Ok(n) = normalize(&s) {
                prop_assert_eq!(normalize(&n).unwrap(), n.clone());
                prop_assert!(n.contains('/'));
            }
        }
    }
}
