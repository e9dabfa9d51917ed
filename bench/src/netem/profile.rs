//! Network profiles: what the emulator does to each direction of each client's path.
//!
//! The figures come from the engine's virtual network ([`downbeat_engine::sim::Profile`]) so
//! the simulation and the packet-level emulator agree: base delay, loss, bursts and power save
//! are the engine's. The delay differs in form, not in distribution. The engine draws each
//! packet's heavy-tailed jitter independently and lets packets overtake each other; a real
//! path keeps its order, and independent heavy-tailed draws kept in order pile up behind
//! every slow packet (at 100 packets/s the median would grow from 4 ms to ~90 ms). So here
//! the heavy tail is a process in time, link *stalls* ([`Stalls`]: Poisson starts, Pareto
//! lengths): a packet sent during a stall waits for its end. It is fitted so that a packet
//! sent at any rate sees the engine's quantiles (Wi-Fi: p50 ~4 ms, p90 ~20 ms, p99 ~250 ms
//! one way); a light per-packet jitter stays on top. The emulator also adds what only a real
//! packet path needs: deliberate reordering, periodic outages and a serialization gap. All
//! parameters print (Display) and serialize (JSON) so results can carry them.

use std::fmt;

use downbeat_engine::sim::{self, MS, Rng, SEC};
use serde::ser::SerializeMap as _;
use serde::{Serialize, Serializer};

/// Extra one-way delay drawn per packet on top of a path's base delay: the engine's own
/// [`sim::Jitter`], so both emulators draw it with one formula.
pub use downbeat_engine::sim::Jitter;

/// Writes a jitter as `{"kind": "none" | "uniform" | "log-normal", ...its fields}`.
fn serialize_jitter<S: Serializer>(jitter: &Jitter, serializer: S) -> Result<S::Ok, S::Error> {
    let mut map = serializer.serialize_map(None)?;
    match *jitter {
        Jitter::None => map.serialize_entry("kind", "none")?,
        Jitter::Uniform { max_nanos } => {
            map.serialize_entry("kind", "uniform")?;
            map.serialize_entry("max_nanos", &max_nanos)?;
        }
        Jitter::LogNormal { median_nanos, sigma, cap_nanos } => {
            map.serialize_entry("kind", "log-normal")?;
            map.serialize_entry("median_nanos", &median_nanos)?;
            map.serialize_entry("sigma", &sigma)?;
            map.serialize_entry("cap_nanos", &cap_nanos)?;
        }
    }
    map.end()
}

/// Writes loss bursts as `{"mean_nanos", "mean_gap_nanos"}`, or `null` for none.
fn serialize_bursts<S: Serializer>(bursts: &Option<sim::Bursts>, serializer: S) -> Result<S::Ok, S::Error> {
    let Some(b) = bursts else { return serializer.serialize_none() };
    let mut map = serializer.serialize_map(Some(2))?;
    map.serialize_entry("mean_nanos", &b.mean_nanos)?;
    map.serialize_entry("mean_gap_nanos", &b.mean_gap_nanos)?;
    map.end()
}

/// A jitter in words, for the printed profile.
struct JitterText<'a>(&'a Jitter);

impl fmt::Display for JitterText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self.0 {
            Jitter::None => write!(f, "no jitter"),
            Jitter::Uniform { max_nanos } => write!(f, "uniform jitter 0..{}", Ms(max_nanos)),
            Jitter::LogNormal { median_nanos, sigma, cap_nanos } => write!(
                f,
                "log-normal jitter (median {}, sigma {sigma}, cap {})",
                Ms(median_nanos as u64),
                Ms(cap_nanos)
            ),
        }
    }
}

/// Link stalls: the heavy tail of Wi-Fi delay (contention, retries, scans) as a process in
/// time. Stalls start at Poisson instants, `per_second` on average; each lasts a Pareto
/// length (at least `min_nanos`, shape `alpha`, at most `cap_nanos`). A packet sent while
/// the link is stalled leaves when the stall ends (plus its own delay). The process depends on
/// time only, never on the traffic, so every packet rate sees the same delay distribution.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Stalls {
    /// Mean stalls per second.
    pub per_second: f64,
    /// Shortest stall, ns.
    pub min_nanos: u64,
    /// Pareto shape (lower is heavier; above 1 for a finite mean).
    pub alpha: f64,
    /// Longest stall, ns.
    pub cap_nanos: u64,
}

