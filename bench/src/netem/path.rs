//! One direction of one client's path, sans IO: given the instant a packet enters, decide
//! whether it is lost and when it leaves.
//!
//! Time is nanoseconds since the emulator started. The emulator calls [`Path::admit`] for
//! every packet in the order they enter; the tests call it on virtual time.
//!
//! Order of decisions (as in the engine's simulation): an outage drops everything; so does a
//! loss burst (a stretch of time, `sim::Bursts`); then random loss; then the delay: the end of
//! the current link stall if any (else now), plus base and jitter, rounded up to the next
//! beacon if the station is asleep (power save), and never before the previous packet's
//! release plus the minimum gap (FIFO). A packet picked for reordering is released
//! `reorder_extra_nanos` after its place in that order and does not hold back later packets,
//! which overtake it.
//!
//! Stalls and bursts come from their own generators and depend on time only, so the traffic
//! never changes them; packets' fates come from the path's generator in the order they enter.

use downbeat_engine::sim::{BurstState, Rng};
use serde::Serialize;

use super::profile::{Outages, PathParams, PowerSave, Stalls};

/// Why a packet was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DropCause {
    /// Random loss.
    Random,
    /// A loss burst.
    Burst,
    /// An outage (configured window, periodic, or triggered).
    Outage,
}

/// What happens to a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It leaves at `at`.
    Deliver {
        /// Release instant, ns since the emulator started.
        at: u64,
        /// It waited for a beacon (the station was asleep).
        held: bool,
        /// It was picked to be overtaken.
        reordered: bool,
    },
    /// It is lost.
    Drop(DropCause),
}

/// The state of one direction of one client's path. See the module docs.
#[derive(Clone, Debug)]
pub struct Path {
    params: PathParams,
    power_save: Option<PowerSave>,
    periodic: Option<(Outages, u64)>,
    rng: Rng,
    stall_rng: Rng,
    /// Start of the next stall not yet drawn into `stalled_until`.
    next_stall: u64,
    /// End of the latest stall so far.
    stalled_until: u64,
    bursts: BurstState,
    last_activity: Option<u64>,
    /// Release instant of the last packet kept in order.
    watermark: u64,
    outage_until: u64,
}

impl Path {
    /// A path with its own generator seeded by `seed`, power save if given (meaningful on a
    /// downlink), and periodic outages at `phase` ns into each period if given.
    pub fn new(params: PathParams, power_save: Option<PowerSave>, periodic: Option<(Outages, u64)>, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let mut stall_rng = Rng::new(rng.next_u64());
        let next_stall = params.stalls.map_or(u64::MAX, |s| s.sample_gap(&mut stall_rng));
        let bursts = BurstState::new(rng.next_u64());
        Self {
            params,
            power_save,
            periodic,
            rng,
            stall_rng,
            next_stall,
            stalled_until: 0,
            bursts,
            last_activity: None,
            watermark: 0,
            outage_until: 0,
        }
    }

    /// The parameters.
    pub fn params(&self) -> &PathParams {
        &self.params
    }

    /// Whether the path is out at `now`.
    pub fn in_outage(&self, now: u64) -> bool {
        if now < self.outage_until || self.params.outages_at.iter().any(|&(a, b)| (a..b).contains(&now)) {
            return true;
        }
        self.periodic.is_some_and(|(o, phase)| {
            o.every_nanos > 0 && now >= phase && (now - phase) % o.every_nanos < o.length_nanos
        })
    }

    /// Drops everything entering before `until` (extends, never shortens, a running outage).
    pub fn outage_until(&mut self, until: u64) {
        self.outage_until = self.outage_until.max(until);
    }

    /// When the link stall under way at `now` ends (`now` or earlier if none). Calls must
    /// come in order of `now`.
    pub fn stalled_until(&mut self, now: u64) -> u64 {
        if let Some(stalls) = self.params.stalls {
            advance_stalls(&stalls, &mut self.stall_rng, &mut self.next_stall, &mut self.stalled_until, now);
        }
        self.stalled_until
    }

