//! k3s server flags and CNI configuration chosen from the guest kernel's features.
//!
//! The same k3s binary runs on two very different guest kernels:
//!
//! - Debian's cloud kernel (QEMU backend) has everything gatevm needs as modules: nf_tables,
//!   nft_compat and the xtables core (so iptables-nft works), vxlan, bridge, veth, ipvs. k3s runs
//!   as it does on any Linux host: flannel with vxlan, kube-proxy in iptables mode, the embedded
//!   network policy controller.
//! - libkrunfw's kernel (krun backend) has nf_tables, bridge and veth built in but no xtables,
//!   nft_compat or vxlan. iptables (legacy or nft) cannot load its matches and targets there, and
//!   flannel cannot create its vxlan device, so: kube-proxy in nftables mode, a plain bridge CNI
//!   instead of flannel, network policy off.
//!
//! [`plan`] makes these choices from the [`Capability`] list gatevm reads from the kernel's
//! build configuration, and says why in [`K3sPlan::notes`] (for logs and `gatevm doctor`).
//! Choices that do not depend on the kernel (runtime endpoint, eviction, packaged components)
//! are the same everywhere; each is documented where it is made.

use gatevm_kernel::kconfig::{Availability, Capability};
use serde::Serialize;
use serde_json::json;

/// The VM's own containerd, which k3s uses instead of starting its embedded one, so images
/// imported with `gatevm image import` (into containerd's `k8s.io` namespace) are the images
/// pods run, with no second image store.
pub const CONTAINERD_ENDPOINT: &str = "unix:///run/containerd/containerd.sock";

/// k3s's default cluster (pod) CIDR; the bridge CNI allocates from it.
pub const POD_CIDR: &str = "10.42.0.0/16";

/// The bridge the bridge CNI creates (the name flannel would use, so tools that look for
/// `cni0` find it).
pub const BRIDGE_NAME: &str = "cni0";

/// The file name of the bridge CNI configuration. containerd uses the lexically first network
/// configuration in its directory; `10-` sorts before anything but flannel's
/// `10-flannel.conflist`, which is not written when flannel is off.
pub const BRIDGE_CONFLIST: &str = "10-gatevm-bridge.conflist";

/// The CNI network name in [`BRIDGE_CONFLIST`].
pub const CNI_NETWORK_NAME: &str = "gatevm-pods";

/// The kubelet's hard eviction signals, each set to `0%`. kubelet ignores a threshold of `0%`
/// (`parseThresholdStatement`: "ignore 0% and 100%"), and naming every signal keeps kubelet
/// from filling in defaults for the ones left out. `containerfs.*` is left out: it exists only
/// with the `KubeletSeparateDiskGC` split image filesystem, which containerd does not use.
pub const EVICTION_SIGNALS: [&str; 5] = [
    "memory.available",
    "nodefs.available",
    "nodefs.inodesFree",
    "imagefs.available",
    "imagefs.inodesFree",
];

/// Where k3s reads and writes CNI network configurations: `<data-dir>/agent/etc/cni/net.d`
/// (where flannel's `10-flannel.conflist` goes, and where the caller places
/// [`K3sPlan::cni_conflist`]).
///
/// With an external containerd ([`CONTAINERD_ENDPOINT`]) it is containerd's CRI plugin, not
/// k3s, that runs CNI: the VM's containerd configuration must name this directory as its CNI
/// `conf_dir`, and k3s's bundled plugin directory (`<data-dir>/data/current/bin`, which holds
/// `bridge`, `host-local`, `portmap`, `loopback` and `flannel`) as its `bin_dir`.
pub fn cni_conf_dir(data_dir: &str) -> String {
    format!("{}/agent/etc/cni/net.d", data_dir.trim_end_matches('/'))
}

