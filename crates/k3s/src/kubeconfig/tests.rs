use super::*;
use proptest::prelude::*;
use std::os::unix::fs::symlink;

/// Credentials shaped like k3s's, generated with rcgen: a server CA, a client CA, a client
/// certificate signed by the client CA (bundled with it, as k3s does) and its key in SEC1 PEM
/// (`EC PRIVATE KEY`, as k3s writes it).
struct K3sCreds {
    server_ca: String,
    client_bundle: String,
    client_key: String,
    client_ca: rcgen::Certificate,
    client_ca_key: rcgen::KeyPair,
}

fn ca(cn: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    (p.self_signed(&key).unwrap(), key)
}

fn client_cert(
    issuer: &rcgen::Certificate,
    issuer_key: &rcgen::KeyPair,
) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "system:admin");
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    (p.signed_by(&key, issuer, issuer_key).unwrap(), key)
}

/// One DER element: (contents, rest).
fn der_tlv(b: &[u8]) -> (&[u8], &[u8]) {
    let (len, head) = match b[1] {
        n if n < 0x80 => (usize::from(n), 2),
        0x81 => (usize::from(b[2]), 3),
        0x82 => (usize::from(b[2]) << 8 | usize::from(b[3]), 4),
        n => panic!("length form {n:#x}"),
    };
    (&b[head..head + len], &b[head + len..])
}

/// The SEC1 `ECPrivateKey` inside a PKCS#8 EC key, as PEM.
fn sec1_pem(key: &rcgen::KeyPair) -> String {
    let der = key.serialize_der();
    let (info, _) = der_tlv(&der);
    let (_version, rest) = der_tlv(info);
    let (_alg, rest) = der_tlv(rest);
    let (sec1, _) = der_tlv(rest);
    let b64 = crate::pki::base64::encode(sec1);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN EC PRIVATE KEY-----\n{}\n-----END EC PRIVATE KEY-----\n",
        lines.join("\n")
    )
}

fn new_creds() -> K3sCreds {
    let (server_ca, _) = ca("k3s-server-ca@1700000000");
    let (client_ca, client_ca_key) = ca("k3s-client-ca@1700000000");
    let (client, key) = client_cert(&client_ca, &client_ca_key);
    K3sCreds {
        server_ca: server_ca.pem(),
        client_bundle: format!("{}{}", client.pem(), client_ca.pem()),
        client_key: sec1_pem(&key),
        client_ca,
        client_ca_key,
    }
}

fn b64(s: &str) -> String {
    crate::pki::base64::encode(s.as_bytes())
}

/// A kubeconfig as k3s writes it to /etc/rancher/k3s/k3s.yaml.
fn k3s_yaml_with(ca: &str, cert: &str, key: &str) -> String {
    format!(
        "\
apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: {ca}
    server: https://127.0.0.1:6443
  name: default
contexts:
- context:
    cluster: default
    user: default
  name: default
current-context: default
kind: Config
preferences: {{}}
users:
- name: default
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
"
    )
}

fn creds() -> &'static K3sCreds {
    static CREDS: std::sync::OnceLock<K3sCreds> = std::sync::OnceLock::new();
    CREDS.get_or_init(new_creds)
}

/// A valid k3s kubeconfig (generated once per test run).
fn k3s_yaml() -> &'static str {
    static YAML: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    YAML.get_or_init(|| {
        let c = creds();
        k3s_yaml_with(
            &b64(&c.server_ca),
            &b64(&c.client_bundle),
            &b64(&c.client_key),
        )
    })
}

/// A user's kubeconfig with other clusters, unknown fields, preferences and extensions.
const OTHER_YAML: &str = "\
apiVersion: v1
kind: Config
clusters:
- name: prod
  cluster:
    server: https://prod.example:6443
    certificate-authority: /etc/prod-ca.crt
    extensions:
    - name: client.authentication.k8s.io/exec
      extension:
        audience: prod
  x-unknown: keep me
contexts:
- name: prod
  context:
    cluster: prod
    user: admin
    namespace: web
users:
- name: admin
  user:
    exec:
      apiVersion: client.authentication.k8s.io/v1
      command: get-token
      args: [--cluster, prod]
current-context: prod
preferences:
  colors: true
extensions:
- name: example.com/thing
  extension:
    answer: 42
x-top-level: also kept
";

fn instance(name: &str, port: u16) -> String {
    instance_kubeconfig(k3s_yaml(), name, port).unwrap()
}

