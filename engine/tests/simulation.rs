//! Clock sync, beat placement and notes on virtual time: a room, 30 clients with clocks offset
//! by up to +-500 ms and drifting up to +-100 ppm, over simulated networks.

use downbeat_engine::clock;
use downbeat_engine::room::{self, NoteRefusal};
use downbeat_engine::sim::{Carrier, ClockModel, Hearing, MS, Profile, Rng, SEC, Sim, TcpConfig};
use downbeat_protocol::{Change, MicroBpm, ServerNanos};

const CLIENTS: usize = 30;

fn sim_with(seed: u64, profile: impl Fn(usize, &mut Rng) -> Profile) -> Sim {
    sim_with_config(seed, room::Config::default(), CLIENTS, profile)
}

fn sim_with_config(
    seed: u64,
    config: room::Config,
    clients: usize,
    profile: impl Fn(usize, &mut Rng) -> Profile,
) -> Sim {
    let mut rng = Rng::new(seed ^ 0xd0_57);
    let clients =
        (0..clients).map(|i| (ClockModel::random(&mut rng, 500 * MS as i64, 100.0), profile(i, &mut rng))).collect();
    Sim::new(seed, config, &clock::Config::default(), MicroBpm::from_bpm(120), 4, clients)
}

/// Absolute offset errors of all clients, sampled every 100 ms in `[from, to)`, sorted.
fn errors(sim: &mut Sim, from: u64, to: u64) -> Vec<u64> {
    let mut all = Vec::new();
    let mut t = from;
    while t < to {
        sim.run_until(t);
        for i in 0..CLIENTS {
            let e = sim.offset_error_nanos(i).expect("estimate after the first exchange");
            all.push(e.unsigned_abs());
        }
        t += 100 * MS;
    }
    all.sort_unstable();
    all
}

fn p99(sorted: &[u64]) -> u64 {
    sorted[sorted.len() * 99 / 100]
}

/// Largest absolute offset error over all clients, sampled every 100 ms in `[from, to)`.
fn worst_error(sim: &mut Sim, from: u64, to: u64) -> u64 {
    *errors(sim, from, to).last().expect("samples")
}

#[test]
fn lan_converges_within_2s_to_tens_of_microseconds() {
    // Six classes' worth (one seed's p99 lies anywhere from 35 to 51 us).
    let mut errors: Vec<u64> =
        (1..=6).flat_map(|seed| errors(&mut sim_with(seed, |_, _| Profile::lan()), 2 * SEC, 60 * SEC)).collect();
    errors.sort_unstable();
    // LAN jitter is 0-0.2 ms each way, so one exchange can be off by up to 100 us; filtering
    // and regression bring the 99th percentile well under that, and the 99.9th under it. The
    // single worst of the 100,000 samples is an extreme that moves with the generator's
    // stream: over eight sets of six seeds it ranged from 78 to 144 us, as much before the
    // slow paces as after (frames draw from the same generator, so fewer of them move every
    // later draw); the 99.9th percentile stayed within 57 to 72 us.
    let (p99, p999, worst) = (p99(&errors), errors[errors.len() * 999 / 1000], *errors.last().unwrap());
    eprintln!("lan: clock error p99 {p99} ns, p99.9 {p999} ns, worst {worst} ns over 6 seeds");
    assert!(p99 <= 50_000, "p99 offset error {p99} ns");
    assert!(p999 <= 100_000, "p99.9 offset error {p999} ns");
}

#[test]
fn classroom_wifi_converges_within_2s_to_well_under_a_millisecond() {
    for seed in 1..=3 {
        let mut sim = sim_with(seed, |i, _| Profile::classroom_wifi(i % 10 < 3));
        let worst = worst_error(&mut sim, 2 * SEC, 60 * SEC);
        assert!(worst <= 1_000 * 1_000, "seed {seed}: worst offset error {worst} ns");
    }
}

#[test]
fn asymmetric_paths_stay_within_the_bound_asymmetry_allows() {
    // Uplink 2 ms, downlink 8 ms, plus jitter: no exchange can see the 3 ms this biases the
    // offset by; the estimate must sit within that bound and not wander beyond it.
    let mut sim = sim_with(4, |_, _| {
        let mut p = Profile::lan();
        p.up.base_nanos = 2 * MS;
        p.down.base_nanos = 8 * MS;
        p
    });
    let bound = (8 * MS - 2 * MS) / 2;
    let worst = worst_error(&mut sim, 2 * SEC, 30 * SEC);
    // The LAN jitter (0-0.2 ms each way) adds up to 0.1 ms either side of the bias.
    assert!(worst <= bound + 200_000, "worst {worst} ns, asymmetry bound {bound} ns");
    // And it really is the asymmetry that limits it: the error is that bias, to within jitter.
    sim.run_until(31 * SEC);
    for i in 0..CLIENTS {
        let e = sim.offset_error_nanos(i).unwrap();
        assert!((e + bound as i64).abs() < 200_000, "client {i}: {e}");
    }
}

#[test]
fn heavy_loss_and_reordering_still_converge() {
    // Wi-Fi with a third of datagrams lost each way; its heavy jitter tail makes datagrams
    // overtake one another.
    let mut sim = sim_with(5, |_, _| {
        let mut p = Profile::classroom_wifi(false);
        p.up.loss = 0.33;
        p.down.loss = 0.33;
        p
    });
    sim.schedule_change(0, Change::Start { count_in_bars: 0 });
    let worst = worst_error(&mut sim, 3 * SEC, 60 * SEC);
    assert!(worst <= 1_000 * 1_000, "worst {worst} ns");
    assert!(sim.net_stats().lost > sim.net_stats().sent / 4);
    let reordered: u64 = sim.clients().iter().map(|c| c.client.stats().frames_out_of_order).sum();
    assert!(reordered > 0, "the run exercised reordering");
}

