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

/// Everything the server counts. Shared as `Arc<Stats>`; every update is one relaxed atomic.
#[derive(Debug, Default)]
pub struct Stats {
    /// WebTransport sessions open now.
    pub sessions_active: Gauge,
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
    /// Timeline changes refused.
    pub changes_refused: Counter,
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
        metric("sessions_active", "gauge", "WebTransport sessions open now.", self.sessions_active.get());
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
        metric("changes_refused_total", "counter", "Timeline changes refused.", self.changes_refused.get());

        let _ = writeln!(out, "# HELP downbeat_hello_failures_by_code_total Refused hellos by error code.");
        let _ = writeln!(out, "# TYPE downbeat_hello_failures_by_code_total counter");
        for code in ErrorCode::ALL {
            let n = self.hello_failures.get(*code);
            if n > 0 {
                let _ = writeln!(out, "downbeat_hello_failures_by_code_total{{code=\"{}\"}} {n}", code.as_str());
            }
        }
        out
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
                assert!(matches!(parts.next(), Some("counter" | "gauge")), "{line}");
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert_eq!(Some(name), declared.as_deref(), "{line}");
                let value = line.rsplit(' ').next().unwrap();
                value.parse::<u64>().unwrap();
            }
        }
        // Gauges never wrap below zero.
        stats.rooms_active.dec();
        assert_eq!(stats.rooms_active.get(), 0);
    }
}
