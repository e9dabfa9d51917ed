//! Rate limiting on virtual time: an exact integer token bucket.
//!
//! A [`TokenBucket`] holds up to `burst` tokens and refills at `per_second` tokens per second.
//! It counts credit in *token-nanoseconds*: one token is worth `1_000_000_000` units and every
//! elapsed nanosecond adds `per_second` units, so refill is exact integer arithmetic with no
//! rounding and no float drift, however long the bucket lives. Like the rest of the engine it
//! never reads a clock: every call takes `now_nanos` (any monotonic nanosecond clock; the server
//! uses its own). Time that appears to go backwards mints nothing and panics nowhere: the bucket
//! simply waits until the clock passes the latest instant it has seen.

/// Credit units per token: one second's worth of nanoseconds.
const UNITS_PER_TOKEN: u128 = 1_000_000_000;

/// A token bucket: `burst` tokens at most, refilled at `per_second` tokens per second.
///
/// It starts full. See the module docs for the arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenBucket {
    per_second: u32,
    burst: u32,
    /// Credit in token-nanoseconds (`tokens * 1e9`), at most `burst * 1e9`.
    credit: u128,
    /// The latest instant refilled to.
    last: u64,
}

impl TokenBucket {
    /// A full bucket at `now_nanos`.
    pub fn new(per_second: u32, burst: u32, now_nanos: u64) -> Self {
        Self { per_second, burst, credit: u128::from(burst) * UNITS_PER_TOKEN, last: now_nanos }
    }

    /// Tokens refilled per second.
    pub fn per_second(&self) -> u32 {
        self.per_second
    }

    /// Most tokens the bucket holds.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    fn cap(&self) -> u128 {
        u128::from(self.burst) * UNITS_PER_TOKEN
    }

    /// The credit at `now_nanos`, without changing anything. Earlier instants than the last
    /// one seen count as that one.
    fn credit_at(&self, now_nanos: u64) -> u128 {
        let elapsed = u128::from(now_nanos.saturating_sub(self.last));
        // At most 2^64 * 2^32: no overflow in u128.
        self.credit.saturating_add(elapsed * u128::from(self.per_second)).min(self.cap())
    }

    fn refill(&mut self, now_nanos: u64) {
        self.credit = self.credit_at(now_nanos);
        self.last = self.last.max(now_nanos);
    }

    /// Whole tokens available at `now_nanos`.
    pub fn available(&self, now_nanos: u64) -> u32 {
        // At most `burst`, so it fits.
        u32::try_from(self.credit_at(now_nanos) / UNITS_PER_TOKEN).unwrap_or(u32::MAX)
    }

    /// Takes one token at `now_nanos`; false (and nothing taken) if none is available.
    pub fn try_take(&mut self, now_nanos: u64) -> bool {
        self.try_take_n(1, now_nanos)
    }

    /// Takes `n` tokens at `now_nanos`, all or nothing; false (and nothing taken) if fewer than
    /// `n` are available. Taking zero always succeeds.
    pub fn try_take_n(&mut self, n: u32, now_nanos: u64) -> bool {
        self.refill(now_nanos);
        let cost = u128::from(n) * UNITS_PER_TOKEN;
        if self.credit < cost {
            return false;
        }
        self.credit -= cost;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;
    const MS: u64 = 1_000_000;

    #[test]
    fn burst_then_sustained_rate() {
        let start = 5 * SEC;
        let mut b = TokenBucket::new(20, 40, start);
        assert_eq!(b.available(start), 40);
        // The whole burst at once, then nothing.
        for _ in 0..40 {
            assert!(b.try_take(start));
        }
        assert!(!b.try_take(start));
        assert_eq!(b.available(start), 0);
        // One token per 50 ms: not a nanosecond early.
        assert!(!b.try_take(start + 50 * MS - 1));
        assert!(b.try_take(start + 50 * MS));
        assert!(!b.try_take(start + 50 * MS));
        // Asking every millisecond for 10 virtual seconds gets exactly the sustained rate.
        let mut taken = 0;
        for ms in 51..=10_050 {
            if b.try_take(start + ms * MS) {
                taken += 1;
            }
        }
        assert_eq!(taken, 200);
        // Idle for a minute: refills to the burst, not beyond.
        assert_eq!(b.available(start + 70 * SEC), 40);
        assert!(!b.try_take_n(41, start + 70 * SEC));
        assert_eq!(b.available(start + 70 * SEC), 40, "all or nothing");
        assert!(b.try_take_n(40, start + 70 * SEC));
        assert!(b.try_take_n(0, start + 70 * SEC));
        assert_eq!(b.available(start + 70 * SEC), 0);
    }

    #[test]
    fn refill_is_exact_over_an_hour() {
        // 7 tokens per second does not divide a second in whole nanoseconds: a per-token
        // interval of 142_857_142 ns would drift; credit arithmetic does not.
        let mut b = TokenBucket::new(7, 2, 0);
        assert!(b.try_take_n(2, 0));
        let mut taken = 0u64;
        let mut now = 0;
        // Poll at an awkward cadence so refills land at odd fractions.
        while now < 3_600 * SEC {
            now += 1_234_567;
            if b.try_take(now) {
                taken += 1;
            }
        }
        // Every whole token minted by `now` was taken (credit never reached the burst, so none
        // was lost to the cap), and that is exactly 7 per second for the hour.
        assert_eq!(taken, now * 7 / SEC);
        assert_eq!(taken, 3_600 * 7);
    }

    #[test]
    fn zero_rate_never_refills() {
        let mut b = TokenBucket::new(0, 3, 0);
        assert!(b.try_take_n(3, 0));
        assert_eq!(b.available(u64::MAX), 0);
        assert!(!b.try_take(u64::MAX));
        let mut empty = TokenBucket::new(10, 0, 0);
        assert!(!empty.try_take(100 * SEC));
    }

    #[test]
    fn time_going_backwards_mints_nothing() {
        let mut b = TokenBucket::new(10, 2, 10 * SEC);
        assert!(b.try_take_n(2, 10 * SEC));
        // Back a minute, then forward to where it was: still empty.
        assert!(!b.try_take(9 * SEC));
        assert_eq!(b.available(0), 0);
        assert!(!b.try_take(10 * SEC));
        // Only time beyond the latest instant seen refills.
        assert!(b.try_take(10 * SEC + 100 * MS));
        assert!(!b.try_take(10 * SEC + 100 * MS));
        // Extremes do not panic.
        let mut huge = TokenBucket::new(u32::MAX, u32::MAX, 0);
        assert_eq!(huge.available(u64::MAX), u32::MAX);
        assert!(huge.try_take_n(u32::MAX, u64::MAX));
        assert!(!huge.try_take(0));
    }
}
