//! Shared-directory throughput: sequential write and read of a file in a host directory shared
//! into the guest (`gatevm start -v DIR:/share`, virtio-fs), beside the same `dd` run on the host
//! in the same directory.
//!
//! Every measurement is `dd`'s own elapsed time (the last line it prints), so the `gatevm exec`
//! round trip around the guest's `dd` is not counted. Writes include their fsync (`conv=fsync`);
//! reads start cold: the file's pages are dropped from the host's page cache
//! (`posix_fadvise(DONTNEED)`) before every read, and from the guest's (`drop_caches`) before a
//! guest read.

use super::{summary, Bench};
use crate::gatevm::DeleteOnDrop;
use crate::markdown::{num, times, Align, Section, Table};
use crate::runner::{self, Finished};
use crate::scratch::Scratch;
use crate::stats::ratio;
use anyhow::{bail, Context};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The instance the volume case creates, uses and deletes.
pub const VOL_INSTANCE: &str = "bench-vol";
/// Where the guest mounts the shared directory.
pub const GUEST_DIR: &str = "/share";
/// The file the guest writes.
const WRITE_FILE: &str = "f";
/// The file the host writes once and both sides read.
const READ_FILE: &str = "g";
/// The file the host's own write baseline writes.
const HOST_WRITE_FILE: &str = "h";

/// What `dd` reports on its last line: the bytes copied and the seconds it took. Reads GNU
/// coreutils' `N bytes (.. MB, .. MiB) copied, 0.52 s, 516 MB/s` and busybox's
/// `N bytes (256.0MB) copied, 0.52 seconds, 492.3MB/s` (in the C locale).
pub fn parse_dd(stderr: &str) -> Option<(u64, f64)> {
    stderr.lines().rev().find_map(|l| {
        let (before, after) = l.split_once(" copied, ")?;
        let bytes = before.split_whitespace().next()?.parse().ok()?;
        let mut words = after.split_whitespace();
        let secs: f64 = words.next()?.parse().ok()?;
        let unit = words.next()?.trim_end_matches(',');
        (matches!(unit, "s" | "seconds") && secs.is_finite() && secs >= 0.0)
            .then_some((bytes, secs))
    })
}

/// One `dd` run: its own elapsed time, and the wall time of the command around it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DdRun {
    /// `dd`'s elapsed time, seconds.
    pub secs: f64,
    /// The wall time of the whole command (for the guest: `gatevm exec`), seconds.
    pub wall: f64,
}

impl DdRun {
    /// Reads `dd`'s report out of a finished command that was to copy `bytes`.
    pub fn of(f: &Finished, bytes: u64) -> anyhow::Result<DdRun> {
        let Some((copied, secs)) = parse_dd(&f.stderr) else {
            bail!(
                "`{}` printed no dd summary (`N bytes ... copied, T s, ...`): {}",
                f.label,
                f.last_line()
            );
        };
        if copied != bytes {
            bail!("`{}` copied {copied} bytes, not {bytes}", f.label);
        }
        Ok(DdRun {
            // dd rounds a very short copy down to 0: count it as one microsecond.
            secs: secs.max(1e-6),
            wall: f.elapsed.as_secs_f64(),
        })
    }
}

/// The guest's write: a fresh file of `mib` MiB of zeros in the share, fsynced before dd ends.
pub fn guest_write_script(mib: u64) -> String {
    format!(
        "rm -f {GUEST_DIR}/{WRITE_FILE} && LC_ALL=C exec dd if=/dev/zero of={GUEST_DIR}/{WRITE_FILE} bs=1M count={mib} conv=fsync"
    )
}

/// The guest's read of the host's file, with the guest's page cache dropped first.
pub fn guest_read_script() -> String {
    format!(
        "sync && echo 3 > /proc/sys/vm/drop_caches && LC_ALL=C exec dd if={GUEST_DIR}/{READ_FILE} of=/dev/null bs=1M"
    )
}

/// `dd ARGS...` on the host, in the C locale.
fn host_dd(args: &[String], timeout: Duration, scratch: &Scratch) -> anyhow::Result<Finished> {
    let mut c = Command::new("dd");
    c.env("LC_ALL", "C").args(args);
    runner::run(&mut c, timeout, scratch)?.ok()
}

/// Writes `mib` MiB of zeros to `path` (mode 0644, readable by the file server's user) and
/// fsyncs it.
pub fn write_zeros(path: &Path, mib: u64) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        f.write_all(&block)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    f.sync_all()
        .with_context(|| format!("cannot fsync {}", path.display()))
}

