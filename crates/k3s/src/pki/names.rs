//! Validation of the names that end up in certificates, Kubernetes objects and file paths.
//!
//! Each check returns the reason a value is rejected ([`InputError`]); the caller wraps it into
//! [`PkiError::InvalidInput`](super::PkiError::InvalidInput) together with the value and what it
//! was meant to be, so the user sees one line naming the offending value.

use std::fmt;
use std::net::IpAddr;

/// One subject alternative name, normalized: DNS names lowercase, IP addresses parsed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum San {
    /// A DNS name (possibly a `*.` wildcard), lowercase.
    Dns(String),
    /// An IPv4 or IPv6 address.
    Ip(IpAddr),
}

impl fmt::Display for San {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            San::Dns(name) => f.write_str(name),
            San::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Longest DNS-1123 label (Kubernetes namespaces, instance and gateway names).
pub(crate) const MAX_LABEL: usize = 63;
/// Longest DNS-1123 subdomain (Kubernetes object names such as Secrets) and DNS name.
pub(crate) const MAX_SUBDOMAIN: usize = 253;
/// Longest common name (X.520 `ub-common-name`).
pub(crate) const MAX_COMMON_NAME: usize = 64;

/// Why a name, SAN, common name or endpoint is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InputError {
    /// The value is empty.
    #[error("must not be empty")]
    Empty,
    /// The value is too long.
    #[error("is {len} characters long, at most {max} are allowed")]
    TooLong {
        /// Its length.
        len: usize,
        /// The most allowed.
        max: usize,
    },
    /// A character outside a label's alphabet.
    #[error("contains {0:?}; only lowercase letters, digits and '-' are allowed")]
    LabelChar(char),
    /// A character outside a subdomain's alphabet.
    #[error("contains {0:?}; only lowercase letters, digits, '-' and '.' are allowed")]
    SubdomainChar(char),
    /// A label starts or ends with '-'.
    #[error("must start and end with a lowercase letter or digit")]
    LabelEdge,
    /// Two dots in a row, or a leading or trailing dot, in a subdomain.
    #[error("contains an empty part between dots")]
    EmptyPart,
    /// A part of a subdomain starts or ends with '-'.
    #[error("part {0:?} must start and end with a lowercase letter or digit")]
    PartEdge(String),
    /// An IPv6 address in brackets.
    #[error("write IPv6 addresses without brackets")]
    Brackets,
    /// A ':' that does not make an IPv6 address.
    #[error("is not a valid IPv6 address (and ':' is not allowed in a DNS name)")]
    BadIpv6,
    /// `*.` and nothing after it.
    #[error("a wildcard needs a domain after \"*.\"")]
    BareWildcard,
    /// A character not allowed in a DNS name.
    #[error(
        "is neither an IP address nor a DNS name: {0:?} is not allowed in a DNS name \
         (letters, digits, '-' and '.' only)"
    )]
    DnsChar(char),
    /// An empty DNS label.
    #[error("contains an empty label (two dots in a row, or a leading or trailing dot)")]
    EmptyLabel,
    /// A DNS label over 63 characters.
    #[error("label {label:?} is {len} characters long, at most {max} are allowed")]
    LongLabel {
        /// The label.
        label: String,
        /// Its length.
        len: usize,
        /// The most allowed.
        max: usize,
    },
    /// A DNS label starts or ends with '-'.
    #[error("label {0:?} must start and end with a letter or digit")]
    DnsLabelEdge(String),
    /// A DNS name whose last label is all digits (a mistyped address).
    #[error("is not a valid IP address, and a DNS name cannot end in an all-digit label")]
    DigitsLabel,
    /// A common name with control characters.
    #[error("contains control characters")]
    ControlChars,
    /// An endpoint that is not `https://`.
    #[error("must start with https://")]
    NotHttps,
    /// `https://` and nothing after it.
    #[error("has no host after https://")]
    NoHost,
    /// An endpoint over 2048 characters.
    #[error("is longer than 2048 characters")]
    LongEndpoint,
    /// An endpoint with whitespace or control characters.
    #[error("contains whitespace or control characters")]
    EndpointChars,
}

fn too_long(len: usize, max: usize) -> InputError {
    InputError::TooLong { len, max }
}

