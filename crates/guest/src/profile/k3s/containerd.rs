//! containerd's configuration in the k3s profile: containerd's CRI plugin, not k3s, runs the
//! pods' CNI, so it is pointed at k3s's bundled plugins and CNI configuration directory.

use super::plan::Plan;
use crate::fsutil::write_config;
use crate::profile::containerd::disabled_plugins_line;
use crate::toml::basic_string;
use std::io;
use std::path::Path;

/// containerd's configuration (1.7, `version = 2`) in the k3s profile. Everything not set here
/// keeps containerd's default; set are:
/// - the default root, state and socket, spelled out so the file says where containerd lives;
/// - CRI's CNI `bin_dir` = k3s's bundled plugins and `conf_dir` = k3s's CNI directory: with an
///   external runtime endpoint it is containerd's CRI plugin that sets up pod networking, with
///   the configuration k3s (flannel) or gatevm writes there. The plugins appear after k3s's
///   first start unpacks them; CNI is loaded per pod, so their absence at containerd's start
///   is fine;
/// - the `runc` runtime (its type and sandbox mode restated, since a table given here replaces
///   the default entry) with `SystemdCgroup = false`: no systemd in the guest, and k3s's kubelet
///   uses the cgroupfs driver;
/// - CRI's registry `config_path`: the host files gatevm writes from `--registry-mirror` and
///   `--insecure-registry` (`gatevm_abi::settings::CERTS_DIR`);
/// - the sandbox (pause) image, see [`super::plan::DEFAULT_PAUSE_IMAGE`];
/// - the plugins of [`crate::profile::containerd::DISABLED_PLUGINS`] turned off.
pub(crate) fn containerd_config(plan: &Plan) -> String {
    format!(
        "# Written by gatevm-guest at every boot of the k3s profile; changes are lost.\n\
         # containerd's defaults apply to everything not set here.\n\
         version = 2\n\
         root = \"/var/lib/containerd\"\n\
         state = \"/run/containerd\"\n\
         {disabled}\n\
         \n\
         [grpc]\n\
         \x20 address = \"/run/containerd/containerd.sock\"\n\
         \n\
         [plugins.\"io.containerd.grpc.v1.cri\"]\n\
         \x20 sandbox_image = {pause}\n\
         \n\
         [plugins.\"io.containerd.grpc.v1.cri\".cni]\n\
         \x20 bin_dir = {bin}\n\
         \x20 conf_dir = {conf}\n\
         \n\
         [plugins.\"io.containerd.grpc.v1.cri\".registry]\n\
         \x20 config_path = {certs}\n\
         \n\
         [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n\
         \x20 runtime_type = \"io.containerd.runc.v2\"\n\
         \x20 sandbox_mode = \"podsandbox\"\n\
         \n\
         [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]\n\
         \x20 SystemdCgroup = false\n",
        disabled = disabled_plugins_line(),
        pause = basic_string(plan.pause_image()),
        bin = basic_string(&plan.cni_bin_dir().to_string_lossy()),
        conf = basic_string(&plan.cni_conf_dir().to_string_lossy()),
        certs = basic_string(gatevm_abi::settings::CERTS_DIR),
    )
}

/// Writes containerd's configuration for `plan` to `path` (directory created as needed).
pub(crate) fn write_containerd_config(plan: &Plan, path: &Path) -> io::Result<()> {
    write_config(path, &containerd_config(plan))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::k3s::plan::parse_plan;
    use crate::profile::k3s::testutil::{names, plan_for, FULL};
    use std::collections::BTreeSet;
    use std::fs;

    #[test]
    fn containerd_config_text() {
        let p = parse_plan(FULL).unwrap();
        let text = containerd_config(&p);
        let expected = "version = 2\n\
            root = \"/var/lib/containerd\"\n\
            state = \"/run/containerd\"\n\
            disabled_plugins = [\"io.containerd.snapshotter.v1.aufs\", \
            \"io.containerd.snapshotter.v1.btrfs\", \"io.containerd.snapshotter.v1.zfs\", \
            \"io.containerd.snapshotter.v1.devmapper\", \
            \"io.containerd.snapshotter.v1.blockfile\"]\n\
            \n\
            [grpc]\n\
            \x20 address = \"/run/containerd/containerd.sock\"\n\
            \n\
            [plugins.\"io.containerd.grpc.v1.cri\"]\n\
            \x20 sandbox_image = \"docker.io/rancher/mirrored-pause:3.6\"\n\
            \n\
            [plugins.\"io.containerd.grpc.v1.cri\".cni]\n\
            \x20 bin_dir = \"/var/lib/gatevm/k3s/data/current/bin\"\n\
            \x20 conf_dir = \"/var/lib/gatevm/k3s/agent/etc/cni/net.d\"\n\
            \n\
            [plugins.\"io.containerd.grpc.v1.cri\".registry]\n\
            \x20 config_path = \"/run/gatevm/certs.d\"\n\
            \n\
            [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n\
            \x20 runtime_type = \"io.containerd.runc.v2\"\n\
            \x20 sandbox_mode = \"podsandbox\"\n\
            \n\
            [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]\n\
            \x20 SystemdCgroup = false\n";
        assert!(text.ends_with(expected), "{text}");
        // Only comments before the settings.
        let head = &text[..text.len() - expected.len()];
        assert!(head.lines().all(|l| l.starts_with("# ")), "{head}");
        // Each table appears once.
        let tables: Vec<&str> = text.lines().filter(|l| l.starts_with('[')).collect();
        let unique: BTreeSet<&&str> = tables.iter().collect();
        assert_eq!(tables.len(), unique.len());

        // Strings are escaped.
        let p = plan_for(Path::new("/srv/a\"b\\c"), &["--pause-image=reg/p\"x:1"]);
        let text = containerd_config(&p);
        assert!(
            text.contains("bin_dir = \"/srv/a\\\"b\\\\c/data/current/bin\""),
            "{text}"
        );
        assert!(text.contains("sandbox_image = \"reg/p\\\"x:1\""), "{text}");
        assert_eq!(basic_string("a\u{7f}\tb"), "\"a\\u007F\\u0009b\"");

        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("run/gatevm/containerd-k3s.toml");
        write_containerd_config(&p, &path).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), text);
        assert_eq!(names(path.parent().unwrap()), vec!["containerd-k3s.toml"]);
    }
}
