//! Unpacking container image archives into a root directory: what `gatevm vm-run --image`
//! boots a throwaway VM on; and [`inspect_archive`], the cheap check `gatevm image import` does
//! before streaming an archive into the VM (indexes and JSON documents only, no layer data).
//!
//! Reads `docker save` archives (`manifest.json`; the legacy `<id>/layer.tar` layout and
//! Docker 25+'s, whose blobs are under `blobs/sha256/`) and OCI image layout archives
//! (`index.json`, through nested image indexes; a multi-platform index yields the manifest for
//! linux and the host architecture). The archive may be gzip- or zstd-compressed; layers may be
//! plain tar, gzip or zstd (told by magic bytes). The archive is read in place (one pass indexes
//! its members, then they are read at their offsets); layers are streamed, never held in
//! memory; JSON documents are capped at 4 MiB. OCI blobs are checked against their digests
//! (and sizes), and when the image config lists `rootfs.diff_ids`, every layer's uncompressed
//! tar against its diff ID (the only check `docker save`'s legacy layout allows).
//!
//! # Safety policy
//!
//! The archive comes from the user and may be hostile; nothing outside the destination is
//! ever created, written, chmod-ed, chowned or deleted:
//!
//! - **Entry paths** are normalized: a leading `/` or `./` means the image root, `.` is
//!   dropped, `..` removes the previous component. A path whose `..` would climb above the
//!   root is **refused**: the unpack fails with an error naming the layer and entry. So are
//!   paths with NUL bytes or longer than 4096 bytes, and whiteouts that name `.` or `..`.
//! - **Symlinks on the way to an entry** are resolved **inside the root, like `chroot`**: an
//!   absolute target starts again at the root, `..` stops at the root (is clamped). So with
//!   `a -> /`, `a/etc/x` lands in `<dest>/etc/x`; with `b -> ../../..`, `b/x` in `<dest>/x`.
//!   Every operation is done relative to a directory descriptor reached this way, and the
//!   entry's own name is never followed (an existing symlink there is replaced, not written
//!   through). Symlink entries themselves keep any target: they are only followed in the guest.
//! - **Hardlink targets** are normalized like entry paths (refused if they climb above the
//!   root) and resolved inside the root the same way, so a link can only share an inode that
//!   is already inside the root; a missing target is an error.
//! - **Device nodes** (character, block) are never created (the root is shared with the VM
//!   through virtio-fs); they, and hardlinks to them, are listed in [`Unpacked::skipped`].
//!   FIFOs are created. Unknown entry types and aufs metadata (`.wh..wh.*`) are skipped too.
//! - Mode bits (with setuid, setgid, sticky), owners (lchown semantics; refused chowns are
//!   tolerated when not running as root) and mtimes are preserved. The root directory keeps
//!   the owner and mode the caller gave it.
//!
//! On error the destination is left partly written; the caller should remove it.
//!
//! Layer semantics follow the OCI image spec: layers apply in order; `.wh.NAME` deletes `NAME`
//! as lower layers left it; `.wh..wh..opq` hides everything lower layers put in its directory.
//! Neither touches what the same layer creates, wherever it appears in the tar. A later entry
//! replaces an earlier one, except that a directory over a directory keeps its contents.

#![warn(missing_docs)]

mod archive;
mod fs;
mod layer;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use archive::{OuterArchive, Sha256Digest};

/// Which kind of archive was unpacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ArchiveFormat {
    /// `docker save` (legacy layout or Docker 25+).
    DockerSave,
    /// OCI image layout.
    Oci,
}

/// The parts of the image config that say how to run it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ImageConfig {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env` (`KEY=value`).
    pub env: Vec<String>,
    /// `WorkingDir`, unless empty.
    pub working_dir: Option<String>,
    /// `User` (`uid`, `name`, `uid:gid`, ...), unless empty.
    pub user: Option<String>,
}

/// What [`unpack_archive`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unpacked {
    /// The archive's format.
    pub format: ArchiveFormat,
    /// The image's name (repo tag or OCI ref name), when the archive gives one.
    pub reference: Option<String>,
    /// Digest of the image config (the image ID), `sha256:...`, when known.
    pub image_id: Option<String>,
    /// Number of layers applied.
    pub layers: usize,
    /// How to run the image.
    pub config: ImageConfig,
    /// Entries not created, each as `path: why` (device nodes, unsupported types).
    pub skipped: Vec<String>,
}

/// One image of an archive, as [`inspect_archive`] found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageSummary {
    /// The image's name: a repo tag (`docker save`) or OCI ref name, when the archive gives one.
    pub reference: Option<String>,
    /// The archive's format.
    pub format: ArchiveFormat,
    /// Number of layers.
    pub layers: usize,
    /// Sum of the layer members' sizes as stored in the archive (compressed, if they are).
    pub layer_bytes: u64,
    /// `os/architecture[/variant]` from the image config (or, failing that, from the index
    /// entry that selected the manifest), when known.
    pub platform: Option<String>,
}

