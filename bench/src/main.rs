//! `downbeat-bench`: figures from simulated classrooms.
//!
//! This first scenario runs the real engine (room, clock-sync estimator, client state
//! machine, codec) on the engine's virtual network, so its figures are those of the
//! algorithms, free of this machine's scheduling noise: clock-offset error against the
//! injected truth, beat onset spread across clients, and late beats, per network profile.
//! The socket-level scenarios and the peers side by side come with the benchmark issue.
//!
//! `downbeat-bench netem` brings up the packet-level network emulator
//! (`downbeat_bench::netem`) with a profile, and either runs its self-check or holds the
//! network for manual use until Ctrl-C.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use downbeat_bench::netem::{self, Emulator, EmulatorConfig};
use downbeat_engine::sim::{ClockModel, MS, Profile, Rng, SEC, Sim};
use downbeat_engine::{clock, room};
use downbeat_protocol::{Change, MicroBpm, ServerNanos};

#[derive(Parser, Debug)]
#[command(version, about = "Downbeat benchmark harness")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Clock sync and beat onset spread of N simulated clients in one room.
    Sim {
        /// Network profile: loopback, lan, classroom-wifi or congested.
        #[arg(long, default_value = "classroom-wifi")]
        profile: String,
        /// Clients in the room.
        #[arg(long, default_value_t = 30)]
        clients: usize,
        /// Simulated seconds.
        #[arg(long, default_value_t = 120)]
        seconds: u64,
        /// Tempo in BPM.
        #[arg(long, default_value_t = 120)]
        bpm: u32,
        /// Seed (a run repeats exactly).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Add one 1 s outage on every client's path at this second.
        #[arg(long)]
        outage_at: Option<u64>,
        /// Write the figures as JSON here too.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// Packet-level network emulator: a namespace for clients, TUN devices and an impaired
    /// path per client and direction, for real UDP (QUIC) and TCP traffic.
    ///
    /// Needs root, /dev/net/tun and `ip` (iproute2). Clients run inside the namespace
    /// (`ip netns exec dbnet-<id> ...`) and bind to their own address (10.77.<id>.<i+1>);
    /// servers listen in the root namespace on 10.78.<id>.1 (or 0.0.0.0). Without --check it
    /// prints the addresses and holds the network until Ctrl-C, then prints the counters.
    Netem {
        /// Network profile: loopback, lan, classroom-wifi or congested.
        #[arg(long, default_value = "classroom-wifi")]
        profile: String,
        /// Simulated clients (one address and one path each way per client).
        #[arg(long, default_value_t = 10)]
        clients: usize,
        /// Emulator id (0-255): names and addresses derive from it; emulators running at once
        /// need different ids.
        #[arg(long, default_value_t = 1)]
        id: u8,
        /// Seed (the same seed and the same packets give the same losses and delays).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Add a 1 s outage on every client's paths this many seconds after start.
        #[arg(long)]
        outage_at: Option<f64>,
        /// Microseconds the timer spins before a release instead of sleeping (accuracy vs CPU).
        #[arg(long, default_value_t = 100)]
        spin_us: u64,
        /// Keep the emulator's threads on the normal scheduler (default: SCHED_FIFO priority
        /// 10 via `chrt`, so a busy machine delays releases less).
        #[arg(long)]
        no_realtime: bool,
        /// Run the self-check (UDP echoes from every client, measured against the model) and
        /// exit.
        #[arg(long)]
        check: bool,
        /// Self-check: probes per client.
        #[arg(long, default_value_t = 1_000)]
        count: u32,
        /// Self-check: milliseconds between rounds of probes (one per client).
        #[arg(long, default_value_t = 10.0)]
        interval_ms: f64,
        /// Write the self-check's figures (or, when holding, the final counters) as JSON here.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// Programs the emulator runs inside the clients' namespace (internal).
    #[command(hide = true)]
    NetemHelper {
        #[command(subcommand)]
        mode: netem::helper::HelperMode,
    },
}

fn profile(name: &str, power_save: bool) -> Result<Profile> {
    Ok(match name {
        "loopback" => Profile::loopback(),
        "lan" => Profile::lan(),
        "classroom-wifi" => Profile::classroom_wifi(power_save),
        "congested" => Profile::congested(power_save),
        other => bail!("unknown profile {other:?}: use loopback, lan, classroom-wifi or congested"),
    })
}

fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn main() -> Result<()> {
    match Cli::parse().scenario {
        Scenario::Sim { profile, clients, seconds, bpm, seed, outage_at, json } => {
            sim_scenario(profile, clients, seconds, bpm, seed, outage_at, json)
        }
        Scenario::Netem {
            profile,
            clients,
            id,
            seed,
            outage_at,
            spin_us,
            no_realtime,
            check,
            count,
            interval_ms,
            json,
        } => {
            let Some(mut p) = netem::Profile::by_name(&profile) else {
                bail!("unknown profile {profile:?}: use {}", netem::PROFILE_NAMES.join(", "))
            };
            if let Some(at) = outage_at {
                let from = (at * SEC as f64) as u64;
                p = p.with_outage_at(from, from + SEC);
            }
            let config = EmulatorConfig {
                seed,
                spin: std::time::Duration::from_micros(spin_us),
                realtime_priority: if no_realtime { None } else { Some(10) },
                ..EmulatorConfig::new(id, clients, p)
            };
            let check = check.then(|| netem::check::CheckConfig {
                count,
                interval_us: (interval_ms * 1e3) as u64,
                ..netem::check::CheckConfig::default()
            });
            netem_scenario(config, check, json)
        }
        Scenario::NetemHelper { mode } => netem::helper::run(mode),
    }
}

/// Brings the emulator up and runs the self-check or holds it until Ctrl-C.
fn netem_scenario(
    config: EmulatorConfig,
    check: Option<netem::check::CheckConfig>,
    json: Option<std::path::PathBuf>,
) -> Result<()> {
    // Ctrl-C must not kill the process before the emulator's drop removes its namespace.
    let (ctrl_c_tx, ctrl_c) = std::sync::mpsc::channel();
    std::thread::Builder::new().name("ctrl-c".into()).spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_io().build() else { return };
        if rt.block_on(tokio::signal::ctrl_c()).is_ok() {
            let _ = ctrl_c_tx.send(());
        }
    })?;
    let emulator = Emulator::start(config)?;
    let (client_dev, server_dev) = emulator.devices();
    println!("netem up: {}", emulator.profile());
    println!(
        "  clients: namespace {} (device {client_dev}), addresses {}",
        emulator.netns(),
        match emulator.config().clients {
            1 => emulator.client_addr(0).to_string(),
            n => format!("{} .. {}", emulator.client_addr(0), emulator.client_addr(n - 1)),
        }
    );
    println!("  server:  root namespace (device {server_dev}), address {}", emulator.server_addr());
    if let Some(check) = check {
        let exe = std::env::current_exe().context("finding this program to run the probe")?;
        let report = netem::check::run_check(&emulator, &exe, &check)?;
        println!("\n{}", report.table());
        if let Some(path) = json {
            std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
        }
        return Ok(());
    }
    println!(
        "  run a client: ip netns exec {} <program> (bind it to its client address)\nholding the network; Ctrl-C to stop",
        emulator.netns()
    );
    let _ = ctrl_c.recv();
    let stats = emulator.stats();
    println!("\n{}", serde_json::to_string_pretty(&stats)?);
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(&stats)?)?;
    }
    Ok(())
}

