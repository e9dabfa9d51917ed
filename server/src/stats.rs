//! Server-wide counters, rendered for Prometheus by `GET /metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use downbeat_protocol::ErrorCode;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Subtracts one, stopping at zero.
    pub fn dec(&self) {
        let _ = self.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Sets the value.
    pub fn set(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }
}

/// Number of slots for per-code counts: every known code plus one for unknown codes.
const CODE_SLOTS: usize = ErrorCode::ALL.len() + 1;

/// Counts per [`ErrorCode`].
#[derive(Debug)]
pub struct CodeCounters([Counter; CODE_SLOTS]);

impl Default for CodeCounters {
    fn default() -> Self {
        Self(std::array::from_fn(|_| Counter::default()))
    }
}

impl CodeCounters {
    fn slot(code: ErrorCode) -> usize {
        // Known codes are dense from 1 (checked by the protocol's tests); anything else shares
        // the last slot.
        let n = usize::from(code.as_u16());
        if (1..CODE_SLOTS).contains(&n) && !matches!(code, ErrorCode::Unknown(_)) { n - 1 } else { CODE_SLOTS - 1 }
    }

    /// Adds one for `code`.
    pub fn inc(&self, code: ErrorCode) {
        self.0[Self::slot(code)].inc();
    }

    /// The count for `code`.
    pub fn get(&self, code: ErrorCode) -> u64 {
        self.0[Self::slot(code)].get()
    }

    fn total(&self) -> u64 {
        self.0.iter().map(Counter::get).sum()
    }
}

/// Upper bounds of the histogram buckets, in microseconds.
const BUCKETS_MICROS: [u64; 12] = [50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000];

/// A histogram of durations with fixed buckets from 50 µs to 250 ms, rendered in seconds.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per-bucket counts (not cumulative); the last slot is above every bound.
    buckets: [Counter; BUCKETS_MICROS.len() + 1],
    sum_micros: Counter,
    count: Counter,
}

impl Histogram {
    /// Records one value in microseconds.
    pub fn observe_micros(&self, micros: u32) {
        let micros = u64::from(micros);
        let slot = BUCKETS_MICROS.iter().position(|b| micros <= *b).unwrap_or(BUCKETS_MICROS.len());
        self.buckets[slot].inc();
        self.sum_micros.add(micros);
        self.count.inc();
    }