impl Stalls {
    /// One stall length, ns.
    pub fn sample_len(&self, rng: &mut Rng) -> u64 {
        let u = 1.0 - rng.uniform();
        ((self.min_nanos as f64 * u.powf(-1.0 / self.alpha.max(0.01))) as u64).min(self.cap_nanos)
    }

    /// Time to the next stall start, ns (exponential).
    pub fn sample_gap(&self, rng: &mut Rng) -> u64 {
        rng.exponential(1e9 / self.per_second.max(1e-9)) as u64
    }
}

impl fmt::Display for Stalls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "stalls {}/s of at least {} (Pareto shape {}, cap {})",
            self.per_second,
            Ms(self.min_nanos),
            self.alpha,
            Ms(self.cap_nanos)
        )
    }
}

/// Wi-Fi power save on a downlink: after `idle_nanos` without downlink traffic the station
/// sleeps, and a packet waits for the next beacon (beacons at multiples of `beacon_nanos`
/// since the emulator started).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PowerSave {
    /// Idle time before sleeping, ns.
    pub idle_nanos: u64,
    /// Beacon interval, ns.
    pub beacon_nanos: u64,
}

/// Periodic outages of a client (both directions): `length_nanos` of total loss every
/// `every_nanos`, at a phase drawn per client from the seed.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Outages {
    /// Period, ns.
    pub every_nanos: u64,
    /// Length of each outage, ns.
    pub length_nanos: u64,
}

/// One direction of one client's path.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PathParams {
    /// Fixed one-way delay, ns.
    pub base_nanos: u64,
    /// Extra delay per packet.
    #[serde(serialize_with = "serialize_jitter")]
    pub jitter: Jitter,
    /// Link stalls (the heavy tail), if any.
    pub stalls: Option<Stalls>,
    /// Consecutive packets leave at least this far apart, ns (serialization: a queue that
    /// built up during a stall drains at a link rate, not all at once).
    pub min_gap_nanos: u64,
    /// Probability a packet is lost on its own.
    pub loss: f64,
    /// Stretches of time in which everything is lost, if any.
    #[serde(serialize_with = "serialize_bursts")]
    pub bursts: Option<sim::Bursts>,
    /// Probability a packet is held back on purpose so that later packets overtake it.
    pub reorder: f64,
    /// How long a reordered packet is held back beyond its own delay, ns.
    pub reorder_extra_nanos: u64,
    /// Windows `[from, to)`, ns since the emulator started, in which nothing gets through.
    pub outages_at: Vec<(u64, u64)>,
}

impl PathParams {
    /// A path with a fixed delay and nothing else.
    pub fn fixed(base_nanos: u64) -> Self {
        Self {
            base_nanos,
            jitter: Jitter::None,
            stalls: None,
            min_gap_nanos: 0,
            loss: 0.0,
            bursts: None,
            reorder: 0.0,
            reorder_extra_nanos: 0,
            outages_at: Vec::new(),
        }
    }

    /// The emulator's version of one direction of the engine's simulated path (power save is
    /// kept per profile, see [`Profile::power_save`]).
    pub fn from_sim(path: &sim::Path) -> Self {
        Self {
            base_nanos: path.base_nanos,
            jitter: path.jitter.clone(),
            stalls: None,
            min_gap_nanos: 0,
            loss: path.loss,
            bursts: path.bursts,
            reorder: 0.0,
            reorder_extra_nanos: 0,
            outages_at: path.outages.clone(),
        }
    }

    /// The expected share of packets lost to random loss and bursts (outages aside):
    /// `1 - (1 - share)(1 - loss)` for the share of time in a burst.
    pub fn expected_loss(&self) -> f64 {
        let bursty = self.bursts.map_or(0.0, |b| b.share());
        1.0 - (1.0 - bursty) * (1.0 - self.loss)
    }
}

impl fmt::Display for PathParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} + {}", Ms(self.base_nanos), JitterText(&self.jitter))?;
        if let Some(stalls) = self.stalls {
            write!(f, " + {stalls}")?;
        }
        if self.min_gap_nanos > 0 {
            write!(f, ", packets at least {} apart", Ms(self.min_gap_nanos))?;
        }
        if self.loss > 0.0 || self.bursts.is_some() {
            write!(f, ", loss {}", Pct(self.loss))?;
            if let Some(b) = self.bursts {
                write!(
                    f,
                    " + bursts of mean {} every {} ({} of the time)",
                    Ms(b.mean_nanos),
                    Ms(b.mean_gap_nanos),
                    Pct(b.share())
                )?;
            }
        } else {
            write!(f, ", no loss")?;
        }
        if self.reorder > 0.0 {
            write!(f, ", reorder {} (held {})", Pct(self.reorder), Ms(self.reorder_extra_nanos))?;
        }
        for &(a, b) in &self.outages_at {
            write!(f, ", outage {}..{}", Ms(a), Ms(b))?;
        }
        Ok(())
    }
}

