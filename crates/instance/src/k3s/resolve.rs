//! The k3s settings of a start: the flags over what the instance last ran with, checked before
//! anything runs, and the k3s binary (given, cached, or the pinned release fetched).

use super::{K3sError, Notice};
use crate::config::{GatewayPort, K3sSettings, K3S_API_GUEST_PORT};
use gatevm_k3s::{binary, download, pki};
use std::path::{Path, PathBuf};

/// Packaged k3s components `--enable` can keep.
pub const COMPONENTS: &[&str] = &["traefik", "servicelb", "metrics-server"];

/// What the instance runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// containerd only.
    Containerd,
    /// k3s with the VM's containerd.
    K3s,
}

/// The k3s part of a start request, as the user gave it (the `start` flags of the same names).
#[derive(Debug, Clone, Default)]
pub struct K3sRequest {
    /// What the instance runs; None: what it last ran, or containerd.
    pub profile: Option<Profile>,
    /// The k3s binary; None: the one the instance had, or the cached one.
    pub k3s: Option<PathBuf>,
    /// Host port for the Kubernetes API; None: the instance's, or a free one.
    pub api_port: Option<u16>,
    /// Manifest files or directories (replace the earlier list when given).
    pub manifests: Vec<PathBuf>,
    /// Image archives k3s imports at boot (replace the earlier list when given).
    pub images: Vec<PathBuf>,
    /// Packaged components to keep (replace the earlier list when given).
    pub enable: Vec<String>,
    /// Don't merge the kubeconfig into the user's.
    pub no_kubeconfig: bool,
    /// `[HOSTPORT:]GUESTPORT` of the gateway.
    pub gateway_port: Option<String>,
    /// Gateway Services, `NAME.NAMESPACE` (replace the earlier list when given).
    pub services: Vec<String>,
    /// More names or addresses for the gateway's certificate (replace the earlier list).
    pub tls_sans: Vec<String>,
    /// `NAMESPACE/NAME` of the gateway's TLS Secret.
    pub gateway_secret: Option<String>,
    /// The user's own k3s server arguments (replace the earlier list when given).
    pub k3s_args: Vec<String>,
    /// Drop the saved k3s arguments.
    pub no_k3s_args: bool,
    /// Join this server instance's cluster as a k3s agent node.
    pub join: Option<String>,
}

fn invalid(message: String) -> K3sError {
    K3sError::Invalid(message)
}

/// `--gateway-port [HOSTPORT:]GUESTPORT`; a missing host port is None.
fn parse_gateway_port(v: &str) -> Result<(Option<u16>, u16), K3sError> {
    let port = |p: &str| -> Result<u16, K3sError> {
        match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(invalid(format!(
                "--gateway-port {v:?}: {p:?} is not a port (1 to 65535)"
            ))),
        }
    };
    let (host, guest) = match v.split_once(':') {
        Some((h, g)) => (Some(port(h)?), port(g)?),
        None => (None, port(v)?),
    };
    if guest == K3S_API_GUEST_PORT {
        return Err(invalid(format!(
            "--gateway-port {v:?}: guest port 6443 is the Kubernetes API (see --api-port)"
        )));
    }
    Ok((host, guest))
}

/// `--gateway-secret NAMESPACE/NAME`.
fn parse_secret(v: &str) -> Result<(String, String), K3sError> {
    let Some((ns, name)) = v.split_once('/') else {
        return Err(invalid(format!(
            "--gateway-secret {v:?}: use NAMESPACE/NAME"
        )));
    };
    pki::check_secret_ref(ns, name).map_err(|source| K3sError::Flag {
        flag: "--gateway-secret",
        source,
    })?;
    Ok((ns.to_string(), name.to_string()))
}

/// `--gateway-service NAME.NAMESPACE`: two DNS labels.
fn check_service(v: &str) -> Result<(), K3sError> {
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
        _ => Err(invalid(format!(
            "--gateway-service {v:?}: use NAME.NAMESPACE, each lowercase letters, digits and '-'"
        ))),
    }
}

impl K3sRequest {
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
            || !self.k3s_args.is_empty()
            || self.no_k3s_args
            || self.join.is_some()
    }

    /// The server-only flags given, by name.
    fn server_flags(&self) -> Vec<&'static str> {
        [
            ("--api-port", self.api_port.is_some()),
            ("--manifest", !self.manifests.is_empty()),
            ("--enable", !self.enable.is_empty()),
            ("--gateway-port", self.gateway_port.is_some()),
            ("--gateway-service", !self.services.is_empty()),
            ("--tls-san", !self.tls_sans.is_empty()),
            ("--gateway-secret", self.gateway_secret.is_some()),
        ]
        .into_iter()
        .filter(|(_, given)| *given)
        .map(|(f, _)| f)
        .collect()
    }
}

