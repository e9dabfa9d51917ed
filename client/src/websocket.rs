//! The WebSocket [`Transport`] (tokio-tungstenite), for networks that block QUIC: one socket
//! carries the control frames and the datagrams, each message tagged
//! ([`downbeat_protocol::ws`]).
//!
//! A reader task splits what arrives into the control bytes (never dropped) and datagrams (a
//! full backlog drops them, as QUIC would); a writer task owns the socket's sending half.
//! `ws://` connects in the clear; `wss://` pins `cert_hashes` like WebTransport does, or
//! trusts the system's roots when there are none.

use std::sync::Arc;

use downbeat_protocol::ws::{self, Unit};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::{WebSocketConfig, frame::coding::CloseCode};

use crate::transport::{Boxed, Transport};
use crate::{ClientError, ConnectOptions};

/// Datagrams received and not yet read before new ones are dropped.
const DATAGRAM_BACKLOG: usize = 64;
/// Messages waiting to be written (control frames wait for room; datagrams are dropped). About
/// what QUIC's datagram send buffer holds (1 MiB in quinn) of the client's largest datagrams,
/// so a burst of notes is dropped, or not, alike on both transports.
const WRITE_BACKLOG: usize = 1024;

/// A socket of either kind.
trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// An open WebSocket session.
pub(crate) struct WebSocket {
    out: mpsc::Sender<Message>,
    control: Mutex<mpsc::UnboundedReceiver<Vec<u8>>>,
    datagrams: Mutex<mpsc::Receiver<Vec<u8>>>,
    closed: watch::Receiver<Option<String>>,
}

impl WebSocket {
    /// Connects to `options.url` (`ws://` or `wss://`, path included) and starts the reader
    /// and writer tasks.
    pub(crate) async fn open(options: &ConnectOptions) -> Result<Self, ClientError> {
        let failed = |e: &dyn std::fmt::Display| ClientError::Connect(format!("{}: {e}", options.url));
        let request = options.url.as_str().into_client_request().map_err(|e| failed(&e))?;
        let uri = request.uri().clone();
        let secure = match uri.scheme_str() {
            Some("wss") => true,
            Some("ws") => false,
            _ => return Err(failed(&"a WebSocket URL starts with ws:// or wss://")),
        };
        let host = uri.host().ok_or_else(|| failed(&"no host"))?.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        let tcp = connect_tcp(host, port, options.bind_address).await.map_err(|e| failed(&e))?;
        tcp.set_nodelay(true).map_err(|e| failed(&e))?;
        let io: Box<dyn Io> = if secure {
            let config = tls::client_config(&options.cert_hashes).map_err(|e| failed(&e))?;
            let name = rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|e| failed(&e))?;
            let tls =
                tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.map_err(|e| failed(&e))?;
            Box::new(tls)
        } else {
            Box::new(tcp)
        };
        let config = WebSocketConfig::default()
            .max_message_size(Some(ws::MAX_MESSAGE_LEN))
            .max_frame_size(Some(ws::MAX_MESSAGE_LEN));
        let (socket, _) =
            tokio_tungstenite::client_async_with_config(request, io, Some(config)).await.map_err(|e| failed(&e))?;
        let (mut sink, mut stream) = socket.split();
        let (out, mut out_rx) = mpsc::channel::<Message>(WRITE_BACKLOG);
        let (control_tx, control) = mpsc::unbounded_channel();
        let (datagram_tx, datagrams) = mpsc::channel(DATAGRAM_BACKLOG);
        let (closed_tx, closed) = watch::channel(None);
        tokio::spawn(async move {
            while let Some(message) = out_rx.recv().await {
                let last = matches!(message, Message::Close(_));
                if sink.send(message).await.is_err() || last {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            let why = loop {
                let message = match stream.next().await {
                    None => break "the connection closed".to_owned(),
                    Some(Err(e)) => break e.to_string(),
                    Some(Ok(message)) => message,
                };
                match message {
                    Message::Binary(bytes) => match ws::split(&bytes) {
                        // The engine decodes the whole frame (after the tag) again from its header.
                        Ok(Unit::Control(_)) => {
                            let _ = control_tx.send(bytes[1..].to_vec());
                        }
                        Ok(Unit::Datagram(datagram)) => {
                            let _ = datagram_tx.try_send(datagram.to_vec());
                        }
                        Err(e) => break format!("the server sent a bad message: {e}"),
                    },
                    Message::Close(frame) => {
                        // Said as over WebTransport: the error's own number, not 4000 + it.
                        break match frame.map(|f| (u16::from(f.code), f.reason)) {
                            Some((code @ 4000..=4999, reason)) => {
                                format!("closed by the server: {reason} (code {})", code - 4000)
                            }
                            Some((code, reason)) => format!("closed (WebSocket close code {code}): {reason}"),
                            None => "closed".to_owned(),
                        };
                    }
                    Message::Text(_) => break "the server sent a text message".to_owned(),
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                }
            };
            closed_tx.send_replace(Some(why));
        });
        Ok(Self { out, control: Mutex::new(control), datagrams: Mutex::new(datagrams), closed })
    }
}

/// A TCP connection to `host:port`, from `bind` if given.
async fn connect_tcp(host: &str, port: u16, bind: Option<std::net::IpAddr>) -> std::io::Result<TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        if let Some(ip) = bind {
            socket.bind(std::net::SocketAddr::new(ip, 0))?;
        }
        match socket.connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address for the host")))
}