    /// Number of values recorded.
    pub fn count(&self) -> u64 {
        self.count.get()
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP downbeat_{name} {help}");
        let _ = writeln!(out, "# TYPE downbeat_{name} histogram");
        let mut cumulative = 0;
        for (bound, bucket) in BUCKETS_MICROS.iter().zip(&self.buckets) {
            cumulative += bucket.get();
            let _ = writeln!(out, "downbeat_{name}_bucket{{le=\"{}\"}} {cumulative}", *bound as f64 / 1e6);
        }
        cumulative += self.buckets[BUCKETS_MICROS.len()].get();
        let _ = writeln!(out, "downbeat_{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "downbeat_{name}_sum {}", self.sum_micros.get() as f64 / 1e6);
        let _ = writeln!(out, "downbeat_{name}_count {}", self.count.get());
    }
}

/// Everything the server counts. Shared as `Arc<Stats>`; every update is one relaxed atomic.
#[derive(Debug, Default)]
pub struct Stats {
    /// WebTransport sessions open now.
    pub sessions_active: Gauge,
    /// The host's `CLOCK_MONOTONIC` in nanoseconds at server time zero (0 where unknown).
    pub clock_zero_monotonic_nanos: Gauge,
    /// WebTransport sessions accepted since start.
    pub sessions_total: Counter,
    /// Connection attempts refused at a capacity limit (handshakes or sessions).
    pub handshakes_refused: Counter,
    /// Sessions whose hello was refused, by code.
    pub hello_failures: CodeCounters,
    /// Datagrams received from clients.
    pub datagrams_received: Counter,
    /// Received datagrams that did not decode (dropped).
    pub datagrams_malformed: Counter,
    /// Received datagrams dropped by a session's rate limit.
    pub datagrams_rate_limited: Counter,
    /// Datagrams handed to QUIC for sending.
    pub datagrams_sent: Counter,
    /// Datagrams QUIC refused (peer gone, datagrams unsupported, too large).
    pub datagrams_send_failed: Counter,
    /// Beat frames sent.
    pub beat_frames_sent: Counter,
    /// Beat frames that had to lose beats to fit the path's datagram size.
    pub beat_frames_trimmed: Counter,
    /// Clock-sync replies sent.
    pub sync_replies_sent: Counter,
    /// Control frames that did not decode (the session is closed).
    pub frames_malformed: Counter,
    /// Control frames whose header declared a body over the cap (the session is closed).
    pub frames_too_large: Counter,
    /// Members disconnected because their control queue was full.
    pub slow_members_dropped: Counter,
    /// Rooms open now.
    pub rooms_active: Gauge,
    /// Rooms created since start.
    pub rooms_created: Counter,
    /// Timeline changes applied.
    pub changes_applied: Counter,
    /// Teacher controls applied (timeline changes included).
    pub controls_applied: Counter,
    /// Requests refused (hellos, controls, HTTP), by code.
    pub refused: CodeCounters,
    /// Sessions closed for repeatedly exceeding a rate limit.
    pub sessions_closed_for_abuse: Counter,
    /// Seats taken over by a new session of the same person while the old one was open.
    pub sessions_replaced: Counter,
    /// Seats resumed within the grace period after a lost connection.
    pub seats_resumed: Counter,
    /// Seats freed because the grace period ended.
    pub seats_expired: Counter,
    /// Note datagrams received.
    pub note_datagrams_received: Counter,
    /// New notes accepted and fanned out.
    pub notes_accepted: Counter,
    /// Redundant copies of notes already handled.
    pub notes_duplicate: Counter,
    /// Note datagrams refused, by code (muted, rate limited, out of range, room busy).
    pub notes_dropped: CodeCounters,
    /// Notes not forwarded.
    pub notes_dropped_total: Counter,
    /// Note frames sent to receivers.
    pub note_frames_sent: Counter,
    /// Notes clients reported scheduled on time.
    pub notes_played_reported: Counter,
    /// Notes clients reported arriving after their playout instant.
    pub notes_late_reported: Counter,
    /// Clients' reported round-trip times.
    pub sync_rtt: Histogram,
    /// Clients' reported clock-offset uncertainty (a bound on the sync error).
    pub sync_uncertainty: Histogram,
    /// SEL write jobs waiting for the database.
    pub sel_queued: Gauge,
    /// 1 while the SEL database is failing writes, else 0.
    pub sel_degraded: Gauge,
    /// SEL transactions committed.
    pub sel_commits: Counter,
    /// SEL transactions that failed (and were retried).
    pub sel_write_failures: Counter,
    /// Reflections committed.
    pub reflections_saved: Counter,
    /// Reflections refused with `store_unavailable` because the queue was full.
    pub reflections_refused: Counter,
    /// Participation events lost because the queue stayed full as a room closed.
    pub participation_dropped: Counter,
    /// SEL rows deleted by the retention purge.
    pub sel_rows_purged: Counter,
}

impl Stats {
    /// Renders every metric in the Prometheus text exposition format (version 0.0.4).
    pub fn render_prometheus(&self) -> String {
        let mut out = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            // Writing to a String cannot fail.
            let _ = writeln!(out, "# HELP downbeat_{name} {help}");
            let _ = writeln!(out, "# TYPE downbeat_{name} {kind}");
            let _ = writeln!(out, "downbeat_{name} {value}");
        };
        metric("sel_queued", "gauge", "SEL write jobs waiting for the database.", self.sel_queued.get());
        metric("sel_degraded", "gauge", "1 while the SEL database is failing writes.", self.sel_degraded.get());
        metric("sel_commits_total", "counter", "SEL transactions committed.", self.sel_commits.get());
        metric(
            "sel_write_failures_total",
            "counter",
            "SEL transactions that failed and were retried.",
            self.sel_write_failures.get(),
        );
        metric("reflections_saved_total", "counter", "Reflections committed.", self.reflections_saved.get());
        metric(
            "reflections_refused_total",
            "counter",
            "Reflections refused with store_unavailable (queue full).",
            self.reflections_refused.get(),
        );
        metric(
            "participation_dropped_total",
            "counter",
            "Participation events lost because the SEL queue stayed full as a room closed.",
            self.participation_dropped.get(),
        );
        metric("sel_rows_purged_total", "counter", "SEL rows deleted by retention.", self.sel_rows_purged.get());
        metric("sessions_active", "gauge", "WebTransport sessions open now.", self.sessions_active.get());
        metric(
            "clock_zero_monotonic_nanoseconds",
            "gauge",
            "The host's CLOCK_MONOTONIC reading in ns at which server time is zero (for benchmarks on the host).",
            self.clock_zero_monotonic_nanos.get(),
        );
        metric("sessions_total", "counter", "WebTransport sessions accepted.", self.sessions_total.get());
        metric(
            "handshakes_refused_total",
            "counter",
            "Connection attempts refused at a capacity limit.",
            self.handshakes_refused.get(),
        );
        metric("hello_failures_total", "counter", "Sessions whose hello was refused.", self.hello_failures.total());
        metric("datagrams_received_total", "counter", "Datagrams received.", self.datagrams_received.get());
        metric(
            "datagrams_malformed_total",
            "counter",
            "Received datagrams that did not decode.",
            self.datagrams_malformed.get(),
        );
        metric(
            "datagrams_rate_limited_total",
            "counter",
            "Received datagrams dropped by the per-session rate limit.",
            self.datagrams_rate_limited.get(),
        );
        metric("datagrams_sent_total", "counter", "Datagrams sent.", self.datagrams_sent.get());
        metric(
            "datagrams_send_failed_total",
            "counter",
            "Datagrams that could not be sent.",
            self.datagrams_send_failed.get(),
        );
        metric("beat_frames_sent_total", "counter", "Beat frames sent.", self.beat_frames_sent.get());
        metric(
            "beat_frames_trimmed_total",
            "counter",
            "Beat frames shortened to fit the datagram size.",
            self.beat_frames_trimmed.get(),
        );
        metric("sync_replies_sent_total", "counter", "Clock-sync replies sent.", self.sync_replies_sent.get());
        metric("frames_malformed_total", "counter", "Control frames that did not decode.", self.frames_malformed.get());
        metric("frames_too_large_total", "counter", "Control frames over the size cap.", self.frames_too_large.get());
        metric(
            "slow_members_dropped_total",
            "counter",
            "Members disconnected for a full control queue.",
            self.slow_members_dropped.get(),
        );
        metric("rooms_active", "gauge", "Rooms open now.", self.rooms_active.get());
        metric("rooms_created_total", "counter", "Rooms created.", self.rooms_created.get());
        metric("changes_applied_total", "counter", "Timeline changes applied.", self.changes_applied.get());
        metric("controls_applied_total", "counter", "Teacher controls applied.", self.controls_applied.get());
        metric(
            "sessions_closed_for_abuse_total",
            "counter",
            "Sessions closed for repeatedly exceeding a rate limit.",
            self.sessions_closed_for_abuse.get(),
        );
        metric(
            "sessions_replaced_total",
            "counter",
            "Seats taken over by a new session of the same person.",
            self.sessions_replaced.get(),
        );
        metric("seats_resumed_total", "counter", "Seats resumed within the grace period.", self.seats_resumed.get());
        metric("seats_expired_total", "counter", "Seats freed after the grace period.", self.seats_expired.get());
        metric(
            "note_datagrams_received_total",
            "counter",
            "Note datagrams received.",
            self.note_datagrams_received.get(),
        );
        metric("notes_accepted_total", "counter", "Notes accepted and fanned out.", self.notes_accepted.get());
        metric("notes_duplicate_total", "counter", "Redundant note copies ignored.", self.notes_duplicate.get());
        metric("notes_dropped_total", "counter", "Notes not forwarded.", self.notes_dropped_total.get());
        metric("note_frames_sent_total", "counter", "Note frames sent to receivers.", self.note_frames_sent.get());
        metric(
            "notes_played_reported_total",
            "counter",
            "Notes clients reported scheduled on time.",
            self.notes_played_reported.get(),
        );
        metric(
            "notes_late_reported_total",
            "counter",
            "Notes clients reported arriving after their playout instant.",
            self.notes_late_reported.get(),
        );
        self.sync_rtt.render(&mut out, "sync_rtt_seconds", "Round-trip times clients report.");
        self.sync_uncertainty.render(
            &mut out,
            "sync_uncertainty_seconds",
            "Clock-offset uncertainty clients report (a bound on their sync error).",
        );
        by_code(&mut out, "refused_total", "Requests refused, by error code.", &self.refused);
        by_code(
            &mut out,
            "note_datagrams_refused_total",
            "Note datagrams refused, by error code.",
            &self.notes_dropped,
        );

