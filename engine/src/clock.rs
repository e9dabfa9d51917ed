//! The NTP-style clock-sync estimator every client runs.
//!
//! One exchange is four timestamps: the client sends at `t0` (its clock), the server receives
//! at `t1` and replies at `t2` (its monotonic clock), the client receives at `t3`. Then
//! `offset = ((t1 - t0) + (t2 - t3)) / 2` (server minus client) and
//! `delay = (t3 - t0) - (t2 - t1)`. The true offset lies within `delay / 2` of a sample's
//! offset; how far depends on how unequal the two directions were, which no exchange can see.
//! Samples that crossed the network fastest are therefore the most trustworthy (NTP's clock
//! filter).
//!
//! The estimator keeps a window of samples and fits `offset(t) = a + b * (t - t_ref)` by
//! weighted least squares:
//! - weights fall with the square of a sample's delay above the window's minimum, so queued,
//!   power-saved or retransmitted exchanges barely count (minimum-delay filtering);
//! - the slope `b` is the drift between the two clocks, shrunk towards zero by a prior of a
//!   few hundred ppm until the window spans enough time to measure it (regression, not a guess);
//! - samples whose residual is far outside their own error bound are rejected as outliers and
//!   the fit repeated; a run of consecutive outliers means the local clock stepped, and the
//!   window restarts from them.
//!
//! It asks for exchanges in a burst at first, faster while uncertain, and slowly once settled.

use std::collections::VecDeque;

use downbeat_protocol::{ClientNanos, ServerNanos, SyncReply, SyncRequest};

/// Estimator settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Samples kept.
    pub window: usize,
    /// Exchanges at the burst interval after a (re)start.
    pub burst_samples: usize,
    /// Interval during the burst.
    pub burst_interval_nanos: u64,
    /// Interval while the estimate is less certain than the target.
    pub uncertain_interval_nanos: u64,
    /// Interval once settled.
    pub steady_interval_nanos: u64,
    /// Uncertainty below which the estimate counts as settled.
    pub target_uncertainty_nanos: u64,
    /// Prior standard deviation of drift, in ppm: how hard the slope is pulled towards zero
    /// before the window spans enough time to measure it.
    pub drift_prior_ppm: f64,
    /// Drift beyond which an estimate is clamped.
    pub max_drift_ppm: f64,
    /// Requests remembered while waiting for their replies.
    pub max_outstanding: usize,
    /// Replies slower than this round trip are ignored.
    pub max_rtt_nanos: u64,
    /// Samples needed before [`Estimator::is_synced`] can be true.
    pub min_samples_for_sync: usize,
    /// Uncertainty above which [`Estimator::is_synced`] is false.
    pub sync_uncertainty_nanos: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            window: 64,
            burst_samples: 30,
            burst_interval_nanos: 50_000_000,
            uncertain_interval_nanos: 200_000_000,
            steady_interval_nanos: 1_000_000_000,
            target_uncertainty_nanos: 30_000,
            drift_prior_ppm: 100.0,
            max_drift_ppm: 1_000.0,
            max_outstanding: 32,
            max_rtt_nanos: 10_000_000_000,
            min_samples_for_sync: 8,
            sync_uncertainty_nanos: 1_000_000,
        }
    }
}

/// One completed exchange.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Client clock halfway between send and receive.
    pub local_mid: i128,
    /// Server minus client clock, in ns.
    pub offset: i128,
    /// Round-trip network delay (server hold time removed), in ns.
    pub delay: u64,
}

impl Sample {
    /// The sample from the four timestamps, or `None` if they are inconsistent.
    pub fn from_timestamps(t0: ClientNanos, t1: ServerNanos, t2: ServerNanos, t3: ClientNanos) -> Option<Self> {
        let (t0, t1, t2, t3) = (i128::from(t0.0), i128::from(t1.0), i128::from(t2.0), i128::from(t3.0));
        if t3 < t0 || t2 < t1 {
            return None;
        }
        // Drift makes a tiny negative delay possible on a very fast path; it is zero.
        let delay = ((t3 - t0) - (t2 - t1)).max(0);
        Some(Self { local_mid: (t0 + t3) / 2, offset: ((t1 - t0) + (t2 - t3)) / 2, delay: u64::try_from(delay).ok()? })
    }
}

