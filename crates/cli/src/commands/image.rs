//! `gatevm image import|pull|ls|rm`: container images in an instance's containerd.
//!
//! An archive is streamed into the guest's `ctr images import -` through the agent channel: no
//! copy lands in the guest's memory or on its root, only in containerd's content store on the
//! state disk. Before that the archive is checked on the host (is it an image archive at all, is
//! it complete) and compared with the free space of the state disk; after a failed import, images
//! the failed run registered are removed again, so a partial image is never listed.

use super::exec::{capture, require_running, Captured, Limits};
use crate::output::{print_json, runtime};
use anyhow::bail;
use gatevm_instance::oci;
use serde::Serialize;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use tokio::io::{AsyncRead, ReadBuf};

/// containerd namespace k3s uses, so the k3s profile sees the same images.
pub(crate) const DEFAULT_NAMESPACE: &str = "k8s.io";

#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Import a `docker save` or OCI image archive (a file, or - for stdin).
    Import(ImportArgs),
    /// Pull an image through the instance's containerd (the guest fetches it, with the
    /// instance's registry mirrors, insecure registries and proxy variables).
    Pull(PullArgs),
    /// List the images in an instance.
    #[command(alias = "list")]
    Ls(LsArgs),
    /// Remove images from an instance.
    #[command(alias = "remove")]
    Rm(RmArgs),
}

#[derive(clap::Args)]
pub(crate) struct Namespace {
    /// containerd namespace.
    #[arg(long, default_value = DEFAULT_NAMESPACE, env = "GATEVM_NAMESPACE", value_parser = parse_namespace)]
    pub namespace: String,
}

/// A `--namespace` value that is not a containerd namespace name.
#[derive(Debug)]
pub(crate) struct InvalidNamespace(String);

impl std::fmt::Display for InvalidNamespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "invalid namespace {:?}: letters, digits, '.', '_' and '-', starting with a letter or digit",
            self.0
        )
    }
}

impl std::error::Error for InvalidNamespace {}

/// containerd namespace names: letters, digits, `.`, `_`, `-`.
pub(crate) fn parse_namespace(s: &str) -> Result<String, InvalidNamespace> {
    let ok = !s.is_empty()
        && s.len() <= 76
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(s.to_string())
    } else {
        Err(InvalidNamespace(s.to_string()))
    }
}

#[derive(clap::Args)]
pub(crate) struct ImportArgs {
    /// Instance name.
    name: String,
    /// The archive (`docker save` or OCI layout tar, optionally compressed), or - for stdin.
    file: String,
    #[command(flatten)]
    ns: Namespace,
}

#[derive(clap::Args)]
pub(crate) struct PullArgs {
    /// Instance name.
    name: String,
    /// Image reference (short forms like busybox:1 mean docker-style names).
    reference: String,
    /// The platform to pull, OS/ARCH[/VARIANT] [default: the guest's].
    #[arg(long, value_name = "PLATFORM")]
    platform: Option<String>,
    #[command(flatten)]
    ns: Namespace,
}

#[derive(clap::Args)]
pub(crate) struct LsArgs {
    /// Instance name.
    name: String,
    #[command(flatten)]
    ns: Namespace,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub(crate) struct RmArgs {
    /// Instance name.
    name: String,
    /// Image references, as `image ls` shows them (or short forms like busybox:1).
    #[arg(required = true)]
    refs: Vec<String>,
    #[command(flatten)]
    ns: Namespace,
}

pub(crate) fn run(a: Args) -> anyhow::Result<i32> {
    match a.cmd {
        Cmd::Import(a) => import(a),
        Cmd::Pull(a) => pull(a),
        Cmd::Ls(a) => ls(a),
        Cmd::Rm(a) => rm(a),
    }
}

/// One image as `image ls --json` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct ImageInfo {
    #[serde(rename = "ref")]
    pub reference: String,
    pub digest: String,
    /// Size as containerd reports it (e.g. `4.2 MiB`).
    pub size: String,
    pub platforms: Vec<String>,
}

/// Bounds on `ctr images ls`, `ctr images rm` and the free-space probe (each `ctr` start takes
/// seconds under software emulation; a listing of thousands of images fits in 4 MiB).
const LISTING: Limits = Limits::DEFAULT.within(std::time::Duration::from_secs(120));

