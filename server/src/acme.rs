//! Production certificates from ACME (RFC 8555), with `instant-acme` for the protocol.
//!
//! With `--acme-domain`, the server obtains a certificate for that name when it starts (unless
//! a saved one is still good), saves it with the account under the data directory
//! (`acme/<directory>/`, keys 0600), renews it once `acme_renew_before_secs` of its validity
//! is left (never in the first half of its lifetime), and puts every new certificate into
//! WebTransport and HTTPS at once through the [`Installer`]: open sessions keep theirs.
//!
//! The challenge is TLS-ALPN-01 (RFC 8737), answered by the HTTPS listener's
//! [`CertResolver`]: the CA connects to port 443 of the domain offering only `acme-tls/1`,
//! and gets a certificate that proves the order's key authorization. That port must be
//! reachable for browsers anyway, so ACME needs no other port (HTTP-01 would need port 80
//! too), and nothing of it reaches the HTTP API.
//!
//! A failed order (CA unreachable, validation refused, ...) is logged, counted in `/metrics`
//! and shown in `/api/health`; the certificate in use stays, and the order is retried after
//! `acme_retry_secs`, doubling with each failure in a row up to [`MAX_RETRY`]. Until the first
//! certificate is issued the server presents a self-signed placeholder for the domain, which
//! no browser trusts: `/api/health` says `degraded` (`certificate_pending`) meanwhile.
//!
//! The HTTP client under `instant-acme` is ours ([`AcmeHttp`]): hyper's HTTP/1.1 client over
//! tokio-rustls on ring, trusting the Mozilla roots (`webpki-roots`) plus
//! `--acme-directory-ca`, so the workspace keeps one TLS stack and one crypto backend.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use downbeat_certs::CertifiedKey;
use downbeat_certs::acme::{AcmeStore, key_and_csr, placeholder, renewal_due, tls_alpn_01_certificate};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, BytesResponse, ChallengeType, HttpClient,
    Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tracing::{error, info, warn};

use crate::api::CertResolver;
use crate::config::Config;
use crate::identity::{AcmeView, IdentityError, Installer, unix_secs};
use crate::outbound::BoxError;
use crate::shutdown::Shutdown;

/// The longest wait between failed orders.
const MAX_RETRY: Duration = Duration::from_secs(6 * 60 * 60);

/// The longest the renewal task sleeps before looking at the clock again, so a suspended
/// machine or a stepped wall clock does not postpone a renewal by much.
const MAX_SLEEP: Duration = Duration::from_secs(60 * 60);

/// How long one HTTP request to the CA may take, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the CA has to validate the challenge and to issue the certificate, each.
const ORDER_TIMEOUT: Duration = Duration::from_secs(90);

/// Why an order failed. The words are what `/api/health` shows; the details go to the log.
#[derive(Debug, thiserror::Error)]
enum AcmeError {
    /// The directory could not be reached or answered nonsense.
    #[error("the ACME directory is unreachable: {0}")]
    Directory(instant_acme::Error),
    /// The account could not be created or restored.
    #[error("the ACME account was refused: {0}")]
    Account(instant_acme::Error),
    /// The CA did not validate the domain.
    #[error("the CA did not validate {domain}: {detail}")]
    Validation { domain: String, detail: String },
    /// The order failed in another way.
    #[error("the ACME order failed: {0}")]
    Order(String),
    /// A key, CSR or file could not be made or written.
    #[error("storing the certificate failed: {0}")]
    Storage(#[from] downbeat_certs::CertError),
}

impl AcmeError {
    /// The stable word `/api/health` shows.
    fn word(&self) -> &'static str {
        match self {
            Self::Directory(_) => "directory_unreachable",
            Self::Account(_) => "account_refused",
            Self::Validation { .. } => "validation_failed",
            Self::Order(_) => "order_failed",
            Self::Storage(_) => "storage_failed",
        }
    }
}

