//! TLS certificates for the Downbeat timing server.
//!
//! Two sources of a server identity:
//!
//! - **Development**: [`DevIdentity`] makes self-signed ECDSA P-256 certificates valid for
//!   just under 14 days, the longest Chrome accepts for `serverCertificateHashes` pinning.
//!   It keeps two of them, `current` (served) and `next` (published ahead of time, so pages
//!   that fetched both hashes keep connecting across a switch), persists them as PEM files
//!   in a directory, and rotates them before `current` expires. The two are staggered:
//!   `next` becomes valid an hour before `current` is due for rotation, so each certificate
//!   serves about ten days and rotation happens once per cycle.
//! - **Production**: [`load_pem_files`] reads a certificate chain and private key that a
//!   browser trusts (for example from an ACME client), and [`pem_files_stamp`] lets the
//!   server notice when those files are replaced and reload them.
//! - **ACME**: [`acme`] holds the certificate side of the server's ACME client: a key and CSR
//!   for the domain, the TLS-ALPN-01 challenge certificate, a placeholder served until the
//!   first issuance, when a certificate is due for renewal, and the [`acme::AcmeStore`]
//!   directory for the account and the issued certificate.
//!
//! Both produce a [`CertifiedKey`]: DER bytes plus the validity period, and the SHA-256 hash
//! that pages pin.
//!
//! What this crate deliberately does not do:
//!
//! - It never reads the clock: every time-dependent call takes `now`, so rotation and expiry
//!   are tested with made-up times.
//! - It does no I/O beyond `std::fs` on the paths it is given: no network (the ACME protocol
//!   itself is the server's), no background tasks or timers. The server decides when to call
//!   [`DevIdentity::rotate_if_due`] or to poll [`pem_files_stamp`].
//! - It does not know about `wtransport` or `tokio`; the server turns the DER bytes into
//!   its own TLS types.
//! - It does not verify a production chain against trust roots: that is the browser's job,
//!   and the files are the operator's choice. It only checks that they parse and that the
//!   key belongs to the leaf certificate.

pub mod acme;
mod der;
mod dev;
mod files;
mod x509;

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

pub use dev::DevIdentity;
pub use files::{FileStamp, load_pem_files, pem_files_stamp};

/// How long a development certificate is valid: 13 days 23 hours.
///
/// Chrome only accepts a pinned certificate (`serverCertificateHashes`) whose validity
/// period is at most 14 days; staying an hour under leaves no room for rounding doubts.
pub const DEV_CERT_VALIDITY: Duration = Duration::from_secs((13 * 24 + 23) * 60 * 60);

/// `current` is replaced when it has less than this left (4 days).
///
/// `next` becomes valid an hour before that point, so a promoted certificate serves for
/// `DEV_CERT_VALIDITY - ROTATE_BEFORE - 1 h`, just under ten days, before it is due itself.
pub const ROTATE_BEFORE: Duration = Duration::from_secs(4 * 24 * 60 * 60);

/// A certificate chain with its private key, as DER, and the leaf's validity period.
#[derive(Clone)]
pub struct CertifiedKey {
    /// The leaf certificate, DER.
    pub cert_der: Vec<u8>,
    /// The full chain, leaf first; for a self-signed certificate just the leaf.
    pub chain_der: Vec<Vec<u8>>,
    /// The private key of the leaf, PKCS#8 DER. Never printed by `Debug`.
    pub key_der: Vec<u8>,
    /// Start of the leaf's validity period.
    pub not_before: SystemTime,
    /// End of the leaf's validity period.
    pub not_after: SystemTime,
}

impl CertifiedKey {
    /// SHA-256 of the leaf certificate's DER: the value browsers pin with
    /// `serverCertificateHashes`.
    #[must_use]
    pub fn sha256(&self) -> [u8; 32] {
        Sha256::digest(&self.cert_der).into()
    }