fn is_lower_alnum(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// A DNS-1123 label: 1 to 63 lowercase letters, digits and '-', starting and ending with a letter
/// or digit (Kubernetes namespaces; gatevm instance and gateway names).
pub(crate) fn dns1123_label(value: &str) -> Result<(), InputError> {
    if value.is_empty() {
        return Err(InputError::Empty);
    }
    if value.len() > MAX_LABEL {
        return Err(too_long(value.len(), MAX_LABEL));
    }
    if let Some(c) = value.chars().find(|&c| !(is_lower_alnum(c) || c == '-')) {
        return Err(InputError::LabelChar(c));
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err(InputError::LabelEdge);
    }
    Ok(())
}

/// A DNS-1123 subdomain as Kubernetes checks object names: at most 253 characters, lowercase
/// letters, digits, '-' and '.', each '.'-separated part starting and ending with a letter or
/// digit.
pub(crate) fn dns1123_subdomain(value: &str) -> Result<(), InputError> {
    if value.is_empty() {
        return Err(InputError::Empty);
    }
    if value.len() > MAX_SUBDOMAIN {
        return Err(too_long(value.len(), MAX_SUBDOMAIN));
    }
    if let Some(c) = value
        .chars()
        .find(|&c| !(is_lower_alnum(c) || c == '-' || c == '.'))
    {
        return Err(InputError::SubdomainChar(c));
    }
    for part in value.split('.') {
        if part.is_empty() {
            return Err(InputError::EmptyPart);
        }
        if part.starts_with('-') || part.ends_with('-') {
            return Err(InputError::PartEdge(part.to_string()));
        }
    }
    Ok(())
}

/// A subject alternative name: an IPv4 or IPv6 address, or a DNS name (letters, digits, '-',
/// labels of 1 to 63 characters, at most 253 in all, optionally starting with a `*.` wildcard).
/// DNS names are lowercased; a last label made only of digits is refused so that a mistyped
/// address ("192.168.127.300") is not taken for a name.
pub(crate) fn san(value: &str) -> Result<San, InputError> {
    if value.is_empty() {
        return Err(InputError::Empty);
    }
    if let Ok(ip) = value.parse::<IpAddr>() {
        return Ok(San::Ip(ip));
    }
    if value.starts_with('[') {
        return Err(InputError::Brackets);
    }
    if value.contains(':') {
        return Err(InputError::BadIpv6);
    }
    let name = value.to_ascii_lowercase();
    if name.len() > MAX_SUBDOMAIN {
        return Err(too_long(name.len(), MAX_SUBDOMAIN));
    }
    let rest = name.strip_prefix("*.").unwrap_or(&name);
    if rest.is_empty() {
        return Err(InputError::BareWildcard);
    }
    if let Some(c) = rest
        .chars()
        .find(|&c| !(is_lower_alnum(c) || c == '-' || c == '.'))
    {
        return Err(InputError::DnsChar(c));
    }
    let labels: Vec<&str> = rest.split('.').collect();
    for label in &labels {
        if label.is_empty() {
            return Err(InputError::EmptyLabel);
        }
        if label.len() > MAX_LABEL {
            return Err(InputError::LongLabel {
                label: label.to_string(),
                len: label.len(),
                max: MAX_LABEL,
            });
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(InputError::DnsLabelEdge(label.to_string()));
        }
    }
    if labels
        .last()
        .is_some_and(|last| last.chars().all(|c| c.is_ascii_digit()))
    {
        return Err(InputError::DigitsLabel);
    }
    Ok(San::Dns(name))
}

/// A certificate common name: 1 to 64 characters, no control characters.
pub(crate) fn common_name(value: &str) -> Result<(), InputError> {
    if value.is_empty() {
        return Err(InputError::Empty);
    }
    let len = value.chars().count();
    if len > MAX_COMMON_NAME {
        return Err(too_long(len, MAX_COMMON_NAME));
    }
    if value.chars().any(char::is_control) {
        return Err(InputError::ControlChars);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn labels() {
        for ok in ["a", "default", "kube-system", "gw-1", "0", &"a".repeat(63)] {
            assert_eq!(dns1123_label(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "A",
            "a_b",
            "-a",
            "a-",
            "a.b",
            "ä",
            " a",
            &"a".repeat(64),
        ] {
            assert!(dns1123_label(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            dns1123_label("My-Gw").unwrap_err().to_string(),
            "contains 'M'; only lowercase letters, digits and '-' are allowed"
        );
    }

    #[test]
    fn subdomains() {
        for ok in [
            "a",
            "gateway-tls",
            "gateway.tls",
            "a.b-c.d",
            &"a".repeat(253),
        ] {
            assert_eq!(dns1123_subdomain(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            ".a",
            "a.",
            "a..b",
            "a.-b",
            "A",
            "a_b",
            "a/b",
            &"a".repeat(254),
        ] {
            assert!(dns1123_subdomain(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn sans() {
        assert_eq!(san("127.0.0.1"), Ok(San::Ip("127.0.0.1".parse().unwrap())));
        assert_eq!(san("::1"), Ok(San::Ip("::1".parse().unwrap())));
        assert_eq!(san("fd00::2"), Ok(San::Ip("fd00::2".parse().unwrap())));
        assert_eq!(
            san("Gateway.Example.COM"),
            Ok(San::Dns("gateway.example.com".into()))
        );
        assert_eq!(san("*.example.com"), Ok(San::Dns("*.example.com".into())));
        assert_eq!(san("localhost"), Ok(San::Dns("localhost".into())));
        assert_eq!(san("a1.b-2.c3"), Ok(San::Dns("a1.b-2.c3".into())));
        for bad in [
            "",
            "192.168.127.300",
            "1.2.3",
            "[::1]",
            "fd00::zz",
            "a..b",
            ".a",
            "a.",
            "-a.b",
            "a-.b",
            "a_b.c",
            "a b",
            "*.",
            "a.*.b",
            "*",
            "http://a",
            &format!("{}.com", "a".repeat(64)),
            &format!("{}.com", ["a"; 126].join(".")),
        ] {
            assert!(san(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn common_names() {
        assert_eq!(common_name("gatevm-client"), Ok(()));
        assert_eq!(common_name("system:admin dev"), Ok(()));
        assert!(common_name("").is_err());
        assert!(common_name("a\nb").is_err());
        assert!(common_name(&"x".repeat(65)).is_err());
    }

    proptest! {
        #[test]
        fn label_check_matches_a_simple_model(s in "[a-z0-9_.A-Z-]{0,70}") {
            let model = !s.is_empty()
                && s.len() <= 63
                && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !s.starts_with('-')
                && !s.ends_with('-');
            prop_assert_eq!(dns1123_label(&s).is_ok(), model);
        }

        #[test]
        fn san_never_panics_and_accepted_names_are_stable(s in "\\PC{0,80}") {
            if let Ok(parsed) = san(&s) {
                // What is accepted re-validates to itself once normalized.
                prop_assert_eq!(san(&parsed.to_string()), Ok(parsed.clone()));
            }
        }

        #[test]
        fn generated_dns_names_are_accepted(labels in proptest::collection::vec("[a-z]([a-z0-9-]{0,20}[a-z0-9])?", 1..6)) {
            let name = labels.join(".");
            prop_assert_eq!(san(&name), Ok(San::Dns(name.clone())));
        }

        /// The subdomain check agrees with the rule its documentation states, and a refusal
        /// names the first character outside the alphabet (one that is in the value).
        #[test]
        fn subdomain_check_matches_a_simple_model(s in "[a-z0-9.-]{0,260}|[a-z0-9._A-Z-]{0,20}|\\PC{0,300}") {
            let model = !s.is_empty()
                && s.len() <= 253
                && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
                && s.split('.').all(|p| !p.is_empty() && !p.starts_with('-') && !p.ends_with('-'));
            let res = dns1123_subdomain(&s);
            prop_assert_eq!(res.is_ok(), model, "{:?}: {:?}", s, res);
            if let Err(e) = res {
                prop_assert!(!e.to_string().contains('\n'));
                if let InputError::SubdomainChar(c) = e {
                    let first = s.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '.'));
                    prop_assert_eq!(Some(c), first);
                }
            }
        }
    }
}
