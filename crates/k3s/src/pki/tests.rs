//! Tests of the PKI, the Secret manifest and the gateway metadata, checked with x509-parser (an
//! implementation independent of the code under test).

use std::fs::{self, Permissions};
use std::os::unix::fs::PermissionsExt;

use serde::Deserialize;
use tempfile::TempDir;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry;
use x509_parser::prelude::FromDer;

use super::*;

const ALL_FILES: [&str; 6] = [
    CA_CERT_FILE,
    CA_KEY_FILE,
    SERVER_CERT_FILE,
    SERVER_KEY_FILE,
    CLIENT_CERT_FILE,
    CLIENT_KEY_FILE,
];

fn opts() -> PkiOptions {
    PkiOptions::new("demo")
}

fn fresh() -> (TempDir, PathBuf, Pki) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let pki = load_or_create(&dir, &opts()).unwrap();
    (tmp, dir, pki)
}

fn der_of(pem: &str) -> Vec<u8> {
    let (rest, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    assert!(
        rest.iter().all(u8::is_ascii_whitespace),
        "one certificate per PEM"
    );
    assert_eq!(pem.label, "CERTIFICATE");
    pem.contents
}

fn parse(der: &[u8]) -> X509Certificate<'_> {
    let (rest, cert) = X509Certificate::from_der(der).unwrap();
    assert!(rest.is_empty());
    cert
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

fn days(n: i64) -> i64 {
    n * 86_400
}

fn sans_of(cert: &X509Certificate<'_>) -> (Vec<String>, Vec<IpAddr>) {
    let san = cert
        .subject_alternative_name()
        .unwrap()
        .expect("SAN extension");
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    for name in &san.value.general_names {
        match name {
            GeneralName::DNSName(d) => dns.push(d.to_string()),
            GeneralName::IPAddress(bytes) => ips.push(match bytes.len() {
                4 => IpAddr::from(<[u8; 4]>::try_from(*bytes).unwrap()),
                16 => IpAddr::from(<[u8; 16]>::try_from(*bytes).unwrap()),
                n => panic!("IP SAN of {n} bytes"),
            }),
            other => panic!("unexpected SAN {other:?}"),
        }
    }
    (dns, ips)
}

fn common_name_of(cert: &X509Certificate<'_>) -> String {
    cert.subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string()
}

fn no_temp_files(dir: &Path) {
    for entry in fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            !name.contains(".tmp-"),
            "temporary file {name} left in {}",
            dir.display()
        );
    }
}

// ---- creation ----

#[test]
fn creates_full_set_with_modes() {
    let (_tmp, dir, _) = fresh();
    assert_eq!(mode(&dir), 0o700);
    for file in [CA_KEY_FILE, SERVER_KEY_FILE, CLIENT_KEY_FILE] {
        assert_eq!(mode(&dir.join(file)), 0o600, "{file}");
    }
    for file in [CA_CERT_FILE, SERVER_CERT_FILE, CLIENT_CERT_FILE] {
        assert_eq!(mode(&dir.join(file)), 0o644, "{file}");
    }
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut expected: Vec<String> = ALL_FILES.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(names, expected, "exactly the six files, no leftovers");
}

#[test]
fn returned_pki_matches_the_files_and_holds_no_ca_key() {
    let (_tmp, dir, pki) = fresh();
    let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap();
    assert_eq!(pki.ca_cert, read(CA_CERT_FILE));
    assert_eq!(pki.server_cert, read(SERVER_CERT_FILE));
    assert_eq!(pki.server_key, read(SERVER_KEY_FILE));
    assert_eq!(pki.client_cert, read(CLIENT_CERT_FILE));
    assert_eq!(pki.client_key, read(CLIENT_KEY_FILE));
    let ca_key = read(CA_KEY_FILE);
    assert!(ca_key.starts_with("-----BEGIN PRIVATE KEY-----"));
    for field in [
        &pki.ca_cert,
        &pki.server_cert,
        &pki.server_key,
        &pki.client_cert,
        &pki.client_key,
    ] {
        assert_ne!(field, &ca_key);
    }
    assert!(pki.server_key.starts_with("-----BEGIN PRIVATE KEY-----"));
    assert!(pki.client_key.starts_with("-----BEGIN PRIVATE KEY-----"));
    let debug = format!("{pki:?}");
    assert!(!debug.contains("PRIVATE KEY"), "Debug shows a key: {debug}");
}