fn load(path: &Path) -> Value {
    serde_yaml::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn names(doc: &Value, list: &str) -> Vec<String> {
    doc[list]
        .as_sequence()
        .map(|items| {
            items
                .iter()
                .map(|i| i["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn find<'a>(doc: &'a Value, list: &str, name: &str) -> &'a Value {
    doc[list]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|i| i["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {name} in {list}"))
}

fn write(dir: &Path, file: &str, text: &str) -> PathBuf {
    let p = dir.join(file);
    fs::write(&p, text).unwrap();
    p
}

#[test]
fn instance_rewrites_server_names_and_current_context() {
    let doc: Value = serde_yaml::from_str(&instance("box", 41234)).unwrap();
    for list in ["clusters", "users", "contexts"] {
        assert_eq!(names(&doc, list), ["gatevm-box"], "{list}");
    }
    let cluster = &find(&doc, "clusters", "gatevm-box")["cluster"];
    assert_eq!(cluster["server"].as_str(), Some("https://127.0.0.1:41234"));
    let context = &find(&doc, "contexts", "gatevm-box")["context"];
    assert_eq!(context["cluster"].as_str(), Some("gatevm-box"));
    assert_eq!(context["user"].as_str(), Some("gatevm-box"));
    assert_eq!(doc["current-context"].as_str(), Some("gatevm-box"));
    assert_eq!(doc["kind"].as_str(), Some("Config"));
    assert_eq!(doc["apiVersion"].as_str(), Some("v1"));
}

/// The keys of a mapping, sorted.
fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    k.sort();
    k
}

#[test]
fn a_valid_k3s_kubeconfig_gives_its_credentials_re_encoded() {
    let doc: Value = serde_yaml::from_str(&instance("box", 7000)).unwrap();
    let c = creds();
    let cluster = &find(&doc, "clusters", "gatevm-box")["cluster"];
    assert_eq!(keys(cluster), ["certificate-authority-data", "server"]);
    let decoded = |v: &Value| {
        String::from_utf8(crate::pki::base64::decode(v.as_str().unwrap()).unwrap()).unwrap()
    };
    // Same certificates (rcgen writes the same canonical PEM).
    assert_eq!(
        decoded(&cluster["certificate-authority-data"]),
        c.server_ca.replace("\r", "")
    );
    let user = &find(&doc, "users", "gatevm-box")["user"];
    assert_eq!(keys(user), ["client-certificate-data", "client-key-data"]);
    assert_eq!(
        decoded(&user["client-certificate-data"]),
        c.client_bundle.replace("\r", "")
    );
    assert_eq!(decoded(&user["client-key-data"]), c.client_key);
    // A PKCS#8 key, as other tools write it, is fine too.
    let (client, key) = client_cert(&c.client_ca, &c.client_ca_key);
    let bundle = format!("{}{}", client.pem(), c.client_ca.pem());
    let yaml = k3s_yaml_with(
        &b64(&c.server_ca),
        &b64(&bundle),
        &b64(&key.serialize_pem()),
    );
    instance_kubeconfig(&yaml, "box", 7000).unwrap();
    // A client certificate signed by the cluster's CA, with no bundle behind it, is fine.
    let (server_ca, server_ca_key) = ca("k3s-server-ca");
    let (client, key) = client_cert(&server_ca, &server_ca_key);
    let yaml = k3s_yaml_with(
        &b64(&server_ca.pem()),
        &b64(&client.pem()),
        &b64(&key.serialize_pem()),
    );
    instance_kubeconfig(&yaml, "box", 7000).unwrap();
}

#[test]
fn a_token_user_is_taken_when_it_is_printable() {
    let c = creds();
    let token_yaml = |token: &str| {
        k3s_yaml_with(&b64(&c.server_ca), "x", "x").replace(
            "    client-certificate-data: x\n    client-key-data: x\n",
            &format!("    token: {token}\n"),
        )
    };
    let doc: Value = serde_yaml::from_str(
        &instance_kubeconfig(&token_yaml("K10abc::server:def"), "box", 7000).unwrap(),
    )
    .unwrap();
    let user = &find(&doc, "users", "gatevm-box")["user"];
    assert_eq!(keys(user), ["token"]);
    assert_eq!(user["token"].as_str(), Some("K10abc::server:def"));
    for bad in [
        "\"a b\"",
        "\"a\\u001b[2Jb\"",
        "\"\"",
        &"t".repeat(5000),
        "\"\\n\"",
    ] {
        let err = instance_kubeconfig(&token_yaml(bad), "box", 7000)
            .unwrap_err()
            .to_string();
        assert!(err.contains("token"), "{bad}: {err}");
        assert!(!err.contains('\n') && !err.contains('\u{1b}'), "{err}");
    }
}

/// Fields a hostile guest may add, and where.
const FORBIDDEN: &[(&str, &str)] = &[
    ("user", "exec:\n      apiVersion: client.authentication.k8s.io/v1beta1\n      command: /bin/sh\n      args: [-c, touch /tmp/pwned]"),
    ("user", "auth-provider:\n      name: oidc\n      config: {cmd-path: /bin/sh}"),
    ("user", "username: admin"),
    ("user", "password: secret"),
    ("user", "as: system:admin"),
    ("user", "as-groups: [system:masters]"),
    ("user", "client-certificate: /etc/ssh/ssh_host_key"),
    ("user", "client-key: /root/.ssh/id_rsa"),
    ("user", "tokenFile: /etc/shadow"),
    ("user", "extensions: [{name: x, extension: {a: 1}}]"),
    ("cluster", "proxy-url: http://192.168.127.2:3128"),
    ("cluster", "tls-server-name: evil.example"),
    ("cluster", "insecure-skip-tls-verify: true"),
    ("cluster", "certificate-authority: /etc/ssl/certs/ca.pem"),
    ("cluster", "disable-compression: true"),
    ("cluster", "extensions: [{name: x, extension: {a: 1}}]"),
    ("context", "namespace: kube-system"),
    ("context", "extensions: [{name: x, extension: {a: 1}}]"),
];

#[test]
fn forbidden_fields_from_the_guest_are_dropped() {
    for (entry, field) in FORBIDDEN {
        let anchor = match *entry {
            "user" => "  user:\n",
            "cluster" => "- cluster:\n",
            _ => "- context:\n",
        };
        let yaml = k3s_yaml().replacen(anchor, &format!("{anchor}    {field}\n"), 1);
        assert_ne!(yaml, k3s_yaml());
        let out = instance_kubeconfig(&yaml, "box", 7000).unwrap();
        let key = field.split(':').next().unwrap();
        let doc: Value = serde_yaml::from_str(&out).unwrap();
        for (list, body) in [
            ("clusters", "cluster"),
            ("users", "user"),
            ("contexts", "context"),
        ] {
            let b = &find(&doc, list, "gatevm-box")[body];
            assert!(b.get(key).is_none(), "{field}: kept in {body}:\n{out}");
        }
        assert!(
            !out.contains("/bin/sh") && !out.contains("evil") && !out.contains("/etc/"),
            "{out}"
        );
        // The same output as without the field: nothing else changed either.
        assert_eq!(out, instance("box", 7000), "{field}");
    }
    // The guest's server and top-level extras are not taken either.
    let yaml = k3s_yaml()
        .replace("https://127.0.0.1:6443", "https://evil.example:443")
        .replace(
            "kind: Config\n",
            "kind: Config\nextensions: [{name: x, extension: {exec: 1}}]\n",
        );
    let out = instance_kubeconfig(&yaml, "box", 7000).unwrap();
    assert_eq!(out, instance("box", 7000));
}

#[test]
fn an_exec_plugin_with_a_newline_certificate_is_refused() {
    // The attack of issue 13: "\n" passed the old non-empty check and exec came along.
    let yaml = k3s_yaml()
        .replacen(
            "  user:\n",
            "  user:\n    exec:\n      command: /bin/sh\n",
            1,
        )
        .replace(
            &format!("client-certificate-data: {}", b64(&creds().client_bundle)),
            "client-certificate-data: \"\\n\"",
        )
        .replace(
            &format!("client-key-data: {}", b64(&creds().client_key)),
            "client-key-data: \"\\n\"",
        );
    let err = instance_kubeconfig(&yaml, "box", 7000)
        .unwrap_err()
        .to_string();
    assert!(err.contains("client-certificate-data: empty"), "{err}");
    // Only the exec plugin, no credentials: refused, naming what is missing.
    let c = creds();
    let yaml = k3s_yaml_with(&b64(&c.server_ca), "x", "x").replace(
        "    client-certificate-data: x\n    client-key-data: x\n",
        "    exec:\n      command: /bin/sh\n",
    );
    let err = instance_kubeconfig(&yaml, "box", 7000)
        .unwrap_err()
        .to_string();
    assert!(err.contains("neither client-certificate-data"), "{err}");
}

#[test]
fn bad_credentials_are_refused_naming_the_field() {
    let c = creds();
    let (ca_b, cert_b, key_b) = (b64(&c.server_ca), b64(&c.client_bundle), b64(&c.client_key));
    let other_key = rcgen::KeyPair::generate().unwrap();
    // Another CA with the same name as the client CA: the name matches, the signature does not.
    let (impostor, impostor_key) = ca("k3s-client-ca@1700000000");
    let (forged, forged_key) = client_cert(&impostor, &impostor_key);
    let forged_bundle = format!("{}{}", forged.pem(), c.client_ca.pem());
    let (lone_client, _) = client_cert(&c.client_ca, &c.client_ca_key);
    let not_a_ca = lone_client.pem();
    let huge = "A".repeat(creds::MAX_FIELD + 4);
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "newline CA",
            k3s_yaml_with("\"\\n\"", &cert_b, &key_b),
            "certificate-authority-data: empty",
        ),
        (
            "garbage CA",
            k3s_yaml_with("'!!notbase64'", &cert_b, &key_b),
            "certificate-authority-data: not base64",
        ),
        (
            "CA not PEM",
            k3s_yaml_with(&b64("hello"), &cert_b, &key_b),
            "certificate-authority-data: not PEM",
        ),
        (
            "CA not X.509",
            k3s_yaml_with(
                &b64("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
                &cert_b,
                &key_b,
            ),
            "certificate-authority-data: certificate 0 is not X.509",
        ),
        (
            "CA not a CA",
            k3s_yaml_with(&b64(&not_a_ca), &cert_b, &key_b),
            "certificate-authority-data: certificate 0 is not a CA",
        ),
        (
            "CA with trailing text",
            k3s_yaml_with(&b64(&format!("{}exec: x\n", c.server_ca)), &cert_b, &key_b),
            "certificate-authority-data: not PEM",
        ),
        (
            "CA huge",
            k3s_yaml_with(&huge, &cert_b, &key_b),
            "certificate-authority-data:",
        ),
        (
            "CA a list",
            k3s_yaml_with("[a]", &cert_b, &key_b),
            "certificate-authority-data: a list, not a string",
        ),
        (
            "newline cert",
            k3s_yaml_with(&ca_b, "\"\\n\"", &key_b),
            "client-certificate-data: empty",
        ),
        (
            "garbage cert",
            k3s_yaml_with(&ca_b, "'%%%%'", &key_b),
            "client-certificate-data: not base64",
        ),
        (
            "cert is a key",
            k3s_yaml_with(&ca_b, &key_b, &key_b),
            "client-certificate-data: PEM block 0 is EC PRIVATE KEY",
        ),
        (
            "forged cert",
            k3s_yaml_with(
                &ca_b,
                &b64(&forged_bundle),
                &b64(&forged_key.serialize_pem()),
            ),
            "client-certificate-data: the client certificate is not signed",
        ),
        (
            "cert without its CA",
            k3s_yaml_with(&ca_b, &b64(&lone_client.pem()), &key_b),
            "client-certificate-data: the client certificate is not signed",
        ),
        (
            "newline key",
            k3s_yaml_with(&ca_b, &cert_b, "\"\\n\""),
            "client-key-data: empty",
        ),
        (
            "garbage key",
            k3s_yaml_with(&ca_b, &cert_b, "'@@@@'"),
            "client-key-data: not base64",
        ),
        (
            "key of another cert",
            k3s_yaml_with(&ca_b, &cert_b, &b64(&other_key.serialize_pem())),
            "client-key-data: does not belong to the client certificate",
        ),
        (
            "key is a cert",
            k3s_yaml_with(&ca_b, &cert_b, &cert_b),
            "client-key-data:",
        ),
        (
            "key not DER",
            k3s_yaml_with(
                &ca_b,
                &cert_b,
                &b64("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
            ),
            "client-key-data: not a private key",
        ),
        (
            "cert without key",
            k3s_yaml_with(&ca_b, &cert_b, "x").replace("    client-key-data: x\n", ""),
            "client-certificate-data without client-key-data",
        ),
        (
            "key without cert",
            k3s_yaml_with(&ca_b, "x", &key_b).replace("    client-certificate-data: x\n", ""),
            "client-key-data without client-certificate-data",
        ),
        (
            "no CA",
            k3s_yaml().replace(&format!("    certificate-authority-data: {ca_b}\n"), ""),
            "no certificate-authority-data",
        ),
    ];
    for (what, yaml, want) in cases {
        let err = instance_kubeconfig(&yaml, "box", 7000).unwrap_err();
        assert!(
            matches!(err, KubeconfigError::K3sYaml { .. }),
            "{what}: {err}"
        );
        let err = err.to_string();
        assert!(err.contains(want), "{what}: {err:?} lacks {want:?}");
        assert!(!err.contains('\n'), "{what}: {err}");
        assert!(err.len() < 400, "{what}: {err}");
    }
}

#[test]
fn oversized_input_is_refused_before_parsing() {
    let yaml = format!("{}# {}\n", k3s_yaml(), "x".repeat(MAX_K3S_YAML));
    let err = instance_kubeconfig(&yaml, "box", 7000)
        .unwrap_err()
        .to_string();
    assert!(err.contains("more than 65536"), "{err}");
}

#[test]
fn instance_uses_the_only_context_when_none_is_current() {
    let k3s = k3s_yaml().replace("current-context: default\n", "");
    let out = instance_kubeconfig(&k3s, "box", 7000).unwrap();
    assert!(out.contains("https://127.0.0.1:7000"));
}

#[test]
fn instance_refuses_unusable_k3s_yaml() {
    let cases = [
        ("not yaml", "clusters: [".to_string()),
        (
            "dangling context",
            k3s_yaml().replace("current-context: default", "current-context: other"),
        ),
        (
            "hostile context name",
            k3s_yaml().replace(
                "current-context: default",
                "current-context: \"\\e]52;c;aGk=\\a\\e[2J\"",
            ),
        ),
        ("top level list", "- a\n- b\n".to_string()),
    ];
    for (what, yaml) in cases {
        let err = instance_kubeconfig(&yaml, "box", 7000).unwrap_err();
        assert!(
            matches!(err, KubeconfigError::K3sYaml { .. }),
            "{what}: {err}"
        );
        let err = err.to_string();
        assert!(
            !err.contains('\n') && !err.chars().any(char::is_control),
            "{what}: {err:?}"
        );
    }
    assert!(matches!(
        instance_kubeconfig(k3s_yaml(), "", 7000),
        Err(KubeconfigError::EmptyName)
    ));
    assert!(matches!(
        instance_kubeconfig(k3s_yaml(), "box", 0),
        Err(KubeconfigError::NoPort { .. })
    ));
}

#[test]
fn target_path_takes_first_kubeconfig_path_else_home() {
    let home = Path::new("/home/u");
    assert_eq!(target_path(None, home), home.join(".kube/config"));
    assert_eq!(target_path(Some(""), home), home.join(".kube/config"));
    assert_eq!(target_path(Some(":"), home), home.join(".kube/config"));
    assert_eq!(target_path(Some("/a/one"), home), PathBuf::from("/a/one"));
    assert_eq!(
        target_path(Some("/a/one:/b/two:/c/three"), home),
        PathBuf::from("/a/one")
    );
    assert_eq!(
        target_path(Some("::/b/two:/c"), home),
        PathBuf::from("/b/two")
    );
}

#[test]
fn merge_into_missing_file_creates_it_private() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("home/.kube/config");
    let out = merge(&target, &instance("box", 7000), "box").unwrap();
    assert!(out.created && out.changed && out.current_context_set);
    assert!(!out.replaced);
    assert_eq!(out.backup, None);
    assert_eq!(out.context, "gatevm-box");
    assert_eq!(out.path, target);
    assert_eq!(mode(&target), 0o600);
    assert_eq!(mode(target.parent().unwrap()), 0o700);
    assert_eq!(mode(&tmp.path().join("home")), 0o700);
    let doc = load(&target);
    assert_eq!(doc["current-context"].as_str(), Some("gatevm-box"));
    assert_eq!(names(&doc, "clusters"), ["gatevm-box"]);
    assert!(!with_suffix(&target, BACKUP_SUFFIX).exists());
    assert!(!with_suffix(&target, LOCK_SUFFIX).exists());
    // Nothing but the file itself is left in the directory.
    assert_eq!(fs::read_dir(target.parent().unwrap()).unwrap().count(), 1);
}

#[test]
fn merge_keeps_other_entries_and_unknown_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let target = write(tmp.path(), "config", OTHER_YAML);
    let before: Value = serde_yaml::from_str(OTHER_YAML).unwrap();
    let out = merge(&target, &instance("box", 7000), "box").unwrap();
    assert!(!out.created && out.changed && !out.replaced);
    let doc = load(&target);
    assert_eq!(names(&doc, "clusters"), ["prod", "gatevm-box"]);
    assert_eq!(names(&doc, "users"), ["admin", "gatevm-box"]);
    assert_eq!(names(&doc, "contexts"), ["prod", "gatevm-box"]);
    for list in ["clusters", "users", "contexts"] {
        let name = if list == "users" { "admin" } else { "prod" };
        assert_eq!(find(&doc, list, name), find(&before, list, name), "{list}");
    }
    for key in [
        "preferences",
        "extensions",
        "x-top-level",
        "apiVersion",
        "kind",
    ] {
        assert_eq!(doc[key], before[key], "{key}");
    }
}

#[test]
fn merge_sets_current_context_only_when_unset() {
    let tmp = tempfile::tempdir().unwrap();
    // The user's current context stays.
    let target = write(tmp.path(), "a", OTHER_YAML);
    let out = merge(&target, &instance("box", 7000), "box").unwrap();
    assert!(!out.current_context_set);
    assert_eq!(load(&target)["current-context"].as_str(), Some("prod"));
    // None, empty or null: ours.
    for (file, text) in [
        ("b", OTHER_YAML.replace("current-context: prod\n", "")),
        (
            "c",
            OTHER_YAML.replace("current-context: prod", "current-context: \"\""),
        ),
        (
            "d",
            OTHER_YAML.replace("current-context: prod", "current-context: null"),
        ),
    ] {
        let target = write(tmp.path(), file, &text);
        let out = merge(&target, &instance("box", 7000), "box").unwrap();
        assert!(out.current_context_set, "{file}");
        assert_eq!(
            load(&target)["current-context"].as_str(),
            Some("gatevm-box")
        );
    }
    // A second instance does not take over from the first.
    let target = tmp.path().join("e");
    merge(&target, &instance("one", 7001), "one").unwrap();
    let out = merge(&target, &instance("two", 7002), "two").unwrap();
    assert!(!out.current_context_set);
    assert_eq!(
        load(&target)["current-context"].as_str(),
        Some("gatevm-one")
    );
}

#[test]
fn merge_replaces_earlier_entry_of_the_same_instance() {
    let tmp = tempfile::tempdir().unwrap();
    let target = write(tmp.path(), "config", OTHER_YAML);
    merge(&target, &instance("box", 7000), "box").unwrap();
    merge(&target, &instance("other", 7100), "other").unwrap();
    let out = merge(&target, &instance("box", 7999), "box").unwrap();
    assert!(out.replaced && out.changed);
    let doc = load(&target);
    // Replaced where it stood, not appended again.
    assert_eq!(
        names(&doc, "clusters"),
        ["prod", "gatevm-box", "gatevm-other"]
    );
    assert_eq!(
        names(&doc, "users"),
        ["admin", "gatevm-box", "gatevm-other"]
    );
    assert_eq!(
        names(&doc, "contexts"),
        ["prod", "gatevm-box", "gatevm-other"]
    );
    let cluster = &find(&doc, "clusters", "gatevm-box")["cluster"];
    assert_eq!(cluster["server"].as_str(), Some("https://127.0.0.1:7999"));
}

#[test]
fn merge_collapses_duplicate_entries_of_the_instance() {
    let tmp = tempfile::tempdir().unwrap();
    let dup = "clusters:\n- name: gatevm-box\n  cluster: {server: a}\n- name: x\n  cluster: {}\n- name: gatevm-box\n  cluster: {server: b}\n";
    let target = write(tmp.path(), "config", dup);
    merge(&target, &instance("box", 7000), "box").unwrap();
    assert_eq!(names(&load(&target), "clusters"), ["gatevm-box", "x"]);
}

#[test]
fn merge_writes_backup_of_previous_content() {
    let tmp = tempfile::tempdir().unwrap();
    let target = write(tmp.path(), "config", OTHER_YAML);
    let backup = with_suffix(&target, BACKUP_SUFFIX);
    let out = merge(&target, &instance("box", 7000), "box").unwrap();
    assert_eq!(out.backup.as_deref(), Some(backup.as_path()));
    assert_eq!(fs::read_to_string(&backup).unwrap(), OTHER_YAML);
    assert_eq!(mode(&backup), 0o600);
    // Overwritten by the next change, with the content just before it.
    let between = fs::read_to_string(&target).unwrap();
    merge(&target, &instance("box", 7001), "box").unwrap();
    assert_eq!(fs::read_to_string(&backup).unwrap(), between);
}

#[test]
fn merge_without_change_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("config");
    merge(&target, &instance("box", 7000), "box").unwrap();
    let first = fs::read(&target).unwrap();
    let out = merge(&target, &instance("box", 7000), "box").unwrap();
    assert!(!out.changed && out.replaced && !out.current_context_set);
    assert_eq!(out.backup, None);
    assert!(!with_suffix(&target, BACKUP_SUFFIX).exists());
    assert_eq!(fs::read(&target).unwrap(), first);
}

