//! Checks of the credentials embedded in k3s's kubeconfig, which comes from the guest and is
//! untrusted input.
//!
//! Each credential is decoded and checked before it goes into a kubeconfig on the host, and what
//! is written is re-encoded from the checked DER (canonical PEM, one line of base64), so no byte
//! the checks did not look at survives:
//!
//! - `certificate-authority-data`: base64 of PEM `CERTIFICATE` blocks (at most
//!   [`MAX_CERTS`], nothing else between them), each an X.509 certificate with basicConstraints
//!   `cA` set.
//! - `client-certificate-data`: base64 of PEM `CERTIFICATE` blocks. k3s writes the client
//!   certificate followed by the client CA that issued it (k3s's client CA is not the server CA
//!   of `certificate-authority-data`). The first block is the client certificate; its signature
//!   must verify under the public key of a CA certificate whose subject is the client
//!   certificate's issuer, taken from the rest of the bundle or from `certificate-authority-data`.
//!   This proves the bundle is a consistent chain the API server may accept, not that the API
//!   server trusts it: the host never sees k3s's client CA except through the guest, so there is
//!   nothing better to anchor it to. What matters for the host's safety is that only inert,
//!   well-formed certificate data is written; whether the server accepts it is the server's
//!   business. Validity dates are not checked (the guest's clock is the guest's).
//! - `client-key-data`: base64 of exactly one PEM private key (`EC PRIVATE KEY`, as k3s writes
//!   it, `PRIVATE KEY` or `RSA PRIVATE KEY`) that belongs to the client certificate: a message
//!   signed with the key must verify under the certificate's public key.
//! - `token`: 1 to [`MAX_TOKEN`] printable ASCII characters, no whitespace.
//!
//! Every error is one line and short; the caller prefixes the field's name.

use crate::cert::{self, Block, CertError, CertInfo, PemError, Signed};
use crate::pki::base64::{self, Base64Error};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::SignatureScheme;

/// Most base64 characters of one credential field (k3s's are about 1.5 KiB).
pub(crate) const MAX_FIELD: usize = 32 * 1024;
/// Most certificates in one bundle.
pub(crate) const MAX_CERTS: usize = 8;
/// Longest token accepted.
pub(crate) const MAX_TOKEN: usize = 4096;

