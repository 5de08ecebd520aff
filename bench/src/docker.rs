//! A `docker save` archive with one layer of given bytes, for the import-throughput case.
//!
//! Layout: `manifest.json` (`[{"Config":"<sha>.json","RepoTags":["bench:latest"],
//! "Layers":["<sha>/layer.tar"]}]`), the image config `<sha of config>.json` (amd64, linux,
//! `rootfs.diff_ids` = the layer tar's sha256) and `<sha of layer>/layer.tar`, a tar holding a
//! single file `data.bin`.

use anyhow::{bail, Context};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::Path;

/// The tag the archive's image carries.
pub const REPO_TAG: &str = "bench:latest";
/// Name of the one file in the layer.
pub const PAYLOAD_NAME: &str = "data.bin";

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveInfo {
    /// sha256 (hex) of the uncompressed layer tar: its diff_id.
    pub layer_sha: String,
    /// sha256 (hex) of the config JSON.
    pub config_sha: String,
    /// Size of the whole archive.
    pub bytes: u64,
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn header(size: u64, mode: u32, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(kind);
    h
}

/// The image config for one layer with diff_id `sha256:<layer_sha>`.
pub fn config_json(layer_sha: &str) -> Vec<u8> {
    let v = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{layer_sha}")] },
        "history": [{ "created_by": "gatevm-bench: random bytes" }],
    });
    v.to_string().into_bytes()
}

/// `manifest.json` naming the config and the one layer.
pub fn manifest_json(config_sha: &str, layer_sha: &str) -> Vec<u8> {
    let v = json!([{
        "Config": format!("{config_sha}.json"),
        "RepoTags": [REPO_TAG],
        "Layers": [format!("{layer_sha}/layer.tar")],
    }]);
    v.to_string().into_bytes()
}

/// Writes the layer tar (one file of `payload_len` bytes from `payload`) to `layer_path` and
/// returns its sha256 (hex).
fn write_layer(layer_path: &Path, payload: impl Read, payload_len: u64) -> anyhow::Result<String> {
    let f = File::create(layer_path)
        .with_context(|| format!("cannot create {}", layer_path.display()))?;
    let w = Hashing {
        inner: BufWriter::with_capacity(1 << 20, f),
        hasher: Sha256::new(),
        count: 0,
    };
    let mut b = tar::Builder::new(w);
    let mut h = header(payload_len, 0o644, tar::EntryType::Regular);
    b.append_data(&mut h, PAYLOAD_NAME, payload.take(payload_len))
        .with_context(|| format!("cannot write {}", layer_path.display()))?;
    let mut w = b
        .into_inner()
        .with_context(|| format!("cannot write {}", layer_path.display()))?;
    w.flush()
        .with_context(|| format!("cannot write {}", layer_path.display()))?;
    // One header block, the data padded to 512, two zero blocks: anything else is a short read.
    let expected = 512 + payload_len.div_ceil(512) * 512 + 1024;
    if w.count != expected {
        bail!("the layer payload was short: fewer than {payload_len} bytes could be read");
    }
    Ok(format!("{:x}", w.hasher.finalize()))
}

