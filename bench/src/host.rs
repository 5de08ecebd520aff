//! Facts about the host: CPU, memory, kernel, whether KVM is usable, which QEMU the bare boots
//! use, and whether a binary is statically linked. (Where gatevm's runtime lives comes from
//! `gatevm_runtime::dirs`, gatevm's own lookup.)

use anyhow::{bail, Context};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// What /proc/cpuinfo says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuInfo {
    /// The first `model name`, or `unknown`.
    pub model: String,
    /// Number of `processor` entries.
    pub count: usize,
    /// Whether the flags name vmx or svm (hardware virtualization).
    pub virt: bool,
}

/// Parses /proc/cpuinfo.
pub fn parse_cpuinfo(text: &str) -> CpuInfo {
    let mut model = None;
    let mut count = 0;
    let mut virt = false;
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        match k.trim() {
            "processor" => count += 1,
            "model name" if model.is_none() => {
                model = Some(v.split_whitespace().collect::<Vec<_>>().join(" "))
            }
            "flags" => virt |= v.split_whitespace().any(|f| f == "vmx" || f == "svm"),
            _ => {}
        }
    }
    CpuInfo {
        model: model.unwrap_or_else(|| "unknown".to_string()),
        count,
        virt,
    }
}

/// `MemTotal` of /proc/meminfo in KiB.
pub fn parse_mem_total_kib(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// QEMU's accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl Accel {
    /// The `-accel` value.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The accelerator and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    /// The accelerator.
    pub accel: Accel,
    /// A short explanation for the report.
    pub why: String,
}

/// KVM only if /dev/kvm can be opened for writing, the CPU has vmx or svm, and kvm_pvm (a
/// paravirtual KVM whose /dev/kvm QEMU cannot use) is not loaded: as scripts/bench-boot.sh did.
pub fn choose_accel(kvm_writable: bool, cpu_virt: bool, kvm_pvm_loaded: bool) -> AccelChoice {
    let why = if kvm_pvm_loaded {
        "kvm_pvm is loaded (/sys/module/kvm_pvm): /dev/kvm is not usable"
    } else if !kvm_writable {
        "/dev/kvm is missing or not writable"
    } else if !cpu_virt {
        "no vmx/svm in /proc/cpuinfo"
    } else {
        return AccelChoice {
            accel: Accel::Kvm,
            why: "/dev/kvm usable".to_string(),
        };
    };
    AccelChoice {
        accel: Accel::Tcg,
        why: format!("software emulation: {why}"),
    }
}

/// The host's CPU, memory, kernel and accelerator.
#[derive(Debug, Clone)]
pub struct Machine {
    /// CPU model name.
    pub cpu: String,
    /// Logical CPUs.
    pub cores: usize,
    /// Total RAM in KiB, when known.
    pub ram_kib: Option<u64>,
    /// Kernel release.
    pub kernel: String,
    /// QEMU's accelerator here.
    pub accel: AccelChoice,
}

impl Machine {
    /// Reads /proc and /sys.
    pub fn probe() -> Machine {
        let cpu = parse_cpuinfo(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default());
        let ram_kib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| parse_mem_total_kib(&t));
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".to_string());
        let kvm_writable = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        let accel = choose_accel(
            kvm_writable,
            cpu.virt,
            Path::new("/sys/module/kvm_pvm").exists(),
        );
        Machine {
            cpu: cpu.model,
            cores: cpu.count.max(1),
            ram_kib,
            kernel,
            accel,
        }
    }
}

/// The QEMU of the bare-boot baseline: the runtime's bundled one with its firmware directories,
/// else the system's `qemu-system-x86_64` from PATH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qemu {
    /// The binary.
    pub bin: PathBuf,
    /// `-L DIR` arguments.
    pub data_dirs: Vec<PathBuf>,
}

/// Finds QEMU as scripts/bench-boot.sh did.
pub fn find_qemu(runtime: &Path, path_var: Option<OsString>) -> anyhow::Result<Qemu> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let bundled = runtime.join("qemu/usr/bin/qemu-system-x86_64");
    if executable(&bundled) {
        let data_dirs = ["qemu/usr/share/qemu", "qemu/usr/share/seabios"]
            .iter()
            .map(|d| runtime.join(d))
            .filter(|d| d.is_dir())
            .collect();
        return Ok(Qemu {
            bin: bundled,
            data_dirs,
        });
    }
    if let Some(p) = path_var {
        for dir in std::env::split_paths(&p) {
            let cand = dir.join("qemu-system-x86_64");
            if executable(&cand) {
                return Ok(Qemu {
                    bin: cand,
                    data_dirs: vec![],
                });
            }
        }
    }
    bail!(
        "no QEMU: neither {} nor qemu-system-x86_64 on PATH: run `gatevm setup`",
        bundled.display()
    )
}

