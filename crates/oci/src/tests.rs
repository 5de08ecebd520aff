//! Tests of the image unpacker: archives are built in memory with the `tar` crate.

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tar::{Builder, EntryType, Header};

use super::*;

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// One entry of a layer tar, written verbatim (no path checks: hostile names are the point).
enum E<'a> {
    Dir(&'a str, u32),
    File(&'a str, &'a str, u32),
    Sym(&'a str, &'a str),
    Hard(&'a str, &'a str),
    Char(&'a str, u32, u32),
    Fifo(&'a str, u32),
}

fn raw_entry(
    b: &mut Builder<Vec<u8>>,
    kind: EntryType,
    name: &str,
    link: &str,
    data: &[u8],
    mode: u32,
) -> Header {
    let mut h = Header::new_gnu();
    {
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_600_000_000);
    h.set_cksum();
    b.append(&h, data).unwrap();
    h
}

fn layer(entries: &[E]) -> Vec<u8> {
    let mut b = Builder::new(Vec::new());
    for e in entries {
        match *e {
            E::Dir(n, m) => raw_entry(&mut b, EntryType::Directory, n, "", b"", m),
            E::File(n, data, m) => raw_entry(&mut b, EntryType::Regular, n, "", data.as_bytes(), m),
            E::Sym(n, t) => raw_entry(&mut b, EntryType::Symlink, n, t, b"", 0o777),
            E::Hard(n, t) => raw_entry(&mut b, EntryType::Link, n, t, b"", 0o644),
            E::Fifo(n, m) => raw_entry(&mut b, EntryType::Fifo, n, "", b"", m),
            E::Char(n, major, minor) => {
                let mut h = Header::new_gnu();
                h.as_old_mut().name[..n.len()].copy_from_slice(n.as_bytes());
                h.set_entry_type(EntryType::Char);
                h.set_size(0);
                h.set_mode(0o666);
                h.set_device_major(major).unwrap();
                h.set_device_minor(minor).unwrap();
                h.set_cksum();
                b.append(&h, &b""[..]).unwrap();
                h
            }
        };
    }
    b.into_inner().unwrap()
}

/// An outer tar with regular files.
fn outer(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(EntryType::Regular);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// Two zstd frames with a skippable frame between them (like zstd:chunked).
fn zstd_multi(data: &[u8]) -> Vec<u8> {
    let (a, b) = data.split_at(data.len() / 2);
    let mut out = zstd::encode_all(a, 3).unwrap();
    out.extend_from_slice(&[0x5e, 0x2a, 0x4d, 0x18, 4, 0, 0, 0, 9, 9, 9, 9]);
    out.extend(zstd::encode_all(b, 3).unwrap());
    out
}

fn config_json(run: Value, layers: &[&[u8]]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "architecture": host_arch(),
        "os": "linux",
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| format!("sha256:{}", sha(l))).collect::<Vec<_>>()},
    }))
    .unwrap()
}

/// A legacy `docker save` archive: `<id>/layer.tar`, `<config>.json`, manifest.json last.
/// Tags, layer tars and run config of one image.
type DockerImage<'a> = (&'a [&'a str], &'a [&'a [u8]], Value);

fn docker_legacy(images: &[DockerImage]) -> Vec<u8> {
    let mut files = Vec::new();
    let mut manifest = Vec::new();
    for (tags, layers, run) in images {
        let config = config_json(run.clone(), layers);
        let config_name = format!("{}.json", sha(&config));
        files.push((config_name.clone(), config));
        let mut names = Vec::new();
        for (i, l) in layers.iter().enumerate() {
            let id = sha(format!("{i}{}", sha(l)).as_bytes());
            files.push((format!("{id}/VERSION"), b"1.0".to_vec()));
            files.push((format!("{id}/layer.tar"), l.to_vec()));
            names.push(format!("{id}/layer.tar"));
        }
        manifest.push(json!({"Config": config_name, "RepoTags": tags, "Layers": names}));
    }
    files.push((
        "manifest.json".into(),
        serde_json::to_vec(&manifest).unwrap(),
    ));
    outer(&files)
}

#[derive(Clone, Copy)]
enum Z {
    Plain,
    Gzip,
    Zstd,
}

/// Blobs of an OCI layout being built.
#[derive(Default)]
struct Oci {
    files: Vec<(String, Vec<u8>)>,
}

/// What [`Oci::image`] made.
struct Img {
    manifest: Value,
    config: String,
    layers: Vec<String>,
}

impl Oci {
    fn blob(&mut self, data: Vec<u8>, media: &str) -> Value {
        let hex = sha(&data);
        let size = data.len();
        let name = format!("blobs/sha256/{hex}");
        if !self.files.iter().any(|(n, _)| *n == name) {
            self.files.push((name, data));
        }
        json!({"mediaType": media, "digest": format!("sha256:{hex}"), "size": size})
    }

    fn image(&mut self, layers: &[(&[u8], Z)], run: Value) -> Img {
        let tars: Vec<&[u8]> = layers.iter().map(|(l, _)| *l).collect();
        let config = self.blob(
            config_json(run, &tars),
            "application/vnd.oci.image.config.v1+json",
        );
        let mut descs = Vec::new();
        for (l, z) in layers {
            let (data, media) = match z {
                Z::Plain => (l.to_vec(), "application/vnd.oci.image.layer.v1.tar"),
                Z::Gzip => (gzip(l), "application/vnd.oci.image.layer.v1.tar+gzip"),
                Z::Zstd => (zstd_multi(l), "application/vnd.oci.image.layer.v1.tar+zstd"),
            };
            descs.push(self.blob(data, media));
        }
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_OCI_MANIFEST,
            "config": config,
            "layers": descs,
        });
        let layers = descs
            .iter()
            .map(|d| d["digest"].as_str().unwrap().to_owned())
            .collect();
        Img {
            manifest: self.blob(serde_json::to_vec(&manifest).unwrap(), MEDIA_OCI_MANIFEST),
            config: config["digest"].as_str().unwrap().to_owned(),
            layers,
        }
    }

    fn index(&mut self, manifests: Vec<Value>) -> Value {
        let index =
            json!({"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": manifests});
        self.blob(serde_json::to_vec(&index).unwrap(), MEDIA_OCI_INDEX)
    }

    fn finish(mut self, top: Vec<Value>, extra: Vec<(String, Vec<u8>)>) -> Vec<u8> {
        self.files.push((
            "oci-layout".into(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        ));
        let index = json!({"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": top});
        self.files
            .push(("index.json".into(), serde_json::to_vec(&index).unwrap()));
        self.files.extend(extra);
        outer(&self.files)
    }
}

fn with(mut desc: Value, key: &str, value: Value) -> Value {
    desc[key] = value;
    desc
}

fn named(desc: Value, name: &str) -> Value {
    with(desc, "annotations", json!({ANNOTATION_REF: name}))
}

/// A temporary directory `top` holding the destination `root` and a sentinel file next to
/// it; the archive is written beside `top`.
struct Sandbox {
    tmp: tempfile::TempDir,
    top: PathBuf,
    dest: PathBuf,
    archive: PathBuf,
}

impl Sandbox {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().join("top");
        let dest = top.join("root");
        std::fs::create_dir_all(&dest).unwrap();
        std::fs::write(top.join("sentinel"), "sentinel").unwrap();
        let archive = tmp.path().join("image.tar");
        Sandbox {
            tmp,
            top,
            dest,
            archive,
        }
    }

    fn unpack(&self, bytes: &[u8], image: Option<&str>) -> Result<Unpacked, OciError> {
        std::fs::write(&self.archive, bytes).unwrap();
        let result = unpack_archive(&self.archive, &self.dest, image);
        self.assert_outside_untouched();
        result
    }

    fn unpack_layers(&self, layers: &[&[u8]]) -> Result<Unpacked, OciError> {
        self.unpack(&docker_legacy(&[(&["t:1"], layers, json!({}))]), None)
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.dest.join(rel)
    }

    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.p(rel)).unwrap()
    }

    fn exists(&self, rel: &str) -> bool {
        std::fs::symlink_metadata(self.p(rel)).is_ok()
    }

    /// Nothing next to the destination was created, changed or removed.
    fn assert_outside_untouched(&self) {
        let mut names: Vec<String> = std::fs::read_dir(&self.top)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["root", "sentinel"],
            "something was created or removed next to the destination"
        );
        let sentinel = self.top.join("sentinel");
        let meta = std::fs::symlink_metadata(&sentinel).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.nlink(), 1, "the sentinel got a hardlink");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o644 & !umask_bits());
        assert_eq!(std::fs::read_to_string(&sentinel).unwrap(), "sentinel");
        let mut outer: Vec<String> = std::fs::read_dir(self.tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        outer.sort();
        assert_eq!(outer, ["image.tar", "top"]);
    }

    /// All names under the destination, sorted.
    fn tree(&self) -> Vec<String> {
        fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let e = e.unwrap();
                let name = format!("{prefix}{}", e.file_name().to_string_lossy());
                let is_dir = e.file_type().unwrap().is_dir();
                out.push(name.clone());
                if is_dir {
                    walk(&e.path(), &format!("{name}/"), out);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.dest, "", &mut out);
        out.sort();
        out
    }
}

fn umask_bits() -> u32 {
    let probe = tempfile::tempdir().unwrap();
    let f = probe.path().join("f");
    std::fs::write(&f, "").unwrap();
    !std::fs::metadata(&f).unwrap().permissions().mode() & 0o666
}

fn entry_error(err: OciError) -> (String, String) {
    match err {
        OciError::Entry { entry, reason, .. } => (entry, reason),
        other => panic!("expected an entry error, got {other}"),
    }
}

// ---- formats ------------------------------------------------------------------------------