        by_code(&mut out, "hello_failures_by_code_total", "Refused hellos by error code.", &self.hello_failures);
        out
    }
}

fn by_code(out: &mut String, name: &str, help: &str, counters: &CodeCounters) {
    let _ = writeln!(out, "# HELP downbeat_{name} {help}");
    let _ = writeln!(out, "# TYPE downbeat_{name} counter");
    for code in ErrorCode::ALL {
        let n = counters.get(*code);
        if n > 0 {
            let _ = writeln!(out, "downbeat_{name}{{code=\"{}\"}} {n}", code.as_str());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_has_a_type_line_per_metric() {
        let stats = Stats::default();
        stats.sessions_active.inc();
        stats.sessions_active.inc();
        stats.sessions_active.dec();
        stats.datagrams_malformed.add(3);
        stats.hello_failures.inc(ErrorCode::Unauthorized);
        stats.hello_failures.inc(ErrorCode::Unauthorized);
        stats.hello_failures.inc(ErrorCode::Unknown(999));
        let text = stats.render_prometheus();

        assert!(text.contains("# TYPE downbeat_sessions_active gauge\ndownbeat_sessions_active 1\n"), "{text}");
        assert!(
            text.contains("# TYPE downbeat_datagrams_malformed_total counter\ndownbeat_datagrams_malformed_total 3\n")
        );
        assert!(text.contains("downbeat_hello_failures_by_code_total{code=\"unauthorized\"} 2\n"));
        assert!(text.contains("downbeat_hello_failures_total 3\n"));
        // Every sample line belongs to a metric declared with a TYPE line just before it.
        let mut declared = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split(' ');
                declared = parts.next().map(str::to_owned);
                assert!(matches!(parts.next(), Some("counter" | "gauge" | "histogram")), "{line}");
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let declared = declared.as_deref().unwrap();
                let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
                assert!(name == declared || base == declared, "{line}");
                let value = line.rsplit(' ').next().unwrap();
                value.parse::<f64>().unwrap();
            }
        }
        // Histograms are cumulative, in seconds.
        let stats = Stats::default();
        for micros in [40, 700, 700, 300_000] {
            stats.sync_rtt.observe_micros(micros);
        }
        let text = stats.render_prometheus();
        assert!(text.contains("downbeat_sync_rtt_seconds_bucket{le=\"0.00005\"} 1\n"), "{text}");
        assert!(text.contains("downbeat_sync_rtt_seconds_bucket{le=\"0.001\"} 3\n"));
        assert!(text.contains("downbeat_sync_rtt_seconds_bucket{le=\"0.25\"} 3\n"));
        assert!(text.contains("downbeat_sync_rtt_seconds_bucket{le=\"+Inf\"} 4\n"));
        assert!(text.contains("downbeat_sync_rtt_seconds_count 4\n"));
        assert!(text.contains("downbeat_sync_rtt_seconds_sum 0.30144\n"));
        // Gauges never wrap below zero.
        stats.rooms_active.dec();
        assert_eq!(stats.rooms_active.get(), 0);
    }
}