#[test]
fn every_client_sounds_each_beat_at_the_same_true_instant() {
    let mut sim = sim_with(6, |i, _| Profile::classroom_wifi(i % 10 < 3));
    sim.schedule_change(SEC, Change::Start { count_in_bars: 0 });
    sim.run_until(10 * SEC);
    let timeline = sim.room().timeline().clone();
    let mut spreads = Vec::new();
    let mut late = 0;
    for _ in 0..50 {
        let now = sim.now();
        // The beats the clients hold for the next 1.5 s: each one's true instant per client.
        let first = timeline.beat_at(downbeat_protocol::ServerNanos(now)).unwrap() + 1;
        for beat in first..first + 3 {
            let truth = timeline.time_of(beat).unwrap().0;
            let instants: Vec<u64> = (0..CLIENTS).map(|i| sim.true_instant_of_beat(i, beat).unwrap()).collect();
            let (lo, hi) = (instants.iter().min().unwrap(), instants.iter().max().unwrap());
            spreads.push(hi - lo);
            late += instants.iter().filter(|&&t| t < now).count();
            assert!(lo.abs_diff(truth) < MS && hi.abs_diff(truth) < MS, "beat {beat}");
        }
        sim.run_until(now + 500 * MS);
    }
    spreads.sort_unstable();
    let p99 = spreads[spreads.len() * 99 / 100];
    assert!(p99 <= MS, "onset spread p99 {p99} ns");
    assert_eq!(late, 0);
}

#[test]
fn tempo_and_meter_changes_land_on_the_same_bar_boundary_in_every_client() {
    let mut rng = Rng::new(77);
    let mut sim = sim_with(7, |i, _| Profile::classroom_wifi(i % 10 < 3));
    sim.schedule_change(SEC, Change::Start { count_in_bars: 0 });
    // A teacher changing things at odd moments, sometimes twice in quick succession.
    let mut at = 3 * SEC;
    for k in 0..12 {
        let change = match k % 4 {
            0 => Change::SetTempo(MicroBpm(rng.range(60e6, 180e6) as u32)),
            1 => Change::SetMeter(2 + (k % 5) as u8),
            2 => Change::SetTempo(MicroBpm(rng.range(60e6, 180e6) as u32)),
            _ => Change::SetMeter(4),
        };
        sim.schedule_change(at, change);
        at += (rng.range(0.05, 4.0) * SEC as f64) as u64;
    }
    let mut checked = 0;
    let end = at + 5 * SEC;
    while sim.now() < end {
        let now = sim.now() + 250 * MS;
        sim.run_until(now);
        let server = sim.room().timeline().clone();
        // Every change reported so far took effect on a downbeat of the bar it ended.
        for (asked, result) in sim.change_results() {
            let applied = result.as_ref().expect("changes in range are accepted");
            assert!(
                applied.effective_at.0 >= asked + room::Config::default().lead_nanos,
                "announced a full lead ahead"
            );
        }
        // Any beat from now up to the lead: each client that holds the server's epoch places
        // it where the server does; none holds a newer one.
        for i in 0..CLIENTS {
            let t = sim.clients()[i].client.timeline().unwrap();
            assert!(t.epoch() <= server.epoch());
            if t.epoch() == server.epoch() {
                let first = server.beat_at(downbeat_protocol::ServerNanos(now)).unwrap_or(0);
                for beat in first..first + 8 {
                    assert_eq!(t.time_of(beat), server.time_of(beat), "client {i} beat {beat}");
                    assert_eq!(t.beat_in_bar(beat), server.beat_in_bar(beat));
                }
                checked += 1;
            }
        }
        // And a change announced one lead ahead has reached every client before it happens.
        for s in server.segments().iter().filter(|s| s.start.0 <= now + 200 * MS && s.start.0 > now) {
            for i in 0..CLIENTS {
                let t = sim.clients()[i].client.timeline().unwrap();
                assert!(t.segments().iter().any(|c| c == s), "client {i} lacks the segment at beat {}", s.start_beat);
            }
        }
    }
    assert!(checked > 1_000);
    assert_eq!(sim.change_results().len(), 13);
}

#[test]
fn the_timeline_does_not_drift_over_100k_beats() {
    let mut sim = sim_with(8, |_, _| Profile::lan());
    sim.schedule_change(0, Change::SetTempo(MicroBpm::from_bpm(130)));
    sim.schedule_change(SEC, Change::Start { count_in_bars: 0 });
    sim.run_until(5 * SEC);
    let t = sim.room().timeline().clone();
    let seg = *t.last();
    let beat = seg.start_beat + 100_000;
    let got = t.time_of(beat).unwrap().0 - seg.start.0;
    // 100,000 * 60 / 130 s, in picoseconds.
    let ideal_ps = 100_000u128 * 60_000_000_000_000 / 130;
    assert!((u128::from(got) * 1000).abs_diff(ideal_ps) < 1_000_000, "{got} ns");
    // And clients agree on it to the nanosecond (same math, same timeline).
    assert_eq!(sim.clients()[0].client.timeline().unwrap().time_of(beat), t.time_of(beat));
}

/// Starts the beat at 1 s and runs to 3 s; every client is synced by then.
fn start_and_sync(sim: &mut Sim) {
    sim.schedule_change(SEC, Change::Start { count_in_bars: 0 });
    sim.run_until(3 * SEC);
    let now = sim.now();
    for (i, c) in sim.clients().iter().enumerate() {
        assert!(c.client.is_synced(c.clock.local_at(now)), "client {i} synced");
    }
}

/// Has `client` play a note every `min..max` ms (uniformly drawn) in `[from, to)`; the count.
fn play_notes(sim: &mut Sim, rng: &mut Rng, client: usize, from: u64, to: u64, min_ms: f64, max_ms: f64) -> usize {
    let (mut at, mut n) = (from, 0);
    while at < to {
        sim.schedule_note(at, client, 48 + (n % 24) as u8);
        at += (rng.range(min_ms, max_ms) * MS as f64) as u64;
        n += 1;
    }
    n
}

/// What every receiver did with one sender's notes.
#[derive(Debug, Default)]
struct Playout {
    /// Notes the sender played.
    played: usize,
    /// (Note, receiver) pairs that reached the receiver.
    delivered: usize,
    scheduled: usize,
    late: usize,
    /// Per note heard on time by at least two receivers: latest minus earliest true sounding
    /// instant, sorted.
    spreads: Vec<u64>,
    /// Largest distance of a true sounding instant from `played_at + delay`.
    worst_from_target: u64,
}

impl Playout {
    fn p99_spread(&self) -> u64 {
        self.spreads[self.spreads.len() * 99 / 100]
    }

    fn median_spread(&self) -> u64 {
        self.spreads[self.spreads.len() / 2]
    }

