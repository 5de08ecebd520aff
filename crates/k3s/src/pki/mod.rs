//! The gateway's PKI, generated and kept on the host, one set per instance.
//!
//! The k3s profile runs a gateway service in the guest that clients reach over mTLS on a
//! forwarded port. The host creates the credentials before the guest boots: a CA, a server
//! certificate for the gateway and a client certificate, all ECDSA P-256.
//!
//! ```text
//! DIR/            0700
//!   ca.crt        0644  CA "gatevm NAME CA", 10 years, pathlen 0 (NAME shortened if the CN
//!                       would pass 64 characters)
//!   ca.key        0600  never leaves the host (not in Pki, not in any manifest)
//!   server.crt    0644  CN "gatevm NAME gateway", serverAuth, 2 years, SANs: localhost,
//!                       127.0.0.1, 192.168.127.2, the service names, the extra SANs
//!   server.key    0600
//!   client.crt    0644  CN from PkiOptions::client_cn, clientAuth, 2 years
//!   client.key    0600
//! ```
//!
//! [`load_or_create`] rules:
//! - Nothing there (no `ca.crt` and no server or client file): a new set is created. `ca.crt` is
//!   the CA's commit point: it is written after `ca.key`, so a lone `ca.key` left by an interrupted
//!   first run is overwritten.
//! - The CA is never replaced: `ca.crt` or `ca.key` missing while other files exist is an error
//!   naming the file (clients may already trust that CA; the user restores it or removes `DIR`).
//! - A server or client pair with a file missing is re-issued, pair only, signed by the kept CA
//!   (the remaining file of the pair is replaced without being read).
//!   A re-issue removes the old certificate first, then writes the new key, then the new
//!   certificate, so an interrupted re-issue also looks like "certificate missing" next time.
//! - A file that is present but unreadable, not PEM, not a certificate or key, or a key that does
//!   not belong to its certificate is an error naming the file: damage is reported, not papered
//!   over.
//! - A valid pair is re-issued when it no longer fits: the server's SANs differ from what the
//!   options ask for (as a set), the client's CN differs, it lacks its extended key usage, it was
//!   signed by another CA, or it expires within [`RENEW_BEFORE`].
//! - Keys found with group or other permission bits are set back to 0600; `DIR` to 0700.
//!
//! Callers serialize calls for one instance (the instance lock); files are replaced atomically
//! (temporary file + rename), so readers never see a torn file.
//!
//! Also here: the Kubernetes TLS Secret handing the server pair and CA to the guest
//! ([`tls_secret_manifest`]) and the per-gateway metadata clients read
//! ([`write_gateway_metadata`]).

pub(crate) mod base64;
mod fsutil;
mod gateway;
mod manifest;
mod names;

use std::collections::BTreeSet;
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyIdMethod, KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};

use crate::cert::{self, CertInfo};
pub use names::InputError;
pub(crate) use names::San;

pub use gateway::{
    config_dir, remove_gateway_metadata, write_gateway_metadata, GatewayMetadata, ENDPOINT_FILE,
    GATEWAYS_DIR, METADATA_FILE,
};
pub use manifest::{check_secret_ref, tls_secret_manifest};

/// The guest's address on the user-mode network; always a SAN of the server certificate.
pub const GUEST_ADDRESS: IpAddr = IpAddr::V4(gatevm_abi::net::GUEST_IP);
/// The service names [`PkiOptions::new`] puts in the server certificate.
pub const DEFAULT_SERVICE_NAMES: [&str; 2] =
    ["gateway.gatevm.svc", "gateway.gatevm.svc.cluster.local"];
/// The client certificate's CN unless configured otherwise.
pub const DEFAULT_CLIENT_CN: &str = "gatevm-client";