#[test]
fn merge_keeps_the_file_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let target = write(tmp.path(), "config", OTHER_YAML);
    fs::set_permissions(&target, fs::Permissions::from_mode(0o640)).unwrap();
    merge(&target, &instance("box", 7000), "box").unwrap();
    assert_eq!(mode(&target), 0o640);
    remove(&target, "box").unwrap();
    assert_eq!(mode(&target), 0o640);
}

#[test]
fn merge_keeps_strings_that_yaml_1_1_would_misread_quoted() {
    // kubectl reads YAML 1.1: a bare on, no or 1_000 would become a boolean or a number.
    let tmp = tempfile::tempdir().unwrap();
    let text = "contexts:\n- name: \"on\"\n  context: {cluster: \"no\", user: \"1_000\", namespace: \"y\"}\n";
    let target = write(tmp.path(), "config", text);
    merge(&target, &instance("box", 7000), "box").unwrap();
    let written = fs::read_to_string(&target).unwrap();
    for quoted in [
        "name: \"on\"",
        "cluster: \"no\"",
        "user: \"1_000\"",
        "namespace: \"y\"",
    ] {
        assert!(written.contains(quoted), "{quoted} in:\n{written}");
    }
    assert_eq!(names(&load(&target), "contexts"), ["on", "gatevm-box"]);
}

