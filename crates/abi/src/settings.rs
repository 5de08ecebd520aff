//! What the host hands the guest beyond the kernel command line: shared directories, registry
//! settings and proxy variables. They travel as JSON on a small read-only disk
//! ([`crate::paths::disk::SETTINGS`]), not on the command line: a proxy URL may carry a password,
//! and a QEMU command line is visible to every user of the host.
//!
//! The image is the JSON text padded with zero bytes to a whole number of 4 KiB blocks. The host
//! builds it with [`GuestSettings::to_image`]; the guest reads it with
//! [`GuestSettings::from_image`], which checks every field (the guest writes files and mounts
//! from them).

use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Component, Path};

/// Largest settings image (and JSON text) accepted.
pub const SETTINGS_MAX: usize = 64 * 1024;
/// Most shared directories one instance may have.
pub const MAX_VOLUMES: usize = 16;
/// Where the guest writes containerd's registry host files (`<host>/hosts.toml`); containerd's
/// CRI plugin and `gatevm image pull` read them from here.
pub const CERTS_DIR: &str = "/run/gatevm/certs.d";
/// The proxy variables passed on, upper-case; processes get both spellings.
pub const PROXY_VARS: [&str; 3] = ["HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"];
/// Longest guest directory of a share.
pub const MAX_GUEST_DIR: usize = 255;

/// Guest directories a share may not be at, under or above: the system's own, the agent's and
/// containerd's state.
pub const RESERVED_GUEST_DIRS: &[&str] = &[
    "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/root",
    "/run", "/sbin", "/sys", "/usr", "/var/lib", "/var/log", "/var/run",
];

/// The settings of one boot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestSettings {
    /// Shared host directories to mount, in order.
    #[serde(default)]
    pub volumes: Vec<VolumeMount>,
    /// Registry hosts with mirrors or relaxed TLS.
    #[serde(default)]
    pub registries: Vec<RegistryHost>,
    /// Proxy variables for containerd, k3s and pulls.
    #[serde(default)]
    pub proxy: Vec<ProxyVar>,
    /// The cluster NIC, for a k3s node of a cluster ([`crate::net::CLUSTER_NET`]).
    #[serde(default)]
    pub cluster: Option<ClusterLink>,
}

/// The guest's address on the cluster network; the NIC is the one with
/// [`crate::net::cluster_mac`] of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterLink {
    /// The node's address ([`crate::net::is_cluster_node_ip`]).
    pub ip: std::net::Ipv4Addr,
}

/// One shared directory as the guest mounts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    /// The virtio-fs tag ([`volume_tag`]).
    pub tag: String,
    /// Where it is mounted (absolute, normalized: [`check_guest_dir`]).
    pub guest_dir: String,
    /// Mounted read-only (the host side refuses writes either way).
    pub read_only: bool,
}

/// containerd's settings for one registry host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryHost {
    /// `host[:port]` as image references name it.
    pub host: String,
    /// Mirror URLs tried before the registry itself, in order.
    #[serde(default)]
    pub mirrors: Vec<String>,
    /// Plain HTTP, or HTTPS without certificate checks.
    #[serde(default)]
    pub insecure: bool,
}

/// One proxy variable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyVar {
    /// One of [`PROXY_VARS`].
    pub name: String,
    pub value: String,
}

/// Why settings were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error("the settings are {0} bytes, more than the {SETTINGS_MAX} allowed")]
    TooLarge(usize),
    #[error("the settings are not valid JSON: {0}")]
    Json(String),
    #[error("{0}")]
    Invalid(String),
}

/// The virtio-fs tag of the `index`-th share.
pub fn volume_tag(index: usize) -> String {
    format!("gatevm-vol{index}")
}

fn invalid(msg: impl Into<String>) -> SettingsError {
    SettingsError::Invalid(msg.into())
}