#[test]
fn certificates_chain_to_the_ca() {
    let (_tmp, _dir, pki) = fresh();
    let ca_der = der_of(&pki.ca_cert);
    let ca = parse(&ca_der);
    ca.verify_signature(None).expect("the CA is self-signed");
    let ca_ski = ca
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
        .expect("CA has a subject key identifier");
    for pem in [&pki.server_cert, &pki.client_cert] {
        let der = der_of(pem);
        let cert = parse(&der);
        cert.verify_signature(Some(ca.public_key()))
            .expect("signed by the CA");
        assert_eq!(cert.issuer().as_raw(), ca.subject().as_raw());
        let aki = cert
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(a) => {
                    a.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => None,
            });
        assert_eq!(aki, Some(ca_ski.clone()));
        // And not by anything else: the leaf's own key does not verify it.
        assert!(cert.verify_signature(Some(cert.public_key())).is_err());
    }
}

#[test]
fn ca_is_a_p256_ca_valid_ten_years() {
    let (_tmp, _dir, pki) = fresh();
    let der = der_of(&pki.ca_cert);
    let ca = parse(&der);
    assert_eq!(common_name_of(&ca), "gatevm demo CA");
    assert!(ca.is_ca());
    let bc = ca.basic_constraints().unwrap().unwrap();
    assert!(bc.critical);
    assert_eq!(bc.value.path_len_constraint, Some(0));
    let ku = ca.key_usage().unwrap().unwrap();
    assert!(ku.value.key_cert_sign() && ku.value.crl_sign());
    let spki = ca.public_key();
    assert_eq!(
        spki.algorithm.algorithm,
        oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
    );
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .unwrap()
        .as_oid()
        .unwrap();
    assert_eq!(curve, oid_registry::OID_EC_P256);
    assert_eq!(
        ca.signature_algorithm.algorithm,
        oid_registry::OID_SIG_ECDSA_WITH_SHA256
    );
    let validity = ca.validity();
    let (nb, na) = (
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    );
    assert!(nb <= now() && nb >= now() - 2 * 3600, "not before: {nb}");
    assert!((na - now() - days(3650)).abs() < 600, "not after: {na}");
}

#[test]
fn leaf_validity_is_two_years() {
    let (_tmp, _dir, pki) = fresh();
    for pem in [&pki.server_cert, &pki.client_cert] {
        let der = der_of(pem);
        let cert = parse(&der);
        let validity = cert.validity();
        assert!(validity.is_valid());
        let (nb, na) = (
            validity.not_before.timestamp(),
            validity.not_after.timestamp(),
        );
        assert!(nb <= now() && nb >= now() - 2 * 3600, "not before: {nb}");
        assert!((na - now() - days(730)).abs() < 600, "not after: {na}");
    }
}