/// The addresses taken on `server`'s cluster network by its other agents (`name` aside).
fn agent_ips(server: &str, name: &str) -> Vec<std::net::Ipv4Addr> {
    crate::client::names()
        .into_iter()
        .filter(|n| n != name)
        .filter_map(|n| crate::client::saved_config(&n)?.k3s?.join)
        .filter(|j| j.server == server)
        .map(|j| j.node_ip)
        .collect()
}

/// The agent side of a start: `--join SERVER` checked (an existing k3s server instance, not
/// this one, not an agent itself; an instance stays what it was made as), the node's address on
/// the server's cluster network kept or the lowest free one taken. None for a server.
fn resolve_join(
    name: &str,
    a: &K3sRequest,
    saved: Option<&K3sSettings>,
) -> Result<Option<crate::config::Join>, K3sError> {
    let saved_join = saved.and_then(|s| s.join.as_ref());
    let Some(server) = a.join.as_deref() else {
        return Ok(saved_join.cloned());
    };
    crate::name::validate(server).map_err(|e| invalid(format!("--join {server:?}: {e}")))?;
    if server == name {
        return Err(invalid(format!(
            "--join {server:?}: an instance cannot join itself"
        )));
    }
    match (saved, saved_join) {
        (Some(_), None) => {
            return Err(invalid(format!(
                "--join {server:?}: {name:?} already is a k3s server with a server's state; an \
                 agent needs an instance of its own (a new name)"
            )))
        }
        (_, Some(j)) if j.server != server => {
            return Err(invalid(format!(
                "--join {server:?}: {name:?} is an agent of {:?}; delete it to join another \
                 server",
                j.server
            )))
        }
        (_, Some(j)) => return Ok(Some(j.clone())),
        (None, None) => {}
    }
    let server_k3s = crate::client::saved_config(server).and_then(|c| c.k3s);
    match server_k3s {
        None => {
            return Err(invalid(format!(
                "--join {server:?}: there is no k3s server instance of that name (start one with \
                 `gatevm start {server} --profile k3s`)"
            )))
        }
        Some(k) if k.join.is_some() => {
            return Err(invalid(format!(
                "--join {server:?}: it is an agent itself; join its server instead"
            )))
        }
        Some(_) => {}
    }
    let taken = agent_ips(server, name);
    let o = gatevm_abi::net::CLUSTER_NET.octets();
    let node_ip = (gatevm_abi::net::CLUSTER_AGENT_FIRST..=gatevm_abi::net::CLUSTER_AGENT_LAST)
        .map(|last| std::net::Ipv4Addr::new(o[0], o[1], o[2], last))
        .find(|ip| !taken.contains(ip))
        .ok_or_else(|| invalid(format!("--join {server:?}: its cluster network is full")))?;
    Ok(Some(crate::config::Join {
        server: server.to_string(),
        node_ip,
    }))
}

/// A manifest file k3s will deploy: `*.yaml`, `*.yml` or `*.json` (k3s skips anything else),
/// and not named like the manifests gatevm writes itself (the start would fail at staging).
fn check_manifest_name(f: &Path) -> Result<(), K3sError> {
    let name = f
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.starts_with("gatevm-") {
        return Err(invalid(format!(
            "--manifest {}: names starting with gatevm- are reserved",
            f.display()
        )));
    }
    let deployable = f
        .extension()
        .is_some_and(|x| x == "yaml" || x == "yml" || x == "json");
    if !deployable {
        return Err(invalid(format!(
            "--manifest {}: k3s deploys only *.yaml, *.yml and *.json files",
            f.display()
        )));
    }
    Ok(())
}