/// Bounds on `ctr images import`: 10 minutes plus a second per MiB of a known archive size (an
/// hour for stdin), 4 MiB of output.
fn import_limits(size: Option<u64>) -> Limits {
    let secs = match size {
        Some(bytes) => 600 + bytes / (1 << 20),
        None => 3600,
    };
    Limits::DEFAULT.within(std::time::Duration::from_secs(secs))
}

impl ImageInfo {
    /// The image as the user is shown it: the guest wrote these strings, so terminal control
    /// sequences are stripped and each is cut short.
    pub(crate) fn shown(&self) -> ImageInfo {
        let line = gatevm_instance::text::line;
        ImageInfo {
            reference: line(&self.reference, 512),
            digest: line(&self.digest, 80),
            size: line(&self.size, 32),
            platforms: self
                .platforms
                .iter()
                .take(32)
                .map(|p| line(p, 64))
                .collect(),
        }
    }
}

/// Parses `ctr images ls` (columns REF TYPE DIGEST SIZE PLATFORMS LABELS; SIZE is two words).
pub(crate) fn parse_images(table: &str) -> Vec<ImageInfo> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            if w.len() < 6 {
                return None;
            }
            Some(ImageInfo {
                reference: w[0].to_string(),
                digest: w[2].to_string(),
                size: format!("{} {}", w[3], w[4]),
                platforms: w[5]
                    .split(',')
                    .filter(|p| !p.is_empty() && *p != "-")
                    .map(str::to_string)
                    .collect(),
            })
        })
        .collect()
}

async fn list_images(name: &str, ns: &str) -> anyhow::Result<Vec<ImageInfo>> {
    let out = capture::<tokio::io::Empty>(name, &["ctr", "-n", ns, "images", "ls"], None, LISTING)
        .await?;
    if out.code != 0 {
        bail!("listing images in {name:?} failed: {}", out.error_line());
    }
    Ok(parse_images(&out.stdout))
}

fn ls(a: LsArgs) -> anyhow::Result<i32> {
    let name = super::name_arg(&a.name)?;
    require_running(name)?;
    let images: Vec<ImageInfo> = runtime()?
        .block_on(list_images(name, &a.ns.namespace))?
        .into_iter()
        .filter(|i| !is_id_alias(&i.reference))
        .map(|i| i.shown())
        .collect();
    if a.json {
        print_json(&images)?;
    } else {
        println!("{:<60} {:>12}  {:<20} DIGEST", "REF", "SIZE", "PLATFORMS");
        for i in &images {
            println!(
                "{:<60} {:>12}  {:<20} {}",
                i.reference,
                i.size,
                i.platforms.join(","),
                i.digest
            );
        }
    }
    Ok(0)
}

fn rm(a: RmArgs) -> anyhow::Result<i32> {
    let name = super::name_arg(&a.name)?;
    require_running(name)?;
    let ns = &a.ns.namespace;
    runtime()?.block_on(async {
        let have = list_images(name, ns).await?;
        let mut refs = Vec::new();
        for r in &a.refs {
            let found = have.iter().find(|i| {
                i.reference == *r || oci::normalize_ref(&i.reference) == oci::normalize_ref(r)
            });
            match found {
                Some(i) => refs.push(i.reference.clone()),
                None => bail!("no image {r:?} in {name:?} (namespace {ns})"),
            }
        }
        // An ID alias goes with the last name of its image.
        let gone: Vec<&str> = have
            .iter()
            .filter(|i| refs.contains(&i.reference))
            .map(|i| i.digest.as_str())
            .collect();
        let aliases: Vec<String> = have
            .iter()
            .filter(|i| is_id_alias(&i.reference) && gone.contains(&i.digest.as_str()))
            .filter(|i| {
                !have.iter().any(|o| {
                    !is_id_alias(&o.reference)
                        && o.digest == i.digest
                        && !refs.contains(&o.reference)
                })
            })
            .map(|i| i.reference.clone())
            .collect();
        let mut argv = vec!["ctr", "-n", ns, "images", "rm", "--sync"];
        argv.extend(refs.iter().map(String::as_str));
        argv.extend(aliases.iter().map(String::as_str));
        let out = capture::<tokio::io::Empty>(name, &argv, None, LISTING).await?;
        if out.code != 0 {
            bail!("removing images failed: {}", out.error_line());
        }
        for r in &refs {
            println!("removed {}", gatevm_instance::text::line(r, 512));
        }
        Ok(0)
    })
}

