//! The k3s profile on the CLI side: `start --profile k3s` flags, the k3s binary, and after the
//! start the kubeconfig (fetched from the guest, rewritten for the forwarded API port, merged
//! into the user's) and the gateway metadata; `gatevm kubeconfig NAME`; clean-up on delete.

use super::exec::{capture, Limits};
use crate::output::runtime;
use anyhow::bail;
use gatevm_instance::config::{GatewayPort, K3sSettings};
use gatevm_instance::{InstanceConfig, InstancePaths};
use gatevm_k3s::{binary, download, kubeconfig, pki};
use std::path::{Path, PathBuf};

/// Packaged k3s components `--enable` can keep.
pub const COMPONENTS: &[&str] = &["traefik", "servicelb", "metrics-server"];

/// What the instance runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// containerd only.
    Containerd,
    /// k3s with the VM's containerd.
    K3s,
}

#[derive(clap::Args, Debug, Default)]
pub struct K3sArgs {
    /// What the instance runs: containerd, or k3s on top of it [default: what the instance last
    /// ran, or containerd].
    #[arg(long, value_enum)]
    pub profile: Option<Profile>,
    /// The k3s binary [default: the one cached by `gatevm setup --k3s FILE`].
    #[arg(long, value_name = "PATH")]
    pub k3s: Option<PathBuf>,
    /// Host port (on 127.0.0.1) for the Kubernetes API [default: a free port, kept afterwards].
    #[arg(long, value_name = "PORT")]
    pub api_port: Option<u16>,
    /// A manifest file, or a directory of *.yaml/*.yml/*.json, for k3s's auto-deploy directory.
    /// Repeatable; replaces the instance's earlier list.
    #[arg(long = "manifest", value_name = "FILE|DIR")]
    pub manifests: Vec<PathBuf>,
    /// An image archive k3s imports at boot (airgap images). Repeatable; replaces the earlier
    /// list.
    #[arg(long = "images", value_name = "FILE")]
    pub images: Vec<PathBuf>,
    /// Keep a packaged component that is off by default: traefik, servicelb, metrics-server.
    #[arg(long = "enable", value_name = "COMPONENT")]
    pub enable: Vec<String>,
    /// Don't merge the kubeconfig into ~/.kube/config (or the first file of $KUBECONFIG).
    #[arg(long)]
    pub no_kubeconfig: bool,
    /// The gateway's port: guest port GUESTPORT (normally the gateway Service's NodePort)
    /// forwarded to 127.0.0.1:HOSTPORT [default HOSTPORT: a free port, kept]. Health then also
    /// needs TLS signed by the instance's CA there, and it is the gateway metadata's endpoint.
    #[arg(long, value_name = "[HOSTPORT:]GUESTPORT")]
    pub gateway_port: Option<String>,
    /// The gateway Service, NAME.NAMESPACE, whose cluster DNS names go into the server
    /// certificate. Repeatable; replaces the earlier list [default: gateway.gatevm].
    #[arg(long = "gateway-service", value_name = "NAME.NAMESPACE")]
    pub services: Vec<String>,
    /// Another DNS name (`*.` allowed) or IP address for the gateway's server certificate.
    /// Repeatable; replaces the earlier list.
    #[arg(long = "tls-san", value_name = "NAME|IP")]
    pub tls_sans: Vec<String>,
    /// The TLS Secret holding the gateway's server pair and CA [default: gatevm/gateway-tls].
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub gateway_secret: Option<String>,
}

/// `--gateway-port [HOSTPORT:]GUESTPORT`; a missing host port is None.
fn parse_gateway_port(v: &str) -> anyhow::Result<(Option<u16>, u16)> {
    let port = |p: &str| -> anyhow::Result<u16> {
        match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => bail!("--gateway-port {v:?}: {p:?} is not a port (1 to 65535)"),
        }
    };
    let (host, guest) = match v.split_once(':') {
        Some((h, g)) => (Some(port(h)?), port(g)?),
        None => (None, port(v)?),
    };
    if guest == gatevm_instance::config::K3S_API_GUEST_PORT {
        bail!("--gateway-port {v:?}: guest port 6443 is the Kubernetes API (see --api-port)");
    }
    Ok((host, guest))
}

