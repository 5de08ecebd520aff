use super::*;
use gatevm_kernel::kconfig::{capabilities, FEATURES};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::PathBuf;

/// Debian trixie's cloud kernel: the payload features as modules, the rest built in.
fn debian_cloud() -> Vec<Capability> {
    capabilities(
        "CONFIG_CGROUP_SCHED=y\nCONFIG_MEMCG=y\nCONFIG_CGROUP_PIDS=y\nCONFIG_CPUSETS=y\n\
         CONFIG_BLK_CGROUP=y\nCONFIG_OVERLAY_FS=m\nCONFIG_POSIX_MQUEUE=y\nCONFIG_NF_TABLES=m\n\
         CONFIG_NFT_COMPAT=m\nCONFIG_NETFILTER_XTABLES=m\nCONFIG_BRIDGE=m\nCONFIG_VETH=m\n\
         CONFIG_VXLAN=m\nCONFIG_IP_VS=m\nCONFIG_VIRTIO_VSOCKETS=m\nCONFIG_VIRTIO_FS=y\n",
    )
}

/// libkrunfw's kernel, as recorded: everything built in, but no xtables, nft_compat, vxlan or
/// ipvs.
fn libkrunfw() -> Vec<Capability> {
    gatevm_kernel::libkrunfw::recorded("6.12.91", "x86_64")
        .expect("libkrunfw 5.5.0 is recorded")
        .capabilities()
}

/// libkrunfw-like, without nf_tables either.
fn no_netfilter() -> Vec<Capability> {
    without(&libkrunfw(), &["nftables"])
}

fn without(caps: &[Capability], names: &[&str]) -> Vec<Capability> {
    caps.iter()
        .cloned()
        .map(|mut c| {
            if names.contains(&c.name) {
                c.availability = Availability::Missing;
            }
            c
        })
        .collect()
}

fn opts() -> K3sOptions {
    K3sOptions {
        node_name: "box".into(),
        tls_sans: vec![
            "127.0.0.1".into(),
            "192.168.127.2".into(),
            "localhost".into(),
        ],
        data_dir: "/var/lib/gatevm/k3s".into(),
        enable_traefik: false,
        enable_servicelb: false,
        enable_metrics_server: false,
        api_port: 6443,
        nodeport_cidrs: vec!["192.168.127.0/24".into()],
        user_args: vec![],
        cluster: None,
    }
}

fn has(plan: &K3sPlan, arg: &str) -> bool {
    plan.args.iter().any(|a| a == arg)
}

fn flag_names(plan: &K3sPlan) -> Vec<&str> {
    plan.args
        .iter()
        .map(|a| a.split_once('=').map_or(a.as_str(), |(f, _)| f))
        .collect()
}

fn conflist(plan: &K3sPlan) -> Value {
    let (name, json) = plan.cni_conflist.as_ref().expect("a CNI conflist");
    assert_eq!(name, BRIDGE_CONFLIST);
    assert!(name.ends_with(".conflist"));
    serde_json::from_str(json).expect("valid JSON")
}