    fn max_spread(&self) -> u64 {
        *self.spreads.last().unwrap()
    }
}

/// Checks and measures how everyone heard `sender`'s notes.
fn playout_of(sim: &Sim, sender: usize) -> Playout {
    let delay = sim.room().config().playout_delay_nanos;
    let mut p = Playout::default();
    let heard = sim.notes_heard();
    assert!(heard.iter().all(|h| h.from != h.receiver as u64), "nobody hears their own notes");
    for played in sim.notes_played().iter().filter(|n| n.client == sender) {
        let note = played.note.expect("stamped: the sender is synced");
        p.played += 1;
        let target = note.played_at.0 + delay;
        let mut instants = Vec::new();
        for h in heard.iter().filter(|h| h.from == sender as u64 && h.note.seq == note.seq) {
            assert_eq!(h.note, note);
            p.delivered += 1;
            match h.hearing {
                Hearing::Scheduled { true_at, .. } => {
                    p.scheduled += 1;
                    assert!(true_at > h.arrived_at, "scheduled in the future: {h:?}");
                    p.worst_from_target = p.worst_from_target.max(true_at.abs_diff(target));
                    instants.push(true_at);
                }
                Hearing::Late => {
                    p.late += 1;
                    // Really late (to within the receiver's clock error), not a false alarm.
                    assert!(h.arrived_at + MS >= target, "late but arrived {} ns early", target - h.arrived_at);
                }
            }
        }
        if let (Some(lo), Some(hi)) = (instants.iter().min(), instants.iter().max())
            && instants.len() > 1
        {
            p.spreads.push(hi - lo);
        }
    }
    p.spreads.sort_unstable();
    // The harness's records agree with the clients' own counters.
    let stats: Vec<_> = sim.clients().iter().map(|c| c.client.stats()).collect();
    let receivers_scheduled: u64 = stats.iter().map(|s| s.notes_scheduled).sum();
    let receivers_late: u64 = stats.iter().map(|s| s.notes_late).sum();
    assert_eq!(receivers_scheduled as usize + receivers_late as usize, p.delivered, "scheduled + late == delivered");
    assert_eq!((receivers_scheduled as usize, receivers_late as usize), (p.scheduled, p.late));
    assert_eq!(stats[sender].notes_sent as usize, p.played);
    p
}

fn notes_sound_together(name: &str, seeds: &[u64], profile: impl Fn(usize, &mut Rng) -> Profile + Copy) -> Playout {
    let mut all = Playout::default();
    for &seed in seeds {
        let mut sim = sim_with(seed, profile);
        start_and_sync(&mut sim);
        let mut rng = Rng::new(seed);
        let played = play_notes(&mut sim, &mut rng, 0, 3 * SEC, 23 * SEC, 200.0, 300.0);
        sim.run_until(24 * SEC);
        let p = playout_of(&sim, 0);
        assert_eq!(p.played, played);
        let accepted: u32 = sim.server_notes().iter().map(|s| s.outcome.accepted).sum();
        assert!(sim.server_notes().iter().all(|s| s.outcome.refusal.is_none()));
        assert!(p.delivered <= accepted as usize * (CLIENTS - 1));
        eprintln!(
            "{name} seed {seed}: {} notes, {} deliveries ({} scheduled, {} late); onset spread median {} us, p99 \
             {} us, max {} us; worst distance from played_at + delay {} us",
            p.played,
            p.delivered,
            p.scheduled,
            p.late,
            p.median_spread() / 1_000,
            p.p99_spread() / 1_000,
            p.max_spread() / 1_000,
            p.worst_from_target / 1_000
        );
        all.played += p.played;
        all.delivered += p.delivered;
        all.scheduled += p.scheduled;
        all.late += p.late;
        all.spreads.extend(p.spreads);
        all.worst_from_target = all.worst_from_target.max(p.worst_from_target);
    }
    all.spreads.sort_unstable();
    eprintln!(
        "{name} overall: {} notes, onset spread median {} us, p99 {} us, max {} us",
        all.played,
        all.median_spread() / 1_000,
        all.p99_spread() / 1_000,
        all.max_spread() / 1_000
    );
    assert!(all.max_spread() <= MS, "{name}: onset spread max {} ns", all.max_spread());
    assert!(all.worst_from_target <= MS, "{name}: {} ns from played_at + delay", all.worst_from_target);
    all
}

#[test]
fn lan_notes_sound_in_every_classmate_within_a_millisecond_and_none_is_late() {
    let p = notes_sound_together("lan", &[11, 12], |_, _| Profile::lan());
    assert_eq!(p.late, 0);
    assert_eq!(p.delivered, p.played * (CLIENTS - 1), "no loss on the LAN: everyone hears every note");
    // LAN clocks agree to tens of microseconds.
    assert!(p.max_spread() <= 200_000, "spread {} ns", p.max_spread());
}

#[test]
fn classroom_wifi_notes_sound_together_and_the_few_late_ones_are_not_played() {
    let p = notes_sound_together("classroom-wifi", &(13..=22).collect::<Vec<_>>(), |i, _| {
        Profile::classroom_wifi(i % 10 < 3)
    });
    let late = p.late as f64 / p.delivered as f64;
    eprintln!("classroom-wifi: {:.2} % of deliveries late with the default 80 ms delay", late * 100.0);
    assert!(p.late > 0, "the Wi-Fi tail makes some notes late");
    assert!(late < 0.07, "late fraction {late}");
    // Loss and lateness together still leave the great majority of notes played.
    assert!(p.scheduled as f64 > 0.88 * (p.played * (CLIENTS - 1)) as f64);
}

/// Fraction of (note, receiver) pairs scheduled on time, for notes every `spacing_ms` with
/// 30 % of downlink datagrams lost.
fn delivered_with_downlink_loss(seed: u64, spacing_ms: f64, count: u64) -> f64 {
    let config = room::Config { notes_per_second: 50, ..room::Config::default() };
    let mut sim = sim_with_config(seed, config, 10, |_, _| {
        let mut p = Profile::lan();
        p.down.loss = 0.3;
        p
    });
    start_and_sync(&mut sim);
    let mut rng = Rng::new(seed);
    let end = 3 * SEC + count * (spacing_ms * MS as f64) as u64;
    play_notes(&mut sim, &mut rng, 0, 3 * SEC, end, spacing_ms, spacing_ms + 0.001);
    sim.run_until(end + SEC);
    let p = playout_of(&sim, 0);
    assert_eq!(p.late, 0);
    assert!(sim.server_notes().iter().all(|s| s.outcome.refusal.is_none()));
    p.scheduled as f64 / (p.played * 9) as f64
}

