//! Just enough PEM and DER to read back the certificates this module wrote: subject and issuer
//! names, validity, public key, SANs, common name, key identifiers, EKUs and the CA flag.
//!
//! rcgen only parses certificates with its `x509-parser` feature, which this crate does not
//! enable; the fields needed to decide whether a certificate on disk still fits are few and sit at
//! fixed places in the structure (RFC 5280, section 4.1), so a small strict reader does it. Every
//! byte is bounds-checked: a damaged file gives an error, never a panic.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time};

use super::base64;
use super::names::San;

const BOOLEAN: u8 = 0x01;
const INTEGER: u8 = 0x02;
const BIT_STRING: u8 = 0x03;
const OCTET_STRING: u8 = 0x04;
const OID: u8 = 0x06;
const UTF8_STRING: u8 = 0x0c;
const PRINTABLE_STRING: u8 = 0x13;
const IA5_STRING: u8 = 0x16;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const VERSION: u8 = 0xa0; // [0] EXPLICIT
const ISSUER_UID: u8 = 0x81; // [1] IMPLICIT
const SUBJECT_UID: u8 = 0x82; // [2] IMPLICIT
const EXTENSIONS: u8 = 0xa3; // [3] EXPLICIT
const GN_DNS: u8 = 0x82; // GeneralName dNSName [2] IMPLICIT
const GN_IP: u8 = 0x87; // GeneralName iPAddress [7] IMPLICIT
const AKI_KEY_ID: u8 = 0x80; // AuthorityKeyIdentifier keyIdentifier [0] IMPLICIT

/// 2.5.4.3 commonName
const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
/// 2.5.29.14 subjectKeyIdentifier
const OID_SKI: &[u8] = &[0x55, 0x1d, 0x0e];
/// 2.5.29.17 subjectAltName
const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];
/// 2.5.29.19 basicConstraints
const OID_BASIC_CONSTRAINTS: &[u8] = &[0x55, 0x1d, 0x13];
/// 2.5.29.35 authorityKeyIdentifier
const OID_AKI: &[u8] = &[0x55, 0x1d, 0x23];
/// 2.5.29.37 extKeyUsage
const OID_EKU: &[u8] = &[0x55, 0x1d, 0x25];
/// 1.3.6.1.5.5.7.3.1 id-kp-serverAuth
pub(crate) const OID_SERVER_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];
/// 1.3.6.1.5.5.7.3.2 id-kp-clientAuth
pub(crate) const OID_CLIENT_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02];

/// One DER element.
#[derive(Debug, Clone, Copy)]
struct Tlv<'a> {
    tag: u8,
    /// The contents.
    value: &'a [u8],
    /// Tag, length and contents.
    raw: &'a [u8],
}

/// Reads consecutive DER elements from a byte slice.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(input: &'a [u8]) -> Self {
        Reader { rest: input }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn peek_tag(&self) -> Option<u8> {
        self.rest.first().copied()
    }

    fn read(&mut self) -> Result<Tlv<'a>, String> {
        let input = self.rest;
        let (&tag, after_tag) = input
            .split_first()
            .ok_or("truncated DER: element expected")?;
        if tag & 0x1f == 0x1f {
            return Err(format!("unsupported DER tag {tag:#04x} (high tag number)"));
        }
        let (&first, mut after_len) = after_tag
            .split_first()
            .ok_or("truncated DER: length expected")?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let count = usize::from(first & 0x7f);
            if count == 0 || count > 4 {
                return Err(format!("unsupported DER length form {first:#04x}"));
            }
            if after_len.len() < count {
                return Err("truncated DER: length bytes expected".into());
            }
            let (bytes, rest) = after_len.split_at(count);
            after_len = rest;
            bytes
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
        };
        if after_len.len() < len {
            return Err(format!(
                "truncated DER: element of {len} bytes, {} left",
                after_len.len()
            ));
        }
        let header = input.len() - after_len.len();
        let (value, rest) = after_len.split_at(len);
        self.rest = rest;
        Ok(Tlv {
            tag,
            value,
            raw: &input[..header + len],
        })
    }

    fn expect(&mut self, tag: u8, what: &str) -> Result<Tlv<'a>, String> {
        let tlv = self.read().map_err(|e| format!("{what}: {e}"))?;
        if tlv.tag != tag {
            return Err(format!(
                "{what}: expected DER tag {tag:#04x}, found {:#04x}",
                tlv.tag
            ));
        }
        Ok(tlv)
    }

    fn optional(&mut self, tag: u8, what: &str) -> Result<Option<Tlv<'a>>, String> {
        if self.peek_tag() == Some(tag) {
            self.expect(tag, what).map(Some)
        } else {
            Ok(None)
        }
    }

    fn finish(&self, what: &str) -> Result<(), String> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{what}: {} unexpected trailing bytes",
                self.rest.len()
            ))
        }
    }
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

