//! The postcard codec: whole-datagram encoding and length-prefixed control-stream frames.
//!
//! A frame is a 4-byte big-endian body length followed by a postcard body of at most
//! [`MAX_FRAME_LEN`] bytes. The length is checked before the body is read or allocated.

use alloc::vec::Vec;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{ClientDatagram, MAX_DATAGRAM_LEN, MAX_FRAME_LEN, ServerDatagram};

/// Length of a frame header.
pub const FRAME_HEADER_LEN: usize = 4;

/// Why bytes did not decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// A frame declared a body longer than [`MAX_FRAME_LEN`], or a datagram was longer
    /// than [`MAX_DATAGRAM_LEN`].
    #[error("{len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The declared or actual length.
        len: u64,
        /// The cap.
        max: u64,
    },
    /// The bytes are not a valid message.
    #[error("malformed message")]
    Malformed,
    /// A message decoded but bytes were left over.
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
}

impl DecodeError {
    /// The stable error code to report to the peer.
    pub const fn code(self) -> crate::ErrorCode {
        match self {
            Self::TooLarge { .. } => crate::ErrorCode::FrameTooLarge,
            Self::Malformed | Self::TrailingBytes(_) => crate::ErrorCode::MalformedFrame,
        }
    }
}

/// Why a value could not be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The encoded body would exceed the frame or datagram cap.
    #[error("encoded message of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Encoded length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// The serializer failed.
    #[error("message could not be encoded")]
    Serialize,
}

fn decode_exact<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(|_| DecodeError::Malformed)?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes(rest.len()));
    }
    Ok(value)
}

fn encode_datagram<T: Serialize>(value: &T) -> Result<Vec<u8>, EncodeError> {
    let bytes = postcard::to_allocvec(value).map_err(|_| EncodeError::Serialize)?;
    encoded_datagram_fits(bytes.len())?;
    Ok(bytes)
}

/// An encoded datagram of `len` bytes is one the protocol sends: at most [`MAX_DATAGRAM_LEN`].
fn encoded_datagram_fits(len: usize) -> Result<(), EncodeError> {
    if len > MAX_DATAGRAM_LEN {
        return Err(EncodeError::TooLarge { len, max: MAX_DATAGRAM_LEN });
    }
    Ok(())
}

fn check_datagram_len(bytes: &[u8]) -> Result<(), DecodeError> {
    if bytes.len() > MAX_DATAGRAM_LEN {
        return Err(DecodeError::TooLarge { len: bytes.len() as u64, max: MAX_DATAGRAM_LEN as u64 });
    }
    Ok(())
}

/// Decodes a datagram a client sent.
pub fn decode_client_datagram(bytes: &[u8]) -> Result<ClientDatagram, DecodeError> {
    check_datagram_len(bytes)?;
    decode_exact(bytes)
}

/// Decodes a datagram the server sent.
pub fn decode_server_datagram(bytes: &[u8]) -> Result<ServerDatagram, DecodeError> {
    check_datagram_len(bytes)?;
    decode_exact(bytes)
}

/// Encodes a datagram for the server to send.
pub fn encode_server_datagram(datagram: &ServerDatagram) -> Result<Vec<u8>, EncodeError> {
    encode_datagram(datagram)
}

/// Encodes a datagram for the server to send into `buffer`, and returns the part written,
/// without allocating: for the datagrams the server sends most, clock-sync replies, whose
/// longest is [`crate::MAX_SYNC_REPLY_LEN`]. A buffer too small is [`EncodeError::Serialize`].
pub fn encode_server_datagram_to_slice<'a>(
    datagram: &ServerDatagram,
    buffer: &'a mut [u8],
) -> Result<&'a mut [u8], EncodeError> {
    let bytes = postcard::to_slice(datagram, buffer).map_err(|_| EncodeError::Serialize)?;
    encoded_datagram_fits(bytes.len())?;
    Ok(bytes)
}

/// Encodes a datagram for a client to send.
pub fn encode_client_datagram(datagram: &ClientDatagram) -> Result<Vec<u8>, EncodeError> {
    encode_datagram(datagram)
}

