//! Downbeat over WebSocket in the benchmark's sync and onset scenarios, end to end: the real
//! server binary, the class helper's native clients on `ws://…/api/ws`, on plain loopback and
//! through the packet emulator's classroom-wifi profile (where the WebSocket's TCP must cross
//! the emulated paths, as the QUIC datagrams do). A correctness smoke of the harness: every
//! student joined and synced, no beat late or missing, a finite clock error; never how fast.
//! (`downbeat-bench all --smoke` in scripts/test runs both transports in every scenario and
//! only checks that figures exist.) Then the capacity scenario's join deadline, with native
//! and with light clients, and the light load generator holding a small school.
//!
//! Needs the `downbeat` server binary beside the test (`cargo build -p downbeat-server`; a
//! workspace test run builds it) and, for classroom-wifi, root, /dev/net/tun and iproute2
//! (CI runs as root). Without them it fails and says so: it never skips.

use downbeat_bench::metrics::{RunReport, SystemResult};
use downbeat_bench::scenarios::{self, Common, System, Workload};

const STUDENTS: usize = 4;

fn common(profile: &str, netem_id: u8, out: &std::path::Path) -> Common {
    Common {
        profile: profile.into(),
        systems: vec![System::DOWNBEAT_WEBSOCKET],
        seed: 1,
        netem_id,
        out: out.to_path_buf(),
        command: "bench/tests/downbeat.rs".into(),
        bench_binary: env!("CARGO_BIN_EXE_downbeat-bench").into(),
        join_deadline: downbeat_bench::downbeat::class::default_join_deadline(),
    }
}

fn workload() -> Workload {
    Workload { rooms: 1, students: STUDENTS, seconds: 3.0, bpm: 120, notes_per_second: 0.0, outage_at: None }
}

fn metric(system: &SystemResult, key: &str) -> f64 {
    let m = system.metrics.iter().find(|m| m.key == key).unwrap_or_else(|| panic!("no metric {key}"));
    m.value.unwrap_or_else(|| panic!("{key} has no value"))
}

/// The one system of `report`, checked to be Downbeat over WebSocket with everyone joined
/// (a student counts as joined once its clock synced), over the emulator when `emulated`.
fn websocket(report: &RunReport, emulated: bool) -> &SystemResult {
    assert_eq!(report.systems.len(), 1);
    let system = &report.systems[0];
    assert_eq!((system.system.as_str(), system.display.as_str()), ("downbeat-websocket", "Downbeat (WebSocket)"));
    let extra = &system.extra;
    assert_eq!(extra["transport"], "websocket");
    let url = extra["url"].as_str().expect("the url");
    assert!(url.starts_with("ws://") && url.ends_with("/api/ws"), "{url}");
    assert_eq!(extra["students"], STUDENTS, "{extra}");
    assert_eq!(extra["joined"], STUDENTS, "every student joined and synced: {}", extra["join_errors"]);
    if emulated {
        // Only this run's sessions crossed the emulator: the WebSocket's TCP, both ways.
        assert!(url.starts_with("ws://10.78."), "{url}");
        for dir in ["up", "down"] {
            let forwarded = extra["netem"][dir]["forwarded"].as_u64().unwrap_or(0);
            assert!(forwarded > 100, "{dir}: {forwarded} packets crossed the emulator");
        }
    } else {
        assert!(extra["netem"].is_null());
    }
    system
}

fn sync_and_onset(profile: &str, netem_id: u8) {
    let out = tempfile::tempdir().expect("a directory for the reports");
    let common = common(profile, netem_id, out.path());
    let emulated = profile != "loopback";

    let report = scenarios::sync(&common, &workload()).unwrap_or_else(|e| panic!("sync on {profile}: {e:#}"));
    let system = websocket(&report, emulated);
    let (p50, p99) = (metric(system, "offset_error_p50_ms"), metric(system, "offset_error_p99_ms"));
    assert!(p50.is_finite() && p99.is_finite() && p50 <= p99, "clock error p50 {p50} ms, p99 {p99} ms");
    // A sanity bound, not a goal: an unsynced clock is off by up to the injected 500 ms.
    assert!(p99 < 50.0, "clock error p99 {p99} ms");
    assert!(!system.distributions["offset_error_ms"].is_empty());

    let report = scenarios::onset(&common, &workload()).unwrap_or_else(|e| panic!("onset on {profile}: {e:#}"));
    let system = websocket(&report, emulated);
    let extra = &system.extra;
    assert!(extra["beats_checked"].as_u64().unwrap_or(0) >= (STUDENTS * 4) as u64, "{extra}");
    assert_eq!(extra["beats_late"], 0, "{extra}");
    assert_eq!(extra["beats_missing"], 0, "{extra}");
    assert_eq!(metric(system, "late_beats_percent"), 0.0);
    let spread = metric(system, "onset_spread_p99_ms");
    assert!(spread.is_finite() && spread < 50.0, "onset spread p99 {spread} ms");
}

#[test]
fn websocket_sync_and_onset_on_loopback() {
    sync_and_onset("loopback", 0);
}

#[test]
fn websocket_sync_and_onset_through_classroom_wifi() {
    sync_and_onset("classroom-wifi", 210);
}