/// Drops `path`'s pages from the host's page cache (after writing back any dirty ones), so the
/// next read comes from the disk.
pub fn drop_host_cache(path: &Path) -> anyhow::Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("cannot fsync {}", path.display()))?;
    // SAFETY: the descriptor is open for the duration of the call; posix_fadvise only reads its
    // arguments.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if r != 0 {
        return Err(std::io::Error::from_raw_os_error(r))
            .with_context(|| format!("cannot drop {} from the page cache", path.display()));
    }
    Ok(())
}

/// The name of the filesystem holding `path` (statfs magic numbers of the common ones).
pub fn fs_name(magic: i64) -> String {
    match magic {
        0xEF53 => "ext2/3/4".into(),
        0x0102_1994 => "tmpfs".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x794C_7630 => "overlayfs".into(),
        0x2FC1_2FC1 => "zfs".into(),
        0x6573_5546 => "fuse".into(),
        m => format!("filesystem type {m:#x}"),
    }
}

/// The filesystem holding `path`, for the report.
fn fs_of(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return "unknown filesystem".into();
    };
    // SAFETY: a zeroed statfs is a valid out-buffer; the path is a NUL-terminated string valid
    // for the call, and statfs keeps no pointer.
    let (r, st) = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        (libc::statfs(c.as_ptr(), &mut st), st)
    };
    if r != 0 {
        return "unknown filesystem".into();
    }
    // f_type is a signed or unsigned long, depending on the libc.
    #[allow(clippy::unnecessary_cast)]
    let magic = st.f_type as i64;
    fs_name(magic)
}

/// Takes `dir` for `owner` (uid, gid): as root, gatevm refuses a writable share of a root-owned
/// directory and runs the file server as the directory's owner.
fn give(dir: &Path, owner: Option<(u32, u32)>) -> anyhow::Result<()> {
    if let Some((u, g)) = owner {
        std::os::unix::fs::chown(dir, Some(u), Some(g))
            .with_context(|| format!("cannot give {} to {u}:{g}", dir.display()))?;
    }
    Ok(())
}