/// Encodes `message` as one frame: header and body.
pub fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>, EncodeError> {
    let mut out = alloc::vec![0u8; FRAME_HEADER_LEN];
    let mut out = postcard::to_extend(message, core::mem::take(&mut out)).map_err(|_| EncodeError::Serialize)?;
    let body_len = out.len() - FRAME_HEADER_LEN;
    if body_len > MAX_FRAME_LEN as usize {
        return Err(EncodeError::TooLarge { len: body_len, max: MAX_FRAME_LEN as usize });
    }
    // Cannot truncate: body_len <= MAX_FRAME_LEN, which is a u32.
    let header = (body_len as u32).to_be_bytes();
    out[..FRAME_HEADER_LEN].copy_from_slice(&header);
    Ok(out)
}

/// Reads a frame header and returns the body length, refusing one over [`MAX_FRAME_LEN`].
pub fn frame_body_len(header: [u8; FRAME_HEADER_LEN]) -> Result<usize, DecodeError> {
    let len = u32::from_be_bytes(header);
    if len > MAX_FRAME_LEN {
        return Err(DecodeError::TooLarge { len: u64::from(len), max: u64::from(MAX_FRAME_LEN) });
    }
    Ok(len as usize)
}

/// Decodes one frame body (the bytes after the header).
pub fn decode_frame_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, DecodeError> {
    if body.len() > MAX_FRAME_LEN as usize {
        return Err(DecodeError::TooLarge { len: body.len() as u64, max: u64::from(MAX_FRAME_LEN) });
    }
    decode_exact(body)
}