/// Checks a guest directory and returns its normalized form: absolute, at most
/// [`MAX_GUEST_DIR`] bytes of letters, digits and `._-+@=,/`, no `.` or `..` component, not `/`
/// and not at, under or above one of [`RESERVED_GUEST_DIRS`].
pub fn check_guest_dir(s: &str) -> Result<String, String> {
    if !s.starts_with('/') {
        return Err(format!("guest directory {s:?} is not an absolute path"));
    }
    if s.len() > MAX_GUEST_DIR {
        return Err(format!(
            "guest directory {s:?} is longer than {MAX_GUEST_DIR} bytes"
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._-+@=,/".contains(*c)))
    {
        return Err(format!(
            "guest directory {s:?} contains {c:?}: use letters, digits and ._-+@=,/"
        ));
    }
    let mut out = String::new();
    for c in Path::new(s).components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => {
                out.push('/');
                out.push_str(&n.to_string_lossy());
            }
            Component::CurDir | Component::ParentDir | Component::Prefix(_) => {
                return Err(format!("guest directory {s:?} contains \".\" or \"..\""))
            }
        }
    }
    // `Path::components` drops a `.` in the middle silently: look for it in the text too.
    if s.split('/').any(|c| c == "." || c == "..") {
        return Err(format!("guest directory {s:?} contains \".\" or \"..\""));
    }
    if out.is_empty() {
        return Err("guest directory \"/\" would hide the guest's whole system".into());
    }
    for r in RESERVED_GUEST_DIRS {
        if related(&out, r) {
            return Err(format!(
                "guest directory {out} overlaps the guest's own {r}: choose another place (e.g. /mnt/NAME or /data)"
            ));
        }
    }
    Ok(out)
}

/// Whether one of two normalized absolute paths is the other or lies under it.
pub fn related(a: &str, b: &str) -> bool {
    let under = |x: &str, y: &str| x == y || x.starts_with(&format!("{y}/"));
    under(a, b) || under(b, a)
}

/// Splits a mount spec `SOURCE:TARGET[:ro|:rw]` (a share's `HOST_DIR:GUEST_DIR`, a container
/// bind's `GUEST_DIR:CONTAINER_DIR`): the two paths and whether it is read-only.
pub fn split_mount_spec(spec: &str) -> Result<(&str, &str, bool), String> {
    let parts: Vec<&str> = spec.split(':').collect();
    match parts.as_slice() {
        [a, b] | [a, b, "rw"] => Ok((a, b, false)),
        [a, b, "ro"] => Ok((a, b, true)),
        [_, _, m] => Err(format!("unknown mode {m:?}: use ro or rw")),
        _ => Err("expected SOURCE:TARGET[:ro] (paths with ':' cannot be used)".into()),
    }
}

/// Checks an image platform for a pull: `OS/ARCH[/VARIANT]` of lower-case letters, digits and
/// `_`.
pub fn check_platform(p: &str) -> Result<(), String> {
    let parts: Vec<&str> = p.split('/').collect();
    let ok = (2..=3).contains(&parts.len())
        && parts.iter().all(|s| {
            !s.is_empty()
                && s.len() <= 32
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid --platform {p:?}: expected OS/ARCH[/VARIANT], e.g. linux/amd64 or linux/arm64/v8"
        ))
    }
}

/// Checks a registry host as image references name it: `host[:port]` with a host of letters,
/// digits, `.` and `-` (or an IPv4 address) and an optional port 1-65535.
pub fn check_registry_host(s: &str) -> Result<(), String> {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        && !host.starts_with(['.', '-'])
        && !host.ends_with(['.', '-'])
        && !host.contains("..");
    if !host_ok {
        return Err(format!(
            "registry {s:?}: expected HOST or HOST:PORT (letters, digits, '.' and '-')"
        ));
    }
    if let Some(p) = port {
        match p.parse::<u16>() {
            Ok(n) if n > 0 && !p.starts_with('0') => {}
            _ => return Err(format!("registry {s:?}: port {p:?} is not 1-65535")),
        }
    }
    Ok(())
}

