//! Counters and delay histograms of the emulator, per direction.

use serde::Serialize;
use serde::ser::{SerializeStruct, Serializer};

/// Sub-buckets per power of two: quantiles are exact below 64 ns and within 1/64 above.
const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;

/// A log-linear histogram of nanosecond values (relative error under 1.6 %).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    max: u64,
}

fn bucket_of(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros();
    let shift = exp - SUB_BITS;
    (SUB + u64::from(shift) * SUB + ((v >> shift) & (SUB - 1))) as usize
}

/// The midpoint of bucket `b`.
fn value_of(b: usize) -> u64 {
    let b = b as u64;
    if b < SUB {
        return b;
    }
    let shift = (b - SUB) / SUB;
    let low = (SUB + (b - SUB) % SUB) << shift;
    low + ((1u64 << shift) >> 1)
}

impl Histogram {
    /// Records one value.
    pub fn record(&mut self, v: u64) {
        let b = bucket_of(v);
        if self.buckets.len() <= b {
            self.buckets.resize(b + 1, 0);
        }
        self.buckets[b] += 1;
        self.count += 1;
        self.max = self.max.max(v);
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The largest value recorded (exact).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value at quantile `q` in `[0, 1]` (0 when empty).
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((self.count - 1) as f64 * q.clamp(0.0, 1.0)).round() as u64;
        let mut seen = 0;
        for (b, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen > rank {
                return value_of(b).min(self.max);
            }
        }
        self.max
    }
}

/// Serialized as a summary in microseconds: count, p50, p90, p99, p99.9, max.
impl Serialize for Histogram {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let us = |v: u64| v as f64 / 1e3;
        let mut s = serializer.serialize_struct("Histogram", 6)?;
        s.serialize_field("count", &self.count)?;
        s.serialize_field("p50_us", &us(self.quantile(0.5)))?;
        s.serialize_field("p90_us", &us(self.quantile(0.9)))?;
        s.serialize_field("p99_us", &us(self.quantile(0.99)))?;
        s.serialize_field("p999_us", &us(self.quantile(0.999)))?;
        s.serialize_field("max_us", &us(self.max))?;
        s.end()
    }
}

/// What one direction (all clients) saw.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DirectionStats {
    /// IPv4 packets of a known client read from the device.
    pub packets: u64,
    /// Packets written to the other device.
    pub forwarded: u64,
    /// Dropped by random loss.
    pub dropped_random: u64,
    /// Dropped in a loss burst.
    pub dropped_burst: u64,
    /// Dropped in an outage.
    pub dropped_outage: u64,
    /// Packets that waited for a power-save beacon.
    pub held_power_save: u64,
    /// Packets picked to be overtaken.
    pub reordered: u64,
    /// Packets ignored: not IPv4, or not between a client and the server subnet.
    pub ignored: u64,
    /// Writes to the other device that failed.
    pub write_errors: u64,
    /// Delay the emulator added, measured (read from one device to written to the other), ns.
    pub added_delay: Histogram,
    /// How late packets left against their planned release, ns (the timer's accuracy).
    pub lateness: Histogram,
}

impl DirectionStats {
    /// All packets dropped.
    pub fn dropped(&self) -> u64 {
        self.dropped_random + self.dropped_burst + self.dropped_outage
    }
}

/// Both directions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Client to server.
    pub up: DirectionStats,
    /// Server to client.
    pub down: DirectionStats,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_round_trip_within_their_precision() {
        for v in [0u64, 1, 63, 64, 65, 127, 128, 1_000, 123_456, 3_000_000, 250_000_000, u64::MAX / 3] {
            let mid = value_of(bucket_of(v));
            let err = mid.abs_diff(v) as f64 / v.max(1) as f64;
            assert!(err <= 1.0 / SUB as f64, "{v} -> {mid}");
        }
        assert!((0..100_000u64).step_by(7).all(|v| bucket_of(v) <= bucket_of(v + 1)));
    }

    #[test]
    fn quantiles_of_a_known_set() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile(0.5), 0);
        for v in 1..=10_000u64 {
            h.record(v * 1_000);
        }
        assert_eq!(h.count(), 10_000);
        assert_eq!(h.max(), 10_000_000);
        for (q, want) in [(0.5, 5_000_000.0), (0.9, 9_000_000.0), (0.99, 9_900_000.0)] {
            let got = h.quantile(q) as f64;
            assert!((got - want).abs() / want < 0.02, "q{q}: {got}");
        }
        assert_eq!(h.quantile(1.0), 10_000_000);
        let json = serde_json::to_value(&h).expect("serializes");
        assert_eq!(json["count"], 10_000);
        assert_eq!(json["max_us"], 10_000.0);
    }
}