/// The bare boot's QEMU arguments (those of scripts/bench-boot.sh): a microVM with the runtime's
/// kernel and the baseline initramfs, console on a file, exiting when the guest powers off.
pub fn bare_boot_args(
    qemu: &Qemu,
    accel: Accel,
    kernel: &Path,
    initrd: &Path,
    console: &Path,
) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    for d in &qemu.data_dirs {
        a.push("-L".into());
        a.push(d.into());
    }
    for s in [
        "-M",
        "microvm,x-option-roms=off,rtc=on",
        // Modern virtio-mmio devices, as gatevm's VMs have (for the network baseline's NIC).
        "-global",
        "virtio-mmio.force-legacy=false",
        "-accel",
        accel.name(),
        "-smp",
        "2",
        "-m",
        "2048",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
    ] {
        a.push(s.into());
    }
    let mut serial = OsString::from("file:");
    serial.push(console);
    a.push("-serial".into());
    a.push(serial);
    a.push("-kernel".into());
    a.push(kernel.into());
    a.push("-initrd".into());
    a.push(initrd.into());
    a.push("-append".into());
    // As gatevm boots a TCG guest: the host's TSC frequency given, so the guest kernel does not
    // calibrate it (which under emulation is slow and now and then hangs).
    let mut cmdline = String::from("console=ttyS0 quiet panic=-1");
    if let (Accel::Tcg, Some(khz)) = (accel, host_tsc_khz()) {
        cmdline.push_str(&format!(" tsc_early_khz={khz}"));
    }
    a.push(cmdline.into());
    a
}

/// The host's TSC frequency in kHz, measured as gatevm's QEMU backend does (None without a
/// constant TSC).
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
        let t0 = std::time::Instant::now();
        // SAFETY: rdtsc has no preconditions on x86_64.
        let c0 = unsafe { core::arch::x86_64::_rdtsc() };
        std::thread::sleep(std::time::Duration::from_millis(5));
        // SAFETY: as above.
        let c1 = unsafe { core::arch::x86_64::_rdtsc() };
        let ns = t0.elapsed().as_nanos() as u64;
        if ns == 0 || c1 <= c0 {
            return None;
        }
        let mhz = ((c1 - c0).saturating_mul(1_000_000) / ns + 500) / 1000;
        (mhz > 100).then_some(mhz * 1000)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// Whether a 64-bit little-endian ELF file asks for a program interpreter (is dynamically
