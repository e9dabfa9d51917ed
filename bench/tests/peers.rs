//! The peer runner end to end on plain loopback (no emulator, no root): each peer server is
//! started, `client.mjs` runs a short class against it, and its JSON is read and turned into
//! figures. A correctness smoke of the runner: it checks what happened, never how fast. The
//! timesync peer's students also sync their clocks (about 4 s) and schedule ahead.
//!
//! Needs Node.js 20+ and `cd bench/peers && npm ci` (scripts/test does both before nextest).
//! Without them it fails and says so: it never skips.

use std::net::{IpAddr, Ipv4Addr};
use std::thread;

use downbeat_bench::metrics::SystemResult;
use downbeat_bench::peers::{
    ClientRun, PeerKind, PeerRun, PeerServer, fanout_result, join_result, onset_result, sync_result,
};

const CLIENTS: usize = 4;

fn value(r: &SystemResult, key: &str) -> Option<f64> {
    r.metrics.iter().find(|m| m.key == key).unwrap_or_else(|| panic!("{}: no metric {key}", r.system)).value
}

fn run_class(kind: PeerKind) -> PeerRun {
    let server = PeerServer::start(kind, IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap_or_else(|e| panic!("{kind}: {e:#}"));
    assert!(server.port() != 0 && server.pid() != 0);
    assert_eq!(server.url(), format!("http://127.0.0.1:{}", server.port()));
    let mut client = ClientRun::new(kind, server.url());
    client.clients = CLIENTS;
    client.seconds = 3.0;
    client.bpm = 120.0;
    client.notes_per_second = 2.0;
    let run = client.run(None).unwrap_or_else(|e| panic!("{kind}: {e:#}"));
    let status = server.stop().unwrap_or_else(|e| panic!("{kind}: {e:#}"));
    assert!(status.success(), "{kind}: the server exited with {status} on SIGTERM");
    run
}

fn check(kind: PeerKind, run: &PeerRun) {
    assert_eq!(run.peer, kind);
    assert_eq!(run.clients, CLIENTS);
    assert!(run.connect_errors.is_empty(), "{kind}: {:?}", run.connect_errors);
    assert!(run.connect_ms.iter().all(Option::is_some), "{kind}: {:?}", run.connect_ms);
    let (started, stopped) = (run.started_ns.expect("started"), run.stopped_ns.expect("stopped"));
    assert!(started < stopped);

    // Beats: numbered from 0, sent within the run (the timesync peer's up to one lead ahead of
    // their instant, and the last ones after the stop, which ends the timeline one lead on),
    // and at least 4 of them reached everyone.
    assert_eq!(run.beats.first().map(|b| b.index), Some(0), "{kind}");
    if kind.schedules_ahead() {
        for b in &run.beats {
            let at = b.at_ns.unwrap_or_else(|| panic!("{kind}: beat {} has no instant", b.index));
            assert!(b.server_sent_ns >= started && b.server_sent_ns < at, "{kind}: beat {}", b.index);
            assert!(at - b.server_sent_ns <= 1_500_000_000, "{kind}: beat {} sent over a lead early", b.index);
        }
        // Every student scheduled the beats that sound within the run.
        let sounding: Vec<_> = run.beats.iter().filter(|b| b.at_ns.is_some_and(|at| at <= stopped)).collect();
        assert!(sounding.len() >= 2, "{kind}: {} beats sound within the run", sounding.len());
        for b in sounding {
            assert!(b.onsets_ns.iter().all(Option::is_some), "{kind}: beat {} not scheduled by all", b.index);
        }
    } else {
        assert!(run.beats.iter().all(|b| (started..=stopped).contains(&b.server_sent_ns)), "{kind}");
    }
    let everywhere = run.beats.iter().filter(|b| b.arrivals_ns.iter().all(Option::is_some)).count();
    assert!(everywhere >= 4, "{kind}: only {everywhere} of {} beats reached every student", run.beats.len());
    for b in &run.beats {
        for a in b.arrivals_ns.iter().flatten() {
            assert!(*a >= b.server_sent_ns, "{kind}: beat {} arrived before it was sent", b.index);
        }
    }

    // Notes: every one reached the other students and was not echoed to its sender.
    assert!(!run.notes.is_empty(), "{kind}: no notes");
    for note in &run.notes {
        let sender = run.position_of(note.from).expect("a student of this run");
        let sent = note.sent_ns.expect("sent_ns");
        for (i, arrival) in note.arrivals_ns.iter().enumerate() {
            if i == sender {
                assert_eq!(*arrival, None, "{kind}: note {}:{} echoed to its sender", note.from, note.seq);
            } else {
                let a = arrival.unwrap_or_else(|| panic!("{kind}: note {}:{} missed student {i}", note.from, note.seq));
                assert!(a >= sent, "{kind}: note arrived before it was sent");
            }
        }
    }

    // The figures exist (their size is not this test's business).
    let sync = sync_result(run);
    let onset = onset_result(run);
    let fanout = fanout_result(run);
    let join = join_result(run);
    for r in [&sync, &onset, &fanout, &join] {
        assert_eq!((r.system.as_str(), r.display.as_str()), (kind.name(), kind.display()));
    }
    for key in ["onset_spread_p50_ms", "onset_spread_p99_ms", "onset_spread_max_ms"] {
        assert!(value(&onset, key).is_some(), "{kind}: {key} missing");
    }
    // A server timer's drift is the arrival peers' figure; the timesync peer computes instants.
    assert_eq!(value(&onset, "server_drift_ms").is_some(), !kind.schedules_ahead(), "{kind}");
    assert_eq!(value(&onset, "late_beats_percent").map(f64::is_finite), Some(true));
    for key in ["fanout_p50_ms", "fanout_p99_ms", "fanout_p999_ms", "playout_spread_p99_ms"] {
        assert!(value(&fanout, key).is_some(), "{kind}: {key} missing");
    }
    assert_eq!(fanout.extra["deliveries_lost"], 0, "{kind}");
    if kind.schedules_ahead() {
        // Notes that arrive after their playAt are not played in sync: not in the latencies.
        let late = fanout.extra["deliveries_late"].as_u64().expect("a count") as usize;
        assert_eq!(fanout.distributions["fanout_ms"].len() + late, run.notes.len() * (CLIENTS - 1), "{kind}");
        assert!(value(&sync, "offset_error_p50_ms").is_some(), "{kind}");
        assert!(value(&join, "synced_all_ms").is_some(), "{kind}");
    } else {
        assert_eq!(value(&fanout, "notes_lost_percent"), Some(0.0), "{kind}");
        assert_eq!(fanout.distributions["fanout_ms"].len(), run.notes.len() * (CLIENTS - 1), "{kind}");
        assert!(value(&sync, "offset_error_p50_ms").is_some(), "{kind}");
        assert_eq!(value(&sync, "converged_s"), None);
    }
    assert!(value(&join, "join_all_ms").is_some());
    assert_eq!(value(&join, "join_failures"), Some(0.0));
}

#[test]
fn every_peer_runs_a_short_class_on_loopback() {
    let runs: Vec<(PeerKind, thread::Result<PeerRun>)> = thread::scope(|s| {
        let handles: Vec<_> = PeerKind::ALL.map(|kind| (kind, s.spawn(move || run_class(kind)))).into();
        handles.into_iter().map(|(kind, h)| (kind, h.join())).collect()
    });
    for (kind, run) in runs {
        let run = run.unwrap_or_else(|e| std::panic::resume_unwind(e));
        check(kind, &run);
    }
}

#[test]
fn a_client_that_cannot_connect_fails_with_its_stderr() {
    // A port nobody listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    for kind in PeerKind::ALL {
        let mut client = ClientRun::new(kind, format!("http://127.0.0.1:{port}"));
        client.clients = 2;
        client.seconds = 1.0;
        let err = format!("{:#}", client.run(None).expect_err("nothing to connect to"));
        assert!(err.contains("failed") && err.contains("no student could connect"), "{kind}: {err}");
    }
}
