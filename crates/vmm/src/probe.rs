//! What the host can virtualize with.
//!
//! `/dev/kvm` existing is not enough: under `kvm_pvm` (a KVM module for PVM guest kernels, found on
//! some cloud machines) a normal guest kernel dies after ~14 s with KVM_EXIT_INTERNAL_ERROR. We count
//! KVM as usable only with the vmx or svm CPU flag, a `/dev/kvm` we can open read-write, and no
//! `kvm_pvm` module.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// The host's virtualization facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCaps {
    /// The CPU advertises vmx (Intel) or svm (AMD).
    pub cpu_virt_flag: bool,
    /// `/dev/kvm` exists.
    pub kvm_device: bool,
    /// `/dev/kvm` opens read-write for us.
    pub kvm_accessible: bool,
    /// The loaded KVM flavour: `kvm_intel`, `kvm_amd`, `kvm_pvm`, or none.
    pub kvm_flavour: Option<String>,
    /// `/dev/vhost-vsock` exists.
    pub vhost_vsock: bool,
    /// `/dev/vhost-net` exists.
    pub vhost_net: bool,
}

impl HostCaps {
    /// Hardware virtualization that can boot an ordinary guest kernel.
    pub fn hardware_virt(&self) -> bool {
        self.cpu_virt_flag && self.kvm_accessible && self.kvm_flavour.as_deref() != Some("kvm_pvm")
    }

    /// Why hardware virtualization is not usable, in a few words (None when it is).
    pub fn why_no_hardware_virt(&self) -> Option<String> {
        if self.kvm_flavour.as_deref() == Some("kvm_pvm") {
            return Some(
                "/dev/kvm is provided by kvm_pvm, which boots only PVM guest kernels".into(),
            );
        }
        if !self.cpu_virt_flag {
            return Some("the CPU has no vmx/svm flag (no nested virtualization here)".into());
        }
        if !self.kvm_device {
            return Some("/dev/kvm does not exist (load kvm_intel or kvm_amd)".into());
        }
        if !self.kvm_accessible {
            return Some(
                "/dev/kvm is not accessible read-write (add the user to the kvm group)".into(),
            );
        }
        None
    }
}

/// Reads the host's capabilities from `/proc`, `/sys` and `/dev` under `root` ("/" normally).
pub fn probe_at(root: &Path) -> HostCaps {
    let cpuinfo = std::fs::read_to_string(root.join("proc/cpuinfo")).unwrap_or_default();
    let cpu_virt_flag = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let kvm = root.join("dev/kvm");
    let kvm_device = kvm.exists();
    let kvm_accessible = kvm_device
        && std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&kvm)
            .is_ok();
    let kvm_flavour = ["kvm_pvm", "kvm_intel", "kvm_amd"]
        .into_iter()
        .find(|m| root.join("sys/module").join(m).exists())
        .map(str::to_string);
    HostCaps {
        cpu_virt_flag,
        kvm_device,
        kvm_accessible,
        kvm_flavour,
        vhost_vsock: root.join("dev/vhost-vsock").exists(),
        vhost_net: root.join("dev/vhost-net").exists(),
    }
}

