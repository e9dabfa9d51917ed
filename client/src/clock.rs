//! Local clocks: the one seam between the client and real time.

use std::time::{Duration, Instant};

use downbeat_protocol::ClientNanos;

/// A local clock the client timestamps with.
pub trait LocalClock: Send + Sync + std::fmt::Debug + 'static {
    /// The local clock now.
    fn now(&self) -> ClientNanos;
    /// The real instant at which this clock reads `local` (for sleeping until then).
    fn instant_at(&self, local: ClientNanos) -> Instant;
}

/// The machine's monotonic clock, counted from when this value was made.
#[derive(Clone, Copy, Debug)]
pub struct SystemClock {
    base: Instant,
}

impl SystemClock {
    /// A clock reading zero now.
    pub fn new() -> Self {
        Self { base: Instant::now() }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalClock for SystemClock {
    fn now(&self) -> ClientNanos {
        ClientNanos(u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }

    fn instant_at(&self, local: ClientNanos) -> Instant {
        self.base + Duration::from_nanos(local.0)
    }
}

/// A clock with a chosen offset and drift against real time, for tests and benchmarks:
/// `local = 1000 s + offset + elapsed_since(base) * (1 + drift)`. The harness that made it
/// knows the truth and can measure a client's error against it.
#[derive(Clone, Copy, Debug)]
pub struct InjectedClock {
    base: Instant,
    offset_nanos: i64,
    drift_ppm: f64,
}

/// Keeps injected readings positive for offsets down to -1000 s.
const INJECTED_ORIGIN: i128 = 1_000_000_000_000;

impl InjectedClock {
    /// A clock offset by `offset_nanos` from `base` and running `drift_ppm` fast.
    pub fn new(base: Instant, offset_nanos: i64, drift_ppm: f64) -> Self {
        Self { base, offset_nanos, drift_ppm }
    }

    /// The reading at real instant `at`.
    pub fn reading_at(&self, at: Instant) -> ClientNanos {
        let elapsed = at.saturating_duration_since(self.base).as_nanos() as f64;
        let local = INJECTED_ORIGIN + i128::from(self.offset_nanos) + (elapsed * (1.0 + self.drift_ppm * 1e-6)) as i128;
        ClientNanos(local.clamp(0, i128::from(u64::MAX)) as u64)
    }
}

impl LocalClock for InjectedClock {
    fn now(&self) -> ClientNanos {
        self.reading_at(Instant::now())
    }

    fn instant_at(&self, local: ClientNanos) -> Instant {
        let since = (i128::from(local.0) - INJECTED_ORIGIN - i128::from(self.offset_nanos)) as f64;
        let elapsed = (since / (1.0 + self.drift_ppm * 1e-6)).max(0.0);
        self.base + Duration::from_nanos(elapsed as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injected_clock_inverts() {
        let base = Instant::now();
        let c = InjectedClock::new(base, -300_000_000, 87.0);
        let at = base + Duration::from_millis(1234);
        let local = c.reading_at(at);
        let back = c.instant_at(local);
        let diff = if back > at { back - at } else { at - back };
        assert!(diff < Duration::from_micros(1), "{diff:?}");
    }
}