    /// The fate of a packet entering at `now` (calls must come in order of `now`).
    pub fn admit(&mut self, now: u64) -> Verdict {
        let start = self.stalled_until(now).max(now);
        if self.in_outage(now) {
            return Verdict::Drop(DropCause::Outage);
        }
        let p = &self.params;
        if p.bursts.is_some_and(|b| self.bursts.lost_at(&b, now)) {
            return Verdict::Drop(DropCause::Burst);
        }
        if p.loss > 0.0 && self.rng.chance(p.loss) {
            return Verdict::Drop(DropCause::Random);
        }
        let mut at = start + p.base_nanos + p.jitter.sample(&mut self.rng);
        let mut held = false;
        if let Some(ps) = self.power_save {
            let asleep = self.last_activity.is_none_or(|t| now.saturating_sub(t) > ps.idle_nanos);
            if asleep && ps.beacon_nanos > 0 {
                at = at.div_ceil(ps.beacon_nanos) * ps.beacon_nanos;
                held = true;
            }
        }
        let reordered = p.reorder > 0.0 && self.rng.chance(p.reorder);
        let in_order = if self.watermark == 0 { at } else { at.max(self.watermark + p.min_gap_nanos) };
        if reordered {
            at = in_order + p.reorder_extra_nanos;
        } else {
            at = in_order;
            self.watermark = at;
        }
        if self.power_save.is_some() {
            self.last_activity = Some(self.last_activity.map_or(at, |t| t.max(at)));
        }
        Verdict::Deliver { at, held, reordered }
    }
}

/// Draws every stall starting up to `now` into `until`.
fn advance_stalls(stalls: &Stalls, rng: &mut Rng, next: &mut u64, until: &mut u64, now: u64) {
    while *next <= now {
        *until = (*until).max(*next + stalls.sample_len(rng));
        *next = next.saturating_add(stalls.sample_gap(rng).max(1));
    }
}

#[cfg(test)]
mod tests {
    use downbeat_engine::sim::{self, MS, SEC};

    use super::*;
    use crate::netem::profile::{Jitter, Profile};

    fn delays(path: &mut Path, n: usize, gap: u64) -> Vec<u64> {
        let mut out = Vec::new();
        for k in 0..n as u64 {
            if let Verdict::Deliver { at, .. } = path.admit(k * gap) {
                out.push(at - k * gap);
            }
        }
        out
    }

    fn q(sorted: &[u64], f: f64) -> f64 {
        sorted[((sorted.len() - 1) as f64 * f) as usize] as f64 / MS as f64
    }

    /// Quantiles (ms) of the engine's independent per-packet delay for a profile.
    fn engine_quantiles(p: &downbeat_engine::sim::Profile) -> [f64; 3] {
        let mut rng = Rng::new(99);
        let jitter = &p.up.jitter;
        let mut d: Vec<u64> = (0..200_000).map(|_| p.up.base_nanos + jitter.sample(&mut rng)).collect();
        d.sort_unstable();
        [q(&d, 0.5), q(&d, 0.9), q(&d, 0.99)]
    }

    #[test]
    fn wifi_delay_has_the_engine_quantiles_at_every_packet_rate() {
        use downbeat_engine::sim::Profile as SimProfile;
        for (ours, theirs) in [
            (Profile::classroom_wifi(), SimProfile::classroom_wifi(false)),
            (Profile::congested(), SimProfile::congested(false)),
        ] {
            let want = engine_quantiles(&theirs);
            // One packet every 1.37 s, every 10 ms and every 1 ms (FIFO makes little difference
            // to the distribution: the heavy tail is a process in time). Congested stalls are
            // rarer: its p99 needs more time than 1,000 s at 1 ms to settle.
            let rates: &[(u64, usize)] = if ours.name == "congested" {
                &[(1_370 * MS, 50_000), (10 * MS, 300_000)]
            } else {
                &[(1_370 * MS, 50_000), (10 * MS, 300_000), (MS, 1_000_000)]
            };
            for &(gap, n) in rates {
                let mut path = Path::new(ours.up.clone(), None, None, 7);
                let mut d = delays(&mut path, n, gap);
                d.sort_unstable();
                let got = [q(&d, 0.5), q(&d, 0.9), q(&d, 0.99)];
                let ok = (got[0] - want[0]).abs() < 0.2 * want[0]
                    && (got[1] - want[1]).abs() < 0.2 * want[1]
                    && (got[2] - want[2]).abs() < 0.25 * want[2];
                assert!(ok, "{} every {} ms: p50/p90/p99 {got:?} vs the engine's {want:?}", ours.name, gap / MS);
            }
        }
        // The documented classroom figures.
        let want = engine_quantiles(&SimProfile::classroom_wifi(false));
        assert!((3.0..6.0).contains(&want[0]) && (14.0..28.0).contains(&want[1]) && (150.0..350.0).contains(&want[2]));
    }

