//! Server-wide counters, rendered for Prometheus by `GET /metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use downbeat_engine::room::{NotesHandled, ReportHandled, Seated};
use downbeat_protocol::{ClientReport, ErrorCode};

use downbeat_protocol::Transport;

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
}

/// Declares the metrics. Each entry is the metric's doc comment (also its Prometheus help),
/// then `field: Kind => "series"`: the [`Stats`] field other modules update, and the name
/// `/metrics` renders it under (after `downbeat_`). A [`CodeCounters`] field may add
/// `, total "series" "help"`: a counter of its sum over every code.
macro_rules! stats {
    ($(
        $(#[doc = $doc:literal])+
        $field:ident: $kind:ty => $name:literal $(, total $total:literal $total_help:literal)?;
    )*) => {
        /// Everything the server counts. Shared as `Arc<Stats>`; every update is one relaxed
        /// atomic.
        #[derive(Debug, Default)]
        pub struct Stats {
            $($(#[doc = $doc])+ pub $field: $kind,)*
        }

        impl Stats {
            /// Every metric `/metrics` renders, in order.
            pub const METRICS: &[Metric] = &[$(
                $(Metric { name: $total, kind: Counter::KIND, label: Counter::LABEL, help: $total_help },)?
                Metric { name: $name, kind: <$kind as Render>::KIND, label: <$kind as Render>::LABEL, help: concat!($($doc),+) },
            )*];

            /// Renders every metric in the Prometheus text exposition format (version 0.0.4).
            pub fn render_prometheus(&self) -> String {
                let mut out = String::with_capacity(4096);
                $(
                    $(header(&mut out, $total, Counter::KIND, $total_help);
                    sample(&mut out, $total, "", self.$field.total());)?
                    header(&mut out, $name, <$kind as Render>::KIND, concat!($($doc),+));
                    self.$field.render(&mut out, $name, "");
                )*
                out
            }
        }
    };
}

stats! {
    /// Sessions open now (both transports).
    sessions_active: Gauge => "sessions_active";
    /// The host's CLOCK_MONOTONIC reading in ns at which server time is zero (0 where unknown;
    /// for benchmarks on the host).
    clock_zero_monotonic_nanos: Gauge => "clock_zero_monotonic_nanoseconds";
    /// Sessions accepted since start (both transports).
    sessions_total: Counter => "sessions_total";
    /// Sessions open now, by transport.
    transport_sessions_active: ByTransport<Gauge> => "transport_sessions_active";
    /// Sessions accepted since start, by transport.
    transport_sessions_total: ByTransport<Counter> => "transport_sessions_total";
    /// Beat frames, sync replies and note frames a slow socket made stale and that were
    /// dropped unsent, by transport (WebSocket; QUIC drops are in `datagrams_send_failed_total`).
    transport_timing_dropped: ByTransport<Counter> => "transport_timing_dropped_total";
    /// Clock-offset uncertainty clients report, by transport.
    transport_sync_uncertainty: ByTransport<Histogram> => "transport_sync_uncertainty_seconds";
    /// Network checks (probe sessions) running now.
    probes_active: Gauge => "probes_active";
    /// Network checks started since start, by transport.
    probes_started: ByTransport<Counter> => "probes_started_total";
    /// Network checks refused at the probe caps (`too_many_probes`), by transport.
    probes_refused: ByTransport<Counter> => "probes_refused_total";
    /// Connection attempts refused at a capacity limit (handshakes or sessions).
    handshakes_refused: Counter => "handshakes_refused_total";
    /// Refused hellos, by error code.
    hello_failures: CodeCounters => "hello_failures_by_code_total",
        total "hello_failures_total" "Sessions whose hello was refused.";
    /// Datagrams received from clients.
    datagrams_received: Counter => "datagrams_received_total";
    /// Received datagrams that did not decode (dropped).
    datagrams_malformed: Counter => "datagrams_malformed_total";
    /// Received datagrams dropped by the per-session rate limit.
    datagrams_rate_limited: Counter => "datagrams_rate_limited_total";
    /// Datagrams handed to QUIC for sending.
    datagrams_sent: Counter => "datagrams_sent_total";
    /// Datagrams QUIC refused to send (peer gone, datagrams unsupported, too large).
    datagrams_send_failed: Counter => "datagrams_send_failed_total";
    /// Beat frames sent.
    beat_frames_sent: Counter => "beat_frames_sent_total";
    /// Beat frames that had to lose beats to fit the path's datagram size.
    beat_frames_trimmed: Counter => "beat_frames_trimmed_total";
    /// Beat frames of its own owed to a member whose sync request named an older timeline.
    timelines_repaired: Counter => "timelines_repaired_total";
    /// Clock-sync replies sent.
    sync_replies_sent: Counter => "sync_replies_sent_total";
    /// Control frames that did not decode (the session is closed).
    frames_malformed: Counter => "frames_malformed_total";
    /// Control frames whose header declared a body over the cap (the session is closed).
    frames_too_large: Counter => "frames_too_large_total";
    /// Members disconnected because their control queue was full.
    slow_members_dropped: Counter => "slow_members_dropped_total";
    /// SEL feed updates a teacher missed because their control queue was full (the teacher
    /// stays; what the update said is stored).
    feed_dropped: Counter => "feed_dropped_total";
    /// Rooms open now.
    rooms_active: Gauge => "rooms_active";
    /// Rooms created since start.
    rooms_created: Counter => "rooms_created_total";
    /// Other nodes of the cluster whose wall clocks this node has measured (0 without a
    /// cluster).
    cluster_clock_peers: Gauge => "cluster_clock_peers";
    /// The largest difference between another node's wall clock and this node's, in µs, as
    /// measured over NATS (how well the hosts' clocks are synchronized).
    cluster_clock_offset_max_micros: Gauge => "cluster_clock_offset_max_microseconds";
    /// The largest standard error of those measurements, in µs.
    cluster_clock_uncertainty_max_micros: Gauge => "cluster_clock_uncertainty_max_microseconds";
    /// Rooms this node took over from the cluster's directory: handed to it by a draining
    /// node, or left by a node whose lease ran out.
    cluster_rooms_adopted: Counter => "cluster_rooms_adopted_total";
    /// Takeovers this node refused because its clock was off the others' beyond the bound.
    cluster_takeovers_refused: Counter => "cluster_takeovers_refused_total";
    /// Rooms this node handed to another node while draining.
    cluster_rooms_handed_over: Counter => "cluster_rooms_handed_over_total";
    /// Rooms whose members this node sent to another node (handed over, or lost to it).
    cluster_rooms_moved: Counter => "cluster_rooms_moved_total";
    /// Room state writes the cluster's directory did not take in time (the change was
    /// refused, or is written at the next renewal).
    cluster_writes_failed: Counter => "cluster_writes_failed_total";
    /// Timeline changes applied.
    changes_applied: Counter => "changes_applied_total";
    /// Teacher controls applied (timeline changes included).
    controls_applied: Counter => "controls_applied_total";
    /// Requests refused (hellos, controls, HTTP), by error code.
    refused: CodeCounters => "refused_total";
    /// Sessions closed for repeatedly exceeding a rate limit.
    sessions_closed_for_abuse: Counter => "sessions_closed_for_abuse_total";
    /// Seats taken over by a new session of the same person while the old one was open.
    sessions_replaced: Counter => "sessions_replaced_total";
    /// Seats resumed within the grace period after a lost connection.
    seats_resumed: Counter => "seats_resumed_total";
    /// Seats freed because the grace period ended.
    seats_expired: Counter => "seats_expired_total";
    /// Note datagrams received.
    note_datagrams_received: Counter => "note_datagrams_received_total";
    /// New notes accepted and fanned out.
    notes_accepted: Counter => "notes_accepted_total";
    /// Redundant copies of notes already handled, ignored.
    notes_duplicate: Counter => "notes_duplicate_total";
    /// Note datagrams refused, by error code (muted, rate limited, out of range, room busy).
    notes_dropped: CodeCounters => "note_datagrams_refused_total";
    /// Notes not forwarded.
    notes_dropped_total: Counter => "notes_dropped_total";
    /// Note frames sent to receivers.
    note_frames_sent: Counter => "note_frames_sent_total";
    /// Notes clients reported scheduled on time.
    notes_played_reported: Counter => "notes_played_reported_total";
    /// Notes clients reported arriving after their playout instant.
    notes_late_reported: Counter => "notes_late_reported_total";
    /// Round-trip times clients report.
    sync_rtt: Histogram => "sync_rtt_seconds";
    /// Clock-offset uncertainty clients report (a bound on their sync error).
    sync_uncertainty: Histogram => "sync_uncertainty_seconds";
    /// How long the newest datagram of each batch read from the WebTransport socket had waited
    /// in it (from the kernel's receive stamp to the read): a lower bound for every datagram of
    /// the batch. Tens of microseconds while the server keeps up with its socket; milliseconds
    /// mean the QUIC driver was kept from it (its thread busy with sessions, or the machine's
    /// cores with other work) and the receive queue grows towards drops.
    quic_receive_wait: Histogram => "quic_receive_wait_seconds";
    /// SEL write jobs waiting for the database.
    sel_queued: Gauge => "sel_queued";
    /// 1 while the SEL database is failing writes, else 0.
    sel_degraded: Gauge => "sel_degraded";
    /// SEL transactions committed.
    sel_commits: Counter => "sel_commits_total";
    /// SEL transactions that failed (and were retried).
    sel_write_failures: Counter => "sel_write_failures_total";
    /// SEL jobs the database refused for their own rows (a reflection among them is refused with store_refused); the rest of their group was written.
    sel_jobs_refused: Counter => "sel_jobs_refused_total";
    /// QUIC connections asked to prove their address first (a stateless Retry) because many handshakes were in progress.
    handshakes_retried: Counter => "handshakes_retried_total";
    /// Reflections committed.
    reflections_saved: Counter => "reflections_saved_total";
    /// Reflections refused with store_unavailable because the SEL queue was full.
    reflections_refused: Counter => "reflections_refused_total";
    /// Participation events lost because the SEL queue stayed full as a room closed.
    participation_dropped: Counter => "participation_dropped_total";
    /// Recorded notes dropped because the SEL queue stayed full while a take ran and its held rows reached their cap (the oldest notes go; the take keeps the rest).
    recorded_notes_dropped: Counter => "recorded_notes_dropped_total";
    /// SEL rows deleted by the retention purge.
    sel_rows_purged: Counter => "sel_rows_purged_total";
    /// When the TLS certificate in use (HTTPS and WebTransport) expires, in seconds since the
    /// Unix epoch.
    tls_certificate_not_after: Gauge => "tls_certificate_expiry_timestamp_seconds";
    /// Certificates obtained with ACME and put in use (the first one and renewals).
    acme_certificates_issued: Counter => "acme_certificates_issued_total";
    /// ACME orders that failed (the certificate in use is kept and the order retried).
    acme_failures: Counter => "acme_failures_total";
    /// 1 while the last ACME order failed, else 0.
    acme_failing: Gauge => "acme_failing";
}

/// Counting what a room's engine says it did (the room task's side of the counters above).
impl Stats {
    /// A datagram of notes the room handled.
    pub(crate) fn count_notes(&self, handled: &NotesHandled) {
        self.notes_accepted.add(u64::from(handled.accepted));
        self.notes_duplicate.add(u64::from(handled.duplicates));
        if let Some(refusal) = handled.refusal {
            self.notes_dropped.inc(refusal.code());
            self.notes_dropped_total.add(u64::from(handled.dropped.max(1)));
        }
        if handled.expelled {
            self.sessions_closed_for_abuse.inc();
        }
    }

    /// A client's report the room took.
    pub(crate) fn count_report(&self, report: &ClientReport, handled: &ReportHandled) {
        self.sync_rtt.observe_micros(report.sync.rtt_micros);
        self.sync_uncertainty.observe_micros(report.sync.uncertainty_micros);
        self.notes_played_reported.add(u64::from(handled.notes_played));
        self.notes_late_reported.add(u64::from(handled.notes_late));
    }

    /// A clock-sync reply handed to the transport, or refused by it.
    pub(crate) fn count_sync_reply(&self, sent: bool) {
        if sent {
            self.datagrams_sent.inc();
            self.sync_replies_sent.inc();
        } else {
            self.datagrams_send_failed.inc();
        }
    }

    /// How a joining session was seated.
    pub(crate) fn count_seated(&self, seated: Seated) {
        match seated {
            Seated::New => {}
            Seated::Resumed => self.seats_resumed.inc(),
            Seated::Replaced => self.sessions_replaced.inc(),
        }
    }
}

/// One metric as `/metrics` declares it (see [`Stats::METRICS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Metric {
    /// The series name after `downbeat_`.
    pub name: &'static str,
    /// `counter`, `gauge` or `histogram`.
    pub kind: &'static str,
    /// The label that tells its samples apart (`code`, `le`), or empty.
    pub label: &'static str,
    /// The help line (as written in the declaration: trim it).
    pub help: &'static str,
}

/// A kind of metric: its Prometheus type and how its samples are written.
trait Render {
    const KIND: &'static str;
    const LABEL: &'static str = "";

    /// Writes the samples (the `# HELP` and `# TYPE` lines are written before); `labels` are
    /// written first in every sample's label set (`name="value",...`, or empty).
    fn render(&self, out: &mut String, name: &str, labels: &str);
}

impl Render for Counter {
    const KIND: &'static str = "counter";

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        sample(out, name, &braced(labels, ""), self.get());
    }
}

impl Render for Gauge {
    const KIND: &'static str = "gauge";

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        sample(out, name, &braced(labels, ""), self.get());
    }
}

