//! Reading back what a certificate says: validity, key type, names, and whether a private
//! key belongs to it.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::asn1_rs::Tag;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::der;

/// A subject alternative name as this crate compares them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum San {
    /// A DNS name, lowercase.
    Dns(String),
    Ip(IpAddr),
}

/// The facts about a leaf certificate that this crate checks.
#[derive(Debug)]
pub(crate) struct LeafInfo {
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
    /// The key is ECDSA on P-256, the type Chrome accepts for `serverCertificateHashes`.
    pub(crate) is_p256: bool,
    pub(crate) sans: Vec<San>,
    /// The complete curve OID element of an EC key, used to wrap SEC1 keys without one.
    pub(crate) ec_curve_oid: Option<Vec<u8>>,
}

fn parse(der_bytes: &[u8]) -> Result<X509Certificate<'_>, String> {
    match x509_parser::parse_x509_certificate(der_bytes) {
        Ok((_, cert)) => Ok(cert),
        Err(err) => Err(format!("not an X.509 certificate: {err}")),
    }
}

/// Checks that `der_bytes` is a certificate; used for the chain beyond the leaf.
pub(crate) fn check_parses(der_bytes: &[u8]) -> Result<(), String> {
    parse(der_bytes).map(drop)
}

/// Reads the facts this crate needs from a DER certificate.
pub(crate) fn inspect(der_bytes: &[u8]) -> Result<LeafInfo, String> {
    let cert = parse(der_bytes)?;
    let validity = cert.validity();
    let not_before =
        to_system_time(validity.not_before.timestamp()).ok_or("notBefore is out of range for this platform")?;
    let not_after =
        to_system_time(validity.not_after.timestamp()).ok_or("notAfter is out of range for this platform")?;

    let spki = cert.public_key();
    let curve = spki.algorithm.parameters.as_ref().filter(|params| params.tag() == Tag::Oid);
    let is_ec = spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY;
    let is_p256 = is_ec && curve.is_some_and(|oid| oid.data == OID_EC_P256.as_bytes());
    let ec_curve_oid = curve.filter(|_| is_ec).map(|oid| der::tlv(der::TAG_OID, oid.data));

    let mut sans = Vec::new();
    let extension = cert.subject_alternative_name().map_err(|err| format!("bad subjectAltName extension: {err}"))?;
    if let Some(extension) = extension {
        for name in &extension.value.general_names {
            match name {
                GeneralName::DNSName(dns) => sans.push(San::Dns(dns.to_ascii_lowercase())),
                GeneralName::IPAddress(bytes) => {
                    if let Some(ip) = ip_from_bytes(bytes) {
                        sans.push(San::Ip(ip));
                    }
                }
                _ => {}
            }
        }
    }

    Ok(LeafInfo { not_before, not_after, is_p256, sans, ec_curve_oid })
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        return Some(IpAddr::from(v4));
    }
    <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from)
}

/// Converts a Unix timestamp in seconds, which may be negative, to a `SystemTime`.
fn to_system_time(unix_secs: i64) -> Option<SystemTime> {
    let magnitude = Duration::from_secs(unix_secs.unsigned_abs());
    if unix_secs >= 0 { UNIX_EPOCH.checked_add(magnitude) } else { UNIX_EPOCH.checked_sub(magnitude) }
}

/// Why a private key cannot be used with a certificate.
#[derive(Debug)]
pub(crate) enum KeyProblem {
    /// No signer in rustls' ring provider accepts the key.
    Unsupported(String),
    /// The key is fine but its public half is not the certificate's.
    Mismatch,
}

/// Checks that the PKCS#8 key is usable by rustls and is the certificate's key.
pub(crate) fn check_key_matches(cert_der: &[u8], pkcs8: &[u8]) -> Result<(), KeyProblem> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8));
    let signer =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|err| KeyProblem::Unsupported(err.to_string()))?;
    // Every signer of the ring provider reports its public key; one that does not cannot be
    // compared, and rustls would use it anyway, so it is accepted.
    let Some(key_spki) = signer.public_key() else {
        return Ok(());
    };
    let Ok((_, key_spki)) = SubjectPublicKeyInfo::from_der(&key_spki) else {
        return Ok(());
    };
    let cert = parse(cert_der).map_err(KeyProblem::Unsupported)?;
    let cert_spki = cert.public_key();
    let same = cert_spki.algorithm.algorithm == key_spki.algorithm.algorithm
        && cert_spki.subject_public_key.data == key_spki.subject_public_key.data;
    if same { Ok(()) } else { Err(KeyProblem::Mismatch) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_on_both_sides_of_the_epoch() {
        assert_eq!(to_system_time(0), Some(UNIX_EPOCH));
        assert_eq!(to_system_time(86_400), Some(UNIX_EPOCH + Duration::from_secs(86_400)));
        assert_eq!(to_system_time(-86_400), UNIX_EPOCH.checked_sub(Duration::from_secs(86_400)));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(inspect(b"").is_err());
        assert!(inspect(b"\x30\x03\x02\x01\x00").is_err());
        assert!(inspect(&[0xff; 64]).is_err());
    }
}