impl Bench<'_> {
    /// Runs the volume case.
    pub fn volume(&mut self) -> anyhow::Result<Section> {
        // One VM at a time: the benchmark instance would compete for the CPUs.
        self.gv.stop_if_running()?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let owner = if unsafe { libc::geteuid() } == 0 {
            let u = crate::ordinary_user(&self.user_name).map_err(|why| {
                anyhow::anyhow!(
                    "the shared directory must belong to an ordinary user (as root, gatevm refuses a writable share of a root-owned directory): {why}"
                )
            })?;
            Some(u)
        } else {
            None
        };
        let ids = owner.as_ref().map(|u| (u.uid, u.gid));
        // Its own directory (the scratch directory is root's, mode 0700, which the file server
        // running as the owner could not enter).
        let top = Scratch::new("gatevm-bench-vol")?;
        give(top.path(), ids)?;
        let share = top.path().join("share");
        std::fs::create_dir(&share)
            .with_context(|| format!("cannot create {}", share.display()))?;
        give(&share, ids)?;
        let fs = fs_of(&share);

        let mib = self.volume_mib;
        let bytes = mib << 20;
        let read_file = share.join(READ_FILE);
        let host_file = share.join(HOST_WRITE_FILE);
        eprintln!("volume: writing the {mib} MiB file the reads read");
        write_zeros(&read_file, mib)?;

        let gv = self.gv.on(VOL_INSTANCE);
        gv.delete()?;
        let _cleanup = DeleteOnDrop(self.gv.on(VOL_INSTANCE));
        let spec = format!("{}:{GUEST_DIR}", share.display());
        eprintln!("volume: starting instance {VOL_INSTANCE:?} with -v {spec}");
        gv.start_with(&["-v", &spec])?;
        let st = gv.status()?;
        if st.backend.is_some() && self.backend.is_none() {
            self.backend = st.backend.clone();
        }

        // Generous: a share under software emulation can be a few MiB/s.
        let timeout = Duration::from_secs(300 + mib * 2);
        let write_args = |of: &Path| {
            vec![
                "if=/dev/zero".to_string(),
                format!("of={}", of.display()),
                "bs=1M".to_string(),
                format!("count={mib}"),
                "conv=fsync".to_string(),
            ]
        };
        let read_args = vec![
            format!("if={}", read_file.display()),
            "of=/dev/null".to_string(),
            "bs=1M".to_string(),
        ];
        let (write_sh, read_sh) = (guest_write_script(mib), guest_read_script());
        let mut runs: [Vec<DdRun>; 4] = Default::default();
        for i in 1..=self.runs {
            let f = gv.exec_output(&["sh", "-c", &write_sh], timeout)?;
            runs[0].push(DdRun::of(&f, bytes)?);
            runner::check_interrupted()?;

            let f = host_dd(&write_args(&host_file), timeout, self.scratch)?;
            runs[1].push(DdRun::of(&f, bytes)?);
            let _ = std::fs::remove_file(&host_file);
            runner::check_interrupted()?;

            drop_host_cache(&read_file)?;
            let f = gv.exec_output(&["sh", "-c", &read_sh], timeout)?;
            runs[2].push(DdRun::of(&f, bytes)?);
            runner::check_interrupted()?;

            drop_host_cache(&read_file)?;
            let f = host_dd(&read_args, timeout, self.scratch)?;
            runs[3].push(DdRun::of(&f, bytes)?);
            runner::check_interrupted()?;

            let rate = |k: usize| num(mib as f64 / runs[k][i - 1].secs);
            eprintln!(
                "volume {i}/{}: guest write {} MiB/s (host {}), guest read {} MiB/s (host {})",
                self.runs,
                rate(0),
                rate(1),
                rate(2),
                rate(3)
            );
        }
        drop(_cleanup);

        let rates: Vec<Vec<f64>> = runs
            .iter()
            .map(|r| r.iter().map(|d| mib as f64 / d.secs).collect())
            .collect();
        let s: Vec<_> = rates.iter().map(|r| summary(r)).collect();
        let mut t = Table::new(&[
            ("measurement", Align::Left),
            ("n", Align::Right),
            ("min (MiB/s)", Align::Right),
            ("median (MiB/s)", Align::Right),
            ("max (MiB/s)", Align::Right),
            ("median time (ms)", Align::Right),
            ("median / host", Align::Right),
        ]);
        let rows = [
            (
                format!("guest write into the share: `dd if=/dev/zero of={GUEST_DIR}/{WRITE_FILE} bs=1M count={mib} conv=fsync`"),
                0,
                1,
            ),
            (
                "baseline: the same dd on the host, into the same directory".to_string(),
                1,
                1,
            ),
            (
                format!("guest read from the share of the host's file: `dd if={GUEST_DIR}/{READ_FILE} of=/dev/null bs=1M`"),
                2,
                3,
            ),
            (
                "baseline: the same dd on the host, from the same directory".to_string(),
                3,
                3,
            ),
        ];
        for (what, k, base) in rows {
            t.row(&[
                what,
                s[k].n.to_string(),
                num(s[k].min),
                num(s[k].median),
                num(s[k].max),
                num(mib as f64 / s[k].median * 1000.0),
                times(ratio(s[k].median, s[base].median)),
            ]);
        }
        // What the `gatevm exec` round trip adds around the guest's dd.
        let overhead: Vec<f64> = runs[0]
            .iter()
            .chain(&runs[2])
            .map(|d| (d.wall - d.secs) * 1000.0)
            .collect();
        let owner_text = match &owner {
            Some(u) => format!(
                "owned by the ordinary user {} ({}:{}; gatevm ran as root, so the file server runs as that user)",
                u.name, u.uid, u.gid
            ),
            None => "owned by the user the tool ran as".to_string(),
        };
        Ok(Section {
            title: "Shared directory throughput".into(),
            intro: vec![format!(
                "Runs: {}. A file of {mib} MiB ({} bytes) written and read sequentially in 1 MiB blocks, in the guest through a shared directory (`gatevm start {VOL_INSTANCE} -v DIR:{GUEST_DIR}`, virtio-fs) and on the host in the same directory DIR: a fresh directory under {} on {fs}, {owner_text}.",
                self.runs,
                bytes,
                std::env::temp_dir().display()
            )],
            tables: vec![t],
            targets: vec![],
            notes: vec![
                format!(
                    "Throughput is {mib} MiB over dd's own elapsed time (its last line on stderr, in the C locale), so the `gatevm exec` round trip around the guest's dd is not counted; that round trip (exec wall time minus dd's time, which also holds the `rm` before a write and the `sync` and `drop_caches` before a read) was median {} ms. Each run does, in turn: the guest write, the host write, the guest read, the host read; each write starts from a new file and ends with its fsync (`conv=fsync`, inside dd's time).",
                    num(summary(&overhead).median)
                ),
                format!(
                    "Reads start cold on both sides: before each read the file's pages are dropped from the host's page cache (fsync, then `posix_fadvise(POSIX_FADV_DONTNEED)`), and before a guest read from the guest's too (`sync; echo 3 > /proc/sys/vm/drop_caches`, outside dd's time). The file read is written once by the host before the runs ({READ_FILE}, zeros)."
                ),
                format!(
                    "gatevm: instance `{VOL_INSTANCE}` (default 2 CPUs, 2048 MiB; backend {}); under QEMU the share is served by virtiofsd (`--cache=auto`), under libkrun by its built-in virtio-fs. The benchmark instance is stopped meanwhile, so one VM runs; `{VOL_INSTANCE}` is deleted at the end.",
                    st.backend.as_deref().unwrap_or("unknown")
                ),
            ],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dd_summaries() {
        let gnu = "256+0 records in\n256+0 records out\n268435456 bytes (268 MB, 256 MiB) copied, 0.52 s, 516 MB/s\n";
        assert_eq!(parse_dd(gnu), Some((268_435_456, 0.52)));
        let busybox = "256+0 records in\n256+0 records out\n268435456 bytes (256.0MB) copied, 1.250000 seconds, 204.8MB/s\n";
        assert_eq!(parse_dd(busybox), Some((268_435_456, 1.25)));
        let big = "1073741824 bytes (1.1 GB, 1.0 GiB) copied, 12 s, 89.5 MB/s";
        assert_eq!(parse_dd(big), Some((1_073_741_824, 12.0)));
        // A progress line before the summary, and noise after it.
        let mixed = "100 bytes copied, 9 s, x\n33554432 bytes (34 MB, 32 MiB) copied, 0.1 s, 335 MB/s\nwarning: x\n";
        assert_eq!(parse_dd(mixed), Some((33_554_432, 0.1)));
        assert_eq!(parse_dd(""), None);
        assert_eq!(
            parse_dd("dd: failed to open '/share/f': Permission denied\n"),
            None
        );
        // Another locale's decimal comma is not read as a number.
        assert_eq!(parse_dd("5 bytes (5 B) copied, 0,5 s, 10 B/s"), None);
        assert_eq!(parse_dd("5 bytes copied, 0.5 minutes, 10 B/s"), None);
    }

    #[test]
    fn dd_runs_check_the_size() {
        let s = Scratch::new("gatevm-bench-test").unwrap();
        let mut c = Command::new("sh");
        c.args([
            "-c",
            "echo '1048576 bytes (1.0 MB, 1.0 MiB) copied, 0.25 s, 4.2 MB/s' >&2",
        ]);
        let f = runner::run(&mut c, Duration::from_secs(10), &s).unwrap();
        let d = DdRun::of(&f, 1 << 20).unwrap();
        assert_eq!(d.secs, 0.25);
        assert!(d.wall > 0.0);
        let short = DdRun::of(&f, 2 << 20).unwrap_err().to_string();
        assert!(
            short.contains("copied 1048576 bytes, not 2097152"),
            "{short}"
        );
        let mut c = Command::new("true");
        let f = runner::run(&mut c, Duration::from_secs(10), &s).unwrap();
        assert!(DdRun::of(&f, 1)
            .unwrap_err()
            .to_string()
            .contains("no dd summary"));
    }

    #[test]
    fn host_dd_writes_and_reads_what_the_guest_would() {
        let s = Scratch::new("gatevm-bench-test").unwrap();
        let g = s.path().join("g");
        write_zeros(&g, 2).unwrap();
        assert_eq!(std::fs::metadata(&g).unwrap().len(), 2 << 20);
        drop_host_cache(&g).unwrap();
        let f = host_dd(
            &[
                format!("if={}", g.display()),
                "of=/dev/null".into(),
                "bs=1M".into(),
            ],
            Duration::from_secs(30),
            &s,
        )
        .unwrap();
        assert!(DdRun::of(&f, 2 << 20).is_ok(), "{}", f.stderr);
        assert!(drop_host_cache(&s.path().join("missing")).is_err());
    }

    #[test]
    fn guest_scripts() {
        assert_eq!(
            guest_write_script(32),
            "rm -f /share/f && LC_ALL=C exec dd if=/dev/zero of=/share/f bs=1M count=32 conv=fsync"
        );
        assert!(guest_read_script().ends_with("dd if=/share/g of=/dev/null bs=1M"));
        assert!(guest_read_script().starts_with("sync && echo 3 > /proc/sys/vm/drop_caches && "));
    }

    #[test]
    fn filesystem_names() {
        assert_eq!(fs_name(0xEF53), "ext2/3/4");
        assert_eq!(fs_name(0x0102_1994), "tmpfs");
        assert_eq!(fs_name(0x1234), "filesystem type 0x1234");
        assert!(!fs_of(Path::new("/")).is_empty());
    }
}
