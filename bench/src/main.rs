//! `downbeat-bench`: figures from simulated classrooms.
//!
//! This first scenario runs the real engine (room, clock-sync estimator, client state
//! machine, codec) on the engine's virtual network, so its figures are those of the
//! algorithms, free of this machine's scheduling noise: clock-offset error against the
//! injected truth, beat onset spread across clients, and late beats, per network profile.
//! The socket-level scenarios and the peers side by side come with the benchmark issue.

use std::time::Instant;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
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
    let Scenario::Sim { profile: name, clients, seconds, bpm, seed, outage_at, json } = Cli::parse().scenario;
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
