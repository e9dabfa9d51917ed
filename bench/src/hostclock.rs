//! The host's `CLOCK_MONOTONIC`, the one axis every process of a run shares.
//!
//! The Downbeat server publishes where its time zero lies on this clock
//! (`downbeat_clock_zero_monotonic_nanoseconds`), the peers stamp with `process.hrtime`
//! (the same clock), and the harness maps its own [`Instant`]s onto it, so true server time
//! at any instant is `monotonic - zero`, whichever process looks.

use std::time::Instant;

/// The host's monotonic clock now, in nanoseconds.
pub fn monotonic_now() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    // Monotonic time is never negative.
    u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0)
}

/// Maps this process's [`Instant`]s to the host's monotonic nanoseconds.
#[derive(Clone, Copy, Debug)]
pub struct HostClock {
    instant: Instant,
    monotonic: u64,
}

impl HostClock {
    /// Pairs an [`Instant`] with a monotonic reading: of a few back-to-back tries, the pair
    /// read closest together (they are the same clock on Linux, so the error is the gap).
    pub fn new() -> Self {
        let mut best: Option<(u64, Self)> = None;
        for _ in 0..5 {
            let before = Instant::now();
            let monotonic = monotonic_now();
            let after = Instant::now();
            let gap = u64::try_from(after.duration_since(before).as_nanos()).unwrap_or(u64::MAX);
            let mid = before + after.duration_since(before) / 2;
            if best.as_ref().is_none_or(|(g, _)| gap < *g) {
                best = Some((gap, Self { instant: mid, monotonic }));
            }
        }
        best.map_or(Self { instant: Instant::now(), monotonic: monotonic_now() }, |(_, c)| c)
    }

    /// The monotonic reading at `at`.
    pub fn monotonic_of(&self, at: Instant) -> u64 {
        if at >= self.instant {
            self.monotonic + u64::try_from(at.duration_since(self.instant).as_nanos()).unwrap_or(u64::MAX)
        } else {
            self.monotonic.saturating_sub(u64::try_from(self.instant.duration_since(at).as_nanos()).unwrap_or(0))
        }
    }

    /// The monotonic reading now.
    pub fn now(&self) -> u64 {
        self.monotonic_of(Instant::now())
    }
}

impl Default for HostClock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_map_onto_the_host_clock() {
        let clock = HostClock::new();
        for _ in 0..100 {
            let a = clock.now();
            let host = monotonic_now();
            let b = clock.now();
            assert!(a <= host + 20_000 && host <= b + 20_000, "{a} {host} {b}");
        }
        let earlier = Instant::now() - std::time::Duration::from_millis(5);
        assert!(clock.now() - clock.monotonic_of(earlier) >= 5_000_000);
    }
}