/// What the estimator believes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    /// Server minus client clock at the time asked about, in ns.
    pub offset_nanos: i64,
    /// Drift of the server clock against the client's, in ppm.
    pub drift_ppm: f64,
    /// Statistical standard error of the offset, in ns. Does not include path asymmetry,
    /// which is invisible; [`Estimate::rtt_nanos`]` / 2` bounds that.
    pub uncertainty_nanos: u64,
    /// The smallest round-trip delay in the window, in ns.
    pub rtt_nanos: u64,
    /// Samples in the window.
    pub samples: usize,
}

#[derive(Clone, Copy, Debug)]
struct Fit {
    /// Origin of the fit: x is `local - x0`, y is `offset - y0`.
    x0: i128,
    y0: i128,
    /// Weighted means of x and y.
    x_bar: f64,
    y_bar: f64,
    /// Slope (drift, ns per ns).
    slope: f64,
    /// Sum of weights and the slope's precision, for the standard error.
    weight_sum: f64,
    slope_precision: f64,
    min_delay: u64,
}

impl Fit {
    fn offset_at(&self, local: i128) -> f64 {
        let x = (local - self.x0) as f64;
        self.y0 as f64 + self.y_bar + self.slope * (x - self.x_bar)
    }

    fn std_error_at(&self, local: i128) -> f64 {
        let dx = (local - self.x0) as f64 - self.x_bar;
        (1.0 / self.weight_sum + dx * dx / self.slope_precision).sqrt()
    }
}

/// The estimator. See the module docs.
#[derive(Clone, Debug)]
pub struct Estimator {
    config: Config,
    samples: VecDeque<Sample>,
    outstanding: VecDeque<(u32, ClientNanos)>,
    next_id: u32,
    next_send: Option<ClientNanos>,
    burst_left: usize,
    consecutive_outliers: usize,
    fit: Option<Fit>,
    accepted: u64,
    rejected: u64,
}

impl Estimator {
    /// A fresh estimator; its first request is due at once.
    pub fn new(config: Config) -> Self {
        let burst_left = config.burst_samples;
        Self {
            config,
            samples: VecDeque::new(),
            outstanding: VecDeque::new(),
            next_id: 1,
            next_send: None,
            burst_left,
            consecutive_outliers: 0,
            fit: None,
            accepted: 0,
            rejected: 0,
        }
    }

    /// Settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// This estimator for a new session on the same time base: its samples and fit, without
    /// the requests the old session was waiting on; the next request is due at once.
    pub fn carried(&self) -> Self {
        let mut carried = self.clone();
        carried.outstanding.clear();
        carried.next_send = None;
        carried.consecutive_outliers = 0;
        carried
    }

    /// Forgets every sample and starts a new burst (after a reconnect, say).
    pub fn reset(&mut self) {
        self.samples.clear();
        self.outstanding.clear();
        self.fit = None;
        self.burst_left = self.config.burst_samples;
        self.next_send = None;
        self.consecutive_outliers = 0;
    }

    fn interval(&self, now: ClientNanos) -> u64 {
        if self.burst_left > 0 {
            return self.config.burst_interval_nanos;
        }
        match self.estimate(now) {
            Some(e) if e.uncertainty_nanos <= self.config.target_uncertainty_nanos => self.config.steady_interval_nanos,
            _ => self.config.uncertain_interval_nanos,
        }
    }