/// Why a credential field was refused; the caller prefixes the field's name.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CredError {
    /// The field is empty.
    #[error("empty")]
    Empty,
    /// The field is longer than allowed.
    #[error("{len} bytes, more than {max}")]
    TooBig { len: usize, max: usize },
    /// The field is not base64.
    #[error("not base64")]
    NotBase64(#[source] Base64Error),
    /// Too many PEM blocks, or none.
    #[error(transparent)]
    Blocks(PemError),
    /// The decoded field is not PEM.
    #[error("not PEM")]
    NotPem(#[source] PemError),
    /// A block of a certificate field is not a certificate.
    #[error("PEM block {index} is {label}, not CERTIFICATE")]
    NotCertificate { index: usize, label: String },
    /// A certificate does not parse.
    #[error("certificate {index} is not X.509")]
    NotX509 {
        index: usize,
        #[source]
        source: CertError,
    },
    /// A certificate of `certificate-authority-data` is not a CA.
    #[error("certificate {0} is not a CA certificate")]
    NotCa(usize),
    /// The client certificate's signed parts do not parse.
    #[error(transparent)]
    Signed(CertError),
    /// The client certificate's signature algorithm is not one webpki verifies.
    #[error("the client certificate's signature algorithm is not supported")]
    Algorithm,
    /// No CA of the bundles signed the client certificate.
    #[error("the client certificate is not signed by a CA certificate of its bundle or of certificate-authority-data")]
    NotSigned,
    /// The key field holds other than one block.
    #[error("{0} PEM blocks, not one private key")]
    KeyBlocks(usize),
    /// The key block is not a private key.
    #[error(transparent)]
    Key(PemError),
    /// A key form rustls knows but gatevm does not write.
    #[error("unsupported private key form")]
    KeyForm,
    /// A key of a type rustls cannot sign with.
    #[error("not a private key of a supported type (ECDSA, RSA, Ed25519)")]
    KeyType,
    /// No signature scheme fits the key.
    #[error("no supported signature scheme for this key")]
    NoScheme,
    /// Signing with the key failed.
    #[error("signing with the key failed")]
    Sign,
    /// webpki refuses the client certificate.
    #[error("the client certificate cannot be used")]
    Unusable(#[source] webpki::Error),
    /// The key is not the client certificate's.
    #[error("does not belong to the client certificate (another public key)")]
    WrongKey,
    /// The token has characters other than printable ASCII.
    #[error("not printable ASCII without whitespace")]
    NotPrintable,
}

/// A checked CA bundle: canonical base64 of its PEM, and each certificate's DER.
pub(crate) struct CaBundle {
    /// For `certificate-authority-data`.
    pub data: String,
    /// The certificates: DER, and what was parsed of it.
    pub certs: Vec<(Vec<u8>, CertInfo)>,
}

/// Base64 field text to bytes: bounded, base64, not empty.
fn field_bytes(text: &str) -> Result<Vec<u8>, CredError> {
    if text.len() > MAX_FIELD {
        return Err(CredError::TooBig {
            len: text.len(),
            max: MAX_FIELD,
        });
    }
    let bytes = base64::decode(text).map_err(CredError::NotBase64)?;
    if bytes.is_empty() {
        return Err(CredError::Empty);
    }
    Ok(bytes)
}

/// Splits PEM text into blocks; anything but blocks and whitespace is refused.
fn pem_blocks(bytes: &[u8]) -> Result<Vec<Block>, CredError> {
    cert::pem_blocks(bytes, MAX_CERTS).map_err(|e| match e {
        PemError::TooMany(_) | PemError::NoBlock => CredError::Blocks(e),
        e => CredError::NotPem(e),
    })
}

/// Certificates of a `*-data` field, each parsed.
fn certificates(text: &str) -> Result<Vec<(Vec<u8>, CertInfo)>, CredError> {
    let blocks = pem_blocks(&field_bytes(text)?)?;
    let mut out = Vec::new();
    for (i, Block { label, der }) in blocks.into_iter().enumerate() {
        if label != "CERTIFICATE" {
            return Err(CredError::NotCertificate { index: i, label });
        }
        let info = cert::parse_certificate(&der)
            .map_err(|source| CredError::NotX509 { index: i, source })?;
        out.push((der, info));
    }
    Ok(out)
}

/// Checks `certificate-authority-data`: CA certificates only.
pub(crate) fn ca(text: &str) -> Result<CaBundle, CredError> {
    let certs = certificates(text)?;
    if let Some(i) = certs.iter().position(|(_, info)| !info.is_ca) {
        return Err(CredError::NotCa(i));
    }
    let refs: Vec<&[u8]> = certs.iter().map(|(d, _)| d.as_slice()).collect();
    Ok(CaBundle {
        data: base64::encode(cert::pem_encode("CERTIFICATE", &refs).as_bytes()),
        certs,
    })
}

/// webpki algorithms that may verify a certificate signature with this signatureAlgorithm OID.
fn algorithms(oid: &[u8]) -> Vec<&'static dyn rustls::pki_types::SignatureVerificationAlgorithm> {
    use webpki::ring as alg;
    const ECDSA_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
    const ECDSA_SHA384: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
    const RSA_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b];
    const RSA_SHA384: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c];
    const RSA_SHA512: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d];
    const ED25519: &[u8] = &[0x2b, 0x65, 0x70];
    match oid {
        ECDSA_SHA256 => vec![alg::ECDSA_P256_SHA256, alg::ECDSA_P384_SHA256],
        ECDSA_SHA384 => vec![alg::ECDSA_P384_SHA384, alg::ECDSA_P256_SHA384],
        RSA_SHA256 => vec![alg::RSA_PKCS1_2048_8192_SHA256],
        RSA_SHA384 => vec![alg::RSA_PKCS1_2048_8192_SHA384],
        RSA_SHA512 => vec![alg::RSA_PKCS1_2048_8192_SHA512],
        ED25519 => vec![alg::ED25519],
        _ => vec![],
    }
}

/// Whether `signed`'s signature verifies under `issuer`'s public key.
fn signed_by(signed: &Signed, issuer: &[u8]) -> bool {
    let issuer = CertificateDer::from(issuer);
    let Ok(issuer) = webpki::EndEntityCert::try_from(&issuer) else {
        return false;
    };
    algorithms(&signed.algorithm).iter().any(|a| {
        issuer
            .verify_signature(*a, &signed.tbs, &signed.signature)
            .is_ok()
    })
}

