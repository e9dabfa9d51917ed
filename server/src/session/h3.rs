//! The HTTP/3 side of a WebTransport session, on the server's own QUIC driver
//! ([`crate::quic`]): no per-connection driver task.
//!
//! wtransport's server runs a driver task per connection that accepts every stream and reads
//! every datagram, handing each to the session through a channel. Each datagram then woke two
//! tasks, and each session carried the driver's future and channels (about a fifth of the
//! server's CPU and 17 KiB of each session's memory, BENCHMARKS.md). A Downbeat session needs
//! little of HTTP/3: this side's SETTINGS, the `CONNECT` request and its answer, one
//! bidirectional stream and datagrams. The session does that itself, with wtransport's
//! protocol crate (`wtransport::proto`) for the framing, and reads the QUIC connection's
//! datagrams alone ([`WtPeer`] sends them).
//!
//! What the peer opens beyond that is bounded: its unidirectional streams (its HTTP/3 control
//! stream and QPACK streams) are kept open unread (stopping them would be a connection error;
//! with a QPACK table of 0 nothing comes on them), more bidirectional streams are refused.
//! [`Streams::serve`] does that for the session's life and returns when the peer ends the
//! session (its `CONNECT` stream ends).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut as _, Bytes, BytesMut};
use downbeat_protocol::ErrorCode;
use tokio::time::timeout;
use tracing::debug;
use wtransport::proto::bytes::{BytesReader as _, BytesWriter as _};
use wtransport::proto::datagram::Datagram as H3Datagram;
use wtransport::proto::error::ErrorCode as H3Error;
use wtransport::proto::frame::Frame;
use wtransport::proto::headers::Headers;
use wtransport::proto::ids::{QStreamId, SessionId, StreamId};
use wtransport::proto::session::{SessionRequest, SessionResponse};
use wtransport::proto::settings::Settings;
use wtransport::proto::stream_header::StreamHeader;
use wtransport::proto::varint::VarInt as ProtoVarInt;

use super::{Answered, SyncAnswer};
use crate::quic::{Answer, Answerer, Answering, Connection, RecvStream, SendStream, VarInt};
use crate::room::{DatagramKind, PathFigures, Peer};

/// The largest `CONNECT` header block read (browsers send well under 2 KiB).
const MAX_HEADERS: u64 = 16 * 1024;
/// The largest unknown (grease) frame skipped before the `CONNECT` headers.
const MAX_SKIPPED: u64 = 1024;
/// How long the first bytes of a stream the peer opened may take to say what it is.
const STREAM_TYPE_TIMEOUT: Duration = Duration::from_secs(5);

/// The frame type opening a WebTransport bidirectional stream.
const WEBTRANSPORT_STREAM: u64 = 0x41;
/// HTTP/3's HEADERS frame type.
const HEADERS_FRAME: u64 = 0x01;

/// Why a connection could not become a session.
#[derive(Debug, thiserror::Error)]
pub(crate) enum H3Failure {
    #[error("the connection closed")]
    Closed,
    #[error("HTTP/3 error: {0}")]
    Protocol(&'static str, H3Error),
}

impl H3Failure {
    /// Closes `conn` as this failure says (a connection already closed stays as it is).
    pub(crate) fn close(&self, conn: &Connection) {
        if let Self::Protocol(why, code) = self {
            conn.close(quic(code.to_code()), why.as_bytes());
        }
    }
}

/// A connection whose peer asked for a WebTransport session, not yet answered.
#[derive(Debug)]
pub(crate) struct Requested {
    conn: Connection,
    /// This side's HTTP/3 control stream: open for the connection's life.
    _control: SendStream,
    connect: (SendStream, RecvStream),
    session_id: SessionId,
}

impl Requested {
    /// Opens this side's HTTP/3 control stream with its SETTINGS, then takes the peer's first
    /// request stream, which must be a WebTransport `CONNECT` (any path: the session says what
    /// it wants in its hello). A peer that breaks HTTP/3 has its connection closed with the
    /// HTTP/3 error code.
    pub(crate) async fn read(conn: Connection) -> Result<Self, H3Failure> {
        let read = async {
            let control = open_control(&conn).await?;
            let (send, mut recv) = conn.accept_bi().await.map_err(|_| H3Failure::Closed)?;
            let session_id = session_id_of(recv.id())?;
            let headers = read_headers(&mut recv).await?;
            SessionRequest::try_from(headers)
                .map_err(|_| H3Failure::Protocol("not a WebTransport CONNECT", H3Error::Message))?;
            Ok::<_, H3Failure>((control, (send, recv), session_id))
        };
        match read.await {
            Ok((control, connect, session_id)) => Ok(Self { conn, _control: control, connect, session_id }),
            Err(e) => {
                e.close(&conn);
                Err(e)
            }
        }
    }

