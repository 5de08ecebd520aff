//! Finding the VM's disks by the serial (virtio-blk ID) the host gave each
//! ([`gatevm_abi::paths::disk`]): device names follow probe order, which the guest cannot rely on.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The block devices of `sys_block` (`/sys/block`) whose serial is `serial`, as `/dev` paths.
/// Serials are compared after trimming the NUL padding and whitespace a device may add.
pub(crate) fn find_in(sys_block: &Path, serial: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(sys_block) else {
        return vec![];
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let got = std::fs::read(e.path().join("serial")).ok()?;
            let got = String::from_utf8_lossy(&got);
            (got.trim_matches(|c: char| c == '\0' || c.is_whitespace()) == serial)
                .then(|| PathBuf::from("/dev").join(name))
        })
        .collect();
    found.sort();
    found
}

/// The one disk with `serial`; an error names a missing or doubled one.
pub(crate) fn find(serial: &str) -> Result<PathBuf, String> {
    match find_in(Path::new("/sys/block"), serial).as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(format!("no disk with serial {serial}")),
        many => Err(format!(
            "{} disks with serial {serial}: {}",
            many.len(),
            many.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// [`find`], waiting up to `limit` for the device to appear.
pub(crate) fn wait_for(serial: &str, limit: Duration) -> Result<PathBuf, String> {
    let deadline = Instant::now() + limit;
    loop {
        match find(serial) {
            Ok(p) if p.exists() => return Ok(p),
            Ok(p) if Instant::now() >= deadline => {
                return Err(format!(
                    "{} (serial {serial}) has no device node",
                    p.display()
                ))
            }
            Err(e) if Instant::now() >= deadline => return Err(e),
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(root: &Path, name: &str, serial: &[u8]) {
        std::fs::create_dir_all(root.join(name)).unwrap();
        std::fs::write(root.join(name).join("serial"), serial).unwrap();
    }

    #[test]
    fn disks_are_found_by_serial_not_by_order() {
        let d = tempfile::tempdir().unwrap();
        dev(d.path(), "vda", b"gatevm-state\n");
        dev(d.path(), "vdb", b"gatevm-base\0\0\0\0\0\0\0\0\0");
        dev(d.path(), "vdc", b"gatevm-base-not\n");
        std::fs::create_dir_all(d.path().join("loop0")).unwrap();
        assert_eq!(
            find_in(d.path(), "gatevm-base"),
            vec![PathBuf::from("/dev/vdb")]
        );
        assert_eq!(
            find_in(d.path(), "gatevm-state"),
            vec![PathBuf::from("/dev/vda")]
        );
        assert!(find_in(d.path(), "gatevm-upper").is_empty());
        dev(d.path(), "vdd", b"gatevm-state");
        assert_eq!(
            find_in(d.path(), "gatevm-state"),
            vec![PathBuf::from("/dev/vda"), PathBuf::from("/dev/vdd")]
        );
        assert!(find_in(&d.path().join("missing"), "gatevm-state").is_empty());
    }
}
