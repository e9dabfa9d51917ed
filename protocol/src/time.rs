//! Wire newtypes with their units in the name.

use serde::{Deserialize, Serialize};

/// An instant on the server's monotonic clock, in nanoseconds since the server started.
///
/// Never the wall clock: a wall-clock step must not move a single beat.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServerNanos(pub u64);

/// An instant on a client's own local clock, in nanoseconds from an origin only that client
/// knows. The server echoes it back untouched.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClientNanos(pub u64);

/// A tempo in millionths of a beat per minute: 120 BPM is `MicroBpm(120_000_000)`.
///
/// Held as an exact integer so that beat instants are computed exactly, never accumulated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MicroBpm(pub u32);

impl MicroBpm {
    /// A whole number of beats per minute.
    pub const fn from_bpm(bpm: u32) -> Self {
        Self(bpm.saturating_mul(1_000_000))
    }

    /// The tempo as floating-point BPM, for display only.
    pub fn as_bpm_f64(self) -> f64 {
        f64::from(self.0) / 1_000_000.0
    }
}

impl ServerNanos {
    /// `self + nanos`, saturating.
    pub const fn add_nanos(self, nanos: u64) -> Self {
        Self(self.0.saturating_add(nanos))
    }
}