/// linked). An error says why the bytes are not such an ELF file.
pub fn elf_is_dynamic(b: &[u8]) -> Result<bool, String> {
    if b.len() < 64 || &b[..4] != b"\x7fELF" {
        return Err("not an ELF file".to_string());
    }
    if b[4] != 2 || b[5] != 1 {
        return Err("not a 64-bit little-endian ELF file".to_string());
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap_or([0; 8]));
    let phentsize = u16_at(0x36);
    let phnum = u16_at(0x38);
    let phoff = usize::try_from(phoff).map_err(|_| "bad program header offset".to_string())?;
    if phentsize < 4 {
        return Err("bad program header size".to_string());
    }
    for i in 0..phnum {
        let at = phoff
            .checked_add(i * phentsize)
            .filter(|at| at + 4 <= b.len())
            .ok_or_else(|| "program headers past the end of the file".to_string())?;
        const PT_INTERP: u32 = 3;
        if u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Reads a static busybox from `path`, or says what to install.
pub fn static_busybox(path: &Path) -> anyhow::Result<Vec<u8>> {
    const FIX: &str =
        "the bare-boot baseline needs a static busybox: apt-get install busybox-static";
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{} is missing: {FIX}", path.display())
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    match elf_is_dynamic(&bytes) {
        Ok(false) => Ok(bytes),
        Ok(true) => bail!("{} is dynamically linked: {FIX}", path.display()),
        Err(why) => bail!("{} is {why}: {FIX}", path.display()),
    }
}

/// The 1, 5 and 15 minute load averages of a /proc/loadavg text.
pub fn parse_loadavg(text: &str) -> Option<[f64; 3]> {
    let mut it = text.split_whitespace().map(|w| w.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// The host's load averages now, as `1.23 / 2.34 / 3.45`, or `unknown`.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .as_deref()
        .and_then(parse_loadavg)
        .map(|[a, b, c]| format!("{a:.2} / {b:.2} / {c:.2}"))
        .unwrap_or_else(|| "unknown".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo() {
        let text = "processor\t: 0\nmodel name\t: AMD EPYC   7B13\nflags\t\t: fpu sse svm\n\n\
                    processor\t: 1\nmodel name\t: other\nflags\t\t: fpu sse\n";
        assert_eq!(
            parse_cpuinfo(text),
            CpuInfo {
                model: "AMD EPYC 7B13".into(),
                count: 2,
                virt: true
            }
        );
        let none = parse_cpuinfo("processor : 0\nflags : fpu vmxx\n");
        assert_eq!(
            (none.model.as_str(), none.count, none.virt),
            ("unknown", 1, false)
        );
    }

    #[test]
    fn meminfo() {
        assert_eq!(
            parse_mem_total_kib("MemTotal:        8029944 kB\nMemFree: 1 kB\n"),
            Some(8029944)
        );
        assert_eq!(parse_mem_total_kib("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn accel_needs_all_three() {
        assert_eq!(choose_accel(true, true, false).accel, Accel::Kvm);
        let pvm = choose_accel(true, true, true);
        assert_eq!(pvm.accel, Accel::Tcg);
        assert!(pvm.why.contains("kvm_pvm"));
        assert_eq!(choose_accel(false, true, false).accel, Accel::Tcg);
        assert_eq!(choose_accel(true, false, false).accel, Accel::Tcg);
    }

    #[test]
    fn bare_boot_args_match_the_old_script() {
        let q = Qemu {
            bin: "/q".into(),
            data_dirs: vec!["/a".into()],
        };
        let a = bare_boot_args(
            &q,
            Accel::Tcg,
            Path::new("/k"),
            Path::new("/i"),
            Path::new("/c"),
        );
        let a: Vec<String> = a.iter().map(|s| s.to_string_lossy().into_owned()).collect();
        let tsc = host_tsc_khz()
            .map(|k| format!(" tsc_early_khz={k}"))
            .unwrap_or_default();
        let joined = a.join(" ");
        // The TSC is measured afresh each call: compare up to it.
        assert_eq!(
            joined.split(" tsc_early_khz=").next().unwrap(),
            "-L /a -M microvm,x-option-roms=off,rtc=on -global virtio-mmio.force-legacy=false \
             -accel tcg -smp 2 -m 2048 -nodefaults \
             -no-user-config -nographic -no-reboot -serial file:/c -kernel /k -initrd /i \
             -append console=ttyS0 quiet panic=-1"
        );
        assert_eq!(
            joined.contains(" tsc_early_khz="),
            !tsc.is_empty(),
            "{joined}"
        );
    }

    fn elf(interp: bool) -> Vec<u8> {
        // Header (64 bytes) then two program headers of 56 bytes at offset 64.
        let mut b = vec![0u8; 64 + 2 * 56];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
        b[64..68].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        let second = if interp { 3u32 } else { 4u32 };
        b[120..124].copy_from_slice(&second.to_le_bytes());
        b
    }

    #[test]
    fn elf_interpreter_detection() {
        assert_eq!(elf_is_dynamic(&elf(true)), Ok(true));
        assert_eq!(elf_is_dynamic(&elf(false)), Ok(false));
        assert!(elf_is_dynamic(b"#!/bin/sh\n").is_err());
        let mut truncated = elf(false);
        truncated.truncate(100);
        assert!(elf_is_dynamic(&truncated).is_err());
        let mut elf32 = elf(false);
        elf32[4] = 1;
        assert!(elf_is_dynamic(&elf32).is_err());
    }

    #[test]
    fn this_machine_busybox_if_any() {
        // The real file, when it exists: a static busybox passes, anything else is named.
        let p = Path::new("/bin/busybox");
        if p.exists() {
            match static_busybox(p) {
                Ok(b) => assert!(!b.is_empty()),
                Err(e) => assert!(e.to_string().contains("busybox-static"), "{e}"),
            }
        }
        let missing = static_busybox(Path::new("/nonexistent/busybox")).unwrap_err();
        assert!(missing.to_string().contains("is missing"));
        assert!(missing
            .to_string()
            .contains("apt-get install busybox-static"));
    }

    #[test]
    fn load_averages() {
        assert_eq!(
            parse_loadavg("2.85 3.37 3.63 2/121 25095\n"),
            Some([2.85, 3.37, 3.63])
        );
        assert_eq!(parse_loadavg("2.85 x 3.63"), None);
        assert_eq!(parse_loadavg("1.0 2.0"), None);
        assert_eq!(parse_loadavg(""), None);
    }
}