/// Errors of [`unpack_archive`] and [`inspect_archive`].
#[derive(Debug, Error)]
pub enum OciError {
    /// The archive cannot be opened.
    #[error("cannot open image archive {}", path.display())]
    Open {
        /// The archive.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The destination is not an existing empty directory.
    #[error("cannot unpack into {}: {reason}", path.display())]
    Destination {
        /// The destination.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The file is not a (possibly compressed) tar archive.
    #[error("{} is not an image archive: {}", path.display(), printable(reason))]
    NotArchive {
        /// The archive.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Reading or decompressing the archive failed.
    #[error("cannot read image archive {}: {}", path.display(), printable(reason))]
    Read {
        /// The archive.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A member's data extends past the end of the file.
    #[error("image archive {} is truncated: {} extends past the end of the file", path.display(), printable(what))]
    Truncated {
        /// The archive.
        path: PathBuf,
        /// What is cut short (`member NAME`, `a tar header`).
        what: String,
    },
    /// A member the image needs is not in the archive.
    #[error("image archive {} has no {}{note}", path.display(), printable(member))]
    MissingMember {
        /// The archive.
        path: PathBuf,
        /// The missing member.
        member: String,
        /// Empty, or a remark that the archive looks truncated.
        note: &'static str,
    },
    /// Neither `manifest.json` nor `index.json`.
    #[error("{} is neither a docker save archive (no manifest.json) nor an OCI image layout (no index.json){note}", path.display())]
    UnknownLayout {
        /// The archive.
        path: PathBuf,
        /// Empty, or a remark that the archive looks truncated.
        note: &'static str,
    },
    /// A JSON document is over the size limit.
    #[error(
        "{} is {size} bytes, over the {limit}-byte limit for JSON documents",
        printable(what)
    )]
    TooLarge {
        /// The member or digest.
        what: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A JSON document does not parse.
    #[error("{} is not valid", printable(what))]
    Json {
        /// The member or digest.
        what: String,
        /// The parse error.
        #[source]
        source: JsonError,
    },
    /// A document is well-formed JSON but not usable.
    #[error("{}: {}", printable(what), printable(reason))]
    Invalid {
        /// The member or digest.
        what: String,
        /// Why.
        reason: String,
    },
    /// The archive lists no image.
    #[error("image archive {} holds no image", path.display())]
    NoImage {
        /// The archive.
        path: PathBuf,
    },
    /// Several images and none chosen.
    #[error("image archive {} holds several images; choose one of: {}", path.display(), printable(refs))]
    Ambiguous {
        /// The archive.
        path: PathBuf,
        /// The images, comma-separated.
        refs: String,
    },
    /// The chosen image is not in the archive.
    #[error("image archive {} has no image {}; it holds: {}", path.display(), printable(wanted), printable(refs))]
    ImageNotFound {
        /// The archive.
        path: PathBuf,
        /// What was asked for.
        wanted: String,
        /// The images, comma-separated.
        refs: String,
    },
    /// A multi-platform index has nothing for this host.
    #[error(
        "image index {digest} has no manifest for {wanted}; it has: {}",
        printable(available)
    )]
    NoPlatform {
        /// The index.
        digest: String,
        /// `os/arch`.
        wanted: String,
        /// The platforms listed.
        available: String,
    },
    /// A digest that is not `sha256:<64 hex digits>`.
    #[error("unsupported or malformed digest {digest:?} (expected sha256:<64 hex digits>)")]
    UnsupportedDigest {
        /// The digest.
        digest: String,
    },
    /// A blob's content does not match its digest.
    #[error("blob {digest} does not match its digest: its content hashes to sha256:{actual}")]
    DigestMismatch {
        /// The expected digest.
        digest: String,
        /// The actual SHA-256, hex.
        actual: String,
    },
    /// A blob's size does not match its descriptor.
    #[error("blob {digest} is {actual} bytes, its descriptor says {expected}")]
    SizeMismatch {
        /// The blob.
        digest: String,
        /// Size in the descriptor.
        expected: u64,
        /// Size in the archive.
        actual: u64,
    },
    /// A layer's uncompressed tar does not match the config's diff ID.
    #[error("layer {} does not match diff ID {expected} from the image config: its tar hashes to sha256:{actual}", printable(layer))]
    DiffIdMismatch {
        /// The layer member.
        layer: String,
        /// The diff ID.
        expected: String,
        /// The actual SHA-256, hex.
        actual: String,
    },
    /// A layer cannot be read (decompression, tar format, truncation).
    #[error("layer {}: {}", printable(layer), printable(reason))]
    Layer {
        /// The layer member.
        layer: String,
        /// Why.
        reason: String,
    },
    /// Reading the image would go past one of its [`UnpackLimits`] (a decompression bomb, or
    /// an image larger than allowed).
    #[error("{} expands beyond {limit} {unit}: refused as a possible decompression bomb (set {var} to allow more)", printable(what))]
    Expansion {
        /// What was being expanded (the archive, a layer, an entry).
        what: String,
        /// The limit.
        limit: u64,
        /// `bytes` or `entries`.
        unit: &'static str,
        /// The variable that sets the limit.
        var: &'static str,
    },
    /// An entry of a layer was refused or could not be created.
    #[error(
        "layer {}: entry {}: {}",
        printable(layer),
        printable(entry),
        printable(reason)
    )]
    Entry {
        /// The layer member.
        layer: String,
        /// The entry's path as written in the tar.
        entry: String,
        /// Why.
        reason: String,
    },
}