/// What the caller decides about the k3s server, independent of the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct K3sOptions {
    /// The Kubernetes node name (`--node-name`); a lowercase RFC 1123 name.
    pub node_name: String,
    /// Extra subject alternative names on the API server's certificate (`--tls-san`), e.g.
    /// `127.0.0.1`, `192.168.127.2`, `localhost`. Duplicates and empty strings are dropped.
    pub tls_sans: Vec<String>,
    /// k3s's state directory (`--data-dir`), on the state disk so it survives rootfs rebuilds
    /// and does not sit on virtio-fs, e.g. `/var/lib/gatevm/k3s`.
    pub data_dir: String,
    /// Deploy Traefik (the packaged ingress controller).
    pub enable_traefik: bool,
    /// Deploy ServiceLB (klipper-lb, which serves `LoadBalancer` Services on host ports).
    pub enable_servicelb: bool,
    /// Deploy metrics-server.
    pub enable_metrics_server: bool,
    /// The API server's port in the guest (`--https-listen-port`), normally 6443.
    pub api_port: u16,
    /// The node addresses kube-proxy serves NodePorts on (`nodeport-addresses`), as CIDRs: the
    /// VM network, where host port forwards arrive (and the cluster network of a joined node).
    pub nodeport_cidrs: Vec<String>,
    /// The user's own k3s arguments (`--k3s-arg`), each checked by [`check_user_arg`], passed
    /// after gatevm's.
    pub user_args: Vec<String>,
    /// The node's place in a cluster of VMs (its cluster NIC); None without one.
    pub cluster: Option<ClusterNode>,
}

/// A node on the cluster network ([`gatevm_abi::net::CLUSTER_NET`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterNode {
    /// Its address there: the node IP k3s advertises, and where flannel's VXLAN runs.
    pub node_ip: std::net::Ipv4Addr,
    /// The file in the guest holding the cluster token (`--token-file`).
    pub token_file: String,
    /// For an agent: the server's API URL (`--server`); None for the server.
    pub server_url: Option<String>,
}

impl ClusterNode {
    /// The server's API URL on the cluster network.
    pub fn server_url_default() -> String {
        format!("https://{}:6443", gatevm_abi::net::CLUSTER_SERVER_IP)
    }
}

/// The cluster network as a CIDR.
pub fn cluster_cidr() -> String {
    format!(
        "{}/{}",
        gatevm_abi::net::CLUSTER_NET,
        gatevm_abi::net::CLUSTER_PREFIX_LEN
    )
}

/// How long the kubelet waits for one container runtime call (`runtime-request-timeout`,
/// kubelet's default 2m). Pulling a large image under emulation takes longer than that, and the
/// kubelet would then cancel and restart the pull from the start, forever.
pub const RUNTIME_REQUEST_TIMEOUT: &str = "15m";

/// The VM network as a CIDR (`192.168.127.0/24`): host port forwards reach the guest there.
pub fn vm_network_cidr() -> String {
    let ip = u32::from(gatevm_abi::net::GUEST_IP);
    let mask = u32::MAX << (32 - u32::from(gatevm_abi::net::PREFIX_LEN));
    format!(
        "{}/{}",
        std::net::Ipv4Addr::from(ip & mask),
        gatevm_abi::net::PREFIX_LEN
    )
}

/// k3s flags a `--k3s-arg` may not set, with why: each is something gatevm itself decides and
/// relies on (`(long, short, why)`).
pub const RESERVED_ARGS: &[(&str, Option<&str>, &str)] = &[
    (
        "--data-dir",
        Some("-d"),
        "k3s's state lives where gatevm keeps it on the state disk",
    ),
    (
        "--write-kubeconfig",
        Some("-o"),
        "gatevm fetches the kubeconfig from where it expects it",
    ),
    (
        "--write-kubeconfig-mode",
        None,
        "the kubeconfig holds the admin key: 0600 only",
    ),
    (
        "--container-runtime-endpoint",
        None,
        "k3s must use the VM's containerd, where imported images are",
    ),
    (
        "--docker",
        None,
        "k3s must use the VM's containerd, where imported images are",
    ),
    (
        "--https-listen-port",
        None,
        "the host's API forward reaches the guest's port 6443 (use --api-port for the host side)",
    ),
    ("--node-name", None, "the node is named after the instance"),
    (
        "--server",
        Some("-s"),
        "use gatevm start --join SERVER to join a cluster",
    ),
    (
        "--token",
        Some("-t"),
        "the cluster token is gatevm's (start --join)",
    ),
    (
        "--token-file",
        None,
        "the cluster token is gatevm's (start --join)",
    ),
    (
        "--agent-token",
        None,
        "the cluster token is gatevm's (start --join)",
    ),
    (
        "--agent-token-file",
        None,
        "the cluster token is gatevm's (start --join)",
    ),
];

