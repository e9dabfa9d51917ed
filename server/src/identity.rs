//! The server's TLS identity: where it comes from, how it becomes a wtransport config, how it
//! is swapped without dropping sessions (the [`Installer`] puts a new certificate into the
//! WebTransport endpoint and the HTTPS listener at once), which hashes are published for pages
//! to pin, and what `/api/health` says about it ([`TlsHealth`]).

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use downbeat_certs::{CertError, CertifiedKey, DevIdentity, FileStamp};
use serde::Serialize;
use tracing::{error, info, warn};
use wtransport::config::{QuicTransportConfig, TlsServerConfig};
use wtransport::quinn;
use wtransport::tls::rustls;
use wtransport::tls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::acme::Acme;
use crate::api::CertResolver;
use crate::config::Config;
use crate::shutdown::Shutdown;
use crate::stats::Stats;

/// How often a development identity is checked for rotation.
const DEV_ROTATION_CHECK: Duration = Duration::from_secs(3600);

/// Why a TLS identity could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The certificate crate refused (unreadable or invalid files, generation failed).
    #[error(transparent)]
    Cert(#[from] CertError),
    /// rustls refused the certificate and key.
    #[error("the TLS certificate and key cannot be used: {0}")]
    Tls(#[from] rustls::Error),
    /// A transport setting was out of range.
    #[error("invalid QUIC transport setting: {0}")]
    Transport(&'static str),
}

/// A hash published for pages to pin with `serverCertificateHashes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublishedHash {
    /// SHA-256 of the certificate's DER.
    pub sha256: [u8; 32],
    /// When the certificate expires.
    pub not_after: SystemTime,
}

/// Hashes shared between the rotation task (writer) and HTTP (readers): current first.
#[derive(Debug, Default)]
pub(crate) struct PublishedHashes(RwLock<Vec<PublishedHash>>);

impl PublishedHashes {
    pub(crate) fn get(&self) -> Vec<PublishedHash> {
        match self.0.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub(crate) fn set(&self, hashes: Vec<PublishedHash>) {
        match self.0.write() {
            Ok(mut guard) => *guard = hashes,
            Err(poisoned) => *poisoned.into_inner() = hashes,
        }
    }
}

/// What `/api/health` says about the certificate in use. Written by whoever installs one
/// (and by the ACME task about its orders), read by the health route.
#[derive(Debug, Default)]
pub(crate) struct TlsHealth(RwLock<TlsView>);

/// The certificate in use, as `/api/health` shows it.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct TlsView {
    /// `development`, `files` or `acme`.
    pub(crate) source: &'static str,
    /// SHA-256 of the certificate in use, hex.
    pub(crate) sha256: String,
    /// When it expires, in seconds since the Unix epoch.
    pub(crate) not_after_unix: u64,
    /// ACME's state, when the certificate comes from ACME.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) acme: Option<AcmeView>,
}

/// ACME's state in `/api/health`.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct AcmeView {
    /// The domain the certificate is for.
    pub(crate) domain: String,
    /// Whether a certificate from the CA is in use (before the first issuance the server
    /// presents a self-signed placeholder that no browser trusts).
    pub(crate) issued: bool,
    /// Orders that failed in a row (0: the last one succeeded or none failed yet).
    pub(crate) failures_in_a_row: u32,
    /// What the last failure was, as a stable word (`directory_unreachable`,
    /// `account_refused`, `validation_failed`, `order_failed`, `storage_failed`), while
    /// failing; the details are in the log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) last_error: Option<&'static str>,
    /// When the next order is due, in seconds since the Unix epoch.
    pub(crate) next_attempt_unix: u64,
}

impl TlsHealth {
    /// The health of `key` from `source`, as loaded at startup.
    pub(crate) fn new(source: &Source, key: &CertifiedKey) -> Self {
        Self(RwLock::new(TlsView {
            source: source.name(),
            sha256: key.sha256_hex(),
            not_after_unix: unix_secs(key.not_after),
            acme: match source {
                Source::Acme(acme) => Some(acme.view(0, None, acme.renewal_due())),
                _ => None,
            },
        }))
    }

