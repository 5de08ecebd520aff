//! The k3s profile's flags (`start --profile k3s ...`), `gatevm kubeconfig NAME`, and the
//! printing of what the k3s profile's host work ([`gatevm_instance::k3s`]) reports.

use anyhow::bail;
use gatevm_instance::k3s::{self, K3sRequest, Notice};

/// What the instance runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Profile {
    /// containerd only.
    Containerd,
    /// k3s with the VM's containerd.
    K3s,
}

#[derive(clap::Args, Debug, Default)]
pub(crate) struct K3sArgs {
    /// What the instance runs: containerd, or k3s on top of it [default: what the instance last
    /// ran, or containerd].
    #[arg(long, value_enum)]
    pub profile: Option<Profile>,
    /// The k3s binary [default: the one cached by `gatevm setup --k3s FILE`].
    #[arg(long, value_name = "PATH")]
    pub k3s: Option<std::path::PathBuf>,
    /// Host port (on 127.0.0.1) for the Kubernetes API [default: a free port, kept afterwards].
    #[arg(long, value_name = "PORT")]
    pub api_port: Option<u16>,
    /// A manifest file, or a directory of *.yaml/*.yml/*.json, for k3s's auto-deploy directory.
    /// Repeatable; replaces the instance's earlier list.
    #[arg(long = "manifest", value_name = "FILE|DIR")]
    pub manifests: Vec<std::path::PathBuf>,
    /// An image archive k3s imports at boot (airgap images). Repeatable; replaces the earlier
    /// list.
    #[arg(long = "images", value_name = "FILE")]
    pub images: Vec<std::path::PathBuf>,
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
    /// Another `k3s server` argument, as one --flag or --flag=value (e.g.
    /// --k3s-arg=--node-label=tier=edge), passed after gatevm's own. Repeatable; saved, and
    /// replaces the earlier list. Flags gatevm relies on (data dir, kubeconfig, runtime endpoint,
    /// listen port, node name, token, server) are refused.
    #[arg(long = "k3s-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub k3s_args: Vec<String>,
    /// Drop the saved --k3s-arg list.
    #[arg(long)]
    pub no_k3s_args: bool,
    /// Join the cluster of SERVER (a running --profile k3s instance) as a k3s agent node, on a
    /// private network between the cluster's VMs (QEMU only). Saved: the instance stays an agent
    /// of SERVER; `delete` drains it and removes it from the cluster.
    #[arg(long, value_name = "SERVER")]
    pub join: Option<String>,
}

impl K3sArgs {
    /// The request these flags make.
    pub(crate) fn request(&self) -> K3sRequest {
        K3sRequest {
            profile: self.profile.map(|p| match p {
                Profile::Containerd => k3s::Profile::Containerd,
                Profile::K3s => k3s::Profile::K3s,
            }),
            k3s: self.k3s.clone(),
            api_port: self.api_port,
            manifests: self.manifests.clone(),
            images: self.images.clone(),
            enable: self.enable.clone(),
            no_kubeconfig: self.no_kubeconfig,
            gateway_port: self.gateway_port.clone(),
            services: self.services.clone(),
            tls_sans: self.tls_sans.clone(),
            gateway_secret: self.gateway_secret.clone(),
            k3s_args: self.k3s_args.clone(),
            no_k3s_args: self.no_k3s_args,
            join: self.join.clone(),
        }
    }
}

/// Shows a notice of the k3s profile's host work on stderr.
pub(crate) fn show(n: Notice) {
    eprintln!("{n}");
}

#[derive(clap::Args)]
pub(crate) struct KubeconfigArgs {
    /// Instance name.
    name: String,
    /// Fetch k3s's kubeconfig from the running instance again first (after k3s renewed its
    /// certificates), rebuild the instance's from it and merge it as `start` does.
    #[arg(long)]
    refresh: bool,
}

/// `gatevm kubeconfig NAME`: prints the instance's kubeconfig.
pub(crate) fn print_kubeconfig(a: KubeconfigArgs) -> anyhow::Result<i32> {
    let name = super::name_arg(&a.name)?;
    let paths = gatevm_instance::client::existing(name)?;
    if let Some(j) = gatevm_instance::client::saved_config(name)
        .and_then(|c| c.k3s)
        .and_then(|k| k.join)
    {
        bail!(
            "{name:?} is a k3s agent of {:?}: the cluster's kubeconfig is its server's (gatevm kubeconfig {})",
            j.server,
            j.server
        );
    }
    if a.refresh {
        let Some(s) = gatevm_instance::client::saved_config(name).and_then(|c| c.k3s) else {
            bail!("{name:?} does not run the k3s profile: it has no kubeconfig");
        };
        super::exec::require_running(name)?;
        k3s::refresh_kubeconfig(name, &s, &mut show)?;
    }
    let f = k3s::kubeconfig_file(&paths);
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

#[derive(clap::Args)]
pub(crate) struct ClusterTokenArgs {
    /// The k3s server instance.
    name: String,
}

/// `gatevm cluster-token NAME`: prints the server's cluster token (made at its first start).
pub(crate) fn print_cluster_token(a: ClusterTokenArgs) -> anyhow::Result<i32> {
    let name = super::name_arg(&a.name)?;
    let paths = gatevm_instance::client::existing(name)?;
    match gatevm_instance::client::saved_config(name).and_then(|c| c.k3s) {
        None => bail!("{name:?} does not run the k3s profile: it has no cluster token"),
        Some(k) if k.join.is_some() => bail!(
            "{name:?} is an agent: the cluster token is its server's (gatevm cluster-token {})",
            k.join.map(|j| j.server).unwrap_or_default()
        ),
        Some(_) => {}
    }
    match std::fs::read_to_string(paths.cluster_token()) {
        Ok(t) => {
            println!("{}", t.trim());
            Ok(0)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{name:?} has no cluster token yet: it is made when the server first starts on QEMU"
        ),
        Err(e) => bail!("reading {}: {e}", paths.cluster_token().display()),
    }
}

/// `gatevm setup --k3s FILE`: checks and caches the binary in the runtime.
pub(crate) fn cache_binary(file: &std::path::Path) -> anyhow::Result<()> {
    Ok(k3s::cache_binary(file, &mut show)?)
}

/// `gatevm setup --fetch-k3s`: the pinned release, verified and cached.
pub(crate) fn fetch_and_cache() -> anyhow::Result<()> {
    Ok(k3s::fetch_and_cache(&mut show)?)
}
