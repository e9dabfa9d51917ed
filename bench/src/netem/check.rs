//! The self-check: UDP echoes across the emulator, measured, next to what the emulator's own
//! model predicts for the same packets.
//!
//! A responder in the root namespace echoes probes; the probe helper runs in the clients'
//! namespace (`ip netns exec`) and sends from every client address. One-way delays are
//! measured with the wall clock both processes share. The model runs the same paths (same
//! seeds, so the same losses) on virtual time with the probes' schedule.

use std::collections::HashMap;
use std::net::UdpSocket;
use std::path::Path as FsPath;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::emulator::{Emulator, EmulatorConfig, build_paths};
use super::helper::{ProbeHeader, ProbeReport, wall_nanos};
use super::path::{Path, Verdict};
use super::profile::{Jitter, Profile};
use super::stats::Stats;

/// How the self-check probes.
#[derive(Clone, Debug, Serialize)]
pub struct CheckConfig {
    /// Probes per client.
    pub count: u32,
    /// Time between rounds (one probe per client each), us.
    pub interval_us: u64,
    /// Probe size, bytes.
    pub size: usize,
}

impl Default for CheckConfig {
    fn default() -> Self {
        Self { count: 1_000, interval_us: 10_000, size: 64 }
    }
}

/// Delay quantiles, loss and reordering of one direction (or of round trips).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Figures {
    /// Packets that arrived.
    pub samples: u64,
    /// Median, ms.
    pub p50_ms: f64,
    /// 90th percentile, ms.
    pub p90_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Largest, ms.
    pub max_ms: f64,
    /// Share lost.
    pub loss: f64,
    /// Share of arrivals that came after a packet sent later.
    pub reordered: f64,
}

impl Figures {
    fn new(mut delays: Vec<u64>, sent: u64, reordered: u64) -> Self {
        delays.sort_unstable();
        let q = |f: f64| {
            if delays.is_empty() {
                return 0.0;
            }
            delays[((delays.len() - 1) as f64 * f).round() as usize] as f64 / 1e6
        };
        let n = delays.len() as u64;
        Self {
            samples: n,
            p50_ms: q(0.5),
            p90_ms: q(0.9),
            p99_ms: q(0.99),
            max_ms: q(1.0),
            loss: if sent == 0 { 0.0 } else { 1.0 - n as f64 / sent as f64 },
            reordered: if n == 0 { 0.0 } else { reordered as f64 / n as f64 },
        }
    }
}

/// Measured and modelled figures side by side.
#[derive(Clone, Debug, Serialize)]
pub struct Compared {
    /// Across the emulator.
    pub measured: Figures,
    /// The emulator's model of the same packets on virtual time (same paths and seeds: what
    /// the measurement should show, less the operating system's overhead).
    pub model: Figures,
    /// The profile in the long run: the model over 10 clients x 20,000 probes at the same
    /// interval, another seed (a short check of a heavy-tailed profile varies around it).
    pub configured: Figures,
}

/// The self-check's outcome.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    /// The profile.
    pub profile: Profile,
    /// The profile, in words.
    pub profile_text: String,
    /// Clients.
    pub clients: usize,
    /// Seed.
    pub seed: u64,
    /// How it probed.
    pub check: CheckConfig,
    /// Client to server, one way.
    pub up: Compared,
    /// Server to client, one way.
    pub down: Compared,
    /// Round trips.
    pub rtt: Compared,
    /// The emulator's counters.
    pub emulator: Stats,
    /// Host CPU time stolen during the check (this VM waiting for its host), percent.
    pub steal_percent: f64,
    /// Seconds the check took.
    pub wall_seconds: f64,
}

impl CheckReport {
    /// The figures as a Markdown table plus a line of counters.
    pub fn table(&self) -> String {
        let mut out = format!(
            "profile {} ({} clients x {} probes every {} ms, seed {})\n{}\n\n",
            self.profile.name,
            self.clients,
            self.check.count,
            self.check.interval_us as f64 / 1e3,
            self.seed,
            self.profile_text
        );
        out += "| path | p50 ms | p90 ms | p99 ms | max ms | loss % | reordered % |\n|---|---|---|---|---|---|---|\n";
        for (name, c) in [("up", &self.up), ("down", &self.down), ("round trip", &self.rtt)] {
            for (kind, f) in [("measured", &c.measured), ("model", &c.model), ("configured", &c.configured)] {
                out += &format!(
                    "| {name} {kind} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} | {:.2} |\n",
                    f.p50_ms,
                    f.p90_ms,
                    f.p99_ms,
                    f.max_ms,
                    f.loss * 100.0,
                    f.reordered * 100.0
                );
            }
        }
        for (name, d) in [("up", &self.emulator.up), ("down", &self.emulator.down)] {
            out += &format!(
                "emulator {name}: {} packets, {} forwarded, dropped {} random + {} burst + {} outage, {} held for a beacon, {} reordered, {} ignored; timer lateness p50 {:.1} us, p99 {:.1} us, max {:.1} us\n",
                d.packets,
                d.forwarded,
                d.dropped_random,
                d.dropped_burst,
                d.dropped_outage,
                d.held_power_save,
                d.reordered,
                d.ignored,
                d.lateness.quantile(0.5) as f64 / 1e3,
                d.lateness.quantile(0.99) as f64 / 1e3,
                d.lateness.max() as f64 / 1e3,
            );
        }
        out += &format!("CPU steal during the check: {:.2} %; {:.1} s wall\n", self.steal_percent, self.wall_seconds);
        out
    }
}