    /// Answers `200`: the session is established. A connection the answer could not be
    /// written on is closed, as [`Requested::read`] closes one.
    pub(crate) async fn accept(mut self) -> Result<Established, H3Failure> {
        if let Err(e) = write_response(&mut self.connect.0, &SessionResponse::ok()).await {
            e.close(&self.conn);
            return Err(e);
        }
        let peer = WtPeer::new(self.conn.clone(), self.session_id);
        let streams = Streams { _control: self._control, connect: self.connect, peer_streams: Vec::new() };
        Ok(Established { peer, streams })
    }

    /// Answers `429` (the caller's network holds too many sessions) and ends the request.
    pub(crate) async fn too_many_requests(mut self) {
        if write_response(&mut self.connect.0, &SessionResponse::too_many_requests()).await.is_ok() {
            let _ = self.connect.0.finish();
            let _ = self.connect.0.stopped().await;
        }
        self.conn.close(quic(H3Error::NoError.to_code()), b"");
    }
}

/// An established WebTransport session.
#[derive(Debug)]
pub(crate) struct Established {
    /// The connection, and how datagrams are sent on it.
    pub(crate) peer: WtPeer,
    /// The connection's HTTP/3 streams, served apart from the session's own.
    pub(crate) streams: Streams,
}

/// An established session's HTTP/3 streams: see [`Streams::serve`].
#[derive(Debug)]
pub(crate) struct Streams {
    /// Held open: see [`Requested::_control`].
    _control: SendStream,
    /// The `CONNECT` stream: the session lives while it is open.
    connect: (SendStream, RecvStream),
    /// The unidirectional streams the peer opened (its control and QPACK streams), held open
    /// unread.
    peer_streams: Vec<RecvStream>,
}

impl Established {
    /// The QUIC connection.
    pub(crate) fn conn(&self) -> &Connection {
        &self.peer.conn
    }

    /// Takes the session's first bidirectional stream (its control stream): a stream of this
    /// session, with the WebTransport header read.
    pub(crate) async fn accept_stream(&self) -> Result<(SendStream, RecvStream), H3Failure> {
        let (send, mut recv) = self.peer.conn.accept_bi().await.map_err(|_| H3Failure::Closed)?;
        let header = async {
            let kind = read_varint(&mut recv).await?;
            let session = read_varint(&mut recv).await?;
            Ok::<_, H3Failure>((kind, session))
        };
        match timeout(STREAM_TYPE_TIMEOUT, header).await {
            Ok(Ok((WEBTRANSPORT_STREAM, id))) if id == self.peer.framing.qstream.into_session_id().into_u64() => {
                Ok((send, recv))
            }
            Ok(Ok((WEBTRANSPORT_STREAM, _))) => Err(H3Failure::Protocol("a stream of another session", H3Error::Id)),
            Ok(Ok(_)) => Err(H3Failure::Protocol("a request stream after the CONNECT", H3Error::StreamCreation)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(H3Failure::Protocol("a stream that never said what it is", H3Error::StreamCreation)),
        }
    }
}

impl Streams {
    /// Serves the other streams of `conn` while the session lives: holds the peer's
    /// unidirectional streams open unread and refuses more bidirectional ones. Returns once the
    /// peer ended the session (its `CONNECT` stream ended or was reset) or the connection
    /// closed.
    pub(crate) async fn serve(&mut self, conn: &Connection) {
        let Self { connect, peer_streams, .. } = self;
        let connect_ended = async {
            // Capsules (a CLOSE_WEBTRANSPORT_SESSION) or nothing: either way the session ends
            // when the stream does.
            loop {
                match connect.1.read_chunk(usize::MAX).await {
                    Ok(Some(_)) => {}
                    Ok(None) => return debug!("the peer ended the session's CONNECT stream"),
                    Err(e) => return debug!(error = %e, "the session's CONNECT stream broke"),
                }
            }
        };
        let streams = async {
            loop {
                tokio::select! {
                    // Kept open and never read: the peer's control and QPACK streams must stay
                    // open (browsers open their QPACK streams and write nothing on them, not even
                    // their type, until they need them), and nothing else a peer opens matters.
                    // Unread streams stay open, so QUIC's limit on them (8) bounds how many a
                    // peer holds, and the connection's receive window what they hold.
                    uni = conn.accept_uni() => {
                        let Ok(recv) = uni else { return };
                        peer_streams.push(recv);
                    }
                    bi = conn.accept_bi() => {
                        let Ok((mut send, mut recv)) = bi else { return };
                        debug!(id = %recv.id(), "the peer opened another bidirectional stream; refused");
                        let _ = send.reset(quic(H3Error::RequestRejected.to_code()));
                        let _ = recv.stop(quic(H3Error::RequestRejected.to_code()));
                    }
                }
            }
        };
        tokio::select! {
            () = connect_ended => {}
            () = streams => {}
        }
    }
}

/// A WebTransport session's connection as the room sees it: datagrams carry the session's
/// quarter stream id first (RFC 9297), which every session of this server shares the encoding
/// of, as each is its connection's one session.
#[derive(Clone, Debug)]
pub(crate) struct WtPeer {
    pub(crate) conn: Connection,
    framing: Framing,
}

/// How one session's datagrams are framed: its quarter stream id first.
#[derive(Clone, Debug)]
struct Framing {
    /// The session's quarter stream id...
    qstream: QStreamId,
    /// ...encoded.
    prefix: Bytes,
}

impl Framing {
    fn new(session_id: SessionId) -> Self {
        let qstream = QStreamId::from_session_id(session_id);
        let mut prefix = Vec::with_capacity(8);
        prefix.put_varint(qstream.into_varint()).expect("a Vec takes any varint");
        Self { qstream, prefix: prefix.into() }
    }