    /// What to show now.
    pub(crate) fn view(&self) -> TlsView {
        self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Changes what is shown.
    pub(crate) fn update(&self, change: impl FnOnce(&mut TlsView)) {
        change(&mut self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner));
    }
}

impl TlsView {
    /// Why the server cannot serve browsers properly, if it cannot: no certificate from the
    /// CA yet, or the one in use has expired. A failing renewal while the certificate is
    /// still valid is shown in `acme` but is not a reason: nothing is broken yet.
    pub(crate) fn degraded_reason(&self, now: SystemTime) -> Option<&'static str> {
        if self.acme.as_ref().is_some_and(|acme| !acme.issued) {
            return Some("certificate_pending");
        }
        (unix_secs(now) >= self.not_after_unix).then_some("certificate_expired")
    }
}

/// Seconds since the Unix epoch (0 before it).
pub(crate) fn unix_secs(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Where the identity comes from.
#[derive(Debug)]
pub(crate) enum Source {
    /// Self-signed, rotated, hashes published.
    Dev(Box<DevIdentity>),
    /// Operator-provided PEM files, reloaded when they change.
    Pem { cert: PathBuf, key: PathBuf, stamp: Option<FileStamp> },
    /// Obtained and renewed with ACME by [`crate::acme::maintain`].
    Acme(Box<Acme>),
}

impl Source {
    /// How `/api/health` names the source.
    fn name(&self) -> &'static str {
        match self {
            Self::Dev(_) => "development",
            Self::Pem { .. } => "files",
            Self::Acme(_) => "acme",
        }
    }
}

/// Loads (or creates) the identity the config asks for: the source, the key to serve now,
/// and the hashes to publish.
pub(crate) fn load(config: &Config) -> Result<(Source, CertifiedKey), IdentityError> {
    if config.acme_domain.is_some() {
        let (acme, key) = Acme::load(config)?;
        return Ok((Source::Acme(Box::new(acme)), key));
    }
    match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            // Stamp first: if the files change between the two calls, the next poll reloads.
            let stamp = downbeat_certs::pem_files_stamp(cert, key).ok();
            let loaded = downbeat_certs::load_pem_files(cert, key)?;
            Ok((Source::Pem { cert: cert.clone(), key: key.clone(), stamp }, loaded))
        }
        _ => {
            let dir = config.data_dir.join("certs");
            let identity = DevIdentity::load_or_create(&dir, &config.dev_cert_hostnames(), SystemTime::now())?;
            let current = identity.current.clone();
            Ok((Source::Dev(Box::new(identity)), current))
        }
    }
}

impl Source {
    /// The hashes pages should pin: current then next for development, none for production
    /// (a browser-trusted certificate needs no pinning).
    pub(crate) fn published(&self) -> Vec<PublishedHash> {
        match self {
            Self::Dev(identity) => [&identity.current, &identity.next]
                .into_iter()
                .map(|k| PublishedHash { sha256: k.sha256(), not_after: k.not_after })
                .collect(),
            Self::Pem { .. } | Self::Acme(_) => Vec::new(),
        }
    }
}

/// Puts a new certificate in use everywhere at once: the WebTransport endpoint's config is
/// reloaded and the HTTPS listener's resolver swapped. Open sessions and connections keep the
/// certificate they started with; new handshakes get the new one.
pub(crate) struct Installer {
    pub(crate) endpoint: Arc<crate::quic::Endpoint>,
    pub(crate) https: Option<Arc<CertResolver>>,
    pub(crate) config: Config,
    pub(crate) stats: Arc<Stats>,
    pub(crate) health: Arc<TlsHealth>,
}

impl std::fmt::Debug for Installer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Installer").field("https", &self.https.is_some()).finish_non_exhaustive()
    }
}

