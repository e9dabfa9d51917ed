//! The WebSocket mapping: how one session's control stream and datagrams share a WebSocket,
//! for networks that block QUIC.
//!
//! Every WebSocket message is binary and carries one unit of the WebTransport session, tagged
//! by its first byte:
//! - [`CONTROL`] then exactly one whole control frame (header and body, the same bytes as on
//!   the control stream; the header's length must match the rest of the message);
//! - [`DATAGRAM`] then one datagram's bytes.
//!
//! Both sides treat datagram messages with datagram semantics: a receiver may drop them, and a
//! sender never queues timing traffic behind a slow socket (the server keeps only the newest
//! beat frame and sync reply waiting per session). Text messages and unknown tags are refused
//! with [`crate::ErrorCode::MalformedFrame`]; a message longer than [`MAX_MESSAGE_LEN`] with
//! [`crate::ErrorCode::FrameTooLarge`]. A session ended with an error closes with
//! [`close_code`].

use alloc::vec::Vec;

use crate::codec::{DecodeError, FRAME_HEADER_LEN, frame_body_len};
use crate::{MAX_DATAGRAM_LEN, MAX_FRAME_LEN};

/// Tag of a message that carries one control frame.
pub const CONTROL: u8 = 0;
/// Tag of a message that carries one datagram.
pub const DATAGRAM: u8 = 1;

/// The longest message either side sends or accepts: a tag and a frame of the maximum size.
pub const MAX_MESSAGE_LEN: usize = {
    let frame = 1 + FRAME_HEADER_LEN + MAX_FRAME_LEN as usize;
    let datagram = 1 + MAX_DATAGRAM_LEN;
    if frame > datagram { frame } else { datagram }
};

/// The close code of a session ended with `code`: 4000 plus the error's number (the private
/// range of RFC 6455, which pages may send too), so a browser's `CloseEvent.code` names it.
pub const fn close_code(code: crate::ErrorCode) -> u16 {
    let n = code.as_u16();
    4000 + if n > 999 { 999 } else { n }
}

/// What one WebSocket message carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit<'a> {
    /// A control frame's body (its header was checked against the message's length).
    Control(&'a [u8]),
    /// A datagram's bytes, not yet decoded.
    Datagram(&'a [u8]),
}

/// Splits a binary message into what it carries; checks the tag, the length cap and that a
/// control message holds exactly one whole frame.
pub fn split(message: &[u8]) -> Result<Unit<'_>, DecodeError> {
    if message.len() > MAX_MESSAGE_LEN {
        return Err(DecodeError::TooLarge { len: message.len() as u64, max: MAX_MESSAGE_LEN as u64 });
    }
    match message.split_first() {
        Some((&CONTROL, frame)) => {
            let Some((header, body)) = frame.split_first_chunk::<FRAME_HEADER_LEN>() else {
                return Err(DecodeError::Malformed);
            };
            let len = frame_body_len(*header)?;
            if len != body.len() {
                return Err(DecodeError::Malformed);
            }
            Ok(Unit::Control(body))
        }
        Some((&DATAGRAM, datagram)) => {
            if datagram.len() > MAX_DATAGRAM_LEN {
                return Err(DecodeError::TooLarge { len: datagram.len() as u64, max: MAX_DATAGRAM_LEN as u64 });
            }
            Ok(Unit::Datagram(datagram))
        }
        _ => Err(DecodeError::Malformed),
    }
}

/// A control message carrying `frame` (one whole frame, as [`crate::encode_frame`] makes it).
pub fn control_message(frame: &[u8]) -> Vec<u8> {
    tagged(CONTROL, frame)
}

/// A datagram message carrying `datagram`.
pub fn datagram_message(datagram: &[u8]) -> Vec<u8> {
    tagged(DATAGRAM, datagram)
}

fn tagged(tag: u8, bytes: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(1 + bytes.len());
    message.push(tag);
    message.extend_from_slice(bytes);
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClientMessage, ErrorCode, decode_frame_body, encode_frame};

    #[test]
    fn a_control_frame_and_a_datagram_round_trip() {
        let frame =
            encode_frame(&ClientMessage::RefreshToken { request_id: 7, token: crate::Token::truncating("t") }).unwrap();
        let message = control_message(&frame);
        let Ok(Unit::Control(body)) = split(&message) else { panic!("not a control unit") };
        assert_eq!(
            decode_frame_body::<ClientMessage>(body).unwrap(),
            ClientMessage::RefreshToken { request_id: 7, token: crate::Token::truncating("t") }
        );
        assert_eq!(split(&datagram_message(&[1, 2, 3])), Ok(Unit::Datagram(&[1, 2, 3])));
    }

    #[test]
    fn bad_messages_get_stable_codes() {
        let frame =
            encode_frame(&ClientMessage::RefreshToken { request_id: 7, token: crate::Token::truncating("t") }).unwrap();
        // Empty, unknown tag, a frame cut short, a frame with bytes after it, a short header.
        let mut long = control_message(&frame);
        long.push(0);
        for bad in [&[][..], &[9, 0][..], &control_message(&frame)[..frame.len()], &long[..], &[CONTROL, 0, 0][..]] {
            assert_eq!(split(bad).map_err(DecodeError::code), Err(ErrorCode::MalformedFrame), "{bad:?}");
        }
        // A header declaring more than a frame may hold, and oversized messages of either kind.
        let mut huge_header = alloc::vec![CONTROL];
        huge_header.extend_from_slice(&(MAX_FRAME_LEN + 1).to_be_bytes());
        let oversized = alloc::vec![DATAGRAM; MAX_MESSAGE_LEN + 1];
        let big_datagram = datagram_message(&alloc::vec![0; MAX_DATAGRAM_LEN + 1]);
        for bad in [&huge_header[..], &oversized[..], &big_datagram[..]] {
            assert_eq!(split(bad).map_err(DecodeError::code), Err(ErrorCode::FrameTooLarge));
        }
    }
}