/// The CA certificate, in the PKI directory and in a gateway's metadata directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// The CA's private key (PKI directory only).
pub const CA_KEY_FILE: &str = "ca.key";
/// The gateway's server certificate.
pub const SERVER_CERT_FILE: &str = "server.crt";
/// The gateway's server key.
pub const SERVER_KEY_FILE: &str = "server.key";
/// The client certificate, in the PKI directory and in a gateway's metadata directory.
pub const CLIENT_CERT_FILE: &str = "client.crt";
/// The client key, in the PKI directory and in a gateway's metadata directory.
pub const CLIENT_KEY_FILE: &str = "client.key";

/// How long a new CA is valid (10 years).
pub const CA_VALIDITY: Duration = Duration::days(3650);
/// How long a new server or client certificate is valid (2 years; never past the CA's end).
pub const LEAF_VALIDITY: Duration = Duration::days(730);
/// A server or client certificate closer than this to its end is re-issued.
pub const RENEW_BEFORE: Duration = Duration::days(30);
/// New certificates start this long before "now", so a guest clock slightly behind the host's
/// does not reject them.
const BACKDATE: Duration = Duration::hours(1);

/// What the PKI of one instance should contain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PkiOptions {
    /// The instance name (DNS-1123 label); part of the CA's and server's common names.
    pub instance: String,
    /// In-cluster DNS names of the gateway service, added to the server certificate.
    pub service_names: Vec<String>,
    /// More server SANs from the user: DNS names (a leading `*.` wildcard is allowed) or IP
    /// addresses.
    pub extra_sans: Vec<String>,
    /// The client certificate's common name.
    pub client_cn: String,
}

impl PkiOptions {
    /// Options for `instance` with the default service names ([`DEFAULT_SERVICE_NAMES`]), no
    /// extra SANs and the default client CN ([`DEFAULT_CLIENT_CN`]).
    pub fn new(instance: impl Into<String>) -> Self {
        PkiOptions {
            instance: instance.into(),
            service_names: DEFAULT_SERVICE_NAMES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            extra_sans: Vec::new(),
            client_cn: DEFAULT_CLIENT_CN.to_string(),
        }
    }

    /// Checks every value (instance name, service names, SANs, client CN); the error names the
    /// first bad one.
    pub fn validate(&self) -> Result<(), PkiError> {
        self.check().map(|_| ())
    }

    /// Checks every value and normalizes: the server's SANs in certificate order (fixed ones
    /// first), lowercase, without duplicates. Fails on the first bad value, naming it.
    fn check(&self) -> Result<Wanted, PkiError> {
        names::dns1123_label(&self.instance)
            .map_err(|reason| invalid_input("instance name", &self.instance, reason))?;
        names::common_name(&self.client_cn)
            .map_err(|reason| invalid_input("client common name", &self.client_cn, reason))?;
        let mut sans = vec![
            San::Dns("localhost".into()),
            San::Ip(Ipv4Addr::LOCALHOST.into()),
        ];
        sans.push(San::Ip(GUEST_ADDRESS));
        let given = self
            .service_names
            .iter()
            .map(|v| ("service name", v))
            .chain(self.extra_sans.iter().map(|v| ("SAN", v)));
        for (what, value) in given {
            let san = names::san(value).map_err(|reason| invalid_input(what, value, reason))?;
            if !sans.contains(&san) {
                sans.push(san);
            }
        }
        Ok(Wanted {
            instance: self.instance.clone(),
            sans,
            client_cn: self.client_cn.clone(),
        })
    }
}

/// The credentials of one instance, PEM. The CA's key is not here: it stays in the PKI
/// directory.
#[derive(Clone, PartialEq, Eq)]
pub struct Pki {
    /// The CA certificate.
    pub ca_cert: String,
    /// The gateway's server certificate.
    pub server_cert: String,
    /// The gateway's server key (PKCS#8).
    pub server_key: String,
    /// The client certificate.
    pub client_cert: String,
    /// The client key (PKCS#8).
    pub client_key: String,
}