    /// [`Self::sha256`] as lowercase hex.
    #[must_use]
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256())
    }

    /// Whether `now` lies inside the validity period (`not_before <= now < not_after`).
    #[must_use]
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }

    /// Time left until `not_after`, zero once it has passed.
    #[must_use]
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or(Duration::ZERO)
    }

    /// The chain (leaf first; just the leaf if `chain_der` is empty) as `CERTIFICATE` PEM
    /// blocks, and the key as a PKCS#8 `PRIVATE KEY` PEM block: what [`load_pem_files`]
    /// reads back. The key string is secret; handle it like the key itself.
    #[must_use]
    pub fn to_pem(&self) -> (String, String) {
        let chain: Vec<&[u8]> = if self.chain_der.is_empty() {
            vec![self.cert_der.as_slice()]
        } else {
            self.chain_der.iter().map(Vec::as_slice).collect()
        };
        let cert_pem = chain.into_iter().map(|der| der::pem_encode("CERTIFICATE", der)).collect();
        (cert_pem, der::pem_encode("PRIVATE KEY", &self.key_der))
    }
}

impl fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertifiedKey")
            .field("sha256", &self.sha256_hex())
            .field("chain_len", &self.chain_der.len())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("key_der", &"<redacted>")
            .finish()
    }
}

/// Why a certificate could not be loaded, generated or saved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// Reading, writing or inspecting a file or directory failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// rcgen could not build or sign a certificate.
    #[error("generating a certificate failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A hostname given for the development certificate is neither an IP address nor a
    /// DNS name.
    #[error("{name:?} cannot be put in a certificate: {reason}")]
    InvalidHostname {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A time cannot be written into a certificate (before 1970 or absurdly far ahead).
    #[error("the time {0:?} cannot be written into a certificate")]
    TimeOutOfRange(SystemTime),
    /// A file was read but its contents are not what was expected.
    #[error("{}: {reason}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A certificate file holds no `CERTIFICATE` PEM block.
    #[error("{}: no PEM certificate found (expected `-----BEGIN CERTIFICATE-----`)", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A key file holds no unencrypted private key PEM block.
    #[error(
        "{}: no PEM private key found (expected an unencrypted `PRIVATE KEY`, \
         `RSA PRIVATE KEY` or `EC PRIVATE KEY` block)",
        path.display()
    )]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// The private key is of a kind rustls cannot sign with.
    #[error("{}: unsupported private key: {reason}", path.display())]
    UnsupportedKey {
        /// The key file.
        path: PathBuf,
        /// What rustls or this crate said.
        reason: String,
    },
    /// The private key does not belong to the leaf certificate.
    #[error(
        "the private key in {} does not belong to the certificate in {}",
        key_path.display(),
        cert_path.display()
    )]
    KeyMismatch {
        /// The certificate file.
        cert_path: PathBuf,
        /// The key file.
        key_path: PathBuf,
    },
}

impl CertError {
    fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn to_pem_round_trips_through_load_pem_files() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let identity = DevIdentity::load_or_create(&tmp.path().join("dev"), &["localhost".into()], SystemTime::now())
            .expect("dev");
        let mut key = identity.current.clone();
        key.chain_der = vec![identity.current.cert_der.clone(), identity.next.cert_der.clone()];
        let (cert_pem, key_pem) = key.to_pem();
        assert_eq!(cert_pem.matches("-----BEGIN CERTIFICATE-----").count(), 2);
        assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{key_pem}");
        let (cert_path, key_path) = (tmp.path().join("chain.pem"), tmp.path().join("key.pem"));
        std::fs::write(&cert_path, &cert_pem).expect("write");
        std::fs::write(&key_path, &key_pem).expect("write");
        let loaded = load_pem_files(&cert_path, &key_path).expect("loads");
        assert_eq!(loaded.sha256(), key.sha256());
        assert_eq!(loaded.chain_der, key.chain_der);
        assert_eq!(loaded.key_der, key.key_der);

        let mut leaf_only = identity.current.clone();
        leaf_only.chain_der.clear();
        assert_eq!(leaf_only.to_pem().0.matches("BEGIN CERTIFICATE").count(), 1);
    }
}