impl Transport for WebSocket {
    fn send_control<'a>(&'a self, bytes: &'a [u8]) -> Boxed<'a, Result<(), ClientError>> {
        Box::pin(async move {
            let message = Message::Binary(ws::control_message(bytes).into());
            self.out.send(message).await.map_err(|_| ClientError::Closed)
        })
    }

    fn recv_control(&self) -> Boxed<'_, Option<Vec<u8>>> {
        Box::pin(async move { self.control.lock().await.recv().await })
    }

    fn send_datagram(&self, bytes: &[u8]) -> Result<(), ClientError> {
        match self.out.try_send(Message::Binary(ws::datagram_message(bytes).into())) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(ClientError::Closed),
        }
    }

    fn recv_datagram(&self) -> Boxed<'_, Option<Vec<u8>>> {
        Box::pin(async move { self.datagrams.lock().await.recv().await })
    }

    fn close(&self, code: u32, reason: &[u8]) {
        let code = match u16::try_from(code).unwrap_or(u16::MAX) {
            0 => CloseCode::Normal,
            n => CloseCode::from(ws::close_code(downbeat_protocol::ErrorCode::from_u16(n))),
        };
        let reason = String::from_utf8_lossy(reason).into_owned();
        let _ = self.out.try_send(Message::Close(Some(CloseFrame { code, reason: reason.into() })));
    }

    fn closed(&self) -> Boxed<'_, String> {
        let mut closed = self.closed.clone();
        Box::pin(async move {
            match closed.wait_for(Option::is_some).await {
                Ok(why) => why.clone().unwrap_or_default(),
                Err(_) => "the connection closed".to_owned(),
            }
        })
    }
}

/// TLS for `wss://`: pinned certificate hashes, or the system's roots.
mod tls {
    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{ClientConfig, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};
    use sha2::{Digest as _, Sha256};

    /// A client config that accepts a server certificate whose SHA-256 is in `hashes` (as
    /// browsers' `serverCertificateHashes`), or, with no hashes, one the system's roots trust.
    pub(super) fn client_config(hashes: &[[u8; 32]]) -> Result<ClientConfig, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
        let config = if hashes.is_empty() {
            let mut roots = RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        } else {
            let verifier = Pinned { hashes: hashes.to_vec(), provider };
            builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth()
        };
        Ok(config)
    }

    /// Trusts exactly the certificates whose hashes it holds (signatures still verified).
    #[derive(Debug)]
    struct Pinned {
        hashes: Vec<[u8; 32]>,
        provider: Arc<CryptoProvider>,
    }

    impl ServerCertVerifier for Pinned {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            let hash: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
            if self.hashes.contains(&hash) {
                Ok(ServerCertVerified::assertion())
            } else {
                Err(Error::General("the server's certificate is not one of the pinned hashes".into()))
            }
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider.signature_verification_algorithms.supported_schemes()
        }
    }
}