/// `--gateway-secret NAMESPACE/NAME`.
fn parse_secret(v: &str) -> anyhow::Result<(String, String)> {
    let Some((ns, name)) = v.split_once('/') else {
        bail!("--gateway-secret {v:?}: use NAMESPACE/NAME");
    };
    pki::check_secret_ref(ns, name).map_err(|e| anyhow::anyhow!("--gateway-secret: {e}"))?;
    Ok((ns.to_string(), name.to_string()))
}

/// `--gateway-service NAME.NAMESPACE`: two DNS labels.
fn check_service(v: &str) -> anyhow::Result<()> {
    let ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    match v.split_once('.') {
        Some((n, ns)) if ok(n) && ok(ns) => Ok(()),
        _ => bail!(
            "--gateway-service {v:?}: use NAME.NAMESPACE, each lowercase letters, digits and '-'"
        ),
    }
}

impl K3sArgs {
    fn any_k3s_flag(&self) -> bool {
        self.k3s.is_some()
            || self.api_port.is_some()
            || !self.manifests.is_empty()
            || !self.images.is_empty()
            || !self.enable.is_empty()
            || self.no_kubeconfig
            || self.gateway_port.is_some()
            || !self.services.is_empty()
            || !self.tls_sans.is_empty()
            || self.gateway_secret.is_some()
    }
}

/// A manifest file k3s will deploy: `*.yaml`, `*.yml` or `*.json` (k3s skips anything else),
/// and not named like the manifests gatevm writes itself (the start would fail at staging).
fn check_manifest_name(f: &Path) -> anyhow::Result<()> {
    let name = f
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.starts_with("gatevm-") {
        bail!(
            "--manifest {}: names starting with gatevm- are reserved",
            f.display()
        );
    }
    let deployable = f
        .extension()
        .is_some_and(|x| x == "yaml" || x == "yml" || x == "json");
    if !deployable {
        bail!(
            "--manifest {}: k3s deploys only *.yaml, *.yml and *.json files",
            f.display()
        );
    }
    Ok(())
}