/// A free TCP port on 127.0.0.1.
fn free_port() -> Result<u16, K3sError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Checks the flags that need no saved settings: components, manifests, images, ports,
/// services, the gateway's port and Secret, the extra names.
#[allow(clippy::type_complexity)]
fn check_flags(
    a: &K3sRequest,
) -> Result<(Option<(Option<u16>, u16)>, Option<(String, String)>), K3sError> {
    for e in &a.enable {
        if !COMPONENTS.contains(&e.as_str()) {
            return Err(invalid(format!(
                "--enable {e:?}: not a k3s component gatevm turns off; use one of {}",
                COMPONENTS.join(", ")
            )));
        }
    }
    for m in &a.manifests {
        for f in crate::k3s::stage::manifest_files(m)? {
            check_manifest_name(&f)?;
        }
    }
    for i in &a.images {
        if !i.is_file() {
            return Err(invalid(format!("--images {} is not a file", i.display())));
        }
    }
    if a.api_port == Some(0) {
        return Err(invalid("--api-port 0 is not a port: use 1 to 65535".into()));
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
    if a.no_k3s_args && !a.k3s_args.is_empty() {
        return Err(invalid(
            "--k3s-arg and --no-k3s-args contradict each other".into(),
        ));
    }
    gatevm_k3s::flags::check_user_args(&a.k3s_args).map_err(invalid)?;
    pki::PkiOptions {
        extra_sans: a.tls_sans.clone(),
        ..pki::PkiOptions::new("x")
    }
    .validate()
    .map_err(|source| K3sError::Flag {
        flag: "--tls-san",
        source,
    })?;
    Ok((gateway_port, secret))
}

/// The API and gateway host ports: given, kept from before, or free ones.
fn host_ports(
    a: &K3sRequest,
    saved: Option<&K3sSettings>,
    gateway_port: Option<(Option<u16>, u16)>,
) -> Result<(u16, Option<GatewayPort>), K3sError> {
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
        return Err(invalid(format!(
            "--gateway-port and --api-port both use host port {api_port}"
        )));
    }
    Ok((api_port, gateway))
}

/// The k3s binary: the one given (copied into the cache first: what runs is the copy, whatever
/// happens to the file), the instance's, the cached one, or the pinned release fetched.
fn k3s_binary(
    a: &K3sRequest,
    saved: Option<&K3sSettings>,
    notice: &mut dyn FnMut(Notice),
) -> Result<binary::K3sBinary, K3sError> {
    Ok(match (&a.k3s, saved) {
        (Some(p), _) => {
            binary::import(p, &gatevm_runtime::dirs::cache_dir()?).map_err(K3sError::GivenBinary)?
        }
        (None, Some(s)) if s.binary.is_file() => binary::inspect(&s.binary)?,
        _ => {
            let rt = gatevm_runtime::dirs::own_runtime_dir()?;
            match binary::cached(&rt) {
                Some(b) => b,
                None => fetch_pinned(&rt, notice).map_err(|e| K3sError::NoBinary(Box::new(e)))?,
            }
        }
    })
}

/// The k3s settings for a start: the flags over what the instance last ran with. None for the
/// containerd profile. Fails within a second when no k3s binary is to be had.
pub fn resolve(
    name: &str,
    a: &K3sRequest,
    saved: Option<&K3sSettings>,
    notice: &mut dyn FnMut(Notice),
) -> Result<Option<K3sSettings>, K3sError> {
    let profile = a.profile.unwrap_or(if saved.is_some() {
        Profile::K3s
    } else {
        Profile::Containerd
    });
    if profile == Profile::Containerd {
        if a.any_k3s_flag() {
            return Err(invalid("--k3s, --api-port, --manifest, --images, --enable, --no-kubeconfig, --k3s-arg, --join and the --gateway-*/--tls-san flags belong to --profile k3s".into()));
        }
        return Ok(None);
    }
    let (gateway_port, secret) = check_flags(a)?;
    let join = resolve_join(name, a, saved)?;
    if join.is_some() {
        let server_only = a.server_flags();
        if !server_only.is_empty() {
            return Err(invalid(format!(
                "{} belong to the cluster's server: an agent (--join) runs no API server, \
                 deploys nothing and serves no gateway",
                server_only.join(", ")
            )));
        }
    }
    let (api_port, gateway) = match &join {
        Some(_) => (0, None),
        None => host_ports(a, saved, gateway_port)?,
    };
    let bin = k3s_binary(a, saved, notice)?;
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
    let keep = |given: &Vec<String>, old: Option<&Vec<String>>| {
        if given.is_empty() {
            old.cloned().unwrap_or_default()
        } else {
            given.clone()
        }
    };
    Ok(Some(K3sSettings {
        binary: bin.path,
        version: bin.version,
        sha256: bin.sha256,
        api_port,
        manifests: pick(&a.manifests, saved.map(|s| &s.manifests)),
        images: pick(&a.images, saved.map(|s| &s.images)),
        enable: keep(&a.enable, saved.map(|s| &s.enable)),
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
        services: keep(&a.services, saved.map(|s| &s.services)),
        tls_sans: keep(&a.tls_sans, saved.map(|s| &s.tls_sans)),
        gateway,
        user_args: if a.no_k3s_args {
            Vec::new()
        } else {
            keep(&a.k3s_args, saved.map(|s| &s.user_args))
        },
        join,
    }))
}

