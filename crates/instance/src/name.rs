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
        #[test]
        fn accepted_names_are_safe_path_components(s in ".{0,70}") {
            if validate(&s).is_ok() {
                prop_assert!(!s.contains('/') && !s.starts_with('.') && s.len() <= 63);
            }
        }
    }
}