    /// The next request, if one is due at `now`.
    pub fn poll_request(&mut self, now: ClientNanos) -> Option<SyncRequest> {
        if self.next_send.is_some_and(|t| now < t) {
            return None;
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        if self.outstanding.len() >= self.config.max_outstanding {
            self.outstanding.pop_front();
        }
        self.outstanding.push_back((id, now));
        self.burst_left = self.burst_left.saturating_sub(1);
        self.next_send = Some(ClientNanos(now.0.saturating_add(self.interval(now))));
        Some(SyncRequest { id, t0: now })
    }

    /// When the next request is due.
    pub fn poll_timeout(&self) -> ClientNanos {
        self.next_send.unwrap_or_default()
    }

    /// Takes a reply received at `t3`. Returns whether it became a sample (unknown,
    /// duplicate, inconsistent or too slow replies are ignored).
    pub fn handle_reply(&mut self, t3: ClientNanos, reply: &SyncReply) -> bool {
        let Some(pos) = self.outstanding.iter().position(|&(id, t0)| id == reply.id && t0 == reply.t0) else {
            return false;
        };
        self.outstanding.remove(pos);
        let Some(sample) = Sample::from_timestamps(reply.t0, reply.t1, reply.t2, t3) else {
            self.rejected += 1;
            return false;
        };
        if sample.delay > self.config.max_rtt_nanos {
            self.rejected += 1;
            return false;
        }
        self.add_sample(sample);
        true
    }

    /// Adds a sample directly (the four-timestamp arithmetic already done).
    pub fn add_sample(&mut self, sample: Sample) {
        if let Some(fit) = &self.fit {
            let bound = 4.0 * sample_sigma(sample.delay, fit.min_delay) + 1e6;
            let min_delay = fit.min_delay.min(sample.delay);
            let near_min = sample.delay <= min_delay.saturating_mul(2).max(min_delay + 2_000_000);
            if near_min && (sample.offset as f64 - fit.offset_at(sample.local_mid)).abs() > bound {
                self.consecutive_outliers += 1;
            } else {
                self.consecutive_outliers = 0;
            }
        }
        self.samples.push_back(sample);
        while self.samples.len() > self.config.window.max(2) {
            self.samples.pop_front();
        }
        if self.consecutive_outliers >= 4 {
            // The local clock stepped (or the server restarted): the old samples describe a
            // clock that no longer exists. Keep the run that agrees with the new one.
            let keep = self.consecutive_outliers;
            let drop = self.samples.len().saturating_sub(keep);
            self.samples.drain(..drop);
            self.consecutive_outliers = 0;
            self.burst_left = self.config.burst_samples / 2;
        }
        self.accepted += 1;
        self.refit();
    }

    fn refit(&mut self) {
        let Some(min_delay) = self.samples.iter().map(|s| s.delay).min() else {
            self.fit = None;
            return;
        };
        let mut used: Vec<Sample> = self.samples.iter().copied().collect();
        let mut fit = self.fit_samples(&used, min_delay);
        if let Some(first) = fit {
            // One round of outlier rejection against each sample's own error scale.
            used.retain(|s| {
                let sigma = sample_sigma(s.delay, min_delay);
                (s.offset as f64 - first.offset_at(s.local_mid)).abs() <= 4.0 * sigma + s.delay as f64 / 2.0
            });
            if !used.is_empty() && used.len() < self.samples.len() {
                fit = self.fit_samples(&used, min_delay).or(fit);
            }
        }
        self.fit = fit;
    }

    fn fit_samples(&self, samples: &[Sample], min_delay: u64) -> Option<Fit> {
        let newest = samples.last()?;
        let best = samples.iter().min_by_key(|s| s.delay)?;
        let (x0, y0) = (newest.local_mid, best.offset);
        let (mut w_sum, mut wx, mut wy) = (0.0f64, 0.0f64, 0.0f64);
        let points: Vec<(f64, f64, f64)> = samples
            .iter()
            .map(|s| {
                let sigma = sample_sigma(s.delay, min_delay);
                ((s.local_mid - x0) as f64, (s.offset - y0) as f64, 1.0 / (sigma * sigma))
            })
            .collect();
        for &(x, y, w) in &points {
            w_sum += w;
            wx += w * x;
            wy += w * y;
        }
        let (x_bar, y_bar) = (wx / w_sum, wy / w_sum);
        let (mut sxx, mut sxy) = (0.0f64, 0.0f64);
        for &(x, y, w) in &points {
            sxx += w * (x - x_bar) * (x - x_bar);
            sxy += w * (x - x_bar) * (y - y_bar);
        }
        let prior = 1.0 / (self.config.drift_prior_ppm * 1e-6).powi(2);
        let slope_precision = sxx + prior;
        let max_slope = self.config.max_drift_ppm * 1e-6;
        let slope = (sxy / slope_precision).clamp(-max_slope, max_slope);
        (w_sum.is_finite() && w_sum > 0.0 && slope.is_finite()).then_some(Fit {
            x0,
            y0,
            x_bar,
            y_bar,
            slope,
            weight_sum: w_sum,
            slope_precision,
            min_delay,
        })
    }

    /// The estimate at local time `now`, once there is at least one sample.
    pub fn estimate(&self, now: ClientNanos) -> Option<Estimate> {
        let fit = self.fit.as_ref()?;
        let local = i128::from(now.0);
        Some(Estimate {
            offset_nanos: fit.offset_at(local).round().clamp(i64::MIN as f64, i64::MAX as f64) as i64,
            drift_ppm: fit.slope * 1e6,
            uncertainty_nanos: fit.std_error_at(local).max(1.0).min(u64::MAX as f64) as u64,
            rtt_nanos: fit.min_delay,
            samples: self.samples.len(),
        })
    }

    /// Whether the estimate is good enough to schedule audio by.
    pub fn is_synced(&self, now: ClientNanos) -> bool {
        self.samples.len() >= self.config.min_samples_for_sync
            && self.estimate(now).is_some_and(|e| e.uncertainty_nanos <= self.config.sync_uncertainty_nanos)
    }

    /// The server clock reading at local time `local`.
    pub fn to_server(&self, local: ClientNanos) -> Option<ServerNanos> {
        let fit = self.fit.as_ref()?;
        let server = i128::from(local.0) + fit.offset_at(i128::from(local.0)).round() as i128;
        Some(ServerNanos(server.clamp(0, i128::from(u64::MAX)) as u64))
    }

    /// The local time at which the server clock reads `server`.
    pub fn to_local(&self, server: ServerNanos) -> Option<ClientNanos> {
        let fit = self.fit.as_ref()?;
        // server = L + y0 + y_bar + slope * (L - x0 - x_bar); solve for L around x0.
        let rest = (i128::from(server.0) - fit.x0 - fit.y0) as f64;
        let u = (rest - fit.y_bar + fit.slope * fit.x_bar) / (1.0 + fit.slope);
        let local = fit.x0 + u.round() as i128;
        Some(ClientNanos(local.clamp(0, i128::from(u64::MAX)) as u64))
    }

    /// Samples in the window.
    pub fn sample_count(&self) -> usize {
        self.samples.len()
    }

    /// Replies accepted and rejected so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.accepted, self.rejected)
    }
}

