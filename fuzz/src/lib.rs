//! Checks shared by the fuzz targets in `fuzz_targets/`.
//!
//! Each target feeds arbitrary bytes to one `downbeat_protocol` decoder. The properties are the
//! ones a peer relies on: a decoder returns an error and never panics, it never makes a large
//! allocation on a peer's say-so, and whatever decodes re-encodes, decodes again to an equal
//! value, and re-encodes to the same bytes.

use core::fmt::Debug;

use downbeat_protocol::{DecodeError, EncodeError, FRAME_HEADER_LEN, FrameDecoder, MAX_FRAME_LEN};
use serde::Serialize;
use serde::de::DeserializeOwned;

mod alloc_cap;

pub use alloc_cap::MAX_ALLOCATION;
use alloc_cap::capped;

/// Decodes `data` as one datagram; if it decodes, it must round-trip through `encode`.
pub fn datagram<T>(
    data: &[u8],
    decode: fn(&[u8]) -> Result<T, DecodeError>,
    encode: fn(&T) -> Result<Vec<u8>, EncodeError>,
) where
    T: PartialEq + Debug,
{
    capped(|| {
        let Ok(datagram) = decode(data) else {
            return;
        };
        let bytes = encode(&datagram).expect("a decoded datagram re-encodes within the cap");
        let again = decode(&bytes).expect("a re-encoded datagram decodes");
        assert_eq!(again, datagram);
        let bytes_again = encode(&again).expect("an equal datagram encodes");
        assert_eq!(bytes_again, bytes, "encoding is not deterministic");
    });
}

/// Feeds `data` to a [`FrameDecoder`] the way a stream delivers it: in chunks of varying size,
/// draining every complete frame after each chunk and stopping at the first error, after which
/// a real stream is out of step and closed. Every decoded message must round-trip.
///
/// The chunk sizes come from the input itself: the low three bits of the first byte say how
/// many of the following bytes form a schedule of chunk sizes (each byte `s` gives a chunk of
/// `s + 1` bytes, cycling); with no schedule the stream arrives as one chunk. The rest of the
/// input is the stream, kept contiguous so the fuzzer can grow valid frames in it.
pub fn frames<T>(data: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    capped(|| frames_in_chunks::<T>(data));
}

fn frames_in_chunks<T>(data: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let schedule_len = usize::from(first & 0b111).min(rest.len());
    let (schedule, mut stream) = rest.split_at(schedule_len);

    let mut decoder = FrameDecoder::new();
    let mut chunk_index = 0;
    while !stream.is_empty() {
        let chunk_len = match schedule {
            [] => stream.len(),
            sizes => (usize::from(sizes[chunk_index % sizes.len()]) + 1).min(stream.len()),
        };
        let (chunk, tail) = stream.split_at(chunk_len);
        stream = tail;
        chunk_index += 1;

        decoder.push(chunk);
        loop {
            match decoder.next_frame::<T>() {
                Ok(Some(message)) => frame_round_trip(&message),
                Ok(None) => break,
                Err(_) => return,
            }
        }
        // Once drained, what is left is less than one frame: a header, or a header and part of
        // a body no longer than the cap.
        assert!(
            decoder.buffered() < FRAME_HEADER_LEN + MAX_FRAME_LEN as usize,
            "decoder holds {} bytes after draining",
            decoder.buffered()
        );
    }
}

/// `message` came out of a decoder: it must encode as a frame, decode from that frame alone to
/// an equal value with nothing left over, and encode again to the very same bytes.
pub fn frame_round_trip<T>(message: &T)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let bytes = downbeat_protocol::encode_frame(message).expect("a decoded message re-encodes within the cap");
    let mut decoder = FrameDecoder::new();
    decoder.push(&bytes);
    let again = decoder.next_frame::<T>().expect("a re-encoded frame decodes").expect("a re-encoded frame is complete");
    assert_eq!(&again, message);
    assert_eq!(decoder.buffered(), 0, "bytes left over after a re-encoded frame");
    let bytes_again = downbeat_protocol::encode_frame(&again).expect("an equal message encodes");
    assert_eq!(bytes_again, bytes, "encoding is not deterministic");
}