#[test]
fn merge_writes_through_a_symlink() {
    let tmp = tempfile::tempdir().unwrap();
    let real = write(tmp.path(), "dotfiles-config", OTHER_YAML);
    let link = tmp.path().join("config");
    symlink(&real, &link).unwrap();
    let out = merge(&link, &instance("box", 7000), "box").unwrap();
    assert_eq!(out.path, fs::canonicalize(&real).unwrap());
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(names(&load(&real), "clusters"), ["prod", "gatevm-box"]);
}

#[test]
fn empty_or_comment_only_file_is_an_empty_kubeconfig() {
    let tmp = tempfile::tempdir().unwrap();
    for (file, text) in [("a", ""), ("b", "# nothing yet\n"), ("c", "---\n")] {
        let target = write(tmp.path(), file, text);
        let out = merge(&target, &instance("box", 7000), "box").unwrap();
        assert!(!out.created && out.current_context_set, "{file}");
        assert_eq!(fs::read_to_string(out.backup.unwrap()).unwrap(), text);
        assert_eq!(names(&load(&target), "contexts"), ["gatevm-box"]);
    }
}

const MALFORMED: &[(&str, &str)] = &[
    ("not yaml", "clusters: [\n  - name: x\n"),
    ("tab indentation", "clusters:\n\t- name: x\n"),
    ("top level list", "- clusters\n- users\n"),
    ("top level scalar", "hello\n"),
    ("clusters is a string", "clusters: prod\n"),
    ("entry is a string", "users:\n- admin\n"),
    (
        "entry without name",
        "contexts:\n- context: {cluster: a, user: b}\n",
    ),
    (
        "name not a string",
        "clusters:\n- name: [a]\n  cluster: {}\n",
    ),
    ("current-context is a list", "current-context: [a]\n"),
    (
        "not a Config",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n",
    ),
    ("two documents", "clusters: []\n---\nusers: []\n"),
    ("duplicate keys", "clusters: []\nclusters: []\n"),
];

