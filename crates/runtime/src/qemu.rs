//! Which QEMU runs the guests, and the pieces [`crate::setup()`] uses to decide and to check it.
//!
//! QEMU 7.2 (Debian bookworm's) crashes the guest kernel under TCG now and then (double faults in
//! kmalloc, a general protection fault on IRET in `do_sync_core`, about one boot in ten). QEMU 8
//! and newer do not. So:
//!
//! 1. the host's `qemu-system-x86_64`, when its major version is at least [`MIN_TCG_SAFE_MAJOR`];
//! 2. otherwise Debian's backport for the host's release (`<codename>-backports`: packages
//!    [`BACKPORT_PACKAGES`]), unpacked into [`BUNDLE_DIR`] in the runtime directory. It is built for
//!    the host's release, and its shared libraries come with the host's own `qemu-system-x86`;
//! 3. otherwise the host's old QEMU only where hardware KVM works (the crashes are TCG's), else an
//!    error that says what to do ([`QemuError::HostTooOld`]).
//!
//! The bundled binary needs `-L` for each of [`crate::Runtime::qemu_data_dirs`]: Debian's QEMU is
//! not relocatable and would otherwise load the host's (older) firmware from `/usr/share/qemu`.
//! The bundle keeps only `usr/bin/qemu-system-x86_64` and the x86 firmware, and adds the
//! `bios-microvm.bin -> qboot.rom` link Debian's 10.0 packages lack ([`MICROVM_FIRMWARE`]).
//! Setup checks a fetched QEMU by booting the guest kernel with it ([`boot_test`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

use crate::cmd::{self, CommandError};
use crate::provenance::Component;

/// The QEMU program gatevm runs.
pub const QEMU_PROGRAM: &str = "qemu-system-x86_64";
/// The Debian package of the host that provides [`QEMU_PROGRAM`] (and, through its dependencies,
/// the shared libraries the bundled backport needs).
pub const QEMU_HOST_PACKAGE: &str = "qemu-system-x86";
/// The oldest QEMU major version that runs our guest kernel reliably under TCG.
pub const MIN_TCG_SAFE_MAJOR: u32 = 8;
/// The Debian packages fetched from `<codename>-backports`, the first one holding the binary.
pub const BACKPORT_PACKAGES: [&str; 4] = [
    "qemu-system-x86",
    "qemu-system-common",
    "qemu-system-data",
    "seabios",
];
/// Directory of the bundled QEMU inside the runtime directory (a `usr/` tree).
pub const BUNDLE_DIR: &str = "qemu";
/// The bundled binary, relative to the runtime directory.
pub const BUNDLED_BINARY: &str = "qemu/usr/bin/qemu-system-x86_64";
/// The bundled firmware directories (`-L`), relative to the runtime directory, in search order.
pub const BUNDLED_DATA_DIRS: [&str; 2] = ["qemu/usr/share/qemu", "qemu/usr/share/seabios"];
/// Files the bundle must have for the `microvm` machine gatevm uses, relative to the runtime
/// directory.
pub const BUNDLED_REQUIRED: [&str; 3] = [
    BUNDLED_BINARY,
    "qemu/usr/share/qemu/qboot.rom",
    MICROVM_FIRMWARE,
];
/// The `microvm` machine's firmware in the bundle: a symlink to `qboot.rom`, as upstream QEMU
/// ships it (and Debian's 7.2 did). Debian's 10.0 drops the link, so the machine would load
/// SeaBIOS's `bios-microvm.bin`, which cannot boot `-kernel` with `x-option-roms=off` (it needs
/// the linuxboot option ROM) and stops at "No bootable device".
pub const MICROVM_FIRMWARE: &str = "qemu/usr/share/qemu/bios-microvm.bin";

/// Where an installed `qemu` component's binary is, from its file records: `Bundled` when it
/// holds [`BUNDLED_BINARY`], `Host(path)` when it records an absolute path to a
/// `qemu-system-x86_64` (the host's binary); `None` for anything else.
pub fn recorded_binary(c: &Component) -> Option<RecordedQemu> {
    if c.files.iter().any(|f| f.path == BUNDLED_BINARY) {
        return Some(RecordedQemu::Bundled);
    }
    c.files
        .iter()
        .map(|f| PathBuf::from(&f.path))
        .find(|p| p.is_absolute() && p.file_name().is_some_and(|n| n == QEMU_PROGRAM))
        .map(RecordedQemu::Host)
}

/// Which QEMU a `qemu` component records (see [`recorded_binary`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordedQemu {
    /// The backport unpacked into [`BUNDLE_DIR`].
    Bundled,
    /// The host's binary at this absolute path.
    Host(PathBuf),
}

