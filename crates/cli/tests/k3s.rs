//! End-to-end test of the k3s profile. It needs a k3s binary, which no package registry this
//! project can reach carries: it runs when `GATEVM_K3S_BIN` names one (and `GATEVM_E2E=1`), and
//! otherwise prints that it did not run.

mod common;

use common::*;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

fn k3s_bin(test: &str) -> Option<PathBuf> {
    match std::env::var_os("GATEVM_K3S_BIN") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            gatevm_testkit::skip(test, "set GATEVM_K3S_BIN to a k3s binary (none is available from the package registries here)");
            None
        }
    }
}

fn kubectl(name: &str, args: &[&str], stdin: Option<&[u8]>) -> (i32, String, String) {
    let mut full = vec!["k3s", "kubectl"];
    full.extend_from_slice(args);
    exec(name, &full, stdin)
}

const MANIFEST: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: hello}
spec:
  replicas: 1
  selector: {matchLabels: {app: hello}}
  template:
    metadata: {labels: {app: hello}}
    spec:
      containers:
      - name: hello
        image: docker.io/gatevm-test/busybox:1
        imagePullPolicy: Never
        command: ["sh", "-c", "mkdir -p /www && echo hello-from-k3s > /www/index.html && exec httpd -f -p 8080 -h /www"]
        ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: hello}
spec:
  type: NodePort
  selector: {app: hello}
  ports: [{port: 8080, targetPort: 8080, nodePort: 30080}]
"#;

fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    panic!("{what} did not happen within {} s", within.as_secs());
}

