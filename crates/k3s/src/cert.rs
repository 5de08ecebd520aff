//! The crate's one reader of PEM and X.509: PEM blocks through the `pem` crate, certificates
//! through `x509-parser`, for the certificates the PKI wrote, the credentials of k3s's kubeconfig
//! and the TLS health check alike.
//!
//! From a certificate, only what gatevm decides on is kept ([`CertInfo`]): subject and issuer
//! names, validity, public key, SANs, common name, key identifiers, EKUs and the CA flag. A damaged
//! file gives an error, never a panic.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer};
use time::OffsetDateTime;
use x509_parser::der_parser::asn1_rs::{BitString, Oid, Tag};
use x509_parser::error::X509Error;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER, OID_X509_EXT_BASIC_CONSTRAINTS,
    OID_X509_EXT_EXTENDED_KEY_USAGE, OID_X509_EXT_SUBJECT_ALT_NAME,
    OID_X509_EXT_SUBJECT_KEY_IDENTIFIER,
};
use x509_parser::x509::X509Name;

use crate::pki::San;

/// 1.3.6.1.5.5.7.3.1 id-kp-serverAuth
pub(crate) const OID_SERVER_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];
/// 1.3.6.1.5.5.7.3.2 id-kp-clientAuth
pub(crate) const OID_CLIENT_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02];
/// 2.5.29.37.0 anyExtendedKeyUsage
const OID_ANY_EKU: &[u8] = &[0x55, 0x1d, 0x25, 0x00];
/// 1.3.6.1.5.5.7.3.3 id-kp-codeSigning
const OID_CODE_SIGNING: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x03];
/// 1.3.6.1.5.5.7.3.4 id-kp-emailProtection
const OID_EMAIL_PROTECTION: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x04];
/// 1.3.6.1.5.5.7.3.8 id-kp-timeStamping
const OID_TIME_STAMPING: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x08];
/// 1.3.6.1.5.5.7.3.9 id-kp-OCSPSigning
const OID_OCSP_SIGNING: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x09];

/// Why PEM text was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PemError {
    /// No block with the wanted label.
    #[error("no \"-----BEGIN {0}-----\" line")]
    NoBegin(String),
    /// A block without its END line.
    #[error("no \"-----END {0}-----\" line")]
    NoEnd(String),
    /// The text is not UTF-8.
    #[error("not UTF-8 text")]
    NotText,
    /// Something other than whitespace between blocks.
    #[error("text outside a -----BEGIN ...----- block")]
    Outside,
    /// A BEGIN line without its closing dashes.
    #[error("unterminated BEGIN line")]
    UnterminatedBegin,
    /// A BEGIN line with an odd label.
    #[error("malformed BEGIN line")]
    MalformedBegin,
    /// A BEGIN line with more text after it.
    #[error("BEGIN line not followed by a line break")]
    NoLineBreak,
    /// A block whose body does not decode.
    #[error("the {label} block does not decode")]
    Body {
        /// The block's label.
        label: String,
        /// What the PEM decoder said.
        #[source]
        source: pem::PemError,
    },
    /// A block without contents.
    #[error("the {0} block is empty")]
    Empty(String),
    /// More blocks than allowed.
    #[error("more than {0} PEM blocks")]
    TooMany(usize),
    /// No block at all.
    #[error("no PEM block")]
    NoBlock,
    /// A block that is not a private key where one is wanted.
    #[error("PEM block is {0}, not a private key")]
    NotAKey(String),
}