#[test]
fn server_certificate_has_all_sans() {
    let tmp = tempfile::tempdir().unwrap();
    let mut o = opts();
    o.extra_sans = vec![
        "gw.example.com".into(),
        "*.apps.example.com".into(),
        "10.0.0.5".into(),
        "fd00::5".into(),
        "LOCALHOST".into(), // duplicate of a fixed SAN, any case
    ];
    let pki = load_or_create(tmp.path(), &o).unwrap();
    let der = der_of(&pki.server_cert);
    let cert = parse(&der);
    let (dns, ips) = sans_of(&cert);
    assert_eq!(
        dns,
        [
            "localhost",
            "gateway.gatevm.svc",
            "gateway.gatevm.svc.cluster.local",
            "gw.example.com",
            "*.apps.example.com"
        ]
    );
    let want_ips: Vec<IpAddr> = ["127.0.0.1", "192.168.127.2", "10.0.0.5", "fd00::5"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(ips, want_ips);
    assert_eq!(common_name_of(&cert), "gatevm demo gateway");
    // The client certificate names no host.
    let client_der = der_of(&pki.client_cert);
    assert!(parse(&client_der)
        .subject_alternative_name()
        .unwrap()
        .is_none());
}

#[test]
fn extended_key_usages() {
    let (_tmp, _dir, pki) = fresh();
    let server_der = der_of(&pki.server_cert);
    let server = parse(&server_der);
    let eku = server.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && !eku.client_auth && eku.other.is_empty() && !eku.any);
    let client_der = der_of(&pki.client_cert);
    let client = parse(&client_der);
    let eku = client.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth && eku.other.is_empty() && !eku.any);
    assert_eq!(common_name_of(&client), DEFAULT_CLIENT_CN);
    for cert in [&server, &client] {
        assert!(!cert.is_ca());
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign());
    }
    // Distinct random serials.
    let ca_der = der_of(&pki.ca_cert);
    let serials = [
        server.raw_serial(),
        client.raw_serial(),
        parse(&ca_der).raw_serial(),
    ];
    assert!(serials[0] != serials[1] && serials[1] != serials[2] && serials[0] != serials[2]);
}

// ---- loading again ----

#[test]
fn second_call_returns_the_same_pki() {
    let (_tmp, dir, first) = fresh();
    let before: Vec<_> = ALL_FILES
        .iter()
        .map(|f| fs::metadata(dir.join(f)).unwrap().modified().unwrap())
        .collect();
    let second = load_or_create(&dir, &opts()).unwrap();
    assert_eq!(first, second);
    let after: Vec<_> = ALL_FILES
        .iter()
        .map(|f| fs::metadata(dir.join(f)).unwrap().modified().unwrap())
        .collect();
    assert_eq!(before, after, "nothing rewritten");
}

#[test]
fn changed_service_name_reissues_only_the_server_certificate() {
    let (_tmp, dir, first) = fresh();
    let ca_key = fs::read(dir.join(CA_KEY_FILE)).unwrap();
    let mut o = opts();
    o.service_names = vec!["gw.other.svc".into()];
    let second = load_or_create(&dir, &o).unwrap();
    assert_eq!(second.ca_cert, first.ca_cert, "CA kept");
    assert_eq!(
        fs::read(dir.join(CA_KEY_FILE)).unwrap(),
        ca_key,
        "CA key kept"
    );
    assert_eq!(
        (&second.client_cert, &second.client_key),
        (&first.client_cert, &first.client_key)
    );
    assert_ne!(second.server_cert, first.server_cert);
    assert_ne!(
        second.server_key, first.server_key,
        "a new key comes with the new certificate"
    );
    let der = der_of(&second.server_cert);
    let cert = parse(&der);
    let (dns, _) = sans_of(&cert);
    assert_eq!(dns, ["localhost", "gw.other.svc"]);
    let ca_der = der_of(&second.ca_cert);
    cert.verify_signature(Some(parse(&ca_der).public_key()))
        .unwrap();
    assert_eq!(mode(&dir.join(SERVER_KEY_FILE)), 0o600);
    assert_eq!(mode(&dir.join(SERVER_CERT_FILE)), 0o644);
    no_temp_files(&dir);
    // Stable from then on.
    assert_eq!(load_or_create(&dir, &o).unwrap(), second);
}

#[test]
fn same_sans_in_another_order_or_case_do_not_reissue() {
    let (_tmp, dir, first) = fresh();
    let mut o = opts();
    o.service_names.reverse();
    o.extra_sans = vec![
        "Gateway.Gatevm.Svc".into(),
        "127.0.0.1".into(),
        "192.168.127.2".into(),
    ];
    assert_eq!(load_or_create(&dir, &o).unwrap(), first);
}