impl From<instant_acme::Error> for AcmeError {
    fn from(e: instant_acme::Error) -> Self {
        Self::Order(e.to_string())
    }
}

/// The ACME source of the server's identity: what to ask for, where it is kept, and the
/// certificate from the CA in use (none while the placeholder is served).
#[derive(Debug)]
pub(crate) struct Acme {
    domain: String,
    email: Option<String>,
    directory: String,
    renew_before: Duration,
    retry: Duration,
    store: AcmeStore,
    http: AcmeHttp,
    issued: Option<CertifiedKey>,
}

impl Acme {
    /// Reads the saved certificate for the configured domain, or makes the placeholder: the
    /// source and the key to serve until the first order completes.
    pub(crate) fn load(config: &Config) -> Result<(Self, CertifiedKey), IdentityError> {
        let domain = config.acme_domain.clone().unwrap_or_default();
        let store = AcmeStore::for_directory(&config.data_dir.join("acme"), &config.acme_directory);
        let issued = store.read_certificate(&domain)?;
        let serving = match &issued {
            Some(saved) => {
                info!(%domain, sha256 = %saved.sha256_hex(), not_after = ?saved.not_after, "using the saved ACME certificate");
                saved.clone()
            }
            None => placeholder(&domain, SystemTime::now())?,
        };
        let http = AcmeHttp::new(config.acme_directory_ca.as_deref())?;
        let acme = Self {
            domain,
            email: config.acme_email.clone(),
            directory: config.acme_directory.clone(),
            renew_before: config.acme_renew_before(),
            retry: config.acme_retry(),
            store,
            http,
            issued,
        };
        Ok((acme, serving))
    }

    /// What `/api/health` shows after `failures` failed orders in a row, the last one failing
    /// with `last_error`, the next order being due at `next`.
    pub(crate) fn view(&self, failures: u32, last_error: Option<&'static str>, next: SystemTime) -> AcmeView {
        AcmeView {
            domain: self.domain.clone(),
            issued: self.issued.is_some(),
            failures_in_a_row: failures,
            last_error,
            next_attempt_unix: unix_secs(next),
        }
    }

    /// When the next order is due: now without a certificate from the CA, else at its
    /// renewal time.
    pub(crate) fn renewal_due(&self) -> SystemTime {
        match &self.issued {
            None => SystemTime::UNIX_EPOCH,
            Some(key) => renewal_due(key.not_before, key.not_after, self.renew_before),
        }
    }

    /// The wait after `failures` failed orders in a row.
    fn backoff(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        self.retry.saturating_mul(1 << doublings).min(MAX_RETRY.max(self.retry))
    }