#[test]
fn docker_legacy_two_layers_with_whiteout_and_opaque_dir() {
    let l1 = layer(&[
        E::Dir("etc/", 0o755),
        E::File("etc/keep", "v1", 0o644),
        E::File("etc/gone", "x", 0o644),
        E::Dir("opq/", 0o755),
        E::File("opq/old", "old", 0o644),
        E::Dir("opq/sub/", 0o755),
        E::File("opq/sub/old2", "old", 0o644),
        E::Dir("dir/", 0o755),
        E::File("dir/inner", "x", 0o644),
        E::Sym("link", "etc/keep"),
        E::Dir("wdir/", 0o755),
        E::File("wdir/a", "a", 0o644),
    ]);
    let l2 = layer(&[
        E::File("etc/keep", "v2", 0o600),
        E::File("etc/.wh.gone", "", 0o644),
        // Same-layer entries before and after the opaque marker both stay.
        E::File("opq/new1", "n1", 0o644),
        E::File("opq/.wh..wh..opq", "", 0o644),
        E::File("opq/sub/new2", "n2", 0o644),
        // A file replaces a directory, a directory replaces a symlink.
        E::File("dir", "now a file", 0o644),
        E::Dir("link/", 0o755),
        // A whiteout of a whole directory; a whiteout of something that does not exist.
        E::File(".wh.wdir", "", 0o644),
        E::File(".wh.nothing", "", 0o644),
        // A whiteout after an entry of the same layer leaves that entry.
        E::File("same", "kept", 0o644),
        E::File(".wh.same", "", 0o644),
    ]);
    let sb = Sandbox::new();
    let u = sb
        .unpack(
            &docker_legacy(&[(&["busybox:latest"], &[&l1, &l2], json!({"Cmd": ["sh"]}))]),
            None,
        )
        .unwrap();
    assert_eq!(u.format, ArchiveFormat::DockerSave);
    assert_eq!(u.reference.as_deref(), Some("busybox:latest"));
    assert_eq!(u.layers, 2);
    assert_eq!(u.config.cmd, ["sh"]);
    assert!(u
        .image_id
        .as_deref()
        .is_some_and(|id| id.starts_with("sha256:")));
    assert_eq!(sb.read("etc/keep"), "v2");
    assert_eq!(
        std::fs::metadata(sb.p("etc/keep"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o600
    );
    assert_eq!(sb.read("dir"), "now a file");
    assert!(std::fs::symlink_metadata(sb.p("link")).unwrap().is_dir());
    assert_eq!(sb.read("same"), "kept");
    assert_eq!(
        sb.tree(),
        [
            "dir",
            "etc",
            "etc/keep",
            "link",
            "opq",
            "opq/new1",
            "opq/sub",
            "opq/sub/new2",
            "same"
        ]
    );
}

#[test]
fn opaque_marker_first_in_the_layer_still_keeps_that_layers_entries() {
    let l1 = layer(&[
        E::Dir("d/", 0o755),
        E::File("d/old", "o", 0o644),
        E::Dir("d/s/", 0o755),
        E::File("d/s/old", "o", 0o644),
    ]);
    let l2 = layer(&[
        E::File("d/.wh..wh..opq", "", 0o644),
        E::Dir("d/", 0o755),
        E::File("d/s/new", "n", 0o644),
    ]);
    let sb = Sandbox::new();
    sb.unpack_layers(&[&l1, &l2]).unwrap();
    assert_eq!(sb.tree(), ["d", "d/s", "d/s/new"]);
}

#[test]
fn opaque_root_directory_hides_lower_layers() {
    let l1 = layer(&[
        E::File("a", "a", 0o644),
        E::Dir("b/", 0o755),
        E::File("b/c", "c", 0o644),
    ]);
    let l2 = layer(&[E::File("x", "x", 0o644), E::File(".wh..wh..opq", "", 0o644)]);
    let sb = Sandbox::new();
    sb.unpack_layers(&[&l1, &l2]).unwrap();
    assert_eq!(sb.tree(), ["x"]);
}

#[test]
fn docker_25_layout_with_blobs() {
    let l1 = layer(&[E::Dir("bin/", 0o755), E::File("bin/sh", "#!", 0o755)]);
    let l2 = layer(&[E::File("hello", "world", 0o644)]);
    let mut oci = Oci::default();
    let img = oci.image(
        &[(&l1, Z::Plain), (&l2, Z::Plain)],
        json!({"Entrypoint": ["/bin/sh"]}),
    );
    let manifest = json!([{
        "Config": format!("blobs/sha256/{}", img.config.trim_start_matches("sha256:")),
        "RepoTags": ["app:1.0"],
        "Layers": img.layers.iter().map(|d| format!("blobs/sha256/{}", d.trim_start_matches("sha256:"))).collect::<Vec<_>>(),
    }]);
    let bytes = oci.finish(
        vec![named(img.manifest, "app:1.0")],
        vec![(
            "manifest.json".into(),
            serde_json::to_vec(&manifest).unwrap(),
        )],
    );
    let sb = Sandbox::new();
    let u = sb.unpack(&bytes, None).unwrap();
    assert_eq!(u.format, ArchiveFormat::DockerSave);
    assert_eq!(u.reference.as_deref(), Some("app:1.0"));
    assert_eq!(u.image_id.as_deref(), Some(img.config.as_str()));
    assert_eq!(u.layers, 2);
    assert_eq!(u.config.entrypoint, ["/bin/sh"]);
    assert_eq!(sb.read("hello"), "world");
    assert_eq!(
        std::fs::metadata(sb.p("bin/sh"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o755
    );
}

#[test]
fn oci_layout_with_gzip_and_zstd_layers() {
    let l1 = layer(&[
        E::Dir("usr/", 0o755),
        E::File("usr/gz", "from gzip", 0o644),
        E::File("usr/big", &"z".repeat(200_000), 0o644),
    ]);
    let l2 = layer(&[
        E::File("usr/zst", "from zstd", 0o644),
        E::File("usr/.wh.big", "", 0o644),
    ]);
    let l3 = layer(&[E::File("plain", "plain", 0o644)]);
    let mut oci = Oci::default();
    let img = oci.image(
        &[(&l1, Z::Gzip), (&l2, Z::Zstd), (&l3, Z::Plain)],
        json!({}),
    );
    let bytes = oci.finish(
        vec![named(img.manifest, "docker.io/library/thing:2")],
        vec![],
    );
    let sb = Sandbox::new();
    let u = sb.unpack(&bytes, None).unwrap();
    assert_eq!(u.format, ArchiveFormat::Oci);
    assert_eq!(u.reference.as_deref(), Some("docker.io/library/thing:2"));
    assert_eq!(u.layers, 3);
    assert_eq!(sb.tree(), ["plain", "usr", "usr/gz", "usr/zst"]);
    assert_eq!(sb.read("usr/gz"), "from gzip");
    assert_eq!(sb.read("usr/zst"), "from zstd");
}

#[test]
fn gzipped_and_zstd_outer_archives() {
    let l = layer(&[E::File("f", "inside", 0o644)]);
    let plain = docker_legacy(&[(&["x:1"], &[&l], json!({}))]);
    for bytes in [gzip(&plain), zstd::encode_all(&plain[..], 3).unwrap()] {
        let sb = Sandbox::new();
        sb.unpack(&bytes, None).unwrap();
        assert_eq!(sb.read("f"), "inside");
    }
}

#[test]
fn nested_index_picks_linux_and_the_host_architecture() {
    let arches = ["amd64", "arm64", "s390x", "riscv64"];
    let mut oci = Oci::default();
    let mut platform_manifests = Vec::new();
    for arch in arches {
        let l = layer(&[E::File("arch", arch, 0o644)]);
        let img = oci.image(&[(&l, Z::Gzip)], json!({"Cmd": [arch]}));
        platform_manifests.push(with(
            img.manifest,
            "platform",
            json!({"os": "linux", "architecture": arch}),
        ));
    }
    // A windows image of the host arch and an attestation come first and must be passed over.
    let win = layer(&[E::File("arch", "windows", 0o644)]);
    let win = oci.image(&[(&win, Z::Plain)], json!({}));
    platform_manifests.insert(
        0,
        with(
            win.manifest,
            "platform",
            json!({"os": "windows", "architecture": host_arch()}),
        ),
    );
    let att = layer(&[E::File("arch", "attestation", 0o644)]);
    let att = oci.image(&[(&att, Z::Plain)], json!({}));
    let att = with(
        att.manifest,
        "platform",
        json!({"os": "unknown", "architecture": "unknown"}),
    );
    platform_manifests.insert(
        0,
        with(
            att,
            "annotations",
            json!({"vnd.docker.reference.type": "attestation-manifest"}),
        ),
    );
    let platforms = oci.index(platform_manifests);
    // index.json -> image index (named) -> platform index -> manifest.
    let outer_index = oci.index(vec![platforms]);
    let bytes = oci.finish(vec![named(outer_index, "multi:latest")], vec![]);
    let sb = Sandbox::new();
    let result = sb.unpack(&bytes, None);
    if arches.contains(&host_arch()) {
        let u = result.unwrap();
        assert_eq!(u.reference.as_deref(), Some("multi:latest"));
        assert_eq!(sb.read("arch"), host_arch());
        assert_eq!(u.config.cmd, [host_arch()]);
    } else {
        let err = result.unwrap_err().to_string();
        assert!(err.contains(&format!("linux/{}", host_arch())), "{err}");
    }
}

#[test]
fn platform_selection_by_architecture() {
    let d = |os: &str, arch: &str, variant: Option<&str>| Descriptor {
        media_type: None,
        digest: format!(
            "sha256:{}",
            sha(format!("{os}{arch}{variant:?}").as_bytes())
        ),
        size: None,
        platform: Some(Platform {
            architecture: arch.into(),
            os: os.into(),
            variant: variant.map(Into::into),
        }),
        annotations: None,
    };
    let list = [
        d("linux", "arm", Some("v7")),
        d("linux", "arm64", Some("v9")),
        d("linux", "arm64", Some("v8")),
        d("linux", "amd64", None),
    ];
    let refs: Vec<&Descriptor> = list.iter().collect();
    assert_eq!(
        select_platform(&refs, "arm64", "idx")
            .unwrap()
            .platform
            .as_ref()
            .unwrap()
            .variant
            .as_deref(),
        Some("v8")
    );
    assert_eq!(
        select_platform(&refs, "amd64", "idx")
            .unwrap()
            .platform
            .as_ref()
            .unwrap()
            .architecture,
        "amd64"
    );
    let err = select_platform(&refs, "ppc64le", "idx")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("linux/ppc64le")
            && err.contains("linux/arm/v7")
            && err.contains("linux/amd64"),
        "{err}"
    );
}

#[test]
fn oci_platform_manifests_listed_directly_in_index_json() {
    let mut oci = Oci::default();
    let mut top = Vec::new();
    for arch in ["ppc64le", host_arch()] {
        let l = layer(&[E::File("arch", arch, 0o644)]);
        let img = oci.image(&[(&l, Z::Plain)], json!({}));
        top.push(with(
            named(img.manifest, "one:1"),
            "platform",
            json!({"os": "linux", "architecture": arch}),
        ));
    }
    let sb = Sandbox::new();
    sb.unpack(&oci.finish(top, vec![]), None).unwrap();
    assert_eq!(sb.read("arch"), host_arch());
}

#[test]
fn several_docker_images_need_a_choice() {
    let la = layer(&[E::File("who", "a", 0o644)]);
    let lb = layer(&[E::File("who", "b", 0o644)]);
    let lc = layer(&[E::File("who", "c", 0o644)]);
    let bytes = docker_legacy(&[
        (&["a:1", "reg.example:5000/team/a:2"], &[&la], json!({})),
        (&["busybox:latest"], &[&lb], json!({})),
        (&[], &[&lc], json!({"Cmd": ["untagged"]})),
    ]);
    let sb = Sandbox::new();
    let err = sb.unpack(&bytes, None).unwrap_err();
    assert!(matches!(err, OciError::Ambiguous { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("a:1") && msg.contains("busybox:latest") && msg.contains("sha256:"),
        "{msg}"
    );

    for (wanted, who, reference) in [
        ("busybox", "b", Some("busybox:latest")),
        (
            "docker.io/library/busybox:latest",
            "b",
            Some("busybox:latest"),
        ),
        (
            "reg.example:5000/team/a:2",
            "a",
            Some("reg.example:5000/team/a:2"),
        ),
        ("a:1", "a", Some("a:1")),
    ] {
        let sb = Sandbox::new();
        let u = sb.unpack(&bytes, Some(wanted)).unwrap();
        assert_eq!(sb.read("who"), who, "{wanted}");
        assert_eq!(u.reference.as_deref(), reference);
    }

    // The untagged image by (a prefix of) its ID.
    let config = config_json(json!({"Cmd": ["untagged"]}), &[&lc]);
    let sb = Sandbox::new();
    let u = sb.unpack(&bytes, Some(&sha(&config)[..12])).unwrap();
    assert_eq!(sb.read("who"), "c");
    assert_eq!(u.config.cmd, ["untagged"]);

    let sb = Sandbox::new();
    let err = sb.unpack(&bytes, Some("nope:1")).unwrap_err();
    assert!(
        matches!(err, OciError::ImageNotFound { .. }) && err.to_string().contains("busybox:latest"),
        "{err}"
    );
    assert!(sb.tree().is_empty());
}

#[test]
fn several_oci_images_need_a_choice() {
    let mut oci = Oci::default();
    let mut top = Vec::new();
    for name in ["first:1", "second:2"] {
        let l = layer(&[E::File("who", name, 0o644)]);
        let img = oci.image(&[(&l, Z::Gzip)], json!({}));
        top.push(named(img.manifest, name));
    }
    let bytes = oci.finish(top, vec![]);
    let sb = Sandbox::new();
    let msg = sb.unpack(&bytes, None).unwrap_err().to_string();
    assert!(msg.contains("first:1") && msg.contains("second:2"), "{msg}");
    let sb = Sandbox::new();
    let u = sb.unpack(&bytes, Some("second:2")).unwrap();
    assert_eq!(sb.read("who"), "second:2");
    assert_eq!(u.reference.as_deref(), Some("second:2"));
    let sb = Sandbox::new();
    assert!(matches!(
        sb.unpack(&bytes, Some("third")),
        Err(OciError::ImageNotFound { .. })
    ));
}

#[test]
fn image_config_is_parsed() {
    let l = layer(&[]);
    let run = json!({
        "Entrypoint": "/docker-entrypoint.sh",
        "Cmd": ["nginx", "-g", "daemon off;"],
        "Env": ["PATH=/usr/bin:/bin", "NGINX_VERSION=1.27"],
        "WorkingDir": "/srv",
        "User": "101:101",
        "ExposedPorts": {"80/tcp": {}},
    });
    let sb = Sandbox::new();
    let u = sb
        .unpack(&docker_legacy(&[(&["n:1"], &[&l], run)]), None)
        .unwrap();
    assert_eq!(
        u.config,
        ImageConfig {
            entrypoint: vec!["/docker-entrypoint.sh".into()],
            cmd: vec!["nginx".into(), "-g".into(), "daemon off;".into()],
            env: vec!["PATH=/usr/bin:/bin".into(), "NGINX_VERSION=1.27".into()],
            working_dir: Some("/srv".into()),
            user: Some("101:101".into()),
        }
    );
    let sb = Sandbox::new();
    let run = json!({"Entrypoint": null, "Cmd": null, "Env": null, "WorkingDir": "", "User": ""});
    let u = sb
        .unpack(&docker_legacy(&[(&["n:1"], &[&l], run)]), None)
        .unwrap();
    assert_eq!(u.config, ImageConfig::default());
}

// ---- integrity ----------------------------------------------------------------------------

#[test]
fn layer_digest_mismatch_names_the_digest() {
    let good = layer(&[E::File("f", "good", 0o644)]);
    let evil = layer(&[E::File("f", "evil", 0o644)]);
    let mut oci = Oci::default();
    let img = oci.image(&[(&good, Z::Gzip)], json!({}));
    let good_blob = gzip(&good);
    let bytes = {
        // Same name and size, other content.
        let mut evil_blob = gzip(&evil);
        evil_blob.resize(good_blob.len(), 0);
        for (name, data) in &mut oci.files {
            if *name == format!("blobs/sha256/{}", sha(&good_blob)) {
                *data = evil_blob.clone();
            }
        }
        oci.finish(vec![img.manifest], vec![])
    };
    let sb = Sandbox::new();
    let err = sb.unpack(&bytes, None).unwrap_err();
    assert!(matches!(err, OciError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&img.layers[0]), "{err}");
}

#[test]
fn config_and_manifest_digest_mismatch() {
    let l = layer(&[E::File("f", "x", 0o644)]);
    let mut oci = Oci::default();
    let img = oci.image(&[(&l, Z::Plain)], json!({}));
    let config_name = format!("blobs/sha256/{}", img.config.trim_start_matches("sha256:"));
    for (name, data) in &mut oci.files {
        if *name == config_name {
            // Same length, other content.
            let pos = data.iter().position(|&b| b == b'l').unwrap();
            data[pos] = b'L';
        }
    }
    let sb = Sandbox::new();
    let err = sb
        .unpack(&oci.finish(vec![img.manifest], vec![]), None)
        .unwrap_err();
    assert!(
        matches!(&err, OciError::DigestMismatch { digest, .. } if *digest == img.config),
        "{err}"
    );
}

#[test]
fn descriptor_size_mismatch() {
    let l = layer(&[E::File("f", "x", 0o644)]);
    let mut oci = Oci::default();
    let img = oci.image(&[(&l, Z::Plain)], json!({}));
    let manifest = with(
        img.manifest.clone(),
        "size",
        json!(img.manifest["size"].as_u64().unwrap() + 1),
    );
    let sb = Sandbox::new();
    let err = sb
        .unpack(&oci.finish(vec![manifest], vec![]), None)
        .unwrap_err();
    assert!(matches!(err, OciError::SizeMismatch { .. }), "{err}");
}

#[test]
fn diff_id_mismatch_in_docker_legacy() {
    let l = layer(&[E::File("f", "x", 0o644)]);
    let other = layer(&[E::File("f", "y", 0o644)]);
    let config = config_json(json!({}), &[&other]);
    let cname = format!("{}.json", sha(&config));
    let manifest = json!([{"Config": cname, "RepoTags": ["x:1"], "Layers": ["l/layer.tar"]}]);
    let bytes = outer(&[
        (cname.clone(), config),
        ("l/layer.tar".into(), l),
        (
            "manifest.json".into(),
            serde_json::to_vec(&manifest).unwrap(),
        ),
    ]);
    let sb = Sandbox::new();
    let err = sb.unpack(&bytes, None).unwrap_err();
    assert!(matches!(err, OciError::DiffIdMismatch { .. }), "{err}");
    assert!(err.to_string().contains("l/layer.tar"), "{err}");
}

#[test]
fn legacy_duplicate_layers_as_symlinks_in_the_outer_tar() {
    let l = layer(&[E::File("f", "shared", 0o644)]);
    let config = config_json(json!({}), &[&l, &l]);
    let cname = format!("{}.json", sha(&config));
    let manifest =
        json!([{"Config": cname, "RepoTags": null, "Layers": ["a/layer.tar", "b/layer.tar"]}]);
    let mut b = Builder::new(Vec::new());
    for (name, data) in [(cname.as_str(), &config), ("a/layer.tar", &l)] {
        let mut h = Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    let mut h = Header::new_ustar();
    h.set_entry_type(EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "b/layer.tar", "../a/layer.tar")
        .unwrap();
    let m = serde_json::to_vec(&manifest).unwrap();
    let mut h = Header::new_ustar();
    h.set_size(m.len() as u64);
    h.set_mode(0o644);
    b.append_data(&mut h, "manifest.json", &m[..]).unwrap();
    let sb = Sandbox::new();
    let u = sb.unpack(&b.into_inner().unwrap(), None).unwrap();
    assert_eq!(u.layers, 2);
    assert_eq!(u.reference, None);
    assert_eq!(sb.read("f"), "shared");
}

// ---- hostile layers -----------------------------------------------------------------------

#[test]
fn absolute_and_dot_slash_paths_are_relative_to_the_root() {
    let sb = Sandbox::new();
    let l = layer(&[
        E::File("/abs", "a", 0o644),
        E::File("./dot", "d", 0o644),
        E::File("/x/./y//z", "z", 0o644),
        E::Dir("./", 0o777),
    ]);
    sb.unpack_layers(&[&l]).unwrap();
    assert_eq!(sb.tree(), ["abs", "dot", "x", "x/y", "x/y/z"]);
    // The root entry does not change the destination's mode.
    assert_ne!(
        std::fs::metadata(&sb.dest).unwrap().permissions().mode() & 0o777,
        0o777
    );
}

#[test]
fn dotdot_above_the_root_is_refused() {
    for name in ["../../etc/x", "../sentinel", "a/../../x", "/../x", "./.."] {
        let sb = Sandbox::new();
        let l = layer(&[E::File(name, "pwned", 0o644)]);
        let (entry, reason) = entry_error(sb.unpack_layers(&[&l]).unwrap_err());
        assert_eq!(entry, name);
        assert!(reason.contains("climbs above the image root"), "{reason}");
    }
    // Inside the root `..` is fine.
    let sb = Sandbox::new();
    sb.unpack_layers(&[&layer(&[E::File("a/b/../c", "c", 0o644)])])
        .unwrap();
    assert_eq!(sb.read("a/c"), "c");
}

#[test]
fn symlink_to_host_root_is_resolved_inside_the_image() {
    let sb = Sandbox::new();
    let marker = format!("etc/gatevm-oci-test-{}", std::process::id());
    let l = layer(&[
        E::Sym("a", "/"),
        E::File(&format!("a/{marker}"), "pwned", 0o644),
    ]);
    sb.unpack_layers(&[&l]).unwrap();
    assert!(!Path::new("/").join(&marker).exists());
    assert_eq!(sb.read(&marker), "pwned");
    assert_eq!(std::fs::read_link(sb.p("a")).unwrap(), Path::new("/"));
}

#[test]
fn symlink_climbing_out_is_clamped_at_the_root() {
    let sb = Sandbox::new();
    let l = layer(&[
        E::Sym("b", "../../.."),
        E::File("b/x", "x", 0o644),
        E::Sym("c", "b/../../sentinel"),
        E::File("b/../d/e", "e", 0o644),
    ]);
    sb.unpack_layers(&[&l]).unwrap();
    assert_eq!(sb.read("x"), "x");
    assert_eq!(sb.read("d/e"), "e");
}

#[test]
fn symlink_to_the_host_directory_holding_dest() {
    let sb = Sandbox::new();
    let top = sb.top.to_str().unwrap().to_owned();
    let l1 = layer(&[
        E::Sym("s", &top),
        E::File("s/sentinel", "pwned", 0o644),
        E::File("s/new", "pwned", 0o644),
        E::Dir("s/root/", 0o777),
    ]);
    sb.unpack_layers(&[&l1]).unwrap();
    let inner = top.trim_start_matches('/');
    assert_eq!(sb.read(&format!("{inner}/sentinel")), "pwned");
    assert_eq!(sb.read(&format!("{inner}/new")), "pwned");
}

#[test]
fn existing_symlink_is_replaced_not_written_through() {
    let sb = Sandbox::new();
    let sentinel = sb.top.join("sentinel");
    let l1 = layer(&[
        E::Sym("f", sentinel.to_str().unwrap()),
        E::Sym("d", sb.top.to_str().unwrap()),
    ]);
    let l2 = layer(&[
        E::File("f", "replaced", 0o644),
        E::Dir("d/", 0o700),
        E::File("d/sentinel", "inside", 0o644),
    ]);
    sb.unpack_layers(&[&l1, &l2]).unwrap();
    assert_eq!(sb.read("f"), "replaced");
    assert_eq!(sb.read("d/sentinel"), "inside");
    assert!(std::fs::symlink_metadata(sb.p("d")).unwrap().is_dir());
}

#[test]
fn hardlink_to_host_file_is_impossible() {
    let passwd = std::fs::symlink_metadata("/etc/passwd").ok();
    for (entries, what) in [
        (vec![E::Hard("pw", "/etc/passwd")], "absolute target"),
        (
            vec![E::Sym("h", "/etc"), E::Hard("pw", "h/passwd")],
            "through a symlinked dir",
        ),
        (
            vec![
                E::Sym("h", "../../../../../../../etc"),
                E::Hard("pw", "h/passwd"),
            ],
            "through a climbing symlink",
        ),
    ] {
        let sb = Sandbox::new();
        let (entry, reason) = entry_error(sb.unpack_layers(&[&layer(&entries)]).unwrap_err());
        assert_eq!(entry, "pw", "{what}");
        assert!(
            reason.contains("does not exist in the image"),
            "{what}: {reason}"
        );
        assert!(!sb.exists("pw"));
    }
    let sb = Sandbox::new();
    let top = sb.top.to_str().unwrap().to_owned();
    let l = layer(&[E::Sym("t", &top), E::Hard("s", "t/sentinel")]);
    assert!(sb.unpack_layers(&[&l]).is_err());
    // `..` in a hardlink target is refused like in a path.
    let sb = Sandbox::new();
    let (_, reason) = entry_error(
        sb.unpack_layers(&[&layer(&[E::Hard("pw", "../../etc/passwd")])])
            .unwrap_err(),
    );
    assert!(reason.contains("climbs above"), "{reason}");
    // With the image's own /etc/passwd the link is to that one.
    let sb = Sandbox::new();
    let l = layer(&[
        E::File("etc/passwd", "root:x:0:0::/root:/bin/sh\n", 0o644),
        E::Sym("h", "/etc"),
        E::Hard("pw", "h/passwd"),
        E::Hard("pw2", "/etc/passwd"),
    ]);
    sb.unpack_layers(&[&l]).unwrap();
    let image_pw = std::fs::metadata(sb.p("etc/passwd")).unwrap();
    assert_eq!(image_pw.nlink(), 3);
    assert_eq!(std::fs::metadata(sb.p("pw")).unwrap().ino(), image_pw.ino());
    if let Some(host) = passwd {
        let now = std::fs::symlink_metadata("/etc/passwd").unwrap();
        assert_eq!((now.ino(), now.nlink()), (host.ino(), host.nlink()));
    }
}

#[test]
fn device_nodes_are_skipped_fifos_created() {
    let sb = Sandbox::new();
    let l1 = layer(&[E::File("dev/null", "lower file", 0o644)]);
    let l2 = layer(&[
        E::Char("dev/null", 1, 3),
        E::Char("dev/sda", 8, 0),
        E::Hard("dev/null2", "dev/null"),
        E::Fifo("run/fifo", 0o620),
    ]);
    let u = sb.unpack_layers(&[&l1, &l2]).unwrap();
    assert!(!sb.exists("dev/null") && !sb.exists("dev/sda") && !sb.exists("dev/null2"));
    assert_eq!(u.skipped.len(), 3, "{:?}", u.skipped);
    assert!(
        u.skipped[0].starts_with("dev/null: character device 1:3"),
        "{:?}",
        u.skipped
    );
    assert!(
        u.skipped[2].contains("dev/null2") && u.skipped[2].contains("skipped"),
        "{:?}",
        u.skipped
    );
    let fifo = std::fs::symlink_metadata(sb.p("run/fifo")).unwrap();
    assert!(fifo.file_type().is_fifo());
    assert_eq!(fifo.permissions().mode() & 0o7777, 0o620);
}

#[test]
fn whiteouts_cannot_reach_outside() {
    for name in [".wh...", "a/.wh...", "../.wh.sentinel", ".wh."] {
        let sb = Sandbox::new();
        let l1 = layer(&[E::Dir("a/", 0o755)]);
        let l2 = layer(&[E::File(name, "", 0o644)]);
        let (entry, _) = entry_error(sb.unpack_layers(&[&l1, &l2]).unwrap_err());
        assert_eq!(entry, name);
    }
    // Through symlinks: resolved inside the root, where there is nothing to delete.
    let sb = Sandbox::new();
    let top = sb.top.to_str().unwrap().to_owned();
    let l1 = layer(&[
        E::Sym("t", &top),
        E::Sym("up", "../../.."),
        E::Dir("keep/", 0o755),
        E::File("keep/f", "f", 0o644),
    ]);
    let l2 = layer(&[
        E::File("t/.wh.sentinel", "", 0o644),
        E::File("t/.wh.root", "", 0o644),
        E::File("t/.wh..wh..opq", "", 0o644),
        E::File("up/.wh..wh..opq", "", 0o644),
        E::File("up/.wh.keep2", "", 0o644),
    ]);
    sb.unpack_layers(&[&l1, &l2]).unwrap();
    assert_eq!(sb.tree(), ["keep", "keep/f", "t", "up"]);
}

#[test]
fn symlink_loops_and_file_parents_are_errors() {
    let sb = Sandbox::new();
    let (_, reason) = entry_error(
        sb.unpack_layers(&[&layer(&[
            E::Sym("l1", "l2"),
            E::Sym("l2", "l1"),
            E::File("l1/x", "", 0o644),
        ])])
        .unwrap_err(),
    );
    assert!(reason.contains("symbolic links"), "{reason}");
    let sb = Sandbox::new();
    let (entry, reason) = entry_error(
        sb.unpack_layers(&[&layer(&[
            E::File("f", "", 0o644),
            E::File("f/x", "", 0o644),
        ])])
        .unwrap_err(),
    );
    assert_eq!(entry, "f/x");
    assert!(reason.contains("not a directory"), "{reason}");
}

#[test]
fn modes_owners_and_times_are_kept() {
    let mut b = Builder::new(Vec::new());
    let mut add = |kind: EntryType, name: &str, link: &str, mode: u32, uid: u64, mtime: u64| {
        let mut h = Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(kind);
        h.set_size(if kind == EntryType::Regular { 2 } else { 0 });
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(uid + 1);
        h.set_mtime(mtime);
        h.set_cksum();
        let data: &[u8] = if kind == EntryType::Regular {
            b"hi"
        } else {
            b""
        };
        b.append(&h, data).unwrap();
    };
    add(EntryType::Directory, "tmp/", "", 0o1777, 0, 1_000_000_000);
    add(EntryType::Directory, "d/", "", 0o2750, 1234, 1_100_000_000);
    add(
        EntryType::Regular,
        "d/suid",
        "",
        0o4755,
        1234,
        1_200_000_000,
    );
    add(
        EntryType::Symlink,
        "d/link",
        "suid",
        0o777,
        4321,
        1_300_000_000,
    );
    let l = b.into_inner().unwrap();
    let sb = Sandbox::new();
    sb.unpack_layers(&[&l]).unwrap();
    let m = |p: &str| std::fs::symlink_metadata(sb.p(p)).unwrap();
    assert_eq!(m("tmp").permissions().mode() & 0o7777, 0o1777);
    assert_eq!(m("d").permissions().mode() & 0o7777, 0o2750);
    assert_eq!(m("d/suid").permissions().mode() & 0o7777, 0o4755);
    assert_eq!(m("d/suid").mtime(), 1_200_000_000);
    assert_eq!(m("d").mtime(), 1_100_000_000);
    assert_eq!(m("tmp").mtime(), 1_000_000_000);
    assert_eq!(m("d/link").mtime(), 1_300_000_000);
    assert_eq!(
        std::fs::read_link(sb.p("d/link")).unwrap(),
        Path::new("suid")
    );
    if nix::unistd::geteuid().is_root() {
        assert_eq!((m("d").uid(), m("d").gid()), (1234, 1235));
        assert_eq!((m("d/suid").uid(), m("d/suid").gid()), (1234, 1235));
        assert_eq!((m("d/link").uid(), m("d/link").gid()), (4321, 4322));
    } else {
        eprintln!("not root: owners not checked");
    }
}

/// A pax extended header (`x`) with `records`, then an entry.
fn pax_entry(
    b: &mut Builder<Vec<u8>>,
    records: &[(&str, &str)],
    kind: EntryType,
    name: &str,
    data: &[u8],
) {
    let mut body = Vec::new();
    for (k, v) in records {
        let rest = format!(" {k}={v}\n");
        let mut len = rest.len() + 1;
        while format!("{len}{rest}").len() != len {
            len += 1;
        }
        body.extend(format!("{len}{rest}").into_bytes());
    }
    raw_entry(b, EntryType::XHeader, "PaxHeaders/x", "", &body, 0o644);
    raw_entry(b, kind, name, "", data, 0o644);
}

#[test]
fn pax_paths_owners_and_times_are_used_and_checked() {
    let mut b = Builder::new(Vec::new());
    pax_entry(
        &mut b,
        &[
            ("path", "dir/long-name-from-pax"),
            ("uid", "3000000"),
            ("mtime", "1700000000.25"),
        ],
        EntryType::Regular,
        "short",
        b"pax",
    );
    let long = format!("{}/file", "deep".repeat(60));
    pax_entry(&mut b, &[("path", &long)], EntryType::Regular, "x", b"long");
    let l1 = b.into_inner().unwrap();
    let sb = Sandbox::new();
    sb.unpack_layers(&[&l1]).unwrap();
    assert_eq!(sb.read("dir/long-name-from-pax"), "pax");
    assert_eq!(sb.read(&long), "long");
    let meta = std::fs::metadata(sb.p("dir/long-name-from-pax")).unwrap();
    assert_eq!(meta.mtime(), 1_700_000_000);
    if nix::unistd::geteuid().is_root() {
        assert_eq!(meta.uid(), 3_000_000);
    }
    // The pax path is what is checked.
    let mut b = Builder::new(Vec::new());
    pax_entry(
        &mut b,
        &[("path", "../../pax-escape")],
        EntryType::Regular,
        "innocent",
        b"x",
    );
    let sb = Sandbox::new();
    let (entry, reason) = entry_error(sb.unpack_layers(&[&b.into_inner().unwrap()]).unwrap_err());
    assert_eq!(entry, "../../pax-escape");
    assert!(reason.contains("climbs above"), "{reason}");
}

#[test]
fn odd_times_do_not_fail_the_unpack() {
    let mut b = Builder::new(Vec::new());
    pax_entry(
        &mut b,
        &[("mtime", "-5")],
        EntryType::Regular,
        "before-1970",
        b"x",
    );
    pax_entry(
        &mut b,
        &[("mtime", "9223372036854775807")],
        EntryType::Regular,
        "far-future",
        b"x",
    );
    let mut h = Header::new_gnu();
    h.set_size(0);
    h.set_mode(0o755);
    h.set_mtime(u64::MAX >> 1);
    h.set_entry_type(EntryType::Directory);
    b.append_data(&mut h, "d/", &b""[..]).unwrap();
    let sb = Sandbox::new();
    sb.unpack_layers(&[&b.into_inner().unwrap()]).unwrap();
    assert_eq!(sb.read("before-1970"), "x");
    assert_eq!(sb.read("far-future"), "x");
}

#[test]
fn deep_trees_are_removed_and_too_deep_ones_refused() {
    fn deep(depth: usize) -> (String, Vec<u8>) {
        let dir = "a/".repeat(depth);
        let mut b = Builder::new(Vec::new());
        let mut h = Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        h.set_mtime(0);
        b.append_data(&mut h, format!("{dir}f"), &b"f"[..]).unwrap();
        (format!("{dir}f"), b.into_inner().unwrap())
    }
    let (path, l1) = deep(fs::MAX_DEPTH - 10);
    let wh = layer(&[E::File(".wh.a", "", 0o644)]);
    let sb = Sandbox::new();
    sb.unpack_layers(&[&l1]).unwrap();
    assert_eq!(sb.read(&path), "f");
    let sb = Sandbox::new();
    sb.unpack_layers(&[&l1, &wh]).unwrap();
    assert!(sb.tree().is_empty());
    let (_, l1) = deep(fs::MAX_DEPTH + 10);
    let sb = Sandbox::new();
    let (_, reason) = entry_error(sb.unpack_layers(&[&l1, &wh]).unwrap_err());
    assert!(reason.contains("deeper than"), "{reason}");
}

// ---- malformed input ----------------------------------------------------------------------

#[test]
fn destination_must_be_an_empty_directory() {
    let sb = Sandbox::new();
    std::fs::write(sb.dest.join("x"), "").unwrap();
    let bytes = docker_legacy(&[(&["x:1"], &[&layer(&[])], json!({}))]);
    std::fs::write(&sb.archive, &bytes).unwrap();
    assert!(matches!(
        unpack_archive(&sb.archive, &sb.dest, None),
        Err(OciError::Destination { .. })
    ));
    assert!(matches!(
        unpack_archive(&sb.archive, &sb.dest.join("missing"), None),
        Err(OciError::Destination { .. })
    ));
}

#[test]
fn empty_random_and_non_archive_files() {
    let sb = Sandbox::new();
    let err = sb.unpack(b"", None).unwrap_err();
    assert!(
        matches!(err, OciError::NotArchive { .. }) && err.to_string().contains("empty"),
        "{err}"
    );
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let random: Vec<u8> = (0..8192)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    let err = sb.unpack(&random, None).unwrap_err();
    assert!(matches!(err, OciError::NotArchive { .. }), "{err}");
    let mut gz_random = vec![0x1f, 0x8b];
    gz_random.extend_from_slice(&random);
    assert!(sb.unpack(&gz_random, None).is_err());
    let err = sb.unpack(&[0u8; 4096], None).unwrap_err();
    assert!(matches!(err, OciError::NotArchive { .. }), "{err}");
    // A tar, but not an image.
    let err = sb
        .unpack(&outer(&[("hello.txt".into(), b"hi".to_vec())]), None)
        .unwrap_err();
    assert!(matches!(err, OciError::UnknownLayout { .. }), "{err}");
    assert!(sb.tree().is_empty());
}

#[test]
fn truncated_archives_are_errors() {
    let l1 = layer(&[
        E::Dir("d/", 0o755),
        E::File("d/f", &"x".repeat(3000), 0o644),
    ]);
    let l2 = layer(&[E::File("g", "g", 0o644)]);
    let full = docker_legacy(&[(&["t:1"], &[&l1, &l2], json!({}))]);
    // Builder ends with two zero blocks; before them, cutting loses data of some member.
    let content = full.len() - 1024;
    for cut in (1..=content - 512).step_by(211).chain([content - 512]) {
        let sb = Sandbox::new();
        let err = sb.unpack(&full[..cut], None).unwrap_err().to_string();
        // Below one block it is not even a tar header.
        assert!(
            cut < 512 || err.contains("truncated"),
            "cut at {cut} of {}: {err}",
            full.len()
        );
    }
    // Truncated inside a layer that has a digest: the gzip layer of an OCI image.
    let mut oci = Oci::default();
    let img = oci.image(&[(&l1, Z::Gzip)], json!({}));
    let bytes = oci.finish(vec![img.manifest], vec![]);
    let sb = Sandbox::new();
    let ok = sb.unpack(&bytes, None);
    assert!(ok.is_ok(), "{ok:?}");
    let gz = gzip(&bytes);
    let sb = Sandbox::new();
    let err = sb.unpack(&gz[..gz.len() / 2], None).unwrap_err();
    assert!(matches!(err, OciError::Read { .. }), "{err}");
}

#[test]
fn missing_members_and_bad_json() {
    let l = layer(&[E::File("f", "x", 0o644)]);
    let mut oci = Oci::default();
    let img = oci.image(&[(&l, Z::Plain)], json!({}));
    let layer_blob = format!(
        "blobs/sha256/{}",
        img.layers[0].trim_start_matches("sha256:")
    );
    oci.files.retain(|(n, _)| *n != layer_blob);
    let sb = Sandbox::new();
    let err = sb
        .unpack(&oci.finish(vec![img.manifest], vec![]), None)
        .unwrap_err();
    assert!(
        matches!(&err, OciError::MissingMember { member, .. } if *member == layer_blob),
        "{err}"
    );

    let sb = Sandbox::new();
    let err = sb
        .unpack(
            &outer(&[("manifest.json".into(), b"{not json".to_vec())]),
            None,
        )
        .unwrap_err();
    assert!(
        matches!(err, OciError::Json { .. }) && err.to_string().contains("manifest.json"),
        "{err}"
    );

    let sb = Sandbox::new();
    let huge = vec![b' '; (archive::MAX_JSON + 1) as usize];
    let err = sb
        .unpack(&outer(&[("index.json".into(), huge)]), None)
        .unwrap_err();
    assert!(
        matches!(err, OciError::TooLarge { .. }) && err.to_string().contains("index.json"),
        "{err}"
    );

    let sb = Sandbox::new();
    let index = json!({"schemaVersion": 2, "manifests": [{"digest": "sha256:../../etc/passwd", "size": 1}]});
    let err = sb
        .unpack(
            &outer(&[("index.json".into(), serde_json::to_vec(&index).unwrap())]),
            None,
        )
        .unwrap_err();
    assert!(matches!(err, OciError::UnsupportedDigest { .. }), "{err}");

    let sb = Sandbox::new();
    let index = json!({"schemaVersion": 2, "manifests": []});
    let err = sb
        .unpack(
            &outer(&[("index.json".into(), serde_json::to_vec(&index).unwrap())]),
            None,
        )
        .unwrap_err();
    assert!(matches!(err, OciError::NoImage { .. }), "{err}");
}

#[test]
fn unsupported_layer_compression_is_named() {
    let mut xz = vec![0xfd, b'7', b'z', b'X', b'Z', 0];
    xz.extend_from_slice(&[0; 100]);
    let sb = Sandbox::new();
    let err = sb
        .unpack(&docker_legacy(&[(&["t:1"], &[&xz], json!({}))]), None)
        .unwrap_err();
    assert!(err.to_string().contains("xz"), "{err}");
}

#[test]
fn normalize_entry_paths() {
    let n = |p: &str| {
        layer::normalize(p.as_bytes()).map(|c| {
            c.iter()
                .map(|c| String::from_utf8(c.clone()).unwrap())
                .collect::<Vec<_>>()
        })
    };
    assert_eq!(n("/a/./b//c/").unwrap(), ["a", "b", "c"]);
    assert_eq!(n("./").unwrap(), Vec::<String>::new());
    assert_eq!(n("a/b/../../c").unwrap(), ["c"]);
    assert!(n("a/../..").is_err());
    assert!(n(&"a/".repeat(3000)).is_err());
    assert!(layer::normalize(b"a\0b").is_err());
}

#[test]
fn references_are_normalized() {
    assert_eq!(normalize_ref("busybox"), "busybox:latest");
    assert_eq!(
        normalize_ref("docker.io/library/busybox:1.36"),
        "busybox:1.36"
    );
    assert_eq!(
        normalize_ref("localhost:5000/app"),
        "localhost:5000/app:latest"
    );
    assert_eq!(
        normalize_ref("ghcr.io/o/app@sha256:abc"),
        "ghcr.io/o/app@sha256:abc"
    );
    assert!(ref_matches("busybox", "docker.io/library/busybox:latest"));
    assert!(!ref_matches("busybox:1", "busybox:latest"));
}

// ---- inspect ------------------------------------------------------------------------------

/// Writes `bytes` to a file and inspects it.
fn inspect_bytes(bytes: &[u8]) -> Result<Vec<ImageSummary>, OciError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image.tar");
    std::fs::write(&path, bytes).unwrap();
    inspect_archive(&path)
}

/// The error of inspecting `bytes`, and its message, which must be one line.
fn inspect_error(bytes: &[u8]) -> (OciError, String) {
    let err = match inspect_bytes(bytes) {
        Ok(summaries) => panic!("expected an error, got {summaries:?}"),
        Err(err) => err,
    };
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "not one line: {msg:?}");
    (err, msg)
}

/// Bytes this thread has read with read(2)/pread(2) and friends so far, when the kernel
/// exposes it.
fn thread_rchar() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/thread-self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("rchar:"))?
        .trim()
        .parse()
        .ok()
}

#[test]
fn inspect_docker_save_gives_one_summary_per_tag() {
    let l1 = layer(&[E::File("a", "a", 0o644)]);
    let l2 = layer(&[E::File("b", &"b".repeat(5000), 0o644)]);
    let l3 = layer(&[E::File("c", "c", 0o644)]);
    let plain = docker_legacy(&[
        (
            &["app:1", "reg.example:5000/team/app:2"],
            &[&l1, &l2],
            json!({}),
        ),
        (&[], &[&l3], json!({})),
    ]);
    let platform = format!("linux/{}", host_arch());
    let summary = |reference: Option<&str>, layers, layer_bytes| ImageSummary {
        reference: reference.map(str::to_owned),
        format: ArchiveFormat::DockerSave,
        layers,
        layer_bytes,
        platform: Some(platform.clone()),
    };
    let two = (l1.len() + l2.len()) as u64;
    let expected = [
        summary(Some("app:1"), 2, two),
        summary(Some("reg.example:5000/team/app:2"), 2, two),
        summary(None, 1, l3.len() as u64),
    ];
    assert_eq!(inspect_bytes(&plain).unwrap(), expected);
    // Compressed outer archives give the same answer.
    assert_eq!(inspect_bytes(&gzip(&plain)).unwrap(), expected);
    assert_eq!(
        inspect_bytes(&zstd::encode_all(&plain[..], 3).unwrap()).unwrap(),
        expected
    );
}

#[test]
fn inspect_docker_25_layout() {
    let l = layer(&[E::File("hello", "world", 0o644)]);
    let mut oci = Oci::default();
    let img = oci.image(&[(&l, Z::Gzip)], json!({}));
    let blob = |d: &str| format!("blobs/sha256/{}", d.trim_start_matches("sha256:"));
    let manifest = json!([{
        "Config": blob(&img.config),
        "RepoTags": ["app:1.0"],
        "Layers": img.layers.iter().map(|d| blob(d)).collect::<Vec<_>>(),
    }]);
    let layer_bytes = gzip(&l).len() as u64;
    let bytes = oci.finish(
        vec![named(img.manifest, "app:1.0")],
        vec![(
            "manifest.json".into(),
            serde_json::to_vec(&manifest).unwrap(),
        )],
    );
    let s = inspect_bytes(&bytes).unwrap();
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].format, ArchiveFormat::DockerSave);
    assert_eq!(s[0].reference.as_deref(), Some("app:1.0"));
    assert_eq!((s[0].layers, s[0].layer_bytes), (1, layer_bytes));
}