/// The host's TSC frequency in kHz, measured against CLOCK_MONOTONIC over ~5 ms and rounded to
/// 1 MHz; None where there is no usable TSC.
///
/// Each TSC read is bracketed by two clock reads, and a sample whose brackets are wide (the thread
/// was preempted between the reads, common on a loaded host) is dropped: an unbracketed read
/// counts the preemption as time without ticks and gives the guest a frequency that is far too
/// low. The median of the good samples is taken.
pub fn host_tsc_khz() -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let flags = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .unwrap_or("");
        if !flags.split_whitespace().any(|f| f == "constant_tsc") {
            return None;
        }
        let mut samples = Vec::new();
        for _ in 0..8 {
            if let Some(khz) = tsc_sample() {
                samples.push(khz);
            }
            if samples.len() == 3 {
                break;
            }
        }
        samples.sort_unstable();
        let khz = *samples.get(samples.len() / 2)?;
        let mhz = (khz + 500) / 1000;
        (mhz > 100).then_some(mhz * 1000)
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// One TSC frequency sample in kHz over ~2 ms, None when a read was not tightly bracketed.
#[cfg(target_arch = "x86_64")]
fn tsc_sample() -> Option<u64> {
    use std::time::{Duration, Instant};
    let bracketed = || {
        let a = Instant::now();
        // SAFETY: rdtsc has no preconditions on x86_64.
        let c = unsafe { core::arch::x86_64::_rdtsc() };
        let b = Instant::now();
        (b.duration_since(a) < Duration::from_micros(20)).then_some((a, c))
    };
    let (t0, c0) = bracketed()?;
    std::thread::sleep(Duration::from_millis(2));
    let (t1, c1) = bracketed()?;
    let ns = t1.duration_since(t0).as_nanos() as u64;
    if ns == 0 || c1 <= c0 {
        return None;
    }
    Some((c1 - c0).saturating_mul(1_000_000) / ns)
}

/// Reads this host's capabilities.
pub fn probe() -> HostCaps {
    probe_at(Path::new("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(flags: &str, module: Option<&str>, kvm: bool) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("proc")).unwrap();
        std::fs::write(
            d.path().join("proc/cpuinfo"),
            format!("processor\t: 0\nflags\t\t: fpu {flags} sse\n"),
        )
        .unwrap();
        std::fs::create_dir_all(d.path().join("dev")).unwrap();
        if kvm {
            std::fs::write(d.path().join("dev/kvm"), "").unwrap();
        }
        if let Some(m) = module {
            std::fs::create_dir_all(d.path().join("sys/module").join(m)).unwrap();
        }
        d
    }

    #[test]
    fn pvm_is_not_hardware_virt() {
        let d = fake("", Some("kvm_pvm"), true);
        let c = probe_at(d.path());
        assert!(c.kvm_device && !c.hardware_virt());
        assert!(c.why_no_hardware_virt().unwrap().contains("kvm_pvm"));
    }

    #[test]
    fn vmx_with_kvm_intel_is_hardware_virt() {
        let d = fake("vmx", Some("kvm_intel"), true);
        let c = probe_at(d.path());
        assert!(c.hardware_virt(), "{c:?}");
        assert_eq!(c.why_no_hardware_virt(), None);
    }

    #[test]
    fn missing_pieces_are_named() {
        let c = probe_at(fake("svm", Some("kvm_amd"), false).path());
        assert!(c.why_no_hardware_virt().unwrap().contains("does not exist"));
        let c = probe_at(fake("", None, true).path());
        assert!(c.why_no_hardware_virt().unwrap().contains("vmx/svm"));
    }

    /// The measurement holds steady while the host is busy: two measurements taken while other
    /// threads keep every core busy agree within 3% (unbracketed reads used to come out several
    /// times too low under load, and the guest then ran its clock that much too fast).
    #[test]
    fn tsc_frequency_is_steady_under_load() {
        let Some(first) = host_tsc_khz() else {
            gatevm_testkit::skip(
                "tsc_frequency_is_steady_under_load",
                "this host has no constant TSC (or rdtsc is not x86_64)",
            );
            return;
        };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let spinners: Vec<_> = (0..cores * 2)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        let loaded: Vec<Option<u64>> = (0..5).map(|_| host_tsc_khz()).collect();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for s in spinners {
            s.join().unwrap();
        }
        let measured: Vec<u64> = loaded.into_iter().flatten().collect();
        assert!(
            measured.len() >= 3,
            "only {} of 5 measurements under load",
            measured.len()
        );
        for khz in measured {
            let diff = khz.abs_diff(first) as f64 / first as f64;
            assert!(diff < 0.03, "{khz} kHz under load against {first} kHz idle");
        }
    }
}