/// Caps on what reading an image may expand to, so that a small hostile archive (a
/// decompression bomb, a layer of millions of entries or one huge file) fails with a clear
/// error instead of filling the host's disk. Each can be set in the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Bytes a compressed archive or the layers of one image may expand to, in all
    /// ([`MAX_BYTES_ENV`]; default 64 GiB).
    pub total_bytes: u64,
    /// Size of one file in a layer ([`MAX_FILE_BYTES_ENV`]; default 16 GiB).
    pub file_bytes: u64,
    /// Entries in the outer archive, and in all the layers of one image
    /// ([`MAX_ENTRIES_ENV`]; default 2,000,000).
    pub entries: u64,
}

/// Overrides [`UnpackLimits::total_bytes`] (bytes, or with a K/M/G/T suffix).
pub const MAX_BYTES_ENV: &str = "GATEVM_UNPACK_MAX_BYTES";
/// Overrides [`UnpackLimits::file_bytes`] (bytes, or with a K/M/G/T suffix).
pub const MAX_FILE_BYTES_ENV: &str = "GATEVM_UNPACK_MAX_FILE_BYTES";
/// Overrides [`UnpackLimits::entries`].
pub const MAX_ENTRIES_ENV: &str = "GATEVM_UNPACK_MAX_ENTRIES";

impl Default for UnpackLimits {
    fn default() -> Self {
        UnpackLimits {
            total_bytes: 64 << 30,
            file_bytes: 16 << 30,
            entries: 2_000_000,
        }
    }
}

/// A count with an optional binary suffix (`64G`, `512M`, `1000`).
fn parse_amount(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 10),
        (i, 'm' | 'M') => (&s[..i], 20),
        (i, 'g' | 'G') => (&s[..i], 30),
        (i, 't' | 'T') => (&s[..i], 40),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().ok()?;
    let v = n.checked_mul(1u64 << shift)?;
    (v > 0).then_some(v)
}

impl UnpackLimits {
    /// The defaults, with the overrides set in the environment.
    pub fn from_env() -> Result<Self, OciError> {
        Self::from_lookup(&|k| std::env::var(k).ok())
    }

    fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> Result<Self, OciError> {
        let mut l = UnpackLimits::default();
        for (var, field) in [
            (MAX_BYTES_ENV, &mut l.total_bytes),
            (MAX_FILE_BYTES_ENV, &mut l.file_bytes),
            (MAX_ENTRIES_ENV, &mut l.entries),
        ] {
            if let Some(v) = get(var).filter(|v| !v.is_empty()) {
                *field = parse_amount(&v).ok_or_else(|| OciError::Invalid {
                    what: format!("{var}={v}"),
                    reason: "not a positive number (a K, M, G or T suffix may follow)".into(),
                })?;
            }
        }
        Ok(l)
    }

    pub(crate) fn total_error(&self, what: String) -> OciError {
        OciError::Expansion {
            what,
            limit: self.total_bytes,
            unit: "bytes",
            var: MAX_BYTES_ENV,
        }
    }

    pub(crate) fn file_error(&self, what: String) -> OciError {
        OciError::Expansion {
            what,
            limit: self.file_bytes,
            unit: "bytes",
            var: MAX_FILE_BYTES_ENV,
        }
    }

    pub(crate) fn entries_error(&self, what: String) -> OciError {
        OciError::Expansion {
            what,
            limit: self.entries,
            unit: "entries",
            var: MAX_ENTRIES_ENV,
        }
    }
}

/// Removes everything inside `dir` (not following symlinks), best effort.
fn empty_dir(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        let is_dir = std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir());
        let _ = if is_dir {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
    }
}

/// `s` with control characters (newlines, terminal escapes, ...) escaped, so that a message
/// quoting archive content (member names, references, a tar reader's complaint about header
/// bytes) stays on one line and cannot drive the terminal.
/// A JSON parse error of a document from the archive. Its text can quote the document, so it is
/// shown through `printable` (control characters escaped), like every text from the archive.
#[derive(Debug)]
pub struct JsonError(serde_json::Error);

impl std::fmt::Display for JsonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&printable(&self.0.to_string()))
    }
}

impl std::error::Error for JsonError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.0)
    }
}

fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return s.into();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const ANNOTATION_REF: &str = "org.opencontainers.image.ref.name";
const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";
/// How deep image indexes may nest.
const MAX_INDEX_DEPTH: usize = 4;