/// Writes a docker-save archive to `out` whose one layer holds `payload_len` bytes of `payload`;
/// `layer_path` is a scratch file for the layer tar (hashed before the config can name it).
pub fn write_archive(
    out: &Path,
    layer_path: &Path,
    payload: impl Read,
    payload_len: u64,
) -> anyhow::Result<ArchiveInfo> {
    let layer_sha = write_layer(layer_path, payload, payload_len)?;
    let config = config_json(&layer_sha);
    let config_sha = format!("{:x}", Sha256::digest(&config));
    let manifest = manifest_json(&config_sha, &layer_sha);

    let ctx = || format!("cannot write {}", out.display());
    let f = File::create(out).with_context(ctx)?;
    let mut b = tar::Builder::new(BufWriter::with_capacity(1 << 20, f));
    let mut h = header(manifest.len() as u64, 0o644, tar::EntryType::Regular);
    b.append_data(&mut h, "manifest.json", &manifest[..])
        .with_context(ctx)?;
    let mut h = header(config.len() as u64, 0o644, tar::EntryType::Regular);
    b.append_data(&mut h, format!("{config_sha}.json"), &config[..])
        .with_context(ctx)?;
    let mut h = header(0, 0o755, tar::EntryType::Directory);
    b.append_data(&mut h, format!("{layer_sha}/"), io::empty())
        .with_context(ctx)?;
    let layer =
        File::open(layer_path).with_context(|| format!("cannot read {}", layer_path.display()))?;
    let layer_len = layer
        .metadata()
        .with_context(|| format!("cannot read {}", layer_path.display()))?
        .len();
    let mut h = header(layer_len, 0o644, tar::EntryType::Regular);
    b.append_data(&mut h, format!("{layer_sha}/layer.tar"), layer)
        .with_context(ctx)?;
    let w = b.into_inner().with_context(ctx)?;
    let f = w
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(ctx)?;
    f.sync_all().with_context(ctx)?;
    let bytes = f.metadata().with_context(ctx)?.len();
    Ok(ArchiveInfo {
        layer_sha,
        config_sha,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scratch::Scratch;
    use std::collections::BTreeMap;

    fn members(path: &Path) -> BTreeMap<String, Vec<u8>> {
        let mut a = tar::Archive::new(File::open(path).unwrap());
        let mut out = BTreeMap::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            out.insert(name, data);
        }
        out
    }

    fn sha(b: &[u8]) -> String {
        format!("{:x}", Sha256::digest(b))
    }

    #[test]
    fn layout_manifest_and_diff_id() {
        let s = Scratch::new("gatevm-bench-test").unwrap();
        let payload: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        let out = s.path().join("image.tar");
        let info = write_archive(&out, &s.path().join("layer.tar"), &payload[..], 5000).unwrap();
        assert_eq!(info.bytes, std::fs::metadata(&out).unwrap().len());

        let m = members(&out);
        let manifest: serde_json::Value = serde_json::from_slice(&m["manifest.json"]).unwrap();
        let entry = &manifest.as_array().unwrap()[0];
        assert_eq!(manifest.as_array().unwrap().len(), 1);
        assert_eq!(entry["RepoTags"], json!(["bench:latest"]));

        // The config is named by its own sha256.
        let config_name = entry["Config"].as_str().unwrap();
        let config_bytes = &m[config_name];
        assert_eq!(config_name, format!("{}.json", sha(config_bytes)));
        assert_eq!(config_name, format!("{}.json", info.config_sha));

        // The layer is named by, and the config's diff_id is, the layer tar's sha256.
        let layer_name = entry["Layers"][0].as_str().unwrap();
        let layer_bytes = &m[layer_name];
        assert_eq!(layer_name, format!("{}/layer.tar", sha(layer_bytes)));
        assert_eq!(sha(layer_bytes), info.layer_sha);
        let config: serde_json::Value = serde_json::from_slice(config_bytes).unwrap();
        assert_eq!(
            config["rootfs"]["diff_ids"],
            json!([format!("sha256:{}", sha(layer_bytes))])
        );
        assert_eq!(config["rootfs"]["type"], "layers");
        assert_eq!(config["architecture"], "amd64");
        assert_eq!(config["os"], "linux");

        // The layer holds the payload as its one file.
        let mut inner = tar::Archive::new(&layer_bytes[..]);
        let files: Vec<(String, Vec<u8>)> = inner
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let mut d = Vec::new();
                e.read_to_end(&mut d).unwrap();
                (e.path().unwrap().to_string_lossy().into_owned(), d)
            })
            .collect();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].0, PAYLOAD_NAME);
        assert_eq!(files[0].1, payload);
    }

    #[test]
    fn a_short_payload_is_an_error() {
        let s = Scratch::new("gatevm-bench-test").unwrap();
        let err = write_archive(
            &s.path().join("image.tar"),
            &s.path().join("layer.tar"),
            &[1u8; 10][..],
            4096,
        )
        .unwrap_err();
        assert!(err.to_string().contains("short"), "{err}");
    }
}