#[test]
fn redundancy_covers_downlink_loss() {
    // Notes 25 ms apart: each travels in three successive frames before it sounds (80 ms).
    let dense = delivered_with_downlink_loss(21, 25.0, 400);
    // Notes 250 ms apart: each has sounded before the next is played, so one copy only.
    let sparse = delivered_with_downlink_loss(21, 250.0, 80);
    eprintln!("30 % downlink loss: {:.1} % delivered with redundancy, {:.1} % without", dense * 100.0, sparse * 100.0);
    assert!(dense > 1.0 - 0.3 + 0.2, "redundancy: {dense}");
    assert!((0.6..0.8).contains(&sparse), "one copy each: {sparse}");
}

#[test]
fn a_muted_student_reaches_nobody_until_unmuted() {
    let mut sim = sim_with_config(31, room::Config::default(), 5, |_, _| Profile::loopback());
    start_and_sync(&mut sim);
    // Client 0 plays every 60 ms from 3 s (each note repeats the one before), client 1 every
    // 200 ms; notes reach the server 50 us after they are played.
    for k in 0..50 {
        sim.schedule_note(3 * SEC + k * 60 * MS, 0, 60);
    }
    for k in 0..15 {
        sim.schedule_note(3 * SEC + k * 200 * MS, 1, 72);
    }
    sim.run_until(4_010 * MS);
    sim.set_muted(0, true);
    sim.run_until(5_010 * MS);
    assert!(sim.is_muted(0));
    sim.set_muted(0, false);
    sim.run_until(7 * SEC);
    // Notes 17..=33 (4020 ms .. 4980 ms) were played while muted: seq 18..=34.
    let expected: Vec<u32> = (1..=17).chain(35..=50).collect();
    for receiver in 1..5 {
        let mut heard: Vec<u32> =
            sim.notes_heard().iter().filter(|h| h.receiver == receiver && h.from == 0).map(|h| h.note.seq).collect();
        heard.sort_unstable();
        assert_eq!(heard, expected, "receiver {receiver}");
    }
    // Client 1 was never muted: everyone else heard all 15.
    for receiver in [0, 2, 3, 4] {
        assert_eq!(sim.notes_heard().iter().filter(|h| h.receiver == receiver && h.from == 1).count(), 15);
    }
    let muted: u32 = sim
        .server_notes()
        .iter()
        .filter(|s| s.outcome.refusal == Some(NoteRefusal::Muted))
        .map(|s| s.outcome.dropped)
        .sum();
    assert_eq!(muted, 17);
    assert!(sim.notes_heard().iter().all(|h| matches!(h.hearing, Hearing::Scheduled { .. })));
}

#[test]
fn a_flood_is_cut_to_the_token_bucket() {
    let config = room::Config::default();
    let (rate, burst) = (u64::from(config.notes_per_second), u64::from(config.note_burst));
    let mut sim = sim_with_config(41, config, 5, |_, _| Profile::loopback());
    start_and_sync(&mut sim);
    // 200 notes in one second, 5 ms apart; each reaches the server 50 us after it is played.
    let (count, spacing) = (200u64, 5 * MS);
    for k in 0..count {
        sim.schedule_note(3 * SEC + k * spacing, 0, 60);
    }
    sim.run_until(5 * SEC);
    // The bucket is full (burst) at the first note and mints `rate` per second, exactly,
    // from then until the last: every minted token is taken by the next note.
    let expected = burst + (count - 1) * spacing * rate / SEC;
    assert_eq!(expected, 59);
    let sum =
        |f: fn(&room::NotesOutcome) -> u32| sim.server_notes().iter().map(|s| u64::from(f(&s.outcome))).sum::<u64>();
    assert_eq!(sum(|o| o.accepted), expected);
    assert_eq!(sum(|o| o.dropped), count - expected);
    // Every datagram but the first two repeats the two notes before it.
    assert_eq!(sum(|o| o.duplicates), 1 + 2 * (count - 2));
    assert!(sim.server_notes().iter().any(|s| s.outcome.refusal == Some(NoteRefusal::RateLimited)));
    for receiver in 1..5 {
        let heard = sim.notes_heard().iter().filter(|h| h.receiver == receiver).count();
        assert_eq!(heard as u64, expected, "receiver {receiver}");
        let c = &sim.clients()[receiver];
        assert_eq!(c.client.stats().notes_scheduled, expected);
        assert_eq!(c.client.stats().notes_late, 0);
    }
    // After a quiet spell the student plays normally again.
    sim.schedule_note(7 * SEC, 0, 64);
    sim.run_until(8 * SEC);
    assert_eq!(sim.server_notes().last().unwrap().outcome.accepted, 1);
}

/// Clock error, beat onsets and late beats of one class over one carrier. See [`timing_run`].
#[derive(Debug, Default)]
struct Timing {
    /// Absolute offset errors of every client, every 100 ms from 2 s, sorted.
    errors: Vec<u64>,
    /// Per beat: latest minus earliest true instant over the clients that placed it, sorted.
    spreads: Vec<u64>,
    /// (Beat, client) pairs checked, and those the client had not placed where the server
    /// does by the time its audio scheduler queues it.
    beats: u64,
    late: u64,
    /// Of those, the ones whose client held the right timeline but had no clock estimate or
    /// one placing the beat in the past.
    late_by_clock: u64,
    /// Per change and client: from the teacher asking to the client holding the change (to
    /// the 50 ms step of the run), sorted. The lead must exceed this plus `SCHEDULE_AHEAD`.
    notice: Vec<u64>,
    /// Over TCP: retransmissions, and timing messages the server replaced while backed up.
    retransmissions: u64,
    dropped: u64,
    /// Beat frames the room sent, summed over its members (each tick to every member, and the
    /// frames of their own: on joining, and repairs), and over how many seconds.
    frames: u64,
    seconds: f64,
}