/// containerd's CRI plugin names every image in the k8s.io namespace by its ID too
/// (`sha256:…`); such an alias is not an image of its own.
pub(crate) fn is_id_alias(reference: &str) -> bool {
    reference
        .strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A reader that counts what passes through it.
struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Counting<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The free bytes of the guest's containerd root and the images of `ns`, in one exec (each `ctr`
/// start costs seconds under software emulation).
async fn free_and_images(name: &str, ns: &str) -> anyhow::Result<(u64, Vec<ImageInfo>)> {
    let script =
        "df -B1 --output=avail /var/lib/containerd && echo --- && exec ctr -n \"$0\" images ls";
    let out = capture::<tokio::io::Empty>(name, &["sh", "-c", script, ns], None, LISTING).await?;
    let (df, table) = out.stdout.split_once("---\n").unwrap_or(("", ""));
    let free = df.lines().nth(1).and_then(|l| l.trim().parse().ok());
    match free {
        Some(free) if out.code == 0 => Ok((free, parse_images(table))),
        _ => bail!(
            "cannot read the free space and images of {name:?}: {}",
            out.error_line()
        ),
    }
}

/// Space an import needs: the archive's content in the store plus the unpacked layers, which
/// take at least as much again.
pub(crate) fn space_needed(archive_bytes: u64, layer_bytes: u64) -> u64 {
    archive_bytes + layer_bytes.max(archive_bytes / 2)
}

fn import(a: ImportArgs) -> anyhow::Result<i32> {
    let name = super::name_arg(&a.name)?.to_string();
    // The instance must exist; then the archive is checked (a bad file is named even while the
    // instance is stopped); then the instance must run.
    gatevm_instance::client::existing(&name)?;
    let ns = a.ns.namespace.clone();
    let from_stdin = a.file == "-";
    let path = PathBuf::from(&a.file);
    let (size, summaries) = if from_stdin {
        (None, vec![])
    } else {
        let meta = std::fs::metadata(&path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        if !meta.is_file() {
            bail!("{} is not a file", path.display());
        }
        if meta.len() == 0 {
            bail!("{} is empty: not an image archive", path.display());
        }
        let summaries = oci::inspect_archive(&path)
            .map_err(|e| anyhow::anyhow!(gatevm_abi::error_chain(&e)))?;
        (Some(meta.len()), summaries)
    };
    require_running(&name)?;
    let rt = runtime()?;
    let result = rt.block_on(async {
        let (free, before) = free_and_images(&name, &ns).await?;
        let before: Vec<String> = before.into_iter().map(|i| i.reference).collect();
        if let Some(size) = size {
            let layers: u64 = summaries.iter().map(|s| s.layer_bytes).max().unwrap_or(0);
            let need = space_needed(size, layers);
            if need > free {
                bail!(
                    "{} needs about {} in {name:?} (its content plus the unpacked layers) and the state disk has {} free: remove images, or stop the instance and start it with a larger --disk",
                    path.display(),
                    mib(need),
                    mib(free)
                );
            }
        }
        let count = Arc::new(AtomicU64::new(0));
        let show = std::io::stderr().is_terminal() && size.is_some();
        let progress = {
            let count = count.clone();
            let total = size.unwrap_or(0);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                    if show {
                        let n = count.load(Ordering::Relaxed);
                        eprint!(
                            "\r\x1b[2Kimporting: {} of {} ({}%)",
                            mib(n),
                            mib(total),
                            (n * 100).checked_div(total).unwrap_or(100)
                        );
                    }
                }
            })
        };
        let argv = ["ctr", "-n", &ns, "images", "import", "-"];
        let out: anyhow::Result<Captured> = if from_stdin {
            let input = Counting { inner: tokio::io::stdin(), count: count.clone() };
            capture(&name, &argv, Some(input), import_limits(None)).await.map_err(anyhow::Error::from)
        } else {
            let f = tokio::fs::File::open(&path)
                .await
                .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
            let input = Counting { inner: f, count: count.clone() };
            capture(&name, &argv, Some(input), import_limits(size)).await.map_err(anyhow::Error::from)
        };
        progress.abort();
        if show {
            eprint!("\r\x1b[2K");
        }
        let failed = match &out {
            Ok(o) if o.code == 0 => None,
            Ok(o) => Some(o.error_line()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(why) = failed {
            // Whatever the failed run registered goes again: no partial image stays listed.
            if let Ok(now) = list_images(&name, &ns).await {
                let new: Vec<&str> = now
                    .iter()
                    .map(|i| i.reference.as_str())
                    .filter(|r| !before.iter().any(|b| b == r))
                    .collect();
                if !new.is_empty() {
                    let mut argv = vec!["ctr", "-n", &ns, "images", "rm", "--sync"];
                    argv.extend(new);
                    let _ = capture::<tokio::io::Empty>(&name, &argv, None, LISTING).await;
                }
            }
            let what = if from_stdin { "stdin".to_string() } else { path.display().to_string() };
            bail!("importing {what} into {name:?} failed: {why}");
        }
        let imported = imported_refs(&out?.stdout);
        for r in &imported {
            println!("imported {}", gatevm_instance::text::line(r, 512));
        }
        if imported.is_empty() {
            bail!("the archive imported no image (it holds no tagged image?)");
        }
        Ok(0)
    });
    // Don't wait for a blocking stdin read to finish: an import that failed (the VM died) ends
    // now, not when its input moves again.
    rt.shutdown_background();
    result
}

/// Bounds on a pull: an hour, and what the guest prints besides progress.
const PULL_LIMITS: Limits = Limits {
    timeout: std::time::Duration::from_secs(3600),
    max_stdout: 4 << 20,
    max_stderr: 64 << 10,
};

/// The guest's pull output as it arrives: `progress: …` lines shown on stderr (redrawn in
/// place on a terminal), everything else kept.
struct PullSink {
    line: Vec<u8>,
    kept: Vec<u8>,
    terminal: bool,
    shown: bool,
}

impl PullSink {
    fn line_done(&mut self) {
        let text = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        if let Some(p) = text.strip_prefix("progress: ") {
            let p = gatevm_instance::text::line(p.trim_end(), 200);
            if self.terminal {
                eprint!("\r\x1b[2Kpulling: {p}");
            } else {
                eprintln!("pulling: {p}");
            }
            self.shown = true;
        } else if self.kept.len() < PULL_LIMITS.max_stdout {
            self.kept.extend_from_slice(text.as_bytes());
            self.kept.push(b'\n');
        }
    }
}

impl tokio::io::AsyncWrite for PullSink {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut TaskContext<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        for &b in data {
            if b == b'\n' {
                self.line_done();
            } else if self.line.len() < 4096 {
                self.line.push(b);
            }
        }
        Poll::Ready(Ok(data.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn pull(a: PullArgs) -> anyhow::Result<i32> {
    use gatevm_abi::paths::GUEST_AGENT;
    let name = super::name_arg(&a.name)?.to_string();
    gatevm_instance::client::existing(&name)?;
    if a.reference.is_empty()
        || a.reference.starts_with('-')
        || a.reference
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        bail!("invalid image reference {:?}", a.reference);
    }
    if let Some(p) = &a.platform {
        gatevm_abi::settings::check_platform(p).map_err(anyhow::Error::msg)?;
    }
    require_running(&name)?;
    let mut argv: Vec<String> = vec![
        GUEST_AGENT.into(),
        "container".into(),
        "pull".into(),
        "--namespace".into(),
        a.ns.namespace.clone(),
    ];
    if let Some(p) = &a.platform {
        argv.push("--platform".into());
        argv.push(p.clone());
    }
    argv.push(a.reference.clone());
    let req = gatevm_abi::ExecRequest {
        argv,
        env: vec![],
        cwd: None,
        tty: false,
        rows: 0,
        cols: 0,
        stdin: false,
    };
    let terminal = std::io::stderr().is_terminal();
    let mut out = PullSink {
        line: Vec::new(),
        kept: Vec::new(),
        terminal,
        shown: false,
    };
    let mut err = gatevm_instance::capture::Capped::new(PULL_LIMITS.max_stderr);
    let rt = runtime()?;
    let (_tx, rx) = tokio::sync::mpsc::channel::<gatevm_abi::GuestMsg>(1);
    let result = rt.block_on(async {
        tokio::time::timeout(
            PULL_LIMITS.timeout,
            gatevm_instance::client::exec(
                &name,
                req,
                None::<tokio::io::Empty>,
                &mut out,
                &mut err,
                rx,
            ),
        )
        .await
    });
    if out.shown && terminal {
        eprint!("\r\x1b[2K");
    }
    let code = match result {
        Ok(r) => r?,
        Err(_) => bail!(
            "pulling {} into {name:?} took more than {} s",
            a.reference,
            PULL_LIMITS.timeout.as_secs()
        ),
    };
    let stderr = String::from_utf8_lossy(&err.into_inner()).into_owned();
    let why = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().trim_start_matches("gatevm-guest: ").to_string());
    if code != 0 {
        bail!(
            "{}",
            gatevm_instance::text::line(
                &why.unwrap_or_else(|| format!("pulling {} failed (exit {code})", a.reference)),
                1024
            )
        );
    }
    let kept = String::from_utf8_lossy(&out.kept).into_owned();
    for l in kept.lines().filter(|l| l.starts_with("pulled ")) {
        println!("{}", gatevm_instance::text::line(l, 512));
    }
    Ok(0)
}

/// References named by `ctr images import` output (`unpacking REF (sha256:…)...done`, or a
/// reference on a line of its own).
pub(crate) fn imported_refs(out: &str) -> Vec<String> {
    let mut refs: Vec<String> = Vec::new();
    for l in out.lines() {
        let l = l.trim();
        let r = if let Some(rest) = l.strip_prefix("unpacking ") {
            rest.split_whitespace().next().unwrap_or("")
        } else if !l.contains(' ') && !l.is_empty() {
            l
        } else {
            ""
        };
        if !r.is_empty() && !refs.iter().any(|x| x == r) {
            refs.push(r.to_string());
        }
    }
    refs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_table_parsing() {
        let t = "REF                                 TYPE                                                 DIGEST                                                                  SIZE    PLATFORMS   LABELS \n\
docker.io/library/busybox:1 application/vnd.docker.distribution.manifest.v2+json sha256:8b0c2ac12bc1b1bbee64a8d0b2c0d9e3f1f3bdbbf4ac1d4d6e0a8b2b5d6e4f1a 2.1 MiB linux/amd64 -      \n\
junk\n";
        let v = parse_images(t);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].reference, "docker.io/library/busybox:1");
        assert_eq!(v[0].size, "2.1 MiB");
        assert_eq!(v[0].platforms, ["linux/amd64"]);
        assert!(parse_images("REF TYPE DIGEST SIZE PLATFORMS LABELS\n").is_empty());
    }

    #[test]
    fn hostile_image_listings_are_shown_safely() {
        let t = "REF TYPE DIGEST SIZE PLATFORMS LABELS\n\
docker.io/x/\u{1b}]52;c;aGk=\u{7}evil\u{1b}[2J:1 t sha256:\u{9b}2Jabc 2.1 MiB linux/amd64,\u{202e}46dma/xunil -\n";
        let v = parse_images(t);
        assert_eq!(v.len(), 1);
        let shown = v[0].shown();
        assert_eq!(shown.reference, "docker.io/x/evil:1");
        assert_eq!(shown.digest, "sha256:abc");
        assert_eq!(shown.platforms, ["linux/amd64", " 46dma/xunil"]);
        let json = serde_json::to_string(&shown).unwrap();
        assert!(
            !json.contains('\u{1b}') && !json.contains("\\u001b"),
            "{json}"
        );
        let long = format!(
            "REF TYPE DIGEST SIZE PLATFORMS LABELS\n{} t d 1 B p -\n",
            "r".repeat(100_000)
        );
        assert_eq!(
            parse_images(&long)[0].shown().reference.chars().count(),
            512
        );
    }

    #[test]
    fn import_output_parsing() {
        let out = "unpacking docker.io/library/busybox:1 (sha256:abc)...done\nunpacking docker.io/x/y:2 (sha256:def)...done\n";
        assert_eq!(
            imported_refs(out),
            ["docker.io/library/busybox:1", "docker.io/x/y:2"]
        );
        assert_eq!(
            imported_refs(
                "docker.io/library/a:1\nunpacking docker.io/library/a:1 (sha256:1)...done\n"
            ),
            ["docker.io/library/a:1"]
        );
        assert!(imported_refs("").is_empty());
    }

    #[test]
    fn id_aliases() {
        assert!(is_id_alias(&format!("sha256:{}", "a".repeat(64))));
        assert!(!is_id_alias("sha256:abc"));
        assert!(!is_id_alias("docker.io/library/busybox:1"));
    }

    #[test]
    fn namespaces() {
        assert!(parse_namespace("k8s.io").is_ok());
        assert!(parse_namespace("default").is_ok());
        for bad in ["", "-x", "a b", "a/b", &"x".repeat(80)] {
            assert!(parse_namespace(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn space_estimate_counts_content_and_layers() {
        assert_eq!(space_needed(100, 300), 400);
        assert_eq!(space_needed(100, 0), 150);
    }
}