impl fmt::Debug for Pki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pki")
            .field("ca_cert", &self.ca_cert)
            .field("server_cert", &self.server_cert)
            .field("server_key", &"<redacted>")
            .field("client_cert", &self.client_cert)
            .field("client_key", &"<redacted>")
            .finish()
    }
}

/// Why the PKI, its manifest or the gateway metadata could not be produced.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// A name, SAN, CN or endpoint given by the caller is not acceptable.
    #[error("invalid {what} {value:?}")]
    InvalidInput {
        /// What the value is (instance name, SAN, namespace, ...).
        what: &'static str,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        #[source]
        reason: InputError,
    },
    /// A file or directory is there but unusable.
    #[error("{} {reason}", path.display())]
    Invalid {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The CA of an existing PKI is incomplete.
    #[error(
        "the PKI in {} is incomplete: {file} is missing; the CA cannot be re-created without \
         invalidating what it signed: restore the file, or remove the directory to start over",
        dir.display()
    )]
    MissingCa {
        /// The PKI directory.
        dir: PathBuf,
        /// The missing file.
        file: &'static str,
    },
    /// A filesystem operation failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// rcgen could not generate a key or certificate.
    #[error("cannot generate the {what}")]
    Generate {
        /// Which key or certificate.
        what: &'static str,
        /// The error.
        source: rcgen::Error,
    },
    /// A manifest or metadata document could not be serialized.
    #[error("cannot serialize the {what}: {reason}")]
    Serialize {
        /// Which document.
        what: &'static str,
        /// The serializer's message.
        reason: String,
    },
}

pub(crate) fn invalid_input(what: &'static str, value: &str, reason: InputError) -> PkiError {
    PkiError::InvalidInput {
        what,
        value: value.to_string(),
        reason,
    }
}

fn invalid(path: &Path, reason: String) -> PkiError {
    PkiError::Invalid {
        path: path.to_path_buf(),
        reason,
    }
}

fn generate_error(what: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |source| PkiError::Generate { what, source }
}

/// The checked and normalized options.
struct Wanted {
    instance: String,
    /// The server's SANs in certificate order.
    sans: Vec<San>,
    client_cn: String,
}

/// The kept CA, ready to sign.
struct Ca {
    cert_pem: String,
    key: KeyPair,
    info: CertInfo,
    /// `subject_key_id` of `info`.
    key_id: Vec<u8>,
    /// A certificate object carrying the CA's name and key identifier, for rcgen's `signed_by`
    /// (rcgen 0.13 cannot load a certificate without its `x509-parser` feature).
    issuer: rcgen::Certificate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leaf {
    Server,
    Client,
}

impl Leaf {
    fn cert_file(self) -> &'static str {
        match self {
            Leaf::Server => SERVER_CERT_FILE,
            Leaf::Client => CLIENT_CERT_FILE,
        }
    }

    fn key_file(self) -> &'static str {
        match self {
            Leaf::Server => SERVER_KEY_FILE,
            Leaf::Client => CLIENT_KEY_FILE,
        }
    }

    fn what(self) -> &'static str {
        match self {
            Leaf::Server => "server certificate",
            Leaf::Client => "client certificate",
        }
    }

    fn eku(self) -> (ExtendedKeyUsagePurpose, &'static [u8], &'static str) {
        match self {
            Leaf::Server => (
                ExtendedKeyUsagePurpose::ServerAuth,
                cert::OID_SERVER_AUTH,
                "serverAuth",
            ),
            Leaf::Client => (
                ExtendedKeyUsagePurpose::ClientAuth,
                cert::OID_CLIENT_AUTH,
                "clientAuth",
            ),
        }
    }
}