impl Timing {
    fn add(&mut self, other: Self) {
        self.errors.extend(other.errors);
        self.spreads.extend(other.spreads);
        self.notice.extend(other.notice);
        self.errors.sort_unstable();
        self.spreads.sort_unstable();
        self.notice.sort_unstable();
        self.beats += other.beats;
        self.late += other.late;
        self.late_by_clock += other.late_by_clock;
        self.retransmissions += other.retransmissions;
        self.dropped += other.dropped;
        self.frames += other.frames;
        self.seconds += other.seconds;
    }

    fn quantile(sorted: &[u64], q: f64) -> u64 {
        sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
    }

    fn late_fraction(&self) -> f64 {
        self.late as f64 / self.beats as f64
    }

    fn line(&self, name: &str) -> String {
        let us = |n: u64| n as f64 / 1e3;
        format!(
            "{name}: clock error p50 {:.0} us, p99 {:.0} us; onset spread p99 {:.0} us; late beats {} of {} ({:.3} %, {} of them \
             by the clock); \
             a change reaches a client within p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; retransmissions {}, dropped {}; \
             {:.2} beat frames per member per second",
            us(Self::quantile(&self.errors, 0.5)),
            us(Self::quantile(&self.errors, 0.99)),
            us(Self::quantile(&self.spreads, 0.99)),
            self.late,
            self.beats,
            self.late_fraction() * 100.0,
            self.late_by_clock,
            us(Self::quantile(&self.notice, 0.5)) / 1e3,
            us(Self::quantile(&self.notice, 0.99)) / 1e3,
            us(Self::quantile(&self.notice, 1.0)) / 1e3,
            self.retransmissions,
            self.dropped,
            self.frames as f64 / CLIENTS as f64 / self.seconds
        )
    }
}

/// How long before a beat a client's audio scheduler queues it (as the bench's `sim` does).
const SCHEDULE_AHEAD: u64 = 100 * MS;

/// A class on `profile` over `carrier` for 60 s with a 1 s outage on every path at 30 s: the
/// beat starts at 1 s and the teacher changes tempo or meter every 1 to 4 s, so every change
/// must reach every client within `lead - SCHEDULE_AHEAD`. See [`timing_of`].
fn timing_run(seed: u64, profile: fn(bool) -> Profile, carrier: &Carrier, lead_nanos: u64) -> Timing {
    let config = room::Config { lead_nanos, ..room::Config::default() };
    let mut rng = Rng::new(seed ^ 0x7e_a0);
    let mut changes = vec![(SEC, Change::Start { count_in_bars: 0 })];
    let mut at = 3 * SEC;
    while at < 58 * SEC {
        let change = if rng.chance(0.7) {
            Change::SetTempo(MicroBpm(rng.range(80e6, 160e6) as u32))
        } else {
            Change::SetMeter(rng.range(2.0, 7.0) as u8)
        };
        changes.push((at, change));
        at += (rng.range(1.0, 4.0) * SEC as f64) as u64;
    }
    let plan = Plan { config, changes, outages: vec![(30 * SEC, 31 * SEC)], end: 60 * SEC };
    timing_of(seed, profile, carrier, &plan)
}

/// A class's run: the room's settings, the teacher's changes, outages on every path (both
/// directions), and when it ends.
struct Plan {
    config: room::Config,
    changes: Vec<(u64, Change)>,
    outages: Vec<(u64, u64)>,
    end: u64,
}

/// Runs `plan` with 30 clients on `profile` (a third of them power-saving) over `carrier`,
/// measuring from 2 s. A (beat, client) pair is late when, `SCHEDULE_AHEAD` before the beat,
/// the client does not place it where the server does (its timeline is stale) or places it in
/// the past.
fn timing_of(seed: u64, profile: fn(bool) -> Profile, carrier: &Carrier, plan: &Plan) -> Timing {
    let mut sim = sim_with_config(seed, plan.config.clone(), CLIENTS, |i, _| {
        let mut p = profile(i % 10 < 3);
        p.up.outages.extend(&plan.outages);
        p.down.outages.extend(&plan.outages);
        p
    });
    for c in sim.clients_mut() {
        c.carrier = carrier.clone();
    }
    for &(at, change) in &plan.changes {
        sim.schedule_change(at, change);
    }
    let mut timing = Timing::default();
    // Per change asked so far: when, its epoch, and which clients hold it yet.
    let mut changes: Vec<(u64, u64, Vec<bool>)> = Vec::new();
    let step = 50 * MS;
    let mut t = 2 * SEC;
    while t < plan.end {
        sim.run_until(t);
        for (asked, applied) in &sim.change_results()[changes.len()..] {
            changes.push((
                *asked,
                applied.as_ref().expect("changes in range are accepted").epoch,
                vec![false; CLIENTS],
            ));
        }
        for (asked, epoch, held) in &mut changes {
            for (i, held) in held.iter_mut().enumerate().filter(|(_, h)| !**h) {
                if sim.clients()[i].client.timeline().is_some_and(|tl| tl.epoch() >= *epoch) {
                    *held = true;
                    timing.notice.push(t - *asked);
                }
            }
        }
        if t.is_multiple_of(100 * MS) {
            for i in 0..CLIENTS {
                // No estimate yet counts as the worst error.
                timing.errors.push(sim.offset_error_nanos(i).map_or(u64::MAX, i64::unsigned_abs));
            }
        }
        let server = sim.room().timeline().clone();
        let window = (ServerNanos(t + SCHEDULE_AHEAD), ServerNanos(t + SCHEDULE_AHEAD + step));
        for beat in server.beats_in(window.0, window.1) {
            let mut instants = Vec::new();
            for i in 0..CLIENTS {
                timing.beats += 1;
                let placed = sim.clients()[i].client.timeline().and_then(|tl| tl.time_of(beat.index));
                match sim.true_instant_of_beat(i, beat.index) {
                    Some(true_at) if placed == Some(beat.at) && true_at >= t => instants.push(true_at),
                    _ => {
                        timing.late += 1;
                        timing.late_by_clock += u64::from(placed == Some(beat.at));
                    }
                }
            }
            if let (Some(lo), Some(hi)) = (instants.iter().min(), instants.iter().max()) {
                timing.spreads.push(hi - lo);
            }
        }
        t += step;
    }
    timing.errors.sort_unstable();
    timing.spreads.sort_unstable();
    timing.notice.sort_unstable();
    for c in sim.clients() {
        timing.retransmissions += c.tcp_stats().retransmissions;
        timing.dropped += c.tcp_stats().dropped;
    }
    timing.frames = sim.clients().iter().map(|c| c.beat_frames_sent()).sum();
    timing.seconds = plan.end as f64 / SEC as f64;
    timing
}

