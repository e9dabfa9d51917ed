//! The server's TLS identity: where it comes from, how it becomes a wtransport config, how it
//! is swapped without dropping sessions, and which hashes are published for pages to pin.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use downbeat_certs::{CertError, CertifiedKey, DevIdentity, FileStamp};
use tracing::{error, info, warn};
use wtransport::config::{QuicTransportConfig, ServerConfigBuilder, TlsServerConfig};
use wtransport::tls::rustls;
use wtransport::tls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use wtransport::{Endpoint, ServerConfig};

use crate::config::Config;
use crate::shutdown::Shutdown;

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

/// Where the identity comes from.
#[derive(Debug)]
pub(crate) enum Source {
    /// Self-signed, rotated, hashes published.
    Dev(Box<DevIdentity>),
    /// Operator-provided PEM files, reloaded when they change.
    Pem { cert: PathBuf, key: PathBuf, stamp: Option<FileStamp> },
}

/// Loads (or creates) the identity the config asks for: the source, the key to serve now,
/// and the hashes to publish.
pub(crate) fn load(config: &Config) -> Result<(Source, CertifiedKey), IdentityError> {
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
            Self::Pem { .. } => Vec::new(),
        }
    }
}

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
    // Datagrams are small and a few per second per session; keep each session's buffers small.
    transport.datagram_receive_buffer_size(Some(64 * 1024));
    transport.datagram_send_buffer_size(64 * 1024);
    Ok(transport)
}

/// rustls server config for `key`, with the WebTransport ALPN. Refuses (never panics on) a
/// key that does not fit the certificate.
fn tls_config(key: &CertifiedKey) -> Result<TlsServerConfig, IdentityError> {
    Ok(rustls_server_config(key, wtransport::tls::WEBTRANSPORT_ALPN)?)
}

/// A TLS 1.3 (ring) rustls server config presenting `key`'s chain, offering one ALPN
/// protocol: WebTransport's for the QUIC endpoint, `http/1.1` for the HTTPS listener.
pub(crate) fn rustls_server_config(key: &CertifiedKey, alpn: &[u8]) -> Result<TlsServerConfig, rustls::Error> {
    let chain: Vec<CertificateDer<'static>> = if key.chain_der.is_empty() {
        vec![CertificateDer::from(key.cert_der.clone())]
    } else {
        key.chain_der.iter().cloned().map(CertificateDer::from).collect()
    };
    let private = PrivateKeyDer::try_from(key.key_der.clone())
        .unwrap_or_else(|_| PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.key_der.clone())));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = TlsServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, private)?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

/// A complete wtransport server config from a bind step, the identity and the config.
pub(crate) fn server_config(
    builder: ServerConfigBuilder<wtransport::config::states::WantsIdentity>,
    key: &CertifiedKey,
    config: &Config,
) -> Result<ServerConfig, IdentityError> {
    Ok(builder.with_custom_tls_and_transport(tls_config(key)?, transport_config(config)?).build())
}

/// Keeps the endpoint's identity fresh until shutdown: rotates the development certificate
/// (checked hourly) or reloads changed production PEM files (checked every `tls_reload_check_ms`, 10 s by default). Existing
/// sessions keep their connection; only new handshakes see the new certificate. A failed
/// reload is logged and the old identity kept.
pub(crate) async fn maintain(
    mut source: Source,
    endpoint: Arc<Endpoint<wtransport::endpoint::endpoint_side::Server>>,
    published: Arc<PublishedHashes>,
    config: Config,
    mut shutdown: Shutdown,
) {
    let period = match source {
        Source::Dev(_) => DEV_ROTATION_CHECK,
        Source::Pem { .. } => config.tls_reload_check(),
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
        let reloaded = server_config(ServerConfig::builder().with_bind_default(0), &new_key, &config).and_then(|c| {
            endpoint.reload_config(c, false).map_err(|e| {
                error!(error = %e, "reloading the endpoint config failed");
                IdentityError::Transport("reload failed")
            })
        });
        match reloaded {
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
        assert!(server_config(ServerConfig::builder().with_bind_default(0), &a.current, &config).is_ok());
        assert!(server_config(ServerConfig::builder().with_bind_default(0), &mixed, &config).is_err());
        mixed.key_der = vec![1, 2, 3];
        assert!(server_config(ServerConfig::builder().with_bind_default(0), &mixed, &config).is_err());
    }
}