/// Loads the PKI from `dir` or creates it (see the [module documentation](self) for the rules:
/// modes, atomic writes, what is kept, what is re-issued and what is an error).
pub fn load_or_create(dir: &Path, opts: &PkiOptions) -> Result<Pki, PkiError> {
    let wanted = opts.check()?;
    let now = OffsetDateTime::now_utc();
    let leaf_files = [
        SERVER_CERT_FILE,
        SERVER_KEY_FILE,
        CLIENT_CERT_FILE,
        CLIENT_KEY_FILE,
    ];
    let fresh = !fsutil::exists(&dir.join(CA_CERT_FILE))
        && !leaf_files.iter().any(|f| fsutil::exists(&dir.join(f)));
    fsutil::ensure_private_dir(dir)?;
    if fresh {
        tracing::info!(instance = %wanted.instance, dir = %dir.display(), "creating the gateway CA");
        write_new_ca(dir, &wanted, now)?;
    }
    let ca = load_ca(dir, &wanted, now)?;
    let (server_cert, server_key) = ensure_leaf(dir, Leaf::Server, &wanted, &ca, now)?;
    let (client_cert, client_key) = ensure_leaf(dir, Leaf::Client, &wanted, &ca, now)?;
    Ok(Pki {
        ca_cert: ca.cert_pem,
        server_cert,
        server_key,
        client_cert,
        client_key,
    })
}

/// `gatevm INSTANCE SUFFIX`, the instance name shortened as needed to keep within the 64
/// characters X.509 allows a common name (instance names are ASCII).
fn common_name(instance: &str, suffix: &str) -> String {
    let room = names::MAX_COMMON_NAME - "gatevm ".len() - suffix.len() - 1;
    let instance = instance.get(..room).unwrap_or(instance);
    format!("gatevm {instance} {suffix}")
}

fn ca_common_name(instance: &str) -> String {
    common_name(instance, "CA")
}

fn ca_params(
    instance: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    key_identifier_method: KeyIdMethod,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, ca_common_name(instance));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial()?);
    params.key_identifier_method = key_identifier_method;
    Ok(params)
}

/// A random positive 128-bit serial (rcgen's default derives it from the public key, which would
/// repeat if a key were ever certified twice).
fn random_serial() -> Result<SerialNumber, PkiError> {
    let path = Path::new("/dev/urandom");
    let mut bytes = [0u8; 16];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|source| PkiError::Io {
            action: "read",
            path: path.to_path_buf(),
            source,
        })?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn write_new_ca(dir: &Path, wanted: &Wanted, now: OffsetDateTime) -> Result<(), PkiError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate_error("CA key"))?;
    let cert = ca_params(
        &wanted.instance,
        now - BACKDATE,
        now + CA_VALIDITY,
        KeyIdMethod::Sha256,
    )?
    .self_signed(&key)
    .map_err(generate_error("CA certificate"))?;
    // ca.crt last: it marks the CA as complete.
    fsutil::write_atomic(
        &dir.join(CA_KEY_FILE),
        key.serialize_pem().as_bytes(),
        fsutil::KEY_MODE,
    )?;
    fsutil::write_atomic(
        &dir.join(CA_CERT_FILE),
        cert.pem().as_bytes(),
        fsutil::PUBLIC_MODE,
    )
}

fn read_certificate(path: &Path, text: &str, hint: &str) -> Result<CertInfo, PkiError> {
    let der = cert::pem_decode(text, "CERTIFICATE").map_err(|e| {
        invalid(
            path,
            format!(
                "is not a PEM certificate ({}); {hint}",
                crate::error_chain(&e)
            ),
        )
    })?;
    cert::parse_certificate(&der).map_err(|e| {
        invalid(
            path,
            format!(
                "is not a valid certificate ({}); {hint}",
                crate::error_chain(&e)
            ),
        )
    })
}

fn read_key(path: &Path, text: &str, hint: &str) -> Result<KeyPair, PkiError> {
    let key = KeyPair::from_pem(text).map_err(|e| {
        invalid(
            path,
            format!(
                "is not a PKCS#8 PEM private key ({}); {hint}",
                crate::error_chain(&e)
            ),
        )
    })?;
    if fsutil::tighten_mode(path, fsutil::KEY_MODE)? {
        tracing::warn!(path = %path.display(), "private key was readable by others; mode set to 0600");
    }
    Ok(key)
}