#[test]
fn malformed_file_is_refused_and_left_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, (what, text)) in MALFORMED.iter().enumerate() {
        let target = write(tmp.path(), &format!("config{i}"), text);
        let err = merge(&target, &instance("box", 7000), "box").unwrap_err();
        assert!(
            matches!(err, KubeconfigError::Malformed { .. }),
            "{what}: {err}"
        );
        let msg = err.to_string();
        assert!(!msg.contains('\n'), "{what}: one line: {msg}");
        assert!(
            msg.contains(&*target.to_string_lossy()),
            "{what}: names the file: {msg}"
        );
        assert_eq!(fs::read(&target).unwrap(), text.as_bytes(), "{what}");
        let err = remove(&target, "box").unwrap_err();
        assert!(
            matches!(err, KubeconfigError::Malformed { .. }),
            "{what}: {err}"
        );
        assert_eq!(fs::read(&target).unwrap(), text.as_bytes(), "{what}");
        assert!(!with_suffix(&target, BACKUP_SUFFIX).exists(), "{what}");
        assert!(!with_suffix(&target, LOCK_SUFFIX).exists(), "{what}");
    }
    // Not UTF-8.
    let target = tmp.path().join("binary");
    fs::write(&target, b"\xff\xfe\x00junk").unwrap();
    assert!(matches!(
        merge(&target, &instance("box", 7000), "box"),
        Err(KubeconfigError::Malformed { .. })
    ));
    assert_eq!(fs::read(&target).unwrap(), b"\xff\xfe\x00junk");
}