    /// The saved account, or a new one (saved at once).
    async fn account(&self) -> Result<Account, AcmeError> {
        if let Some(saved) = self.store.read_account()? {
            match serde_json::from_slice::<AccountCredentials>(&saved) {
                Ok(credentials) => {
                    return Account::builder_with_http(Box::new(self.http.clone()))
                        .from_credentials(credentials)
                        .await
                        .map_err(AcmeError::Directory);
                }
                Err(e) => warn!(error = %e, "the saved ACME account does not parse; creating a new one"),
            }
        }
        let contact = self.email.as_ref().map(|email| format!("mailto:{email}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        let new = NewAccount { contact: &contacts, terms_of_service_agreed: true, only_return_existing: false };
        let (account, credentials) = Account::builder_with_http(Box::new(self.http.clone()))
            .create(&new, self.directory.clone(), None)
            .await
            .map_err(|e| match e {
                instant_acme::Error::Api(_) => AcmeError::Account(e),
                e => AcmeError::Directory(e),
            })?;
        let json = serde_json::to_vec(&credentials).map_err(|e| AcmeError::Order(e.to_string()))?;
        self.store.write_account(&json)?;
        info!(directory = %self.directory, "created an ACME account");
        Ok(account)
    }

    /// Runs one order for the domain to the end: the new certificate, checked and saved.
    async fn order(&self, resolver: &CertResolver) -> Result<CertifiedKey, AcmeError> {
        let account = self.account().await?;
        let identifiers = [Identifier::Dns(self.domain.clone())];
        let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
        let mut authorizations = order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization = authorization?;
            match authorization.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                status => return Err(self.invalid(format!("the authorization is {status:?}"))),
            }
            let mut challenge = authorization
                .challenge(ChallengeType::TlsAlpn01)
                .ok_or_else(|| self.invalid("the CA offers no TLS-ALPN-01 challenge".to_owned()))?;
            let digest = challenge.key_authorization().digest();
            let certificate = tls_alpn_01_certificate(&self.domain, digest.as_ref())?;
            resolver.set_challenge(&self.domain, &certificate).map_err(|e| AcmeError::Order(e.to_string()))?;
            challenge.set_ready().await?;
        }
        let status = order.poll_ready(&RetryPolicy::new().timeout(ORDER_TIMEOUT)).await?;
        if status != OrderStatus::Ready {
            let detail =
                order.state().error.as_ref().map_or_else(|| format!("the order is {status:?}"), |p| p.to_string());
            return Err(self.invalid(detail));
        }
        let (key_der, csr_der) = key_and_csr(&self.domain)?;
        order.finalize_csr(&csr_der).await?;
        let chain_pem = order.poll_certificate(&RetryPolicy::new().timeout(ORDER_TIMEOUT)).await?;
        Ok(self.store.write_certificate(&self.domain, &chain_pem, &key_der)?)
    }

    fn invalid(&self, detail: String) -> AcmeError {
        AcmeError::Validation { domain: self.domain.clone(), detail }
    }
}

/// Keeps the ACME certificate fresh until shutdown: orders one when none is saved or the one
/// in use is due, installs it, and retries failed orders with backoff while the certificate
/// in use stays.
pub(crate) async fn maintain(mut acme: Acme, installer: Installer, mut shutdown: Shutdown) {
    let Some(resolver) = installer.https.clone() else {
        // Config::validate insists on an HTTPS listener with ACME.
        error!("ACME needs the HTTPS listener to answer its challenge; no certificate will be obtained");
        return;
    };
    let mut failures: u32 = 0;
    let mut next = acme.renewal_due();
    let show = |acme: &Acme, failures: u32, last_error: Option<&'static str>, next: SystemTime| {
        let view = acme.view(failures, last_error, next);
        installer.health.update(|tls| tls.acme = Some(view));
    };
    loop {
        // Sleep until the next order is due, looking at the clock at least hourly.
        loop {
            let left = next.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
            if left.is_zero() {
                break;
            }
            tokio::select! {
                () = shutdown.wait() => return,
                () = tokio::time::sleep(left.min(MAX_SLEEP)) => {}
            }
        }
        info!(domain = %acme.domain, "ordering a certificate with ACME");
        let result = tokio::select! {
            () = shutdown.wait() => return,
            result = acme.order(&resolver) => result,
        };
        resolver.clear_challenge();
        let result = result.and_then(|key| match installer.install(&key) {
            Ok(()) => Ok(key),
            Err(e) => Err(AcmeError::Order(format!("the issued certificate cannot be used: {e}"))),
        });
        match result {
            Ok(key) => {
                info!(domain = %acme.domain, sha256 = %key.sha256_hex(), not_after = ?key.not_after, "ACME certificate in use; open sessions continue");
                acme.issued = Some(key);
                failures = 0;
                installer.stats.acme_certificates_issued.inc();
                installer.stats.acme_failing.set(0);
                next = acme.renewal_due();
                show(&acme, failures, None, next);
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let wait = acme.backoff(failures);
                error!(domain = %acme.domain, error = %e, failures_in_a_row = failures, retry_in = ?wait, "ACME order failed; keeping the certificate in use");
                installer.stats.acme_failures.inc();
                installer.stats.acme_failing.set(1);
                next = SystemTime::now() + wait;
                show(&acme, failures, Some(e.word()), next);
            }
        }
    }
}