/// A capacity run whose sessions cannot all join in time (here: a deadline already passed
/// when the join storm begins, since no QUIC handshake completes before the first poll) ends
/// by itself: the sessions still joining are given up and counted, the server is measured
/// with what is up, and a report comes back instead of a run that waits forever.
#[test]
fn a_capacity_run_past_its_join_deadline_ends_with_the_figures_it_has() {
    let out = tempfile::tempdir().expect("a directory for the reports");
    let common = Common {
        systems: vec![System::DOWNBEAT],
        join_deadline: std::time::Duration::ZERO,
        ..common("loopback", 41, out.path())
    };
    let plan = scenarios::CapacityPlan::new(60, 0.5, scenarios::Clients::Native);
    let report = scenarios::capacity(&common, &plan).unwrap_or_else(|e| panic!("capacity: {e:#}"));
    assert_eq!(report.systems.len(), 1);
    let extra = &report.systems[0].extra;
    assert_eq!((extra["students"].as_u64(), extra["joined"].as_u64()), (Some(60), Some(0)), "{extra}");
    let errors = extra["join_errors"].as_array().expect("join errors");
    assert!(errors.iter().any(|e| e.as_str().is_some_and(|e| e.contains("60 sessions still joining"))), "{errors:?}");
}

/// The light load generator holds every session of a small capacity run: each student is
/// welcomed and synced, beat frames arrive, clock sync flows while the server is measured,
/// the clients' CPU is measured apart from the server's, and the point's figures are in the
/// JSON.
#[test]
fn light_clients_hold_every_session_with_beats_flowing() {
    let out = tempfile::tempdir().expect("a directory for the reports");
    let common = Common { systems: vec![System::DOWNBEAT], ..common("loopback", 42, out.path()) };
    let plan = scenarios::CapacityPlan::new(60, 2.0, scenarios::Clients::Light);
    let report = scenarios::capacity(&common, &plan).unwrap_or_else(|e| panic!("capacity: {e:#}"));
    assert_eq!(report.systems.len(), 1);
    let system = &report.systems[0];
    let extra = &system.extra;
    assert_eq!(extra["clients"], "light", "{extra}");
    assert_eq!((extra["students"].as_u64(), extra["joined"].as_u64()), (Some(60), Some(60)), "{extra}");
    // 60 students and 2 teachers.
    assert_eq!(metric(system, "sessions_held"), 62.0);
    let point = &extra["points"][0];
    assert_eq!(point["synced"].as_i64(), Some(62), "{point}");
    // Every session gets a frame of its own on joining, then the start's burst; a settled room
    // sends one every 10 s, so a 2 s window may see none: count them all.
    let frames = point["frames_received"].as_u64().unwrap_or(0);
    assert!(frames >= 62, "{frames} beat frames: {point}");
    // Clock sync goes on in the window (a request and a reply a second per settled session).
    assert!(point["datagrams_per_s"].as_f64().unwrap_or(0.0) >= 62.0, "{point}");
    assert!(metric(system, "generator_cpu_percent").is_finite());
    assert!(metric(system, "server_cpu_percent") > 0.0);
    // The pace the sessions kept, and where each side could run.
    assert!(point["sync_requests_per_session_s"].as_f64().unwrap_or(0.0) > 0.0, "{point}");
    assert!(!point["server_cpus"].as_str().unwrap_or("").is_empty(), "{point}");
    assert!(!point["generator_cpus"].as_str().unwrap_or("").is_empty(), "{point}");
    // Each side's socket drops, counted apart (a small school drops nothing).
    assert_eq!(
        (point["server_udp_drops"].as_u64(), point["generator_udp_drops"].as_u64()),
        (Some(0), Some(0)),
        "{point}"
    );
}

/// A server started on processors of its own (`ServerOptions::cpus`, `BENCH_SERVER_CPUS`)
/// runs on them alone, and serves.
#[test]
fn a_server_given_a_processor_runs_on_it_alone() {
    use downbeat_bench::downbeat::{ServerLimits, ServerOptions, ServerProcess};
    let server = ServerProcess::start_with(ServerOptions {
        limits: ServerLimits::default(),
        http_host: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        data_dir: None,
        settings: String::new(),
        cpus: Some("0".into()),
    })
    .unwrap_or_else(|e| panic!("starting the server on processor 0: {e:#}"));
    assert_eq!(downbeat_bench::machine::cpus_allowed(Some(server.pid())), "0");
    assert!(server.metrics().expect("its metrics").contains_key("downbeat_sessions_active"));
}

/// A light capacity run whose deadline passed before any session could join ends by itself
/// with what it has: every session given up and counted, a report rather than a hang.
#[test]
fn a_light_capacity_run_past_its_join_deadline_ends_with_the_figures_it_has() {
    let out = tempfile::tempdir().expect("a directory for the reports");
    let common = Common {
        systems: vec![System::DOWNBEAT],
        join_deadline: std::time::Duration::ZERO,
        ..common("loopback", 43, out.path())
    };
    let plan = scenarios::CapacityPlan::new(60, 0.5, scenarios::Clients::Light);
    let report = scenarios::capacity(&common, &plan).unwrap_or_else(|e| panic!("capacity: {e:#}"));
    let extra = &report.systems[0].extra;
    assert_eq!((extra["students"].as_u64(), extra["joined"].as_u64()), (Some(60), Some(0)), "{extra}");
    let errors = extra["join_errors"].as_array().expect("join errors");
    assert!(errors.iter().any(|e| e.as_str().is_some_and(|e| e.contains("62 sessions still joining"))), "{errors:?}");
    assert_eq!(extra["points"][0]["deadline_passed"], true);
}
