//! The choice of QEMU: the host's when it is TCG-safe, else Debian's backport for the host's
//! release, else the host's old one where hardware KVM works; with the version parsing, the
//! host facts (`--version`, os-release, KVM) and the bundle's layout it rests on.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use super::QemuError;
use crate::cmd;
use crate::provenance::Component;

/// The QEMU program gatevm runs.
pub(crate) const QEMU_PROGRAM: &str = "qemu-system-x86_64";
/// The Debian package of the host that provides [`QEMU_PROGRAM`] (and, through its dependencies,
/// the shared libraries the bundled backport needs).
pub(crate) const QEMU_HOST_PACKAGE: &str = "qemu-system-x86";
/// The oldest QEMU major version that runs our guest kernel reliably under TCG.
pub(crate) const MIN_TCG_SAFE_MAJOR: u32 = 8;
/// The Debian packages fetched from `<codename>-backports`, the first one holding the binary.
pub(crate) const BACKPORT_PACKAGES: [&str; 4] = [
    "qemu-system-x86",
    "qemu-system-common",
    "qemu-system-data",
    "seabios",
];
/// Directory of the bundled QEMU inside the runtime directory (a `usr/` tree).
pub(crate) const BUNDLE_DIR: &str = "qemu";
/// The bundled binary, relative to the runtime directory.
pub(crate) const BUNDLED_BINARY: &str = "qemu/usr/bin/qemu-system-x86_64";
/// The bundled firmware directories (`-L`), relative to the runtime directory, in search order.
pub(crate) const BUNDLED_DATA_DIRS: [&str; 2] = ["qemu/usr/share/qemu", "qemu/usr/share/seabios"];
/// Files the bundle must have for the `microvm` machine gatevm uses, relative to the runtime
/// directory.
pub(crate) const BUNDLED_REQUIRED: [&str; 3] = [
    BUNDLED_BINARY,
    "qemu/usr/share/qemu/qboot.rom",
    MICROVM_FIRMWARE,
];
/// The `microvm` machine's firmware in the bundle: a symlink to `qboot.rom`, as upstream QEMU
/// ships it (and Debian's 7.2 did). Debian's 10.0 drops the link, so the machine would load
/// SeaBIOS's `bios-microvm.bin`, which cannot boot `-kernel` with `x-option-roms=off` (it needs
/// the linuxboot option ROM) and stops at "No bootable device".
pub(crate) const MICROVM_FIRMWARE: &str = "qemu/usr/share/qemu/bios-microvm.bin";