/// Why DER was not a certificate gatevm can read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CertError {
    /// Not a DER X.509 certificate.
    #[error("not a DER X.509 certificate")]
    Der(#[source] X509Error),
    /// A certificate followed by more bytes.
    #[error("{0} unexpected trailing bytes after the certificate")]
    Trailing(usize),
    /// A key or signature BIT STRING with unused bits or no bits.
    #[error("{0}: malformed BIT STRING")]
    BitString(&'static str),
    /// An extension gatevm reads that does not parse.
    #[error("malformed {0} extension")]
    Extension(&'static str),
    /// A SAN IP address that is neither IPv4 nor IPv6.
    #[error("subjectAltName: IP address of {0} bytes")]
    SanIp(usize),
}

/// One PEM block: its label and the DER it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Block {
    /// What the BEGIN line names (`CERTIFICATE`, `EC PRIVATE KEY`, ...).
    pub label: String,
    /// The decoded body, never empty.
    pub der: Vec<u8>,
}

/// Decodes one block, `-----BEGIN` to the END line's closing dashes.
fn decode_block(block: &str, label: &str) -> Result<Vec<u8>, PemError> {
    let pem = pem::parse(block).map_err(|source| PemError::Body {
        label: label.to_string(),
        source,
    })?;
    if pem.contents().is_empty() {
        return Err(PemError::Empty(label.to_string()));
    }
    Ok(pem.into_contents())
}

/// Extracts the DER of the first `-----BEGIN {label}-----` block of `text` (text around it is
/// ignored, as in files written by other tools).
pub(crate) fn pem_decode(text: &str, label: &str) -> Result<Vec<u8>, PemError> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text
        .find(&begin)
        .ok_or_else(|| PemError::NoBegin(label.to_string()))?;
    let stop = text[start..]
        .find(&end)
        .ok_or_else(|| PemError::NoEnd(label.to_string()))?
        + start
        + end.len();
    decode_block(&text[start..stop], label)
}

/// Splits PEM text into at most `max` blocks; anything but blocks and whitespace is refused.
pub(crate) fn pem_blocks(bytes: &[u8], max: usize) -> Result<Vec<Block>, PemError> {
    let text = std::str::from_utf8(bytes).map_err(|_| PemError::NotText)?;
    let mut rest = text.trim_start();
    let mut blocks = Vec::new();
    while !rest.is_empty() {
        if blocks.len() == max {
            return Err(PemError::TooMany(max));
        }
        let after = rest.strip_prefix("-----BEGIN ").ok_or(PemError::Outside)?;
        let label_end = after.find("-----").ok_or(PemError::UnterminatedBegin)?;
        let label = &after[..label_end];
        if label.is_empty()
            || label.len() > 32
            || !label.bytes().all(|b| b.is_ascii_uppercase() || b == b' ')
        {
            return Err(PemError::MalformedBegin);
        }
        let body = &after[label_end + 5..];
        if !(body.starts_with('\n') || body.starts_with("\r\n")) {
            return Err(PemError::NoLineBreak);
        }
        let end = format!("-----END {label}-----");
        let stop = body
            .find(&end)
            .ok_or_else(|| PemError::NoEnd(label.to_string()))?;
        let block_len = rest.len() - body.len() + stop + end.len();
        let der = decode_block(&rest[..block_len], label)?;
        blocks.push(Block {
            label: label.to_string(),
            der,
        });
        rest = rest[block_len..].trim_start();
    }
    if blocks.is_empty() {
        return Err(PemError::NoBlock);
    }
    Ok(blocks)
}

/// PEM text of DER blocks, 64 columns, `\n` line ends.
pub(crate) fn pem_encode(label: &str, ders: &[&[u8]]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    ders.iter()
        .map(|der| pem::encode_config(&pem::Pem::new(label, *der), config))
        .collect()
}

/// The private key a PEM block carries, by its label (`EC PRIVATE KEY` for SEC1, `PRIVATE KEY`
/// for PKCS#8, `RSA PRIVATE KEY` for PKCS#1).
pub(crate) fn private_key(block: Block) -> Result<PrivateKeyDer<'static>, PemError> {
    Ok(match block.label.as_str() {
        "EC PRIVATE KEY" => PrivateSec1KeyDer::from(block.der).into(),
        "PRIVATE KEY" => PrivatePkcs8KeyDer::from(block.der).into(),
        "RSA PRIVATE KEY" => PrivatePkcs1KeyDer::from(block.der).into(),
        _ => return Err(PemError::NotAKey(block.label)),
    })
}

