//! The certificate side of ACME (RFC 8555): what the server's ACME client needs that is about
//! certificates and files rather than the protocol. A key and CSR for a domain, the
//! TLS-ALPN-01 challenge certificate (RFC 8737), a placeholder served until the first
//! certificate is issued, when a certificate is due for renewal, and a [`AcmeStore`]
//! directory for the account and the issued certificate (private files 0600).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, CustomExtension, DistinguishedName, DnType, KeyPair};
use sha2::{Digest, Sha256};

use crate::files::{self, Visibility, parse_pem_pair};
use crate::x509::San;
use crate::{CertError, CertifiedKey, der};

/// The ALPN protocol of TLS-ALPN-01 validation handshakes (RFC 8737 section 6.2).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// How long the placeholder served before the first issuance is valid.
const PLACEHOLDER_VALIDITY: Duration = Duration::from_secs(24 * 60 * 60);

/// A fresh ECDSA P-256 key for `domain` (PKCS#8 DER) and a certificate signing request for
/// it (DER) naming `domain` as its only subject alternative name.
///
/// # Errors
///
/// [`CertError::InvalidHostname`] when `domain` is not a DNS name, [`CertError::Generate`]
/// when rcgen fails.
pub fn key_and_csr(domain: &str) -> Result<(Vec<u8>, Vec<u8>), CertError> {
    let mut params = CertificateParams::new(vec![dns_name(domain)?])?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, domain);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_der(), csr.der().to_vec()))
}

/// The self-signed certificate that answers a TLS-ALPN-01 challenge for `domain`: it names
/// only `domain` and carries the critical `acmeIdentifier` extension holding
/// `key_authorization_sha256`, the SHA-256 of the challenge's key authorization.
///
/// # Errors
///
/// As [`key_and_csr`].
pub fn tls_alpn_01_certificate(domain: &str, key_authorization_sha256: &[u8]) -> Result<CertifiedKey, CertError> {
    let mut params = CertificateParams::new(vec![dns_name(domain)?])?;
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(key_authorization_sha256)];
    let (not_before, not_after) = (params.not_before.into(), params.not_after.into());
    crate::dev::self_signed(params, not_before, not_after)
}

/// A self-signed certificate for `domain`, valid for a day from `now`: what the server
/// presents before its first certificate is issued, so its listeners can run (and answer the
/// TLS-ALPN-01 challenge) meanwhile. No browser trusts it, and nobody should pin it.
///
/// # Errors
///
/// As [`key_and_csr`], and [`CertError::TimeOutOfRange`] for an absurd `now`.
pub fn placeholder(domain: &str, now: SystemTime) -> Result<CertifiedKey, CertError> {
    let san = San::Dns(dns_name(domain)?);
    crate::dev::generate_with_validity(&[san], now, PLACEHOLDER_VALIDITY)
}

/// When a certificate valid from `not_before` to `not_after` is due for renewal: once
/// `renew_before` is left, but never in the first half of its lifetime, so a margin longer
/// than a short-lived certificate's lifetime cannot turn into renewing over and over.
#[must_use]
pub fn renewal_due(not_before: SystemTime, not_after: SystemTime, renew_before: Duration) -> SystemTime {
    let lifetime = not_after.duration_since(not_before).unwrap_or(Duration::ZERO);
    let by_margin = not_after.checked_sub(renew_before).unwrap_or(not_before);
    by_margin.max(not_before + lifetime / 2)
}

/// A directory holding one ACME directory's account and the certificates issued by it:
/// `account.json` (the credentials, 0600), `<domain>.pem` (the chain) and `<domain>.key`
/// (its key, 0600). The server keeps one per directory URL, so switching from a staging CA
/// to a production one never serves the staging certificate.
#[derive(Clone, Debug)]
pub struct AcmeStore {
    dir: PathBuf,
}

impl AcmeStore {
    /// The store for `directory_url` under `parent`: `parent/<first 16 hex digits of the
    /// URL's SHA-256>`. Nothing is created until something is written.
    #[must_use]
    pub fn for_directory(parent: &Path, directory_url: &str) -> Self {
        let digest = Sha256::digest(directory_url.as_bytes());
        Self { dir: parent.join(hex::encode(&digest[..8])) }
    }