/// Unpacks the image in `archive` into `dest`, which must be an existing empty directory.
///
/// `image` selects an image when the archive holds several: a repo tag (`busybox:latest`;
/// `busybox` and `docker.io/library/busybox:latest` match it too), an OCI ref name, or an image
/// ID / manifest digest (at least 12 hex digits). With `None` the archive must hold one image
/// (a multi-platform image counts as one); otherwise the error lists them.
///
/// See the [module documentation](self) for the formats and the safety policy.
pub fn unpack_archive(
    archive: &Path,
    dest: &Path,
    image: Option<&str>,
) -> Result<Unpacked, OciError> {
    unpack_archive_with(archive, dest, image, &UnpackLimits::from_env()?)
}

/// [`unpack_archive`] with explicit [`UnpackLimits`] instead of those of the environment.
pub fn unpack_archive_with(
    archive: &Path,
    dest: &Path,
    image: Option<&str>,
    limits: &UnpackLimits,
) -> Result<Unpacked, OciError> {
    check_destination(dest)?;
    let outer = OuterArchive::open(archive, limits)?;
    let format = layout(&outer)?;
    let selected = match format {
        ArchiveFormat::DockerSave => select_docker(&outer, image)?,
        ArchiveFormat::Oci => select_oci(&outer, image, host_arch())?,
    };
    let config_file: ConfigFile =
        outer.read_json(&selected.config_member, selected.config_digest.as_ref())?;
    let config = config_file.image_config();
    if let Some(os) = config_file.os.as_deref().filter(|os| *os != "linux") {
        tracing::warn!(os, "image is not a linux image");
    }
    let diff_ids = config_file.diff_ids(&selected.config_member, selected.layers.len())?;

    let root = fs::Root::open(dest).map_err(|e| OciError::Destination {
        path: dest.to_owned(),
        reason: e.to_string(),
    })?;
    let mut unpacker = layer::Unpacker::new(root, *limits);
    for (i, layer) in selected.layers.iter().enumerate() {
        let (reader, size) = layer_member(&outer, layer)?;
        let name = layer.name();
        tracing::debug!(layer = %name, size, "applying layer");
        if let Err(e) = unpacker.apply(&name, reader, layer.digest.as_ref(), diff_ids.get(i)) {
            // A bomb leaves nothing of what it expanded behind.
            if matches!(e, OciError::Expansion { .. }) {
                empty_dir(dest);
            }
            return Err(e);
        }
    }
    Ok(Unpacked {
        format,
        reference: selected.reference,
        image_id: selected.config_digest.map(|d| d.to_string()),
        layers: selected.layers.len(),
        config,
        skipped: unpacker.skipped,
    })
}

/// Lists the images in `archive` without unpacking anything: what `gatevm image import` checks
/// before it streams the archive to `ctr images import` in the VM, so that a file that cannot
/// be imported fails early with a one-line error.
///
/// Reads the archive's member index and its JSON documents (`manifest.json` or `index.json`,
/// image indexes and manifests, image configs), checks the digests and sizes of those
/// documents, and checks that every layer they reference is a member lying within the file
/// (with the size its descriptor gives). Layer data is neither read nor hashed: an
/// uncompressed archive is read only at its tar headers and JSON members (a gzip or zstd
/// compressed one is decompressed to a temporary file first, as [`unpack_archive`] does).
///
/// Returns one summary per image: for `docker save`, one per repo tag (an untagged image
/// gives one summary without a reference); for an OCI layout, one per name in `index.json`
/// (unnamed entries are one image each). A multi-platform image gives **one** summary, for
/// the manifest the host would pick (linux and [`host_arch`], as `ctr images import` and
/// [`unpack_archive`] choose); when it has none for this host, that is an error
/// ([`OciError::NoPlatform`], listing the platforms it has), since the VM could not run it.
///
/// Errors are those of [`unpack_archive`]: not an archive (empty file, random bytes), truncated,
/// neither layout, bad JSON, a missing member, [`OciError::NoImage`] when nothing is listed.
pub fn inspect_archive(archive: &Path) -> Result<Vec<ImageSummary>, OciError> {
    let outer = OuterArchive::open(archive, &UnpackLimits::from_env()?)?;
    let format = layout(&outer)?;
    let images = match format {
        ArchiveFormat::DockerSave => docker_images(&outer)?,
        ArchiveFormat::Oci => oci_images(&outer, host_arch())?,
    };
    if images.is_empty() {
        return Err(OciError::NoImage {
            path: outer.path().to_owned(),
        });
    }
    let mut summaries = Vec::with_capacity(images.len());
    for image in images {
        let config: ConfigFile =
            outer.read_json(&image.config_member, image.config_digest.as_ref())?;
        let mut layer_bytes = 0u64;
        for layer in &image.layers {
            let (_, size) = layer_member(&outer, layer)?;
            layer_bytes = layer_bytes.saturating_add(size);
        }
        summaries.push(ImageSummary {
            reference: image.reference,
            format,
            layers: image.layers.len(),
            layer_bytes,
            platform: config
                .platform()
                .or_else(|| image.platform.map(|p| p.to_string())),
        });
    }
    Ok(summaries)
}

