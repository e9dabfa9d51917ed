//! The WebTransport [`Transport`] (wtransport): one bidirectional stream for control frames,
//! QUIC datagrams for the rest.

use std::time::Duration;

use downbeat_protocol::{FRAME_HEADER_LEN, ServerMessage, decode_frame_body, frame_body_len};
use tokio::sync::Mutex;
use wtransport::endpoint::endpoint_side;
use wtransport::error::{ConnectingError, ConnectionError};
use wtransport::{ClientConfig, Connection, Endpoint, RecvStream, SendStream};

use crate::transport::{Boxed, Transport};
use crate::{ClientError, ConnectOptions};

/// How much of the control stream one read takes at most.
const READ_CHUNK: usize = 4096;

/// How many times a handshake is tried when the server closes it with an HTTP/3 protocol error.
///
/// wtransport 0.7.2's connection driver reads the peer's HTTP/3 control stream inside a
/// `select!` that drops the read whenever another event wins the race, so a SETTINGS frame that
/// arrives in two packets, with a new stream in between, loses its first bytes and the server
/// closes a correct handshake with `H3_FRAME_UNEXPECTED` (0x105) or another H3 error (this
/// side's driver reads the server's control stream the same way). It is rare (about one
/// connect in tens of thousands on a busy machine, seen as a CI failure) and nothing of the
/// session exists yet (no hello was sent), so trying the handshake again is safe. The browser
/// package reconnects after any failed connect anyway.
const HANDSHAKE_ATTEMPTS: u32 = 3;

/// HTTP/3 error codes (RFC 9114 section 8.1), the range a protocol error closes with.
const H3_ERRORS: std::ops::RangeInclusive<u64> = 0x100..=0x110;

/// A WebTransport session and its control stream.
pub(crate) struct WebTransport {
    conn: Connection,
    send: Mutex<SendStream>,
    recv: Mutex<RecvStream>,
    _endpoint: Endpoint<endpoint_side::Client>,
}

impl WebTransport {
    /// Connects to `options.url` (pinning `options.cert_hashes`, else the system roots) and
    /// opens the control stream.
    pub(crate) async fn open(options: &ConnectOptions) -> Result<Self, ClientError> {
        let bind = ClientConfig::builder();
        let builder = match options.bind_address {
            Some(ip) => bind.with_bind_address(std::net::SocketAddr::new(ip, 0)),
            None => bind.with_bind_default(),
        };
        let config = if options.cert_hashes.is_empty() {
            builder.with_native_certs().keep_alive_interval(Some(Duration::from_secs(3))).build()
        } else {
            builder
                .with_server_certificate_hashes(options.cert_hashes.iter().map(|h| (*h).into()))
                .keep_alive_interval(Some(Duration::from_secs(3)))
                .build()
        };
        let endpoint = Endpoint::client(config).map_err(ClientError::Endpoint)?;
        let mut attempt = 1;
        let conn = loop {
            match endpoint.connect(&options.url).await {
                Ok(conn) => break conn,
                Err(e) if attempt < HANDSHAKE_ATTEMPTS && closed_for_h3_protocol(&e) => {
                    tracing::debug!(error = %e, attempt, "the server closed the handshake for an HTTP/3 protocol error; trying again");
                    attempt += 1;
                }
                Err(e) => return Err(ClientError::Connect(e.to_string())),
            }
        };
        let opening = conn.open_bi().await.map_err(|e| ClientError::Connect(e.to_string()))?;
        let (send, recv) = opening.await.map_err(|e| ClientError::Connect(e.to_string()))?;
        Ok(Self { conn, send: Mutex::new(send), recv: Mutex::new(recv), _endpoint: endpoint })
    }
}

/// Whether a handshake failed for an HTTP/3 protocol error: the server closed it with one, or
/// this side's driver (which reads the server's control stream the same way) found one.
fn closed_for_h3_protocol(error: &ConnectingError) -> bool {
    match error {
        ConnectingError::ConnectionError(ConnectionError::ApplicationClosed(close)) => {
            H3_ERRORS.contains(&close.code().into_inner())
        }
        ConnectingError::ConnectionError(ConnectionError::LocalH3Error(_)) => true,
        _ => false,
    }
}

impl Transport for WebTransport {
    fn send_control<'a>(&'a self, bytes: &'a [u8]) -> Boxed<'a, Result<(), ClientError>> {
        Box::pin(async move { self.send.lock().await.write_all(bytes).await.map_err(|_| ClientError::Closed) })
    }

    fn recv_control(&self) -> Boxed<'_, Option<Vec<u8>>> {
        Box::pin(async move {
            let mut chunk = vec![0u8; READ_CHUNK];
            let read = self.recv.lock().await.read(&mut chunk).await.ok()??;
            chunk.truncate(read);
            Some(chunk)
        })
    }

    fn send_datagram(&self, bytes: &[u8]) -> Result<(), ClientError> {
        self.conn.send_datagram(bytes).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    fn recv_datagram(&self) -> Boxed<'_, Option<Vec<u8>>> {
        Box::pin(async move { self.conn.receive_datagram().await.ok().map(|d| d.payload().to_vec()) })
    }

    fn close(&self, code: u32, reason: &[u8]) {
        self.conn.close(code.into(), reason);
    }

    fn closed(&self) -> Boxed<'_, String> {
        Box::pin(async move { self.conn.closed().await.to_string() })
    }
}

/// Reads one server frame from a WebTransport control stream: header, length check before
/// allocating, body, decode. [`ClientError::Closed`] if the stream ends first. (The client
/// itself hands raw bytes to the session engine; tests that drive a raw session use this.)
pub async fn read_message(recv: &mut RecvStream) -> Result<ServerMessage, ClientError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    recv.read_exact(&mut header).await.map_err(|_| ClientError::Closed)?;
    let len = frame_body_len(header).map_err(|e| ClientError::Protocol(e.to_string()))?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(|_| ClientError::Closed)?;
    decode_frame_body(&body).map_err(|e| ClientError::Protocol(e.to_string()))
}