#[test]
fn changed_client_cn_reissues_only_the_client_certificate() {
    let (_tmp, dir, first) = fresh();
    let mut o = opts();
    o.client_cn = "alice".into();
    let second = load_or_create(&dir, &o).unwrap();
    assert_eq!(second.ca_cert, first.ca_cert);
    assert_eq!(
        (&second.server_cert, &second.server_key),
        (&first.server_cert, &first.server_key)
    );
    assert_ne!(second.client_cert, first.client_cert);
    let der = der_of(&second.client_cert);
    let cert = parse(&der);
    assert_eq!(common_name_of(&cert), "alice");
    let ca_der = der_of(&second.ca_cert);
    cert.verify_signature(Some(parse(&ca_der).public_key()))
        .unwrap();
    assert_eq!(load_or_create(&dir, &o).unwrap(), second);
}

#[test]
fn certificate_signed_by_another_ca_is_reissued() {
    let (_tmp_a, dir_a, a) = fresh();
    let (_tmp_b, dir_b, b) = fresh();
    assert_ne!(a.ca_cert, b.ca_cert);
    for f in [SERVER_CERT_FILE, SERVER_KEY_FILE] {
        fs::copy(dir_b.join(f), dir_a.join(f)).unwrap();
    }
    let again = load_or_create(&dir_a, &opts()).unwrap();
    assert_eq!(again.ca_cert, a.ca_cert);
    assert_ne!(again.server_cert, b.server_cert);
    let ca_der = der_of(&a.ca_cert);
    let der = der_of(&again.server_cert);
    parse(&der)
        .verify_signature(Some(parse(&ca_der).public_key()))
        .unwrap();
}

// ---- damage ----

#[test]
fn corrupt_files_are_errors_naming_them() {
    let (_tmp, dir, _) = fresh();
    for file in ALL_FILES {
        for garbage in [
            "",
            "not pem\n",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        ] {
            let path = dir.join(file);
            let saved = fs::read(&path).unwrap();
            fs::write(&path, garbage).unwrap();
            let err = load_or_create(&dir, &opts()).unwrap_err();
            let message = err.to_string();
            assert!(
                matches!(err, PkiError::Invalid { ref path, .. } if path.ends_with(file)),
                "{file}: {message}"
            );
            assert!(message.contains(&path.display().to_string()), "{message}");
            assert!(!message.contains('\n'), "one line: {message}");
            // Nothing was overwritten while failing.
            assert_eq!(fs::read(&path).unwrap(), garbage.as_bytes());
            fs::write(&path, saved).unwrap();
        }
    }
    fs::write(dir.join(SERVER_CERT_FILE), [0xff, 0xfe, 0x00]).unwrap();
    let err = load_or_create(&dir, &opts()).unwrap_err().to_string();
    assert!(
        err.contains(SERVER_CERT_FILE) && err.contains("not a text"),
        "{err}"
    );
}

#[test]
fn key_of_another_certificate_is_an_error() {
    let (_tmp, dir, _) = fresh();
    fs::copy(dir.join(CLIENT_KEY_FILE), dir.join(SERVER_KEY_FILE)).unwrap();
    let err = load_or_create(&dir, &opts()).unwrap_err().to_string();
    assert!(
        err.contains(SERVER_KEY_FILE) && err.contains("does not belong"),
        "{err}"
    );
    let (_tmp2, dir2, _) = fresh();
    fs::copy(dir2.join(SERVER_KEY_FILE), dir2.join(CA_KEY_FILE)).unwrap();
    let err = load_or_create(&dir2, &opts()).unwrap_err().to_string();
    assert!(
        err.contains(CA_KEY_FILE) && err.contains("does not belong"),
        "{err}"
    );
}

