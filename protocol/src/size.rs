//! The largest encodings of the messages whose size grows with the protocol's bounds, computed
//! from those bounds, so a bound is never raised past what one frame carries.
//!
//! Postcard writes `u16`, `u32`, `u64` and lengths as varints (7 bits a byte), `i64` zigzagged
//! the same way, `u8` and `bool` as one byte, an `Option` as a one-byte tag before its value,
//! an enum's variant index as a varint, and a string or sequence as its length then its
//! contents. The test below builds the largest welcome and checks that it encodes to exactly
//! [`MAX_WELCOME_LEN`], so the sums here cannot drift from the types.

use crate::{
    MAX_ASSIGNED_BEATS, MAX_FRAME_LEN, MAX_JOIN_CODE_LEN, MAX_MEMBERS, MAX_NAME_LEN, MAX_PART_LEN, MAX_SEGMENTS,
};

/// Bytes of the longest varint of a `bits`-bit integer.
const fn varint(bits: usize) -> usize {
    bits.div_ceil(7)
}

/// Bytes of the varint of `n` (a length).
const fn varint_of(n: usize) -> usize {
    let mut bytes = 1;
    let mut rest = n >> 7;
    while rest > 0 {
        bytes += 1;
        rest >>= 7;
    }
    bytes
}

/// A string of at most `max` bytes, at its longest.
const fn string(max: usize) -> usize {
    varint_of(max) + max
}

/// A sequence of at most `max` elements of at most `each` bytes, at its longest.
const fn sequence(max: usize, each: usize) -> usize {
    varint_of(max) + max * each
}

const U16: usize = varint(16);
const U32: usize = varint(32);
const U64: usize = varint(64);
const I64: usize = varint(64);
const BYTE: usize = 1;
/// An enum variant index (every enum here has fewer than 128 variants).
const VARIANT: usize = 1;

/// `SyncQuality`: synced, rtt, uncertainty.
const SYNC_QUALITY: usize = BYTE + U32 + U32;
/// `Assignment`: an optional part, then the beats.
const ASSIGNMENT: usize = BYTE + string(MAX_PART_LEN) + sequence(MAX_ASSIGNED_BEATS, BYTE);
/// `Member`: id, name, role, assignment, muted, sync, transport.
const MEMBER: usize = U64 + string(MAX_NAME_LEN) + VARIANT + ASSIGNMENT + BYTE + SYNC_QUALITY + VARIANT;
/// `Segment`: start, start beat, tempo, beats per bar, running, count-in bars.
const SEGMENT: usize = U64 + I64 + U32 + BYTE + BYTE + BYTE;
/// `Timeline`: epoch and segments.
const TIMELINE: usize = U64 + sequence(MAX_SEGMENTS, SEGMENT);
/// `RoomInfo`: code, name, playout delay.
const ROOM_INFO: usize = string(MAX_JOIN_CODE_LEN) + string(MAX_NAME_LEN) + U64;

/// The longest `ServerMessage::Welcome` frame body: a room of [`MAX_MEMBERS`] members, every
/// name and part at its longest, every number at its widest.
pub const MAX_WELCOME_LEN: usize = VARIANT // ServerMessage::Welcome
    + U16 // version
    + U64 // member id
    + VARIANT // role
    + ROOM_INFO
    + TIMELINE
    + sequence(MAX_MEMBERS, MEMBER)
    + U64 // lead
    + U64 // server now
    + U64; // token expiry

/// The longest `ServerDatagram::SyncReply`: id, `t0`, `t1` and `t2` at their widest. The
/// server encodes its most frequent datagram into a buffer of this size, without allocating.
pub const MAX_SYNC_REPLY_LEN: usize = VARIANT // ServerDatagram::SyncReply
    + U32 // id
    + U64 // t0
    + U64 // t1
    + U64; // t2

const _: () = assert!(
    MAX_WELCOME_LEN <= MAX_FRAME_LEN as usize,
    "a welcome to a full room must fit one frame: lower MAX_MEMBERS or the lengths of names and parts"
);