/// At most this many `--k3s-arg`s, each at most [`USER_ARG_MAX`] bytes.
pub const USER_ARGS_MAX: usize = 64;
/// The longest `--k3s-arg`.
pub const USER_ARG_MAX: usize = 4096;

/// Checks one `--k3s-arg`: a long flag as one argument (`--flag` or `--flag=value`), printable,
/// and not one of [`RESERVED_ARGS`]. The error is the reason, for a one-line message.
pub fn check_user_arg(arg: &str) -> Result<(), String> {
    if arg.len() > USER_ARG_MAX {
        return Err(format!("longer than {USER_ARG_MAX} bytes"));
    }
    if arg.chars().any(|c| c.is_control()) {
        return Err("contains a control character".into());
    }
    let name = arg.split_once('=').map_or(arg, |(n, _)| n);
    if let Some((long, _, why)) = RESERVED_ARGS
        .iter()
        .find(|(long, short, _)| name == *long || Some(name) == *short)
    {
        return Err(format!("{long} is reserved: {why}"));
    }
    if !name.starts_with("--") {
        return Err("give a long k3s server flag as one argument, --flag or --flag=value".into());
    }
    let flag = &name[2..];
    let ok = !flag.is_empty()
        && flag
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !flag.starts_with('-');
    if !ok {
        return Err(format!(
            "{name:?} is not a k3s flag name (lowercase letters, digits and '-')"
        ));
    }
    Ok(())
}

/// Checks a whole `--k3s-arg` list ([`check_user_arg`] and [`USER_ARGS_MAX`]); the error names
/// the argument.
pub fn check_user_args(args: &[String]) -> Result<(), String> {
    if args.len() > USER_ARGS_MAX {
        return Err(format!(
            "--k3s-arg: {} given, at most {USER_ARGS_MAX}",
            args.len()
        ));
    }
    for a in args {
        check_user_arg(a).map_err(|why| format!("--k3s-arg {a:?}: {why}"))?;
    }
    Ok(())
}

impl Default for K3sOptions {
    /// A node named `gatevm`, SANs for the loopback forward and the guest address, state on
    /// the state disk, no optional components (a sandbox gateway starts small; each is one flag
    /// away), the standard API port.
    fn default() -> Self {
        K3sOptions {
            node_name: "gatevm".into(),
            tls_sans: vec![
                "127.0.0.1".into(),
                gatevm_abi::net::GUEST_IP.to_string(),
                "localhost".into(),
            ],
            data_dir: gatevm_abi::paths::K3S_DATA_DIR.into(),
            enable_traefik: false,
            enable_servicelb: false,
            enable_metrics_server: false,
            api_port: 6443,
            nodeport_cidrs: vec![vm_network_cidr()],
            user_args: vec![],
            cluster: None,
        }
    }
}

/// How to start k3s on a given kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct K3sPlan {
    /// The arguments after `k3s server`, each `--flag` or `--flag=value`.
    pub args: Vec<String>,
    /// A CNI network configuration to place in [`cni_conf_dir`] before k3s starts, as
    /// (file name, JSON), when flannel is off; `None` when flannel provides the pod network.
    pub cni_conflist: Option<(String, String)>,
    /// Why each kernel-driven choice was made, one sentence each.
    pub notes: Vec<String>,
}

/// What the kernel's packet filtering can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Netfilter {
    /// iptables works (through nf_tables: `xtables` + `nft_compat` + `nftables`).
    Iptables,
    /// Only native nf_tables rules work.
    NftablesOnly,
    /// No packet filtering at all.
    Unavailable,
}

impl Netfilter {
    /// The CNI plugins' name for the backend (`ipMasqBackend`, portmap's `backend`).
    fn cni_backend(self) -> Option<&'static str> {
        match self {
            Netfilter::Iptables => Some("iptables"),
            Netfilter::NftablesOnly => Some("nftables"),
            Netfilter::Unavailable => None,
        }
    }
}

/// The kernel features the plan depends on.
struct Kernel<'a>(&'a [Capability]);