#[test]
fn missing_leaf_file_reissues_only_that_pair() {
    let (_tmp, dir, first) = fresh();
    fs::remove_file(dir.join(SERVER_KEY_FILE)).unwrap();
    let second = load_or_create(&dir, &opts()).unwrap();
    assert_eq!(second.ca_cert, first.ca_cert);
    assert_eq!(
        (&second.client_cert, &second.client_key),
        (&first.client_cert, &first.client_key)
    );
    assert_ne!(second.server_cert, first.server_cert);
    assert_ne!(second.server_key, first.server_key);
    assert_eq!(
        fs::read_to_string(dir.join(SERVER_KEY_FILE)).unwrap(),
        second.server_key
    );

    fs::remove_file(dir.join(CLIENT_CERT_FILE)).unwrap();
    let third = load_or_create(&dir, &opts()).unwrap();
    assert_eq!(
        (&third.ca_cert, &third.server_cert),
        (&second.ca_cert, &second.server_cert)
    );
    assert_ne!(third.client_cert, second.client_cert);
    let ca_der = der_of(&third.ca_cert);
    for pem in [&third.server_cert, &third.client_cert] {
        let der = der_of(pem);
        parse(&der)
            .verify_signature(Some(parse(&ca_der).public_key()))
            .unwrap();
    }
    no_temp_files(&dir);
}

#[test]
fn missing_ca_file_is_an_error_naming_it() {
    for file in [CA_CERT_FILE, CA_KEY_FILE] {
        let (_tmp, dir, _) = fresh();
        fs::remove_file(dir.join(file)).unwrap();
        let err = load_or_create(&dir, &opts()).unwrap_err();
        assert!(
            matches!(err, PkiError::MissingCa { file: f, .. } if f == file),
            "{err}"
        );
        let message = err.to_string();
        assert!(
            message.contains(file) && message.contains(&dir.display().to_string()),
            "{message}"
        );
        // The leaves are left alone.
        assert!(dir.join(SERVER_CERT_FILE).exists());
    }
}

#[test]
fn lone_ca_key_of_an_interrupted_first_run_is_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    fs::create_dir(tmp.path().join("pki")).unwrap();
    let dir = tmp.path().join("pki");
    fs::write(dir.join(CA_KEY_FILE), "half-written").unwrap();
    let pki = load_or_create(&dir, &opts()).unwrap();
    assert_eq!(load_or_create(&dir, &opts()).unwrap(), pki);
}

#[test]
fn ca_of_another_instance_is_an_error() {
    let (_tmp, dir, _) = fresh();
    let err = load_or_create(&dir, &PkiOptions::new("other"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(CA_CERT_FILE) && err.contains("another instance"),
        "{err}"
    );
    assert!(
        err.contains("gatevm demo CA") && err.contains("gatevm other CA"),
        "{err}"
    );
}

#[test]
fn loose_modes_are_tightened() {
    let (_tmp, dir, first) = fresh();
    fs::set_permissions(&dir, Permissions::from_mode(0o755)).unwrap();
    for key in [CA_KEY_FILE, SERVER_KEY_FILE, CLIENT_KEY_FILE] {
        fs::set_permissions(dir.join(key), Permissions::from_mode(0o644)).unwrap();
    }
    assert_eq!(load_or_create(&dir, &opts()).unwrap(), first);
    assert_eq!(mode(&dir), 0o700);
    for key in [CA_KEY_FILE, SERVER_KEY_FILE, CLIENT_KEY_FILE] {
        assert_eq!(mode(&dir.join(key)), 0o600, "{key}");
    }
}

// ---- input checks ----

#[test]
fn bad_options_are_rejected_naming_the_value() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let long = "x".repeat(64);
    let cases: Vec<(PkiOptions, &str)> = vec![
        (PkiOptions::new("Bad_Name"), "Bad_Name"),
        (PkiOptions::new(""), "instance name"),
        (PkiOptions::new(long.clone()), &long),
        (
            PkiOptions {
                service_names: vec!["gateway_svc.local".into()],
                ..opts()
            },
            "gateway_svc.local",
        ),
        (
            PkiOptions {
                extra_sans: vec!["192.168.127.300".into()],
                ..opts()
            },
            "192.168.127.300",
        ),
        (
            PkiOptions {
                extra_sans: vec!["[::1]".into()],
                ..opts()
            },
            "[::1]",
        ),
        (
            PkiOptions {
                extra_sans: vec!["bad name\nsecond line".into()],
                ..opts()
            },
            "bad name\\nsecond line",
        ),
        (
            PkiOptions {
                client_cn: String::new(),
                ..opts()
            },
            "client common name",
        ),
    ];
    for (o, needle) in cases {
        let err = load_or_create(&dir, &o).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, PkiError::InvalidInput { .. }), "{message}");
        assert!(
            message.contains(needle),
            "{message:?} does not name {needle:?}"
        );
        assert!(!message.contains('\n'), "one line: {message:?}");
        assert!(!dir.exists(), "nothing created for bad options");
    }
}