/// Which layout the archive has, told by its top-level document.
fn layout(outer: &OuterArchive) -> Result<ArchiveFormat, OciError> {
    if outer.contains("manifest.json") {
        Ok(ArchiveFormat::DockerSave)
    } else if outer.contains("index.json") {
        Ok(ArchiveFormat::Oci)
    } else {
        Err(OciError::UnknownLayout {
            path: outer.path().to_owned(),
            note: outer.note(),
        })
    }
}

/// A layer's member (a reader at its data, not yet read) and its size, checked against the
/// descriptor's size when there is one.
fn layer_member<'a>(
    outer: &'a OuterArchive,
    layer: &LayerRef,
) -> Result<(archive::MemberReader<'a>, u64), OciError> {
    let (reader, size) = outer.member(&layer.member)?;
    if let (Some(expected), Some(digest)) = (layer.size, &layer.digest) {
        if expected != size {
            return Err(OciError::SizeMismatch {
                digest: digest.to_string(),
                expected,
                actual: size,
            });
        }
    }
    Ok((reader, size))
}

fn check_destination(dest: &Path) -> Result<(), OciError> {
    let bad = |reason: String| OciError::Destination {
        path: dest.to_owned(),
        reason,
    };
    let meta = std::fs::metadata(dest).map_err(|e| bad(e.to_string()))?;
    if !meta.is_dir() {
        return Err(bad("not a directory".into()));
    }
    let mut entries = std::fs::read_dir(dest).map_err(|e| bad(e.to_string()))?;
    if entries.next().is_some() {
        return Err(bad("the directory is not empty".into()));
    }
    Ok(())
}

/// The OCI name of the host's architecture (`GOARCH` spelling).
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "loongarch64" => "loong64",
        other => other,
    }
}

/// One layer to apply.
struct LayerRef {
    /// Member of the outer archive.
    member: String,
    /// Digest of the blob, when the layout gives one.
    digest: Option<Sha256Digest>,
    /// Size from the descriptor.
    size: Option<u64>,
}

impl LayerRef {
    /// How errors and logs name the layer: its digest, else its member.
    fn name(&self) -> String {
        match &self.digest {
            Some(d) => d.to_string(),
            None => self.member.clone(),
        }
    }
}

/// The image chosen in the archive.
struct Selected {
    reference: Option<String>,
    config_member: String,
    config_digest: Option<Sha256Digest>,
    layers: Vec<LayerRef>,
    /// The platform of the index entry that led to the manifest, when there was one.
    platform: Option<Platform>,
}

/// `name[:tag]` / `name@digest` in a canonical form: `docker.io/` and `library/` dropped,
/// `:latest` added when there is neither tag nor digest.
/// A reference in a short canonical form for comparing (`docker.io/library/busybox:1` and
/// `busybox:1` both become `busybox:1`; a missing tag is `latest`).
pub fn normalize_ref(r: &str) -> String {
    let r = r.trim();
    let (name, suffix) = match r.find('@') {
        Some(at) => r.split_at(at),
        None => {
            let slash = r.rfind('/').map_or(0, |i| i + 1);
            match r[slash..].rfind(':') {
                Some(colon) => r.split_at(slash + colon),
                None => (r, ":latest"),
            }
        }
    };
    let name = name
        .strip_prefix("docker.io/")
        .or_else(|| name.strip_prefix("index.docker.io/"))
        .unwrap_or(name);
    let name = name.strip_prefix("library/").unwrap_or(name);
    format!("{name}{suffix}")
}

/// Whether the user's `wanted` names the image called `name`.
fn ref_matches(wanted: &str, name: &str) -> bool {
    wanted == name || normalize_ref(wanted) == normalize_ref(name)
}

/// Whether `wanted` is (a prefix of at least 12 hex digits of) `digest`.
fn digest_matches(wanted: &str, digest: &Sha256Digest) -> bool {
    let hex = wanted.strip_prefix("sha256:").unwrap_or(wanted);
    hex.len() >= 12
        && hex.bytes().all(|b| b.is_ascii_hexdigit())
        && digest.hex().starts_with(&hex.to_ascii_lowercase())
}

/// A member name of the form `blobs/sha256/<hex>` names its own digest.
fn digest_of_blob_path(member: &str) -> Option<Sha256Digest> {
    let key = member.trim_start_matches("./").trim_start_matches('/');
    Sha256Digest::from_hex(key.strip_prefix("blobs/sha256/")?)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    #[serde(default)]
    layers: Option<Vec<String>>,
}

impl DockerManifestEntry {
    /// The image ID, when the config's member name gives it (`blobs/sha256/<hex>`, or the
    /// legacy `<hex>.json`).
    fn config_digest(&self) -> Option<Sha256Digest> {
        digest_of_blob_path(&self.config).or_else(|| {
            let base = self.config.rsplit('/').next()?;
            Sha256Digest::from_hex(base.strip_suffix(".json")?)
        })
    }

    /// This image, named `reference`.
    fn selected(&self, reference: Option<String>) -> Selected {
        Selected {
            reference,
            config_member: self.config.clone(),
            config_digest: self.config_digest(),
            layers: self
                .layers
                .iter()
                .flatten()
                .map(|l| LayerRef {
                    member: l.clone(),
                    digest: digest_of_blob_path(l),
                    size: None,
                })
                .collect(),
            platform: None,
        }
    }
}