#[test]
fn merge_refuses_a_document_without_the_instance() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("config");
    let err = merge(&target, &instance("other", 7000), "box").unwrap_err();
    assert!(matches!(err, KubeconfigError::InstanceYaml { .. }), "{err}");
    assert!(!target.exists());
}

#[test]
fn lock_held_by_another_writer_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let target = write(tmp.path(), "config", OTHER_YAML);
    let lock = with_suffix(&target, LOCK_SUFFIX);
    fs::write(&lock, "").unwrap();
    let err = merge(&target, &instance("box", 7000), "box").unwrap_err();
    assert!(matches!(err, KubeconfigError::Locked { .. }), "{err}");
    assert!(err.to_string().contains(&*lock.to_string_lossy()));
    assert_eq!(fs::read_to_string(&target).unwrap(), OTHER_YAML);
    // The other writer's lock is not ours to remove.
    assert!(lock.exists());
    fs::remove_file(&lock).unwrap();
    merge(&target, &instance("box", 7000), "box").unwrap();
}

#[test]
fn remove_drops_our_entries_and_clears_our_current_context() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("config");
    merge(&target, &instance("box", 7000), "box").unwrap();
    merge(&target, &instance("other", 7100), "other").unwrap();
    assert_eq!(
        load(&target)["current-context"].as_str(),
        Some("gatevm-box")
    );
    assert!(remove(&target, "box").unwrap());
    let doc = load(&target);
    for list in ["clusters", "users", "contexts"] {
        assert_eq!(names(&doc, list), ["gatevm-other"], "{list}");
    }
    assert!(doc.get("current-context").is_none());
    assert_eq!(mode(&target), 0o600);
}