impl Kernel<'_> {
    /// Built in or a module. A feature the list does not mention counts as missing.
    fn has(&self, name: &str) -> bool {
        self.0
            .iter()
            .any(|c| c.name == name && c.availability != Availability::Missing)
    }

    /// The names among `names` that are missing, for notes.
    fn missing(&self, names: &[&str]) -> Vec<String> {
        names
            .iter()
            .filter(|n| !self.has(n))
            .map(|n| n.to_string())
            .collect()
    }

    /// iptables in the guest is iptables-nft (Debian's default, and k3s's bundled iptables
    /// picks the nft backend on a kernel without legacy tables): rules are nf_tables rules, but
    /// every match and target beyond the basics (`-m comment`, `conntrack`, `mark`, `set`,
    /// `MASQUERADE`, ...) runs as an xtables extension through nft_compat. So iptables needs all
    /// three. Legacy iptables would need `CONFIG_IP_NF_IPTABLES`, which the capability list does
    /// not report, so a kernel with xtables but without nf_tables counts as having none.
    fn netfilter(&self) -> Netfilter {
        if self.has("xtables") && self.has("nft_compat") && self.has("nftables") {
            Netfilter::Iptables
        } else if self.has("nftables") {
            Netfilter::NftablesOnly
        } else {
            Netfilter::Unavailable
        }
    }
}

