//! The containerd profile (`gatevm.payload=containerd`): containerd alone, with a configuration
//! gatevm writes at every boot. The k3s profile runs the same containerd ([`payload_config`])
//! with a configuration of its own.

use crate::fsutil::write_config;
use crate::payload::{PayloadConfig, Readiness, PAYLOAD_STOP_TIMEOUT};
use std::path::Path;
use std::time::Duration;

/// Where the containerd profile's configuration is written at every boot (the k3s profile has
/// its own, [`crate::profile::k3s::CONTAINERD_CONFIG`]).
pub(crate) const CONTAINERD_CONFIG: &str = "/run/gatevm/containerd.toml";

/// The distribution's containerd configuration. gatevm's configuration imports it when it
/// exists, so what is set there still applies (imported settings win).
pub(crate) const ETC_CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";

/// containerd plugins gatevm turns off: snapshotters that cannot work in the guest (the state
/// disk is ext4, the kernel has no aufs, devmapper and blockfile are not configured). containerd
/// probes each at every start; aufs alone runs `modprobe aufs`, which fails, for ~0.3 s of a
/// boot under TCG.
pub(crate) const DISABLED_PLUGINS: &[&str] = &[
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.blockfile",
];

/// The `disabled_plugins` line of a containerd 1.7 (`version = 2`) configuration.
pub(crate) fn disabled_plugins_line() -> String {
    let ids: Vec<String> = DISABLED_PLUGINS
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect();
    format!("disabled_plugins = [{}]", ids.join(", "))
}

/// containerd's configuration in the containerd profile: containerd's defaults with
/// [`DISABLED_PLUGINS`] off, importing `import` (the distribution's file) when given.
pub(crate) fn containerd_config(import: Option<&Path>) -> String {
    let mut s = String::from(
        "# Written by gatevm-guest at every boot; changes are lost. Settings belong in\n\
         # /etc/containerd/config.toml, which is imported (its settings win).\n\
         version = 2\n",
    );
    if let Some(path) = import {
        let quoted = crate::toml::basic_string(&path.to_string_lossy());
        s.push_str(&format!("imports = [{quoted}]\n"));
    }
    s.push_str(&disabled_plugins_line());
    s.push('\n');
    s
}

/// containerd as gatevm runs it (without `--config`).
pub(crate) fn payload_config() -> PayloadConfig {
    PayloadConfig {
        name: "containerd".into(),
        program: "/usr/bin/containerd".into(),
        args: Vec::new(),
        readiness: Readiness::UnixSocket("/run/containerd/containerd.sock".into()),
        log: "/var/log/containerd.log".into(),
        log_max: 10 * 1024 * 1024,
        backoff_initial: Duration::from_millis(500),
        backoff_max: Duration::from_secs(30),
        healthy_reset: Duration::from_secs(60),
        probe_interval: Duration::from_millis(50),
        stop_timeout: PAYLOAD_STOP_TIMEOUT,
    }
}

/// containerd in the containerd profile: writes [`CONTAINERD_CONFIG`] (see
/// [`containerd_config`]) and runs with it; if it cannot be written, containerd runs with its
/// defaults and the reason is logged.
pub(crate) fn profile_payload_config() -> PayloadConfig {
    let mut c = payload_config();
    let etc = Path::new(ETC_CONTAINERD_CONFIG);
    let text = containerd_config(etc.is_file().then_some(etc));
    match write_config(Path::new(CONTAINERD_CONFIG), &text) {
        Ok(()) => c.args = vec!["--config".into(), CONTAINERD_CONFIG.into()],
        Err(e) => {
            crate::glog!(
                "cannot write {CONTAINERD_CONFIG} ({e}): containerd runs with its defaults"
            )
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::next_backoff;

    #[test]
    fn containerd_profile_configuration() {
        let text = containerd_config(Some(Path::new(ETC_CONTAINERD_CONFIG)));
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                "version = 2",
                "imports = [\"/etc/containerd/config.toml\"]",
                "disabled_plugins = [\"io.containerd.snapshotter.v1.aufs\", \
                 \"io.containerd.snapshotter.v1.btrfs\", \"io.containerd.snapshotter.v1.zfs\", \
                 \"io.containerd.snapshotter.v1.devmapper\", \
                 \"io.containerd.snapshotter.v1.blockfile\"]",
            ]
        );
        // Without the distribution's file nothing is imported; overlayfs is never turned off.
        let bare = containerd_config(None);
        assert!(!bare.contains("imports"), "{bare}");
        assert!(
            !bare.contains("overlayfs") && !bare.contains("native"),
            "{bare}"
        );
    }

    #[test]
    fn backoff_doubles_caps_and_resets() {
        let c = payload_config();
        let short = Duration::from_secs(1);
        let mut d = next_backoff(None, short, &c);
        assert_eq!(d, Duration::from_millis(500));
        let mut seen = vec![d];
        for _ in 0..8 {
            d = next_backoff(Some(d), short, &c);
            seen.push(d);
        }
        assert_eq!(seen[1], Duration::from_secs(1));
        assert_eq!(seen[2], Duration::from_secs(2));
        assert_eq!(*seen.last().unwrap(), Duration::from_secs(30));
        assert_eq!(
            next_backoff(Some(d), Duration::from_secs(61), &c),
            Duration::from_millis(500)
        );
    }
}