/// Checks `client-certificate-data` and `client-key-data` (see the module's documentation).
/// Returns both, canonically re-encoded.
pub(crate) fn client(
    cert_text: &str,
    key_text: &str,
    ca: &CaBundle,
) -> Result<(String, String), Field> {
    let certs = certificates(cert_text).map_err(Field::Cert)?;
    let (leaf_der, leaf) = &certs[0];
    let signed = cert::signed_parts(leaf_der).map_err(|e| Field::Cert(CredError::Signed(e)))?;
    if algorithms(&signed.algorithm).is_empty() {
        return Err(Field::Cert(CredError::Algorithm));
    }
    let verified = certs[1..]
        .iter()
        .chain(ca.certs.iter())
        .any(|(der, info)| info.is_ca && info.subject == leaf.issuer && signed_by(&signed, der));
    if !verified {
        return Err(Field::Cert(CredError::NotSigned));
    }

    let key = key(key_text).map_err(Field::Key)?;
    key_matches(&key, leaf_der).map_err(Field::Key)?;
    let ders: Vec<&[u8]> = certs.iter().map(|(d, _)| d.as_slice()).collect();
    let cert_data = base64::encode(cert::pem_encode("CERTIFICATE", &ders).as_bytes());
    let (label, key_der) = match &key {
        PrivateKeyDer::Sec1(k) => ("EC PRIVATE KEY", k.secret_sec1_der()),
        PrivateKeyDer::Pkcs1(k) => ("RSA PRIVATE KEY", k.secret_pkcs1_der()),
        PrivateKeyDer::Pkcs8(k) => ("PRIVATE KEY", k.secret_pkcs8_der()),
        _ => return Err(Field::Key(CredError::KeyForm)),
    };
    let key_data = base64::encode(cert::pem_encode(label, &[key_der]).as_bytes());
    Ok((cert_data, key_data))
}

/// Which field of a client certificate pair failed, and why.
#[derive(Debug)]
pub(crate) enum Field {
    /// `client-certificate-data`.
    Cert(CredError),
    /// `client-key-data`.
    Key(CredError),
}

/// Exactly one PEM private key.
fn key(text: &str) -> Result<PrivateKeyDer<'static>, CredError> {
    let mut blocks = pem_blocks(&field_bytes(text)?)?;
    if blocks.len() != 1 {
        return Err(CredError::KeyBlocks(blocks.len()));
    }
    cert::private_key(blocks.remove(0)).map_err(CredError::Key)
}

/// Whether the key belongs to the certificate: a message signed with it verifies under the
/// certificate's public key.
fn key_matches(key: &PrivateKeyDer<'_>, cert_der: &[u8]) -> Result<(), CredError> {
    let signing =
        rustls::crypto::ring::sign::any_supported_type(key).map_err(|_| CredError::KeyType)?;
    let signer = signing
        .choose_scheme(&[
            SignatureScheme::ECDSA_NISTP256_SHA256,
            SignatureScheme::ECDSA_NISTP384_SHA384,
            SignatureScheme::ED25519,
            SignatureScheme::RSA_PKCS1_SHA256,
        ])
        .ok_or(CredError::NoScheme)?;
    const MSG: &[u8] = b"gatevm: does this key belong to the client certificate?";
    let sig = signer.sign(MSG).map_err(|_| CredError::Sign)?;
    let alg = match signer.scheme() {
        SignatureScheme::ECDSA_NISTP256_SHA256 => webpki::ring::ECDSA_P256_SHA256,
        SignatureScheme::ECDSA_NISTP384_SHA384 => webpki::ring::ECDSA_P384_SHA384,
        SignatureScheme::ED25519 => webpki::ring::ED25519,
        _ => webpki::ring::RSA_PKCS1_2048_8192_SHA256,
    };
    let cert = CertificateDer::from(cert_der);
    let ee = webpki::EndEntityCert::try_from(&cert).map_err(CredError::Unusable)?;
    ee.verify_signature(alg, MSG, &sig)
        .map_err(|_| CredError::WrongKey)
}

/// Checks `token`: printable ASCII, no whitespace, bounded.
pub(crate) fn token(t: &str) -> Result<String, CredError> {
    if t.is_empty() {
        return Err(CredError::Empty);
    }
    if t.len() > MAX_TOKEN {
        return Err(CredError::TooBig {
            len: t.len(),
            max: MAX_TOKEN,
        });
    }
    if !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(CredError::NotPrintable);
    }
    Ok(t.to_string())
}