fn sim_scenario(
    name: String,
    clients: usize,
    seconds: u64,
    bpm: u32,
    seed: u64,
    outage_at: Option<u64>,
    json: Option<std::path::PathBuf>,
) -> Result<()> {
    let started = Instant::now();
    let mut rng = Rng::new(seed);
    let mut members = Vec::new();
    for i in 0..clients {
        // Power save on 30 % of clients, as in the classroom profile.
        let mut p = profile(&name, i % 10 < 3)?;
        if let Some(at) = outage_at {
            p.up.outages.push((at * SEC, (at + 1) * SEC));
            p.down.outages.push((at * SEC, (at + 1) * SEC));
        }
        members.push((ClockModel::random(&mut rng, 500 * MS as i64, 100.0), p));
    }
    let described = format!("{:?}", members.first().map(|m| &m.1));
    let mut sim =
        Sim::new(seed, room::Config::default(), &clock::Config::default(), MicroBpm::from_bpm(bpm), 4, members);
    sim.schedule_change(0, Change::Start { count_in_bars: 0 });

    let (mut offset_errors, mut spreads) = (Vec::new(), Vec::new());
    let (mut late, mut scheduled, mut missing) = (0u64, 0u64, 0u64);
    let mut converged_at = vec![None; clients];
    let mut t = 100 * MS;
    while t <= seconds * SEC {
        sim.run_until(t);
        for (i, at) in converged_at.iter_mut().enumerate() {
            let err = sim.offset_error_nanos(i).map_or(u64::MAX, i64::unsigned_abs);
            if at.is_none() && err <= MS {
                *at = Some(t);
            }
            if t >= 2 * SEC {
                offset_errors.push(err);
            }
        }
        // Every 500 ms: the beats each client holds from 100 ms ahead (what an audio scheduler
        // queues) to the lead, as true instants. A beat placed in the past is late.
        if t >= 2 * SEC && t.is_multiple_of(500 * MS) {
            let timeline = sim.room().timeline().clone();
            let horizon = ServerNanos(t + room::Config::default().lead_nanos);
            for beat in timeline.beats_in(ServerNanos(t + 100 * MS), horizon) {
                let mut instants = Vec::new();
                for i in 0..clients {
                    match sim.true_instant_of_beat(i, beat.index) {
                        Some(at) => {
                            scheduled += 1;
                            late += u64::from(at < t);
                            instants.push(at);
                        }
                        None => missing += 1,
                    }
                }
                if let (Some(lo), Some(hi)) = (instants.iter().min(), instants.iter().max()) {
                    spreads.push(hi - lo);
                }
            }
        }
        t += 100 * MS;
    }
    offset_errors.sort_unstable();
    spreads.sort_unstable();
    let mut converge: Vec<u64> = converged_at.iter().map(|c| c.unwrap_or(u64::MAX)).collect();
    converge.sort_unstable();
    let net = sim.net_stats();
    let us = |n: u64| n as f64 / 1e3;
    let figures = serde_json::json!({
        "scenario": "sim",
        "profile": name,
        "profile_parameters": described,
        "clients": clients,
        "simulated_seconds": seconds,
        "bpm": bpm,
        "seed": seed,
        "outage_at_s": outage_at,
        "offset_error_us": {"p50": us(quantile(&offset_errors, 0.5)), "p99": us(quantile(&offset_errors, 0.99)), "max": us(quantile(&offset_errors, 1.0))},
        "converged_within_1ms_s": {"p50": converge[clients / 2] as f64 / 1e9, "max": converge[clients - 1] as f64 / 1e9},
        "onset_spread_us": {"p50": us(quantile(&spreads, 0.5)), "p99": us(quantile(&spreads, 0.99)), "max": us(quantile(&spreads, 1.0))},
        "beats_checked": scheduled,
        "late_beats": late,
        "beats_unknown": missing,
        "datagrams": {"sent": net.sent, "lost": net.lost, "max_bytes": net.max_datagram_len},
        "wall_seconds": started.elapsed().as_secs_f64(),
    });
    println!("| metric | p50 | p99 | max |\n|---|---|---|---|");
    println!(
        "| clock offset error (us) | {:.1} | {:.1} | {:.1} |",
        figures["offset_error_us"]["p50"], figures["offset_error_us"]["p99"], figures["offset_error_us"]["max"]
    );
    println!(
        "| beat onset spread (us) | {:.1} | {:.1} | {:.1} |",
        figures["onset_spread_us"]["p50"], figures["onset_spread_us"]["p99"], figures["onset_spread_us"]["max"]
    );
    println!(
        "profile {name}, {clients} clients, {seconds} s simulated; converged (<1 ms) by {:.2} s (max); late beats {late} of {scheduled}; unknown {missing}; datagrams {} sent, {} lost, largest {} B; {:.1} s wall",
        figures["converged_within_1ms_s"]["max"], net.sent, net.lost, net.max_datagram_len, figures["wall_seconds"]
    );
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(&figures)?)?;
    }
    Ok(())
}