/// A free TCP port on 127.0.0.1.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The k3s settings for a start: the flags over what the instance last ran with. None for the
/// containerd profile. Fails within a second when no k3s binary is to be had.
pub fn resolve(a: &K3sArgs, saved: Option<&K3sSettings>) -> anyhow::Result<Option<K3sSettings>> {
    let profile = a.profile.unwrap_or(if saved.is_some() {
        Profile::K3s
    } else {
        Profile::Containerd
    });
    if profile == Profile::Containerd {
        if a.any_k3s_flag() {
            bail!("--k3s, --api-port, --manifest, --images, --enable, --no-kubeconfig and the --gateway-*/--tls-san flags belong to --profile k3s");
        }
        return Ok(None);
    }
    for e in &a.enable {
        if !COMPONENTS.contains(&e.as_str()) {
            bail!(
                "--enable {e:?}: not a k3s component gatevm turns off; use one of {}",
                COMPONENTS.join(", ")
            );
        }
    }
    for m in &a.manifests {
        for f in gatevm_instance::k3s_stage::manifest_files(m).map_err(|e| anyhow::anyhow!(e))? {
            check_manifest_name(&f)?;
        }
    }
    for i in &a.images {
        if !i.is_file() {
            bail!("--images {} is not a file", i.display());
        }
    }
    if a.api_port == Some(0) {
        bail!("--api-port 0 is not a port: use 1 to 65535");
    }
    for v in &a.services {
        check_service(v)?;
    }
    let gateway_port = a
        .gateway_port
        .as_deref()
        .map(parse_gateway_port)
        .transpose()?;
    let secret = a.gateway_secret.as_deref().map(parse_secret).transpose()?;
    pki::PkiOptions {
        extra_sans: a.tls_sans.clone(),
        ..pki::PkiOptions::new("x")
    }
    .validate()
    .map_err(|e| anyhow::anyhow!("--tls-san: {e}"))?;
    let api_port = match (a.api_port, saved) {
        (Some(p), _) => p,
        (None, Some(s)) => s.api_port,
        (None, None) => free_port()?,
    };
    let gateway = match (gateway_port, saved.and_then(|s| s.gateway)) {
        (Some((Some(h), g)), _) => Some(GatewayPort {
            host_port: h,
            guest_port: g,
        }),
        // Same guest port as before: keep its host port.
        (Some((None, g)), Some(old)) if old.guest_port == g => Some(old),
        (Some((None, g)), _) => Some(GatewayPort {
            host_port: free_port()?,
            guest_port: g,
        }),
        (None, old) => old,
    };
    if gateway.is_some_and(|g| g.host_port == api_port) {
        bail!("--gateway-port and --api-port both use host port {api_port}");
    }
    let bin = match (&a.k3s, saved) {
        // Copied into the cache first: what runs is the copy, whatever happens to the file.
        (Some(p), _) => binary::import(p, &gatevm_runtime::dirs::cache_dir()?)
            .map_err(|e| anyhow::anyhow!("--k3s {e}"))?,
        (None, Some(s)) if s.binary.is_file() => {
            binary::inspect(&s.binary).map_err(|e| anyhow::anyhow!(e))?
        }
        _ => {
            let rt = gatevm_runtime::dirs::runtime_dir()?;
            match binary::cached(&rt) {
                Some(b) => b,
                None => fetch_pinned(&rt).map_err(|e| {
                    anyhow::anyhow!(
                        "the k3s profile needs a k3s binary: pass --k3s PATH, or cache one with `gatevm setup --k3s FILE` (the pinned download failed: {e})"
                    )
                })?,
            }
        }
    };
    let pick = |given: &Vec<PathBuf>, old: Option<&Vec<PathBuf>>| {
        if given.is_empty() {
            old.cloned().unwrap_or_default()
        } else {
            given
                .iter()
                .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
                .collect()
        }
    };
    Ok(Some(K3sSettings {
        binary: bin.path,
        version: bin.version,
        sha256: bin.sha256,
        api_port,
        manifests: pick(&a.manifests, saved.map(|s| &s.manifests)),
        images: pick(&a.images, saved.map(|s| &s.images)),
        enable: if a.enable.is_empty() {
            saved.map(|s| s.enable.clone()).unwrap_or_default()
        } else {
            a.enable.clone()
        },
        merge_kubeconfig: if a.no_kubeconfig {
            false
        } else {
            saved.is_none_or(|s| s.merge_kubeconfig)
        },
        secret_namespace: secret
            .as_ref()
            .map(|s| s.0.clone())
            .unwrap_or_else(|| saved.map_or("gatevm".into(), |s| s.secret_namespace.clone())),
        secret_name: secret
            .map(|s| s.1)
            .unwrap_or_else(|| saved.map_or("gateway-tls".into(), |s| s.secret_name.clone())),
        services: if a.services.is_empty() {
            saved.map(|s| s.services.clone()).unwrap_or_default()
        } else {
            a.services.clone()
        },
        tls_sans: if a.tls_sans.is_empty() {
            saved.map(|s| s.tls_sans.clone()).unwrap_or_default()
        } else {
            a.tls_sans.clone()
        },
        gateway,
    }))
}

/// Fetches the pinned k3s release into the runtime's cache (verified before it runs). A failed
/// fetch leaves no directories behind that it created.
fn fetch_pinned(rt: &Path) -> anyhow::Result<binary::K3sBinary> {
    let pin = download::pin().map_err(|e| anyhow::anyhow!(e))?;
    eprintln!(
        "fetching k3s {} from {} (sha256 {})",
        pin.version.as_deref().unwrap_or("(version unpinned)"),
        pin.url,
        pin.sha256
    );
    let created: Vec<PathBuf> = binary::cache_dir(rt)
        .ancestors()
        .take_while(|d| !d.exists())
        .map(Path::to_path_buf)
        .collect();
    download::fetch(&pin, rt).map_err(|e| {
        // Deepest first; remove_dir leaves anything that is not empty.
        for d in &created {
            let _ = std::fs::remove_dir(d);
        }
        anyhow::anyhow!(e)
    })
}

/// `gatevm setup --fetch-k3s`: the pinned release, verified and cached.
pub fn fetch_and_cache() -> anyhow::Result<()> {
    let rt = gatevm_runtime::dirs::runtime_dir()?;
    let b = fetch_pinned(&rt)?;
    eprintln!(
        "k3s {} cached at {} (sha256 {})",
        b.version,
        b.path.display(),
        b.sha256
    );
    Ok(())
}