#[derive(Default)]
struct Responder {
    up_one_way_ns: Vec<u64>,
    reordered: u64,
    echoed: u64,
}

/// Runs the self-check on a running emulator. `exe` is the benchmark binary (its
/// `netem-helper probe` runs in the clients' namespace).
pub fn run_check(emulator: &Emulator, exe: &FsPath, check: &CheckConfig) -> Result<CheckReport> {
    let started = Instant::now();
    let steal_before = cpu_steal();
    let socket = UdpSocket::bind((emulator.server_addr(), 0)).context("binding the echo responder")?;
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    let server = socket.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let responder = {
        let stop = stop.clone();
        std::thread::spawn(move || respond(&socket, &stop))
    };
    let from: Vec<String> = emulator.client_addrs().iter().map(ToString::to_string).collect();
    let wait_ms = echo_wait(emulator.profile()).as_millis().to_string();
    let output = emulator
        .command_in_netns(exe)
        .args(["netem-helper", "probe", "--server", &server.to_string(), "--from", &from.join(",")])
        .args(["--count", &check.count.to_string(), "--interval-us", &check.interval_us.to_string()])
        .args(["--size", &check.size.to_string(), "--wait-ms", &wait_ms])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running the probe in the clients' namespace");
    stop.store(true, Ordering::Relaxed);
    let Ok(resp) = responder.join() else { bail!("the echo responder panicked") };
    let output = output?;
    if !output.status.success() {
        bail!("the probe failed ({})", output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let probe: ProbeReport =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).context("reading the probe's report")?;

    let interval = check.interval_us * 1_000;
    let (mut up, mut down) = build_paths(emulator.config());
    let start = probe.first_sent_ns.saturating_sub(emulator.epoch_wall_nanos());
    let model = simulate(&mut up, &mut down, check.count, interval, start);
    let long_config =
        EmulatorConfig { clients: 10, seed: emulator.config().seed.wrapping_add(1), ..emulator.config().clone() };
    let (mut up, mut down) = build_paths(&long_config);
    let long = simulate(&mut up, &mut down, 20_000, interval, 0);
    let up_sent = probe.sent;
    let up = Compared {
        measured: Figures::new(resp.up_one_way_ns, up_sent, resp.reordered),
        model: Figures::new(model.up, model.up_sent, model.up_reordered),
        configured: Figures::new(long.up, long.up_sent, long.up_reordered),
    };
    let down = Compared {
        measured: Figures::new(probe.down_one_way_ns, resp.echoed, probe.down_reordered),
        model: Figures::new(model.down, model.down_sent, model.down_reordered),
        configured: Figures::new(long.down, long.down_sent, long.down_reordered),
    };
    let rtt = Compared {
        measured: Figures::new(probe.rtt_ns, up_sent, 0),
        model: Figures::new(model.rtt, model.up_sent, 0),
        configured: Figures::new(long.rtt, long.up_sent, 0),
    };
    Ok(CheckReport {
        profile: emulator.profile().clone(),
        profile_text: emulator.profile().to_string(),
        clients: emulator.config().clients,
        seed: emulator.config().seed,
        check: check.clone(),
        up,
        down,
        rtt,
        emulator: emulator.stats(),
        steal_percent: steal_share(steal_before, cpu_steal()) * 100.0,
        wall_seconds: started.elapsed().as_secs_f64(),
    })
}

/// How long to wait for the last echoes: the largest jitter both ways, a beacon, a margin.
fn echo_wait(profile: &Profile) -> Duration {
    let worst = |j: &Jitter| match *j {
        Jitter::None => 0,
        Jitter::Uniform { max_nanos } => max_nanos,
        Jitter::LogNormal { cap_nanos, .. } => cap_nanos,
    };
    let one_way = |p: &super::profile::PathParams| {
        p.base_nanos + worst(&p.jitter) + p.stalls.map_or(0, |s| s.cap_nanos) + p.reorder_extra_nanos
    };
    let beacon = profile.power_save.map_or(0, |ps| ps.beacon_nanos);
    Duration::from_nanos(one_way(&profile.up) + one_way(&profile.down) + beacon) + Duration::from_millis(500)
}

fn respond(socket: &UdpSocket, stop: &AtomicBool) -> Responder {
    let mut r = Responder::default();
    let mut newest: HashMap<u16, u32> = HashMap::new();
    let mut echo_seq: HashMap<u16, u32> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, from)) = socket.recv_from(&mut buf) else { continue };
        let now = wall_nanos();
        let Some(mut h) = ProbeHeader::read(&buf[..n]) else { continue };
        r.up_one_way_ns.push(now.saturating_sub(h.sent_ns));
        let newest = newest.entry(h.client).or_insert(h.seq);
        if h.seq < *newest {
            r.reordered += 1;
        }
        *newest = (*newest).max(h.seq);
        let seq = echo_seq.entry(h.client).or_insert(0);
        h.echo_seq = *seq;
        *seq += 1;
        h.echoed_ns = wall_nanos();
        h.write(&mut buf);
        if socket.send_to(&buf[..n], from).is_ok() {
            r.echoed += 1;
        }
    }
    r
}

