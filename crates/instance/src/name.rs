//! Instance names.

/// Why a name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("instance name is empty")]
    Empty,
    #[error("instance name {0:?} is longer than 63 characters")]
    TooLong(String),
    #[error("instance name {0:?} may contain only a-z, 0-9 and '-', and must start and end with a letter or digit")]
    Invalid(String),
}

/// Checks an instance name: a DNS label (`[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?`), so it can also be
/// the guest's hostname and a path component.
pub fn validate(name: &str) -> Result<&str, NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > 63 {
        return Err(NameError::TooLong(name.chars().take(80).collect()));
    }
    let ok_char = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let b = name.as_bytes();
    if !b.iter().all(|&c| ok_char(c) || c == b'-') || !ok_char(b[0]) || !ok_char(b[b.len() - 1]) {
        return Err(NameError::Invalid(name.to_string()));
    }
    Ok(name)
}

/// `n` random bytes as hex, for generated names (the clock's nanoseconds if getrandom fails).
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let got = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if got != b.len() as isize {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            ^ u128::from(std::process::id());
        for (i, x) in b.iter_mut().enumerate() {
            *x = (t >> ((i % 16) * 8)) as u8;
        }
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_and_refuses() {
        for ok in ["default", "a", "gw-1", "0", &"a".repeat(63)] {
            assert!(validate(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "..",
            ".",
            "a/b",
            "/",
            "A",
            "a_b",
            "-a",
            "a-",
            "a b",
            "ä",
            &"a".repeat(64),
            "a\n",
            "a.b",
        ] {
            assert!(validate(bad).is_err(), "{bad:?}");
        }
    }

    proptest! {
        /// The check agrees with the DNS-label rule its documentation states (so what is
        /// accepted is a safe path component and hostname); a refusal is one line that says
        /// which rule the name breaks and quotes it.
        #[test]
        fn validate_matches_the_dns_label_rule(s in "[a-z0-9-]{0,70}|[a-zA-Z0-9_./-]{0,8}|.{0,70}") {
            let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
            let model = !s.is_empty()
                && s.len() <= 63
                && s.chars().all(|c| alnum(c) || c == '-')
                && s.starts_with(alnum)
                && s.ends_with(alnum);
            match validate(&s) {
                Ok(n) => {
                    prop_assert!(model, "{:?} accepted", s);
                    prop_assert_eq!(n, s.as_str());
                    prop_assert!(!s.contains('/') && !s.starts_with('.'));
                }
                Err(e) => {
                    prop_assert!(!model, "{:?} refused: {}", s, e);
                    let msg = e.to_string();
                    prop_assert!(!msg.contains('\n'), "{}", msg);
                    let want = if s.is_empty() {
                        NameError::Empty
                    } else if s.len() > 63 {
                        NameError::TooLong(s.chars().take(80).collect())
                    } else {
                        NameError::Invalid(s.clone())
                    };
                    prop_assert_eq!(e, want);
                    if !s.is_empty() {
                        prop_assert!(msg.contains(&format!("{:?}", s.chars().take(80).collect::<String>())), "{}", msg);
                    }
                }
            }
        }
    }
}
