//! Image import throughput: `gatevm image import` of a docker-save archive of random bytes,
//! beside a host-side copy of the same file.

use super::{summary, Bench};
use crate::docker::{write_archive, REPO_TAG};
use crate::markdown::{num, times, Align, Section, Table};
use crate::stats::ratio;
use anyhow::Context;
use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

const MIB: f64 = 1024.0 * 1024.0;

/// Copies `from` to `to` and fsyncs the copy: the wall time.
pub fn host_copy(from: &Path, to: &Path) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    std::fs::copy(from, to)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    File::open(to)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot fsync {}", to.display()))?;
    let d = t0.elapsed();
    let _ = std::fs::remove_file(to);
    Ok(d)
}

impl Bench<'_> {
    /// Runs the import case.
    pub fn import(&mut self) -> anyhow::Result<Section> {
        let st = self.gv.ensure_running()?;
        if st.backend.is_some() {
            self.backend = st.backend;
        }
        let archive = self.scratch.path().join("bench-image.tar");
        let layer = self.scratch.path().join("bench-layer.tar");
        let payload_len = self.import_mib * 1024 * 1024;
        eprintln!(
            "import: writing a {} MiB docker-save archive of random bytes",
            self.import_mib
        );
        let random = File::open("/dev/urandom").context("cannot open /dev/urandom")?;
        let info = write_archive(&archive, &layer, random, payload_len)?;
        let _ = std::fs::remove_file(&layer);
        let size_mib = info.bytes as f64 / MIB;
        // Generous: a slow guest disk under software emulation can be a few MiB/s.
        let timeout = Duration::from_secs(600.max(self.import_mib * 5));
        // A leftover of an interrupted run would make the first import a re-import.
        let _ = self.gv.image_rm(REPO_TAG);

        let (mut guest, mut host) = (Vec::new(), Vec::new());
        let copy = self.scratch.path().join("bench-image-copy.tar");
        for i in 1..=self.runs {
            let t = self.gv.image_import(&archive, timeout)?;
            self.gv.image_rm(REPO_TAG)?;
            guest.push(size_mib / t.as_secs_f64());
            crate::runner::check_interrupted()?;
            let c = host_copy(&archive, &copy)?;
            host.push(size_mib / c.as_secs_f64());
            eprintln!(
                "import {i}/{}: {} MiB/s (host copy {} MiB/s)",
                self.runs,
                num(guest[i - 1]),
                num(host[i - 1])
            );
        }
        let _ = std::fs::remove_file(&archive);

        let (g, h) = (summary(&guest), summary(&host));
        let mut t = Table::new(&[
            ("measurement", Align::Left),
            ("n", Align::Right),
            ("min (MiB/s)", Align::Right),
            ("median (MiB/s)", Align::Right),
            ("max (MiB/s)", Align::Right),
            ("median time (ms)", Align::Right),
            ("median / host copy", Align::Right),
        ]);
        for (what, s) in [
            (
                format!(
                    "`gatevm image import bench` of a {} MiB docker-save archive",
                    num(size_mib)
                ),
                &g,
            ),
            (
                "baseline: host copy of the same file (std::fs::copy + fsync)".to_string(),
                &h,
            ),
        ] {
            t.row(&[
                what,
                s.n.to_string(),
                num(s.min),
                num(s.median),
                num(s.max),
                num(size_mib / s.median * 1000.0),
                times(ratio(s.median, h.median)),
            ]);
        }
        Ok(Section {
            title: "Image import throughput".into(),
            intro: vec![format!(
                "Runs: {}. The archive holds one layer: a tar with a single file of {} MiB of random (incompressible) bytes, tagged `{REPO_TAG}`; the image is removed (`gatevm image rm bench {REPO_TAG}`) after each import, outside the measured time.",
                self.runs, self.import_mib
            )],
            tables: vec![t],
            targets: vec![],
            notes: vec![
                "Throughput is the archive's size over the wall time of `gatevm image import` (host-side checks, streaming into the guest, containerd's import and unpack).".into(),
            ],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scratch::Scratch;

    #[test]
    fn host_copy_copies_and_cleans_up() {
        let s = Scratch::new("gatevm-bench-test").unwrap();
        let from = s.path().join("a");
        std::fs::write(&from, vec![7u8; 100_000]).unwrap();
        let to = s.path().join("b");
        host_copy(&from, &to).unwrap();
        assert!(!to.exists());
        assert!(host_copy(&s.path().join("missing"), &to).is_err());
    }
}