/// The k3s server arguments and CNI setup for a kernel with `caps` (from
/// [`gatevm_kernel::kconfig::capabilities`]) and the caller's `opts`.
///
/// Always:
/// - `--write-kubeconfig-mode=0600`: k3s.yaml holds the admin client key; only root in the guest
///   (the agent, which hands it to the host) reads it.
/// - `--data-dir`, `--node-name`, `--https-listen-port`, one `--tls-san` per SAN.
/// - `--container-runtime-endpoint=unix:///run/containerd/containerd.sock`: the VM's containerd
///   (see [`CONTAINERD_ENDPOINT`]) rather than k3s's embedded one.
/// - `--disable=traefik,servicelb,metrics-server`, listing the components not enabled (no flag
///   when all are enabled).
/// - `--kubelet-arg=eviction-hard=...<0%` for every [`EVICTION_SIGNALS`] entry: no hard
///   eviction, so no `DiskPressure`/`MemoryPressure` taint either. Over virtio-fs the kubelet
///   sees the host's disk, whose fullness says nothing about the guest, and in a one-node
///   sandbox an evicted pod has nowhere else to go. This replaces k3s's own
///   `imagefs.available<5%,nodefs.available<5%` (a `--kubelet-arg` overrides k3s's default of
///   the same flag). Memory exhaustion is left to the guest kernel's OOM killer.
/// - `--kubelet-arg=image-gc-high-threshold=100`: the kubelet documents 100 as "disable image
///   garbage collection", so it never deletes images the user imported because the host's disk
///   looks full (the low threshold keeps its default of 80, which must stay below it).
/// - `--kubelet-arg=runtime-request-timeout=15m` ([`RUNTIME_REQUEST_TIMEOUT`]).
/// - With kube-proxy running, `--kube-proxy-arg=nodeport-addresses=` [`K3sOptions::nodeport_cidrs`].
/// - Last, the user's `--k3s-arg`s ([`K3sOptions::user_args`]).
///
/// From the kernel:
/// - network policy: the embedded controller (kube-router) enforces policies with iptables
///   rules and ipsets, so without working iptables it runs `--disable-network-policy`.
/// - kube-proxy: iptables mode (k3s's default) when iptables works;
///   `--kube-proxy-arg=proxy-mode=nftables` when only nf_tables does (beta and on by default
///   since Kubernetes 1.31, which k3s passes through; it drives the `nft` binary, which the
///   rootfs's `nftables` package provides); `--disable-kube-proxy` when neither does (Services,
///   in-cluster DNS included, then do not work: a note says so).
/// - pod network: flannel's default vxlan backend when the kernel has vxlan and iptables works
///   (flannel in k3s writes its masquerade and forward rules with iptables); otherwise
///   `--flannel-backend=none` plus [`bridge_conflist`], masquerading and mapping host ports with
///   whatever the kernel supports, and, with kube-proxy running,
///   `--kube-proxy-arg=masquerade-all=true` (see [`bridge_conflist`] for why).
pub fn plan(caps: &[Capability], opts: &K3sOptions) -> K3sPlan {
    if let Some(c) = opts.cluster.as_ref().filter(|c| c.server_url.is_some()) {
        return agent_plan(caps, opts, c);
    }
    let kernel = Kernel(caps);
    let netfilter = kernel.netfilter();
    let mut args = vec![
        "--write-kubeconfig-mode=0600".to_string(),
        format!("--data-dir={}", opts.data_dir),
        format!("--node-name={}", opts.node_name),
        format!("--https-listen-port={}", opts.api_port),
    ];
    let mut seen = Vec::new();
    for san in &opts.tls_sans {
        let san = san.trim();
        if !san.is_empty() && !seen.contains(&san) {
            seen.push(san);
            args.push(format!("--tls-san={san}"));
        }
    }
    args.push(format!(
        "--container-runtime-endpoint={CONTAINERD_ENDPOINT}"
    ));
    let mut nodeport_cidrs = opts.nodeport_cidrs.clone();
    let mut cluster_notes = Vec::new();
    if let Some(c) = &opts.cluster {
        if !seen.contains(&c.node_ip.to_string().as_str()) {
            args.push(format!("--tls-san={}", c.node_ip));
        }
        args.extend(cluster_node_args(c));
        nodeport_cidrs.push(cluster_cidr());
        cluster_notes.push(format!(
            "cluster server: node IP {} on {} (the cluster network {}), agents join with the token \
             in {}",
            c.node_ip,
            gatevm_abi::net::CLUSTER_IFACE,
            cluster_cidr(),
            c.token_file
        ));
    }

    let disabled: Vec<&str> = [
        ("traefik", opts.enable_traefik),
        ("servicelb", opts.enable_servicelb),
        ("metrics-server", opts.enable_metrics_server),
    ]
    .iter()
    .filter(|(_, enabled)| !enabled)
    .map(|(name, _)| *name)
    .collect();
    if !disabled.is_empty() {
        args.push(format!("--disable={}", disabled.join(",")));
    }

    args.extend(kubelet_args());

    let mut notes = cluster_notes;
    let iptables_parts = ["xtables", "nft_compat", "nftables"];

    // Network policy.
    if netfilter == Netfilter::Iptables {
        notes.push(
            "network policy controller on: iptables works (xtables, nft_compat and nftables present)"
                .into(),
        );
    } else {
        args.push("--disable-network-policy".into());
        notes.push(format!(
            "network policy controller off (--disable-network-policy): it enforces policies with \
             iptables rules and ipsets, and the kernel lacks {}; NetworkPolicy objects are accepted \
             but not enforced",
            kernel.missing(&iptables_parts).join(", ")
        ));
    }

    // kube-proxy.
    let kube_proxy = netfilter != Netfilter::Unavailable;
    match netfilter {
        Netfilter::Iptables => notes.push(
            "kube-proxy in iptables mode (k3s's default): xtables, nft_compat and nftables present"
                .into(),
        ),
        Netfilter::NftablesOnly => {
            args.push("--kube-proxy-arg=proxy-mode=nftables".into());
            notes.push(format!(
                "kube-proxy in nftables mode (--kube-proxy-arg=proxy-mode=nftables, Kubernetes \
                 1.31 or later): the kernel has nf_tables but lacks {}, so iptables rules cannot \
                 load",
                kernel.missing(&iptables_parts).join(", ")
            ));
        }
        Netfilter::Unavailable => {
            args.push("--disable-kube-proxy".into());
            notes.push(
                "kube-proxy off (--disable-kube-proxy): the kernel has neither nf_tables nor \
                 iptables support, so no proxy mode can work; Services, including cluster DNS and \
                 the in-cluster API address, do not route; pods reach each other by pod IP only"
                    .into(),
            );
        }
    }

    // Pod network.
    let mut cni_conflist = None;
    if kernel.has("vxlan") && netfilter == Netfilter::Iptables {
        notes.push(
            "pod network: flannel with its default vxlan backend (vxlan present, iptables works)"
                .into(),
        );
    } else {
        args.push("--flannel-backend=none".into());
        let why = if kernel.has("vxlan") {
            "flannel writes its masquerade and forward rules with iptables, which does not work here"
                .to_string()
        } else {
            "the kernel lacks vxlan, which flannel's default backend needs".to_string()
        };
        let backend = netfilter.cni_backend();
        notes.push(match backend {
            Some(b) => format!(
                "pod network: flannel off (--flannel-backend=none) because {why}; a bridge CNI \
                 ({BRIDGE_NAME}, host-local IPAM over {POD_CIDR}) masquerades pod traffic and maps \
                 host ports with {b}"
            ),
            None => format!(
                "pod network: flannel off (--flannel-backend=none) because {why}; a bridge CNI \
                 ({BRIDGE_NAME}, host-local IPAM over {POD_CIDR}) without masquerading or host \
                 ports, since the kernel has no packet filtering: pods reach the node and each \
                 other, not the outside"
            ),
        });
        if kube_proxy {
            args.push("--kube-proxy-arg=masquerade-all=true".into());
            notes.push(
                "kube-proxy masquerades all Service traffic (masquerade-all=true): with a plain \
                 bridge, replies between pods on the bridge would otherwise bypass the node's \
                 connection tracking unless br_netfilter is loaded, which the capability list \
                 does not report"
                    .into(),
            );
        }
        cni_conflist = Some((BRIDGE_CONFLIST.to_string(), bridge_conflist(backend)));
    }

    if kube_proxy && !nodeport_cidrs.is_empty() {
        args.push(format!(
            "--kube-proxy-arg=nodeport-addresses={}",
            nodeport_cidrs.join(",")
        ));
        notes.push(format!(
            "NodePorts served on {} only (where host port forwards arrive), not on the pod \
             bridge or loopback",
            nodeport_cidrs.join(", ")
        ));
    }

    let missing_links = kernel.missing(&["bridge", "veth"]);
    if !missing_links.is_empty() {
        notes.push(format!(
            "the kernel lacks {}: no pod network (bridge CNI or flannel) can attach pods",
            missing_links.join(", ")
        ));
    }

    add_user_args(&mut args, &mut notes, opts);

    K3sPlan {
        args,
        cni_conflist,
        notes,
    }
}