#[test]
fn remove_keeps_other_entries_and_their_current_context() {
    let tmp = tempfile::tempdir().unwrap();
    let target = write(tmp.path(), "config", OTHER_YAML);
    merge(&target, &instance("box", 7000), "box").unwrap();
    let merged = fs::read_to_string(&target).unwrap();
    assert!(remove(&target, "box").unwrap());
    assert_eq!(
        fs::read_to_string(with_suffix(&target, BACKUP_SUFFIX)).unwrap(),
        merged
    );
    let doc = load(&target);
    let before: Value = serde_yaml::from_str(OTHER_YAML).unwrap();
    assert_eq!(doc, before);
}

#[test]
fn remove_on_missing_file_or_entries_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope/config");
    assert!(!remove(&missing, "box").unwrap());
    assert!(!missing.exists() && !missing.parent().unwrap().exists());

    let target = write(tmp.path(), "config", OTHER_YAML);
    assert!(!remove(&target, "box").unwrap());
    assert_eq!(fs::read_to_string(&target).unwrap(), OTHER_YAML);
    assert!(!with_suffix(&target, BACKUP_SUFFIX).exists());
}

#[test]
fn empty_name_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("config");
    assert!(matches!(
        merge(&target, "", ""),
        Err(KubeconfigError::EmptyName)
    ));
    assert!(matches!(
        remove(&target, ""),
        Err(KubeconfigError::EmptyName)
    ));
}