#[test]
fn inspect_oci_layout_with_ref_names() {
    let l1 = layer(&[E::File("one", &"1".repeat(3000), 0o644)]);
    let l2 = layer(&[E::File("two", "2", 0o644)]);
    let l3 = layer(&[E::File("three", "3", 0o644)]);
    let mut oci = Oci::default();
    let thing = oci.image(&[(&l1, Z::Gzip), (&l2, Z::Zstd)], json!({}));
    let other = oci.image(&[(&l3, Z::Plain)], json!({"Cmd": ["other"]}));
    let unnamed = oci.image(&[], json!({"Cmd": ["unnamed"]}));
    let stored = |digests: &[String]| -> u64 {
        digests
            .iter()
            .map(|d| {
                let name = format!("blobs/sha256/{}", d.trim_start_matches("sha256:"));
                oci.files.iter().find(|(n, _)| *n == name).unwrap().1.len() as u64
            })
            .sum()
    };
    let (thing_bytes, other_bytes) = (stored(&thing.layers), stored(&other.layers));
    let bytes = oci.finish(
        vec![
            named(thing.manifest.clone(), "docker.io/library/thing:2"),
            named(other.manifest, "other:1"),
            // The same manifest under a second name is a second image to import.
            named(thing.manifest, "thing:latest"),
            unnamed.manifest,
        ],
        vec![],
    );
    let s = inspect_bytes(&bytes).unwrap();
    let got: Vec<(Option<&str>, usize, u64)> = s
        .iter()
        .map(|s| (s.reference.as_deref(), s.layers, s.layer_bytes))
        .collect();
    assert_eq!(
        got,
        [
            (Some("docker.io/library/thing:2"), 2, thing_bytes),
            (Some("other:1"), 1, other_bytes),
            (Some("thing:latest"), 2, thing_bytes),
            (None, 0, 0),
        ]
    );
    let platform = format!("linux/{}", host_arch());
    for summary in &s {
        assert_eq!(summary.format, ArchiveFormat::Oci);
        assert_eq!(summary.platform.as_deref(), Some(platform.as_str()));
    }
}