/// The kubelet's arguments on every node: no hard eviction, no image garbage collection, a
/// long runtime request timeout (see [`plan`]).
fn kubelet_args() -> Vec<String> {
    let eviction: Vec<String> = EVICTION_SIGNALS.iter().map(|s| format!("{s}<0%")).collect();
    vec![
        format!("--kubelet-arg=eviction-hard={}", eviction.join(",")),
        "--kubelet-arg=image-gc-high-threshold=100".into(),
        format!("--kubelet-arg=runtime-request-timeout={RUNTIME_REQUEST_TIMEOUT}"),
    ]
}

/// The user's `--k3s-arg`s, last (after gatevm's), with a note.
fn add_user_args(args: &mut Vec<String>, notes: &mut Vec<String>, opts: &K3sOptions) {
    if !opts.user_args.is_empty() {
        notes.push(format!(
            "the user's --k3s-arg, after gatevm's arguments: {}",
            opts.user_args.join(" ")
        ));
        args.extend(opts.user_args.iter().cloned());
    }
}

/// The arguments every cluster node gets: its node IP, flannel on the cluster NIC, the token.
fn cluster_node_args(c: &ClusterNode) -> Vec<String> {
    vec![
        format!("--node-ip={}", c.node_ip),
        format!("--flannel-iface={}", gatevm_abi::net::CLUSTER_IFACE),
        format!("--token-file={}", c.token_file),
    ]
}