/// Firmware in `usr/share/qemu` that only other architectures' machines load (PowerPC, SPARC,
/// HPPA, s390x, Alpha, Arm BMCs); left out of the bundle. File names, or prefixes ending in `*`.
const NON_X86_FIRMWARE: &[&str] = &[
    "QEMU,VGA.bin",
    "QEMU,cgthree.bin",
    "QEMU,tcx.bin",
    "bamboo.dtb",
    "canyonlands.dtb",
    "hppa-firmware*",
    "npcm*",
    "openbios-*",
    "opensbi-*",
    "palcode-*",
    "petalogix-*",
    "s390-*",
    "skiboot.lid",
    "slof.bin",
    "u-boot*",
    "vof.bin",
    "vof-nvram.bin",
];

/// Whether a file of the `qemu-system-data` package's `usr/share/qemu` directory is firmware
/// for another architecture (not kept in the bundle).
pub fn is_non_x86_firmware(name: &str) -> bool {
    NON_X86_FIRMWARE.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == *p,
    })
}

/// A QEMU version, `major.minor.micro`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct QemuVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version (0 when absent).
    pub micro: u32,
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

impl QemuVersion {
    /// Parses `X.Y` or `X.Y.Z` (nothing else around it).
    pub fn parse_dotted(s: &str) -> Option<QemuVersion> {
        let mut parts = s.split('.');
        let num = |p: Option<&str>| -> Option<u32> {
            let p = p?;
            if p.is_empty() || p.len() > 9 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            p.parse().ok()
        };
        let major = num(parts.next())?;
        let minor = num(parts.next())?;
        let micro = match parts.next() {
            Some(p) => num(Some(p))?,
            None => 0,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(QemuVersion {
            major,
            minor,
            micro,
        })
    }

    /// Parses the first line of `qemu-system-x86_64 --version`:
    /// `QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)`.
    pub fn from_version_output(text: &str) -> Option<QemuVersion> {
        let line = text.lines().find(|l| !l.trim().is_empty())?;
        let rest = line.trim().strip_prefix("QEMU emulator version ")?;
        let word = rest.split_whitespace().next()?;
        // Builds from git print e.g. `8.2.50 (v8.2.0-123-gabc)`; some print `9.0.0-rc1`.
        let word = word.split(['-', '+', '~']).next()?;
        QemuVersion::parse_dotted(word)
    }

    /// The upstream version inside a Debian package version:
    /// `1:10.0.2+ds-2+deb13u1~bpo12+1` gives 10.0.2, `1:7.2+dfsg-7+deb12u18` gives 7.2.0.
    pub fn from_debian_version(v: &str) -> Option<QemuVersion> {
        let v = v.trim();
        let no_epoch = match v.split_once(':') {
            Some((epoch, rest)) if epoch.bytes().all(|b| b.is_ascii_digit()) => rest,
            _ => v,
        };
        let upstream = no_epoch.split(['+', '-', '~']).next()?;
        QemuVersion::parse_dotted(upstream)
    }

    /// Whether this version runs gatevm's guests reliably under TCG.
    pub fn tcg_safe(&self) -> bool {
        self.major >= MIN_TCG_SAFE_MAJOR
    }
}

/// The Debian package version in a `--version` line's parentheses (`(Debian 1:7.2+dfsg-7)`).
pub fn debian_version_in_output(text: &str) -> Option<String> {
    let line = text.lines().find(|l| !l.trim().is_empty())?;
    let start = line.find("(Debian ")? + "(Debian ".len();
    let rest = &line[start..];
    let v = rest.split([')', ' ']).next()?.trim();
    (!v.is_empty()).then(|| v.to_string())
}

/// Reads `VERSION_CODENAME` from os-release text (`KEY=value` lines, values optionally quoted).
pub fn parse_os_release_codename(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().split_once('='))
        .filter(|(k, _)| k.trim() == "VERSION_CODENAME")
        .map(|(_, v)| v.trim().trim_matches(|c| c == '"' || c == '\'').to_string())
        .find(|v| !v.is_empty())
}

/// The host's release codename from `/etc/os-release` (else `/usr/lib/os-release`).
pub fn host_codename() -> Option<String> {
    ["/etc/os-release", "/usr/lib/os-release"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .find_map(|t| parse_os_release_codename(&t))
}

/// The host's QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostQemu {
    /// Absolute path of `qemu-system-x86_64`.
    pub path: PathBuf,
    /// Its version.
    pub version: QemuVersion,
    /// The Debian package version it reports, when it is Debian's build.
    pub debian_version: Option<String>,
}