#[test]
fn inspect_multi_platform_index_reports_the_host_platform() {
    // Each architecture's layer has a different size, so layer_bytes tells which was picked.
    let mut arches = vec!["s390x", "riscv64", host_arch()];
    arches.dedup();
    let mut oci = Oci::default();
    let mut platform_manifests = Vec::new();
    let mut host_bytes = 0;
    for (i, arch) in arches.iter().enumerate() {
        let l = layer(&[E::File("arch", &"x".repeat(1000 * (i + 1)), 0o644)]);
        if *arch == host_arch() {
            host_bytes = l.len() as u64;
        }
        let img = oci.image(&[(&l, Z::Plain)], json!({}));
        platform_manifests.push(with(
            img.manifest,
            "platform",
            json!({"os": "linux", "architecture": arch}),
        ));
    }
    // Nested: index.json -> image index -> platform manifests.
    let mut nested = Oci {
        files: oci.files.clone(),
    };
    let index = nested.index(platform_manifests.clone());
    let s = inspect_bytes(&nested.finish(vec![named(index, "multi:1")], vec![])).unwrap();
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!(s[0].reference.as_deref(), Some("multi:1"));
    assert_eq!(s[0].layer_bytes, host_bytes);
    assert_eq!(s[0].platform, Some(format!("linux/{}", host_arch())));

    // Listed directly in index.json under one name: still one image.
    let direct = Oci {
        files: oci.files.clone(),
    };
    let top = platform_manifests
        .iter()
        .map(|m| named(m.clone(), "multi:1"))
        .collect();
    let s = inspect_bytes(&direct.finish(top, vec![])).unwrap();
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!(s[0].layer_bytes, host_bytes);

    // Nothing for this host: an error naming what there is.
    let mut foreign = Oci {
        files: oci.files.clone(),
    };
    let others: Vec<Value> = platform_manifests[..arches.len() - 1].to_vec();
    let index = foreign.index(others);
    let (err, msg) = inspect_error(&foreign.finish(vec![named(index, "multi:1")], vec![]));
    assert!(matches!(err, OciError::NoPlatform { .. }), "{msg}");
    assert!(
        msg.contains(&format!("linux/{}", host_arch())) && msg.contains("linux/s390x"),
        "{msg}"
    );
}