/// Fetches the pinned k3s release into the runtime's cache (verified before it runs). A failed
/// fetch leaves no directories behind that it created.
fn fetch_pinned(rt: &Path, notice: &mut dyn FnMut(Notice)) -> Result<binary::K3sBinary, K3sError> {
    let pin = download::pin()?;
    notice(Notice::Fetching {
        version: pin.version.clone(),
        url: pin.url.clone(),
        sha256: pin.sha256.clone(),
    });
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
        K3sError::Download(e)
    })
}

/// `gatevm setup --fetch-k3s`: the pinned release, verified and cached.
pub fn fetch_and_cache(notice: &mut dyn FnMut(Notice)) -> Result<(), K3sError> {
    let rt = gatevm_runtime::dirs::own_runtime_dir()?;
    let b = fetch_pinned(&rt, notice)?;
    notice(Notice::Cached {
        version: b.version,
        path: b.path,
        sha256: b.sha256,
    });
    Ok(())
}

/// `gatevm setup --k3s FILE`: checks and caches the binary in the runtime.
pub fn cache_binary(file: &Path, notice: &mut dyn FnMut(Notice)) -> Result<(), K3sError> {
    let b = binary::inspect(file).map_err(K3sError::GivenBinary)?;
    let rt = gatevm_runtime::dirs::own_runtime_dir()?;
    let c = binary::cache(&b, &rt)?;
    notice(Notice::Cached {
        version: c.version,
        path: c.path,
        sha256: c.sha256,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(
        a: &K3sRequest,
        saved: Option<&K3sSettings>,
    ) -> Result<Option<K3sSettings>, K3sError> {
        super::resolve("resolve-test", a, saved, &mut |_| {})
    }

    #[test]
    fn containerd_profile_takes_no_k3s_flags() {
        let a = K3sRequest {
            no_kubeconfig: true,
            ..Default::default()
        };
        assert!(resolve(&a, None)
            .unwrap_err()
            .to_string()
            .contains("--profile k3s"));
        assert_eq!(resolve(&K3sRequest::default(), None).unwrap(), None);
    }

    #[test]
    fn bad_k3s_flags_are_refused_before_anything_runs() {
        let k3s = |f: fn(&mut K3sRequest)| {
            let mut a = K3sRequest {
                profile: Some(Profile::K3s),
                ..Default::default()
            };
            f(&mut a);
            gatevm_abi::error_chain(&resolve(&a, None).unwrap_err())
        };
        assert!(k3s(|a| a.enable = vec!["istio".into()]).contains("istio"));
        assert!(k3s(|a| a.manifests = vec!["/nonexistent.yaml".into()]).contains("--manifest"));
        assert!(k3s(|a| a.images = vec!["/nonexistent.tar".into()]).contains("--images"));
        assert!(k3s(|a| a.api_port = Some(0)).contains("--api-port"));
        assert!(k3s(|a| a.k3s = Some("/bin/true".into())).contains("like k3s"));
        let e = k3s(|a| a.k3s_args = vec!["--data-dir=/tmp".into()]);
        assert!(
            e.contains("--k3s-arg \"--data-dir=/tmp\": --data-dir is reserved"),
            "{e}"
        );
        let e = k3s(|a| {
            a.k3s_args = vec!["--node-label=x=y".into()];
            a.no_k3s_args = true
        });
        assert!(e.contains("contradict"), "{e}");
        // --join: itself, a server that is not there, server-only flags beside it.
        let e = k3s(|a| a.join = Some("resolve-test".into()));
        assert!(e.contains("cannot join itself"), "{e}");
        let e = k3s(|a| a.join = Some("gatevm-test-no-such-server".into()));
        assert!(e.contains("no k3s server instance of that name"), "{e}");
        let e = k3s(|a| a.join = Some("Bad Name".into()));
        assert!(e.contains("--join"), "{e}");
    }
}