impl HostQemu {
    /// The package version when known, else the QEMU version.
    pub fn version_string(&self) -> String {
        self.debian_version
            .clone()
            .unwrap_or_else(|| self.version.to_string())
    }
}

/// Runs `binary --version` and parses the answer.
pub fn binary_version(binary: &Path) -> Result<(QemuVersion, Option<String>), QemuError> {
    let out = cmd::run_captured(Command::new(binary).arg("--version").env("LC_ALL", "C")).map_err(
        |source| QemuError::Run {
            binary: binary.to_path_buf(),
            source,
        },
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = QemuVersion::from_version_output(&text).ok_or_else(|| QemuError::BadVersion {
        binary: binary.to_path_buf(),
        output: cmd::tail_lines(&text, 2),
    })?;
    Ok((version, debian_version_in_output(&text)))
}

/// Finds the host's `qemu-system-x86_64` and its version; `None` (logged) when it is not
/// installed or does not answer `--version`.
pub fn probe_host_qemu() -> Option<HostQemu> {
    let path = cmd::find_program(QEMU_PROGRAM)?;
    match binary_version(&path) {
        Ok((version, debian_version)) => Some(HostQemu {
            path,
            version,
            debian_version,
        }),
        Err(e) => {
            tracing::warn!(error = %e, "host QEMU is not usable");
            None
        }
    }
}

/// Whether hardware KVM can boot an ordinary guest kernel, with `root` standing for `/`: the CPU
/// has the vmx or svm flag, `/dev/kvm` opens read-write, and the KVM module is not `kvm_pvm`
/// (which runs only PVM guest kernels). `Err` says why not.
pub fn hardware_kvm_at(root: &Path) -> Result<(), String> {
    if root.join("sys/module/kvm_pvm").exists() {
        return Err("/dev/kvm is provided by kvm_pvm, which runs only PVM guest kernels".into());
    }
    let cpuinfo = std::fs::read_to_string(root.join("proc/cpuinfo")).unwrap_or_default();
    let flag = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !flag {
        return Err("the CPU has no vmx/svm flag".into());
    }
    let kvm = root.join("dev/kvm");
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&kvm)
    {
        return Err(format!("cannot open {} read-write: {e}", kvm.display()));
    }
    Ok(())
}

/// [`hardware_kvm_at`] for this host.
pub fn hardware_kvm() -> Result<(), String> {
    hardware_kvm_at(Path::new("/"))
}

/// The first decision, from facts that need no network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QemuPlan {
    /// The host's QEMU is new enough: use it.
    UseHost,
    /// Fetch QEMU from this Debian suite (`<codename>-backports`).
    FetchBackport {
        /// The suite.
        suite: String,
    },
    /// No backport to try (the host is not a Debian release we know); why.
    NoBackport {
        /// Why not.
        reason: String,
    },
}

/// Chooses where QEMU comes from: the host's when its version is known and TCG-safe, else the
/// host release's Debian backports suite when the codename is a Debian release.
pub fn plan(host: Option<QemuVersion>, codename: Option<&str>) -> QemuPlan {
    if host.is_some_and(|v| v.tcg_safe()) {
        return QemuPlan::UseHost;
    }
    match codename {
        Some(c) if crate::apt::is_debian_codename(c) => QemuPlan::FetchBackport {
            suite: format!("{c}-backports"),
        },
        Some(c) => QemuPlan::NoBackport {
            reason: format!("the host release {c:?} is not a Debian release with backports"),
        },
        None => QemuPlan::NoBackport {
            reason:
                "the host's release codename is unknown (no VERSION_CODENAME in /etc/os-release)"
                    .into(),
        },
    }
}

/// The decision when no TCG-safe QEMU could be had (`backport_problem` says why): the host's old
/// QEMU is accepted only with working hardware KVM (`kvm`, from [`hardware_kvm`]). `Ok` carries
/// the note for the setup report.
pub fn accept_old_host<'a>(
    host: Option<&'a HostQemu>,
    kvm: Result<(), String>,
    codename: Option<&str>,
    backport_problem: &str,
) -> Result<(&'a HostQemu, String), QemuError> {
    let Some(h) = host else {
        return Err(QemuError::NoQemu {
            backport: backport_problem.to_string(),
        });
    };
    match kvm {
        Ok(()) => Ok((
            h,
            format!(
                "QEMU {} is older than {MIN_TCG_SAFE_MAJOR} and crashes guests under TCG, \
                 but this host has hardware KVM, which it runs fine ({backport_problem})",
                h.version
            ),
        )),
        Err(why_no_kvm) => Err(QemuError::HostTooOld {
            path: h.path.clone(),
            version: h.version,
            why_no_kvm,
            backport: backport_problem.to_string(),
            advice: match codename {
                Some(c) if crate::apt::is_debian_codename(c) => format!(
                    "install QEMU {MIN_TCG_SAFE_MAJOR} or newer (as root: apt-get install -t \
                     {c}-backports {QEMU_HOST_PACKAGE}, with {c}-backports in the apt sources)"
                ),
                _ => format!("install QEMU {MIN_TCG_SAFE_MAJOR} or newer"),
            },
        }),
    }
}