#[test]
fn inspect_truncated_archive_is_an_error() {
    let l1 = layer(&[E::File("f", &"x".repeat(3000), 0o644)]);
    let l2 = layer(&[E::File("g", "g", 0o644)]);
    let full = docker_legacy(&[(&["t:1"], &[&l1, &l2], json!({}))]);
    // Builder ends with two zero blocks; before them, cutting loses data of some member.
    let content = full.len() - 1024;
    for cut in (512..=content - 512).step_by(211).chain([content - 512]) {
        let (_, msg) = inspect_error(&full[..cut]);
        assert!(msg.contains("truncated"), "cut at {cut}: {msg}");
    }
    // Cut inside the layer: the error names it.
    let at = full
        .windows(3000)
        .position(|w| w.iter().all(|&b| b == b'x'))
        .unwrap();
    let (err, msg) = inspect_error(&full[..at + 1000]);
    assert!(
        matches!(&err, OciError::Truncated { what, .. } if what.ends_with("/layer.tar")),
        "{msg}"
    );
    // A compressed archive cut short fails while decompressing.
    let gz = gzip(&full);
    let (err, msg) = inspect_error(&gz[..gz.len() / 2]);
    assert!(matches!(err, OciError::Read { .. }), "{msg}");
}

#[test]
fn inspect_empty_and_random_files_are_errors() {
    let (err, msg) = inspect_error(b"");
    assert!(matches!(err, OciError::NotArchive { .. }), "{msg}");
    assert!(
        msg.contains("not an image archive") && msg.contains("empty"),
        "{msg}"
    );

    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let random: Vec<u8> = (0..8192)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    let (err, msg) = inspect_error(&random);
    assert!(matches!(err, OciError::NotArchive { .. }), "{msg}");
    assert!(msg.contains("not an image archive"), "{msg}");
}