fn timing_over(name: &str, seeds: &[u64], profile: fn(bool) -> Profile, carrier: &Carrier, lead: u64) -> Timing {
    let mut all = Timing::default();
    for &seed in seeds {
        all.add(timing_run(seed, profile, carrier, lead));
    }
    eprintln!("{}", all.line(&format!("{name}, lead {} ms", lead / MS)));
    all
}

const LEAD: u64 = 1_500 * MS;

#[test]
fn over_tcp_classroom_wifi_keeps_clock_error_onsets_and_late_beats_within_the_goals() {
    let tcp = Carrier::Tcp(TcpConfig::default());
    let datagrams =
        timing_over("classroom-wifi, datagrams", &[51, 52], Profile::classroom_wifi, &Carrier::Datagrams, LEAD);
    let over_tcp = timing_over("classroom-wifi, TCP", &[51, 52], Profile::classroom_wifi, &tcp, LEAD);
    assert!(over_tcp.retransmissions > 0, "the run exercised retransmission");
    for (name, t) in [("datagrams", &datagrams), ("TCP", &over_tcp)] {
        let (p99, spread) = (Timing::quantile(&t.errors, 0.99), Timing::quantile(&t.spreads, 0.99));
        assert!(p99 <= 2 * MS, "{name}: clock error p99 {p99} ns");
        assert!(spread <= 5 * MS, "{name}: onset spread p99 {spread} ns");
        assert!(t.late_fraction() <= 0.001, "{name}: {} late beats of {}", t.late, t.beats);
    }
}

#[test]
fn over_tcp_a_backed_up_server_keeps_only_the_newest_timing_messages() {
    // A send buffer of a few frames: through the outage and every retransmission the server
    // replaces waiting beat frames and sync replies instead of queueing them, and no beat is
    // late for it.
    let tcp = Carrier::Tcp(TcpConfig { send_buffer_bytes: 600, ..TcpConfig::default() });
    let t = timing_over("classroom-wifi, TCP, 600 B send buffer", &[55], Profile::classroom_wifi, &tcp, LEAD);
    assert!(t.dropped > 0, "the outbox replaced waiting messages");
    assert!(Timing::quantile(&t.errors, 0.99) <= 2 * MS);
    assert!(Timing::quantile(&t.spreads, 0.99) <= 5 * MS);
    assert!(t.late_fraction() <= 0.001, "{} late beats of {}", t.late, t.beats);
}

#[test]
fn over_tcp_congested_wifi_keeps_the_median_but_not_the_tail() {
    // Congested Wi-Fi's jitter (p99 ~750 ms one way) and 5 % loss hold a TCP stream up most of
    // the time: no exchange crosses fast for seconds after joining or after the outage, so the
    // tail misses the classroom goals that datagrams still meet.
    let tcp = Carrier::Tcp(TcpConfig::default());
    let datagrams = timing_over("congested, datagrams", &[53, 54], Profile::congested, &Carrier::Datagrams, LEAD);
    let over_tcp = timing_over("congested, TCP", &[53, 54], Profile::congested, &tcp, LEAD);
    assert!(Timing::quantile(&datagrams.errors, 0.99) <= 2 * MS);
    assert!(Timing::quantile(&datagrams.spreads, 0.99) <= 5 * MS);
    assert!(datagrams.late_fraction() <= 0.001);
    assert!(Timing::quantile(&over_tcp.errors, 0.5) <= MS, "TCP: median clock error");
    assert!(Timing::quantile(&over_tcp.spreads, 0.5) <= 5 * MS, "TCP: median onset spread");
    assert!(over_tcp.late_fraction() <= 0.03, "TCP: {} late beats of {}", over_tcp.late, over_tcp.beats);
}

/// The smallest lead with late beats within 0.1 % over TCP (run by hand: `--ignored`).
#[test]
#[ignore = "a sweep for the report, not a check"]
fn smallest_lead_over_tcp() {
    let tcp = Carrier::Tcp(TcpConfig::default());
    for (name, profile) in
        [("classroom-wifi", Profile::classroom_wifi as fn(bool) -> Profile), ("congested", Profile::congested)]
    {
        for lead_ms in [300, 500, 800, 1_000, 1_500, 2_000] {
            timing_over(&format!("{name}, TCP"), &[51, 52, 53], profile, &tcp, lead_ms * MS);
        }
    }
}

/// A lesson at the steady pace: the beat starts at 1 s, the teacher changes something only
/// three times in 90 s, and every path goes down for 1 s four times: once in the steady phase
/// with no change near, once starting right at a change, once straddling one, and once ending
/// where a change takes effect at the earliest (one lead after it is asked), which leaves the
/// fewest burst frames before it.
fn steady_lesson(config: room::Config) -> Plan {
    Plan {
        config,
        changes: vec![
            (SEC, Change::Start { count_in_bars: 0 }),
            (20 * SEC, Change::SetTempo(MicroBpm::from_bpm(96))),
            (45 * SEC, Change::SetTempo(MicroBpm(137_500_000))),
            (70 * SEC, Change::SetMeter(3)),
        ],
        outages: vec![
            (12 * SEC, 13 * SEC),
            (20 * SEC, 21 * SEC),
            (44_500 * MS, 45_500 * MS),
            (70_500 * MS, 71_500 * MS),
        ],
        end: 90 * SEC,
    }
}

/// The room's settings as before a member's sync requests named its timeline: a frame a second
/// once settled, running or stopped, which was what repaired a member that lost a change.
fn one_second() -> room::Config {
    room::Config { steady_send_interval_nanos: SEC, idle_send_interval_nanos: SEC, ..room::Config::default() }
}

/// The room's settings as before the steady pace: a frame every 100 ms while beats sound.
fn unpaced() -> room::Config {
    let config = room::Config::default();
    room::Config { steady_send_interval_nanos: config.send_interval_nanos, ..config }
}