/// Both directions of every client's path, by name.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Profile {
    /// A name for reports.
    pub name: String,
    /// Client to server.
    pub up: PathParams,
    /// Server to client.
    pub down: PathParams,
    /// Power save on the downlink of some clients.
    pub power_save: Option<PowerSave>,
    /// Share of clients that power-save, in steps of 10 %: client `i` does when
    /// `i % 10 < round(10 * share)` (as the simulation scenario picks them).
    pub power_save_share: f64,
    /// Periodic outages of each client.
    pub outages: Option<Outages>,
}

/// The profile names [`Profile::by_name`] knows.
pub const PROFILE_NAMES: [&str; 4] = ["loopback", "lan", "classroom-wifi", "congested"];

impl Profile {
    /// No impairment at all: packets still cross both TUN devices and the emulator.
    pub fn loopback() -> Self {
        Self::symmetric("loopback", PathParams::fixed(0))
    }

    /// A wired LAN: 0.2 ms +- 0.1 ms each way, no loss (the engine's `lan`).
    pub fn lan() -> Self {
        Self::from_sim("lan", &sim::Profile::lan())
    }

    /// Classroom Wi-Fi (`performance.md`): the engine's profile (3 ms base, 0.5 % random
    /// loss plus bursts of mean 60 ms taking 0.5 % of the time, power save with 102.4 ms
    /// beacons after 200 ms idle on 30 % of clients) with its delay quantiles (p50 ~4 ms,
    /// p90 ~20 ms, p99 ~250 ms one way) from stalls (5.8/s, at least 15 ms, Pareto shape
    /// 1.75, cap 1.5 s) plus a log-normal jitter (median 0.45 ms, sigma 0.6, cap 5 ms); plus
    /// 0.1 % reordering (held 20 ms), one 1 s outage per 10 minutes and 100 us between
    /// packets.
    pub fn classroom_wifi() -> Self {
        Self::wifi("classroom-wifi", &sim::Profile::classroom_wifi(true), 1.0)
    }

    /// Congested Wi-Fi: the Wi-Fi profile with 5 % loss and three times the jitter (the
    /// engine's `congested`): stalls three times as long and a third as frequent (the same
    /// process on a time scale three times slower, capped at the engine's 3 s), and a jitter
    /// three times as large.
    pub fn congested() -> Self {
        Self::wifi("congested", &sim::Profile::congested(true), 3.0)
    }

    /// A fixed delay each way and nothing else (for tests and calibration).
    pub fn fixed(name: &str, up_nanos: u64, down_nanos: u64) -> Self {
        Self { down: PathParams::fixed(down_nanos), ..Self::symmetric(name, PathParams::fixed(up_nanos)) }
    }

    /// A profile by name: loopback, lan, classroom-wifi or congested.
    pub fn by_name(name: &str) -> Option<Self> {
        Some(match name {
            "loopback" => Self::loopback(),
            "lan" => Self::lan(),
            "classroom-wifi" => Self::classroom_wifi(),
            "congested" => Self::congested(),
            _ => return None,
        })
    }

    /// Whether client `i` power-saves.
    pub fn power_saves(&self, i: usize) -> bool {
        self.power_save.is_some() && ((i % 10) as f64) < (self.power_save_share * 10.0).round()
    }

    /// Adds an outage of every client's paths (both directions) at `[from, to)` ns since the
    /// emulator started.
    pub fn with_outage_at(mut self, from: u64, to: u64) -> Self {
        self.up.outages_at.push((from, to));
        self.down.outages_at.push((from, to));
        self
    }

    fn symmetric(name: &str, path: PathParams) -> Self {
        Self {
            name: name.to_owned(),
            up: path.clone(),
            down: path,
            power_save: None,
            power_save_share: 0.0,
            outages: None,
        }
    }

    fn from_sim(name: &str, p: &sim::Profile) -> Self {
        let power_save =
            p.down.power_save.map(|ps| PowerSave { idle_nanos: ps.idle_nanos, beacon_nanos: ps.beacon_nanos });
        Self {
            name: name.to_owned(),
            up: PathParams::from_sim(&p.up),
            down: PathParams::from_sim(&p.down),
            power_save_share: if power_save.is_some() { 1.0 } else { 0.0 },
            power_save,
            outages: None,
        }
    }

