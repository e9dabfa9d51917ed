//! `decode_server_datagram` never panics, and what it accepts round-trips.
#![no_main]

use downbeat_protocol::{decode_server_datagram, encode_server_datagram};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    downbeat_fuzz::datagram(data, decode_server_datagram, encode_server_datagram);
});
