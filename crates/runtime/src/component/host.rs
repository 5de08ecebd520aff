//! Host packages gatevm needs, and installing the missing ones with the system's apt.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;
use thiserror::Error;

use crate::cmd::{self, CommandError};
use std::time::Instant;

use crate::setup::{Ctx, SetupAction, SetupError, SetupOptions};

/// How a requirement is detected.
#[derive(Debug, Clone, Copy)]
enum Probe {
    /// An executable in PATH or the sbin directories.
    Program(&'static str),
    /// Any of these files exists.
    File(&'static [&'static str]),
}

/// One thing gatevm needs on the host and the Debian package that provides it.
#[derive(Debug, Clone, Copy)]
struct Requirement {
    what: &'static str,
    package: &'static str,
    probe: Probe,
}

const REQUIREMENTS: &[Requirement] = &[
    Requirement {
        what: "qemu-system-x86_64",
        package: "qemu-system-x86",
        probe: Probe::Program("qemu-system-x86_64"),
    },
    Requirement {
        what: "mmdebstrap",
        package: "mmdebstrap",
        probe: Probe::Program("mmdebstrap"),
    },
    Requirement {
        what: "depmod",
        package: "kmod",
        probe: Probe::Program("depmod"),
    },
    Requirement {
        what: "mkfs.ext4",
        package: "e2fsprogs",
        probe: Probe::Program("mkfs.ext4"),
    },
    Requirement {
        what: "mkfs.erofs",
        package: "erofs-utils",
        probe: Probe::Program("mkfs.erofs"),
    },
    Requirement {
        what: "dpkg-deb",
        package: "dpkg",
        probe: Probe::Program("dpkg-deb"),
    },
    Requirement {
        what: "apt-get",
        package: "apt",
        probe: Probe::Program("apt-get"),
    },
    Requirement {
        what: "pkg-config",
        package: "pkg-config",
        probe: Probe::Program("pkg-config"),
    },
    Requirement {
        what: "libseccomp headers",
        package: "libseccomp-dev",
        probe: Probe::File(&["/usr/include/seccomp.h"]),
    },
    Requirement {
        what: "libcap-ng headers",
        package: "libcap-ng-dev",
        probe: Probe::File(&["/usr/include/cap-ng.h"]),
    },
    Requirement {
        what: "C compiler/linker (cc)",
        package: "gcc",
        probe: Probe::Program("cc"),
    },
    Requirement {
        what: "make",
        package: "make",
        probe: Probe::Program("make"),
    },
    Requirement {
        what: "patch",
        package: "patch",
        probe: Probe::Program("patch"),
    },
    Requirement {
        what: "xz (for .tar.xz source tarballs)",
        package: "xz-utils",
        probe: Probe::Program("xz"),
    },
    Requirement {
        what: "C library headers",
        package: "libc6-dev",
        probe: Probe::File(&["/usr/include/stdio.h"]),
    },
    Requirement {
        what: "Debian archive keyring",
        package: "debian-archive-keyring",
        probe: Probe::File(&[crate::apt::DEBIAN_KEYRING]),
    },
];

/// A host requirement that is not met.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Missing {
    /// What is missing (a program, headers).
    pub what: String,
    /// The Debian package that provides it.
    pub package: String,
}

/// Errors of the host package step.
#[derive(Debug, Error)]
pub enum HostError {
    /// Something is missing and we cannot install it (not root, or no apt-get).
    #[error(
        "missing on the host: {}; install them as root: apt-get install {}",
        list_what(missing),
        list_packages(missing)
    )]
    Missing {
        /// What is missing.
        missing: Vec<Missing>,
    },
    /// apt-get failed.
    #[error("installing host packages failed")]
    Install(#[source] CommandError),
    /// Still missing after installing.
    #[error("still missing after apt-get install: {}", list_what(missing))]
    StillMissing {
        /// What is missing.
        missing: Vec<Missing>,
    },
}

fn list_what(m: &[Missing]) -> String {
    m.iter()
        .map(|x| format!("{} (package {})", x.what, x.package))
        .collect::<Vec<_>>()
        .join(", ")
}

fn list_packages(m: &[Missing]) -> String {
    packages_of(m).join(" ")
}

fn packages_of(m: &[Missing]) -> Vec<String> {
    let mut p: Vec<String> = m.iter().map(|x| x.package.clone()).collect();
    p.sort();
    p.dedup();
    p
}

