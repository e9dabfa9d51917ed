//! The server's one clock seam.

use std::time::Duration;

use downbeat_protocol::ServerNanos;
use tokio::time::Instant;

/// The server's monotonic clock: nanoseconds since the server started, never the wall clock,
/// so a wall-clock step cannot move a beat.
///
/// The nodes of a cluster share one time base instead ([`Self::on_shared_base`]): the clock
/// reads the host's wall clock as nanoseconds since [`SHARED_EPOCH_UNIX_SECS`] once, at start,
/// and counts on from there with the monotonic clock. Hosts whose wall clocks agree (chrony)
/// then read the same server time at the same instant, so a room's timeline moves between
/// nodes as it is: beat n sounds at the same number everywhere.
///
/// Built on [`tokio::time::Instant`], so tests that pause tokio's clock
/// (`tokio::time::pause()`) see this clock pause too.
#[derive(Clone, Copy, Debug)]
pub struct ServerClock {
    base: Instant,
    /// The reading at `base`.
    at_base: u64,
}

/// The zero of a cluster's shared time base: 2026-01-01T00:00:00Z.
pub const SHARED_EPOCH_UNIX_SECS: u64 = 1_767_225_600;

impl ServerClock {
    /// A clock whose zero is now.
    pub fn new() -> Self {
        Self { base: Instant::now(), at_base: 0 }
    }

    /// A clock on the cluster's shared time base: it reads the host's wall clock since
    /// [`SHARED_EPOCH_UNIX_SECS`] now, and counts on monotonically.
    pub fn on_shared_base() -> Self {
        let base = Instant::now();
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH + Duration::from_secs(SHARED_EPOCH_UNIX_SECS))
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX / 2));
        Self { base, at_base: wall }
    }

    /// A clock whose zero is `base`.
    pub const fn with_base(base: Instant) -> Self {
        Self { base, at_base: 0 }
    }

    /// Whether this clock is on a cluster's shared time base.
    pub const fn is_shared(&self) -> bool {
        self.at_base > 0
    }

    /// The instant this clock reads zero (on a shared base: the instant it started, which
    /// reads the base's offset).
    pub const fn base(&self) -> Instant {
        self.base
    }

    /// The current server time.
    pub fn now(&self) -> ServerNanos {
        self.since_base(Instant::now())
    }

    /// The server time of `instant` (zero for instants before the base).
    pub fn since_base(&self, instant: Instant) -> ServerNanos {
        let nanos = instant.saturating_duration_since(self.base).as_nanos();
        ServerNanos(u64::try_from(nanos).unwrap_or(u64::MAX).saturating_add(self.at_base))
    }

    /// The reading of the host's `CLOCK_MONOTONIC`, in nanoseconds, at which this clock reads
    /// zero. Every process on the host shares that clock, so a benchmark in another process
    /// can turn its own instants into true server time and measure clients against it.
    ///
    /// Linux only (`std::time::Instant` is `CLOCK_MONOTONIC` there); `None` elsewhere, and
    /// meaningless while tokio's clock is paused. Two back-to-back clock reads make it exact
    /// to a fraction of a microsecond.
    pub fn zero_on_host_monotonic(&self) -> Option<u64> {
        #[cfg(target_os = "linux")]
        {
            let host = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
            let now = std::time::Instant::now();
            let host_nanos = u64::try_from(host.tv_sec).ok()? * 1_000_000_000 + u64::try_from(host.tv_nsec).ok()?;
            let since_zero = u64::try_from(now.saturating_duration_since(self.base.into_std()).as_nanos()).ok()?;
            host_nanos.checked_sub(since_zero.checked_add(self.at_base)?)
        }
        #[cfg(not(target_os = "linux"))]
        {
            None
        }
    }

    /// The wall-clock time (Unix milliseconds) of server instant `t`, past or future, placed
    /// from now.
    pub fn unix_ms_of(&self, t: ServerNanos) -> i64 {
        let now = self.now();
        let now_ms = crate::sel::unix_ms_now();
        let ms = |nanos: u64| i64::try_from(nanos / 1_000_000).unwrap_or(i64::MAX);
        if t >= now { now_ms.saturating_add(ms(t.0 - now.0)) } else { now_ms.saturating_sub(ms(now.0 - t.0)) }
    }

    /// The [`Instant`] at which this clock reads `t` (for `sleep_until`; times before its
    /// start give its start). Saturates about 30 years out rather than overflowing.
    pub fn instant_of(&self, t: ServerNanos) -> Instant {
        const FAR: Duration = Duration::from_secs(30 * 365 * 24 * 3600);
        let offset = Duration::from_nanos(t.0.saturating_sub(self.at_base)).min(FAR);
        self.base.checked_add(offset).unwrap_or(self.base + FAR)
    }
}

impl Default for ServerClock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn follows_tokios_clock_and_round_trips() {
        let clock = ServerClock::new();
        assert_eq!(clock.now(), ServerNanos(0));
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(clock.now(), ServerNanos(1_500_000_000));
        let t = ServerNanos(123_456_789);
        assert_eq!(clock.since_base(clock.instant_of(t)), t);
        // Far-future times saturate instead of panicking.
        let _ = clock.instant_of(ServerNanos(u64::MAX));
    }

    #[test]
    fn clocks_on_the_shared_base_agree_across_processes_and_read_the_wall_clock() {
        let a = ServerClock::on_shared_base();
        std::thread::sleep(Duration::from_millis(5));
        let b = ServerClock::on_shared_base();
        assert!(a.is_shared() && !ServerClock::new().is_shared());
        // Started apart, read together: the same time, up to the reads in between.
        let (ta, tb) = (a.now().0, b.now().0);
        assert!(ta.abs_diff(tb) < 500_000, "{ta} vs {tb}");
        let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_nanos()
            as u64
            - SHARED_EPOCH_UNIX_SECS * 1_000_000_000;
        assert!(wall.abs_diff(b.now().0) < 50_000_000, "{wall} vs {}", b.now().0);
        // Instants round-trip, and a time before the clock started is its start.
        let t = ServerNanos(b.now().0 + 123_456_789);
        assert!(b.since_base(b.instant_of(t)).0.abs_diff(t.0) < 1_000);
        assert_eq!(b.instant_of(ServerNanos(1)), b.base());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn zero_on_the_host_clock_matches_a_fresh_reading() {
        let clock = ServerClock::new();
        std::thread::sleep(Duration::from_millis(20));
        let zero = clock.zero_on_host_monotonic().expect("linux");
        let host = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let host_nanos = host.tv_sec as u64 * 1_000_000_000 + host.tv_nsec as u64;
        let server_now = clock.now().0;
        // The host clock now minus server time now is the zero, up to the reads in between.
        let diff = (host_nanos - server_now) as i64 - zero as i64;
        assert!(diff.abs() < 1_000_000, "zero {zero} is {diff} ns off");
        // Repeated derivations agree closely.
        let again = clock.zero_on_host_monotonic().expect("linux");
        assert!((again as i64 - zero as i64).abs() < 100_000, "{again} vs {zero}");
    }
}
