//! HTTP/1.1 requests this server makes itself (to the ACME CA, to another node of the
//! cluster): one connection per request, plain TCP for `http://` and TLS on ring for
//! `https://`, trusting the Mozilla roots plus any extra ones given.

use std::sync::Arc;

use hyper::body::{Body, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, RootCertStore};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A TLS client configuration for HTTP/1.1 trusting the Mozilla roots and `extra`.
pub(crate) fn tls_connector(extra: Vec<CertificateDer<'static>>) -> Result<TlsConnector, rustls::Error> {
    let mut roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    for cert in extra {
        roots.add(cert)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(tls)))
}

/// Sends `request` (its URI absolute: `http://` or `https://`) on a connection of its own and
/// returns the response as it starts; its body streams from the connection.
pub(crate) async fn send<B>(
    tls: &TlsConnector,
    mut request: hyper::Request<B>,
) -> Result<hyper::Response<Incoming>, BoxError>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let uri = request.uri().clone();
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(format!("{uri}: not an http:// or https:// URL").into()),
    };
    let host = uri.host().ok_or_else(|| format!("{uri}: no host"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = TcpStream::connect((host.as_str(), port)).await?;
    let authority = uri.authority().map(|a| a.as_str().to_owned()).unwrap_or_else(|| host.clone());
    request.headers_mut().insert(hyper::header::HOST, hyper::header::HeaderValue::from_str(&authority)?);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    *request.uri_mut() = path.parse()?;
    if https {
        let name = ServerName::try_from(host)?;
        over(tls.connect(name, tcp).await?, request).await
    } else {
        over(tcp, request).await
    }
}

async fn over<IO, B>(io: IO, request: hyper::Request<B>) -> Result<hyper::Response<Incoming>, BoxError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(connection);
    Ok(sender.send_request(request).await?)
}