/// A shared library the bundled QEMU cannot find.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MissingLibrary {
    /// The soname, e.g. `libslirp.so.0`.
    pub soname: String,
    /// The Debian package that provides it.
    pub package: String,
    /// Whether `package` is one the QEMU packages depend on (else a guess from the soname).
    pub certain: bool,
}

fn list_missing(m: &[MissingLibrary]) -> String {
    m.iter()
        .map(|l| {
            if l.certain {
                format!("{} (package {})", l.soname, l.package)
            } else {
                format!("{} (probably package {})", l.soname, l.package)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn missing_packages(m: &[MissingLibrary]) -> String {
    let mut p: Vec<&str> = m.iter().map(|l| l.package.as_str()).collect();
    p.sort();
    p.dedup();
    p.join(" ")
}

/// Errors of choosing and checking QEMU.
#[derive(Debug, Error)]
pub enum QemuError {
    /// The host's QEMU is too old for TCG, there is no hardware KVM and no backport could be had.
    #[error(
        "the host's QEMU {version} ({}) crashes guest kernels under TCG (software emulation, used \
         here because {why_no_kvm}), and no QEMU {MIN_TCG_SAFE_MAJOR}+ could be fetched ({backport}); \
         {advice}, or use a host with hardware KVM",
        path.display()
    )]
    HostTooOld {
        /// The host's binary.
        path: PathBuf,
        /// Its version.
        version: QemuVersion,
        /// Why hardware KVM is not usable.
        why_no_kvm: String,
        /// Why the backport could not be used.
        backport: String,
        /// What to do.
        advice: String,
    },
    /// There is no usable QEMU on the host and none could be fetched.
    #[error(
        "no usable {QEMU_PROGRAM} on the host and no QEMU could be fetched ({backport}); \
         install {QEMU_HOST_PACKAGE} (QEMU {MIN_TCG_SAFE_MAJOR} or newer)"
    )]
    NoQemu {
        /// Why the backport could not be used.
        backport: String,
    },
    /// The binary cannot start for want of shared libraries.
    #[error(
        "{} cannot start: missing shared librar{} {}; install as root: apt-get install {}",
        binary.display(),
        if missing.len() == 1 { "y" } else { "ies" },
        list_missing(missing),
        missing_packages(missing)
    )]
    MissingLibraries {
        /// The binary.
        binary: PathBuf,
        /// What it lacks.
        missing: Vec<MissingLibrary>,
    },
    /// The binary could not be run.
    #[error("cannot check {}: {source}", binary.display())]
    Run {
        /// The binary.
        binary: PathBuf,
        /// The underlying error.
        #[source]
        source: CommandError,
    },
    /// `--version` printed something else than a QEMU version.
    #[error("{} --version printed no QEMU version ({output:?})", binary.display())]
    BadVersion {
        /// The binary.
        binary: PathBuf,
        /// What it printed.
        output: String,
    },
    /// The binary runs but does not boot the guest kernel in the machine gatevm uses.
    #[error("{} does not boot the guest kernel in a microvm machine under TCG: {problem}", binary.display())]
    Boot {
        /// The binary.
        binary: PathBuf,
        /// What went wrong.
        problem: String,
    },
}