#[cfg(test)]
mod tests {
    use alloc::string::String;
    use alloc::vec::Vec;

    use super::*;
    use crate::*;

    fn longest<const N: usize>() -> BoundedString<N> {
        // Multi-byte characters count by their bytes: `N` ASCII bytes is the longest.
        BoundedString::new("w".repeat(N)).unwrap()
    }

    fn widest_member(id: u64) -> Member {
        Member {
            id: u64::MAX - id,
            name: longest(),
            role: Role::Student,
            assignment: Assignment {
                part: Some(longest()),
                beats: BoundedVec::try_from_vec((0..MAX_ASSIGNED_BEATS as u8).collect()).unwrap(),
            },
            muted: true,
            sync: SyncQuality { synced: true, rtt_micros: u32::MAX, uncertainty_micros: u32::MAX },
            transport: Transport::WebSocket,
        }
    }

    fn widest_segment() -> Segment {
        Segment {
            start: ServerNanos(u64::MAX),
            start_beat: i64::MIN,
            tempo: MicroBpm(u32::MAX),
            beats_per_bar: u8::MAX,
            running: true,
            count_in_bars: u8::MAX,
        }
    }

    /// The largest welcome a full room can send: [`MAX_MEMBERS`] members with the longest
    /// names and parts, the most segments, every integer at its widest.
    fn largest_welcome() -> ServerMessage {
        let members: Vec<Member> = (0..MAX_MEMBERS as u64).map(widest_member).collect();
        ServerMessage::Welcome(Welcome {
            version: u16::MAX,
            member_id: u64::MAX,
            role: Role::Teacher,
            room: RoomInfo { code: longest(), name: longest(), playout_delay_nanos: u64::MAX },
            timeline: Timeline {
                epoch: u64::MAX,
                segments: BoundedVec::try_from_vec(alloc::vec![widest_segment(); MAX_SEGMENTS]).unwrap(),
            },
            members: BoundedVec::try_from_vec(members).unwrap(),
            lead_nanos: u64::MAX,
            server_now: ServerNanos(u64::MAX),
            token_expires_at: u64::MAX,
        })
    }

    #[test]
    fn the_largest_welcome_fits_one_frame() {
        let message = largest_welcome();
        let frame = encode_frame(&message).expect("the welcome of a full room fits one frame");
        let body = &frame[FRAME_HEADER_LEN..];
        // The bound computed from the types is exact, so it is a true bound.
        assert_eq!(body.len(), MAX_WELCOME_LEN);
        assert!(body.len() <= MAX_FRAME_LEN as usize);
        // And the receiver decodes it.
        assert_eq!(decode_frame_body::<ServerMessage>(body).unwrap(), message);
        // Over WebSocket too: one message of at most the mapping's cap.
        assert!(ws::control_message(&frame).len() <= ws::MAX_MESSAGE_LEN);
    }

    #[test]
    fn the_widest_sync_reply_takes_its_bound_exactly() {
        let widest = ServerDatagram::SyncReply(SyncReply {
            id: u32::MAX,
            t0: ClientNanos(u64::MAX),
            t1: ServerNanos(u64::MAX),
            t2: ServerNanos(u64::MAX),
        });
        assert_eq!(encode_server_datagram(&widest).unwrap().len(), MAX_SYNC_REPLY_LEN);
        let mut buffer = [0; MAX_SYNC_REPLY_LEN];
        assert_eq!(encode_server_datagram_to_slice(&widest, &mut buffer).unwrap().len(), MAX_SYNC_REPLY_LEN);
    }

    #[test]
    fn varints_are_counted_by_their_bytes() {
        assert_eq!((varint(16), varint(32), varint(64)), (3, 5, 10));
        assert_eq!((varint_of(0), varint_of(127), varint_of(128), varint_of(16_384)), (1, 1, 2, 3));
        let len = postcard::to_allocvec(&String::from("x").repeat(128)).unwrap().len();
        assert_eq!(len, string(128));
    }
}