/// Extracts the DER of the first `-----BEGIN {label}-----` block of `text`.
pub(crate) fn pem_decode(text: &str, label: &str) -> Result<Vec<u8>, String> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text
        .find(&begin)
        .ok_or_else(|| format!("no {begin:?} line"))?
        + begin.len();
    let stop = text[start..]
        .find(&end)
        .ok_or_else(|| format!("no {end:?} line"))?
        + start;
    let der = base64::decode(&text[start..stop])?;
    if der.is_empty() {
        return Err(format!("the {label} block is empty"));
    }
    Ok(der)
}

/// The parts of a certificate its issuer's signature covers and carries.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Signed<'a> {
    /// The tbsCertificate as signed: tag, length and contents.
    pub tbs: &'a [u8],
    /// The contents of the signatureAlgorithm's OID.
    pub algorithm: &'a [u8],
    /// The signature bytes (the BIT STRING without its unused-bits byte).
    pub signature: &'a [u8],
}

/// Splits a DER certificate into what a signature check needs.
pub(crate) fn signed_parts(der: &[u8]) -> Result<Signed<'_>, String> {
    let mut outer = Reader::new(der);
    let cert = outer.expect(SEQUENCE, "certificate")?;
    outer.finish("certificate")?;
    let mut fields = Reader::new(cert.value);
    let tbs = fields.expect(SEQUENCE, "tbsCertificate")?;
    let alg = fields.expect(SEQUENCE, "signatureAlgorithm")?;
    let bits = fields.expect(BIT_STRING, "signatureValue")?;
    fields.finish("certificate")?;
    let algorithm = Reader::new(alg.value)
        .expect(OID, "signatureAlgorithm")?
        .value;
    let signature = match bits.value.split_first() {
        Some((0, sig)) if !sig.is_empty() => sig,
        _ => return Err("signatureValue: malformed BIT STRING".into()),
    };
    Ok(Signed {
        tbs: tbs.raw,
        algorithm,
        signature,
    })
}