#[test]
fn inspect_tar_without_manifest_is_an_error() {
    let (err, msg) = inspect_error(&outer(&[("hello.txt".into(), b"hi".to_vec())]));
    assert!(matches!(err, OciError::UnknownLayout { .. }), "{msg}");
    assert!(
        msg.contains("no manifest.json") && msg.contains("no index.json"),
        "{msg}"
    );
    // Well-formed layouts that list no image.
    let (err, msg) = inspect_error(&outer(&[("manifest.json".into(), b"[]".to_vec())]));
    assert!(matches!(err, OciError::NoImage { .. }), "{msg}");
    let index = json!({"schemaVersion": 2, "manifests": []});
    let (err, msg) = inspect_error(&outer(&[(
        "index.json".into(),
        serde_json::to_vec(&index).unwrap(),
    )]));
    assert!(matches!(err, OciError::NoImage { .. }), "{msg}");
    // Bad JSON is named.
    let (err, msg) = inspect_error(&outer(&[("manifest.json".into(), b"{not json".to_vec())]));
    assert!(matches!(err, OciError::Json { .. }), "{msg}");
    assert!(msg.contains("manifest.json"), "{msg}");
}

#[test]
fn inspect_missing_members_are_errors() {
    // docker save: the manifest names a layer the archive lacks.
    let l = layer(&[E::File("f", "x", 0o644)]);
    let config = config_json(json!({}), &[&l]);
    let config_name = format!("{}.json", sha(&config));
    let missing = format!("{}/layer.tar", sha(b"missing"));
    let manifest = json!([{"Config": config_name, "RepoTags": ["t:1"], "Layers": [missing]}]);
    let bytes = outer(&[
        (config_name.clone(), config.clone()),
        (
            "manifest.json".into(),
            serde_json::to_vec(&manifest).unwrap(),
        ),
    ]);
    let (err, msg) = inspect_error(&bytes);
    assert!(
        matches!(&err, OciError::MissingMember { member, .. } if *member == missing),
        "{msg}"
    );
    assert!(msg.contains(&missing), "{msg}");

    // A name with control characters is quoted escaped, on one line.
    let manifest = json!([{"Config": config_name, "Layers": ["evil\n\u{1b}[2Jname"]}]);
    let bytes = outer(&[
        (config_name.clone(), config.clone()),
        (
            "manifest.json".into(),
            serde_json::to_vec(&manifest).unwrap(),
        ),
    ]);
    let (_, msg) = inspect_error(&bytes);
    assert!(msg.ends_with(r"has no evil\n\u{1b}[2Jname"), "{msg}");

    // ... or a config it lacks.
    let manifest = json!([{"Config": "nope.json", "RepoTags": ["t:1"], "Layers": []}]);
    let (err, msg) = inspect_error(&outer(&[(
        "manifest.json".into(),
        serde_json::to_vec(&manifest).unwrap(),
    )]));
    assert!(
        matches!(&err, OciError::MissingMember { member, .. } if member == "nope.json"),
        "{msg}"
    );

    // OCI: a layer blob is missing.
    let mut oci = Oci::default();
    let img = oci.image(&[(&l, Z::Plain)], json!({}));
    let blob = format!(
        "blobs/sha256/{}",
        img.layers[0].trim_start_matches("sha256:")
    );
    oci.files.retain(|(n, _)| *n != blob);
    let (err, msg) = inspect_error(&oci.finish(vec![img.manifest], vec![]));
    assert!(
        matches!(&err, OciError::MissingMember { member, .. } if *member == blob),
        "{msg}"
    );
}