    /// The store's directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The saved account credentials, if any.
    ///
    /// # Errors
    ///
    /// [`CertError::Io`] when the file exists but cannot be read.
    pub fn read_account(&self) -> Result<Option<Vec<u8>>, CertError> {
        read_if_exists(&self.dir.join("account.json"))
    }

    /// Saves the account credentials (0600), replacing any before.
    ///
    /// # Errors
    ///
    /// [`CertError::Io`] when the directory or the file cannot be written.
    pub fn write_account(&self, credentials: &[u8]) -> Result<(), CertError> {
        self.create_dir()?;
        files::write_atomically(&self.dir.join("account.json"), credentials, Visibility::Private)
    }

    /// The saved certificate for `domain`, if there is one that loads and names `domain`.
    /// One that does not is logged and treated as missing (it will be replaced).
    ///
    /// # Errors
    ///
    /// [`CertError::Io`] when a file exists but cannot be read.
    pub fn read_certificate(&self, domain: &str) -> Result<Option<CertifiedKey>, CertError> {
        let (cert_path, key_path) = self.certificate_paths(domain);
        let (Some(cert_pem), Some(key_pem)) = (read_if_exists(&cert_path)?, read_if_exists(&key_path)?) else {
            return Ok(None);
        };
        match parse_pem_pair(&cert_pem, &key_pem, &cert_path, &key_path) {
            Ok((certified, leaf)) if leaf.sans.contains(&San::Dns(domain.to_ascii_lowercase())) => Ok(Some(certified)),
            Ok(_) => {
                tracing::warn!(path = %cert_path.display(), domain, "saved ACME certificate does not name the domain; ignoring it");
                Ok(None)
            }
            Err(e) => {
                tracing::warn!(error = %e, "saved ACME certificate is unusable; ignoring it");
                Ok(None)
            }
        }
    }

    /// Checks an issued chain (PEM, leaf first) against its key (PKCS#8 DER), and saves
    /// both: the key first (0600), then the chain, each replaced atomically. A crash between
    /// the two leaves a pair whose key does not match, which [`Self::read_certificate`]
    /// ignores.
    ///
    /// # Errors
    ///
    /// [`CertError::Parse`], [`CertError::NoCertificate`] or [`CertError::KeyMismatch`] when
    /// the chain is not a certificate for the key; [`CertError::Io`] when writing fails.
    pub fn write_certificate(&self, domain: &str, chain_pem: &str, key_der: &[u8]) -> Result<CertifiedKey, CertError> {
        let (cert_path, key_path) = self.certificate_paths(domain);
        let key_pem = der::pem_encode("PRIVATE KEY", key_der);
        let (certified, _) = parse_pem_pair(chain_pem.as_bytes(), key_pem.as_bytes(), &cert_path, &key_path)?;
        self.create_dir()?;
        files::write_atomically(&key_path, key_pem.as_bytes(), Visibility::Private)?;
        files::write_atomically(&cert_path, chain_pem.as_bytes(), Visibility::Public)?;
        Ok(certified)
    }

    fn certificate_paths(&self, domain: &str) -> (PathBuf, PathBuf) {
        let domain = domain.to_ascii_lowercase();
        (self.dir.join(format!("{domain}.pem")), self.dir.join(format!("{domain}.key")))
    }

    /// The store's directory, 0700 on Unix.
    fn create_dir(&self) -> Result<(), CertError> {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&self.dir).map_err(|e| CertError::io(&self.dir, e))
    }
}

/// `domain` as a DNS name for a certificate: ASCII letters, digits, `-` and dots, no IP
/// address, lowercased.
fn dns_name(domain: &str) -> Result<String, CertError> {
    let invalid = |reason: &str| CertError::InvalidHostname { name: domain.to_owned(), reason: reason.to_owned() };
    if domain.parse::<std::net::IpAddr>().is_ok() {
        return Err(invalid("ACME certificates here are for DNS names, not IP addresses"));
    }
    let valid_label = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if domain.len() > 253 || !domain.contains('.') || !domain.split('.').all(valid_label) {
        return Err(invalid("expected a fully qualified DNS name such as music.example.org"));
    }
    Ok(domain.to_ascii_lowercase())
}

fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>, CertError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CertError::io(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x509;

    const DAY: Duration = Duration::from_secs(24 * 60 * 60);

    #[test]
    fn renewal_is_due_at_the_margin_but_never_in_the_first_half() {
        let t0 = SystemTime::UNIX_EPOCH + 1000 * DAY;
        // A 90-day certificate with a 30-day margin: day 60.
        assert_eq!(renewal_due(t0, t0 + 90 * DAY, 30 * DAY), t0 + 60 * DAY);
        // A 6-day certificate with the same margin: half way, day 3.
        assert_eq!(renewal_due(t0, t0 + 6 * DAY, 30 * DAY), t0 + 3 * DAY);
        // No margin: at the end.
        assert_eq!(renewal_due(t0, t0 + 6 * DAY, Duration::ZERO), t0 + 6 * DAY);
        // A nonsense certificate that ends before it begins: at once.
        assert_eq!(renewal_due(t0, t0 - DAY, DAY), t0);
    }

    #[test]
    fn csr_and_challenge_certificate_name_the_domain() {
        let (key, csr) = key_and_csr("Music.Example.org").expect("csr");
        assert!(!key.is_empty() && !csr.is_empty());
        let digest = [7u8; 32];
        let challenge = tls_alpn_01_certificate("music.example.org", &digest).expect("challenge");
        let leaf = x509::inspect(&challenge.cert_der).expect("parses");
        assert_eq!(leaf.sans, vec![San::Dns("music.example.org".into())]);
        // The acmeIdentifier extension: OID 1.3.6.1.5.5.7.1.31, critical, OCTET STRING of the digest.
        let (_, cert) = x509_parser::parse_x509_certificate(&challenge.cert_der).expect("parses");
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier extension");
        assert!(ext.critical);
        assert_eq!(&ext.value[2..], &digest);
        x509::check_key_matches(&challenge.cert_der, &challenge.key_der).expect("its key");
    }

    #[test]
    fn names_that_are_not_dns_names_are_refused() {
        for bad in ["localhost", "127.0.0.1", "::1", "a..b", "-a.b", "a_b.org", ""] {
            assert!(matches!(key_and_csr(bad), Err(CertError::InvalidHostname { .. })), "{bad:?} should be refused");
        }
    }

    #[test]
    fn the_store_round_trips_and_keeps_keys_private() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = AcmeStore::for_directory(tmp.path(), "https://acme.example/dir");
        assert_ne!(
            store.dir(),
            AcmeStore::for_directory(tmp.path(), "https://other.example/dir").dir(),
            "one store per directory"
        );
        assert!(store.read_account().expect("reads").is_none());
        assert!(store.read_certificate("music.example.org").expect("reads").is_none());
        store.write_account(b"{\"id\":1}").expect("writes");
        assert_eq!(store.read_account().expect("reads").as_deref(), Some(&b"{\"id\":1}"[..]));

        // A self-signed stand-in for an issued chain.
        let issued = placeholder("music.example.org", SystemTime::now()).expect("cert");
        let (chain_pem, _) = issued.to_pem();
        let other = placeholder("music.example.org", SystemTime::now()).expect("cert");
        assert!(matches!(
            store.write_certificate("music.example.org", &chain_pem, &other.key_der),
            Err(CertError::KeyMismatch { .. })
        ));
        let saved = store.write_certificate("music.example.org", &chain_pem, &issued.key_der).expect("saves");
        assert_eq!(saved.sha256(), issued.sha256());
        let loaded = store.read_certificate("MUSIC.example.org").expect("reads").expect("there");
        assert_eq!(loaded.sha256(), issued.sha256());
        assert!(store.read_certificate("other.example.org").expect("reads").is_none());

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode =
                |name: &str| std::fs::metadata(store.dir().join(name)).expect("exists").permissions().mode() & 0o777;
            assert_eq!(mode("account.json"), 0o600);
            assert_eq!(mode("music.example.org.key"), 0o600);
            assert_eq!(std::fs::metadata(store.dir()).expect("exists").permissions().mode() & 0o777, 0o700);
        }
    }
}