/// Parses a DER certificate.
pub(crate) fn parse_certificate(der: &[u8]) -> Result<CertInfo, String> {
    let mut outer = Reader::new(der);
    let cert = outer.expect(SEQUENCE, "certificate")?;
    outer.finish("certificate")?;
    let mut cert_fields = Reader::new(cert.value);
    let tbs = cert_fields.expect(SEQUENCE, "tbsCertificate")?;
    cert_fields.expect(SEQUENCE, "signatureAlgorithm")?;
    cert_fields.expect(BIT_STRING, "signatureValue")?;
    cert_fields.finish("certificate")?;

    let mut t = Reader::new(tbs.value);
    t.optional(VERSION, "version")?;
    t.expect(INTEGER, "serialNumber")?;
    t.expect(SEQUENCE, "signature")?;
    let issuer = t.expect(SEQUENCE, "issuer")?;
    let validity = t.expect(SEQUENCE, "validity")?;
    let subject = t.expect(SEQUENCE, "subject")?;
    let spki = t.expect(SEQUENCE, "subjectPublicKeyInfo")?;
    t.optional(ISSUER_UID, "issuerUniqueID")?;
    t.optional(SUBJECT_UID, "subjectUniqueID")?;
    let extensions = t.optional(EXTENSIONS, "extensions")?;
    t.finish("tbsCertificate")?;

    let mut v = Reader::new(validity.value);
    let not_before = parse_time(v.read()?).map_err(|e| format!("notBefore: {e}"))?;
    let not_after = parse_time(v.read()?).map_err(|e| format!("notAfter: {e}"))?;
    v.finish("validity")?;

    let mut k = Reader::new(spki.value);
    k.expect(SEQUENCE, "subjectPublicKeyInfo algorithm")?;
    let bits = k.expect(BIT_STRING, "subjectPublicKey")?;
    k.finish("subjectPublicKeyInfo")?;
    let public_key = match bits.value.split_first() {
        Some((0, key)) if !key.is_empty() => key.to_vec(),
        _ => return Err("subjectPublicKey: malformed BIT STRING".into()),
    };

    let mut info = CertInfo {
        issuer: issuer.raw.to_vec(),
        subject: subject.raw.to_vec(),
        common_name: common_name(subject.value)?,
        not_before,
        not_after,
        public_key,
        sans: BTreeSet::new(),
        subject_key_id: None,
        authority_key_id: None,
        ext_key_usages: Vec::new(),
        is_ca: false,
    };
    if let Some(extensions) = extensions {
        let mut wrapper = Reader::new(extensions.value);
        let list = wrapper.expect(SEQUENCE, "extensions")?;
        wrapper.finish("extensions")?;
        let mut list = Reader::new(list.value);
        while !list.is_empty() {
            let ext = list.expect(SEQUENCE, "extension")?;
            let mut e = Reader::new(ext.value);
            let oid = e.expect(OID, "extension id")?;
            e.optional(BOOLEAN, "extension critical flag")?;
            let value = e.expect(OCTET_STRING, "extension value")?;
            e.finish("extension")?;
            parse_extension(&mut info, oid.value, value.value)?;
        }
    }
    Ok(info)
}

fn parse_extension(info: &mut CertInfo, oid: &[u8], value: &[u8]) -> Result<(), String> {
    let mut outer = Reader::new(value);
    match oid {
        OID_SAN => {
            let names = outer.expect(SEQUENCE, "subjectAltName")?;
            let mut names = Reader::new(names.value);
            while !names.is_empty() {
                let name = names.read().map_err(|e| format!("subjectAltName: {e}"))?;
                match name.tag {
                    GN_DNS => {
                        let dns = std::str::from_utf8(name.value)
                            .map_err(|_| "subjectAltName: DNS name is not text")?;
                        info.sans.insert(San::Dns(dns.to_ascii_lowercase()));
                    }
                    GN_IP => {
                        let ip = match name.value.len() {
                            4 => {
                                let mut a = [0u8; 4];
                                a.copy_from_slice(name.value);
                                IpAddr::V4(Ipv4Addr::from(a))
                            }
                            16 => {
                                let mut a = [0u8; 16];
                                a.copy_from_slice(name.value);
                                IpAddr::V6(Ipv6Addr::from(a))
                            }
                            n => return Err(format!("subjectAltName: IP address of {n} bytes")),
                        };
                        info.sans.insert(San::Ip(ip));
                    }
                    _ => {} // other name forms: not ours, ignored
                }
            }
        }
        OID_SKI => {
            info.subject_key_id = Some(
                outer
                    .expect(OCTET_STRING, "subjectKeyIdentifier")?
                    .value
                    .to_vec(),
            );
        }
        OID_AKI => {
            let aki = outer.expect(SEQUENCE, "authorityKeyIdentifier")?;
            let mut aki = Reader::new(aki.value);
            info.authority_key_id = aki
                .optional(AKI_KEY_ID, "authorityKeyIdentifier keyIdentifier")?
                .map(|id| id.value.to_vec());
        }
        OID_BASIC_CONSTRAINTS => {
            let bc = outer.expect(SEQUENCE, "basicConstraints")?;
            let mut bc = Reader::new(bc.value);
            info.is_ca = bc
                .optional(BOOLEAN, "basicConstraints cA")?
                .is_some_and(|flag| flag.value.iter().any(|&b| b != 0));
        }
        OID_EKU => {
            let list = outer.expect(SEQUENCE, "extKeyUsage")?;
            let mut list = Reader::new(list.value);
            while !list.is_empty() {
                info.ext_key_usages
                    .push(list.expect(OID, "extKeyUsage purpose")?.value.to_vec());
            }
        }
        _ => return Ok(()),
    }
    outer.finish("extension value")
}