/// Checks a mirror URL: `http://` or `https://`, a host as [`check_registry_host`] takes it, an
/// optional path, no user name or password (they would be stored and shown), no quotes, spaces
/// or control characters.
pub fn check_mirror_url(s: &str) -> Result<(), String> {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .ok_or_else(|| format!("mirror {s:?} must start with http:// or https://"))?;
    if s.len() > 1024 {
        return Err(format!("mirror {s:?} is longer than 1024 bytes"));
    }
    if let Some(c) = s
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || "\"'\\`<>{}|^".contains(*c))
    {
        return Err(format!("mirror {s:?} contains {c:?}"));
    }
    let authority = rest.split('/').next().unwrap_or("");
    if authority.contains('@') {
        return Err(format!(
            "mirror {s:?} carries a user name or password: gatevm keeps no registry credentials"
        ));
    }
    check_registry_host(authority).map_err(|e| format!("mirror {s:?}: {e}"))
}

/// The `host[:port]` of a mirror URL.
pub fn url_authority(url: &str) -> &str {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .unwrap_or(url);
    rest.split('/').next().unwrap_or("")
}

/// Checks a proxy variable's value: no control characters (it goes into environments), at most
/// 4096 bytes.
pub fn check_proxy_value(name: &str, v: &str) -> Result<(), String> {
    if v.len() > 4096 {
        return Err(format!("{name} is longer than 4096 bytes"));
    }
    if v.chars().any(char::is_control) {
        return Err(format!("{name} contains control characters"));
    }
    Ok(())
}

fn toml_string(s: &str) -> String {
    // Values were checked: no quotes, backslashes or control characters reach here.
    format!("\"{s}\"")
}

impl RegistryHost {
    /// containerd's `hosts.toml` for this host (containerd `docs/hosts.md`): the mirrors first,
    /// then the registry itself; an insecure one is reached over plain HTTP, or HTTPS without
    /// certificate checks where it answers TLS. `insecure_hosts` are the `host[:port]`s named
    /// insecure, which a mirror on one of them is too.
    pub fn hosts_toml(&self, insecure_hosts: &[&str]) -> String {
        let mut s = String::from("# Written by gatevm at every boot; changes are lost.\n");
        if self.insecure {
            let _ = writeln!(
                s,
                "server = {}",
                toml_string(&format!("http://{}", self.host))
            );
        }
        for m in &self.mirrors {
            let _ = writeln!(s, "\n[host.{}]", toml_string(m));
            s.push_str("  capabilities = [\"pull\", \"resolve\"]\n");
            if insecure_hosts.contains(&url_authority(m)) {
                s.push_str("  skip_verify = true\n");
            }
        }
        if self.insecure {
            let _ = writeln!(
                s,
                "\n[host.{}]",
                toml_string(&format!("http://{}", self.host))
            );
            s.push_str("  capabilities = [\"pull\", \"resolve\", \"push\"]\n");
            s.push_str("  skip_verify = true\n");
        }
        s
    }
}

impl GuestSettings {
    /// Whether there is nothing to hand over (the VM then gets no settings disk).
    pub fn is_empty(&self) -> bool {
        self.volumes.is_empty()
            && self.registries.is_empty()
            && self.proxy.is_empty()
            && self.cluster.is_none()
    }

    /// The disk image: the JSON text, zero-padded to a whole number of 4 KiB blocks.
    pub fn to_image(&self) -> Result<Vec<u8>, SettingsError> {
        self.validate()?;
        let mut v = serde_json::to_vec(self).map_err(|e| SettingsError::Json(e.to_string()))?;
        if v.len() > SETTINGS_MAX {
            return Err(SettingsError::TooLarge(v.len()));
        }
        let padded = v.len().div_ceil(4096).max(1) * 4096;
        v.resize(padded, 0);
        Ok(v)
    }

    /// Reads an image (or its first [`SETTINGS_MAX`] bytes): the text up to the first zero byte,
    /// checked.
    pub fn from_image(bytes: &[u8]) -> Result<GuestSettings, SettingsError> {
        let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        if end > SETTINGS_MAX {
            return Err(SettingsError::TooLarge(end));
        }
        let s: GuestSettings = serde_json::from_slice(&bytes[..end])
            .map_err(|e| SettingsError::Json(e.to_string()))?;
        s.validate()?;
        Ok(s)
    }