// ---- the Secret manifest ----

fn documents(yaml: &str) -> Vec<serde_yaml::Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .collect()
}

fn decoded(value: &serde_yaml::Value) -> String {
    String::from_utf8(base64::decode(value.as_str().unwrap()).unwrap()).unwrap()
}

#[test]
fn secret_manifest_parses_and_decodes_to_the_pem() {
    let (_tmp, dir, pki) = fresh();
    let yaml = tls_secret_manifest("kube-system", "gatevm-gateway-tls", &pki).unwrap();
    let docs = documents(&yaml);
    assert_eq!(docs.len(), 1, "no Namespace for kube-system:\n{yaml}");
    let secret = &docs[0];
    assert_eq!(secret["apiVersion"], "v1");
    assert_eq!(secret["kind"], "Secret");
    assert_eq!(secret["type"], "kubernetes.io/tls");
    assert_eq!(secret["metadata"]["name"], "gatevm-gateway-tls");
    assert_eq!(secret["metadata"]["namespace"], "kube-system");
    let data = secret["data"].as_mapping().unwrap();
    assert_eq!(data.len(), 3);
    assert_eq!(decoded(&secret["data"]["tls.crt"]), pki.server_cert);
    assert_eq!(decoded(&secret["data"]["tls.key"]), pki.server_key);
    assert_eq!(decoded(&secret["data"]["ca.crt"]), pki.ca_cert);
    // Independent check of the encoding: the decoded tls.crt is the certificate x509-parser reads.
    let der = der_of(&decoded(&secret["data"]["tls.crt"]));
    assert_eq!(common_name_of(&parse(&der)), "gatevm demo gateway");
    // The CA key stays on the host.
    let ca_key = fs::read_to_string(dir.join(CA_KEY_FILE)).unwrap();
    assert!(!yaml.contains(&base64::encode(ca_key.as_bytes())));
}

#[test]
fn secret_manifest_adds_namespace_for_custom_namespace() {
    let (_tmp, _dir, pki) = fresh();
    let yaml = tls_secret_manifest("gatevm", "gateway.tls", &pki).unwrap();
    assert!(yaml.contains("\n---\n"), "{yaml}");
    let docs = documents(&yaml);
    assert_eq!(docs.len(), 2);
    assert_eq!(docs[0]["kind"], "Namespace");
    assert_eq!(docs[0]["apiVersion"], "v1");
    assert_eq!(docs[0]["metadata"]["name"], "gatevm");
    assert!(docs[0]["metadata"].get("namespace").is_none());
    assert_eq!(docs[1]["kind"], "Secret");
    assert_eq!(docs[1]["metadata"]["namespace"], "gatevm");
    assert_eq!(docs[1]["metadata"]["name"], "gateway.tls");
    for ns in ["default", "kube-system"] {
        let docs = documents(&tls_secret_manifest(ns, "x", &pki).unwrap());
        assert_eq!(docs.len(), 1, "{ns}");
        assert_eq!(docs[0]["kind"], "Secret");
    }
}