// ---- property: merge then remove gives back an equivalent document ----

/// Missing, null and empty lists are the same; so are a missing, null and empty
/// current-context.
fn normalize(doc: Value) -> Value {
    let Value::Mapping(mut m) = doc else {
        return doc;
    };
    for (list, _) in LISTS {
        if matches!(m.get(list), None | Some(Value::Null))
            || m.get(list)
                .and_then(Value::as_sequence)
                .is_some_and(Vec::is_empty)
        {
            m.remove(list);
        }
    }
    if matches!(m.get("current-context"), Some(Value::Null))
        || m.get("current-context").and_then(Value::as_str) == Some("")
    {
        m.remove("current-context");
    }
    Value::Mapping(m)
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        "\\PC{0,12}".prop_map(Value::String),
        any::<i64>().prop_map(|n| Value::Number(n.into())),
        any::<bool>().prop_map(Value::Bool),
        Just(Value::Null),
    ]
}

fn field_value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(2, 12, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Sequence),
            prop::collection::btree_map("[a-z][a-z0-9-]{0,6}", inner, 0..3).prop_map(|m| {
                Value::Mapping(m.into_iter().map(|(k, v)| (Value::String(k), v)).collect())
            }),
        ]
    })
}

fn extra_fields() -> impl Strategy<Value = Vec<(String, Value)>> {
    prop::collection::btree_map("x-[a-z]{1,6}", field_value(), 0..3)
        .prop_map(|m| m.into_iter().collect())
}

/// Entry names never collide with the instance under test (`gatevm-box`), but may be other
/// gatevm instances.
fn entry_names() -> impl Strategy<Value = Vec<String>> {
    prop::collection::btree_set(
        prop_oneof!["[a-z][a-z0-9.@-]{0,10}", "gatevm-[a-z]{1,4}"],
        0..4,
    )
    .prop_map(|s| s.into_iter().filter(|n| n != "gatevm-box").collect())
}

fn other_document() -> impl Strategy<Value = Value> {
    (
        entry_names(),
        entry_names(),
        entry_names(),
        extra_fields(),
        extra_fields(),
        prop::option::of(any::<prop::sample::Index>()),
        prop::option::of(any::<bool>()),
        any::<bool>(),
    )
        .prop_map(
            |(clusters, users, contexts, entry_extra, top_extra, current, colors, header)| {
                let entry = |name: &str, key: &str, body: Mapping| -> Value {
                    let mut m = Mapping::new();
                    m.insert("name".into(), name.into());
                    m.insert(key.into(), Value::Mapping(body));
                    for (k, v) in &entry_extra {
                        m.insert(k.as_str().into(), v.clone());
                    }
                    Value::Mapping(m)
                };
                let mut doc = Mapping::new();
                if header {
                    doc.insert("apiVersion".into(), "v1".into());
                    doc.insert("kind".into(), "Config".into());
                }
                let cl: Vec<Value> = clusters
                    .iter()
                    .map(|n| {
                        let mut b = Mapping::new();
                        b.insert("server".into(), format!("https://{n}:6443").into());
                        entry(n, "cluster", b)
                    })
                    .collect();
                let us: Vec<Value> = users
                    .iter()
                    .map(|n| {
                        let mut b = Mapping::new();
                        b.insert("token".into(), format!("t-{n}").into());
                        entry(n, "user", b)
                    })
                    .collect();
                let cx: Vec<Value> = contexts
                    .iter()
                    .map(|n| {
                        let mut b = Mapping::new();
                        b.insert("cluster".into(), n.as_str().into());
                        b.insert("user".into(), n.as_str().into());
                        entry(n, "context", b)
                    })
                    .collect();
                doc.insert("clusters".into(), Value::Sequence(cl));
                doc.insert("users".into(), Value::Sequence(us));
                doc.insert("contexts".into(), Value::Sequence(cx));
                if let (Some(i), false) = (current, contexts.is_empty()) {
                    doc.insert(
                        "current-context".into(),
                        contexts[i.index(contexts.len())].as_str().into(),
                    );
                }
                if let Some(colors) = colors {
                    let mut p = Mapping::new();
                    p.insert("colors".into(), colors.into());
                    doc.insert("preferences".into(), Value::Mapping(p));
                }
                for (k, v) in top_extra {
                    doc.insert(k.into(), v);
                }
                Value::Mapping(doc)
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn merge_then_remove_gives_back_an_equivalent_document(doc in other_document()) {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("config");
        fs::write(&target, serde_yaml::to_string(&doc).unwrap()).unwrap();

        let out = merge(&target, &instance("box", 7000), "box").unwrap();
        prop_assert!(out.changed);
        let merged = load(&target);
        for list in ["clusters", "users", "contexts"] {
            prop_assert!(names(&merged, list).contains(&"gatevm-box".to_string()));
        }

        prop_assert!(remove(&target, "box").unwrap());
        prop_assert_eq!(normalize(load(&target)), normalize(doc));
        prop_assert!(!with_suffix(&target, LOCK_SUFFIX).exists());
    }
}
