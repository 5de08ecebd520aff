//! `/proc/self/mountinfo`: the mount points, with the kernel's octal escapes (`\040` for a space,
//! `\011` tab, `\012` newline, `\134` backslash) decoded.

use std::path::{Path, PathBuf};

/// Decodes the octal escapes of a mountinfo path field. A backslash not followed by three octal
/// digits is kept as it is.
pub fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4);
        match octal {
            Some(o) if b[i] == b'\\' && o.iter().all(|c| (b'0'..=b'7').contains(c)) => {
                let v = u32::from(o[0] - b'0') * 64
                    + u32::from(o[1] - b'0') * 8
                    + u32::from(o[2] - b'0');
                // Three octal digits above \377 are not an escape the kernel writes.
                match u8::try_from(v) {
                    Ok(byte) => out.push(byte),
                    Err(_) => out.extend_from_slice(&b[i..i + 4]),
                }
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount points of a mountinfo text, in table order.
pub fn parse(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .collect()
}

/// This process's mount points (empty when `/proc` is not mounted).
pub fn mount_points() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse(&t))
        .unwrap_or_default()
}

/// Whether `p` (as spelled, not resolved) is a mount point of this process's mount table.
pub fn is_mount_point(p: &Path) -> bool {
    let want = p.to_string_lossy();
    mount_points().iter().any(|m| *m == *want)
}

/// Mount points at or below `path` (resolved when it exists). Used to refuse deleting a
/// directory that still has something mounted inside it.
pub fn mounts_under(path: &Path) -> Vec<PathBuf> {
    let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    mount_points()
        .into_iter()
        .map(PathBuf::from)
        .filter(|m| m.starts_with(&canon))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_decoded() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/t\\011x\\012y\\134z"), "/t\tx\ny\\z");
        // Not an escape: kept.
        assert_eq!(unescape("/a\\b"), "/a\\b");
        assert_eq!(unescape("/a\\04"), "/a\\04");
        assert_eq!(unescape("/a\\089"), "/a\\089");
        assert_eq!(unescape("/a\\777"), "/a\\777");
        assert_eq!(unescape("\\"), "\\");
    }

    #[test]
    fn mount_points_of_a_table() {
        let text = "22 1 0:21 / / rw,relatime - ext4 /dev/vda rw\n\
                    23 22 0:5 / /mnt/with\\040space rw - tmpfs tmpfs rw\n\
                    short line\n";
        assert_eq!(parse(text), vec!["/", "/mnt/with space"]);
    }

    #[test]
    fn this_process_has_a_root_mount() {
        if !Path::new("/proc/self/mountinfo").exists() {
            gatevm_testkit::skip(
                "mountinfo::tests::this_process_has_a_root_mount",
                "no /proc/self/mountinfo here",
            );
            return;
        }
        assert!(is_mount_point(Path::new("/")));
        assert!(!mounts_under(Path::new("/")).is_empty());
        assert!(mounts_under(Path::new("/no/such/dir/anywhere")).is_empty());
    }

    proptest::proptest! {
        #[test]
        fn unescape_never_panics_and_inverts_escaping(s in "[ a-z\\t\\n\\\\/]{0,40}") {
            let escaped = s
                .replace('\\', "\\134")
                .replace(' ', "\\040")
                .replace('\t', "\\011")
                .replace('\n', "\\012");
            proptest::prop_assert_eq!(unescape(&escaped), s);
        }
    }
}