#[test]
fn k3s_gateway_with_a_nodeport_across_a_restart() {
    const NAME: &str = "e2e-k3s";
    let test = "k3s_gateway_with_a_nodeport_across_a_restart";
    if !enabled(test) || !have_busybox(test) {
        return;
    }
    let Some(k3s) = k3s_bin(test) else { return };
    let _guard = Instance(NAME);
    let _ = gatevm(&["delete", NAME, "--force"]);
    let t = tempfile::tempdir().unwrap();
    let kubeconfig = t.path().join("kubeconfig");
    let manifest = t.path().join("marker.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: e2e-marker, namespace: default}\ndata: {placed: by-gatevm}\n",
    )
    .unwrap();
    let archive = t.path().join("busybox.tar");
    docker_archive_tagged(
        &archive,
        "gatevm-test/busybox:1",
        &[tar_of(&busybox_layer())],
        image_config(&[], &["sh"], &["PATH=/bin"], "/"),
    );
    let port = free_port();
    let fwd = format!("{port}:30080");
    let start = |extra: &[&str]| {
        let mut args = vec!["start", NAME];
        args.extend_from_slice(extra);
        let out = Command::new(bin())
            .args(&args)
            .env("KUBECONFIG", &kubeconfig)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    start(&[
        "--profile",
        "k3s",
        "--k3s",
        k3s.to_str().unwrap(),
        "-p",
        &fwd,
        "--memory",
        "3072",
        "--manifest",
        manifest.to_str().unwrap(),
    ]);
    let st = status(NAME);
    assert_eq!(st["healthy"], true, "{st}");
    // The context was merged into $KUBECONFIG's file.
    let merged = std::fs::read_to_string(&kubeconfig).unwrap();
    assert!(merged.contains(&format!("gatevm-{NAME}")), "{merged}");
    assert!(ok(&["kubeconfig", NAME]).contains("https://127.0.0.1:"));

    wait_for("the node to be Ready", Duration::from_secs(600), || {
        let (_, out, _) = kubectl(
            NAME,
            &[
                "get",
                "nodes",
                "-o",
                "jsonpath={.items[0].status.conditions[?(@.type==\"Ready\")].status}",
            ],
            None,
        );
        out.trim() == "True"
    });
    // The --manifest and the gateway's TLS Secret were deployed by k3s.
    wait_for(
        "the staged manifests to be applied",
        Duration::from_secs(300),
        || {
            let (a, _, _) = kubectl(NAME, &["get", "configmap", "e2e-marker"], None);
            let (b, _, _) = kubectl(
                NAME,
                &["-n", "gatevm", "get", "secret", "gateway-tls"],
                None,
            );
            a == 0 && b == 0
        },
    );
    ok(&["image", "import", NAME, archive.to_str().unwrap()]);
    let (code, _, err) = kubectl(NAME, &["apply", "-f", "-"], Some(MANIFEST.as_bytes()));
    assert_eq!(code, 0, "{err}");
    let got = read_forward(port, "hello-from-k3s", Duration::from_secs(600));
    assert!(
        got.is_some(),
        "the NodePort did not answer through the forward"
    );

    // A restart keeps the workload.
    ok(&["stop", NAME]);
    start(&[]);
    let got = read_forward(port, "hello-from-k3s", Duration::from_secs(600));
    assert!(
        got.is_some(),
        "the workload did not come back after a restart"
    );

    // Delete removes the context again.
    let out = Command::new(bin())
        .args(["delete", NAME, "--force"])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .unwrap();
    assert!(out.status.success());
    let after = std::fs::read_to_string(&kubeconfig).unwrap_or_default();
    assert!(!after.contains(&format!("gatevm-{NAME}")), "{after}");
}

/// The stand-in k3s binary, when end-to-end tests run and `GATEVM_FAKE_K3S` names it; otherwise
/// the test is recorded as skipped.
fn stand_in(test: &str) -> Option<PathBuf> {
    if !enabled(test) {
        return None;
    }
    let fake = std::env::var_os("GATEVM_FAKE_K3S").map(PathBuf::from);
    if fake.is_none() {
        gatevm_testkit::skip(
            test,
            "set GATEVM_FAKE_K3S to the fake-k3s binary (scripts/test.sh builds it)",
        );
    }
    fake
}

/// The k3s profile's plumbing with a stand-in k3s (crates/fake-k3s): everything gatevm does
/// around k3s (binary check and cache, staging of the plan, manifests and TLS Secret, the guest
/// supervising k3s on the VM's containerd, readiness, the API forward, kubeconfig merge and
/// removal, gateway metadata, restart with kept settings) on a machine without k3s.
#[test]
fn k3s_profile_plumbing_with_a_stand_in() {
    const NAME: &str = "e2e-k3sfake";
    let test = "k3s_profile_plumbing_with_a_stand_in";
    let Some(fake) = stand_in(test) else {
        return;
    };
    let _guard = Instance(NAME);
    let _ = gatevm(&["delete", NAME, "--force"]);
    let t = tempfile::tempdir().unwrap();
    let kubeconfig = t.path().join("kube/config");
    let config_home = t.path().join("config");
    let manifest = t.path().join("marker.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: marker}\n",
    )
    .unwrap();
    // A share for pods' hostPath volumes (read-only: as root a writable share of a root-owned
    // directory is refused).
    let share = t.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("f"), "for-pods\n").unwrap();
    let share_spec = format!("{}:/srv/share:ro", share.display());
    let api = free_port();
    let run = |args: &[&str]| {
        let out = Command::new(bin())
            .args(args)
            .env("KUBECONFIG", &kubeconfig)
            .env("XDG_CONFIG_HOME", &config_home)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "gatevm {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let api_s = api.to_string();
    let gw_port = free_port();
    // fake-k3s serves the gateway Secret's pair with TLS on guest port 30443.
    let gw_spec = format!("{gw_port}:30443");
    run(&[
        "start",
        NAME,
        "--profile",
        "k3s",
        "--k3s",
        fake.to_str().unwrap(),
        "--api-port",
        &api_s,
        "--manifest",
        manifest.to_str().unwrap(),
        "--gateway-port",
        &gw_spec,
        "--gateway-service",
        "web.edge",
        "--tls-san",
        "gw.example.test",
        "--gateway-secret",
        "edge/web-tls",
        "-v",
        &share_spec,
        "--insecure-registry",
        "192.168.127.1:5000",
    ]);
    let st = status(NAME);
    assert_eq!(st["healthy"], true, "{st}");
    let payloads: Vec<&str> = st["payloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(
        payloads.contains(&"containerd") && payloads.contains(&"k3s"),
        "{st}"
    );
    assert_eq!(st["k3s"]["api_ready"], true, "{st}");
    assert_eq!(st["k3s"]["node_ready"], true, "{st}");
    assert_eq!(st["k3s"]["version"], "v1.31.0+k3s1", "{st}");
    // The gateway port: TLS from the guest's stand-in gateway, verified against the CA.
    assert_eq!(st["k3s"]["gateway"]["tls_ready"], true, "{st}");
    assert_eq!(
        st["k3s"]["gateway"]["endpoint"],
        format!("https://127.0.0.1:{gw_port}")
    );
    let fwd = format!("127.0.0.1:{api}:6443/tcp");
    assert!(
        st["forwards"].as_array().unwrap().iter().any(|f| f == &fwd),
        "{st}"
    );

    // containerd's socket on the host serves this profile too (k3s runs on that containerd).
    let sock = st["containerd_socket"].as_str().expect("containerd_socket");
    match std::env::var_os("GATEVM_HOST_CTR") {
        Some(ctr) => {
            let out = Command::new(ctr)
                .args(["--address", sock, "version"])
                .output()
                .unwrap();
            assert!(
                out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Server:"),
                "host ctr version on the k3s profile: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        None => gatevm_testkit::skip_part(
            "k3s_profile_plumbing_with_a_stand_in",
            "host ctr",
            "set GATEVM_HOST_CTR (scripts/test.sh does)",
        ),
    }
    // The share is there for hostPath volumes, and the registry settings reach k3s's containerd
    // (config_path) and k3s's own registries.yaml.
    let (code, out, err) = exec(
        NAME,
        &[
            "sh",
            "-c",
            "cat /srv/share/f && grep -c 'config_path = \"/run/gatevm/certs.d\"' /run/gatevm/containerd-k3s.toml && grep -c 'http://192.168.127.1:5000' /run/gatevm/certs.d/192.168.127.1:5000/hosts.toml /etc/rancher/k3s/registries.yaml",
        ],
        None,
    );
    assert_eq!(code, 0, "{out} {err}");
    assert!(out.starts_with("for-pods\n1\n"), "{out}");
    assert!(
        out.contains("hosts.toml:2") && out.contains("registries.yaml:1"),
        "{out}"
    );
    // The API port reaches the guest's server.
    let got = read_forward(api, "fake-k3s", Duration::from_secs(30));
    assert!(got.is_some(), "the API forward did not reach the guest");
    // What k3s was started with and found.
    let (code, report, err) = exec(NAME, &["cat", "/run/fake-k3s.json"], None);
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    let args: Vec<&str> = report["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for want in [
        "--container-runtime-endpoint=unix:///run/containerd/containerd.sock",
        "--data-dir=/var/lib/gatevm/k3s",
    ] {
        assert!(args.contains(&want), "{want} missing from {args:?}");
    }
    let manifests = report["manifests"].to_string();
    assert!(
        manifests.contains("marker.yaml") && manifests.contains("gatevm-gateway-tls.yaml"),
        "{manifests}"
    );
    let (code, secret, err) = exec(
        NAME,
        &[
            "cat",
            "/var/lib/gatevm/k3s/server/manifests/gatevm-gateway-tls.yaml",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        secret.contains("name: web-tls") && secret.contains("namespace: edge"),
        "{secret}"
    );
    // The server certificate names the service and the extra SAN.
    let pem = std::fs::read(
        gatevm_runtime::dirs::data_dir()
            .unwrap()
            .join(format!("instances/{NAME}/pki/server.crt")),
    )
    .unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let cert = pem.parse_x509().unwrap();
    let text = format!(
        "{:?}",
        cert.subject_alternative_name().unwrap().unwrap().value
    );
    for want in [
        "web.edge.svc",
        "web.edge.svc.cluster.local",
        "gw.example.test",
    ] {
        assert!(text.contains(want), "{want} missing from {text}");
    }

    // The kubeconfig: the instance's, and merged into $KUBECONFIG's file.
    let own = run(&["kubeconfig", NAME]);
    assert!(own.contains(&format!("https://127.0.0.1:{api}")), "{own}");
    let merged = std::fs::read_to_string(&kubeconfig).unwrap();
    assert!(merged.contains(&format!("gatevm-{NAME}")), "{merged}");
    // Gateway metadata for clients.
    let gw = config_home.join(format!("gatevm/gateways/{NAME}"));
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(gw.join("gateway.json")).unwrap()).unwrap();
    assert_eq!(meta["endpoint"], format!("https://127.0.0.1:{gw_port}"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(gw.join("client.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    // A plain start keeps the profile and its settings.
    run(&["stop", NAME]);
    run(&["start", NAME]);
    assert_eq!(status(NAME)["healthy"], true);
    assert!(read_forward(api, "fake-k3s", Duration::from_secs(30)).is_some());

    assert_eq!(status(NAME)["k3s"]["gateway"]["tls_ready"], true);

    // A gateway port where nothing serves TLS: running, but not healthy, and status says why.
    run(&["stop", NAME]);
    run(&["start", NAME, "--gateway-port", "30444"]);
    let st = status(NAME);
    assert_eq!(st["state"], "running", "{st}");
    assert_eq!(st["healthy"], false, "{st}");
    assert_eq!(st["k3s"]["node_ready"], true, "{st}");
    assert_eq!(st["k3s"]["gateway"]["tls_ready"], false, "{st}");
    assert_eq!(st["k3s"]["gateway"]["guest_port"], 30444, "{st}");
    assert!(st["k3s"]["gateway"]["detail"].is_string(), "{st}");

    // A hostile guest (issue 13): k3s's kubeconfig replaced by one carrying an `exec`
    // credential plugin and "\n" credentials. `kubeconfig --refresh` refuses it with one line
    // naming the field; neither the instance's kubeconfig nor the user's changes.
    let gatevm_env = |args: &[&str]| {
        Command::new(bin())
            .args(args)
            .env("KUBECONFIG", &kubeconfig)
            .env("XDG_CONFIG_HOME", &config_home)
            .output()
            .unwrap()
    };
    let (code, orig, err) = exec(NAME, &["cat", "/etc/rancher/k3s/k3s.yaml"], None);
    assert_eq!(code, 0, "{err}");
    let line_of = |key: &str| {
        orig.lines()
            .find(|l| l.trim_start().starts_with(key))
            .unwrap_or_else(|| panic!("no {key} in {orig}"))
            .to_string()
    };
    let (cert_line, key_line) = (
        line_of("client-certificate-data:"),
        line_of("client-key-data:"),
    );
    let exec_plugin = "  user:\n    exec:\n      apiVersion: client.authentication.k8s.io/v1beta1\n      command: /bin/sh\n      args: [\"-c\", \"echo pwned > /tmp/gatevm-e2e-pwned\"]\n";
    let write_guest = |yaml: &str| {
        let (c, _, e) = exec(
            NAME,
            &["sh", "-c", "cat > /etc/rancher/k3s/k3s.yaml"],
            Some(yaml.as_bytes()),
        );
        assert_eq!(c, 0, "{e}");
    };
    write_guest(
        &orig
            .replacen("  user:\n", exec_plugin, 1)
            .replace(&cert_line, "    client-certificate-data: \"\\n\"")
            .replace(&key_line, "    client-key-data: \"\\n\""),
    );
    let merged_before = std::fs::read_to_string(&kubeconfig).unwrap();
    let own_before = run(&["kubeconfig", NAME]);
    let out = gatevm_env(&["kubeconfig", NAME, "--refresh"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a hostile kubeconfig was taken: {err}"
    );
    // One error line naming the field (a warning may name the fields that were dropped).
    let errors: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("gatevm: error"))
        .collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(errors[0].contains("client-certificate-data"), "{err}");
    assert_eq!(std::fs::read_to_string(&kubeconfig).unwrap(), merged_before);
    assert_eq!(run(&["kubeconfig", NAME]), own_before);

    // Valid credentials beside the plugin and fields that change where and how kubectl
    // connects: the credentials are taken, nothing else.
    write_guest(
        &orig
            .replacen(
                "  user:\n",
                &format!("{exec_plugin}    auth-provider:\n      name: oidc\n      config: {{cmd-path: /bin/sh}}\n    username: admin\n    password: hunter2\n"),
                1,
            )
            .replace(
                "    server: https://127.0.0.1:6443\n",
                "    server: https://evil.example:6443\n    proxy-url: http://192.168.127.2:3128\n    insecure-skip-tls-verify: true\n    tls-server-name: evil.example\n",
            ),
    );
    let own = run(&["kubeconfig", NAME, "--refresh"]);
    let merged = std::fs::read_to_string(&kubeconfig).unwrap();
    assert!(
        own.contains(&format!("server: https://127.0.0.1:{api}\n")),
        "{own}"
    );
    const ALLOWED: &[&str] = &[
        "apiVersion",
        "kind",
        "clusters",
        "users",
        "contexts",
        "name",
        "cluster",
        "user",
        "context",
        "current-context",
        "preferences",
        "server",
        "certificate-authority-data",
        "client-certificate-data",
        "client-key-data",
    ];
    for (what, text) in [("instance", &own), ("merged", &merged)] {
        for l in text.lines() {
            let key = l
                .trim_start()
                .trim_start_matches("- ")
                .split(':')
                .next()
                .unwrap();
            assert!(
                ALLOWED.contains(&key),
                "{what} kubeconfig holds {key:?}:\n{text}"
            );
        }
        for bad in [
            "/bin/sh",
            "pwned",
            "hunter2",
            "evil.example",
            "192.168.127.2",
        ] {
            assert!(
                !text.contains(bad),
                "{what} kubeconfig holds {bad:?}:\n{text}"
            );
        }
    }

    // Text from the guest on the user's terminal: the guest's `k3s` answers the health probe
    // with terminal control sequences (OSC 52 clipboard write, clear screen, 8-bit CSI, BEL,
    // backspace, RTL override); `status` shows the detail without them.
    let hostile_k3s = "#!/bin/sh\nprintf 'boom \\033]52;c;aGk=\\007\\033[2J\\302\\2332J\\007\\010\\342\\200\\256done\\n' >&2\nexit 1\n";
    let (c, _, e) = exec(
        NAME,
        &[
            "sh",
            "-c",
            "cat > /root/k3s-hostile && chmod 755 /root/k3s-hostile && mount --bind /root/k3s-hostile /etc/gatevm/k3s/k3s",
        ],
        Some(hostile_k3s.as_bytes()),
    );
    assert_eq!(c, 0, "{e}");
    let human = run(&["status", NAME]);
    let json = run(&["status", NAME, "--json"]);
    for text in [&human, &json] {
        assert!(text.contains("boom"), "{text}");
        assert!(text.contains("done"), "{text}");
        for bad in ['\u{1b}', '\u{9b}', '\u{7}', '\u{8}', '\u{202e}'] {
            assert!(
                !text.contains(bad),
                "{bad:?} reached the terminal: {text:?}"
            );
        }
        assert!(
            !text.contains("\\u001b") && !text.contains("52;c;"),
            "{text}"
        );
    }

    // Delete takes the context and the gateway metadata away.
    run(&["delete", NAME, "--force"]);
    let after = std::fs::read_to_string(&kubeconfig).unwrap_or_default();
    assert!(!after.contains(&format!("gatevm-{NAME}")), "{after}");
    assert!(!gw.exists());
}

/// Polls `status --json` of `name` until `done` holds of it (within `within`) and returns it.
fn status_until(
    name: &str,
    what: &str,
    within: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let st = status(name);
        if done(&st) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {} s; last status: {st}",
            within.as_secs()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// k3s health's negative paths, end to end, with the stand-in told to fail (its switches, see
/// crates/fake-k3s): the API server down, the node NotReady, the gateway serving another CA's
/// certificate, the gateway turning the instance's client certificate away. Each makes the
/// instance unhealthy with `status` saying exactly why, and undoing it makes it healthy again.
/// Started with `--no-kubeconfig`: the user's kubeconfig is neither changed nor created, no
/// backup appears, and `gatevm kubeconfig` still gives the instance's own.
#[test]
fn k3s_health_fails_and_recovers_with_a_stand_in() {
    const NAME: &str = "e2e-k3sneg";
    let test = "k3s_health_fails_and_recovers_with_a_stand_in";
    let Some(fake) = stand_in(test) else {
        return;
    };
    let _guard = Instance(NAME);
    let _ = gatevm(&["delete", NAME, "--force"]);
    let t = tempfile::tempdir().unwrap();
    // The user's kubeconfig, naming another cluster: --no-kubeconfig leaves it alone.
    const THEIRS: &str = "apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n    server: https://127.0.0.1:1\n  name: theirs\ncontexts:\n- context:\n    cluster: theirs\n    user: theirs\n  name: theirs\ncurrent-context: theirs\nusers:\n- name: theirs\n  user:\n    token: theirs\n";
    let kube_dir = t.path().join("kube");
    std::fs::create_dir_all(&kube_dir).unwrap();
    let kubeconfig = kube_dir.join("config");
    std::fs::write(&kubeconfig, THEIRS).unwrap();
    // A $KUBECONFIG naming a file that does not exist: it is not created either.
    let none_dir = t.path().join("none");
    std::fs::create_dir_all(&none_dir).unwrap();
    let config_home = t.path().join("config");
    let run_with = |kubeconfig: &std::path::Path, args: &[&str]| {
        let out = Command::new(bin())
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("XDG_CONFIG_HOME", &config_home)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "gatevm {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let run = |args: &[&str]| run_with(&kubeconfig, args);
    let entries = |dir: &std::path::Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let api = free_port();
    let gw = free_port();
    run(&[
        "start",
        NAME,
        "--profile",
        "k3s",
        "--k3s",
        fake.to_str().unwrap(),
        "--api-port",
        &api.to_string(),
        "--gateway-port",
        &format!("{gw}:30443"),
        "--no-kubeconfig",
    ]);
    let st = status(NAME);
    assert_eq!(st["healthy"], true, "{st}");
    assert_eq!(st["k3s"]["detail"], serde_json::Value::Null, "{st}");
    assert_eq!(st["k3s"]["gateway"]["tls_ready"], true, "{st}");

    // --no-kubeconfig: the user's file as it was, no backup beside it; the instance's own
    // kubeconfig all the same, also when fetched again.
    assert_eq!(std::fs::read_to_string(&kubeconfig).unwrap(), THEIRS);
    assert_eq!(entries(&kube_dir), ["config"]);
    let own = run(&["kubeconfig", NAME]);
    assert!(
        own.contains(&format!("    server: https://127.0.0.1:{api}\n")),
        "{own}"
    );
    assert!(own.contains("client-key-data: "), "{own}");
    let refreshed = run_with(&none_dir.join("config"), &["kubeconfig", NAME, "--refresh"]);
    assert!(
        refreshed.contains(&format!("    server: https://127.0.0.1:{api}\n")),
        "{refreshed}"
    );
    assert!(entries(&none_dir).is_empty(), "{:?}", entries(&none_dir));

    let switch = |words: &str| {
        let (code, _, err) = exec(
            NAME,
            &["sh", "-c", &format!("echo {words} > /run/fake-k3s.fail")],
            None,
        );
        assert_eq!(code, 0, "{err}");
    };
    const WITHIN: Duration = Duration::from_secs(120);
    let recovers = |after: &str| {
        switch("");
        let st = status_until(
            NAME,
            &format!("healthy again after {after}"),
            WITHIN,
            |st| st["healthy"] == true,
        );
        assert_eq!(st["k3s"]["api_ready"], true, "{st}");
        assert_eq!(st["k3s"]["node_ready"], true, "{st}");
        assert_eq!(st["k3s"]["detail"], serde_json::Value::Null, "{st}");
        assert_eq!(st["k3s"]["gateway"]["tls_ready"], true, "{st}");
        assert_eq!(
            st["k3s"]["gateway"]["detail"],
            serde_json::Value::Null,
            "{st}"
        );
    };

    // Each switch, what status must say while it is on: the API's and the node's readiness, the
    // k3s detail, the gateway's TLS and its detail.
    let null = serde_json::Value::Null;
    let cases = [
        // The API server down: /readyz fails, the node is not asked.
        (
            "api-down",
            false,
            false,
            serde_json::json!("/readyz: Unable to connect to the server 127.0.0.1:6443: EOF"),
            true,
            null.clone(),
        ),
        // The node NotReady, the API server fine.
        (
            "node-not-ready",
            true,
            false,
            serde_json::json!("the node is not Ready yet"),
            true,
            null.clone(),
        ),
        // The gateway serving a certificate of another CA.
        (
            "gateway-other-ca",
            true,
            true,
            null.clone(),
            false,
            serde_json::json!(format!(
                "127.0.0.1:{gw} answers TLS with a certificate not signed by the instance's CA"
            )),
        ),
        // The gateway turning the instance's client certificate away (after the handshake's
        // end, in TLS 1.3).
        (
            "gateway-refuse-client",
            true,
            true,
            null.clone(),
            false,
            serde_json::json!(format!(
                "127.0.0.1:{gw} refused the instance's client certificate: received fatal alert: UnknownCA"
            )),
        ),
    ];
    for (word, api, node, detail, tls, gw_detail) in cases {
        switch(word);
        let st = status_until(NAME, &format!("unhealthy with {word}"), WITHIN, |st| {
            st["healthy"] == false
        });
        assert_eq!(st["state"], "running", "{word}: {st}");
        assert_eq!(st["k3s"]["api_ready"], api, "{word}: {st}");
        assert_eq!(st["k3s"]["node_ready"], node, "{word}: {st}");
        assert_eq!(st["k3s"]["detail"], detail, "{word}: {st}");
        assert_eq!(st["k3s"]["gateway"]["tls_ready"], tls, "{word}: {st}");
        assert_eq!(st["k3s"]["gateway"]["detail"], gw_detail, "{word}: {st}");
        if word == "api-down" {
            let human = run(&["status", NAME]);
            assert!(
                human.contains("(API not ready, node not Ready; /readyz: Unable to connect to the server 127.0.0.1:6443: EOF)"),
                "{human}"
            );
        }
        recovers(word);
    }

    // Delete leaves the user's kubeconfig as it was, too.
    run(&["delete", NAME, "--force"]);
    assert_eq!(std::fs::read_to_string(&kubeconfig).unwrap(), THEIRS);
    assert_eq!(entries(&kube_dir), ["config"]);
}

/// The k3s profile's state kept tidy across restarts (issue 17), with the stand-in k3s:
/// - an airgap archive is imported at the first boot, skipped at the next (recorded by digest on
///   the state disk, its image still in containerd), imported again when its image was removed
///   and when the archive's contents change; `status` says which;
/// - `--k3s-arg` reaches k3s after gatevm's own arguments (the new defaults among them), is
///   saved, and a reserved one is refused with one line before anything starts;
/// - kine's datastore after a crash: a stale bootstrap lock row (built here with the guest's
///   sqlite3) is removed at the next boot and the populated key kept; a database that fails
///   its header check is moved aside whole, never deleted, and `status` says where.
#[test]
fn k3s_state_kept_tidy_with_a_stand_in() {
    const NAME: &str = "e2e-k3stidy";
    let test = "k3s_state_kept_tidy_with_a_stand_in";
    let Some(fake) = stand_in(test) else {
        return;
    };
    let _guard = Instance(NAME);
    let _ = gatevm(&["delete", NAME, "--force"]);
    let t = tempfile::tempdir().unwrap();
    let arch = match std::env::consts::ARCH {
        "aarch64" => "arm64",
        _ => "amd64",
    };
    let archive = t.path().join("app.tar");
    let make_archive = |content: &[u8]| {
        docker_archive_tagged(
            &archive,
            "gatevm-test/airgap:1",
            &[tar_of(&[file("hello.txt", content)])],
            serde_json::json!({"architecture": arch, "os": "linux", "config": {}}),
        );
    };
    make_archive(b"first\n");
    const IMAGE: &str = "docker.io/gatevm-test/airgap:1";
    let fake_s = fake.to_str().unwrap();

    // A reserved argument: one line, nothing made.
    let (code, _, err) = run_gatevm(&[
        "start",
        NAME,
        "--profile",
        "k3s",
        "--k3s",
        fake_s,
        "--k3s-arg=--data-dir=/tmp/k3s",
    ]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err:?}");
    assert!(
        err.contains("--k3s-arg \"--data-dir=/tmp/k3s\": --data-dir is reserved"),
        "{err}"
    );
    let (code, _, _) = run_gatevm(&["status", NAME]);
    assert_ne!(code, 0, "a refused start left an instance behind");

    ok(&[
        "start",
        NAME,
        "--profile",
        "k3s",
        "--k3s",
        fake_s,
        "--no-kubeconfig",
        "--images",
        archive.to_str().unwrap(),
        "--k3s-arg=--node-label=tier=edge",
        "--k3s-arg",
        "--disable-helm-controller",
    ]);
    let images_said = |st: &serde_json::Value| st["k3s"]["images"].to_string();
    // The boot's airgap report once the imports are done, checked to say `want`.
    let report_says = |what: &str, want: &str| {
        let st = status_until(NAME, what, Duration::from_secs(60), |s| {
            let said = images_said(s);
            said.contains("00-app.tar") && !said.contains("waiting for containerd")
        });
        assert!(
            images_said(&st).contains(want),
            "{what}: {}",
            images_said(&st)
        );
        st
    };
    // Stops, starts with `extra`, and checks the new boot's report.
    let boot_again = |extra: &[&str], what: &str, want: &str| {
        ok(&["stop", NAME]);
        let mut args = vec!["start", NAME];
        args.extend_from_slice(extra);
        ok(&args);
        report_says(what, want)
    };
    let st = report_says("the airgap import report", "imported 1 images");
    assert_eq!(
        st["k3s"]["user_args"],
        serde_json::json!(["--node-label=tier=edge", "--disable-helm-controller"]),
        "{st}"
    );
    let (code, out, err) = exec(NAME, &["ctr", "-n", "k8s.io", "images", "ls", "-q"], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().any(|l| l == IMAGE), "{out}");
    // What k3s got: gatevm's arguments (the new defaults among them), then the user's, last.
    let k3s_args = || -> Vec<String> {
        let (code, report, err) = exec(NAME, &["cat", "/run/fake-k3s.json"], None);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&report).unwrap();
        v["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect()
    };
    let args = k3s_args();
    let n = args.len();
    assert_eq!(
        &args[n - 2..],
        ["--node-label=tier=edge", "--disable-helm-controller"],
        "{args:?}"
    );
    for want in [
        "--kubelet-arg=runtime-request-timeout=15m",
        // The VM network, and the cluster network of this (cluster-ready) server.
        "--kube-proxy-arg=nodeport-addresses=192.168.127.0/24,192.168.200.0/24",
    ] {
        assert!(args.iter().any(|a| a == want), "{want} missing: {args:?}");
    }

    // A crash's leftovers in kine's database, built with the guest's own sqlite3: a stale
    // bootstrap lock (an empty latest value) and a populated bootstrap key.
    let db = "/var/lib/gatevm/k3s/server/db/state.db";
    let sql = |script: &str| {
        // The stand-in makes no datastore: its directory is made here, as k3s would.
        let cmd = format!(
            "mkdir -p {} && sqlite3 -batch {db}",
            db.trim_end_matches("/state.db")
        );
        let (code, out, err) = exec(NAME, &["sh", "-c", &cmd], Some(script.as_bytes()));
        assert_eq!(code, 0, "sqlite3 in the guest: {err}");
        out
    };
    sql("CREATE TABLE IF NOT EXISTS kine (id INTEGER PRIMARY KEY AUTOINCREMENT, name INTEGER, created INTEGER, deleted INTEGER, create_revision INTEGER, prev_revision INTEGER, lease INTEGER, value BLOB, old_value BLOB);
         INSERT INTO kine(name, created, deleted, value) VALUES
           ('/bootstrap/0123abcd', 1, 0, ''),
           ('/bootstrap/feedbeef', 1, 0, x'00112233');");

    // The next boot: the archive skipped, the lock gone, the data kept; the saved arguments
    // still passed.
    let st = boot_again(
        &[],
        "the second boot's report",
        "already imported (1 images), skipped",
    );
    let datastore = st["k3s"]["datastore"].to_string();
    assert!(
        datastore.contains("removed a stale bootstrap lock (/bootstrap/0123abcd"),
        "{datastore}"
    );
    assert_eq!(
        sql("SELECT name FROM kine WHERE name LIKE '/bootstrap/%' ORDER BY id;"),
        "/bootstrap/feedbeef\n"
    );
    assert!(k3s_args().iter().any(|a| a == "--node-label=tier=edge"));
    let human = ok(&["status", NAME]);
    assert!(human.contains("airgap:     00-app.tar"), "{human}");
    assert!(
        human.contains("datastore:  removed a stale bootstrap lock"),
        "{human}"
    );
    assert!(
        human.contains("k3s args:   --node-label=tier=edge --disable-helm-controller"),
        "{human}"
    );

    // The image removed since: imported again. A torn database: moved aside, not deleted.
    let (code, _, err) = exec(NAME, &["ctr", "-n", "k8s.io", "images", "rm", IMAGE], None);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = exec(
        NAME,
        &[
            "sh",
            "-c",
            &format!("head -c 3000 /dev/urandom > {db} && sync"),
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let st = boot_again(&[], "the third boot's report", "imported 1 images");
    let datastore = st["k3s"]["datastore"].to_string();
    assert!(
        datastore.contains("state.db failed its header check")
            && datastore.contains("/var/lib/gatevm/k3s/server/db/corrupt-"),
        "{datastore}"
    );
    let (code, out, err) = exec(
        NAME,
        &[
            "sh",
            "-c",
            "wc -c /var/lib/gatevm/k3s/server/db/corrupt-*/state.db",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.trim_start().starts_with("3000 "), "{out}");

    // The archive's contents changed (same path): another digest, imported again; the next
    // boot after that skips it once more.
    make_archive(b"second\n");
    boot_again(&[], "the fourth boot's report", "imported 1 images");
    // --no-k3s-args drops the saved arguments.
    let st = boot_again(&["--no-k3s-args"], "the fifth boot's report", "skipped");
    assert_eq!(st["k3s"]["user_args"], serde_json::json!([]), "{st}");
    assert!(!k3s_args().iter().any(|a| a == "--node-label=tier=edge"));
    ok(&["delete", NAME, "--force"]);
}

/// A cluster of two VMs (issue 17) with the stand-in k3s: a server and an agent that joined it.
/// Both come up; the agent's k3s is `k3s agent` with the server's URL on the cluster network and
/// the cluster token, which is the same on the host (0600) and in both guests; real TCP flows
/// between the two guests over the cluster network in both directions (the stand-in agent
/// reached the server's API port at 192.168.200.10 itself), through the cluster NIC, not the
/// host's network; the agent reconnects after the server restarts; `list` shows the roles; a
/// bad `--join` is refused with one line; deleting the server is refused while it has an agent;
/// deleting the agent drains it and deletes its node through the server.
#[test]
fn k3s_cluster_of_two_vms_with_a_stand_in() {
    const SERVER: &str = "e2e-k3ssrv";
    const AGENT: &str = "e2e-k3sagt";
    let test = "k3s_cluster_of_two_vms_with_a_stand_in";
    let Some(fake) = stand_in(test) else {
        return;
    };
    // Dropped last to first: the agent goes before its server.
    let _server_guard = Instance(SERVER);
    let _agent_guard = Instance(AGENT);
    let _ = gatevm(&["delete", AGENT, "--force"]);
    let _ = gatevm(&["delete", SERVER, "--force"]);
    let fake_s = fake.to_str().unwrap();
    let refused = |args: &[&str], want: &str| {
        let (code, _, err) = run_gatevm(args);
        assert_eq!(code, 1, "gatevm {args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err:?}");
        assert!(
            err.contains(want),
            "gatevm {args:?}: {err:?} lacks {want:?}"
        );
    };
    // No server yet.
    refused(
        &[
            "start",
            AGENT,
            "--profile",
            "k3s",
            "--k3s",
            fake_s,
            "--join",
            SERVER,
        ],
        "no k3s server instance of that name",
    );
    ok(&[
        "start",
        SERVER,
        "--profile",
        "k3s",
        "--k3s",
        fake_s,
        "--no-kubeconfig",
        "--vmm",
        "qemu",
    ]);
    refused(
        &[
            "start",
            AGENT,
            "--profile",
            "k3s",
            "--k3s",
            fake_s,
            "--join",
            AGENT,
        ],
        "cannot join itself",
    );
    refused(
        &[
            "start",
            AGENT,
            "--profile",
            "k3s",
            "--k3s",
            fake_s,
            "--join",
            SERVER,
            "--enable",
            "traefik",
        ],
        "belong to the cluster's server",
    );
    refused(&["start", SERVER, "--join", SERVER], "cannot join itself");
    ok(&[
        "start",
        AGENT,
        "--profile",
        "k3s",
        "--k3s",
        fake_s,
        "--join",
        SERVER,
    ]);
    let st = status(AGENT);
    assert_eq!(st["healthy"], true, "{st}");
    assert_eq!(st["role"], "agent", "{st}");
    assert_eq!(st["cluster_server"], SERVER, "{st}");
    assert_eq!(st["k3s"]["server"], SERVER, "{st}");
    assert!(
        !st["forwards"].to_string().contains(":6443/"),
        "an agent forwards no API port: {st}"
    );
    assert_eq!(status(SERVER)["role"], "server");
    let list = ok(&["list"]);
    let line = |n: &str| {
        list.lines()
            .find(|l| l.starts_with(n))
            .unwrap_or_else(|| panic!("{n} not in {list}"))
            .to_string()
    };
    assert!(
        line(AGENT).contains(&format!("agent of {SERVER}")),
        "{list}"
    );
    assert!(line(SERVER).contains("k3s server"), "{list}");

    // What each k3s was started with.
    let report = |name: &str| -> serde_json::Value {
        let (code, out, err) = exec(name, &["cat", "/run/fake-k3s.json"], None);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    let args_of = |v: &serde_json::Value| -> Vec<String> {
        v["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect()
    };
    let agent = report(AGENT);
    let agent_args = args_of(&agent);
    assert_eq!(agent["role"], "agent", "{agent}");
    for want in [
        "--server=https://192.168.200.10:6443",
        "--token-file=/etc/gatevm/k3s/token",
        "--node-ip=192.168.200.11",
        "--flannel-iface=cl0",
        &format!("--node-name={AGENT}"),
    ] {
        assert!(
            agent_args.iter().any(|a| a == want),
            "{want}: {agent_args:?}"
        );
    }
    // The stand-in agent reached the server's API port over the cluster network itself.
    assert_eq!(agent["server_answer"], "fake-k3s", "{agent}");
    let server_args = args_of(&report(SERVER));
    for want in [
        "--node-ip=192.168.200.10",
        "--flannel-iface=cl0",
        "--token-file=/etc/gatevm/k3s/token",
    ] {
        assert!(
            server_args.iter().any(|a| a == want),
            "{want}: {server_args:?}"
        );
    }

    // The token: on the host (0600) and the same in both guests (0600 there too).
    let token_file = gatevm_runtime::dirs::data_dir()
        .unwrap()
        .join(format!("instances/{SERVER}/cluster-token"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let token = std::fs::read_to_string(&token_file).unwrap();
    assert_eq!(token.len(), 64);
    // Printed for nodes on other machines; an agent has none of its own.
    assert_eq!(ok(&["cluster-token", SERVER]), format!("{token}\n"));
    refused(&["cluster-token", AGENT], "gatevm cluster-token e2e-k3ssrv");
    for name in [SERVER, AGENT] {
        let (code, out, err) = exec(
            name,
            &[
                "sh",
                "-c",
                "stat -c %a /etc/gatevm/k3s/token && cat /etc/gatevm/k3s/token",
            ],
            None,
        );
        assert_eq!(code, 0, "{err}");
        assert_eq!(out, format!("600\n{token}"), "{name}");
    }

    // TCP from the server to the agent, through the cluster NIC.
    let (code, _, err) = exec(
        AGENT,
        &[
            "sh",
            "-c",
            "nohup perl -MIO::Socket::INET -e 'my $s = IO::Socket::INET->new(LocalAddr => \"192.168.200.11\", LocalPort => 7777, Listen => 5, ReuseAddr => 1) or die; while (my $c = $s->accept) { print $c \"agent\\n\"; close $c; }' >/dev/null 2>&1 &",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let tcp = |from: &str, ip: &str, port: u16| -> String {
        let script = format!(
            "for i in $(seq 1 50); do out=$(timeout 5 bash -c 'exec 3<>/dev/tcp/{ip}/{port}; cat <&3' 2>/dev/null) && [ -n \"$out\" ] && echo \"$out\" && exit 0; sleep 0.5; done; exit 1"
        );
        let (code, out, err) = exec(from, &["sh", "-c", &script], None);
        assert_eq!(code, 0, "TCP from {from} to {ip}:{port}: {out} {err}");
        out.trim().to_string()
    };
    assert_eq!(tcp(SERVER, "192.168.200.11", 7777), "agent");
    assert_eq!(tcp(AGENT, "192.168.200.10", 6443), "fake-k3s");
    let (code, route, err) = exec(SERVER, &["ip", "route", "get", "192.168.200.11"], None);
    assert_eq!(code, 0, "{err}");
    assert!(route.contains("dev cl0"), "{route}");

    // The server restarts: the agent's link comes back by itself.
    ok(&["stop", SERVER]);
    ok(&["start", SERVER]);
    assert_eq!(tcp(AGENT, "192.168.200.10", 6443), "fake-k3s");
    assert_eq!(status(AGENT)["healthy"], true);

    // The server goes only after its agents; the agent leaves the cluster as it goes.
    refused(&["delete", SERVER], "delete them first");
    refused(&["kubeconfig", AGENT], "gatevm kubeconfig e2e-k3ssrv");
    let (code, _, err) = run_gatevm(&["delete", AGENT, "--force"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&format!("{AGENT}: drain {AGENT} done on {SERVER}")),
        "{err}"
    );
    assert!(
        err.contains(&format!("{AGENT}: delete node done on {SERVER}")),
        "{err}"
    );
    let (code, log, err) = exec(SERVER, &["cat", "/run/fake-k3s-kubectl.log"], None);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 2, "{log}");
    assert!(
        lines[0].starts_with(&format!("drain {AGENT} --ignore-daemonsets")),
        "{log}"
    );
    assert_eq!(lines[1], format!("delete node {AGENT}"));
    ok(&["delete", SERVER, "--force"]);
}

/// The real k3s as a two-node cluster (runs where `GATEVM_K3S_BIN` names a k3s binary): a
/// server and an agent that joined it are both Ready; a pod pinned to the agent answers through
/// a NodePort forwarded from the server's host port (kube-proxy on the server, flannel's VXLAN
/// over the cluster network to the agent); deleting the agent removes its node.
#[test]
fn k3s_real_two_node_cluster() {
    const SERVER: &str = "e2e-k3s2s";
    const AGENT: &str = "e2e-k3s2a";
    let test = "k3s_real_two_node_cluster";
    if !enabled(test) || !have_busybox(test) {
        return;
    }
    let Some(k3s) = k3s_bin(test) else { return };
    let _server_guard = Instance(SERVER);
    let _agent_guard = Instance(AGENT);
    let _ = gatevm(&["delete", AGENT, "--force"]);
    let _ = gatevm(&["delete", SERVER, "--force"]);
    let t = tempfile::tempdir().unwrap();
    let archive = t.path().join("busybox.tar");
    docker_archive_tagged(
        &archive,
        "gatevm-test/busybox:1",
        &[tar_of(&busybox_layer())],
        image_config(&[], &["sh"], &["PATH=/bin"], "/"),
    );
    let port = free_port();
    let fwd = format!("{port}:30080");
    let k3s_s = k3s.to_str().unwrap();
    ok(&[
        "start",
        SERVER,
        "--profile",
        "k3s",
        "--k3s",
        k3s_s,
        "--vmm",
        "qemu",
        "-p",
        &fwd,
        "--memory",
        "3072",
        "--no-kubeconfig",
    ]);
    ok(&[
        "start",
        AGENT,
        "--profile",
        "k3s",
        "--k3s",
        k3s_s,
        "--join",
        SERVER,
        "--memory",
        "2048",
    ]);
    wait_for("both nodes to be Ready", Duration::from_secs(900), || {
        let (_, out, _) = kubectl(
            SERVER,
            &[
                "get",
                "nodes",
                "-o",
                "jsonpath={.items[*].status.conditions[?(@.type==\"Ready\")].status}",
            ],
            None,
        );
        out.split_whitespace().filter(|w| *w == "True").count() == 2
    });
    assert_eq!(status(AGENT)["healthy"], true);
    ok(&["image", "import", AGENT, archive.to_str().unwrap()]);
    let pinned = MANIFEST.replace(
        "    spec:\n      containers:",
        &format!(
            "    spec:\n      nodeSelector: {{kubernetes.io/hostname: {AGENT}}}\n      containers:"
        ),
    );
    let (code, _, err) = kubectl(SERVER, &["apply", "-f", "-"], Some(pinned.as_bytes()));
    assert_eq!(code, 0, "{err}");
    let got = read_forward(port, "hello-from-k3s", Duration::from_secs(900));
    assert!(
        got.is_some(),
        "the pod on the agent did not answer through the server's NodePort"
    );
    ok(&["delete", AGENT, "--force"]);
    wait_for(
        "the agent's node to be gone",
        Duration::from_secs(120),
        || {
            let (_, out, _) = kubectl(SERVER, &["get", "nodes", "-o", "name"], None);
            !out.contains(AGENT)
        },
    );
}