#[test]
fn inspect_does_not_read_layer_data() {
    const BIG: usize = 1 << 20;
    let l = layer(&[E::File("big", &"z".repeat(BIG), 0o644)]);
    let corrupt = |mut bytes: Vec<u8>| {
        let at = bytes
            .windows(4096)
            .position(|w| w.iter().all(|&b| b == b'z'))
            .unwrap();
        bytes[at + BIG / 2] = b'y';
        bytes
    };

    // docker save (legacy: only the config's diff IDs can catch it).
    let bytes = corrupt(docker_legacy(&[(&["t:1"], &[&l], json!({}))]));
    let sb = Sandbox::new();
    std::fs::write(&sb.archive, &bytes).unwrap();
    let before = thread_rchar();
    let s = inspect_archive(&sb.archive).unwrap();
    let inspect_read = thread_rchar().zip(before).map(|(after, b)| after - b);
    assert_eq!((s[0].layers, s[0].layer_bytes), (1, l.len() as u64));
    let before = thread_rchar();
    let err = sb.unpack(&bytes, None).unwrap_err();
    let unpack_read = thread_rchar().zip(before).map(|(after, b)| after - b);
    assert!(matches!(err, OciError::DiffIdMismatch { .. }), "{err}");
    match (inspect_read, unpack_read) {
        (Some(inspect_read), Some(unpack_read)) => {
            // The measure works: unpacking read the layer.
            assert!(unpack_read >= BIG as u64, "unpack read {unpack_read} bytes");
            assert!(
                inspect_read < 64 << 10,
                "inspect read {inspect_read} bytes of a {}-byte archive",
                bytes.len()
            );
        }
        _ => eprintln!(
            "inspect_does_not_read_layer_data: /proc/thread-self/io is unavailable; \
             only checked that the corrupt layer goes unnoticed"
        ),
    }

    // OCI: the blob no longer matches its digest.
    let mut oci = Oci::default();
    let img = oci.image(&[(&l, Z::Plain)], json!({}));
    let bytes = corrupt(oci.finish(vec![named(img.manifest, "big:1")], vec![]));
    let s = inspect_bytes(&bytes).unwrap();
    assert_eq!((s[0].layers, s[0].layer_bytes), (1, l.len() as u64));
    let err = Sandbox::new().unpack(&bytes, None).unwrap_err();
    assert!(matches!(err, OciError::DigestMismatch { .. }), "{err}");
}