#[test]
fn secret_manifest_rejects_bad_names() {
    let (_tmp, _dir, pki) = fresh();
    for (namespace, name, needle) in [
        ("Gatevm", "x", "namespace \"Gatevm\""),
        ("a.b", "x", "namespace \"a.b\""),
        ("", "x", "namespace \"\""),
        ("gatevm", "Gateway", "secret name \"Gateway\""),
        ("gatevm", "-x", "secret name \"-x\""),
        ("gatevm", "a..b", "secret name \"a..b\""),
        ("gatevm", "a b", "secret name \"a b\""),
    ] {
        let err = tls_secret_manifest(namespace, name, &pki)
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{err}");
    }
    assert!(tls_secret_manifest("gatevm", &"a".repeat(254), &pki).is_err());
    assert!(tls_secret_manifest("gatevm", &"a".repeat(253), &pki).is_ok());
}

// ---- gateway metadata ----

#[test]
fn gateway_metadata_files_and_modes() {
    let (tmp, _dir, pki) = fresh();
    let config = tmp.path().join("config/gatevm");
    let dir =
        write_gateway_metadata(&config, "demo", Some("https://127.0.0.1:8443"), &pki).unwrap();
    assert_eq!(dir, config.join("gateways/demo"));
    assert_eq!(mode(&dir), 0o700);
    let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap();
    assert_eq!(read(ENDPOINT_FILE), "https://127.0.0.1:8443\n");
    assert_eq!(read(CA_CERT_FILE), pki.ca_cert);
    assert_eq!(read(CLIENT_CERT_FILE), pki.client_cert);
    assert_eq!(read(CLIENT_KEY_FILE), pki.client_key);
    assert_eq!(mode(&dir.join(CLIENT_KEY_FILE)), 0o600);
    for f in [ENDPOINT_FILE, CA_CERT_FILE, CLIENT_CERT_FILE, METADATA_FILE] {
        assert_eq!(mode(&dir.join(f)), 0o644, "{f}");
    }
    let json: serde_json::Value = serde_json::from_str(&read(METADATA_FILE)).unwrap();
    assert_eq!(json["name"], "demo");
    assert_eq!(json["endpoint"], "https://127.0.0.1:8443");
    for (field, file) in [
        ("ca", CA_CERT_FILE),
        ("cert", CLIENT_CERT_FILE),
        ("key", CLIENT_KEY_FILE),
    ] {
        let path = PathBuf::from(json[field].as_str().unwrap());
        assert!(path.is_absolute(), "{field}: {}", path.display());
        assert_eq!(path, dir.join(file));
        assert!(path.is_file());
    }
    let typed: GatewayMetadata = serde_json::from_str(&read(METADATA_FILE)).unwrap();
    assert_eq!(typed.key, dir.join(CLIENT_KEY_FILE));
    assert!(!dir.join(CA_KEY_FILE).exists() && !dir.join(SERVER_KEY_FILE).exists());
    no_temp_files(&dir);
}

#[test]
fn gateway_metadata_is_replaced_and_removed() {
    let (tmp, _dir, pki) = fresh();
    let config = tmp.path().join("cfg");
    let dir = write_gateway_metadata(&config, "demo", Some("https://127.0.0.1:1"), &pki).unwrap();
    write_gateway_metadata(&config, "other", Some("https://127.0.0.1:3"), &pki).unwrap();
    write_gateway_metadata(&config, "demo", Some("https://127.0.0.1:2"), &pki).unwrap();
    assert_eq!(
        fs::read_to_string(dir.join(ENDPOINT_FILE)).unwrap(),
        "https://127.0.0.1:2\n"
    );
    let typed: GatewayMetadata =
        serde_json::from_str(&fs::read_to_string(dir.join(METADATA_FILE)).unwrap()).unwrap();
    assert_eq!(typed.endpoint.as_deref(), Some("https://127.0.0.1:2"));
    // Without a gateway port: endpoint null, no endpoint file.
    write_gateway_metadata(&config, "demo", None, &pki).unwrap();
    assert!(!dir.join(ENDPOINT_FILE).exists());
    let typed: GatewayMetadata =
        serde_json::from_str(&fs::read_to_string(dir.join(METADATA_FILE)).unwrap()).unwrap();
    assert_eq!(typed.endpoint, None);
    assert!(dir.join(CLIENT_KEY_FILE).is_file());
    remove_gateway_metadata(&config, "demo").unwrap();
    assert!(!dir.exists());
    assert!(
        config.join("gateways/other").is_dir(),
        "other gateways stay"
    );
    remove_gateway_metadata(&config, "demo").unwrap();
    remove_gateway_metadata(&tmp.path().join("nowhere"), "demo").unwrap();
}

