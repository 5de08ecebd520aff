//! Debian version comparison, as dpkg orders versions.

use std::cmp::Ordering;

/// Orders two Debian version strings as dpkg does (`[epoch:]upstream[-revision]`, `~` sorting
/// before everything, letters before other characters, digit runs compared as numbers).
pub(crate) fn compare_versions(a: &str, b: &str) -> Ordering {
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

#[cfg(test)]
mod tests {
    use super::*;

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

    proptest::proptest! {
        #[test]
        fn version_order_is_antisymmetric(a in "[0-9a-z.+~:-]{0,12}", b in "[0-9a-z.+~:-]{0,12}") {
            proptest::prop_assert_eq!(compare_versions(&a, &b), compare_versions(&b, &a).reverse());
            proptest::prop_assert_eq!(compare_versions(&a, &a), Ordering::Equal);
        }
    }
}
