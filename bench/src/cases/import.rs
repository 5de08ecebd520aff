//! Image import throughput: `gatevm image import` of a docker-save archive of random bytes, and
//! the host's own `ctr images import` of the same archive through the instance's containerd
//! socket, beside a host-side copy of the same file.

use super::{summary, Bench};
use crate::docker::{write_archive, REPO_TAG};
use crate::markdown::{num, times, Align, Section, Table};
use crate::runner;
use crate::scratch::Scratch;
use crate::stats::ratio;
use anyhow::Context;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
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

/// The containerd namespace the host's `ctr` imports into (gatevm's default).
pub const CTR_NAMESPACE: &str = "k8s.io";

/// The host's `ctr` and the instance's containerd socket it talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCtr {
    /// The `ctr` binary.
    pub bin: PathBuf,
    /// The socket (`gatevm status --json`'s `containerd_socket`).
    pub socket: String,
}

impl HostCtr {
    /// The host's `ctr` named by `--host-ctr` on the socket the status names, or why the row
    /// through it cannot be measured.
    pub fn find(
        bin: Option<&Path>,
        socket: Option<&str>,
        instance: &str,
    ) -> Result<HostCtr, String> {
        let bin = bin.ok_or_else(|| {
            "no host ctr was given (--host-ctr PATH; scripts/bench.sh passes the one scripts/host-ctr.sh prints)".to_string()
        })?;
        if !bin.is_file() {
            return Err(format!("--host-ctr {} is not a file", bin.display()));
        }
        let socket = socket.ok_or_else(|| {
            format!("`gatevm status {instance} --json` names no containerd_socket (this gatevm has none)")
        })?;
        Ok(HostCtr {
            bin: bin.to_owned(),
            socket: socket.to_string(),
        })
    }

