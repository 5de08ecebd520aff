//! Packages from newer Debian suites through a private apt configuration.
//!
//! gatevm needs a few packages that the host's release does not have (trixie's kernel and
//! gvproxy, sid's libkrunfw). They are fetched with `apt-get download` through an apt
//! configuration of our own (sources list, state and cache under the cache directory, passed with
//! `-c`) and unpacked with `dpkg-deb -x`; the system's sources, state and dpkg database are never
//! touched. The mirror is the one the system already uses for its Debian archive, read from its
//! apt sources at run time (or `GATEVM_DEBIAN_MIRROR`). A configuration can hold source entries
//! instead ([`IndexKind::Source`]), for what gatevm builds from a Debian source package
//! (`apt-get source --download-only`, checked against the signed `Sources` index).
//!
//! - [`sources`]: the system's apt sources and its Debian mirrors;
//! - [`config`]: the private configuration ([`PrivateApt`]) and the commands run through it;
//! - [`index`]: what the package indexes say ([`PackageEntry`], [`SourceEntry`]);
//! - [`version`]: Debian version order.

use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

use crate::cmd::{self, CommandError};
use crate::error::{io_err, IoError};

pub(crate) mod config;
pub(crate) mod index;
pub(crate) mod sources;
pub(crate) mod version;

pub(crate) use config::{IndexKind, PrivateApt, DEBIAN_KEYRING};
pub(crate) use index::PackageEntry;
pub(crate) use sources::{is_debian_codename, system_debian_mirrors, MIRROR_ENV};

/// Errors of the private apt configuration and of package fetching.
#[derive(Debug, Error)]
pub enum AptError {
    /// No Debian archive entry was found in the system's apt sources.
    #[error(
        "no Debian archive mirror found in the system's apt sources ({searched}); \
         set {MIRROR_ENV} to a Debian mirror URI"
    )]
    NoMirror {
        /// The files that were read.
        searched: String,
    },
    /// A file or directory of the private configuration could not be written or read.
    #[error(transparent)]
    Io(#[from] IoError),
    /// A path cannot be written into an apt configuration file.
    #[error("path {} cannot be used in an apt configuration (contains a quote or newline)", .0.display())]
    BadPath(PathBuf),
    /// The archive keyring is missing.
    #[error("Debian archive keyring {DEBIAN_KEYRING} is missing: install the debian-archive-keyring package")]
    NoKeyring,
    /// `apt-get update` on the private configuration failed.
    #[error("cannot fetch the Debian {suites} package lists from {mirrors} (check network access to the mirror, or set {MIRROR_ENV})")]
    Update {
        /// The suites.
        suites: String,
        /// The mirrors.
        mirrors: String,
        /// The underlying error.
        #[source]
        source: Box<CommandError>,
    },
    /// An apt or dpkg command failed.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// A package is not in a suite's index.
    #[error("package {package} not found in Debian {suite} (private apt lists in {})", lists.display())]
    NotFound {
        /// The package.
        package: String,
        /// The suite.
        suite: String,
        /// The private lists directory.
        lists: PathBuf,
    },
    /// A package's index entry lacks a field we need or has an unexpected shape.
    #[error("package {package} in Debian {suite}: {problem}")]
    BadEntry {
        /// The package.
        package: String,
        /// The suite.
        suite: String,
        /// What is wrong.
        problem: String,
    },
    /// A file `apt-get source` left does not match the source package's index entry.
    #[error("source package {package}: {}: {problem}", file.display())]
    SourceFile {
        /// The source package and its version.
        package: String,
        /// The file.
        file: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// `apt-get download` succeeded but left no .deb file.
    #[error("apt-get download of {package} {version} left no .deb file in {}", dir.display())]
    NoDeb {
        /// The package.
        package: String,
        /// The version.
        version: String,
        /// The download directory.
        dir: PathBuf,
    },
}

/// Unpacks a .deb's files into `dest` with `dpkg-deb -x`.
pub(crate) fn unpack_deb(deb: &Path, dest: &Path, log: &Path) -> Result<(), AptError> {
    std::fs::create_dir_all(dest).map_err(io_err("cannot create", dest))?;
    let mut c = Command::new("dpkg-deb");
    c.arg("-x").arg(deb).arg(dest);
    cmd::run_logged(&mut c, log)?;
    Ok(())
}