/// The sonames `ldd` reports as `not found` for `binary` (empty when ldd is missing or fails).
pub fn missing_libraries(binary: &Path) -> Vec<String> {
    let ldd = cmd::find_program("ldd").unwrap_or_else(|| PathBuf::from("ldd"));
    let out = Command::new(ldd)
        .arg(binary)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    out.map(|o| parse_ldd_not_found(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or_default()
}

/// The sonames in `ldd` output lines of the form `libfoo.so.1 => not found`.
pub fn parse_ldd_not_found(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for l in text.lines() {
        if let Some((name, rest)) = l.split_once("=>") {
            let name = name.trim();
            if rest.trim() == "not found" && !name.is_empty() && !out.iter().any(|o| o == name) {
                out.push(name.to_string());
            }
        }
    }
    out
}

/// The soname in a dynamic loader error (`error while loading shared libraries: libfoo.so.1:
/// cannot open shared object file`).
pub fn parse_loader_error(stderr: &str) -> Option<String> {
    let key = "error while loading shared libraries: ";
    let start = stderr.find(key)? + key.len();
    let name = stderr[start..].split(':').next()?.trim();
    (!name.is_empty()).then(|| name.to_string())
}

/// The Debian package that provides soname `soname`: a known exception, else the Debian policy
/// name (`libfoo.so.1` → `libfoo1`, `libfoo3.so.3` → `libfoo3-3`), matched against `depends`
/// (the QEMU packages' dependencies: exact, or the first one that starts with the name, like
/// `libjpeg62-turbo`). The flag tells whether the package is one of `depends`.
pub fn package_for_soname(soname: &str, depends: &[String]) -> (String, bool) {
    const EXCEPTIONS: &[(&str, &str)] = &[
        ("libz.so.1", "zlib1g"),
        ("libglib-2.0.so.0", "libglib2.0-0"),
        ("libgio-2.0.so.0", "libglib2.0-0"),
        ("libgobject-2.0.so.0", "libglib2.0-0"),
        ("libgmodule-2.0.so.0", "libglib2.0-0"),
        ("libc.so.6", "libc6"),
        ("libm.so.6", "libc6"),
        ("libcrypto.so.3", "libssl3"),
        ("libssl.so.3", "libssl3"),
        ("libgcc_s.so.1", "libgcc-s1"),
        ("libstdc++.so.6", "libstdc++6"),
        ("libjpeg.so.62", "libjpeg62-turbo"),
    ];
    let guess = match EXCEPTIONS.iter().find(|(s, _)| *s == soname) {
        Some((_, p)) => p.to_string(),
        None => match soname.split_once(".so.") {
            Some((name, ver)) => {
                let major = ver.split('.').next().unwrap_or(ver);
                let sep = if name.ends_with(|c: char| c.is_ascii_digit()) {
                    "-"
                } else {
                    ""
                };
                format!("{name}{sep}{major}")
                    .to_ascii_lowercase()
                    .replace('_', "-")
            }
            None => soname.trim_end_matches(".so").to_ascii_lowercase(),
        },
    };
    if depends.contains(&guess) {
        return (guess, true);
    }
    if let Some(d) = depends.iter().find(|d| d.starts_with(&guess)) {
        return (d.clone(), true);
    }
    (guess, false)
}

/// Runs `binary --version` and checks the answer; a binary that cannot start for want of shared
/// libraries gives [`QemuError::MissingLibraries`], naming each library's Debian package (matched
/// against `depends`, the QEMU packages' dependencies, where possible).
pub fn check_binary(
    binary: &Path,
    depends: &[String],
) -> Result<(QemuVersion, Option<String>), QemuError> {
    match binary_version(binary) {
        Ok(v) => Ok(v),
        Err(QemuError::Run {
            binary: b,
            source:
                CommandError::Failed {
                    command,
                    status,
                    stderr_tail,
                    log,
                },
        }) => {
            let mut sonames = missing_libraries(&b);
            if sonames.is_empty() {
                sonames.extend(parse_loader_error(&stderr_tail));
            }
            if sonames.is_empty() {
                return Err(QemuError::Run {
                    binary: b,
                    source: CommandError::Failed {
                        command,
                        status,
                        stderr_tail,
                        log,
                    },
                });
            }
            let missing = sonames
                .into_iter()
                .map(|soname| {
                    let (package, certain) = package_for_soname(&soname, depends);
                    MissingLibrary {
                        soname,
                        package,
                        certain,
                    }
                })
                .collect();
            Err(QemuError::MissingLibraries { binary: b, missing })
        }
        Err(e) => Err(e),
    }
}

/// Boots `kernel` with `binary` the way gatevm does (machine `microvm` without option ROMs,
/// TCG, the firmware in `data_dirs` first) and no root file system: the kernel starts, panics
/// for want of a root, and QEMU exits (`panic=-1`, `-no-reboot`). Proves the firmware loads the
/// kernel. The console goes to `serial_log`. Takes a few seconds; gives up after `timeout`.
pub fn boot_test(
    binary: &Path,
    data_dirs: &[PathBuf],
    kernel: &Path,
    serial_log: &Path,
    timeout: Duration,
) -> Result<Duration, QemuError> {
    let fail = |problem: String| QemuError::Boot {
        binary: binary.to_path_buf(),
        problem,
    };
    let started = Instant::now();
    // Without the TSC frequency a TCG guest calibrates against the emulated PIT, which stalls on
    // a loaded host ("Unable to calibrate against PIT"): give it what gatevm's own VMs get.
    let mut append = "console=ttyS0 panic=-1".to_string();
    if let Some(khz) = gatevm_vmm::probe::host_tsc_khz() {
        append.push_str(&format!(" tsc_early_khz={khz}"));
    }
    let mut c = Command::new(binary);
    for d in data_dirs {
        c.arg("-L").arg(d);
    }
    c.args([
        "-M",
        "microvm,x-option-roms=off,rtc=on",
        "-accel",
        "tcg",
        "-m",
        "256",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-append",
        &append,
        "-serial",
    ])
    .arg(format!("file:{}", serial_log.display()))
    .arg("-kernel")
    .arg(kernel)
    .env("LC_ALL", "C")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut child = c.spawn().map_err(|e| fail(format!("cannot run it: {e}")))?;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if started.elapsed() < timeout => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!(
                    "no power-off within {} s; console: {}",
                    timeout.as_secs(),
                    console_tail(serial_log)
                )));
            }
            Err(e) => return Err(fail(format!("cannot wait for it: {e}"))),
        }
    };
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("cannot collect its output: {e}")))?;
    let console = std::fs::read(serial_log)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    if !status.success() {
        return Err(fail(format!(
            "{status}: {}",
            cmd::tail_lines(&String::from_utf8_lossy(&out.stderr), 4)
        )));
    }
    if !console.contains("Linux version") {
        return Err(fail(format!(
            "the kernel did not start; console: {}",
            console_tail(serial_log)
        )));
    }
    Ok(started.elapsed())
}