/// The one private key of PEM text that holds nothing else.
pub(crate) fn pem_private_key(text: &[u8]) -> Result<PrivateKeyDer<'static>, PemError> {
    let mut blocks = pem_blocks(text, 1)?;
    private_key(blocks.remove(0))
}

/// What gatevm needs to know about a certificate it finds on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CertInfo {
    /// The issuer `Name`, DER.
    pub issuer: Vec<u8>,
    /// The subject `Name`, DER.
    pub subject: Vec<u8>,
    /// The subject's common name, when it is a UTF-8, printable or IA5 string.
    pub common_name: Option<String>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// The `subjectPublicKey` bits (for EC keys: the uncompressed point).
    pub public_key: Vec<u8>,
    /// DNS names (lowercased) and IP addresses from the SAN extension.
    pub sans: BTreeSet<San>,
    pub subject_key_id: Option<Vec<u8>>,
    pub authority_key_id: Option<Vec<u8>>,
    /// Extended key usages, as OID contents.
    pub ext_key_usages: Vec<Vec<u8>>,
    /// basicConstraints cA.
    pub is_ca: bool,
}

/// The parts of a certificate its issuer's signature covers and carries.
#[derive(Debug, Clone)]
pub(crate) struct Signed {
    /// The tbsCertificate as signed: tag, length and contents.
    pub tbs: Vec<u8>,
    /// The contents of the signatureAlgorithm's OID.
    pub algorithm: Vec<u8>,
    /// The signature bytes (the BIT STRING without its unused-bits byte).
    pub signature: Vec<u8>,
}

/// Parses the whole of `der` as one certificate.
fn x509(der: &[u8]) -> Result<x509_parser::certificate::X509Certificate<'_>, CertError> {
    use x509_parser::nom::Err;
    let (rest, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| {
        CertError::Der(match e {
            Err::Error(e) | Err::Failure(e) => e,
            Err::Incomplete(_) => X509Error::InvalidCertificate,
        })
    })?;
    if !rest.is_empty() {
        return Err(CertError::Trailing(rest.len()));
    }
    Ok(cert)
}

/// The bits of a BIT STRING without unused bits, not empty.
fn whole_bits(bits: &BitString<'_>, what: &'static str) -> Result<Vec<u8>, CertError> {
    if bits.unused_bits != 0 || bits.data.is_empty() {
        return Err(CertError::BitString(what));
    }
    Ok(bits.data.to_vec())
}

/// Splits a DER certificate into what a signature check needs.
pub(crate) fn signed_parts(der: &[u8]) -> Result<Signed, CertError> {
    let cert = x509(der)?;
    Ok(Signed {
        tbs: cert.tbs_certificate.as_ref().to_vec(),
        algorithm: cert.signature_algorithm.algorithm.as_bytes().to_vec(),
        signature: whole_bits(&cert.signature_value, "signatureValue")?,
    })
}

/// Parses a DER certificate.
pub(crate) fn parse_certificate(der: &[u8]) -> Result<CertInfo, CertError> {
    let cert = x509(der)?;
    let mut info = CertInfo {
        issuer: cert.issuer().as_raw().to_vec(),
        subject: cert.subject().as_raw().to_vec(),
        common_name: common_name(cert.subject()),
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
        public_key: whole_bits(&cert.public_key().subject_public_key, "subjectPublicKey")?,
        sans: BTreeSet::new(),
        subject_key_id: None,
        authority_key_id: None,
        ext_key_usages: Vec::new(),
        is_ca: false,
    };
    for ext in cert.extensions() {
        if let ParsedExtension::ParseError { .. } = ext.parsed_extension() {
            if let Some(name) = our_extension(&ext.oid) {
                return Err(CertError::Extension(name));
            }
        }
        read_extension(&mut info, ext.parsed_extension())?;
    }
    Ok(info)
}