#[derive(Default)]
struct Model {
    up: Vec<u64>,
    down: Vec<u64>,
    rtt: Vec<u64>,
    up_sent: u64,
    down_sent: u64,
    up_reordered: u64,
    down_reordered: u64,
}

/// Counts arrivals `(at, seq)` (sorted by `at`) whose seq is below one that arrived earlier.
fn late_arrivals(arrivals: &[(u64, u64)]) -> u64 {
    let mut newest = None;
    let mut late = 0;
    for &(_, seq) in arrivals {
        if newest.is_some_and(|n| seq < n) {
            late += 1;
        }
        newest = newest.max(Some(seq));
    }
    late
}

/// `count` probes per client every `interval` ns through the paths on virtual time, starting
/// `start` ns after the emulator's epoch; echoes leave the instant a probe arrives.
fn simulate(up: &mut [Path], down: &mut [Path], count: u32, interval: u64, start: u64) -> Model {
    let mut m = Model::default();
    for (up, down) in up.iter_mut().zip(down) {
        let mut arrivals = Vec::new();
        for k in 0..u64::from(count) {
            let sent = start + k * interval;
            m.up_sent += 1;
            if let Verdict::Deliver { at, .. } = up.admit(sent) {
                m.up.push(at - sent);
                arrivals.push((at, k, sent));
            }
        }
        arrivals.sort_unstable();
        let pairs: Vec<(u64, u64)> = arrivals.iter().map(|&(at, k, _)| (at, k)).collect();
        m.up_reordered += late_arrivals(&pairs);
        let mut echoes = Vec::new();
        for (n, &(at, _, sent)) in arrivals.iter().enumerate() {
            m.down_sent += 1;
            if let Verdict::Deliver { at: back, .. } = down.admit(at) {
                m.down.push(back - at);
                m.rtt.push(back - sent);
                echoes.push((back, n as u64));
            }
        }
        echoes.sort_unstable();
        m.down_reordered += late_arrivals(&echoes);
    }
    m
}

/// `(steal, total)` jiffies of all CPUs, from `/proc/stat`.
fn cpu_steal() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    Some((*v.get(7)?, v.iter().take(8).sum()))
}

fn steal_share(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> f64 {
    match (before, after) {
        (Some((s0, t0)), Some((s1, t1))) if t1 > t0 => (s1 - s0) as f64 / (t1 - t0) as f64,
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_and_late_arrivals() {
        let f = Figures::new((1..=100).map(|v| v * 1_000_000).collect(), 200, 5);
        assert_eq!(f.samples, 100);
        assert_eq!(f.p50_ms, 51.0);
        assert_eq!(f.p99_ms, 99.0);
        assert_eq!(f.max_ms, 100.0);
        assert!((f.loss - 0.5).abs() < 1e-9);
        assert!((f.reordered - 0.05).abs() < 1e-9);
        assert_eq!(late_arrivals(&[(1, 0), (2, 2), (3, 1), (4, 3), (5, 0)]), 2);
        assert_eq!(steal_share(Some((10, 1000)), Some((20, 2000))), 0.01);
        assert_eq!(steal_share(None, Some((20, 2000))), 0.0);
    }

    #[test]
    fn echo_wait_covers_the_worst_case() {
        assert_eq!(echo_wait(&Profile::loopback()), Duration::from_millis(500));
        assert!(echo_wait(&Profile::congested()) > Duration::from_secs(6));
    }
}