impl Render for CodeCounters {
    const KIND: &'static str = "counter";
    const LABEL: &'static str = "code";

    /// One sample per code counted at least once.
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        for code in ErrorCode::ALL {
            let n = self.get(*code);
            if n > 0 {
                sample(out, name, &braced(labels, &format!("code=\"{}\"", code.as_str())), n);
            }
        }
    }
}

impl Render for Histogram {
    const KIND: &'static str = "histogram";
    const LABEL: &'static str = "le";

    /// Cumulative buckets, sum and count, in seconds.
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (bound, bucket) in BUCKETS_MICROS.iter().zip(&self.buckets) {
            cumulative += bucket.get();
            let le = format!("le=\"{}\"", *bound as f64 / 1e6);
            let _ = writeln!(out, "downbeat_{name}_bucket{} {cumulative}", braced(labels, &le));
        }
        cumulative += self.buckets[BUCKETS_MICROS.len()].get();
        let _ = writeln!(out, "downbeat_{name}_bucket{} {cumulative}", braced(labels, "le=\"+Inf\""));
        let plain = braced(labels, "");
        let _ = writeln!(out, "downbeat_{name}_sum{plain} {}", self.sum_micros.get() as f64 / 1e6);
        let _ = writeln!(out, "downbeat_{name}_count{plain} {}", self.count.get());
    }
}