    /// Checks every field.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if self.volumes.len() > MAX_VOLUMES {
            return Err(invalid(format!(
                "{} shared directories, more than the {MAX_VOLUMES} allowed",
                self.volumes.len()
            )));
        }
        for (i, v) in self.volumes.iter().enumerate() {
            if v.tag != volume_tag(i) {
                return Err(invalid(format!(
                    "share {i} has tag {:?}, expected {:?}",
                    v.tag,
                    volume_tag(i)
                )));
            }
            let norm = check_guest_dir(&v.guest_dir).map_err(invalid)?;
            if norm != v.guest_dir {
                return Err(invalid(format!(
                    "guest directory {:?} is not normalized",
                    v.guest_dir
                )));
            }
            if let Some(o) = self.volumes[..i]
                .iter()
                .find(|o| related(&o.guest_dir, &v.guest_dir))
            {
                return Err(invalid(format!(
                    "guest directories {} and {} overlap: give each share its own place",
                    o.guest_dir, v.guest_dir
                )));
            }
        }
        for (i, r) in self.registries.iter().enumerate() {
            check_registry_host(&r.host).map_err(invalid)?;
            if self.registries[..i].iter().any(|o| o.host == r.host) {
                return Err(invalid(format!("registry {} appears twice", r.host)));
            }
            for m in &r.mirrors {
                check_mirror_url(m).map_err(invalid)?;
            }
        }
        if let Some(c) = &self.cluster {
            if !crate::net::is_cluster_node_ip(c.ip) {
                return Err(invalid(format!(
                    "cluster address {} is not a node address of {}/{}",
                    c.ip,
                    crate::net::CLUSTER_NET,
                    crate::net::CLUSTER_PREFIX_LEN
                )));
            }
        }
        for p in &self.proxy {
            if !PROXY_VARS.contains(&p.name.as_str()) {
                return Err(invalid(format!(
                    "{:?} is not a proxy variable ({})",
                    p.name,
                    PROXY_VARS.join(", ")
                )));
            }
            check_proxy_value(&p.name, &p.value).map_err(invalid)?;
        }
        Ok(())
    }

    /// k3s's `registries.yaml` for the same settings (k3s docs, "Private Registry
    /// Configuration"). gatevm's k3s uses the guest's containerd, which reads the host files; this
    /// file states the same for k3s's own tools and for whoever reads the node.
    pub fn registries_yaml(&self) -> String {
        let mut s =
            String::from("# Written by gatevm at every boot; changes are lost.\nmirrors:\n");
        for r in &self.registries {
            let _ = writeln!(s, "  \"{}\":\n    endpoint:", r.host);
            for m in &r.mirrors {
                let _ = writeln!(s, "      - \"{m}\"");
            }
            if r.insecure {
                let _ = writeln!(s, "      - \"http://{}\"", r.host);
            }
        }
        let insecure: Vec<&RegistryHost> = self.registries.iter().filter(|r| r.insecure).collect();
        if !insecure.is_empty() {
            s.push_str("configs:\n");
            for r in insecure {
                let _ = writeln!(
                    s,
                    "  \"{}\":\n    tls:\n      insecure_skip_verify: true",
                    r.host
                );
            }
        }
        s
    }

    /// The `host[:port]`s named insecure.
    pub fn insecure_hosts(&self) -> Vec<&str> {
        self.registries
            .iter()
            .filter(|r| r.insecure)
            .map(|r| r.host.as_str())
            .collect()
    }

    /// The proxy environment for a process: each variable in both spellings.
    pub fn proxy_env(&self) -> Vec<(String, String)> {
        let mut v = Vec::new();
        for p in &self.proxy {
            v.push((p.name.clone(), p.value.clone()));
            v.push((p.name.to_ascii_lowercase(), p.value.clone()));
        }
        v
    }
}