/// The instance's own kubeconfig file.
pub fn kubeconfig_file(paths: &InstancePaths) -> PathBuf {
    paths.dir.join("kubeconfig")
}

/// The user's kubeconfig gatevm merges into.
fn user_kubeconfig() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .ok_or_else(|| anyhow::anyhow!("$HOME is not set: cannot find ~/.kube/config"))?;
    Ok(kubeconfig::target_path(
        std::env::var("KUBECONFIG").ok().as_deref(),
        &home,
    ))
}

/// How long `start` waits, after the API server answers, for the node to be Ready.
const NODE_READY_WITHIN: std::time::Duration = std::time::Duration::from_secs(300);

/// The gateway endpoint of an instance, when it has a gateway port.
fn gateway_endpoint(s: &K3sSettings) -> Option<String> {
    s.gateway
        .map(|g| format!("https://127.0.0.1:{}", g.host_port))
}

/// Where k3s writes its kubeconfig in the guest.
const K3S_YAML: &str = "/etc/rancher/k3s/k3s.yaml";

/// How long a kubeconfig fetch may take.
const FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Bounds on each probe of the k3s health check (`k3s kubectl` starts slowly under software
/// emulation).
const PROBE: Limits = Limits {
    timeout: std::time::Duration::from_secs(30),
    max_stdout: 64 << 10,
    max_stderr: 64 << 10,
};

/// Reads a file of the guest: at most `max` bytes, within [`FETCH_TIMEOUT`], as UTF-8 text.
///
/// The guest agent reads the file itself (`gatevm_instance::client::read_file`): no guest
/// program runs, the answer is capped at `max` bytes (more is an error) and the whole exchange
/// is bounded by a timeout. What it returns is untrusted all the same.
async fn fetch_guest_file(name: &str, path: &str, max: usize) -> anyhow::Result<String> {
    let bytes = gatevm_instance::client::read_file(name, path, max, FETCH_TIMEOUT)
        .await
        .map_err(|e| anyhow::anyhow!("reading {path} in {name:?}: {e}"))?;
    String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("{path} in {name:?} is not UTF-8 text"))
}