/// The first common name in a `Name` (a SEQUENCE of SETs of SEQUENCE {type, value}).
fn common_name(name: &[u8]) -> Result<Option<String>, String> {
    let mut rdns = Reader::new(name);
    while !rdns.is_empty() {
        let rdn = rdns.expect(SET, "name component")?;
        let mut attributes = Reader::new(rdn.value);
        while !attributes.is_empty() {
            let attribute = attributes.expect(SEQUENCE, "name attribute")?;
            let mut a = Reader::new(attribute.value);
            let kind = a.expect(OID, "name attribute type")?;
            let value = a.read().map_err(|e| format!("name attribute value: {e}"))?;
            if kind.value == OID_CN
                && matches!(value.tag, UTF8_STRING | PRINTABLE_STRING | IA5_STRING)
            {
                return Ok(std::str::from_utf8(value.value).ok().map(str::to_owned));
            }
        }
    }
    Ok(None)
}

fn digits(bytes: &[u8]) -> Result<u32, String> {
    bytes.iter().try_fold(0u32, |acc, &b| {
        if b.is_ascii_digit() {
            Ok(acc * 10 + u32::from(b - b'0'))
        } else {
            Err(format!("{:?} in a time value", char::from(b)))
        }
    })
}

/// UTCTime `YYMMDDHHMMSSZ` or GeneralizedTime `YYYYMMDDHHMMSSZ`, the forms RFC 5280 allows.
fn parse_time(tlv: Tlv<'_>) -> Result<OffsetDateTime, String> {
    let (year, rest) = match (tlv.tag, tlv.value.len()) {
        (UTC_TIME, 13) => {
            let yy = digits(&tlv.value[..2])?;
            (
                if yy >= 50 { 1900 + yy } else { 2000 + yy },
                &tlv.value[2..],
            )
        }
        (GENERALIZED_TIME, 15) => (digits(&tlv.value[..4])?, &tlv.value[4..]),
        (tag, len) => {
            return Err(format!(
                "unsupported time encoding (tag {tag:#04x}, {len} bytes)"
            ))
        }
    };
    if rest[10] != b'Z' {
        return Err("time is not in UTC".into());
    }
    let field = |i: usize| digits(&rest[i..i + 2]);
    let month = Month::try_from(field(0)? as u8).map_err(|e| e.to_string())?;
    let date =
        Date::from_calendar_date(year as i32, month, field(2)? as u8).map_err(|e| e.to_string())?;
    let time = Time::from_hms(field(4)? as u8, field(6)? as u8, field(8)? as u8)
        .map_err(|e| e.to_string())?;
    Ok(PrimitiveDateTime::new(date, time).assume_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        SanType, PKCS_ECDSA_P256_SHA256,
    };
    use std::sync::OnceLock;

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

    #[test]
    fn times() {
        let tlv = |s: &'static str| Tlv {
            tag: UTC_TIME,
            value: s.as_bytes(),
            raw: &[],
        };
        assert_eq!(
            parse_time(tlv("491231235959Z")).unwrap(),
            utc(2049, 12, 31, 23, 59, 59)
        );
        assert_eq!(
            parse_time(tlv("500101000000Z")).unwrap(),
            utc(1950, 1, 1, 0, 0, 0)
        );
        assert!(parse_time(tlv("491331235959Z")).is_err());
        assert!(parse_time(tlv("4912312359590")).is_err());
        assert!(parse_time(tlv("49123123595Z")).is_err());
        let generalized = Tlv {
            tag: GENERALIZED_TIME,
            value: b"20510102030405Z",
            raw: &[],
        };
        assert_eq!(parse_time(generalized).unwrap(), utc(2051, 1, 2, 3, 4, 5));
    }

    proptest! {
        #[test]
        fn damaged_certificates_never_panic(cut in 0usize..2000, flip in 0usize..2000, bit in 0u8..8) {
            let der = sample_der();
            let cut = cut % (der.len() + 1);
            let _ = parse_certificate(&der[..cut]);
            let mut flipped = der.to_vec();
            let at = flip % der.len();
            flipped[at] ^= 1 << bit;
            let _ = parse_certificate(&flipped);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_certificate(&bytes);
        }
    }
}