fn plugin_types(conf: &Value) -> Vec<&str> {
    conf["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect()
}

const COMMON: &[&str] = &[
    "--write-kubeconfig-mode=0600",
    "--data-dir=/var/lib/gatevm/k3s",
    "--node-name=box",
    "--https-listen-port=6443",
    "--container-runtime-endpoint=unix:///run/containerd/containerd.sock",
    "--disable=traefik,servicelb,metrics-server",
    "--kubelet-arg=eviction-hard=memory.available<0%,nodefs.available<0%,\
     nodefs.inodesFree<0%,imagefs.available<0%,imagefs.inodesFree<0%",
    "--kubelet-arg=image-gc-high-threshold=100",
];

#[test]
fn debian_cloud_kernel_keeps_k3s_defaults() {
    let plan = plan(&debian_cloud(), &opts());
    for arg in COMMON {
        assert!(has(&plan, arg), "missing {arg}: {:?}", plan.args);
    }
    for absent in [
        "--disable-network-policy",
        "--flannel-backend=none",
        "--disable-kube-proxy",
        "--kube-proxy-arg=proxy-mode=nftables",
        "--kube-proxy-arg=masquerade-all=true",
    ] {
        assert!(!has(&plan, absent), "unexpected {absent}");
    }
    assert!(!plan.args.iter().any(|a| a.starts_with("--flannel-backend")));
    assert_eq!(plan.cni_conflist, None);
    let notes = plan.notes.join("\n");
    assert!(notes.contains("network policy controller on"), "{notes}");
    assert!(notes.contains("iptables mode"), "{notes}");
    assert!(
        notes.contains("flannel with its default vxlan backend"),
        "{notes}"
    );
}

#[test]
fn libkrunfw_kernel_uses_nftables_and_a_bridge() {
    let plan = plan(&libkrunfw(), &opts());
    for arg in COMMON.iter().copied().chain([
        "--disable-network-policy",
        "--kube-proxy-arg=proxy-mode=nftables",
        "--flannel-backend=none",
        "--kube-proxy-arg=masquerade-all=true",
    ]) {
        assert!(has(&plan, arg), "missing {arg}: {:?}", plan.args);
    }
    assert!(!has(&plan, "--disable-kube-proxy"));

    let conf = conflist(&plan);
    assert_eq!(plugin_types(&conf), ["bridge", "portmap"]);
    assert_eq!(conf["plugins"][0]["ipMasqBackend"], "nftables");
    assert_eq!(conf["plugins"][1]["backend"], "nftables");

    let notes = plan.notes.join("\n");
    for missing in ["xtables", "nft_compat"] {
        assert!(notes.contains(missing), "notes name {missing}: {notes}");
    }
    assert!(notes.contains("lacks vxlan"), "{notes}");
    assert!(!notes.contains("lacks nftables"), "{notes}");
}

#[test]
fn kernel_without_nftables_disables_kube_proxy_and_masquerading() {
    let plan = plan(&no_netfilter(), &opts());
    for arg in [
        "--disable-network-policy",
        "--disable-kube-proxy",
        "--flannel-backend=none",
    ] {
        assert!(has(&plan, arg), "missing {arg}: {:?}", plan.args);
    }
    assert!(!plan.args.iter().any(|a| a.starts_with("--kube-proxy-arg")));
    let conf = conflist(&plan);
    assert_eq!(plugin_types(&conf), ["bridge"]);
    assert_eq!(conf["plugins"][0]["ipMasq"], false);
    assert!(conf["plugins"][0].get("ipMasqBackend").is_none());
    let notes = plan.notes.join("\n");
    assert!(notes.contains("kube-proxy off"), "{notes}");
    assert!(notes.contains("nftables"), "{notes}");
}

#[test]
fn vxlan_without_iptables_still_uses_the_bridge() {
    let caps = without(&debian_cloud(), &["nft_compat"]);
    let plan = plan(&caps, &opts());
    assert!(has(&plan, "--flannel-backend=none"));
    assert!(has(&plan, "--kube-proxy-arg=proxy-mode=nftables"));
    assert!(has(&plan, "--disable-network-policy"));
    let notes = plan.notes.join("\n");
    assert!(notes.contains("nft_compat"), "{notes}");
    assert!(notes.contains("flannel writes its masquerade"), "{notes}");
}

#[test]
fn iptables_without_vxlan_keeps_policy_and_iptables_proxy() {
    let caps = without(&debian_cloud(), &["vxlan"]);
    let plan = plan(&caps, &opts());
    assert!(has(&plan, "--flannel-backend=none"));
    assert!(!has(&plan, "--disable-network-policy"));
    assert!(!plan.args.iter().any(|a| a.contains("proxy-mode")));
    let conf = conflist(&plan);
    assert_eq!(conf["plugins"][0]["ipMasqBackend"], "iptables");
    assert_eq!(conf["plugins"][1]["backend"], "iptables");
}

#[test]
fn unreported_features_count_as_missing() {
    let plan = plan(&[], &opts());
    assert!(has(&plan, "--disable-kube-proxy"));
    assert!(has(&plan, "--flannel-backend=none"));
    assert!(
        plan.notes.iter().any(|n| n.contains("bridge, veth")),
        "{:?}",
        plan.notes
    );
}

#[test]
fn disables_follow_the_enable_flags() {
    let cases = [
        (
            (false, false, false),
            Some("--disable=traefik,servicelb,metrics-server"),
        ),
        (
            (true, false, false),
            Some("--disable=servicelb,metrics-server"),
        ),
        (
            (false, true, false),
            Some("--disable=traefik,metrics-server"),
        ),
        ((false, false, true), Some("--disable=traefik,servicelb")),
        ((true, true, false), Some("--disable=metrics-server")),
        ((true, true, true), None),
    ];
    for ((traefik, servicelb, metrics), expected) in cases {
        let o = K3sOptions {
            enable_traefik: traefik,
            enable_servicelb: servicelb,
            enable_metrics_server: metrics,
            ..opts()
        };
        let plan = plan(&debian_cloud(), &o);
        let disables: Vec<&String> = plan
            .args
            .iter()
            .filter(|a| a.starts_with("--disable="))
            .collect();
        match expected {
            Some(e) => assert_eq!(disables, [e], "{traefik} {servicelb} {metrics}"),
            None => assert!(disables.is_empty(), "{disables:?}"),
        }
    }
}

#[test]
fn tls_sans_are_included_once_each() {
    let o = K3sOptions {
        tls_sans: vec![
            "127.0.0.1".into(),
            "192.168.127.2".into(),
            "localhost".into(),
            "127.0.0.1".into(),
            "".into(),
            " gateway.local ".into(),
        ],
        ..opts()
    };
    let plan = plan(&libkrunfw(), &o);
    let sans: Vec<&str> = plan
        .args
        .iter()
        .filter_map(|a| a.strip_prefix("--tls-san="))
        .collect();
    assert_eq!(
        sans,
        ["127.0.0.1", "192.168.127.2", "localhost", "gateway.local"]
    );
}

#[test]
fn options_reach_their_flags() {
    let o = K3sOptions {
        node_name: "other".into(),
        data_dir: "/srv/k3s/".into(),
        api_port: 16443,
        ..opts()
    };
    let plan = plan(&debian_cloud(), &o);
    assert!(has(&plan, "--node-name=other"));
    assert!(has(&plan, "--data-dir=/srv/k3s/"));
    assert!(has(&plan, "--https-listen-port=16443"));
    assert_eq!(cni_conf_dir(&o.data_dir), "/srv/k3s/agent/etc/cni/net.d");
    assert_eq!(
        cni_conf_dir("/var/lib/gatevm/k3s"),
        "/var/lib/gatevm/k3s/agent/etc/cni/net.d"
    );
}

#[test]
fn no_duplicate_flags() {
    // Flags that k3s accepts repeatedly; every other flag appears at most once.
    let repeatable = ["--tls-san", "--kubelet-arg", "--kube-proxy-arg"];
    let kernels = [debian_cloud(), libkrunfw(), no_netfilter(), Vec::new()];
    for (i, caps) in kernels.iter().enumerate() {
        for enable in [false, true] {
            let o = K3sOptions {
                enable_traefik: enable,
                enable_servicelb: enable,
                enable_metrics_server: enable,
                ..opts()
            };
            let plan = plan(caps, &o);
            let unique: BTreeSet<&String> = plan.args.iter().collect();
            assert_eq!(unique.len(), plan.args.len(), "kernel {i}: {:?}", plan.args);
            let names = flag_names(&plan);
            for name in &names {
                assert!(name.starts_with("--"), "kernel {i}: {name}");
                if !repeatable.contains(name) {
                    let n = names.iter().filter(|x| *x == name).count();
                    assert_eq!(n, 1, "kernel {i}: {name} appears {n} times");
                }
            }
            // kubelet and kube-proxy settings: one value per key.
            for prefix in ["--kubelet-arg=", "--kube-proxy-arg="] {
                let keys: Vec<&str> = plan
                    .args
                    .iter()
                    .filter_map(|a| a.strip_prefix(prefix))
                    .map(|kv| kv.split_once('=').map_or(kv, |(k, _)| k))
                    .collect();
                let unique: BTreeSet<&&str> = keys.iter().collect();
                assert_eq!(unique.len(), keys.len(), "kernel {i}: {keys:?}");
            }
        }
    }
}

#[test]
fn bridge_conflist_is_valid_cni_json() {
    for backend in [Some("nftables"), Some("iptables"), None] {
        let conf: Value = serde_json::from_str(&bridge_conflist(backend)).unwrap();
        assert_eq!(conf["cniVersion"], "1.0.0");
        assert_eq!(conf["name"], CNI_NETWORK_NAME);
        let bridge = &conf["plugins"][0];
        assert_eq!(bridge["type"], "bridge");
        assert_eq!(bridge["bridge"], "cni0");
        assert_eq!(bridge["isGateway"], true);
        assert_eq!(bridge["ipMasq"], backend.is_some());
        assert_eq!(bridge["hairpinMode"], true);
        let ipam = &bridge["ipam"];
        assert_eq!(ipam["type"], "host-local");
        assert_eq!(ipam["ranges"][0][0]["subnet"], "10.42.0.0/16");
        assert_eq!(ipam["routes"][0]["dst"], "0.0.0.0/0");
        if let Some(b) = backend {
            assert_eq!(plugin_types(&conf), ["bridge", "portmap"]);
            let portmap = &conf["plugins"][1];
            assert_eq!(portmap["capabilities"]["portMappings"], true);
            assert_eq!(portmap["backend"], b);
            assert_eq!(bridge["ipMasqBackend"], b);
        }
    }
}

#[test]
fn every_kernel_driven_choice_has_a_note() {
    for caps in [debian_cloud(), libkrunfw(), no_netfilter()] {
        let plan = plan(&caps, &opts());
        let notes = plan.notes.join("\n");
        for topic in ["network policy", "kube-proxy", "pod network"] {
            assert!(notes.contains(topic), "no note on {topic}: {notes}");
        }
        for flag in [
            "--disable-network-policy",
            "--flannel-backend=none",
            "--disable-kube-proxy",
            "proxy-mode=nftables",
            "masquerade-all=true",
        ] {
            if plan.args.iter().any(|a| a.contains(flag)) {
                assert!(notes.contains(flag), "{flag} without a note: {notes}");
            }
        }
    }
}

#[test]
fn test_kernels_cover_every_feature() {
    // The fixtures above must mention every feature the probe reports, so a new feature in
    // kconfig::FEATURES shows up here.
    for caps in [debian_cloud(), libkrunfw()] {
        assert_eq!(caps.len(), FEATURES.len());
    }
    let deb = debian_cloud();
    assert!(deb.iter().all(|c| c.availability != Availability::Missing));
}

/// The plan as the guest reads it: written as the host stages it, parsed by the guest's parser.
fn as_guest_reads(plan: &K3sPlan, data_dir: &str) -> gatevm_abi::plan::Plan {
    let file = gatevm_abi::plan::PlanFile {
        args: plan.args.clone(),
        data_dir: data_dir.to_string(),
        cni: None,
        notes: plan.notes.clone(),
        images: vec![],
        role: Default::default(),
    };
    let json = String::from_utf8(file.to_json().unwrap()).unwrap();
    gatevm_abi::plan::parse(&json).unwrap()
}

#[test]
fn defaults_reach_what_the_guest_reads() {
    // The default options, through the flags, to what the guest's k3s profile reads: the API
    // port it waits on is the one the guest side assumes when none is given, the data directory
    // is the guest's, the certificate names the guest's address, and no optional component runs.
    let d = K3sOptions::default();
    let p = plan(&debian_cloud(), &d);
    let read = as_guest_reads(&p, &d.data_dir);
    assert_eq!(read.api_port(), gatevm_abi::plan::DEFAULT_API_PORT);
    let port = format!("--https-listen-port={}", gatevm_abi::plan::DEFAULT_API_PORT);
    assert!(has(&p, &port));
    assert_eq!(
        read.data_dir,
        PathBuf::from(gatevm_abi::paths::K3S_DATA_DIR)
    );
    let guest_ip = format!("--tls-san={}", gatevm_abi::net::GUEST_IP);
    assert!(has(&p, &guest_ip), "{:?}", p.args);
    assert!(has(&p, "--tls-san=127.0.0.1") && has(&p, "--tls-san=localhost"));
    assert!(
        has(&p, "--disable=traefik,servicelb,metrics-server"),
        "{:?}",
        p.args
    );

    // Any other port given reaches the guest the same way.
    for port in [1u16, 16443, 65535] {
        let o = K3sOptions {
            api_port: port,
            ..K3sOptions::default()
        };
        let read = as_guest_reads(&plan(&debian_cloud(), &o), &o.data_dir);
        assert_eq!(read.api_port(), port);
    }
}

#[test]
fn defaults_for_slow_pulls_and_nodeports() {
    let p = plan(&debian_cloud(), &opts());
    assert!(
        has(&p, "--kubelet-arg=runtime-request-timeout=15m"),
        "{:?}",
        p.args
    );
    assert!(
        has(&p, "--kube-proxy-arg=nodeport-addresses=192.168.127.0/24"),
        "{:?}",
        p.args
    );
    let p = plan(&libkrunfw(), &opts());
    assert!(
        has(&p, "--kube-proxy-arg=nodeport-addresses=192.168.127.0/24"),
        "{:?}",
        p.args
    );
    // No kube-proxy, no kube-proxy arguments.
    let p = plan(&no_netfilter(), &opts());
    assert!(
        !p.args.iter().any(|a| a.starts_with("--kube-proxy-arg")),
        "{:?}",
        p.args
    );
    // The default CIDR is the VM network's.
    assert_eq!(
        K3sOptions::default().nodeport_cidrs,
        vec!["192.168.127.0/24"]
    );
    assert_eq!(vm_network_cidr(), "192.168.127.0/24");
}

#[test]
fn user_args_come_last_and_reserved_ones_are_refused() {
    let o = K3sOptions {
        user_args: vec![
            "--node-label=tier=edge".into(),
            "--disable-helm-controller".into(),
        ],
        ..opts()
    };
    let p = plan(&debian_cloud(), &o);
    let n = p.args.len();
    assert_eq!(
        &p.args[n - 2..],
        ["--node-label=tier=edge", "--disable-helm-controller"]
    );
    assert!(p.notes.iter().any(|x| x.contains("--node-label=tier=edge")));

    for ok in [
        "--node-label=a=b",
        "--kubelet-arg=max-pods=50",
        "--disable-helm-controller",
        "--cluster-cidr=10.52.0.0/16",
    ] {
        assert_eq!(check_user_arg(ok), Ok(()), "{ok}");
    }
    let refused = |a: &str| check_user_arg(a).unwrap_err();
    assert!(refused("--data-dir=/tmp").contains("--data-dir is reserved"));
    assert!(refused("-d").contains("--data-dir is reserved"));
    assert!(refused("--write-kubeconfig=/x").contains("reserved"));
    assert!(refused("--write-kubeconfig-mode=0644").contains("0600"));
    assert!(refused("--container-runtime-endpoint=unix:///x").contains("containerd"));
    assert!(refused("--https-listen-port=7443").contains("--api-port"));
    assert!(refused("--token=abc").contains("--join"));
    assert!(refused("--server=https://x:6443").contains("--join"));
    assert!(refused("-s").contains("--join"));
    assert!(refused("node-label=x").contains("--flag=value"));
    assert!(refused("-v=3").contains("long"));
    assert!(refused("--").contains("not a k3s flag"));
    assert!(refused("--Node-Label=x").contains("not a k3s flag"));
    assert!(refused("--node-label=a\nb").contains("control"));
    assert!(refused(&format!("--x={}", "a".repeat(5000))).contains("longer"));
    let many: Vec<String> = (0..65).map(|i| format!("--node-label=n{i}=x")).collect();
    assert!(check_user_args(&many).unwrap_err().contains("at most 64"));
    let e = check_user_args(&["--node-label=x".into(), "--data-dir=/x".into()]).unwrap_err();
    assert!(
        e.starts_with("--k3s-arg \"--data-dir=/x\": --data-dir is reserved"),
        "{e}"
    );
}

proptest::proptest! {
    /// Whatever passes the check is one long flag that names no reserved flag, in any spelling.
    #[test]
    fn accepted_user_args_never_name_reserved_flags(a in "-{0,3}[a-z-]{0,24}(=[ -~]{0,8})?") {
        if check_user_arg(&a).is_ok() {
            let name = a.split_once('=').map_or(a.as_str(), |(n, _)| n);
            proptest::prop_assert!(name.starts_with("--") && name.len() > 2);
            proptest::prop_assert!(!RESERVED_ARGS.iter().any(|(l, s, _)| name == *l || Some(name) == *s));
        }
    }
}

#[test]
fn libkrunfw_as_recorded_gets_nftables_kube_proxy_and_a_masquerading_bridge() {
    for arch in ["x86_64", "aarch64"] {
        let caps = gatevm_kernel::libkrunfw::recorded("6.12.91", arch)
            .unwrap()
            .capabilities();
        let p = plan(&caps, &opts());
        assert!(
            has(&p, "--kube-proxy-arg=proxy-mode=nftables"),
            "{arch}: {:?}",
            p.args
        );
        assert!(!has(&p, "--disable-kube-proxy"), "{arch}: {:?}", p.args);
        assert!(has(&p, "--flannel-backend=none"));
        assert!(has(&p, "--disable-network-policy"));
        assert!(has(
            &p,
            "--kube-proxy-arg=nodeport-addresses=192.168.127.0/24"
        ));
        let conf = conflist(&p);
        assert_eq!(plugin_types(&conf), ["bridge", "portmap"]);
        assert_eq!(conf["plugins"][0]["ipMasq"], true);
        assert_eq!(conf["plugins"][0]["ipMasqBackend"], "nftables");
        assert_eq!(conf["plugins"][1]["backend"], "nftables");
    }
}

#[test]
fn a_cluster_server_and_an_agent() {
    let token = "/etc/gatevm/k3s/token".to_string();
    let server = K3sOptions {
        cluster: Some(ClusterNode {
            node_ip: gatevm_abi::net::CLUSTER_SERVER_IP,
            token_file: token.clone(),
            server_url: None,
        }),
        ..opts()
    };
    let p = plan(&debian_cloud(), &server);
    for want in [
        "--node-ip=192.168.200.10",
        "--flannel-iface=cl0",
        "--token-file=/etc/gatevm/k3s/token",
        "--tls-san=192.168.200.10",
        "--kube-proxy-arg=nodeport-addresses=192.168.127.0/24,192.168.200.0/24",
    ] {
        assert!(has(&p, want), "{want}: {:?}", p.args);
    }
    let agent = K3sOptions {
        node_name: "worker".into(),
        cluster: Some(ClusterNode {
            node_ip: "192.168.200.11".parse().unwrap(),
            token_file: token,
            server_url: Some(ClusterNode::server_url_default()),
        }),
        user_args: vec!["--node-label=role=worker".into()],
        ..opts()
    };
    let p = plan(&debian_cloud(), &agent);
    for want in [
        "--server=https://192.168.200.10:6443",
        "--node-ip=192.168.200.11",
        "--node-name=worker",
        "--flannel-iface=cl0",
        "--token-file=/etc/gatevm/k3s/token",
        "--container-runtime-endpoint=unix:///run/containerd/containerd.sock",
        "--kubelet-arg=runtime-request-timeout=15m",
    ] {
        assert!(has(&p, want), "{want}: {:?}", p.args);
    }
    assert_eq!(p.args.last().unwrap(), "--node-label=role=worker");
    // Server-only flags are not an agent's.
    let names = flag_names(&p);
    for server_only in [
        "--disable",
        "--tls-san",
        "--https-listen-port",
        "--write-kubeconfig-mode",
        "--flannel-backend",
        "--disable-network-policy",
        "--disable-kube-proxy",
    ] {
        assert!(!names.contains(&server_only), "{server_only}: {:?}", p.args);
    }
    assert!(p.cni_conflist.is_none());
}
