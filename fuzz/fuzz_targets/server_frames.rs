//! `FrameDecoder` fed `ServerMessage` frames in chunks never panics, and every frame it yields
//! round-trips.
#![no_main]

use downbeat_protocol::ServerMessage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    downbeat_fuzz::frames::<ServerMessage>(data);
});
