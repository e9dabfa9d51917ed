//! What every scenario reports: percentile summaries, one result per system, and the run
//! around them. [`crate::report`] renders these as JSON, a markdown table and PNG plots.
//!
//! Figures are plain `f64` in the unit their metric names (`ms`, `us`, `%`, `KiB`, ...);
//! a system a metric does not apply to has `None`, shown as "n/a" with the metric's note.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Percentiles of one set of samples (nearest rank). All `None`-free: an empty set has
/// `count == 0` and zeros elsewhere.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Samples summarized.
    pub count: usize,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest sample.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
}

impl Summary {
    /// Summarizes `samples` (any order; NaNs are ignored).
    pub fn of(samples: &[f64]) -> Self {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|x| !x.is_nan()).collect();
        sorted.sort_by(f64::total_cmp);
        let Some(&max) = sorted.last() else { return Self::default() };
        let rank = |q: f64| {
            // Nearest rank: the smallest sample with at least q of the samples at or below it.
            let n = sorted.len();
            let i = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
            sorted[i]
        };
        Self {
            count: sorted.len(),
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            p999: rank(0.999),
            max,
            mean: sorted.iter().sum::<f64>() / sorted.len() as f64,
        }
    }
}

/// Which way a metric is better; the ratio column is oriented so that above 1 means
/// Downbeat does better.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Better {
    /// Smaller is better (latencies, spreads, errors, costs).
    Lower,
    /// Larger is better (capacity, rates).
    Higher,
}

/// One figure of one system.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    /// Stable key, also the JSON key (`onset_spread_p99_ms`).
    pub key: String,
    /// What a reader sees in the table's first column (`beat onset spread p99`).
    pub label: String,
    /// Unit shown after the figure (`ms`).
    pub unit: String,
    /// The figure; `None` when it does not apply to this system or could not be measured.
    pub value: Option<f64>,
    /// Which way is better.
    pub better: Better,
    /// Why the value is missing, or how it was measured for this system when that differs.
    pub note: Option<String>,
}

/// "Time until every client is within 1 ms": the slowest client's, or not applicable when
/// some client never stayed within 1 ms.
pub fn converged_metric(slowest_s: Option<f64>) -> Metric {
    let (key, label) = ("converged_s", "time until every client is within 1 ms");
    match slowest_s {
        Some(s) => Metric::lower(key, label, "s", s),
        None => Metric::not_applicable(key, label, "s", Better::Lower, "some client never stayed within 1 ms"),
    }
}

impl Metric {
    /// A measured figure where lower is better.
    pub fn lower(key: &str, label: &str, unit: &str, value: f64) -> Self {
        Self {
            key: key.into(),
            label: label.into(),
            unit: unit.into(),
            value: Some(value),
            better: Better::Lower,
            note: None,
        }
    }

    /// A measured figure where higher is better.
    pub fn higher(key: &str, label: &str, unit: &str, value: f64) -> Self {
        Self { better: Better::Higher, ..Self::lower(key, label, unit, value) }
    }

    /// A figure that does not apply to this system, with the reason.
    pub fn not_applicable(key: &str, label: &str, unit: &str, better: Better, why: &str) -> Self {
        Self { key: key.into(), label: label.into(), unit: unit.into(), value: None, better, note: Some(why.into()) }
    }

    /// The same figure with a note on how it was measured.
    #[must_use]
    pub fn with_note(mut self, note: &str) -> Self {
        self.note = Some(note.into());
        self
    }
}

/// Everything one system produced in one run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SystemResult {
    /// `downbeat`, `socketio` or `ws`.
    pub system: String,
    /// Human name for tables and plot legends (`Downbeat`, `Socket.IO`, `WebSocket timer`).
    pub display: String,
    /// The figures, in table order.
    pub metrics: Vec<Metric>,
    /// Raw distributions for CDF plots, by key (`onset_spread_ms`, `fanout_ms`), in the unit
    /// the key names.
    pub distributions: BTreeMap<String, Vec<f64>>,
    /// Anything else worth keeping in the JSON (counts, errors, the peer's raw summary).
    pub extra: serde_json::Value,
}

/// The machine and its load while a run went on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// Logical CPUs.
    pub cpus: usize,
    /// CPU model name from /proc/cpuinfo.
    pub cpu_model: String,
    /// Total memory, GiB.
    pub memory_gib: f64,
    /// Kernel release.
    pub kernel: String,
    /// Share of CPU time the hypervisor stole during the run, in percent (`/proc/stat`).
    pub steal_percent: f64,
    /// 1-minute load average at the end of the run.
    pub load_average: f64,
}

/// One scenario run on one profile: what the JSON file holds and the table shows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// Subcommand name (`onset`, `fanout`, ...).
    pub scenario: String,
    /// One line saying what was measured.
    pub title: String,
    /// Network profile name.
    pub profile: String,
    /// The profile's parameters as printed with the results.
    pub profile_parameters: String,
    /// The scenario's parameters (clients, rooms, seconds, bpm, seed, ...).
    pub parameters: serde_json::Value,
    /// The command line that made this run.
    pub command: String,
    /// UTC time the run started, RFC 3339.
    pub started_at: String,
    /// Wall-clock seconds the run took.
    pub wall_seconds: f64,
    /// The machine and its load.
    pub machine: Machine,
    /// Downbeat first, then the peers.
    pub systems: Vec<SystemResult>,
    /// Remarks for the reader (goals missed and why, noisy run, ...).
    pub notes: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<f64> = (1..=1000).map(f64::from).collect();
        let s = Summary::of(&samples);
        assert_eq!((s.count, s.p50, s.p90, s.p99, s.p999, s.max), (1000, 500.0, 900.0, 990.0, 999.0, 1000.0));
        assert!((s.mean - 500.5).abs() < 1e-9);
        let one = Summary::of(&[7.0]);
        assert_eq!((one.p50, one.p999, one.max), (7.0, 7.0, 7.0));
        assert_eq!(Summary::of(&[]).count, 0);
        assert_eq!(Summary::of(&[f64::NAN, 2.0]).count, 1);
    }
}