/// The name of an extension gatevm reads, `None` for the others (ignored, even when damaged).
fn our_extension(oid: &Oid<'_>) -> Option<&'static str> {
    [
        (OID_X509_EXT_SUBJECT_ALT_NAME, "subjectAltName"),
        (OID_X509_EXT_SUBJECT_KEY_IDENTIFIER, "subjectKeyIdentifier"),
        (
            OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER,
            "authorityKeyIdentifier",
        ),
        (OID_X509_EXT_BASIC_CONSTRAINTS, "basicConstraints"),
        (OID_X509_EXT_EXTENDED_KEY_USAGE, "extKeyUsage"),
    ]
    .into_iter()
    .find_map(|(known, name)| (*oid == known).then_some(name))
}

/// Copies what gatevm reads from one extension into `info`.
fn read_extension(info: &mut CertInfo, ext: &ParsedExtension<'_>) -> Result<(), CertError> {
    match ext {
        ParsedExtension::SubjectAlternativeName(san) => {
            for name in &san.general_names {
                match name {
                    GeneralName::DNSName(dns) => {
                        info.sans.insert(San::Dns(dns.to_ascii_lowercase()));
                    }
                    GeneralName::IPAddress(bytes) => {
                        let ip = if let Ok(a) = <[u8; 4]>::try_from(*bytes) {
                            IpAddr::V4(Ipv4Addr::from(a))
                        } else if let Ok(a) = <[u8; 16]>::try_from(*bytes) {
                            IpAddr::V6(Ipv6Addr::from(a))
                        } else {
                            return Err(CertError::SanIp(bytes.len()));
                        };
                        info.sans.insert(San::Ip(ip));
                    }
                    _ => {} // other name forms: not ours, ignored
                }
            }
        }
        ParsedExtension::SubjectKeyIdentifier(id) => info.subject_key_id = Some(id.0.to_vec()),
        ParsedExtension::AuthorityKeyIdentifier(aki) => {
            info.authority_key_id = aki.key_identifier.as_ref().map(|id| id.0.to_vec());
        }
        ParsedExtension::BasicConstraints(bc) => info.is_ca = bc.ca,
        ParsedExtension::ExtendedKeyUsage(eku) => {
            let known = [
                (eku.any, OID_ANY_EKU),
                (eku.server_auth, OID_SERVER_AUTH),
                (eku.client_auth, OID_CLIENT_AUTH),
                (eku.code_signing, OID_CODE_SIGNING),
                (eku.email_protection, OID_EMAIL_PROTECTION),
                (eku.time_stamping, OID_TIME_STAMPING),
                (eku.ocsp_signing, OID_OCSP_SIGNING),
            ];
            info.ext_key_usages = known
                .iter()
                .filter(|(set, _)| *set)
                .map(|(_, oid)| oid.to_vec())
                .chain(eku.other.iter().map(|oid| oid.as_bytes().to_vec()))
                .collect();
        }
        _ => {}
    }
    Ok(())
}

/// The first common name in a `Name` that is a UTF-8, printable or IA5 string.
fn common_name(name: &X509Name<'_>) -> Option<String> {
    let value = name
        .iter_common_name()
        .map(|attribute| attribute.attr_value())
        .find(|value| {
            matches!(
                value.tag(),
                Tag::Utf8String | Tag::PrintableString | Tag::Ia5String
            )
        })?;
    std::str::from_utf8(value.data).ok().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::base64;
    use proptest::prelude::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        SanType, PKCS_ECDSA_P256_SHA256,
    };
    use std::sync::OnceLock;
    use time::{Date, Month, PrimitiveDateTime, Time};

    fn utc(y: i32, mo: u8, d: u8, h: u8, mi: u8, s: u8) -> OffsetDateTime {
        let date = Date::from_calendar_date(y, Month::try_from(mo).unwrap(), d).unwrap();
        PrimitiveDateTime::new(date, Time::from_hms(h, mi, s).unwrap()).assume_utc()
    }

    /// One sample certificate for the property tests (key generation is not free).
    fn sample_der() -> &'static [u8] {
        static DER: OnceLock<Vec<u8>> = OnceLock::new();
        DER.get_or_init(|| sample().0)
    }

    fn sample() -> (Vec<u8>, KeyPair, KeyPair) {
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca = CertificateParams::default();
        ca.distinguished_name.push(DnType::CommonName, "test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let ca = ca.self_signed(&ca_key).unwrap();

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut leaf = CertificateParams::default();
        leaf.distinguished_name = rcgen::DistinguishedName::new();
        leaf.distinguished_name.push(DnType::OrganizationName, "o");
        leaf.distinguished_name.push(DnType::CommonName, "leaf");
        leaf.subject_alt_names = vec![
            SanType::DnsName("Example.org".try_into().unwrap()),
            SanType::IpAddress("10.1.2.3".parse().unwrap()),
            SanType::IpAddress("fd00::1".parse().unwrap()),
            SanType::URI("https://x".try_into().unwrap()),
        ];
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf.is_ca = IsCa::ExplicitNoCa;
        leaf.use_authority_key_identifier_extension = true;
        leaf.not_before = utc(2049, 12, 31, 23, 59, 58);
        leaf.not_after = utc(2051, 1, 2, 3, 4, 5);
        let leaf = leaf.signed_by(&key, &ca, &ca_key).unwrap();
        (leaf.der().to_vec(), key, ca_key)
    }

    #[test]
    fn reads_what_rcgen_writes_and_agrees_with_x509_parser() {
        let (der, key, ca_key) = sample();
        let info = parse_certificate(&der).unwrap();
        let (_, reference) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(info.subject, reference.subject().as_raw());
        assert_eq!(info.issuer, reference.issuer().as_raw());
        assert_eq!(info.common_name.as_deref(), Some("leaf"));
        assert_eq!(info.public_key, key.public_key_raw());
        assert_ne!(info.public_key, ca_key.public_key_raw());
        // UTCTime before 2050, GeneralizedTime after.
        assert_eq!(info.not_before, utc(2049, 12, 31, 23, 59, 58));
        assert_eq!(info.not_after, utc(2051, 1, 2, 3, 4, 5));
        assert_eq!(
            info.not_before.unix_timestamp(),
            reference.validity().not_before.timestamp()
        );
        let expected: BTreeSet<San> = [
            San::Dns("example.org".into()),
            San::Ip("10.1.2.3".parse().unwrap()),
            San::Ip("fd00::1".parse().unwrap()),
        ]
        .into_iter()
        .collect();
        assert_eq!(info.sans, expected);
        assert_eq!(info.ext_key_usages, vec![OID_SERVER_AUTH.to_vec()]);
        assert!(!info.is_ca);
        let aki = reference
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(a) => {
                    a.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => None,
            });
        assert_eq!(info.authority_key_id, aki);
        assert!(info.subject_key_id.is_some());
    }

    #[test]
    fn pem_round_trip_and_errors() {
        let (der, _, _) = sample();
        let body = base64::encode(&der);
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        let pem = format!(
            "junk before\n-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            lines.join("\n")
        );
        assert_eq!(pem_decode(&pem, "CERTIFICATE").unwrap(), der);
        assert!(pem_decode(&pem, "PRIVATE KEY")
            .unwrap_err()
            .to_string()
            .contains("BEGIN PRIVATE KEY"));
        assert!(pem_decode("-----BEGIN CERTIFICATE-----\nAAAA", "CERTIFICATE").is_err());
        assert!(pem_decode(
            "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----",
            "CERTIFICATE"
        )
        .is_err());
    }

    #[test]
    fn rejects_damage() {
        let (der, _, _) = sample();
        assert!(parse_certificate(&[]).is_err());
        assert!(parse_certificate(&der[..der.len() - 1]).is_err());
        let mut longer = der.clone();
        longer.push(0);
        assert!(parse_certificate(&longer).is_err());
        assert!(parse_certificate(b"not a certificate").is_err());
    }

    /// The sample certificate's notBefore (UTCTime) replaced by `value` (tag, length and
    /// contents), with the enclosing lengths adjusted.
    fn with_not_before(tag: u8, value: &[u8]) -> Vec<u8> {
        let der = sample_der();
        let old = b"491231235958Z";
        let at = der
            .windows(old.len())
            .position(|w| w == old)
            .expect("the sample's notBefore")
            - 2;
        let delta = value.len() as isize - old.len() as isize;
        let mut out = der[..at].to_vec();
        out.push(tag);
        out.push(value.len() as u8);
        out.extend_from_slice(value);
        out.extend_from_slice(&der[at + 2 + old.len()..]);
        // Certificate, tbsCertificate and validity lengths: certificate and tbs use the two-byte
        // long form (0x82), validity the short form.
        for len_at in [2usize, 6] {
            let n = u16::from_be_bytes([out[len_at], out[len_at + 1]]) as isize + delta;
            out[len_at..len_at + 2].copy_from_slice(&(n as u16).to_be_bytes());
        }
        let validity_len_at = at - 1;
        out[validity_len_at] = (out[validity_len_at] as isize + delta) as u8;
        out
    }

    fn not_before(tag: u8, value: &[u8]) -> Result<OffsetDateTime, CertError> {
        parse_certificate(&with_not_before(tag, value)).map(|info| info.not_before)
    }

    const UTC_TIME: u8 = 0x17;
    const GENERALIZED_TIME: u8 = 0x18;

    #[test]
    fn times() {
        assert_eq!(
            not_before(UTC_TIME, b"491231235959Z").unwrap(),
            utc(2049, 12, 31, 23, 59, 59)
        );
        assert_eq!(
            not_before(UTC_TIME, b"500101000000Z").unwrap(),
            utc(1950, 1, 1, 0, 0, 0)
        );
        assert!(not_before(UTC_TIME, b"491331235959Z").is_err());
        assert!(not_before(UTC_TIME, b"4912312359590").is_err());
        assert!(not_before(UTC_TIME, b"49123123595Z").is_err());
        assert_eq!(
            not_before(GENERALIZED_TIME, b"20510102030405Z").unwrap(),
            utc(2051, 1, 2, 3, 4, 5)
        );
    }

    proptest! {
        /// A certificate cut short is refused; one with a flipped bit is refused or read from
        /// its own bytes (the names and key found are in the damaged DER); a flip in the
        /// signature's last bytes, which gatevm does not read, changes nothing.
        #[test]
        fn damaged_certificates_are_refused_or_read_from_their_bytes(cut in 0usize..2000, flip in 0usize..2000, bit in 0u8..8) {
            let der = sample_der();
            let whole = parse_certificate(der).unwrap();
            let cut = cut % der.len();
            let e = parse_certificate(&der[..cut]).unwrap_err().to_string();
            prop_assert!(!e.is_empty() && !e.contains('\n'), "{:?}", e);
            let mut flipped = der.to_vec();
            let at = flip % der.len();
            flipped[at] ^= 1 << bit;
            let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len().max(1)).any(|w| w == needle);
            match parse_certificate(&flipped) {
                Ok(info) => {
                    prop_assert!(contains(&flipped, &info.subject) && contains(&flipped, &info.issuer));
                    prop_assert!(contains(&flipped, &info.public_key));
                }
                Err(e) => prop_assert!(!e.to_string().contains('\n')),
            }
            let mut sig = der.to_vec();
            let n = sig.len();
            sig[n - 1 - flip % 8] ^= 1 << bit;
            prop_assert_eq!(parse_certificate(&sig).ok(), Some(whole));
        }

        /// Bytes after the certificate are refused, counted exactly.
        #[test]
        fn trailing_bytes_are_counted(extra in proptest::collection::vec(any::<u8>(), 1..100)) {
            let mut bytes = sample_der().to_vec();
            bytes.extend_from_slice(&extra);
            let e = parse_certificate(&bytes).unwrap_err();
            prop_assert!(matches!(e, CertError::Trailing(n) if n == extra.len()), "{:?}", e);
            prop_assert_eq!(e.to_string(), format!("{} unexpected trailing bytes after the certificate", extra.len()));
        }

        /// Random bytes are never a certificate; the refusal is one line.
        #[test]
        fn random_bytes_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let e = parse_certificate(&bytes).unwrap_err().to_string();
            prop_assert!(!e.is_empty() && !e.contains('\n'), "{:?}", e);
        }
    }
}