fn console_tail(serial_log: &Path) -> String {
    let text = std::fs::read(serial_log)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let t = cmd::tail_lines(&text, 3);
    if t.is_empty() {
        "(empty)".into()
    } else {
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V72: &str = "QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u18)\n\
                       Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n";
    const V10: &str = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\n\
                       Copyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers\n";

    fn v(major: u32, minor: u32, micro: u32) -> QemuVersion {
        QemuVersion {
            major,
            minor,
            micro,
        }
    }

    #[test]
    fn version_output() {
        assert_eq!(QemuVersion::from_version_output(V72), Some(v(7, 2, 15)));
        assert_eq!(QemuVersion::from_version_output(V10), Some(v(10, 0, 2)));
        assert_eq!(
            debian_version_in_output(V72).as_deref(),
            Some("1:7.2+dfsg-7+deb12u18")
        );
        assert_eq!(
            debian_version_in_output(V10).as_deref(),
            Some("1:10.0.2+ds-2+deb13u1~bpo12+1")
        );
        assert_eq!(
            QemuVersion::from_version_output("QEMU emulator version 8.2.50 (v8.2.0-1-gabc)"),
            Some(v(8, 2, 50))
        );
        assert_eq!(
            QemuVersion::from_version_output("QEMU emulator version 9.0.0-rc1"),
            Some(v(9, 0, 0))
        );
        assert_eq!(
            QemuVersion::from_version_output("QEMU emulator version 6.2"),
            Some(v(6, 2, 0))
        );
        assert_eq!(
            debian_version_in_output("QEMU emulator version 9.1.0"),
            None
        );
        assert!(!v(7, 2, 15).tcg_safe());
        assert!(v(8, 0, 0).tcg_safe());
        assert!(v(10, 0, 2).tcg_safe());
        assert_eq!(v(10, 0, 2).to_string(), "10.0.2");
    }

    #[test]
    fn version_garbage() {
        for g in [
            "",
            "\n\n",
            "garbage",
            "QEMU emulator version",
            "QEMU emulator version x.y.z",
            "QEMU emulator version 10",
            "QEMU emulator version 10..2",
            "QEMU emulator version 1.2.3.4",
            "QEMU emulator version 99999999999.0",
            "qemu-system-x86_64: error while loading shared libraries: libfdt.so.1",
            "Copyright (c) 2003-2025 Fabrice Bellard\nQEMU emulator version 10.0.2",
        ] {
            assert_eq!(QemuVersion::from_version_output(g), None, "{g:?}");
        }
    }

    #[test]
    fn debian_versions() {
        assert_eq!(
            QemuVersion::from_debian_version("1:10.0.2+ds-2+deb13u1~bpo12+1"),
            Some(v(10, 0, 2))
        );
        assert_eq!(
            QemuVersion::from_debian_version("1:7.2+dfsg-7+deb12u18+b3"),
            Some(v(7, 2, 0))
        );
        assert_eq!(
            QemuVersion::from_debian_version("8.2.2-1"),
            Some(v(8, 2, 2))
        );
        assert_eq!(QemuVersion::from_debian_version("x:1"), None);
        assert_eq!(QemuVersion::from_debian_version(""), None);
    }

    #[test]
    fn os_release() {
        let debian = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\n\
                      VERSION_ID=\"12\"\nVERSION=\"12 (bookworm)\"\nVERSION_CODENAME=bookworm\nID=debian\n";
        assert_eq!(
            parse_os_release_codename(debian).as_deref(),
            Some("bookworm")
        );
        assert_eq!(
            parse_os_release_codename("ID=ubuntu\nVERSION_CODENAME=\"noble\"\n").as_deref(),
            Some("noble")
        );
        assert_eq!(
            parse_os_release_codename("  VERSION_CODENAME = 'trixie' \n").as_deref(),
            Some("trixie")
        );
        assert_eq!(parse_os_release_codename("VERSION_CODENAME=\nID=x\n"), None);
        assert_eq!(
            parse_os_release_codename("PRETTY_NAME=\"Debian GNU/Linux trixie/sid\""),
            None
        );
        assert_eq!(parse_os_release_codename(""), None);
    }

    #[test]
    fn plan_by_host_version() {
        assert_eq!(plan(Some(v(10, 0, 2)), Some("bookworm")), QemuPlan::UseHost);
        assert_eq!(plan(Some(v(8, 0, 0)), None), QemuPlan::UseHost);
        assert_eq!(
            plan(Some(v(7, 2, 15)), Some("bookworm")),
            QemuPlan::FetchBackport {
                suite: "bookworm-backports".into()
            }
        );
        assert_eq!(
            plan(None, Some("bookworm")),
            QemuPlan::FetchBackport {
                suite: "bookworm-backports".into()
            }
        );
        assert!(matches!(
            plan(Some(v(6, 2, 0)), Some("jammy")),
            QemuPlan::NoBackport { reason } if reason.contains("jammy")
        ));
        assert!(matches!(
            plan(Some(v(7, 2, 0)), None),
            QemuPlan::NoBackport { .. }
        ));
    }

    #[test]
    fn old_host_needs_kvm() {
        let h = HostQemu {
            path: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            version: v(7, 2, 15),
            debian_version: Some("1:7.2+dfsg-7+deb12u18".into()),
        };
        let (used, note) =
            accept_old_host(Some(&h), Ok(()), Some("bookworm"), "apt failed").unwrap();
        assert_eq!(used, &h);
        assert!(note.contains("hardware KVM"), "{note}");
        let e = accept_old_host(
            Some(&h),
            Err("the CPU has no vmx/svm flag".into()),
            Some("bookworm"),
            "apt failed",
        )
        .unwrap_err();
        let m = e.to_string();
        assert!(m.contains("QEMU 7.2.15"), "{m}");
        assert!(m.contains("crashes guest kernels under TCG"), "{m}");
        assert!(m.contains("vmx/svm"), "{m}");
        assert!(m.contains("apt failed"), "{m}");
        assert!(m.contains("-t bookworm-backports qemu-system-x86"), "{m}");
        assert!(!m.contains('\n'));
        let e = accept_old_host(Some(&h), Err("no".into()), Some("jammy"), "x").unwrap_err();
        assert!(!e.to_string().contains("backports qemu"), "{e}");
        let e = accept_old_host(None, Ok(()), Some("bookworm"), "apt failed").unwrap_err();
        assert!(matches!(e, QemuError::NoQemu { .. }), "{e}");
    }

    #[test]
    fn kvm_check() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("proc")).unwrap();
        std::fs::create_dir_all(root.join("dev")).unwrap();
        std::fs::write(root.join("proc/cpuinfo"), "flags\t\t: fpu sse2\n").unwrap();
        assert!(hardware_kvm_at(root).unwrap_err().contains("vmx/svm"));
        std::fs::write(root.join("proc/cpuinfo"), "flags\t\t: fpu vmx sse2\n").unwrap();
        assert!(hardware_kvm_at(root).unwrap_err().contains("dev/kvm"));
        std::fs::write(root.join("dev/kvm"), "").unwrap();
        assert_eq!(hardware_kvm_at(root), Ok(()));
        std::fs::create_dir_all(root.join("sys/module/kvm_pvm")).unwrap();
        assert!(hardware_kvm_at(root).unwrap_err().contains("kvm_pvm"));
    }

    #[test]
    fn sonames_to_packages() {
        let deps: Vec<String> = [
            "libaio1",
            "libfuse3-3",
            "libjpeg62-turbo",
            "libpixman-1-0",
            "libslirp0",
            "zlib1g",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            package_for_soname("libslirp.so.0", &deps),
            ("libslirp0".into(), true)
        );
        assert_eq!(
            package_for_soname("libfuse3.so.3", &deps),
            ("libfuse3-3".into(), true)
        );
        assert_eq!(
            package_for_soname("libpixman-1.so.0", &deps),
            ("libpixman-1-0".into(), true)
        );
        assert_eq!(
            package_for_soname("libz.so.1", &deps),
            ("zlib1g".into(), true)
        );
        assert_eq!(
            package_for_soname("libjpeg.so.62", &deps),
            ("libjpeg62-turbo".into(), true)
        );
        assert_eq!(package_for_soname("libaio.so.1t64", &deps).0, "libaio1t64");
        assert_eq!(
            package_for_soname("libfdt.so.1", &deps),
            ("libfdt1".into(), false)
        );
        assert_eq!(
            package_for_soname("libpng16.so.16", &[]),
            ("libpng16-16".into(), false)
        );
        let e = QemuError::MissingLibraries {
            binary: PathBuf::from("/rt/qemu/usr/bin/qemu-system-x86_64"),
            missing: vec![
                MissingLibrary {
                    soname: "libslirp.so.0".into(),
                    package: "libslirp0".into(),
                    certain: true,
                },
                MissingLibrary {
                    soname: "libfdt.so.1".into(),
                    package: "libfdt1".into(),
                    certain: false,
                },
            ],
        };
        let m = e.to_string();
        assert!(m.contains("libslirp.so.0 (package libslirp0)"), "{m}");
        assert!(m.contains("libfdt.so.1 (probably package libfdt1)"), "{m}");
        assert!(m.contains("apt-get install libfdt1 libslirp0"), "{m}");
    }

    #[test]
    fn loader_output() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibslirp.so.0 => not found\n\
                   \tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f)\n\
                   \tlibfdt.so.1 => not found\n\tlibslirp.so.0 => not found\n";
        assert_eq!(
            parse_ldd_not_found(ldd),
            vec!["libslirp.so.0", "libfdt.so.1"]
        );
        assert_eq!(
            parse_loader_error(
                "/x/qemu-system-x86_64: error while loading shared libraries: libslirp.so.0: \
                 cannot open shared object file: No such file or directory"
            )
            .as_deref(),
            Some("libslirp.so.0")
        );
        assert_eq!(parse_loader_error("something else"), None);
    }

    #[test]
    fn missing_library_is_reported() {
        // A stand-in that fails the way the dynamic loader does (ldd finds nothing to report).
        let tmp = tempfile::tempdir().unwrap();
        let script = tmp.path().join("fake-qemu");
        std::fs::write(
            &script,
            "#!/bin/sh\necho \"$0: error while loading shared libraries: libgatevmtest.so.7: \
             cannot open shared object file: No such file or directory\" >&2\nexit 127\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = check_binary(&script, &["libgatevmtest7".to_string()]).unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, QemuError::MissingLibraries { .. }), "{m}");
        assert!(
            m.contains("libgatevmtest.so.7 (package libgatevmtest7)"),
            "{m}"
        );
    }

    #[test]
    fn firmware_filter() {
        for n in [
            "openbios-ppc",
            "skiboot.lid",
            "slof.bin",
            "hppa-firmware64.img",
            "u-boot.e500",
            "s390-ccw.img",
            "QEMU,VGA.bin",
            "npcm8xx_bootrom.bin",
        ] {
            assert!(is_non_x86_firmware(n), "{n}");
        }
        for n in [
            "bios-microvm.bin",
            "qboot.rom",
            "pvh.bin",
            "linuxboot_dma.bin",
            "kvmvapic.bin",
            "multiboot_dma.bin",
            "trace-events-all",
            "keymaps",
        ] {
            assert!(!is_non_x86_firmware(n), "{n}");
        }
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(s in "\\PC*") {
            let _ = QemuVersion::from_version_output(&s);
            let _ = QemuVersion::from_debian_version(&s);
            let _ = debian_version_in_output(&s);
            let _ = parse_os_release_codename(&s);
            let _ = parse_ldd_not_found(&s);
            let _ = parse_loader_error(&s);
            let _ = package_for_soname(&s, &[]);
        }
    }
}
