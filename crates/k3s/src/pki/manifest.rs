//! The Kubernetes TLS Secret that hands the gateway's server pair and the CA to the guest.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{base64, invalid_input, names, Pki, PkiError};

/// Namespaces every cluster has; no Namespace object is emitted for them (k3s's deploy
/// controller would otherwise own, and on removal of the manifest delete, a built-in namespace).
const BUILTIN_NAMESPACES: [&str; 4] = ["default", "kube-system", "kube-public", "kube-node-lease"];

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Object<'a> {
    api_version: &'static str,
    kind: &'static str,
    metadata: Metadata<'a>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    secret_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<BTreeMap<&'static str, String>>,
}

#[derive(Serialize)]
struct Metadata<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<&'a str>,
    labels: BTreeMap<&'static str, &'static str>,
}

fn labels() -> BTreeMap<&'static str, &'static str> {
    BTreeMap::from([("app.kubernetes.io/managed-by", "gatevm")])
}

fn to_yaml(object: &Object<'_>) -> Result<String, PkiError> {
    serde_yaml::to_string(object).map_err(|e| PkiError::Serialize {
        what: "TLS Secret manifest",
        reason: crate::error_chain(&e),
    })
}

/// Checks a Secret's namespace (a DNS-1123 label) and name (a DNS-1123 subdomain).
pub fn check_secret_ref(namespace: &str, name: &str) -> Result<(), PkiError> {
    names::dns1123_label(namespace)
        .map_err(|reason| invalid_input("namespace", namespace, reason))?;
    names::dns1123_subdomain(name).map_err(|reason| invalid_input("secret name", name, reason))
}

/// A `kubernetes.io/tls` Secret named `name` in `namespace` holding the server certificate
/// (`tls.crt`), its key (`tls.key`) and the CA certificate (`ca.crt`, for verifying clients), as
/// YAML for k3s's auto-deploy directory. When `namespace` is not a built-in one (`default`,
/// `kube-system`, `kube-public`, `kube-node-lease`) a Namespace object comes first, separated by
/// `---`. The result holds a private key: write it with mode 0600.
///
/// `namespace` must be a DNS-1123 label, `name` a DNS-1123 subdomain.
pub fn tls_secret_manifest(namespace: &str, name: &str, pki: &Pki) -> Result<String, PkiError> {
    check_secret_ref(namespace, name)?;
    let mut documents = Vec::new();
    if !BUILTIN_NAMESPACES.contains(&namespace) {
        documents.push(to_yaml(&Object {
            api_version: "v1",
            kind: "Namespace",
            metadata: Metadata {
                name: namespace,
                namespace: None,
                labels: labels(),
            },
            secret_type: None,
            data: None,
        })?);
    }
    let data = BTreeMap::from([
        ("tls.crt", base64::encode(pki.server_cert.as_bytes())),
        ("tls.key", base64::encode(pki.server_key.as_bytes())),
        ("ca.crt", base64::encode(pki.ca_cert.as_bytes())),
    ]);
    documents.push(to_yaml(&Object {
        api_version: "v1",
        kind: "Secret",
        metadata: Metadata {
            name,
            namespace: Some(namespace),
            labels: labels(),
        },
        secret_type: Some("kubernetes.io/tls"),
        data: Some(data),
    })?);
    Ok(documents.join("---\n"))
}