#[test]
fn gateway_metadata_removal_does_not_follow_symlinks() {
    let (tmp, _dir, _pki) = fresh();
    let config = tmp.path().join("cfg");
    let target = tmp.path().join("precious");
    fs::create_dir_all(&target).unwrap();
    fs::write(target.join("keep"), "x").unwrap();
    fs::create_dir_all(config.join(GATEWAYS_DIR)).unwrap();
    std::os::unix::fs::symlink(&target, config.join(GATEWAYS_DIR).join("demo")).unwrap();
    remove_gateway_metadata(&config, "demo").unwrap();
    assert!(target.join("keep").exists());
    assert!(fs::symlink_metadata(config.join(GATEWAYS_DIR).join("demo")).is_err());
}

#[test]
fn gateway_metadata_rejects_bad_input() {
    let (tmp, _dir, pki) = fresh();
    let config = tmp.path().join("cfg");
    for name in ["../x", "A", "", "a/b", "."] {
        let err =
            write_gateway_metadata(&config, name, Some("https://127.0.0.1:1"), &pki).unwrap_err();
        assert!(
            err.to_string().contains(&format!("gateway name {name:?}")),
            "{err}"
        );
        assert!(remove_gateway_metadata(&config, name).is_err());
    }
    let err =
        write_gateway_metadata(&config, "demo", Some("http://127.0.0.1:1"), &pki).unwrap_err();
    assert!(
        err.to_string()
            .contains("gateway endpoint \"http://127.0.0.1:1\""),
        "{err}"
    );
    assert!(!config.exists(), "nothing written for bad input");
}

#[test]
fn expiring_certificate_is_reissued() {
    let (_tmp, dir, first) = fresh();
    let wanted = opts().check().unwrap();
    let now = OffsetDateTime::now_utc();
    let ca = load_ca(&dir, &wanted, now).unwrap();
    // A client certificate issued long ago, with 10 days left.
    let (cert, key) = issue_leaf(
        Leaf::Client,
        &wanted,
        &ca,
        now - LEAF_VALIDITY + Duration::days(10),
    )
    .unwrap();
    fs::write(dir.join(CLIENT_CERT_FILE), &cert).unwrap();
    fs::write(dir.join(CLIENT_KEY_FILE), &key).unwrap();
    let second = load_or_create(&dir, &opts()).unwrap();
    assert_ne!(second.client_cert, cert);
    assert_eq!(second.server_cert, first.server_cert);
    let der = der_of(&second.client_cert);
    let na = parse(&der).validity().not_after.timestamp();
    assert!((na - now.unix_timestamp() - days(730)).abs() < 600);
}

#[test]
fn expired_ca_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let wanted = opts().check().unwrap();
    write_new_ca(
        tmp.path(),
        &wanted,
        OffsetDateTime::now_utc() - CA_VALIDITY - Duration::days(1),
    )
    .unwrap();
    let err = load_or_create(tmp.path(), &opts()).unwrap_err().to_string();
    assert!(
        err.contains(CA_CERT_FILE) && err.contains("expired on"),
        "{err}"
    );
}

#[test]
fn longest_instance_name_keeps_common_names_within_64_characters() {
    let tmp = tempfile::tempdir().unwrap();
    let instance = "a".repeat(63);
    let pki = load_or_create(tmp.path(), &PkiOptions::new(instance.clone())).unwrap();
    for pem in [&pki.ca_cert, &pki.server_cert] {
        let der = der_of(pem);
        let cn = common_name_of(&parse(&der));
        assert!(cn.len() <= 64 && cn.starts_with("gatevm aaaa"), "{cn}");
    }
    assert_eq!(
        load_or_create(tmp.path(), &PkiOptions::new(instance)).unwrap(),
        pki
    );
}