impl Installer {
    /// Installs `key`; on an error nothing changed.
    pub(crate) fn install(&self, key: &CertifiedKey) -> Result<(), IdentityError> {
        let config = server_config(key, &self.config)?;
        self.endpoint.set_server_config(config);
        if let Some(https) = &self.https {
            // The same chain and key were just accepted for WebTransport, so this cannot
            // refuse them in practice; if it did, HTTPS would keep the old certificate.
            https.set(key)?;
        }
        self.shown(key);
        Ok(())
    }

    /// Records `key` as the certificate in use, for `/metrics` and `/api/health`.
    pub(crate) fn shown(&self, key: &CertifiedKey) {
        self.stats.tls_certificate_not_after.set(unix_secs(key.not_after));
        self.health.update(|view| {
            view.sha256 = key.sha256_hex();
            view.not_after_unix = unix_secs(key.not_after);
        });
    }
}

/// Bytes a peer may send on one stream before the server has read them (four largest frames).
const STREAM_WINDOW: u32 = 64 * 1024;
/// Bytes a peer may send on all its streams together before the server has read them, and
/// unacknowledged bytes the server sends to one peer.
const SESSION_WINDOW: u32 = 256 * 1024;

/// The QUIC transport settings every config (first bind and every reload) carries.
fn transport_config(config: &Config) -> Result<QuicTransportConfig, IdentityError> {
    let mut transport = QuicTransportConfig::default();
    let idle = wtransport::quinn::IdleTimeout::try_from(config.idle_timeout())
        .map_err(|_| IdentityError::Transport("idle_timeout_ms too large"))?;
    transport.max_idle_timeout(Some(idle));
    transport.keep_alive_interval(Some(config.keep_alive()));
    // A session needs its CONNECT stream and one control stream; HTTP/3 needs three
    // unidirectional streams per side. Anything beyond a few is a peer wasting our memory.
    transport.max_concurrent_bidi_streams(wtransport::quinn::VarInt::from_u32(4));
    transport.max_concurrent_uni_streams(wtransport::quinn::VarInt::from_u32(8));
    // A client sends one control stream of frames of at most 16 KiB, mostly far smaller: a
    // window of a few frames is all it needs, and bounds what a peer makes the server buffer.
    // What the server sends is bounded by the same reasoning (a welcome, then events).
    transport.stream_receive_window(wtransport::quinn::VarInt::from_u32(STREAM_WINDOW));
    transport.receive_window(wtransport::quinn::VarInt::from_u32(SESSION_WINDOW));
    transport.send_window(u64::from(SESSION_WINDOW));
    // Datagrams are small and a few per second per session; keep each session's buffers small.
    transport.datagram_receive_buffer_size(Some(64 * 1024));
    transport.datagram_send_buffer_size(64 * 1024);
    // No path MTU discovery: every packet the server sends fits QUIC's 1,200-byte minimum,
    // which every path must carry. Beat frames and sync replies are a few dozen bytes and
    // control frames are small, so a larger MTU would carry nothing faster, while the probes
    // (a binary search above 1,200 bytes after every handshake, repeated every ten minutes)
    // cost each session packets both ways.
    transport.mtu_discovery_config(None);
    Ok(transport)
}

/// rustls server config for `key`, with the WebTransport ALPN. Refuses (never panics on) a
/// key that does not fit the certificate.
fn tls_config(key: &CertifiedKey) -> Result<TlsServerConfig, IdentityError> {
    Ok(rustls_server_config(key, wtransport::tls::WEBTRANSPORT_ALPN)?)
}

/// `key`'s chain (leaf first; the leaf alone if no chain is given) and private key as rustls
/// takes them.
pub(crate) fn rustls_chain_and_key(key: &CertifiedKey) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let chain: Vec<CertificateDer<'static>> = if key.chain_der.is_empty() {
        vec![CertificateDer::from(key.cert_der.clone())]
    } else {
        key.chain_der.iter().cloned().map(CertificateDer::from).collect()
    };
    let private = PrivateKeyDer::try_from(key.key_der.clone())
        .unwrap_or_else(|_| PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.key_der.clone())));
    (chain, private)
}