/// One metric per transport (see [`Transport`]).
#[derive(Debug, Default)]
pub struct ByTransport<T>([T; 2]);

impl<T> ByTransport<T> {
    /// The metric of `carrier`.
    pub fn get(&self, carrier: Transport) -> &T {
        &self.0[carrier as usize]
    }
}

impl<T: Render> Render for ByTransport<T> {
    const KIND: &'static str = T::KIND;
    const LABEL: &'static str = "transport";

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        for carrier in Transport::ALL {
            let transport = format!("transport=\"{}\"", carrier.as_str());
            let labels = if labels.is_empty() { transport } else { format!("{labels},{transport}") };
            self.get(carrier).render(out, name, &labels);
        }
    }
}

/// The `# HELP` and `# TYPE` lines of a metric.
fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# HELP downbeat_{name} {}", help.trim());
    let _ = writeln!(out, "# TYPE downbeat_{name} {kind}");
}

/// `{outer,inner}` with whichever are not empty; empty if both are.
fn braced(outer: &str, inner: &str) -> String {
    match (outer.is_empty(), inner.is_empty()) {
        (true, true) => String::new(),
        (false, true) => format!("{{{outer}}}"),
        (true, false) => format!("{{{inner}}}"),
        (false, false) => format!("{{{outer},{inner}}}"),
    }
}