/// Every image of a `docker save` archive, once per repo tag.
fn docker_images(outer: &OuterArchive) -> Result<Vec<Selected>, OciError> {
    let entries: Vec<DockerManifestEntry> = outer.read_json("manifest.json", None)?;
    let mut images = Vec::new();
    for e in &entries {
        match e.repo_tags.as_deref() {
            Some(tags) if !tags.is_empty() => {
                images.extend(tags.iter().map(|t| e.selected(Some(t.clone()))));
            }
            _ => images.push(e.selected(None)),
        }
    }
    Ok(images)
}

fn select_docker(outer: &OuterArchive, image: Option<&str>) -> Result<Selected, OciError> {
    let entries: Vec<DockerManifestEntry> = outer.read_json("manifest.json", None)?;
    let config_digest = DockerManifestEntry::config_digest;
    let names = |e: &DockerManifestEntry| -> Vec<String> {
        match e.repo_tags.as_deref() {
            Some(tags) if !tags.is_empty() => tags.to_vec(),
            _ => vec![config_digest(e).map_or_else(|| e.config.clone(), |d| d.to_string())],
        }
    };
    let all_refs = || {
        entries
            .iter()
            .flat_map(names)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (entry, reference) = match image {
        None => match entries.as_slice() {
            [] => {
                return Err(OciError::NoImage {
                    path: outer.path().to_owned(),
                })
            }
            [one] => (one, one.repo_tags.as_ref().and_then(|t| t.first().cloned())),
            _ => {
                return Err(OciError::Ambiguous {
                    path: outer.path().to_owned(),
                    refs: all_refs(),
                })
            }
        },
        Some(wanted) => {
            let by_tag = entries.iter().find_map(|e| {
                let tag = e
                    .repo_tags
                    .as_ref()?
                    .iter()
                    .find(|t| ref_matches(wanted, t))?;
                Some((e, Some(tag.clone())))
            });
            let by_id = || {
                entries.iter().find_map(|e| {
                    let d = config_digest(e)?;
                    digest_matches(wanted, &d)
                        .then(|| (e, e.repo_tags.as_ref().and_then(|t| t.first().cloned())))
                })
            };
            by_tag
                .or_else(by_id)
                .ok_or_else(|| OciError::ImageNotFound {
                    path: outer.path().to_owned(),
                    wanted: wanted.to_owned(),
                    refs: all_refs(),
                })?
        }
    };
    Ok(entry.selected(reference))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: Option<String>,
    digest: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    platform: Option<Platform>,
    #[serde(default)]
    annotations: Option<HashMap<String, String>>,
}

impl Descriptor {
    fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.as_ref()?.get(key).map(String::as_str)
    }

    /// The image name an index gives this descriptor.
    fn name(&self) -> Option<&str> {
        self.annotation(ANNOTATION_CONTAINERD_NAME)
            .or_else(|| self.annotation(ANNOTATION_REF))
    }

    fn is_attestation(&self) -> bool {
        self.annotation("vnd.docker.reference.type") == Some("attestation-manifest")
    }
}

#[derive(Debug, Clone, Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

/// An image manifest (the parts used here).
struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
    /// The platform of the descriptor that pointed to it.
    platform: Option<Platform>,
}

/// Either document a descriptor may point to, told apart by media type or shape.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexOrManifest {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

/// The entries of `index.json` (attestation manifests left out), after checking `oci-layout`.
fn oci_index(outer: &OuterArchive) -> Result<Vec<Descriptor>, OciError> {
    if outer.contains("oci-layout") {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Layout {
            image_layout_version: String,
        }
        let layout: Layout = outer.read_json("oci-layout", None)?;
        if !layout.image_layout_version.starts_with("1.") {
            return Err(OciError::Invalid {
                what: "oci-layout".into(),
                reason: format!(
                    "unsupported imageLayoutVersion {}",
                    layout.image_layout_version
                ),
            });
        }
    }
    let index: Index = outer.read_json("index.json", None)?;
    let mut manifests = index.manifests.unwrap_or_default();
    manifests.retain(|d| !d.is_attestation());
    Ok(manifests)
}

/// The entry to follow when `distinct` (index.json entries with distinct digests) is one
/// image: the only entry, or, when all have a platform and the same name (one image whose
/// platform manifests are listed directly in index.json), the one for linux/`arch`. `None`
/// when they are several images.
fn single_image<'a>(
    distinct: &[&'a Descriptor],
    arch: &str,
) -> Result<Option<&'a Descriptor>, OciError> {
    match distinct {
        [] => Ok(None),
        [one] => Ok(Some(one)),
        [first, ..]
            if distinct.iter().all(|d| d.platform.is_some())
                && distinct.iter().all(|d| d.name() == first.name()) =>
        {
            select_platform(distinct, arch, "index.json").map(Some)
        }
        _ => Ok(None),
    }
}