/// The Debian packages that provide what gatevm needs on the host, in order, without
/// duplicates.
pub(crate) fn required_packages() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for r in REQUIREMENTS {
        if !out.contains(&r.package) {
            out.push(r.package);
        }
    }
    out
}

/// Lists the host requirements that are not met.
pub(crate) fn check_host() -> Vec<Missing> {
    REQUIREMENTS
        .iter()
        .filter(|r| match r.probe {
            Probe::Program(p) => cmd::find_program(p).is_none(),
            Probe::File(files) => !files.iter().any(|f| Path::new(f).exists()),
        })
        .map(|r| Missing {
            what: r.what.to_string(),
            package: r.package.to_string(),
        })
        .collect()
}

/// Whether this process runs as root.
pub(crate) fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Makes sure the host has what gatevm needs: returns the packages it installed (empty when
/// everything was there). Installs with `apt-get update` + `apt-get install -y
/// --no-install-recommends` when running as root; otherwise fails naming the packages.
pub(crate) fn ensure_host_packages(
    log: &Path,
    progress: &dyn Fn(&str),
) -> Result<Vec<String>, HostError> {
    let missing = check_host();
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    let apt_get: Option<PathBuf> = cmd::find_program("apt-get");
    let Some(apt_get) = apt_get.filter(|_| is_root()) else {
        return Err(HostError::Missing { missing });
    };
    let packages = packages_of(&missing);
    progress(&format!("installing host packages: {}", packages.join(" ")));
    let mut c = Command::new(&apt_get);
    c.args(["-q", "update"])
        .env("DEBIAN_FRONTEND", "noninteractive");
    cmd::run_logged(&mut c, log).map_err(HostError::Install)?;
    let mut c = Command::new(&apt_get);
    c.args(["-q", "install", "-y", "--no-install-recommends"])
        .args(&packages)
        .env("DEBIAN_FRONTEND", "noninteractive");
    cmd::run_logged(&mut c, log).map_err(HostError::Install)?;
    let still = check_host();
    if !still.is_empty() {
        return Err(HostError::StillMissing { missing: still });
    }
    Ok(packages)
}

/// The `host-packages` step: checks the host packages and, when allowed (as root), installs the
/// missing ones.
pub(crate) fn ensure(ctx: &mut Ctx<'_>, opts: &SetupOptions) -> Result<(), SetupError> {
    let started = Instant::now();
    (ctx.progress)("checking host packages");
    let missing = check_host();
    if missing.is_empty() {
        ctx.step(
            "host-packages",
            SetupAction::AlreadyPresent,
            format!("{} present", required_packages().join(", ")),
            started,
        );
        return Ok(());
    }
    if !opts.install_host_packages {
        return Err(HostError::Missing { missing }.into());
    }
    let installed = ensure_host_packages(&ctx.log, ctx.progress)?;
    ctx.step(
        "host-packages",
        SetupAction::Installed,
        format!("apt-get install {}", installed.join(" ")),
        started,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_message_names_packages() {
        let e = HostError::Missing {
            missing: vec![
                Missing {
                    what: "depmod".into(),
                    package: "kmod".into(),
                },
                Missing {
                    what: "mmdebstrap".into(),
                    package: "mmdebstrap".into(),
                },
            ],
        };
        let m = e.to_string();
        assert!(m.contains("depmod (package kmod)"), "{m}");
        assert!(m.contains("apt-get install kmod mmdebstrap"), "{m}");
    }

    #[test]
    fn requirements_cover_the_documented_packages() {
        let pk: Vec<&str> = REQUIREMENTS.iter().map(|r| r.package).collect();
        for p in [
            "qemu-system-x86",
            "mmdebstrap",
            "kmod",
            "e2fsprogs",
            // The base rootfs becomes a read-only EROFS image.
            "erofs-utils",
            "libseccomp-dev",
            "libcap-ng-dev",
            "pkg-config",
            // Building passt from Debian's source package (see crate::component::passt).
            "gcc",
            "libc6-dev",
            "make",
            "patch",
            "xz-utils",
        ] {
            assert!(pk.contains(&p), "{p}");
        }
        // Debian bookworm's passt is not used any more (setup builds trixie's).
        assert!(!pk.contains(&"passt"));
        let listed = required_packages();
        assert_eq!(listed.len(), {
            let mut d = pk.clone();
            d.sort();
            d.dedup();
            d.len()
        });
        assert_eq!(listed[0], "qemu-system-x86");
    }
}