/// Fetches k3s's kubeconfig from the guest, rebuilds the instance's from its allowlisted
/// fields (see [`kubeconfig::instance_kubeconfig`]), writes it to the instance's directory and,
/// unless disabled, merges it into the user's.
fn refresh_kubeconfig(name: &str, s: &K3sSettings) -> anyhow::Result<()> {
    let paths = InstancePaths::new(name);
    let k3s_yaml =
        runtime()?.block_on(fetch_guest_file(name, K3S_YAML, kubeconfig::MAX_K3S_YAML))?;
    let yaml = kubeconfig::instance_kubeconfig(&k3s_yaml, name, s.api_port)?;
    gatevm_instance::k3s_stage::write_new(&kubeconfig_file(&paths), yaml.as_bytes(), 0o600)
        .map_err(|e| anyhow::anyhow!(e))?;
    eprintln!(
        "kubeconfig: {} (API at https://127.0.0.1:{})",
        kubeconfig_file(&paths).display(),
        s.api_port
    );
    if s.merge_kubeconfig {
        let target = user_kubeconfig()?;
        let m = kubeconfig::merge(&target, &yaml, name)?;
        eprintln!(
            "kubeconfig: context {} in {}{}",
            m.context,
            m.path.display(),
            if m.current_context_set {
                " (now the current context)"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// After a k3s instance is ready: its kubeconfig (from the guest, for the forwarded port), merged
/// into the user's unless disabled, and the gateway metadata for clients; then waits for the
/// node to be Ready (the API server answering is not enough to run anything).
pub fn after_ready(name: &str, s: &K3sSettings) -> anyhow::Result<()> {
    let paths = InstancePaths::new(name);
    refresh_kubeconfig(name, s)?;
    let pki = pki::load_or_create(
        &paths.dir.join("pki"),
        &gatevm_instance::k3s_stage::pki_options(name, s),
    )?;
    if let Some(dir) = pki::config_dir() {
        let at = pki::write_gateway_metadata(&dir, name, gateway_endpoint(s).as_deref(), &pki)?;
        eprintln!(
            "gateway credentials: {}{}",
            at.display(),
            gateway_endpoint(s)
                .map(|e| format!(" (endpoint {e})"))
                .unwrap_or_default()
        );
    }
    let deadline = std::time::Instant::now() + NODE_READY_WITHIN;
    let mut said = false;
    loop {
        let h = runtime()?.block_on(k3s_health(name, s, false));
        if h.api_ready && h.node_ready {
            eprintln!("{name}: node Ready");
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            bail!(
                "{name} is running, but its node is not Ready after {} s ({}); `gatevm status {name}` shows progress",
                NODE_READY_WITHIN.as_secs(),
                h.detail.as_deref().unwrap_or("no detail")
            );
        }
        if !said {
            eprintln!("{name}: waiting for the node to be Ready");
            said = true;
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
}

/// Asks the guest's k3s whether its API server is ready (`/readyz`) and its node is Ready and,
/// with `gateway`, whether the gateway port accepts TLS signed by the instance's CA.
pub async fn k3s_health(
    name: &str,
    s: &K3sSettings,
    gateway: bool,
) -> gatevm_instance::control::K3sHealth {
    let mut h = gatevm_instance::control::K3sHealth {
        version: s.version.clone(),
        api_port: s.api_port,
        ..Default::default()
    };
    let readyz = capture::<tokio::io::Empty>(
        name,
        &["/usr/local/bin/k3s", "kubectl", "get", "--raw=/readyz"],
        None,
        PROBE,
    )
    .await;
    match readyz {
        Ok(o) if o.code == 0 && o.stdout.trim() == "ok" => h.api_ready = true,
        Ok(o) => h.detail = Some(format!("/readyz: {}", o.error_line())),
        Err(e) => h.detail = Some(format!("/readyz: {}", crate::output::error_line(&e))),
    }
    if h.api_ready {
        let node = capture::<tokio::io::Empty>(
            name,
            &[
                "/usr/local/bin/k3s",
                "kubectl",
                "get",
                "nodes",
                "-o",
                "jsonpath={.items[*].status.conditions[?(@.type==\"Ready\")].status}",
            ],
            None,
            PROBE,
        )
        .await;
        match node {
            Ok(o) if o.code == 0 && o.stdout.split_whitespace().any(|w| w == "True") => {
                h.node_ready = true
            }
            Ok(o) if o.code == 0 => h.detail = Some("the node is not Ready yet".into()),
            Ok(o) => h.detail = Some(format!("nodes: {}", o.error_line())),
            Err(e) => h.detail = Some(format!("nodes: {}", crate::output::error_line(&e))),
        }
    }
    if let (true, Some(g)) = (gateway, s.gateway) {
        h.gateway = Some(gateway_health(name, s, g).await);
    }
    h
}

/// The TLS check of the gateway port, from the host through the forward.
async fn gateway_health(
    name: &str,
    s: &K3sSettings,
    g: GatewayPort,
) -> gatevm_instance::control::GatewayHealth {
    let mut gh = gatevm_instance::control::GatewayHealth {
        endpoint: format!("https://127.0.0.1:{}", g.host_port),
        guest_port: g.guest_port,
        ..Default::default()
    };
    let dir = InstancePaths::new(name).dir.join("pki");
    let opts = gatevm_instance::k3s_stage::pki_options(name, s);
    let checked = tokio::task::spawn_blocking(move || {
        let pki = pki::load_or_create(&dir, &opts).map_err(|e| e.to_string())?;
        gatevm_k3s::tls::probe(
            (std::net::Ipv4Addr::LOCALHOST, g.host_port).into(),
            &pki,
            std::time::Duration::from_secs(5),
        )
    })
    .await;
    match checked {
        Ok(Ok(())) => gh.tls_ready = true,
        Ok(Err(e)) => gh.detail = Some(e),
        Err(e) => gh.detail = Some(e.to_string()),
    }
    gh
}

/// On delete: the instance's context leaves the user's kubeconfig and its gateway metadata goes.
pub fn on_delete(name: &str, cfg: Option<&InstanceConfig>) {
    let Some(s) = cfg.and_then(|c| c.k3s.as_ref()) else {
        return;
    };
    if s.merge_kubeconfig {
        if let Ok(target) = user_kubeconfig() {
            if let Err(e) = kubeconfig::remove(&target, name) {
                eprintln!(
                    "warning: removing context gatevm-{name} from {}: {e}",
                    target.display()
                );
            }
        }
    }
    if let Some(dir) = pki::config_dir() {
        if let Err(e) = pki::remove_gateway_metadata(&dir, name) {
            eprintln!("warning: removing the gateway metadata of {name}: {e}");
        }
    }
}

/// Fills the status's `k3s` part for a k3s instance; healthy then also needs the API server,
/// the node and, when configured, the gateway port's TLS.
pub async fn health(st: &mut gatevm_instance::InstanceStatus) {
    let Some(s) = gatevm_instance::client::saved_config(&st.name).and_then(|c| c.k3s) else {
        return;
    };
    let h = if st.state == "running" {
        let h = k3s_health(&st.name, &s, true).await;
        let gateway_ok = h.gateway.as_ref().is_none_or(|g| g.tls_ready);
        st.healthy = st.healthy && h.api_ready && h.node_ready && gateway_ok;
        h
    } else {
        gatevm_instance::control::K3sHealth {
            version: s.version.clone(),
            api_port: s.api_port,
            gateway: s.gateway.map(|g| gatevm_instance::control::GatewayHealth {
                endpoint: format!("https://127.0.0.1:{}", g.host_port),
                guest_port: g.guest_port,
                ..Default::default()
            }),
            ..Default::default()
        }
    };
    st.k3s = Some(h);
}

#[derive(clap::Args)]
pub struct KubeconfigArgs {
    /// Instance name.
    name: String,
    /// Fetch k3s's kubeconfig from the running instance again first (after k3s renewed its
    /// certificates), rebuild the instance's from it and merge it as `start` does.
    #[arg(long)]
    refresh: bool,
}

/// `gatevm kubeconfig NAME`: prints the instance's kubeconfig.
pub fn print_kubeconfig(a: KubeconfigArgs) -> anyhow::Result<i32> {
    let name = super::name_arg(&a.name)?;
    let paths = gatevm_instance::client::existing(name)?;
    if a.refresh {
        let Some(s) = gatevm_instance::client::saved_config(name).and_then(|c| c.k3s) else {
            bail!("{name:?} does not run the k3s profile: it has no kubeconfig");
        };
        super::exec::require_running(name)?;
        refresh_kubeconfig(name, &s)?;
    }
    let f = kubeconfig_file(&paths);
    match std::fs::read_to_string(&f) {
        Ok(text) => {
            print!("{text}");
            Ok(0)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{name:?} has no kubeconfig: it is written when a --profile k3s instance becomes ready"
        ),
        Err(e) => bail!("reading the kubeconfig of {name:?}, {}: {e}", f.display()),
    }
}

/// `gatevm setup --k3s FILE`: checks and caches the binary in the runtime.
pub fn cache_binary(file: &Path) -> anyhow::Result<()> {
    let b = binary::inspect(file).map_err(|e| anyhow::anyhow!("--k3s {e}"))?;
    let rt = gatevm_runtime::dirs::runtime_dir()?;
    let c = binary::cache(&b, &rt).map_err(|e| anyhow::anyhow!(e))?;
    eprintln!(
        "k3s {} cached at {} (sha256 {})",
        c.version,
        c.path.display(),
        c.sha256
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_profile_takes_no_k3s_flags() {
        let a = K3sArgs {
            no_kubeconfig: true,
            ..Default::default()
        };
        assert!(resolve(&a, None)
            .unwrap_err()
            .to_string()
            .contains("--profile k3s"));
        assert_eq!(resolve(&K3sArgs::default(), None).unwrap(), None);
    }

    #[test]
    fn bad_k3s_flags_are_refused_before_anything_runs() {
        let k3s = |f: fn(&mut K3sArgs)| {
            let mut a = K3sArgs {
                profile: Some(Profile::K3s),
                ..Default::default()
            };
            f(&mut a);
            resolve(&a, None).unwrap_err().to_string()
        };
        assert!(k3s(|a| a.enable = vec!["istio".into()]).contains("istio"));
        assert!(k3s(|a| a.manifests = vec!["/nonexistent.yaml".into()]).contains("--manifest"));
        assert!(k3s(|a| a.images = vec!["/nonexistent.tar".into()]).contains("--images"));
        assert!(k3s(|a| a.api_port = Some(0)).contains("--api-port"));
        assert!(k3s(|a| a.k3s = Some("/bin/true".into())).contains("like k3s"));
    }
}