    #[test]
    fn stalls_hold_every_packet_sent_during_them() {
        let stalls = Stalls { per_second: 2.0, min_nanos: 50 * MS, alpha: 1.5, cap_nanos: 400 * MS };
        let params = PathParams { stalls: Some(stalls), ..PathParams::fixed(MS) };
        let mut path = Path::new(params.clone(), None, None, 3);
        let mut probe = Path::new(params, None, None, 3);
        let mut stalled = 0;
        for k in 0..20_000u64 {
            let now = k * MS;
            let until = probe.stalled_until(now);
            let Verdict::Deliver { at, .. } = path.admit(now) else { panic!("no loss configured") };
            assert_eq!(at, until.max(now) + MS, "at {now}");
            stalled += u64::from(until > now);
        }
        // Stalled about 2/s x 150 ms mean = 30 % of the time.
        assert!((4_000..8_000).contains(&stalled), "{stalled}");
    }

    #[test]
    fn a_queue_drains_at_the_minimum_gap() {
        let params = PathParams { min_gap_nanos: 100_000, ..PathParams::fixed(MS) };
        let mut path = Path::new(params, None, None, 1);
        let at: Vec<u64> = (0..5)
            .map(|_| match path.admit(10 * MS) {
                Verdict::Deliver { at, .. } => at,
                Verdict::Drop(_) => 0,
            })
            .collect();
        assert_eq!(at, [11_000_000, 11_100_000, 11_200_000, 11_300_000, 11_400_000]);
    }

    #[test]
    fn lan_is_two_tenths_of_a_millisecond_give_or_take_one() {
        let mut path = Path::new(Profile::lan().down, None, None, 3);
        let d = delays(&mut path, 10_000, SEC);
        assert_eq!(d.len(), 10_000);
        assert!(d.iter().all(|&x| (100_000..300_000).contains(&x)));
        let mean = d.iter().sum::<u64>() as f64 / d.len() as f64;
        assert!((mean - 200_000.0).abs() < 5_000.0, "{mean}");
    }

    #[test]
    fn bursts_last_their_mean_in_time_whatever_the_packet_rate() {
        let bursts = sim::Bursts { mean_nanos: 60 * MS, mean_gap_nanos: 2 * SEC };
        let params = PathParams { bursts: Some(bursts), ..PathParams::fixed(0) };
        // A packet every millisecond for 2,000 s: a burst of mean 60 ms takes 60 in a row.
        let mut path = Path::new(params.clone(), None, None, 9);
        let (mut bursts, mut lost, mut run) = (0u64, 0u64, 0u64);
        let n = 2_000_000;
        for k in 0..n {
            match path.admit(k * MS) {
                Verdict::Drop(DropCause::Burst) => {
                    lost += 1;
                    run += 1;
                }
                Verdict::Drop(other) => panic!("unexpected {other:?}"),
                Verdict::Deliver { .. } => {
                    bursts += u64::from(run > 0);
                    run = 0;
                }
            }
        }
        let mean = lost as f64 / bursts as f64;
        assert!((mean - 60.0).abs() < 3.0, "mean burst {mean} packets");
        let rate = lost as f64 / n as f64;
        assert!((rate - params.expected_loss()).abs() < 0.003, "rate {rate} vs {}", params.expected_loss());
        // The same bursts met by a packet every 100 ms: the same share lost, a packet or so
        // per burst, since the bursts do not stretch with the gaps between packets.
        let mut sparse = Path::new(params.clone(), None, None, 9);
        let lost = (0..20_000u64).filter(|k| matches!(sparse.admit(k * 100 * MS), Verdict::Drop(_))).count();
        let rate = lost as f64 / 20_000.0;
        assert!((rate - params.expected_loss()).abs() < 0.01, "sparse rate {rate} vs {}", params.expected_loss());
    }

    #[test]
    fn random_loss_rate_and_wifi_total() {
        let mut path = Path::new(PathParams { loss: 0.1, ..PathParams::fixed(0) }, None, None, 5);
        let kept = delays(&mut path, 50_000, 1).len();
        let rate = 1.0 - kept as f64 / 50_000.0;
        assert!((rate - 0.1).abs() < 0.01, "{rate}");
        let mut wifi = Path::new(Profile::classroom_wifi().up, None, None, 5);
        let kept = delays(&mut wifi, 200_000, MS).len();
        let rate = 1.0 - kept as f64 / 200_000.0;
        assert!((rate - 0.01).abs() < 0.002, "{rate}");
    }

    #[test]
    fn same_seed_same_fate_and_another_seed_another() {
        let fates = |seed| {
            let mut path = Path::new(Profile::congested().up, None, None, seed);
            (0..5_000).map(|k| path.admit(k * MS)).collect::<Vec<_>>()
        };
        assert_eq!(fates(42), fates(42));
        assert_ne!(fates(42), fates(43));
    }