    /// `ctr --address SOCKET --namespace k8s.io ARGS...`.
    pub fn command<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(["--address", &self.socket, "--namespace", CTR_NAMESPACE])
            .args(args);
        c
    }

    /// `ctr ... images import ARCHIVE`: the wall time.
    pub fn import(
        &self,
        archive: &Path,
        timeout: Duration,
        scratch: &Scratch,
    ) -> anyhow::Result<Duration> {
        let mut c = self.command(&[
            std::ffi::OsStr::new("images"),
            std::ffi::OsStr::new("import"),
            archive.as_os_str(),
        ]);
        Ok(runner::run(&mut c, timeout, scratch)?.ok()?.elapsed)
    }

    /// `ctr --version`'s line (`ctr github.com/containerd/containerd 1.6.20~ds1`), or `unknown`.
    pub fn version(&self, scratch: &Scratch) -> String {
        let mut c = Command::new(&self.bin);
        c.arg("--version");
        runner::run(&mut c, Duration::from_secs(30), scratch)
            .and_then(|f| f.ok())
            .ok()
            .and_then(|f| runner::last_line(&f.stdout).map(str::to_string))
            .unwrap_or_else(|| "version unknown".to_string())
    }
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
        let ctr = HostCtr::find(
            self.host_ctr.as_deref(),
            st.containerd_socket.as_deref(),
            &self.gv.name,
        );
        let ctr_version = match &ctr {
            Ok(c) => c.version(self.scratch),
            Err(_) => String::new(),
        };

        let (mut guest, mut via_ctr, mut host) = (Vec::new(), Vec::new(), Vec::new());
        let copy = self.scratch.path().join("bench-image-copy.tar");
        for i in 1..=self.runs {
            let t = self.gv.image_import(&archive, timeout)?;
            self.gv.image_rm(REPO_TAG)?;
            guest.push(size_mib / t.as_secs_f64());
            runner::check_interrupted()?;
            let mut others = Vec::new();
            if let Ok(ctr) = &ctr {
                let t = ctr.import(&archive, timeout, self.scratch)?;
                // `gatevm image rm` removes what the host's ctr imported too (same namespace).
                self.gv.image_rm(REPO_TAG)?;
                via_ctr.push(size_mib / t.as_secs_f64());
                others.push(format!(
                    "host ctr {} MiB/s",
                    num(size_mib / t.as_secs_f64())
                ));
                runner::check_interrupted()?;
            }
            let c = host_copy(&archive, &copy)?;
            host.push(size_mib / c.as_secs_f64());
            others.push(format!("host copy {} MiB/s", num(host[i - 1])));
            eprintln!(
                "import {i}/{}: {} MiB/s ({})",
                self.runs,
                num(guest[i - 1]),
                others.join(", ")
            );
        }
        let _ = std::fs::remove_file(&archive);

        let (g, c, h) = (summary(&guest), summary(&via_ctr), summary(&host));
        let mut t = Table::new(&[
            ("measurement", Align::Left),
            ("n", Align::Right),
            ("min (MiB/s)", Align::Right),
            ("median (MiB/s)", Align::Right),
            ("max (MiB/s)", Align::Right),
            ("median time (ms)", Align::Right),
            ("median / host copy", Align::Right),
        ]);
        let ctr_what = format!(
            "host `ctr images import` of the same archive through the instance's containerd socket (namespace {CTR_NAMESPACE})"
        );
        for (what, s) in [
            (
                format!(
                    "`gatevm image import bench` of a {} MiB docker-save archive",
                    num(size_mib)
                ),
                &g,
            ),
            (ctr_what, &c),
            (
                "baseline: host copy of the same file (std::fs::copy + fsync)".to_string(),
                &h,
            ),
        ] {
            if s.n == 0 {
                let why = ctr.as_ref().err().map(String::as_str).unwrap_or("no runs");
                t.row(&[
                    format!("{what}: not measured ({why})"),
                    "0".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ]);
                continue;
            }
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
        let mut notes = vec![
            "Throughput is the archive's size over the wall time of `gatevm image import` (host-side checks, streaming into the guest, containerd's import and unpack).".to_string(),
        ];
        match &ctr {
            Ok(ctr) => notes.push(format!(
                "The host's `ctr` ({v}) runs as `ctr --address SOCKET --namespace {CTR_NAMESPACE} images import ARCHIVE`, SOCKET being `gatevm status bench --json`'s `containerd_socket` ({}): it reads the archive on the host and writes its content into the guest's containerd over containerd's API (the socket gatevm relays into the guest), then asks it to unpack; `gatevm image import` instead streams the archive into `ctr images import -` run in the guest. Both unpack with the guest containerd's default snapshotter. Each run does the three in turn (gatevm, ctr, host copy), each import followed by its removal.",
                ctr.socket,
                v = ctr_version
            )),
            Err(why) => {
                self.not_measured
                    .push(format!("Image import through the host's ctr: {why}."));
            }
        }
        Ok(Section {
            title: "Image import throughput".into(),
            intro: vec![format!(
                "Runs: {}. The archive holds one layer: a tar with a single file of {} MiB of random (incompressible) bytes, tagged `{REPO_TAG}`; the image is removed (`gatevm image rm bench {REPO_TAG}`) after each import, outside the measured time.",
                self.runs, self.import_mib
            )],
            tables: vec![t],
            targets: vec![],
            notes,
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

    #[test]
    fn host_ctr_needs_a_binary_and_a_socket() {
        let s = Scratch::new("gatevm-bench-test").unwrap();
        let bin = s.path().join("ctr");
        std::fs::write(&bin, b"").unwrap();
        let none = HostCtr::find(None, Some("/s"), "bench").unwrap_err();
        assert!(none.contains("--host-ctr"), "{none}");
        let missing = HostCtr::find(Some(&s.path().join("nope")), Some("/s"), "bench").unwrap_err();
        assert!(missing.contains("is not a file"), "{missing}");
        let no_sock = HostCtr::find(Some(&bin), None, "bench").unwrap_err();
        assert!(no_sock.contains("containerd_socket"), "{no_sock}");
        let ctr = HostCtr::find(Some(&bin), Some("/run/x/containerd.sock"), "bench").unwrap();
        let c = ctr.command(&["images", "import", "/a.tar"]);
        assert_eq!(
            runner::label(&c),
            "ctr --address /run/x/containerd.sock --namespace k8s.io images import /a.tar"
        );
    }
}