    /// `payload` as one of the session's datagrams.
    fn frame(&self, payload: &[u8]) -> Bytes {
        let mut datagram = BytesMut::with_capacity(self.prefix.len() + payload.len());
        datagram.put_slice(&self.prefix);
        datagram.put_slice(payload);
        datagram.freeze()
    }

    /// The payload of `datagram`, if it is one of the session's.
    fn payload_of(&self, datagram: &Bytes) -> Option<Bytes> {
        let h3 = H3Datagram::read(datagram).ok()?;
        let payload = datagram.len() - h3.payload().len();
        (h3.qstream_id() == self.qstream).then(|| datagram.slice(payload..))
    }
}

impl WtPeer {
    fn new(conn: Connection, session_id: SessionId) -> Self {
        Self { conn, framing: Framing::new(session_id) }
    }

    /// Sends `payload` as one of this session's datagrams.
    pub(crate) fn send(&self, payload: &[u8]) -> bool {
        self.conn.send_datagram(self.framing.frame(payload)).is_ok()
    }

    /// Has the connection's driver answer this session's clock-sync requests with `sync`,
    /// until the guard returned is dropped.
    pub(crate) fn answer_sync(&self, sync: SyncAnswer) -> Answering {
        self.conn.answer_datagrams(Arc::new(WtSyncAnswer { framing: self.framing.clone(), sync }))
    }

    /// The payload of a datagram the connection received, if it is one of this session's.
    pub(crate) fn payload_of(&self, datagram: Bytes) -> Option<Bytes> {
        self.framing.payload_of(&datagram)
    }
}

/// A [`SyncAnswer`] for a WebTransport session's datagrams, which carry its quarter stream id
/// first.
#[derive(Debug)]
struct WtSyncAnswer {
    framing: Framing,
    sync: SyncAnswer,
}

impl Answerer for WtSyncAnswer {
    fn answer(&self, datagram: &Bytes, arrived: Option<Instant>) -> Answer {
        // Not one of this session's: the session counts it.
        let Some(payload) = self.framing.payload_of(datagram) else {
            return Answer::Pass;
        };
        match self.sync.answer(&payload, arrived) {
            Answered::Pass => Answer::Pass,
            Answered::Dropped => Answer::Taken,
            Answered::Reply(None) => {
                self.sync.replied(false);
                Answer::Taken
            }
            Answered::Reply(Some(reply)) => Answer::Reply(self.framing.frame(&reply)),
        }
    }

    fn replied(&self, sent: bool) {
        self.sync.replied(sent);
    }
}

impl Peer for WtPeer {
    fn max_datagram_size(&self) -> Option<usize> {
        self.conn.max_datagram_size().map(|size| size.saturating_sub(self.framing.prefix.len()))
    }

    fn send_datagram(&self, _: DatagramKind, bytes: &[u8]) -> bool {
        self.send(bytes)
    }

    fn close(&self, code: ErrorCode, reason: &str) {
        self.conn.close(close_code(code), reason.as_bytes());
    }