/// Where an installed `qemu` component's binary is, from its file records: `Bundled` when it
/// holds [`BUNDLED_BINARY`], `Host(path)` when it records an absolute path to a
/// `qemu-system-x86_64` (the host's binary); `None` for anything else.
pub(crate) fn recorded_binary(c: &Component) -> Option<RecordedQemu> {
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
pub(crate) enum RecordedQemu {
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
pub(crate) fn is_non_x86_firmware(name: &str) -> bool {
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
pub(crate) fn debian_version_in_output(text: &str) -> Option<String> {
    let line = text.lines().find(|l| !l.trim().is_empty())?;
    let start = line.find("(Debian ")? + "(Debian ".len();
    let rest = &line[start..];
    let v = rest.split([')', ' ']).next()?.trim();
    (!v.is_empty()).then(|| v.to_string())
}

/// Reads `VERSION_CODENAME` from os-release text (`KEY=value` lines, values optionally quoted).
pub(crate) fn parse_os_release_codename(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().split_once('='))
        .filter(|(k, _)| k.trim() == "VERSION_CODENAME")
        .map(|(_, v)| v.trim().trim_matches(|c| c == '"' || c == '\'').to_string())
        .find(|v| !v.is_empty())
}

/// The host's release codename from `/etc/os-release` (else `/usr/lib/os-release`).
pub(crate) fn host_codename() -> Option<String> {
    ["/etc/os-release", "/usr/lib/os-release"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .find_map(|t| parse_os_release_codename(&t))
}

/// The host's QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostQemu {
    /// Absolute path of `qemu-system-x86_64`.
    pub path: PathBuf,
    /// Its version.
    pub version: QemuVersion,
    /// The Debian package version it reports, when it is Debian's build.
    pub debian_version: Option<String>,
}

impl HostQemu {
    /// The package version when known, else the QEMU version.
    pub(crate) fn version_string(&self) -> String {
        self.debian_version
            .clone()
            .unwrap_or_else(|| self.version.to_string())
    }
}

/// Runs `binary --version` and parses the answer.
pub(crate) fn binary_version(binary: &Path) -> Result<(QemuVersion, Option<String>), QemuError> {
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
pub(crate) fn probe_host_qemu() -> Option<HostQemu> {
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

/// Whether hardware KVM can boot an ordinary guest kernel, with `root` standing for `/`: the
/// verdict of [`gatevm_vmm::probe`] (the vmx or svm CPU flag, a `/dev/kvm` that opens read-write,
/// and a KVM module other than `kvm_pvm`, which runs only PVM guest kernels). `Err` says why not.
pub(crate) fn hardware_kvm_at(root: &Path) -> Result<(), String> {
    match gatevm_vmm::probe::probe_at(root).why_no_hardware_virt() {
        None => Ok(()),
        Some(why) => Err(why),
    }
}

/// [`hardware_kvm_at`] for this host.
pub(crate) fn hardware_kvm() -> Result<(), String> {
    hardware_kvm_at(Path::new("/"))
}

/// The first decision, from facts that need no network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum QemuPlan {
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
pub(crate) fn plan(host: Option<QemuVersion>, codename: Option<&str>) -> QemuPlan {
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
pub(crate) fn accept_old_host<'a>(
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
        /// A `--version` answer written the way QEMU and Debian write it gives back the version,
        /// the package version and, from that, the same upstream version.
        #[test]
        fn version_output_round_trips(
            major in 0u32..1_000_000, minor in 0u32..1_000_000, micro in 0u32..1_000_000,
            suffix in "|-rc[0-9]|\\+ds",
            epoch in proptest::option::of(0u32..10),
            rev in "[0-9]{1,2}(\\+deb[0-9]{2}u[0-9]{1,2})?(~bpo[0-9]{2}\\+1)?",
        ) {
            let v = QemuVersion { major, minor, micro };
            proptest::prop_assert_eq!(QemuVersion::parse_dotted(&v.to_string()), Some(v));
            let pkg = match epoch {
                Some(e) => format!("{e}:{v}+ds-{rev}"),
                None => format!("{v}+dfsg-{rev}"),
            };
            let out = format!(
                "\nQEMU emulator version {v}{suffix} (Debian {pkg})\nCopyright (c) 2003-2025 Fabrice Bellard\n"
            );
            proptest::prop_assert_eq!(QemuVersion::from_version_output(&out), Some(v));
            proptest::prop_assert_eq!(debian_version_in_output(&out), Some(pkg.clone()));
            proptest::prop_assert_eq!(QemuVersion::from_debian_version(&pkg), Some(v));
        }

        /// Whatever the text, a version is read only from a first line that says it is QEMU's,
        /// a package version only from inside "(Debian ...)", and each is non-empty.
        #[test]
        fn version_parsers_read_only_what_is_there(s in "\\PC{0,80}|(QEMU emulator version |\\(Debian |[0-9.:+~ -])*") {
            let first = s.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            if QemuVersion::from_version_output(&s).is_some() {
                proptest::prop_assert!(first.trim().starts_with("QEMU emulator version "), "{:?}", s);
            }
            if let Some(d) = debian_version_in_output(&s) {
                proptest::prop_assert!(!d.is_empty() && !d.contains([')', ' ']), "{:?}", d);
                let after = first.split_once("(Debian ").map(|(_, a)| a.trim_start());
                proptest::prop_assert!(after.is_some_and(|a| a.starts_with(&d)), "{:?} from {:?}", d, s);
            }
        }

        /// `VERSION_CODENAME` is found among any other lines, quoted or not; whatever the
        /// text, a codename reported is non-empty and written in the text.
        #[test]
        fn os_release_codename_is_found(
            before in proptest::collection::vec("[A-Z_]{1,12}=\"?[a-z0-9 ]{0,12}\"?", 0..6),
            after in proptest::collection::vec("[A-Z_]{1,12}=[a-z0-9]{0,12}", 0..6),
            codename in "[a-z]{1,12}",
            quote in "|\"|'",
            junk in "\\PC{0,80}",
        ) {
            let before: Vec<_> = before.into_iter().filter(|l| !l.starts_with("VERSION_CODENAME=")).collect();
            let text = format!("{}\nVERSION_CODENAME={quote}{codename}{quote}\n{}\n", before.join("\n"), after.join("\n"));
            proptest::prop_assert_eq!(parse_os_release_codename(&text), Some(codename));
            if let Some(c) = parse_os_release_codename(&junk) {
                proptest::prop_assert!(!c.is_empty() && junk.contains(&c), "{:?} from {:?}", c, junk);
            }
        }
    }
}