fn load_ca(dir: &Path, wanted: &Wanted, now: OffsetDateTime) -> Result<Ca, PkiError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    let missing = |file| PkiError::MissingCa {
        dir: dir.to_path_buf(),
        file,
    };
    let cert_pem = fsutil::read_optional(&cert_path)?.ok_or_else(|| missing(CA_CERT_FILE))?;
    let key_pem = fsutil::read_optional(&key_path)?.ok_or_else(|| missing(CA_KEY_FILE))?;
    let hint = format!(
        "restore it, or remove {} to create a new PKI (clients must then fetch the new {CA_CERT_FILE})",
        dir.display()
    );
    let info = read_certificate(&cert_path, &cert_pem, &hint)?;
    let key = read_key(&key_path, &key_pem, &hint)?;
    if !info.is_ca {
        return Err(invalid(
            &cert_path,
            format!("is not a CA certificate; {hint}"),
        ));
    }
    if key.public_key_raw() != info.public_key.as_slice() {
        return Err(invalid(
            &key_path,
            format!("does not belong to {CA_CERT_FILE} (another public key); {hint}"),
        ));
    }
    let key_id = info
        .subject_key_id
        .clone()
        .ok_or_else(|| invalid(&cert_path, format!("has no subject key identifier; {hint}")))?;
    if info.not_after <= now {
        return Err(invalid(
            &cert_path,
            format!("expired on {}; {hint}", info.not_after.date()),
        ));
    }
    if info.not_after - now < RENEW_BEFORE {
        tracing::warn!(
            instance = %wanted.instance,
            path = %cert_path.display(),
            "the gateway CA expires on {}", info.not_after.date()
        );
    }
    // Rebuild the CA as rcgen's issuer: same name, same key, same key identifier.
    let issuer = ca_params(
        &wanted.instance,
        info.not_before,
        info.not_after,
        KeyIdMethod::PreSpecified(key_id.clone()),
    )?
    .self_signed(&key)
    .map_err(generate_error("CA issuer"))?;
    let rebuilt = cert::parse_certificate(issuer.der()).map_err(|e| {
        invalid(
            &cert_path,
            format!("cannot be rebuilt for signing: {}", crate::error_chain(&e)),
        )
    })?;
    if rebuilt.subject != info.subject {
        return Err(invalid(
            &cert_path,
            format!(
                "belongs to another instance: its CN is {:?}, instance {:?} expects {:?}; {hint}",
                info.common_name.as_deref().unwrap_or("?"),
                wanted.instance,
                ca_common_name(&wanted.instance)
            ),
        ));
    }
    Ok(Ca {
        cert_pem,
        key,
        info,
        key_id,
        issuer,
    })
}