/// A TLS 1.3 (ring) rustls server config presenting `key`'s chain, offering one ALPN
/// protocol: WebTransport's.
fn rustls_server_config(key: &CertifiedKey, alpn: &[u8]) -> Result<TlsServerConfig, rustls::Error> {
    let (chain, private) = rustls_chain_and_key(key);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = TlsServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, private)?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

/// The QUIC server config for the identity `key` and `config`'s transport settings.
pub(crate) fn server_config(key: &CertifiedKey, config: &Config) -> Result<quinn::ServerConfig, IdentityError> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls_config(key)?)
        .map_err(|_| IdentityError::Transport("the TLS config has no cipher suite QUIC can use"))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport_config(config)?));
    Ok(server)
}

/// Keeps the identity fresh until shutdown: rotates the development certificate (checked
/// hourly), reloads changed production PEM files (checked every `tls_reload_check_ms`, 10 s by
/// default), or hands an ACME source to [`crate::acme::maintain`]. Existing sessions keep
/// their connection; only new handshakes see the new certificate. A failed reload is logged
/// and the old identity kept.
pub(crate) async fn maintain(
    mut source: Source,
    installer: Installer,
    published: Arc<PublishedHashes>,
    mut shutdown: Shutdown,
) {
    let period = match source {
        Source::Dev(_) => DEV_ROTATION_CHECK,
        Source::Pem { .. } => installer.config.tls_reload_check(),
        Source::Acme(acme) => return crate::acme::maintain(*acme, installer, shutdown).await,
    };
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await; // The first tick is immediate; the identity was just loaded.
    loop {
        tokio::select! {
            () = shutdown.wait() => return,
            _ = ticker.tick() => {}
        }
        let new_key = match &mut source {
            Source::Acme(_) => None,
            Source::Dev(identity) => match identity.rotate_if_due(SystemTime::now()) {
                Ok(true) => Some(identity.current.clone()),
                Ok(false) => None,
                Err(e) => {
                    error!(error = %e, "development certificate rotation failed; keeping the current one");
                    None
                }
            },
            Source::Pem { cert, key, stamp } => {
                match downbeat_certs::pem_files_stamp(cert, key) {
                    Ok(now_stamp) if stamp.as_ref() == Some(&now_stamp) => None,
                    Ok(now_stamp) => match downbeat_certs::load_pem_files(cert, key) {
                        Ok(loaded) => {
                            *stamp = Some(now_stamp);
                            Some(loaded)
                        }
                        Err(e) => {
                            // Remember the stamp so a bad file is reported once, not every poll.
                            *stamp = Some(now_stamp);
                            error!(error = %e, "new TLS files are not usable; keeping the old identity");
                            None
                        }
                    },
                    Err(e) => {
                        warn!(error = %e, "cannot check the TLS files; keeping the old identity");
                        None
                    }
                }
            }
        };
        let Some(new_key) = new_key else { continue };
        match installer.install(&new_key) {
            Ok(()) => {
                published.set(source.published());
                info!(sha256 = %new_key.sha256_hex(), "TLS certificate replaced; open sessions continue");
            }
            Err(e) => error!(error = %e, "new TLS identity refused; keeping the old one"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_that_does_not_match_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let a = DevIdentity::load_or_create(&dir.join("a"), &["localhost".into()], SystemTime::now()).unwrap();
        let b = DevIdentity::load_or_create(&dir.join("b"), &["localhost".into()], SystemTime::now()).unwrap();
        let mut mixed = a.current.clone();
        mixed.key_der = b.current.key_der.clone();
        let config = Config::default();
        assert!(server_config(&a.current, &config).is_ok());
        assert!(server_config(&mixed, &config).is_err());
        mixed.key_der = vec![1, 2, 3];
        assert!(server_config(&mixed, &config).is_err());
    }
}