    fn wifi(name: &str, p: &sim::Profile, scale: f64) -> Self {
        let mut profile = Self::from_sim(name, p);
        profile.power_save_share = 0.3;
        let cap_nanos = match p.up.jitter {
            Jitter::LogNormal { cap_nanos, .. } => cap_nanos,
            _ => 1_500 * MS,
        };
        for path in [&mut profile.up, &mut profile.down] {
            path.jitter = Jitter::LogNormal {
                median_nanos: 450_000.0 * scale,
                sigma: 0.6,
                cap_nanos: (5.0 * MS as f64 * scale) as u64,
            };
            path.stalls = Some(Stalls {
                per_second: 5.8 / scale,
                min_nanos: (15.0 * MS as f64 * scale) as u64,
                alpha: 1.75,
                cap_nanos,
            });
            path.min_gap_nanos = 100_000;
            path.reorder = 0.001;
            path.reorder_extra_nanos = 20 * MS;
        }
        profile.outages = Some(Outages { every_nanos: 600 * SEC, length_nanos: SEC });
        profile
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.up == self.down {
            write!(f, "{}: each way {}", self.name, self.up)?;
        } else {
            write!(f, "{}: up {}; down {}", self.name, self.up, self.down)?;
        }
        if let Some(ps) = self.power_save {
            write!(
                f,
                "; power save on {} of clients' downlinks ({} idle, {} beacons)",
                Pct(self.power_save_share),
                Ms(ps.idle_nanos),
                Ms(ps.beacon_nanos)
            )?;
        }
        if let Some(o) = self.outages {
            write!(f, "; a {} outage every {} per client", Ms(o.length_nanos), Ms(o.every_nanos))?;
        }
        Ok(())
    }
}

/// Nanoseconds printed as milliseconds.
struct Ms(u64);

impl fmt::Display for Ms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let round = |x: f64| (x * 1000.0).round() / 1000.0;
        if self.0 >= SEC {
            write!(f, "{} s", round(self.0 as f64 / SEC as f64))
        } else {
            write!(f, "{} ms", round(self.0 as f64 / MS as f64))
        }
    }
}

/// A fraction printed as a percentage.
struct Pct(f64);

impl fmt::Display for Pct {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} %", (self.0 * 1e5).round() / 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_mirror_the_engine() {
        let wifi = Profile::classroom_wifi();
        let sim = sim::Profile::classroom_wifi(true);
        assert_eq!(wifi.up.base_nanos, sim.up.base_nanos);
        assert_eq!(wifi.up.loss, sim.up.loss);
        assert_eq!(wifi.down.bursts, sim.down.bursts);
        assert_eq!(wifi.power_save.map(|p| p.beacon_nanos), sim.down.power_save.map(|p| p.beacon_nanos));
        let congested = Profile::congested();
        assert_eq!(congested.up.loss, 0.05);
        assert!(matches!(Profile::lan().up.jitter, Jitter::Uniform { max_nanos: 200_000 }));
        assert_eq!(Profile::loopback().up, PathParams::fixed(0));
        for name in PROFILE_NAMES {
            assert_eq!(Profile::by_name(name).map(|p| p.name), Some(name.to_owned()));
        }
        assert!(Profile::by_name("dial-up").is_none());
    }

    #[test]
    fn thirty_percent_of_clients_power_save() {
        let wifi = Profile::classroom_wifi();
        let saving: Vec<usize> = (0..20).filter(|&i| wifi.power_saves(i)).collect();
        assert_eq!(saving, [0, 1, 2, 10, 11, 12]);
        assert!(!Profile::lan().power_saves(0));
    }

    #[test]
    fn parameters_print_and_serialize() {
        let wifi = Profile::classroom_wifi();
        let text = wifi.to_string();
        assert!(
            text.contains("3 ms + log-normal jitter (median 0.45 ms, sigma 0.6, cap 5 ms) + stalls 5.8/s of at least 15 ms (Pareto shape 1.75, cap 1.5 s)"),
            "{text}"
        );
        assert!(text.contains("power save on 30 % of clients' downlinks (200 ms idle, 102.4 ms beacons)"), "{text}");
        assert!(text.contains("a 1 s outage every 600 s"), "{text}");
        let json = serde_json::to_value(&wifi).expect("serializes");
        assert_eq!(json["up"]["jitter"]["kind"], "log-normal");
        assert_eq!(json["power_save"]["beacon_nanos"], 102_400_000);
        assert!((wifi.up.expected_loss() - 0.01).abs() < 0.001);
    }
}