/// A sample's offset error scale: half its delay above the window minimum (that much of the
/// round trip may have been spent in one direction only), plus a floor for timestamping noise.
fn sample_sigma(delay: u64, min_delay: u64) -> f64 {
    let floor = (min_delay as f64 / 20.0).max(10_000.0);
    (delay.saturating_sub(min_delay)) as f64 / 2.0 + floor
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests whenever asked, so tests choose the spacing.
    fn unpaced() -> Config {
        Config { burst_interval_nanos: 0, uncertain_interval_nanos: 0, steady_interval_nanos: 0, ..Config::default() }
    }

    fn exchange(est: &mut Estimator, local: u64, offset: i64, up: u64, down: u64) {
        let req = est.poll_request(ClientNanos(local)).unwrap();
        let t1 = ServerNanos((local as i64 + offset) as u64 + up);
        let t2 = ServerNanos(t1.0 + 10_000);
        let t3 = ClientNanos(local + up + 10_000 + down);
        assert!(est.handle_reply(t3, &SyncReply { id: req.id, t0: req.t0, t1, t2 }));
    }

    #[test]
    fn four_timestamps_give_offset_and_delay() {
        let s = Sample::from_timestamps(ClientNanos(1_000), ServerNanos(5_600), ServerNanos(5_700), ClientNanos(1_400))
            .unwrap();
        assert_eq!(s.delay, 300);
        assert_eq!(s.offset, ((5_600 - 1_000) + (5_700 - 1_400)) / 2);
        assert!(Sample::from_timestamps(ClientNanos(10), ServerNanos(0), ServerNanos(0), ClientNanos(5)).is_none());
    }

    #[test]
    fn symmetric_paths_give_the_exact_offset_and_inverse_maps_agree() {
        let mut est = Estimator::new(unpaced());
        for i in 0..10u64 {
            exchange(&mut est, 1_000_000_000 + i * 50_000_000, 123_456_789, 200_000, 200_000);
        }
        let e = est.estimate(ClientNanos(1_500_000_000)).unwrap();
        assert_eq!(e.offset_nanos, 123_456_789);
        assert_eq!(e.rtt_nanos, 400_000);
        let server = est.to_server(ClientNanos(2_000_000_000)).unwrap();
        assert_eq!(server, ServerNanos(2_123_456_789));
        assert_eq!(est.to_local(server), Some(ClientNanos(2_000_000_000)));
    }

    #[test]
    fn unknown_duplicate_and_stale_replies_are_ignored() {
        let mut est = Estimator::new(unpaced());
        let req = est.poll_request(ClientNanos(100)).unwrap();
        let reply = SyncReply { id: req.id, t0: req.t0, t1: ServerNanos(50), t2: ServerNanos(60) };
        assert!(!est.handle_reply(ClientNanos(200), &SyncReply { id: 999, ..reply }));
        assert!(!est.handle_reply(ClientNanos(200), &SyncReply { t0: ClientNanos(1), ..reply }));
        assert!(est.handle_reply(ClientNanos(200), &reply));
        assert!(!est.handle_reply(ClientNanos(200), &reply), "duplicate");
        assert_eq!(est.sample_count(), 1);
    }

    #[test]
    fn queued_samples_barely_move_the_estimate() {
        let mut est = Estimator::new(unpaced());
        for i in 0..40u64 {
            // Every third exchange sat 30 ms in a queue on the way back.
            let down = if i % 3 == 0 { 30_000_000 } else { 1_000_000 };
            exchange(&mut est, 1_000_000_000 + i * 50_000_000, -5_000_000, 1_000_000, down);
        }
        let e = est.estimate(ClientNanos(3_000_000_000)).unwrap();
        assert!((e.offset_nanos + 5_000_000).abs() < 20_000, "{e:?}");
    }

    #[test]
    fn drift_is_measured_by_regression() {
        let mut est = Estimator::new(unpaced());
        // Server runs 80 ppm fast relative to the client.
        for i in 0..60u64 {
            let local = 1_000_000_000 + i * 250_000_000;
            let offset = 1_000_000 + (local as f64 * 80e-6) as i64;
            exchange(&mut est, local, offset, 100_000, 100_000);
        }
        let e = est.estimate(ClientNanos(16_000_000_000)).unwrap();
        assert!((e.drift_ppm - 80.0).abs() < 1.0, "{e:?}");
        let truth = 1_000_000 + (16_000_000_000f64 * 80e-6) as i64;
        assert!((e.offset_nanos - truth).abs() < 2_000, "{} vs {truth}", e.offset_nanos);
    }

    #[test]
    fn a_clock_step_restarts_the_window() {
        let mut est = Estimator::new(unpaced());
        let mut local = 1_000_000_000u64;
        for _ in 0..30 {
            exchange(&mut est, local, 0, 100_000, 100_000);
            local += 50_000_000;
        }
        for _ in 0..8 {
            exchange(&mut est, local, 700_000_000, 100_000, 100_000);
            local += 50_000_000;
        }
        let e = est.estimate(ClientNanos(local)).unwrap();
        assert!((e.offset_nanos - 700_000_000).abs() < 10_000, "{e:?}");
    }

    #[test]
    fn requests_burst_then_slow_down() {
        let mut est = Estimator::new(Config::default());
        let mut local = 0u64;
        let mut intervals = Vec::new();
        for _ in 0..40 {
            local = est.poll_timeout().0.max(local);
            let before = local;
            exchange(&mut est, local, 42, 100_000, 100_000);
            intervals.push(est.poll_timeout().0 - before);
            local += 300_000;
        }
        assert_eq!(intervals[0], 50_000_000);
        assert_eq!(*intervals.last().unwrap(), 1_000_000_000);
        assert!(est.is_synced(ClientNanos(local)));
    }
}