/// `NO_PROXY` with what must never go through a proxy added: the guest's own loopback, its
/// network (the host as the guest sees it included) and, for k3s, the cluster's pod and service
/// networks and in-cluster names.
pub fn no_proxy_with_guest_net(given: Option<&str>) -> String {
    let mut parts: Vec<String> = given
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    let net = format!(
        "{}/{}",
        std::net::Ipv4Addr::from(u32::from(crate::net::GUEST_IP) & u32::from(crate::net::NETMASK)),
        crate::net::PREFIX_LEN
    );
    for p in [
        "localhost",
        "127.0.0.0/8",
        "::1",
        &net,
        "10.42.0.0/16",
        "10.43.0.0/16",
        ".svc",
        ".cluster.local",
    ] {
        if !parts.iter().any(|x| x == p) {
            parts.push(p.to_string());
        }
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(i: usize, dir: &str, ro: bool) -> VolumeMount {
        VolumeMount {
            tag: volume_tag(i),
            guest_dir: dir.into(),
            read_only: ro,
        }
    }

    #[test]
    fn guest_dirs_are_checked_and_normalized() {
        assert_eq!(check_guest_dir("/data").unwrap(), "/data");
        assert_eq!(check_guest_dir("/mnt//src/").unwrap(), "/mnt/src");
        assert_eq!(check_guest_dir("/var/data").unwrap(), "/var/data");
        assert_eq!(
            check_guest_dir("/srv/a.b-c_d+e@f=g,h").unwrap(),
            "/srv/a.b-c_d+e@f=g,h"
        );
        for (bad, why) in [
            ("data", "absolute"),
            ("/", "whole system"),
            ("//", "whole system"),
            ("/mnt/../etc", "\"..\""),
            ("/mnt/./x", "\"..\""),
            ("/etc", "/etc"),
            ("/etc/foo", "/etc"),
            ("/var", "/var/lib"),
            ("/var/lib/containerd", "/var/lib"),
            ("/run/containerd", "/run"),
            ("/proc/1", "/proc"),
            ("/usr/local", "/usr"),
            ("/mnt/a b", "' '"),
            ("/mnt/a\"b", "'\"'"),
            ("/mnt/a\nb", "'\\n'"),
            ("/mnt/ä", "'ä'"),
        ] {
            let e = check_guest_dir(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        assert!(check_guest_dir(&format!("/{}", "a".repeat(255))).is_err());
    }

    #[test]
    fn registry_hosts_and_mirrors() {
        for ok in [
            "localhost:5000",
            "reg.example",
            "192.168.127.254:5000",
            "a-b.c",
        ] {
            check_registry_host(ok).unwrap();
        }
        for bad in [
            "",
            ":5000",
            "a b",
            "a/b",
            "../x",
            "x:0",
            "x:65536",
            "x:05",
            "x:",
            "-x",
            "a..b",
            "x:y",
            "host/../../etc",
        ] {
            assert!(check_registry_host(bad).is_err(), "{bad:?}");
        }
        check_mirror_url("http://192.168.127.254:5000").unwrap();
        check_mirror_url("https://mirror.example/v2-prefix").unwrap();
        for (bad, why) in [
            ("ftp://x", "http://"),
            ("mirror.example", "http://"),
            ("https://user:pw@m.example", "password"),
            ("https://m.example/\"]\nx", "contains"),
            ("https://", "registry"),
        ] {
            let e = check_mirror_url(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn hosts_toml_for_mirrors_and_insecure_registries() {
        let mirror = RegistryHost {
            host: "localhost:1".into(),
            mirrors: vec!["http://192.168.127.254:5000".into()],
            insecure: false,
        };
        let t = mirror.hosts_toml(&["192.168.127.254:5000"]);
        assert!(!t.contains("server"), "{t}");
        assert!(
            t.contains(
                "[host.\"http://192.168.127.254:5000\"]\n  capabilities = [\"pull\", \"resolve\"]\n  skip_verify = true\n"
            ),
            "{t}"
        );
        let t = mirror.hosts_toml(&[]);
        assert!(!t.contains("skip_verify"), "{t}");

        let insecure = RegistryHost {
            host: "192.168.127.254:5000".into(),
            mirrors: vec![],
            insecure: true,
        };
        let t = insecure.hosts_toml(&[]);
        assert!(
            t.contains("server = \"http://192.168.127.254:5000\"\n"),
            "{t}"
        );
        assert!(
            t.contains("[host.\"http://192.168.127.254:5000\"]\n  capabilities = [\"pull\", \"resolve\", \"push\"]\n  skip_verify = true\n"),
            "{t}"
        );
    }

    #[test]
    fn images_round_trip_and_hostile_ones_are_refused() {
        let s = GuestSettings {
            volumes: vec![vol(0, "/data", false), vol(1, "/mnt/ro", true)],
            registries: vec![RegistryHost {
                host: "localhost:5000".into(),
                mirrors: vec![],
                insecure: true,
            }],
            proxy: vec![ProxyVar {
                name: "HTTPS_PROXY".into(),
                value: "http://u:p@proxy:3128".into(),
            }],
            cluster: Some(ClusterLink {
                ip: crate::net::CLUSTER_SERVER_IP,
            }),
        };
        let img = s.to_image().unwrap();
        assert_eq!(img.len() % 4096, 0);
        assert_eq!(GuestSettings::from_image(&img).unwrap(), s);
        assert_eq!(
            s.proxy_env(),
            vec![
                (
                    "HTTPS_PROXY".to_string(),
                    "http://u:p@proxy:3128".to_string()
                ),
                (
                    "https_proxy".to_string(),
                    "http://u:p@proxy:3128".to_string()
                )
            ]
        );
        assert_eq!(
            s.registries_yaml(),
            "# Written by gatevm at every boot; changes are lost.\nmirrors:\n  \"localhost:5000\":\n    endpoint:\n      - \"http://localhost:5000\"\nconfigs:\n  \"localhost:5000\":\n    tls:\n      insecure_skip_verify: true\n"
        );
        assert!(GuestSettings::default().is_empty());
        assert_eq!(GuestSettings::default().to_image().unwrap().len(), 4096);

        let bad = |f: &dyn Fn(&mut GuestSettings)| {
            let mut b = s.clone();
            f(&mut b);
            let text = serde_json::to_vec(&b).unwrap();
            GuestSettings::from_image(&text).unwrap_err().to_string()
        };
        assert!(bad(&|b| b.volumes[1].guest_dir = "/data/x".into()).contains("overlap"));
        assert!(bad(&|b| b.volumes[1].guest_dir = "/etc".into()).contains("/etc"));
        assert!(bad(&|b| b.volumes[1].guest_dir = "/mnt//ro".into()).contains("normalized"));
        assert!(bad(&|b| b.volumes[1].tag = "x".into()).contains("tag"));
        assert!(bad(&|b| b.registries[0].host = "../../etc".into()).contains("registry"));
        assert!(bad(&|b| b.registries.push(b.registries[0].clone())).contains("twice"));
        assert!(bad(&|b| b.proxy[0].name = "LD_PRELOAD".into()).contains("not a proxy"));
        assert!(bad(&|b| b.proxy[0].value = "x\ny".into()).contains("control"));
        assert!(bad(&|b| b.cluster = Some(ClusterLink {
            ip: crate::net::GUEST_IP
        }))
        .contains("cluster address"));
        assert!(
            bad(&|b| b.volumes = (0..17).map(|i| vol(i, &format!("/m{i}"), false)).collect())
                .contains("more than")
        );
        assert!(GuestSettings::from_image(b"{")
            .unwrap_err()
            .to_string()
            .contains("JSON"));
        assert!(GuestSettings::from_image(&vec![b' '; SETTINGS_MAX + 1])
            .unwrap_err()
            .to_string()
            .contains("more than"));
        // Unknown fields from a newer host are ignored.
        assert_eq!(
            GuestSettings::from_image(b"{\"later\":1}\0\0").unwrap(),
            GuestSettings::default()
        );
    }

    #[test]
    fn no_proxy_keeps_the_guest_network_direct() {
        let n = no_proxy_with_guest_net(Some("corp.example, 10.0.0.0/8,"));
        assert!(
            n.starts_with("corp.example,10.0.0.0/8,localhost,127.0.0.0/8,"),
            "{n}"
        );
        assert!(n.contains("192.168.127.0/24"), "{n}");
        assert!(n.contains(".svc") && n.contains("10.43.0.0/16"), "{n}");
        let twice = no_proxy_with_guest_net(Some(&n));
        assert_eq!(twice, n);
    }
}