    fn path(&self) -> Option<PathFigures> {
        Some(PathFigures::of(&self.conn))
    }
}

/// The QUIC application close code of `code`: its number.
pub(crate) fn close_code(code: ErrorCode) -> VarInt {
    VarInt::from_u32(u32::from(code.as_u16()))
}

fn quic(code: ProtoVarInt) -> VarInt {
    VarInt::from_u64(code.into_inner()).unwrap_or(VarInt::MAX)
}

/// The session id of the request stream `id`.
fn session_id_of(id: quinn_proto::StreamId) -> Result<SessionId, H3Failure> {
    let invalid = || H3Failure::Protocol("not a request stream", H3Error::Id);
    let varint = ProtoVarInt::try_from_u64(u64::from(id)).map_err(|_| invalid())?;
    SessionId::try_from_session_stream(StreamId::new(varint)).map_err(|_| invalid())
}

/// Opens this side's HTTP/3 control stream and writes its SETTINGS: WebTransport (one session),
/// HTTP datagrams, extended CONNECT, and no QPACK dynamic table.
async fn open_control(conn: &Connection) -> Result<SendStream, H3Failure> {
    let mut send = conn.open_uni().await.map_err(|_| H3Failure::Closed)?;
    let settings = Settings::builder()
        .qpack_max_table_capacity(ProtoVarInt::from_u32(0))
        .qpack_blocked_streams(ProtoVarInt::from_u32(0))
        .enable_connect_protocol()
        .enable_webtransport()
        .enable_h3_datagrams()
        .webtransport_max_sessions(ProtoVarInt::from_u32(1))
        .build();
    let mut bytes = Vec::with_capacity(64);
    let encoded =
        StreamHeader::new_control().write(&mut bytes).and_then(|()| settings.generate_frame().write(&mut bytes));
    if encoded.is_err() {
        return Err(H3Failure::Protocol("SETTINGS did not encode", H3Error::Settings));
    }
    send.write_all(&bytes).await.map_err(|_| H3Failure::Closed)?;
    Ok(send)
}

/// Reads the request's HEADERS frame (unknown frames before it skipped) and decodes it.
async fn read_headers(recv: &mut RecvStream) -> Result<Headers, H3Failure> {
    loop {
        let kind = read_varint(recv).await?;
        let len = read_varint(recv).await?;
        match kind {
            HEADERS_FRAME => {
                if len > MAX_HEADERS {
                    return Err(H3Failure::Protocol("CONNECT headers too large", H3Error::ExcessiveLoad));
                }
                let mut payload = vec![0u8; len as usize];
                recv.read_exact(&mut payload).await.map_err(|_| H3Failure::Closed)?;
                return Headers::with_frame(&Frame::new_headers(Cow::Owned(payload)))
                    .map_err(|_| H3Failure::Protocol("CONNECT headers did not decode", H3Error::Decompression));
            }
            // Frames HTTP/3 defines (DATA, SETTINGS, GOAWAY, ...) may not come first on a
            // request; unknown and reserved ones are skipped (RFC 9114 §9).
            0x00 | 0x03..=0x05 | 0x07 | 0x0d | WEBTRANSPORT_STREAM => {
                return Err(H3Failure::Protocol("a request must start with HEADERS", H3Error::FrameUnexpected));
            }
            _ if len <= MAX_SKIPPED => {
                let mut skipped = vec![0u8; len as usize];
                recv.read_exact(&mut skipped).await.map_err(|_| H3Failure::Closed)?;
            }
            _ => return Err(H3Failure::Protocol("an unknown frame too large to skip", H3Error::ExcessiveLoad)),
        }
    }
}

/// Writes `response` as a HEADERS frame.
async fn write_response(send: &mut SendStream, response: &SessionResponse) -> Result<(), H3Failure> {
    let mut bytes = Vec::with_capacity(64);
    response
        .headers()
        .generate_frame()
        .write(&mut bytes)
        .map_err(|_| H3Failure::Protocol("the answer did not encode", H3Error::Message))?;
    send.write_all(&bytes).await.map_err(|_| H3Failure::Closed)
}

/// Reads one QUIC variable-length integer (RFC 9000 §16).
async fn read_varint(recv: &mut RecvStream) -> Result<u64, H3Failure> {
    let mut bytes = [0u8; 8];
    recv.read_exact(&mut bytes[..1]).await.map_err(|_| H3Failure::Closed)?;
    let len = ProtoVarInt::parse_size(bytes[0]);
    recv.read_exact(&mut bytes[1..len]).await.map_err(|_| H3Failure::Closed)?;
    let varint = (&bytes[..len]).get_varint().expect("all its bytes were read");
    Ok(varint.into_inner())
}