/// The HTTP client `instant-acme` talks to the CA with: one HTTP/1.1 connection per request
/// (an order makes a handful) over TLS on ring, trusting the Mozilla roots and any extra ones
/// configured, each request within [`REQUEST_TIMEOUT`].
#[derive(Clone)]
struct AcmeHttp {
    tls: TlsConnector,
}

impl std::fmt::Debug for AcmeHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeHttp").finish_non_exhaustive()
    }
}

impl AcmeHttp {
    fn new(extra_roots: Option<&std::path::Path>) -> Result<Self, IdentityError> {
        let mut extra = Vec::new();
        if let Some(path) = extra_roots {
            let pem = std::fs::read(path)
                .map_err(|source| downbeat_certs::CertError::Io { path: path.to_path_buf(), source })?;
            extra = rustls_pemfile_certs(&pem, path)?;
        }
        Ok(Self { tls: crate::outbound::tls_connector(extra)? })
    }

    async fn send(tls: TlsConnector, request: hyper::Request<BodyWrapper<Bytes>>) -> Result<BytesResponse, BoxError> {
        if request.uri().scheme_str() != Some("https") {
            return Err(format!("{}: the ACME client speaks https only", request.uri()).into());
        }
        Ok(BytesResponse::from(crate::outbound::send(&tls, request).await?))
    }
}

impl HttpClient for AcmeHttp {
    fn request(
        &self,
        request: hyper::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let tls = self.tls.clone();
        Box::pin(async move {
            match tokio::time::timeout(REQUEST_TIMEOUT, Self::send(tls, request)).await {
                Ok(Ok(response)) => Ok(response),
                Ok(Err(e)) => Err(instant_acme::Error::Other(e)),
                Err(_) => Err(instant_acme::Error::Other("the ACME request timed out".into())),
            }
        })
    }
}

/// The certificates in a PEM file of trusted roots.
fn rustls_pemfile_certs(pem: &[u8], path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    use rustls::pki_types::pem::PemObject as _;
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| downbeat_certs::CertError::Parse { path: path.to_path_buf(), reason: format!("bad PEM: {e}") })?;
    if certs.is_empty() {
        return Err(downbeat_certs::CertError::NoCertificate { path: path.to_path_buf() }.into());
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acme(retry: Duration) -> Acme {
        let tmp = std::env::temp_dir();
        Acme {
            domain: "music.example.org".into(),
            email: None,
            directory: "https://acme.example/dir".into(),
            renew_before: Duration::from_secs(30 * 86_400),
            retry,
            store: AcmeStore::for_directory(&tmp, "https://acme.example/dir"),
            http: AcmeHttp::new(None).expect("client"),
            issued: None,
        }
    }

    #[test]
    fn retries_double_up_to_six_hours() {
        let a = acme(Duration::from_secs(600));
        let waits: Vec<u64> = (1..=8).map(|n| a.backoff(n).as_secs()).collect();
        assert_eq!(waits, [600, 1200, 2400, 4800, 9600, 19_200, 21_600, 21_600]);
        assert_eq!(a.backoff(u32::MAX), MAX_RETRY);
        // A retry longer than the cap is used as it is.
        assert_eq!(acme(Duration::from_secs(86_400)).backoff(3), Duration::from_secs(86_400));
    }

    #[test]
    fn without_a_certificate_an_order_is_due_at_once() {
        let mut a = acme(Duration::from_secs(1));
        assert!(a.renewal_due() <= SystemTime::now());
        let issued = placeholder("music.example.org", SystemTime::now()).expect("cert");
        let expected = renewal_due(issued.not_before, issued.not_after, a.renew_before);
        a.issued = Some(issued);
        assert_eq!(a.renewal_due(), expected);
    }
}