/// Splits a byte stream that arrives in arbitrary chunks into frames.
///
/// Holds at most one header plus one capped body of unconsumed input beyond what was pushed
/// in the last call; a header over the cap is an error as soon as its four bytes are in.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// A decoder with nothing buffered.
    pub const fn new() -> Self {
        Self { buf: Vec::new() }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed. After an error the
    /// stream is out of step and must be closed.
    pub fn next_frame<T: DeserializeOwned>(&mut self) -> Result<Option<T>, DecodeError> {
        let Some(header) = self.buf.first_chunk::<FRAME_HEADER_LEN>() else {
            return Ok(None);
        };
        let len = frame_body_len(*header)?;
        let end = FRAME_HEADER_LEN + len;
        if self.buf.len() < end {
            return Ok(None);
        }
        let value = decode_frame_body(&self.buf[FRAME_HEADER_LEN..end]);
        self.buf.drain(..end);
        value.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;

    fn timeline() -> Timeline {
        Timeline {
            epoch: 3,
            segments: BoundedVec::try_from_vec(alloc::vec![Segment {
                start: ServerNanos(1_000),
                start_beat: 0,
                tempo: MicroBpm::from_bpm(120),
                beats_per_bar: 4,
                running: true,
                count_in_bars: 0,
            }])
            .unwrap(),
        }
    }

    #[test]
    fn datagrams_round_trip() {
        let beats = (0..MAX_BEATS_PER_FRAME as i64)
            .map(|i| Beat { index: i, at: ServerNanos(u64::MAX - 1), beat_in_bar: 3, count_in: false })
            .collect();
        let d = ServerDatagram::Beats(BeatFrame {
            seq: u64::MAX,
            sent_at: ServerNanos(5),
            timeline: timeline(),
            beats: BoundedVec::try_from_vec(beats).unwrap(),
        });
        let bytes = encode_server_datagram(&d).unwrap();
        // A full frame fits well inside the smallest datagram size browsers offer (~1200).
        assert!(bytes.len() < 600, "{}", bytes.len());
        assert_eq!(decode_server_datagram(&bytes).unwrap(), d);

        let c = ClientDatagram::SyncRequest(SyncRequest { id: 9, t0: ClientNanos(77), epoch: u64::MAX });
        let bytes = encode_client_datagram(&c).unwrap();
        assert_eq!(decode_client_datagram(&bytes).unwrap(), c);

        // A full note datagram, both ways, is small too.
        let notes: alloc::vec::Vec<_> = (0..MAX_NOTES_PER_DATAGRAM as u32)
            .map(|seq| Note {
                seq: u32::MAX - seq,
                midi: 127,
                velocity: 127,
                instrument: 127,
                played_at: ServerNanos(u64::MAX),
            })
            .collect();
        let notes = BoundedVec::try_from_vec(notes).unwrap();
        let c = ClientDatagram::Notes(notes.clone());
        let bytes = encode_client_datagram(&c).unwrap();
        assert!(bytes.len() < 200, "{}", bytes.len());
        assert_eq!(decode_client_datagram(&bytes).unwrap(), c);
        let d = ServerDatagram::Notes(NoteFrame { from: u64::MAX, generation: u32::MAX, notes });
        let bytes = encode_server_datagram(&d).unwrap();
        assert!(bytes.len() < 200, "{}", bytes.len());
        assert_eq!(decode_server_datagram(&bytes).unwrap(), d);
    }

    #[test]
    fn a_datagram_encoded_into_a_slice_is_the_one_allocated_and_a_short_slice_is_an_error() {
        let d =
            ServerDatagram::SyncReply(SyncReply { id: 9, t0: ClientNanos(77), t1: ServerNanos(5), t2: ServerNanos(6) });
        let mut buffer = [0u8; 64];
        let written = encode_server_datagram_to_slice(&d, &mut buffer).unwrap();
        assert_eq!(*written, *encode_server_datagram(&d).unwrap());
        let mut short = [0u8; 3];
        assert_eq!(encode_server_datagram_to_slice(&d, &mut short), Err(EncodeError::Serialize));
    }

    #[test]
    fn bad_datagrams_are_errors() {
        assert_eq!(decode_client_datagram(&[]), Err(DecodeError::Malformed));
        assert_eq!(decode_client_datagram(&[200]), Err(DecodeError::Malformed));
        let c = ClientDatagram::SyncRequest(SyncRequest { id: 9, t0: ClientNanos(77), epoch: u64::MAX });
        let mut bytes = encode_client_datagram(&c).unwrap();
        bytes.push(0);
        assert_eq!(decode_client_datagram(&bytes), Err(DecodeError::TrailingBytes(1)));
        let big = alloc::vec![0u8; MAX_DATAGRAM_LEN + 1];
        assert!(matches!(decode_client_datagram(&big), Err(DecodeError::TooLarge { .. })));
    }

    #[test]
    fn frames_split_across_chunks() {
        let hello = ClientMessage::Hello(Hello {
            version: PROTOCOL_VERSION,
            token: BoundedString::new("dev").unwrap(),
            room: RoomRequest::Join(BoundedString::new("K7QF-M3XP").unwrap()),
        });
        let mut bytes = encode_frame(&hello).unwrap();
        bytes.extend(encode_frame(&hello).unwrap());
        let mut decoder = FrameDecoder::new();
        let mut got = alloc::vec::Vec::new();
        for b in &bytes {
            decoder.push(core::slice::from_ref(b));
            while let Some(m) = decoder.next_frame::<ClientMessage>().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, alloc::vec![hello.clone(), hello]);
        assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn oversized_frame_is_refused_from_its_header() {
        let mut decoder = FrameDecoder::new();
        decoder.push(&(MAX_FRAME_LEN + 1).to_be_bytes());
        assert!(matches!(decoder.next_frame::<ClientMessage>(), Err(DecodeError::TooLarge { .. })));
        assert_eq!(DecodeError::TooLarge { len: 0, max: 0 }.code(), ErrorCode::FrameTooLarge);
    }

    #[test]
    fn malformed_frame_is_an_error_and_consumed() {
        let mut decoder = FrameDecoder::new();
        decoder.push(&[0, 0, 0, 2, 0xff, 0xff]);
        assert_eq!(decoder.next_frame::<ClientMessage>(), Err(DecodeError::Malformed));
    }
}