/// One sample line; `labels` is empty or `{..}`.
fn sample(out: &mut String, name: &str, labels: &str, value: u64) {
    let _ = writeln!(out, "downbeat_{name}{labels} {value}");
}

/// The metrics as a markdown table, the README's metrics section (`downbeat metrics-doc`
/// prints it).
pub fn metrics_markdown() -> String {
    let mut out = String::from("| series | type | what |\n|---|---|---|\n");
    for m in Stats::METRICS {
        let label = if m.label.is_empty() { String::new() } else { format!(" by `{}`", m.label) };
        let _ = writeln!(out, "| `downbeat_{}` | {}{label} | {} |", m.name, m.kind, m.help.trim());
    }
    out
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
        // Per-transport series carry a `transport` label before any other.
        stats.transport_sync_uncertainty.get(Transport::WebSocket).observe_micros(700);
        stats.transport_sessions_active.get(Transport::WebTransport).inc();
        let text = stats.render_prometheus();
        assert!(
            text.contains(
                "downbeat_transport_sync_uncertainty_seconds_bucket{transport=\"websocket\",le=\"0.001\"} 1\n"
            )
        );
        assert!(text.contains("downbeat_transport_sync_uncertainty_seconds_count{transport=\"webtransport\"} 0\n"));
        assert!(text.contains("downbeat_transport_sessions_active{transport=\"webtransport\"} 1\n"));
        assert!(text.contains("downbeat_transport_sessions_active{transport=\"websocket\"} 0\n"));
        // Gauges never wrap below zero.
        stats.rooms_active.dec();
        assert_eq!(stats.rooms_active.get(), 0);
    }

    #[test]
    fn metrics_renders_exactly_the_declared_series() {
        let text = Stats::default().render_prometheus();
        let rendered: Vec<(&str, &str)> =
            text.lines().filter_map(|line| line.strip_prefix("# TYPE downbeat_")?.split_once(' ')).collect();
        let declared: Vec<(&str, &str)> = Stats::METRICS.iter().map(|m| (m.name, m.kind)).collect();
        assert_eq!(rendered, declared);
        // The series dashboards and the bench read, as they were before the table.
        let mut names: Vec<&str> = declared.iter().map(|(name, _)| *name).collect();
        names.sort_unstable();
        let mut before = [
            "sel_queued",
            "sel_degraded",
            "sel_commits_total",
            "sel_write_failures_total",
            "reflections_saved_total",
            "reflections_refused_total",
            "participation_dropped_total",
            "sel_rows_purged_total",
            "sessions_active",
            "clock_zero_monotonic_nanoseconds",
            "sessions_total",
            "handshakes_refused_total",
            "hello_failures_total",
            "datagrams_received_total",
            "datagrams_malformed_total",
            "datagrams_rate_limited_total",
            "datagrams_sent_total",
            "datagrams_send_failed_total",
            "beat_frames_sent_total",
            "beat_frames_trimmed_total",
            "sync_replies_sent_total",
            "frames_malformed_total",
            "frames_too_large_total",
            "slow_members_dropped_total",
            "feed_dropped_total",
            "rooms_active",
            "rooms_created_total",
            "cluster_clock_peers",
            "cluster_clock_offset_max_microseconds",
            "cluster_clock_uncertainty_max_microseconds",
            "cluster_rooms_adopted_total",
            "cluster_takeovers_refused_total",
            "cluster_rooms_handed_over_total",
            "cluster_rooms_moved_total",
            "cluster_writes_failed_total",
            "changes_applied_total",
            "controls_applied_total",
            "sessions_closed_for_abuse_total",
            "sessions_replaced_total",
            "seats_resumed_total",
            "seats_expired_total",
            "note_datagrams_received_total",
            "notes_accepted_total",
            "notes_duplicate_total",
            "notes_dropped_total",
            "note_frames_sent_total",
            "notes_played_reported_total",
            "notes_late_reported_total",
            "sync_rtt_seconds",
            "sync_uncertainty_seconds",
            "refused_total",
            "note_datagrams_refused_total",
            "hello_failures_by_code_total",
            // Added with WebSocket sessions.
            "transport_sessions_active",
            "transport_sessions_total",
            "transport_timing_dropped_total",
            "transport_sync_uncertainty_seconds",
            // Since: the certificate in use and ACME.
            "tls_certificate_expiry_timestamp_seconds",
            "acme_certificates_issued_total",
            "acme_failures_total",
            "acme_failing",
            // Since: network checks (probe sessions).
            "probes_active",
            "probes_started_total",
            "probes_refused_total",
            // Since: the SEL writer fails only the job the database refuses.
            "sel_jobs_refused_total",
            "handshakes_retried_total",
            // Since: recordings.
            "recorded_notes_dropped_total",
            // Since: a member's sync requests name the timeline it holds.
            "timelines_repaired_total",
            // Since: the QUIC driver reports how long datagrams waited in its socket.
            "quic_receive_wait_seconds",
        ];
        before.sort_unstable();
        assert_eq!(names, before);
        // Every help ends a sentence and fits on its `# HELP` line.
        assert!(Stats::METRICS.iter().all(|m| m.help.trim().ends_with('.') && !m.help.contains('\n')));
    }

    #[test]
    fn the_readme_metrics_table_is_the_generated_one() {
        let want = metrics_markdown();
        let readme = crate::config::readme_section("metrics");
        assert_eq!(readme, want, "regenerate it with `cargo run -p downbeat-server -- metrics-doc`");
    }
}