fn san_list(sans: impl IntoIterator<Item = impl fmt::Display>) -> String {
    sans.into_iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why a valid pair on disk no longer fits, if it does not.
fn stale_reason(
    leaf: Leaf,
    info: &CertInfo,
    wanted: &Wanted,
    ca: &Ca,
    now: OffsetDateTime,
) -> Option<String> {
    if info.issuer != ca.info.subject || info.authority_key_id.as_ref() != Some(&ca.key_id) {
        return Some("it was signed by another CA".into());
    }
    if info.not_after - now < RENEW_BEFORE {
        return Some(format!("it expires on {}", info.not_after.date()));
    }
    let (_, oid, eku_name) = leaf.eku();
    if !info.ext_key_usages.iter().any(|u| u == oid) {
        return Some(format!("it lacks the {eku_name} extended key usage"));
    }
    match leaf {
        Leaf::Server => {
            let want: BTreeSet<San> = wanted.sans.iter().cloned().collect();
            (info.sans != want).then(|| {
                format!(
                    "its SANs are [{}], wanted [{}]",
                    san_list(&info.sans),
                    san_list(&wanted.sans)
                )
            })
        }
        Leaf::Client => {
            (info.common_name.as_deref() != Some(wanted.client_cn.as_str())).then(|| {
                format!(
                    "its CN is {:?}, wanted {:?}",
                    info.common_name.as_deref().unwrap_or(""),
                    wanted.client_cn
                )
            })
        }
    }
}

/// Returns the pair for `leaf` from `dir`, issuing a new one when it is missing or stale.
fn ensure_leaf(
    dir: &Path,
    leaf: Leaf,
    wanted: &Wanted,
    ca: &Ca,
    now: OffsetDateTime,
) -> Result<(String, String), PkiError> {
    let cert_path = dir.join(leaf.cert_file());
    let key_path = dir.join(leaf.key_file());
    let reason = match (
        fsutil::read_optional(&cert_path)?,
        fsutil::read_optional(&key_path)?,
    ) {
        (Some(cert_pem), Some(key_pem)) => {
            let hint = format!(
                "remove {} and {} to have a new pair issued",
                leaf.cert_file(),
                leaf.key_file()
            );
            let info = read_certificate(&cert_path, &cert_pem, &hint)?;
            let key = read_key(&key_path, &key_pem, &hint)?;
            if key.public_key_raw() != info.public_key.as_slice() {
                return Err(invalid(
                    &key_path,
                    format!(
                        "does not belong to {} (another public key); {hint}",
                        leaf.cert_file()
                    ),
                ));
            }
            match stale_reason(leaf, &info, wanted, ca, now) {
                None => return Ok((cert_pem, key_pem)),
                Some(reason) => reason,
            }
        }
        (None, None) => "there is none".to_string(),
        (Some(_), None) => format!("{} is missing", leaf.key_file()),
        (None, Some(_)) => format!("{} is missing", leaf.cert_file()),
    };
    tracing::info!(instance = %wanted.instance, "issuing a new {}: {reason}", leaf.what());
    let (cert_pem, key_pem) = issue_leaf(leaf, wanted, ca, now)?;
    // Certificate out first, certificate in last: any interruption leaves "certificate missing",
    // which the next call repairs, never a key that does not match its certificate.
    match std::fs::remove_file(&cert_path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(PkiError::Io {
                action: "remove",
                path: cert_path,
                source,
            })
        }
    }
    fsutil::write_atomic(&key_path, key_pem.as_bytes(), fsutil::KEY_MODE)?;
    fsutil::write_atomic(&cert_path, cert_pem.as_bytes(), fsutil::PUBLIC_MODE)?;
    Ok((cert_pem, key_pem))
}

fn issue_leaf(
    leaf: Leaf,
    wanted: &Wanted,
    ca: &Ca,
    now: OffsetDateTime,
) -> Result<(String, String), PkiError> {
    let what = leaf.what();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate_error(what))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let cn = match leaf {
        Leaf::Server => common_name(&wanted.instance, "gateway"),
        Leaf::Client => wanted.client_cn.clone(),
    };
    params.distinguished_name.push(DnType::CommonName, cn);
    if leaf == Leaf::Server {
        params.subject_alt_names = wanted
            .sans
            .iter()
            .map(|san| {
                Ok(match san {
                    San::Dns(name) => SanType::DnsName(name.as_str().try_into()?),
                    San::Ip(ip) => SanType::IpAddress(*ip),
                })
            })
            .collect::<Result<_, rcgen::Error>>()
            .map_err(generate_error(what))?;
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![leaf.eku().0];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - BACKDATE;
    params.not_after = (now + LEAF_VALIDITY).min(ca.info.not_after);
    params.serial_number = Some(random_serial()?);
    let cert = params
        .signed_by(&key, &ca.issuer, &ca.key)
        .map_err(generate_error(what))?;
    Ok((cert.pem(), key.serialize_pem()))
}

#[cfg(test)]
mod tests;