#[test]
fn the_steady_pace_keeps_the_goals_through_outages_at_changes() {
    for (name, profile) in
        [("classroom-wifi", Profile::classroom_wifi as fn(bool) -> Profile), ("congested", Profile::congested)]
    {
        let seeds = [61, 62];
        let paced =
            timing_over_plan(&format!("{name}, steady pace"), &seeds, profile, &steady_lesson(Default::default()));
        let second =
            timing_over_plan(&format!("{name}, a frame a second"), &seeds, profile, &steady_lesson(one_second()));
        let before = timing_over_plan(&format!("{name}, every 100 ms"), &seeds, profile, &steady_lesson(unpaced()));
        let (p99, spread) = (Timing::quantile(&paced.errors, 0.99), Timing::quantile(&paced.spreads, 0.99));
        assert!(p99 <= 2 * MS, "{name}: clock error p99 {p99} ns");
        assert!(spread <= 5 * MS, "{name}: onset spread p99 {spread} ns");
        assert_eq!(paced.late, 0, "{name}: {} late beats of {}", paced.late, paced.beats);
        // Every change reached every client before it took effect, outages and all: from the
        // teacher asking to the client holding it, less than the lead less the scheduler's
        // look-ahead.
        let notice = Timing::quantile(&paced.notice, 1.0);
        assert!(notice < LEAD - SCHEDULE_AHEAD, "{name}: a change took {notice} ns to reach a client");
        assert_eq!(paced.notice.len(), 4 * CLIENTS * seeds.len(), "{name}: every client heard every change");
        // Over the whole lesson, bursts included (a change every 23 s or so, each announced for
        // 1.5 to 4 s), about a ninth of the frames sent every 100 ms, and about three fifths of
        // those sent once a second; a hundredth and a tenth once settled (see the next test).
        let ratio = before.frames as f64 / paced.frames as f64;
        assert!(ratio > 8.0, "{name}: {} frames paced, {} every 100 ms", paced.frames, before.frames);
        let ratio = second.frames as f64 / paced.frames as f64;
        assert!(ratio > 1.5, "{name}: {} frames paced, {} once a second", paced.frames, second.frames);
    }
}

fn timing_over_plan(name: &str, seeds: &[u64], profile: fn(bool) -> Profile, plan: &Plan) -> Timing {
    let mut all = Timing::default();
    for &seed in seeds {
        all.add(timing_of(seed, profile, &Carrier::Datagrams, plan));
    }
    eprintln!("{}", all.line(name));
    all
}

#[test]
fn a_settled_room_sends_each_member_a_frame_every_ten_seconds() {
    // Frames to each member in a 20 s window with no change near (the beat started at 1 s,
    // sounding from 2.5 s), and what client 0 received of them, per second.
    let count = |config: room::Config| {
        let mut sim = sim_with_config(71, config, CLIENTS, |i, _| Profile::classroom_wifi(i % 10 < 3));
        sim.schedule_change(SEC, Change::Start { count_in_bars: 0 });
        let sent = |sim: &Sim| sim.clients().iter().map(|c| c.beat_frames_sent()).sum::<u64>();
        sim.run_until(10 * SEC);
        let (before, received) = (sent(&sim), sim.clients()[0].client.stats().frames);
        sim.run_until(30 * SEC);
        let per_member = (sent(&sim) - before) as f64 / CLIENTS as f64 / 20.0;
        (per_member, (sim.clients()[0].client.stats().frames - received) as f64 / 20.0)
    };
    let (paced, paced_received) = count(room::Config::default());
    let (second, second_received) = count(one_second());
    let (before, before_received) = count(unpaced());
    eprintln!(
        "settled room: {paced:.2} frames per member per second ({paced_received:.2} received by client 0), \
         {second:.2} ({second_received:.2}) at 1 s, {before:.2} ({before_received:.2}) at 100 ms"
    );
    // No repairs among them: every member held the timeline since the start's burst.
    assert_eq!(paced, 0.1);
    assert_eq!(second, 1.0);
    assert_eq!(before, 10.0);
}

/// A class through a 4 s outage on every path that swallows a whole change: the tempo changes
/// at 20.5 s, effective at the downbeat a lead later (22.5 s), and every frame of its burst
/// is lost. The next tick is 10 s away; each member's first sync request after the outage
/// says it holds the old timeline, and the room sends it the new one at once.
#[test]
fn a_member_that_missed_a_whole_change_is_repaired_by_its_next_sync_request() {
    for (name, profile) in
        [("classroom-wifi", Profile::classroom_wifi as fn(bool) -> Profile), ("congested", Profile::congested)]
    {
        let (outage_end, mut repaired) = (24_500 * MS, Vec::new());
        for seed in [81, 82] {
            let mut sim = sim_with_config(seed, room::Config::default(), CLIENTS, |i, _| {
                let mut p = profile(i % 10 < 3);
                p.up.outages.push((20 * SEC, outage_end));
                p.down.outages.push((20 * SEC, outage_end));
                p
            });
            sim.schedule_change(SEC, Change::Start { count_in_bars: 0 });
            sim.schedule_change(20_500 * MS, Change::SetTempo(MicroBpm::from_bpm(100)));
            sim.run_until(outage_end);
            let epoch = sim.change_results()[1].1.as_ref().expect("accepted").epoch;
            assert!(
                sim.clients().iter().all(|c| c.client.timeline().is_some_and(|t| t.epoch() < epoch)),
                "{name}: the outage swallowed the change"
            );
            let mut held = vec![None; CLIENTS];
            let mut t = outage_end;
            while t < 30 * SEC {
                t += 10 * MS;
                sim.run_until(t);
                for (i, at) in held.iter_mut().enumerate().filter(|(_, h)| h.is_none()) {
                    if sim.clients()[i].client.timeline().is_some_and(|tl| tl.epoch() >= epoch) {
                        *at = Some(t - outage_end);
                    }
                }
            }
            repaired.extend(held.into_iter().map(|h| h.expect("every member repaired before the next tick")));
        }
        repaired.sort_unstable();
        let (median, worst) = (repaired[repaired.len() / 2], repaired[repaired.len() - 1]);
        eprintln!(
            "{name}: after a 4.5 s outage, a member held the change it missed within {} ms (median), {} ms (worst)",
            median / MS,
            worst / MS
        );
        // A sync request goes out at least every second (faster while replies were missing),
        // and a congested path's round trip has a long tail.
        assert!(worst <= 2 * SEC, "{name}: a member held the change {worst} ns after the outage");
    }
}