/// Every image of an OCI layout: the entries of index.json grouped by name (in order of first
/// appearance); a group is one image when [`single_image`] says so, else each entry is one.
fn oci_images(outer: &OuterArchive, arch: &str) -> Result<Vec<Selected>, OciError> {
    let manifests = oci_index(outer)?;
    let mut groups: Vec<(Option<&str>, Vec<&Descriptor>)> = Vec::new();
    for d in &manifests {
        match groups.iter_mut().find(|(name, _)| *name == d.name()) {
            Some((_, group)) => {
                if !group.iter().any(|g| g.digest == d.digest) {
                    group.push(d);
                }
            }
            None => groups.push((d.name(), vec![d])),
        }
    }
    let mut images = Vec::new();
    for (_, group) in &groups {
        match single_image(group, arch)? {
            Some(top) => images.push(oci_selected(outer, top, arch)?),
            None => {
                for d in group {
                    images.push(oci_selected(outer, d, arch)?);
                }
            }
        }
    }
    Ok(images)
}

fn select_oci(outer: &OuterArchive, image: Option<&str>, arch: &str) -> Result<Selected, OciError> {
    let manifests = oci_index(outer)?;
    let path = outer.path().to_owned();
    let candidates: Vec<&Descriptor> = manifests.iter().collect();
    let show = |d: &Descriptor| match (d.name(), &d.platform) {
        (Some(n), Some(p)) => format!("{n} ({p})"),
        (Some(n), None) => n.to_owned(),
        (None, Some(p)) => format!("{} ({p})", d.digest),
        (None, None) => d.digest.clone(),
    };
    let all_refs = || {
        candidates
            .iter()
            .map(|d| show(d))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let chosen: Vec<&Descriptor> = match image {
        Some(wanted) => {
            let by_name: Vec<&Descriptor> = candidates
                .iter()
                .copied()
                .filter(|d| {
                    [
                        d.annotation(ANNOTATION_CONTAINERD_NAME),
                        d.annotation(ANNOTATION_REF),
                    ]
                    .into_iter()
                    .flatten()
                    .any(|n| ref_matches(wanted, n))
                })
                .collect();
            let chosen = if by_name.is_empty() {
                candidates
                    .iter()
                    .copied()
                    .filter(|d| {
                        Sha256Digest::parse(&d.digest).is_ok_and(|dg| digest_matches(wanted, &dg))
                    })
                    .collect()
            } else {
                by_name
            };
            if chosen.is_empty() {
                return Err(OciError::ImageNotFound {
                    path,
                    wanted: wanted.to_owned(),
                    refs: all_refs(),
                });
            }
            chosen
        }
        None => candidates.clone(),
    };
    if chosen.is_empty() {
        return Err(OciError::NoImage { path });
    }
    let mut seen = std::collections::HashSet::new();
    let distinct: Vec<&Descriptor> = chosen
        .iter()
        .copied()
        .filter(|d| seen.insert(d.digest.as_str()))
        .collect();
    let Some(top) = single_image(&distinct, arch)? else {
        return Err(OciError::Ambiguous {
            path,
            refs: distinct
                .iter()
                .map(|d| show(d))
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    oci_selected(outer, top, arch)
}

/// The image an index.json entry leads to (through nested indexes, for linux/`arch`): its
/// manifest read and checked, its config's size checked.
fn oci_selected(outer: &OuterArchive, top: &Descriptor, arch: &str) -> Result<Selected, OciError> {
    let reference = top.name().map(str::to_owned);
    let manifest = resolve_manifest(outer, top, arch, 0)?;
    let config_digest = Sha256Digest::parse(&manifest.config.digest)?;
    let mut layers = Vec::with_capacity(manifest.layers.len());
    for l in &manifest.layers {
        let digest = Sha256Digest::parse(&l.digest)?;
        layers.push(LayerRef {
            member: digest.blob_path(),
            digest: Some(digest),
            size: l.size,
        });
    }
    let config_member = config_digest.blob_path();
    if let Some(expected) = manifest.config.size {
        let (_, actual) = outer.member(&config_member)?;
        if expected != actual {
            return Err(OciError::SizeMismatch {
                digest: config_digest.to_string(),
                expected,
                actual,
            });
        }
    }
    Ok(Selected {
        reference,
        config_member,
        config_digest: Some(config_digest),
        layers,
        platform: manifest.platform,
    })
}

/// Reads the blob a descriptor points to (checking digest and size) and follows image indexes
/// down to an image manifest for linux/`arch`.
fn resolve_manifest(
    outer: &OuterArchive,
    desc: &Descriptor,
    arch: &str,
    depth: usize,
) -> Result<Manifest, OciError> {
    if depth > MAX_INDEX_DEPTH {
        return Err(OciError::Invalid {
            what: desc.digest.clone(),
            reason: format!("image indexes nest more than {MAX_INDEX_DEPTH} deep"),
        });
    }
    let digest = Sha256Digest::parse(&desc.digest)?;
    let member = digest.blob_path();
    if let Some(expected) = desc.size {
        let (_, actual) = outer.member(&member)?;
        if expected != actual {
            return Err(OciError::SizeMismatch {
                digest: digest.to_string(),
                expected,
                actual,
            });
        }
    }
    let doc: IndexOrManifest = outer.read_json(&member, Some(&digest))?;
    let media = desc.media_type.as_deref().or(doc.media_type.as_deref());
    let is_index = match media {
        Some(MEDIA_OCI_INDEX | MEDIA_DOCKER_LIST) => true,
        Some(MEDIA_OCI_MANIFEST | MEDIA_DOCKER_MANIFEST) => false,
        _ => doc.manifests.is_some() && doc.config.is_none(),
    };
    if is_index {
        let manifests: Vec<Descriptor> = doc.manifests.unwrap_or_default();
        let candidates: Vec<&Descriptor> =
            manifests.iter().filter(|d| !d.is_attestation()).collect();
        let next = select_platform(&candidates, arch, &digest.to_string())?;
        return resolve_manifest(outer, next, arch, depth + 1);
    }
    let Some(config) = doc.config else {
        return Err(OciError::Invalid {
            what: digest.to_string(),
            reason: "neither an image manifest (no config) nor an image index".into(),
        });
    };
    Ok(Manifest {
        config,
        layers: doc.layers.unwrap_or_default(),
        platform: desc.platform.clone(),
    })
}

/// Picks the manifest for linux/`arch` in an index (`what` names it in errors). Entries
/// without a platform are taken only when they are alone.
fn select_platform<'a>(
    candidates: &[&'a Descriptor],
    arch: &str,
    what: &str,
) -> Result<&'a Descriptor, OciError> {
    let matching: Vec<&Descriptor> = candidates
        .iter()
        .copied()
        .filter(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == arch)
        })
        .collect();
    // arm64: plain or v8 before later variants; otherwise the first listed.
    let best = matching
        .iter()
        .find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| matches!(p.variant.as_deref(), None | Some("v8")))
        })
        .or(matching.first());
    if let Some(best) = best {
        return Ok(best);
    }
    if let [only] = candidates {
        if only.platform.is_none() {
            return Ok(only);
        }
    }
    Err(OciError::NoPlatform {
        digest: what.to_owned(),
        wanted: format!("linux/{arch}"),
        available: candidates
            .iter()
            .map(|d| {
                d.platform
                    .as_ref()
                    .map_or_else(|| "(no platform)".to_owned(), |p| p.to_string())
            })
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// A `string` or `[string]` (Docker accepts both for Entrypoint and Cmd), or null.
#[derive(Clone, Deserialize)]
#[serde(untagged)]
enum StringOrList {
    One(String),
    Many(Vec<String>),
}

impl StringOrList {
    fn into_vec(self) -> Vec<String> {
        match self {
            StringOrList::One(s) => vec![s],
            StringOrList::Many(v) => v,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    #[serde(default)]
    entrypoint: Option<StringOrList>,
    #[serde(default)]
    cmd: Option<StringOrList>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

#[derive(Deserialize, Default)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// The image config JSON (the parts used here).
#[derive(Deserialize)]
struct ConfigFile {
    #[serde(default)]
    config: Option<RunConfig>,
    #[serde(default)]
    rootfs: Option<RootFs>,
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    variant: Option<String>,
}

impl ConfigFile {
    /// `os/architecture[/variant]`, when the config gives both os and architecture.
    fn platform(&self) -> Option<String> {
        fn non_empty(s: &Option<String>) -> Option<&str> {
            s.as_deref().filter(|s| !s.is_empty())
        }
        let os = non_empty(&self.os)?;
        let arch = non_empty(&self.architecture)?;
        Some(match non_empty(&self.variant) {
            Some(v) => format!("{os}/{arch}/{v}"),
            None => format!("{os}/{arch}"),
        })
    }

    fn image_config(&self) -> ImageConfig {
        let empty = RunConfig::default();
        let c = self.config.as_ref().unwrap_or(&empty);
        let list =
            |v: &Option<StringOrList>| v.clone().map(StringOrList::into_vec).unwrap_or_default();
        let non_empty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
        ImageConfig {
            entrypoint: list(&c.entrypoint),
            cmd: list(&c.cmd),
            env: c.env.clone().unwrap_or_default(),
            working_dir: non_empty(&c.working_dir),
            user: non_empty(&c.user),
        }
    }

    /// The diff IDs, when the config lists one per layer (else none are checked).
    fn diff_ids(&self, member: &str, layers: usize) -> Result<Vec<Sha256Digest>, OciError> {
        let ids = self
            .rootfs
            .as_ref()
            .map(|r| r.diff_ids.as_slice())
            .unwrap_or_default();
        if ids.len() != layers {
            if !ids.is_empty() {
                tracing::warn!(config = member, diff_ids = ids.len(), layers, "image config lists a different number of diff IDs than layers; not checking them");
            }
            return Ok(Vec::new());
        }
        ids.iter().map(|id| Sha256Digest::parse(id)).collect()
    }
}