/// `k3s agent`'s arguments for a node joining `c.server_url`. The pod network's mode (flannel
/// or none) is the server's to decide; kube-proxy and the kubelet run on the agent, so their
/// flags follow this node's kernel as on the server.
fn agent_plan(caps: &[Capability], opts: &K3sOptions, c: &ClusterNode) -> K3sPlan {
    let kernel = Kernel(caps);
    let netfilter = kernel.netfilter();
    let server = c
        .server_url
        .clone()
        .unwrap_or_else(ClusterNode::server_url_default);
    let mut args = vec![
        format!("--server={server}"),
        format!("--data-dir={}", opts.data_dir),
        format!("--node-name={}", opts.node_name),
        format!("--container-runtime-endpoint={CONTAINERD_ENDPOINT}"),
    ];
    args.extend(cluster_node_args(c));
    args.extend(kubelet_args());
    let mut notes = vec![format!(
        "cluster agent: joins {server} with node IP {} on {}",
        c.node_ip,
        gatevm_abi::net::CLUSTER_IFACE
    )];
    match netfilter {
        Netfilter::Iptables => {}
        Netfilter::NftablesOnly => args.push("--kube-proxy-arg=proxy-mode=nftables".into()),
        Netfilter::Unavailable => notes
            .push("the kernel has no packet filtering: kube-proxy cannot work on this node".into()),
    }
    if netfilter != Netfilter::Unavailable {
        let mut cidrs = opts.nodeport_cidrs.clone();
        cidrs.push(cluster_cidr());
        args.push(format!(
            "--kube-proxy-arg=nodeport-addresses={}",
            cidrs.join(",")
        ));
    }
    add_user_args(&mut args, &mut notes, opts);
    K3sPlan {
        args,
        cni_conflist: None,
        notes,
    }
}

/// The bridge CNI configuration list used when flannel is off.
///
/// - `bridge` on [`BRIDGE_NAME`] with `isGateway` (the bridge holds the subnet's gateway
///   address, and the node routes for the pods) and `hairpinMode` (a pod reaching a Service
///   that lands on itself gets its packets back through the bridge port it sent them from).
/// - host-local IPAM over k3s's default pod CIDR [`POD_CIDR`] with a default route through the
///   bridge. One node, so the whole cluster CIDR is this node's.
/// - `ipMasq`: pod traffic leaving the node is masqueraded to the guest's address, since
///   nothing upstream (gvproxy, passt) routes the pod CIDR. `ipMasqBackend` names the backend
///   (`iptables` or `nftables`) instead of letting the plugin guess: its guess prefers iptables
///   whenever the `iptables` binary runs, which on a kernel without nft_compat it does while
///   its rules fail to load. Plugins before v1.5 ignore the field and use iptables.
/// - `portmap` with the `portMappings` capability, so `hostPort` works, with the same `backend`.
///   (The nftables portmap backend of CNI plugins before v1.9 also catches traffic for the port
///   addressed to other hosts; in a one-node sandbox that is the node's own outbound traffic to
///   that port.)
///
/// With `backend` `None` (no packet filtering in the kernel) there is no masquerading and no
/// `portmap`: either would fail every pod's network setup.
///
/// Why kube-proxy then runs with `masquerade-all`: a pod reaching a Service is routed through
/// the node (it is addressed to the Service IP) and DNATed to the endpoint pod, but when that pod
/// is on the same bridge its reply is switched straight back to the client, never passing the
/// node's connection tracking to be un-NATed, unless `br_netfilter` hands bridged packets to
/// netfilter. k3s loads it where it can, but the capability list does not report it; SNATing
/// Service traffic to the node makes replies come back through the node either way.
pub fn bridge_conflist(backend: Option<&str>) -> String {
    let mut bridge = json!({
        "type": "bridge",
        "bridge": BRIDGE_NAME,
        "isGateway": true,
        "ipMasq": backend.is_some(),
        "hairpinMode": true,
        "ipam": {
            "type": "host-local",
            "ranges": [[{ "subnet": POD_CIDR }]],
            "routes": [{ "dst": "0.0.0.0/0" }],
        },
    });
    let mut plugins = Vec::new();
    if let Some(backend) = backend {
        bridge["ipMasqBackend"] = json!(backend);
        plugins.push(bridge);
        plugins.push(json!({
            "type": "portmap",
            "capabilities": { "portMappings": true },
            "backend": backend,
        }));
    } else {
        plugins.push(bridge);
    }
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": CNI_NETWORK_NAME,
        "plugins": plugins,
    });
    // A json! value of strings, bools and arrays always serializes.
    let mut text = serde_json::to_string_pretty(&conf).unwrap_or_default();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests;