mod fuzz {
    use proptest::prelude::*;

    use super::*;

    fn base_archive() -> Vec<u8> {
        let l1 = layer(&[
            E::Dir("etc/", 0o755),
            E::File("etc/f", "file", 0o644),
            E::Sym("up", "../../.."),
            E::Hard("etc/h", "etc/f"),
            E::Dir("opq/", 0o755),
            E::File("opq/x", "x", 0o644),
        ]);
        let l2 = layer(&[
            E::File("etc/.wh.f", "", 0o644),
            E::File("opq/.wh..wh..opq", "", 0o644),
            E::File("up/y", "y", 0o644),
        ]);
        docker_legacy(&[(&["p:1"], &[&l1, &l2], json!({"Cmd": ["sh"]}))])
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        /// Corrupted archives never panic and never touch anything outside the destination
        /// (`Sandbox::unpack` checks that after every run).
        #[test]
        fn corrupted_archives_are_handled(
            flips in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<proptest::sample::Index>(),
            truncate in any::<bool>(),
            compress in any::<bool>(),
        ) {
            let mut bytes = base_archive();
            for (at, value) in flips {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            if truncate {
                bytes.truncate(cut.index(bytes.len()));
            }
            if compress {
                bytes = gzip(&bytes);
            }
            let sb = Sandbox::new();
            let unpacked = sb.unpack(&bytes, None);
            // Inspecting checks a subset of what unpacking does.
            let inspected = inspect_archive(&sb.archive);
            if let Ok(u) = unpacked {
                let summaries = inspected.map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(summaries.len(), 1);
                prop_assert_eq!(summaries[0].layers, u.layers);
                prop_assert_eq!(&summaries[0].reference, &u.reference);
            }
        }
    }
}

// ---- limits and sparse files ----------------------------------------------------------------

/// A layer holding one file of `zeros` zero bytes between two short pieces of data.
fn sparse_layer(name: &str, zeros: usize) -> Vec<u8> {
    let mut data = b"head".to_vec();
    data.resize(4 + zeros, 0);
    data.extend_from_slice(b"tail");
    let mut b = Builder::new(Vec::new());
    raw_entry(&mut b, EntryType::Regular, name, "", &data, 0o644);
    b.into_inner().unwrap()
}

fn small_limits() -> UnpackLimits {
    UnpackLimits {
        total_bytes: 8 << 20,
        ..UnpackLimits::default()
    }
}

fn expansion(err: OciError) -> (String, &'static str) {
    let line = err.to_string();
    match err {
        OciError::Expansion { var, .. } => (line, var),
        other => panic!("expected an expansion error, got {other}"),
    }
}

/// A gzip outer archive of 64 KiB that expands to 64 MiB is refused at the cap, with one line
/// naming the archive and the variable, and its temporary file is gone.
#[test]
fn gzip_bomb_outer_archive_is_refused_and_leaves_nothing() {
    let sb = Sandbox::new();
    let img = docker_legacy(&[(&["bomb:1"], &[&sparse_layer("zeros", 64 << 20)], json!({}))]);
    let bomb = gzip(&img);
    assert!(bomb.len() < 1 << 20, "the bomb is {} bytes", bomb.len());
    std::fs::write(&sb.archive, &bomb).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let err = match archive::OuterArchive::open_in(&sb.archive, &small_limits(), tmp.path()) {
        Ok(_) => panic!("a 64 MiB expansion passed an 8 MiB cap"),
        Err(e) => e,
    };
    let (line, var) = expansion(err);
    assert_eq!(var, MAX_BYTES_ENV);
    assert!(!line.contains('\n'), "{line}");
    assert!(
        line.contains("image.tar") && line.contains("8388608 bytes"),
        "{line}"
    );
    assert!(line.contains(MAX_BYTES_ENV), "{line}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "temporary files left behind: {left:?}");
    // The whole unpack says the same, and the destination stays empty.
    let err = unpack_archive_with(&sb.archive, &sb.dest, None, &small_limits()).unwrap_err();
    assert_eq!(expansion(err).1, MAX_BYTES_ENV);
    assert!(sb.tree().is_empty(), "{:?}", sb.tree());
    sb.assert_outside_untouched();
    // Under the default caps the same archive is fine.
    sb.unpack(&bomb, None).unwrap();
    assert_eq!(
        std::fs::metadata(sb.p("zeros")).unwrap().len(),
        (64 << 20) + 8
    );
}

/// A zstd layer that expands past the cap is refused; what it had written is removed.
#[test]
fn zstd_bomb_layer_is_refused_and_leaves_nothing() {
    let sb = Sandbox::new();
    let layer = zstd::encode_all(&sparse_layer("zeros", 64 << 20)[..], 3).unwrap();
    assert!(layer.len() < 1 << 20);
    let small = layer_of(&[E::File("small", "x", 0o644)]);
    std::fs::write(
        &sb.archive,
        docker_legacy(&[(&["bomb:1"], &[&small, &layer], json!({}))]),
    )
    .unwrap();
    let err = unpack_archive_with(&sb.archive, &sb.dest, None, &small_limits()).unwrap_err();
    let (line, var) = expansion(err);
    assert_eq!(var, MAX_BYTES_ENV);
    assert!(line.contains("layers of the image"), "{line}");
    assert!(sb.tree().is_empty(), "left behind: {:?}", sb.tree());
    sb.assert_outside_untouched();
}

fn layer_of(entries: &[E]) -> Vec<u8> {
    layer(entries)
}

#[test]
fn per_file_and_entry_caps() {
    let sb = Sandbox::new();
    std::fs::write(
        &sb.archive,
        docker_legacy(&[(&["f:1"], &[&sparse_layer("big", 2 << 20)], json!({}))]),
    )
    .unwrap();
    let limits = UnpackLimits {
        file_bytes: 1 << 20,
        ..UnpackLimits::default()
    };
    let (line, var) =
        expansion(unpack_archive_with(&sb.archive, &sb.dest, None, &limits).unwrap_err());
    assert_eq!(var, MAX_FILE_BYTES_ENV);
    assert!(line.contains("entry big"), "{line}");

    let sb = Sandbox::new();
    let names: Vec<String> = (0..10).map(|i| format!("f{i}")).collect();
    let entries: Vec<E> = names.iter().map(|n| E::File(n, "x", 0o644)).collect();
    std::fs::write(
        &sb.archive,
        docker_legacy(&[(&["e:1"], &[&layer(&entries)], json!({}))]),
    )
    .unwrap();
    // The outer archive has 4 members (config, VERSION, layer.tar, manifest.json).
    let limits = UnpackLimits {
        entries: 6,
        ..UnpackLimits::default()
    };
    let (line, var) =
        expansion(unpack_archive_with(&sb.archive, &sb.dest, None, &limits).unwrap_err());
    assert_eq!(var, MAX_ENTRIES_ENV);
    assert!(line.contains("6 entries"), "{line}");
    let limits = UnpackLimits {
        entries: 3,
        ..UnpackLimits::default()
    };
    let (line, _) =
        expansion(unpack_archive_with(&sb.archive, &sb.dest, None, &limits).unwrap_err());
    assert!(line.contains("image archive"), "{line}");
}

/// A file with a long run of zeros is written with a hole: it takes far less disk than its
/// size, and reads back the same.
#[test]
fn zero_runs_are_written_sparse() {
    let sb = Sandbox::new();
    let zeros = 32 << 20;
    sb.unpack_layers(&[&sparse_layer("sparse", zeros)]).unwrap();
    let meta = std::fs::metadata(sb.p("sparse")).unwrap();
    assert_eq!(meta.len(), zeros as u64 + 8);
    let on_disk = meta.blocks() * 512;
    assert!(
        on_disk < 1 << 20,
        "{on_disk} bytes on disk for a file of {} bytes, mostly zeros",
        meta.len()
    );
    let back = std::fs::read(sb.p("sparse")).unwrap();
    assert_eq!(&back[..4], b"head");
    assert_eq!(&back[back.len() - 4..], b"tail");
    assert!(back[4..back.len() - 4].iter().all(|&b| b == 0));
    // A file that ends in zeros keeps its length.
    let sb = Sandbox::new();
    let mut b = Builder::new(Vec::new());
    let mut data = b"x".to_vec();
    data.resize(1 << 20, 0);
    raw_entry(&mut b, EntryType::Regular, "trailing", "", &data, 0o644);
    sb.unpack_layers(&[&b.into_inner().unwrap()]).unwrap();
    let back = std::fs::read(sb.p("trailing")).unwrap();
    assert_eq!(back, data);
}

#[test]
fn limits_from_the_environment() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    };
    assert_eq!(
        UnpackLimits::from_lookup(&env(&[])).unwrap(),
        UnpackLimits::default()
    );
    let l = UnpackLimits::from_lookup(&env(&[
        (MAX_BYTES_ENV, "2G"),
        (MAX_FILE_BYTES_ENV, "512m"),
        (MAX_ENTRIES_ENV, "1000"),
    ]))
    .unwrap();
    assert_eq!(
        l,
        UnpackLimits {
            total_bytes: 2 << 30,
            file_bytes: 512 << 20,
            entries: 1000
        }
    );
    for bad in ["0", "-1", "x", "1.5G", "99999999999T"] {
        let e = UnpackLimits::from_lookup(&move |k: &str| {
            (k == MAX_BYTES_ENV).then(|| bad.to_string())
        })
        .unwrap_err();
        assert!(e.to_string().contains(MAX_BYTES_ENV), "{e}");
    }
}