    #[test]
    fn release_keeps_fifo_order_except_deliberate_reordering() {
        let jittery = PathParams {
            jitter: Jitter::LogNormal { median_nanos: 5e6, sigma: 1.5, cap_nanos: 500 * MS },
            ..PathParams::fixed(MS)
        };
        let mut path = Path::new(jittery.clone(), None, None, 11);
        let mut last = 0;
        for k in 0..20_000 {
            let Verdict::Deliver { at, reordered, .. } = path.admit(k * 100_000) else { panic!("no loss configured") };
            assert!(!reordered);
            assert!(at >= last && at >= k * 100_000 + MS);
            last = at;
        }
        // With reordering, exactly the picked packets leave out of order: each one leaves
        // later than a packet that entered after it.
        let params = PathParams { reorder: 0.02, reorder_extra_nanos: 20 * MS, ..jittery };
        let mut path = Path::new(params, None, None, 12);
        let mut releases = Vec::new();
        for k in 0..5_000u64 {
            let Verdict::Deliver { at, reordered, .. } = path.admit(k * 100_000) else { panic!("no loss configured") };
            releases.push((at, reordered));
        }
        let picked = releases.iter().filter(|r| r.1).count();
        assert!((60..140).contains(&picked), "{picked}");
        let in_order: Vec<u64> = releases.iter().filter(|r| !r.1).map(|r| r.0).collect();
        assert!(in_order.windows(2).all(|w| w[0] <= w[1]));
        let overtaken =
            releases.iter().enumerate().filter(|&(i, r)| r.1 && releases[i + 1..].iter().any(|s| s.0 < r.0)).count();
        assert!(overtaken >= picked * 9 / 10, "{overtaken} of {picked}");
    }

    #[test]
    fn power_save_holds_downlink_packets_for_the_next_beacon_after_idle() {
        let ps = PowerSave { idle_nanos: 200 * MS, beacon_nanos: 102_400_000 };
        let mut path = Path::new(PathParams::fixed(MS), Some(ps), None, 1);
        // The first packet finds the station asleep: it waits for the beacon at 204.8 ms.
        assert_eq!(path.admit(150 * MS), Verdict::Deliver { at: 204_800_000, held: true, reordered: false });
        // Sent while that one waits: the station is waking up, FIFO keeps it behind.
        assert_eq!(path.admit(160 * MS), Verdict::Deliver { at: 204_800_000, held: false, reordered: false });
        // Awake (traffic within 200 ms): 1 ms, no beacon.
        assert_eq!(path.admit(300 * MS), Verdict::Deliver { at: 301 * MS, held: false, reordered: false });
        assert_eq!(path.admit(480 * MS), Verdict::Deliver { at: 481 * MS, held: false, reordered: false });
        // 250 ms idle: asleep again, the next beacon after 732 ms is 819.2 ms.
        assert_eq!(path.admit(731 * MS), Verdict::Deliver { at: 819_200_000, held: true, reordered: false });
        // Without power save nothing waits.
        let mut plain = Path::new(PathParams::fixed(MS), None, None, 1);
        assert_eq!(plain.admit(150 * MS), Verdict::Deliver { at: 151 * MS, held: false, reordered: false });
        // Every packet after an idle spell lands on the beacon grid.
        let mut path = Path::new(Profile::classroom_wifi().down, Some(ps), None, 4);
        for k in 1..200u64 {
            if let Verdict::Deliver { at, held, reordered } = path.admit(k * 2 * SEC) {
                assert!(held);
                assert!(reordered || at.is_multiple_of(ps.beacon_nanos));
            }
        }
    }

    #[test]
    fn outages_drop_everything_in_their_windows() {
        let params = PathParams { outages_at: vec![(SEC, 2 * SEC)], ..PathParams::fixed(0) };
        let periodic = Outages { every_nanos: 10 * SEC, length_nanos: SEC };
        let mut path = Path::new(params, None, Some((periodic, 5 * SEC)), 1);
        let out = |path: &mut Path, t: u64| path.admit(t) == Verdict::Drop(DropCause::Outage);
        assert!(!out(&mut path, SEC - 1));
        assert!(out(&mut path, SEC));
        assert!(out(&mut path, 2 * SEC - 1));
        assert!(!out(&mut path, 2 * SEC));
        assert!(out(&mut path, 5 * SEC));
        assert!(!out(&mut path, 6 * SEC));
        assert!(out(&mut path, 25 * SEC + 10));
        path.outage_until(31 * SEC);
        path.outage_until(30 * SEC);
        assert!(out(&mut path, 30 * SEC + 5));
        assert!(!out(&mut path, 31 * SEC));
    }
}