/// Clock sync of a class running `plan` on `profile` (a third of the clients power-saving,
/// every path down in the plan's outages) with clock-sync settings `clock`.
#[derive(Debug)]
struct SyncSchedule {
    /// Sync requests per client per second over the whole lesson.
    overall: f64,
    /// The same from [`SETTLED_FROM`] to the end.
    settled: f64,
    /// When the last client's clock came within 1 ms of the server's (100 ms steps).
    converged_by: u64,
    /// Absolute clock errors of every client, every 100 ms from 2 s, sorted.
    errors: Vec<u64>,
}

/// From 45 s: every clock settled more than half a minute before (on a noisy path the window
/// takes a minute to turn over from the fast samples it settled with, asking faster now and
/// then meanwhile), with two outages and two changes to go.
const SETTLED_FROM: u64 = 45 * SEC;

fn sync_schedule_of(seed: u64, profile: fn(bool) -> Profile, plan: &Plan, clock: &clock::Config) -> SyncSchedule {
    // The clocks and paths of `sim_with_config`, with the given clock settings.
    let mut rng = Rng::new(seed ^ 0xd0_57);
    let clients = (0..CLIENTS)
        .map(|i| {
            let mut p = profile(i % 10 < 3);
            p.up.outages.extend(&plan.outages);
            p.down.outages.extend(&plan.outages);
            (ClockModel::random(&mut rng, 500 * MS as i64, 100.0), p)
        })
        .collect();
    let mut sim = Sim::new(seed, plan.config.clone(), clock, MicroBpm::from_bpm(120), 4, clients);
    for &(at, change) in &plan.changes {
        sim.schedule_change(at, change);
    }
    let requests = |sim: &Sim| sim.clients().iter().map(|c| c.client.clock().requests_sent()).sum::<u64>() as f64;
    let per_client_second = |n: f64, seconds: u64| n / (CLIENTS as u64 * seconds) as f64;
    let (mut converged, mut errors) = (vec![None; CLIENTS], Vec::new());
    let mut settled_from = 0.0;
    let mut t = 100 * MS;
    while t <= plan.end {
        sim.run_until(t);
        for (i, at) in converged.iter_mut().enumerate() {
            let error = sim.offset_error_nanos(i).map_or(u64::MAX, i64::unsigned_abs);
            if at.is_none() && error <= MS {
                *at = Some(t);
            }
            if t >= 2 * SEC {
                errors.push(error);
            }
        }
        if t == SETTLED_FROM {
            settled_from = requests(&sim);
        }
        t += 100 * MS;
    }
    errors.sort_unstable();
    SyncSchedule {
        overall: per_client_second(requests(&sim), plan.end / SEC),
        settled: per_client_second(requests(&sim) - settled_from, (plan.end - SETTLED_FROM) / SEC),
        converged_by: converged.iter().map(|c| c.unwrap_or(u64::MAX)).max().unwrap_or(0),
        errors,
    }
}

#[test]
fn a_settled_clock_asks_far_less_often_on_noisy_paths_and_keeps_the_goals() {
    // The default schedule, which lets a noisy path settle once the drift is in hand (see
    // `clock::Config::settled_max_uncertainty_nanos`), against the one before it: only an
    // uncertainty within the target counted as settled, which a noisy path never reaches, so
    // it asked five times a second throughout.
    let slowing = clock::Config::default();
    let before = clock::Config { settled_max_uncertainty_nanos: 0, ..slowing.clone() };
    let plan = steady_lesson(room::Config::default());
    let seeds = [61, 62];
    for (name, profile) in [
        ("classroom-wifi", Profile::classroom_wifi as fn(bool) -> Profile),
        ("congested", Profile::congested),
        ("lan", |_| Profile::lan()),
    ] {
        let (mut now, mut then) = (Vec::new(), Vec::new());
        for &seed in &seeds {
            now.push(sync_schedule_of(seed, profile, &plan, &slowing));
            then.push(sync_schedule_of(seed, profile, &plan, &before));
        }
        let mean =
            |runs: &[SyncSchedule], f: fn(&SyncSchedule) -> f64| runs.iter().map(f).sum::<f64>() / runs.len() as f64;
        let p99 = |runs: &[SyncSchedule]| {
            let mut all: Vec<u64> = runs.iter().flat_map(|r| r.errors.iter().copied()).collect();
            all.sort_unstable();
            Timing::quantile(&all, 0.99)
        };
        let converged_by = now.iter().map(|r| r.converged_by).max().unwrap();
        let (settled, settled_before) = (mean(&now, |r| r.settled), mean(&then, |r| r.settled));
        eprintln!(
            "{name}: sync requests per client per second from {} s {settled:.2} ({settled_before:.2} before, {:.1}x \
             fewer), over the lesson {:.2} ({:.2} before); clock error p99 {} us ({} us before); every clock within \
             1 ms by {} ms",
            SETTLED_FROM / SEC,
            settled_before / settled,
            mean(&now, |r| r.overall),
            mean(&then, |r| r.overall),
            p99(&now) / 1_000,
            p99(&then) / 1_000,
            converged_by / MS
        );
        assert!(converged_by < 2 * SEC, "{name}: converged by {converged_by} ns");
        if name == "lan" {
            // Within the target as before: the same steady second.
            assert!(settled <= 1.1 && settled_before <= 1.1, "{name}: {settled}, {settled_before} before");
            assert!(p99(&now) <= 50_000, "{name}: clock error p99 {} ns", p99(&now));
            continue;
        }
        assert!(
            settled_before / settled >= 2.5,
            "{name}: {settled} requests a second settled, {settled_before} before"
        );
        // And the goals hold with the slower pace, outages at changes and all.
        let timing = timing_over_plan(&format!("{name}, slower sync"), &seeds, profile, &plan);
        let (error, spread) = (Timing::quantile(&timing.errors, 0.99), Timing::quantile(&timing.spreads, 0.99));
        assert!(error <= MS, "{name}: clock error p99 {error} ns");
        assert!(spread <= 2 * MS, "{name}: onset spread p99 {spread} ns");
        assert_eq!(timing.late, 0, "{name}: {} late beats of {}", timing.late, timing.beats);
    }
}
