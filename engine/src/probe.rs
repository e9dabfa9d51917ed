//! A network check (a *probe*) as a state machine: can this device reach the server on a
//! transport, and how well does its clock sync there?
//!
//! A probe is a session that needs no token: its first frame is [`ClientMessage::Probe`]
//! instead of a hello, the server answers [`ServerMessage::ProbeStarted`], and from then on
//! the probe only syncs its clock, with the same sync requests and replies on the datagram path
//! as a joined session and the same [`Estimator`] every client runs. It sends a request every
//! [`Config::interval_nanos`], keeps every round trip, and after [`Config::duration_nanos`]
//! (or the server's `duration_ms`, if shorter) it is done and the shell closes the session. The
//! server ends a probe that runs longer with [`ErrorCode::ProbeOver`], one that sends anything
//! else with [`ErrorCode::ProbeOnly`], and refuses one over its caps with
//! [`ErrorCode::TooManyProbes`].
//!
//! [`Probe::summary`] is what a check page shows: whether the server was reached, the round
//! trips (minimum, median, 95th percentile), the estimator's offset uncertainty, and a
//! [`Quality`] from the bound on the clock error (uncertainty plus half the smallest round
//! trip, which bounds the path asymmetry no exchange can see).
//!
//! Like the rest of this crate it reads no clock: every entry point takes the local `now`.

use downbeat_protocol::{
    ClientDatagram, ClientMessage, ClientNanos, DecodeError, ErrorCode, FrameDecoder, PROTOCOL_VERSION, ServerDatagram,
    ServerMessage, decode_server_datagram, encode_client_datagram, encode_frame,
};

use crate::clock::{self, Estimator, Sample};

/// Most round trips a probe keeps (far more than a check of a few seconds takes).
const MAX_RTT_SAMPLES: usize = 10_000;
/// Clock-error bound up to which sync is [`Quality::Good`]: well below what a listener hears
/// between players (ensembles tolerate a few tens of milliseconds).
pub const GOOD_ERROR_BOUND_NANOS: u64 = 10_000_000;
/// Clock-error bound up to which sync is [`Quality::Fair`].
pub const FAIR_ERROR_BOUND_NANOS: u64 = 25_000_000;
/// 95th-percentile round trip above which timing is [`Quality::Poor`] whatever the sync: beat
/// frames (sent 1.5 s ahead by default) and notes would often arrive late.
pub const POOR_RTT_P95_NANOS: u64 = 500_000_000;

/// How a probe runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// How long to sync once the server started the probe (the server's own limit, if
    /// shorter, wins).
    pub duration_nanos: u64,
    /// Time between sync requests (paced: browsers drop datagrams sent in a tight burst).
    pub interval_nanos: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self { duration_nanos: 3_000_000_000, interval_nanos: 50_000_000 }
    }
}

/// Where a probe stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// The probe frame is sent; waiting for the server's answer.
    Starting,
    /// Syncing.
    Running,
    /// Over; [`Probe::end`] says how.
    Done,
}

/// How a probe ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// Its time was up on this side (the shell closes the session).
    Done,
    /// The server ended it or refused it: [`ErrorCode::ProbeOver`] when the server's time was
    /// up, anything else (`too_many_probes`, `probe_only`, `shutting_down`, ...) a failure.
    Server {
        /// The stable code.
        code: ErrorCode,
        /// The server's explanation, safe to show.
        message: String,
    },
    /// The server sent something out of step.
    Protocol(String),
    /// The transport ended without the server saying why (the shell's words).
    Lost(String),
}

impl End {
    /// Whether the probe ran its course (its time was up, on either side).
    pub fn ran_its_course(&self) -> bool {
        matches!(self, Self::Done | Self::Server { code: ErrorCode::ProbeOver, .. })
    }

    /// The server's code, if it ended the probe.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// How good the clock sync is for playing together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Quality {
    /// Synced, with a clock-error bound up to [`GOOD_ERROR_BOUND_NANOS`].
    Good,
    /// Synced, with a bound up to [`FAIR_ERROR_BOUND_NANOS`].
    Fair,
    /// Not synced, a wider bound, or round trips so long beats may come late.
    Poor,
}

impl Quality {
    /// `"good"`, `"fair"` or `"poor"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Good => "good",
            Self::Fair => "fair",
            Self::Poor => "poor",
        }
    }
}

/// What a probe found.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// The server answered the probe frame (the transport reaches it).
    pub started: bool,
    /// How the probe ended, once it did.
    pub end: Option<End>,
    /// Sync requests sent.
    pub sent: u32,
    /// Replies that became samples.
    pub samples: usize,
    /// Smallest round trip, ns.
    pub rtt_min_nanos: Option<u64>,
    /// Median round trip, ns.
    pub rtt_p50_nanos: Option<u64>,
    /// 95th-percentile round trip, ns.
    pub rtt_p95_nanos: Option<u64>,
    /// The estimator's offset uncertainty, ns.
    pub uncertainty_nanos: Option<u64>,
    /// Whether the estimator counts as synced (enough samples, small uncertainty).
    pub synced: bool,
    /// Bound on the clock error: uncertainty plus half the smallest round trip, ns.
    pub error_bound_nanos: Option<u64>,
    /// The verdict on sync, once there is a sample.
    pub quality: Option<Quality>,
}

impl Summary {
    /// Whether the server was reached and answered clock sync on this transport.
    pub fn reachable(&self) -> bool {
        self.started && self.samples > 0 && self.end.as_ref().is_none_or(End::ran_its_course)
    }
}

/// One network check. See the module docs.
#[derive(Debug)]
pub struct Probe {
    config: Config,
    estimator: Estimator,
    decoder: FrameDecoder,
    state: State,
    /// When this side stops syncing (set once the server started the probe).
    deadline: Option<ClientNanos>,
    rtts: Vec<u64>,
    sent: u32,
    end: Option<End>,
}

impl Probe {
    /// A probe about to ask the server, with the probe frame to send first on the control
    /// stream.
    pub fn start(config: Config) -> (Self, Vec<u8>) {
        let interval = config.interval_nanos;
        let sync = clock::Config {
            // Every request at the probe's pace: the whole probe is one burst.
            burst_samples: usize::MAX,
            burst_interval_nanos: interval,
            uncertain_interval_nanos: interval,
            steady_interval_nanos: interval,
            // Measured at its own pace throughout, however slow the path: a probe is short and
            // one per check, and it reports the round trips it saw.
            round_trips_per_request: 0,
            ..clock::Config::default()
        };
        let probe = Self {
            config,
            estimator: Estimator::new(sync),
            decoder: FrameDecoder::new(),
            state: State::Starting,
            deadline: None,
            rtts: Vec::new(),
            sent: 0,
            end: None,
        };
        // Cannot fail: a two-byte message.
        let frame = encode_frame(&ClientMessage::Probe { version: PROTOCOL_VERSION }).unwrap_or_default();
        (probe, frame)
    }

    /// Where the probe stands.
    pub fn state(&self) -> State {
        self.state
    }

    /// How it ended, once it did.
    pub fn end(&self) -> Option<&End> {
        self.end.as_ref()
    }

    /// Takes control-stream bytes received at `now`, in any chunking.
    pub fn handle_control_bytes(&mut self, now: ClientNanos, bytes: &[u8]) {
        self.decoder.push(bytes);
        while self.state != State::Done {
            match self.decoder.next_frame::<ServerMessage>() {
                Ok(Some(message)) => self.handle_control(now, message),
                Ok(None) => break,
                Err(e) => self.finish(End::Protocol(e.to_string())),
            }
        }
    }

    /// Takes one control message received at `now`.
    pub fn handle_control(&mut self, now: ClientNanos, message: ServerMessage) {
        match (self.state, message) {
            (State::Done, _) => {}
            (State::Starting, ServerMessage::ProbeStarted { duration_ms }) => {
                let duration = self.config.duration_nanos.min(u64::from(duration_ms) * 1_000_000);
                self.deadline = Some(ClientNanos(now.0.saturating_add(duration)));
                self.state = State::Running;
            }
            // Every error ends a probe: the server closes it next.
            (_, ServerMessage::Error(e)) => {
                self.finish(End::Server { code: e.code, message: e.message.into_string() });
            }
            (_, other) => self.finish(End::Protocol(format!("a probe expects only its start, got {other:?}"))),
        }
    }

    /// Takes a datagram received at local time `now` (stamp it first: it is a sync reply).
    /// Returns whether it became a sample.
    pub fn handle_datagram(&mut self, now: ClientNanos, bytes: &[u8]) -> Result<bool, DecodeError> {
        let ServerDatagram::SyncReply(reply) = decode_server_datagram(bytes)? else { return Ok(false) };
        if self.state != State::Running || !self.estimator.handle_reply(now, &reply) {
            return Ok(false);
        }
        if let Some(sample) = Sample::from_timestamps(reply.t0, reply.t1, reply.t2, now)
            && self.rtts.len() < MAX_RTT_SAMPLES
        {
            self.rtts.push(sample.delay);
        }
        Ok(true)
    }

    /// The next sync request to send, if one is due at `now`; ends the probe once its time is
    /// up.
    pub fn poll_datagram(&mut self, now: ClientNanos) -> Option<Vec<u8>> {
        self.handle_timeout(now);
        if self.state != State::Running {
            return None;
        }
        let request = self.estimator.poll_request(now)?;
        self.sent = self.sent.saturating_add(1);
        encode_client_datagram(&ClientDatagram::SyncRequest(request)).ok()
    }

    /// When the probe next wants [`Probe::poll_datagram`] called: the next request or the end
    /// of its time; `None` while it waits for the server or once it is done.
    pub fn poll_timeout(&self) -> Option<ClientNanos> {
        let deadline = self.deadline.filter(|_| self.state == State::Running)?;
        Some(self.estimator.poll_timeout().min(deadline))
    }

    /// Ends the probe if its time is up at `now`.
    pub fn handle_timeout(&mut self, now: ClientNanos) {
        if self.state == State::Running && self.deadline.is_some_and(|d| now >= d) {
            self.finish(End::Done);
        }
    }

    /// The transport ended; `reason` says how, in the shell's words.
    pub fn handle_closed(&mut self, reason: &str) {
        self.finish(End::Lost(reason.to_owned()));
    }

    fn finish(&mut self, end: End) {
        if self.state != State::Done {
            self.state = State::Done;
            self.end = Some(end);
        }
    }

    /// What the probe found so far (all of it, once done), at local time `now`.
    pub fn summary(&self, now: ClientNanos) -> Summary {
        let mut rtts = self.rtts.clone();
        rtts.sort_unstable();
        let estimate = self.estimator.estimate(now);
        let uncertainty = estimate.map(|e| e.uncertainty_nanos);
        let synced = self.estimator.is_synced(now);
        let rtt_min = rtts.first().copied();
        let rtt_p95 = percentile(&rtts, 95);
        let error_bound = uncertainty.zip(rtt_min).map(|(u, rtt)| u.saturating_add(rtt / 2));
        let quality = error_bound.map(|bound| {
            if !synced || rtt_p95.is_some_and(|p95| p95 > POOR_RTT_P95_NANOS) || bound > FAIR_ERROR_BOUND_NANOS {
                Quality::Poor
            } else if bound > GOOD_ERROR_BOUND_NANOS {
                Quality::Fair
            } else {
                Quality::Good
            }
        });
        Summary {
            started: self.deadline.is_some(),
            end: self.end.clone(),
            sent: self.sent,
            samples: rtts.len(),
            rtt_min_nanos: rtt_min,
            rtt_p50_nanos: percentile(&rtts, 50),
            rtt_p95_nanos: rtt_p95,
            uncertainty_nanos: uncertainty,
            synced,
            error_bound_nanos: error_bound,
            quality,
        }
    }
}

/// The `p`th percentile (nearest rank) of `sorted`.
fn percentile(sorted: &[u64], p: usize) -> Option<u64> {
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use downbeat_protocol::{
        BoundedString, ErrorFrame, ServerNanos, SyncReply, decode_client_datagram, decode_frame_body,
        encode_server_datagram,
    };

    const MS: u64 = 1_000_000;

    /// The server's answer to the sync request `bytes` sent at `t0`, with `offset` between the
    /// clocks and `up` and `down` one-way delays; received at the returned local time.
    fn answer(bytes: &[u8], offset: u64, up: u64, down: u64) -> (ClientNanos, Vec<u8>) {
        let Ok(ClientDatagram::SyncRequest(request)) = decode_client_datagram(bytes) else { panic!("not a request") };
        let t1 = ServerNanos(request.t0.0 + offset + up);
        let t2 = ServerNanos(t1.0 + 20_000);
        let reply = ServerDatagram::SyncReply(SyncReply { id: request.id, t0: request.t0, t1, t2 });
        (ClientNanos(request.t0.0 + up + 20_000 + down), encode_server_datagram(&reply).unwrap())
    }

    fn started(duration_ms: u32) -> Vec<u8> {
        encode_frame(&ServerMessage::ProbeStarted { duration_ms }).unwrap()
    }

    /// Runs a probe against a perfect server whose round trips follow `rtt(i)`; returns it.
    fn run(config: Config, server_ms: u32, rtt: impl Fn(u64) -> u64) -> (Probe, ClientNanos) {
        let (mut probe, frame) = Probe::start(config);
        let Ok(ClientMessage::Probe { version }) = decode_frame_body(&frame[4..]) else { panic!("not a probe frame") };
        assert_eq!(version, PROTOCOL_VERSION);
        assert_eq!(probe.poll_datagram(ClientNanos(1)), None, "no sync before the server started the probe");
        let mut now = ClientNanos(1_000 * MS);
        probe.handle_control_bytes(now, &started(server_ms));
        let mut i = 0;
        while let Some(at) = probe.poll_timeout() {
            now = at.max(now);
            if let Some(request) = probe.poll_datagram(now) {
                let (t3, reply) = answer(&request, 5_000 * MS, rtt(i) / 2, rtt(i) / 2);
                assert!(probe.handle_datagram(t3, &reply).unwrap());
                i += 1;
            }
        }
        (probe, now)
    }

    #[test]
    fn a_probe_syncs_for_its_duration_and_sums_up_its_round_trips() {
        // Round trips of 2, 4, ... 20 ms in turn.
        let (probe, now) = run(Config::default(), 10_000, |i| (i % 10 + 1) * 2 * MS);
        assert_eq!(probe.state(), State::Done);
        assert_eq!(probe.end(), Some(&End::Done));
        let s = probe.summary(now);
        // 3 s at one request every 50 ms.
        assert_eq!(s.sent, 60, "{s:?}");
        assert_eq!(s.samples, 60);
        assert_eq!((s.rtt_min_nanos, s.rtt_p50_nanos, s.rtt_p95_nanos), (Some(2 * MS), Some(10 * MS), Some(20 * MS)));
        assert!(s.synced && s.reachable(), "{s:?}");
        assert!(s.error_bound_nanos.unwrap() >= MS);
        assert_eq!(s.quality, Some(Quality::Good));
    }

    #[test]
    fn the_servers_shorter_duration_wins_and_its_probe_over_is_a_normal_end() {
        let (probe, _) = run(Config::default(), 1_000, |_| 2 * MS);
        assert_eq!(probe.summary(ClientNanos(0)).sent, 20, "1 s, not 3");
        // A probe told its time is over by the server ran its course too.
        let (mut probe, _) = Probe::start(Config { duration_nanos: 60_000 * MS, ..Config::default() });
        probe.handle_control_bytes(ClientNanos(0), &started(1_000));
        let request = probe.poll_datagram(ClientNanos(0)).unwrap();
        let (t3, reply) = answer(&request, 0, MS, MS);
        probe.handle_datagram(t3, &reply).unwrap();
        let over = ServerMessage::Error(ErrorFrame {
            code: ErrorCode::ProbeOver,
            request_id: None,
            message: BoundedString::truncating("over"),
        });
        probe.handle_control_bytes(t3, &encode_frame(&over).unwrap());
        let s = probe.summary(t3);
        assert_eq!(s.end.as_ref().and_then(End::code), Some(ErrorCode::ProbeOver));
        assert!(s.reachable(), "{s:?}");
        assert_eq!(probe.poll_datagram(t3), None);
    }

    #[test]
    fn a_refused_or_lost_probe_is_not_reachable() {
        let (mut probe, _) = Probe::start(Config::default());
        let refused = ServerMessage::Error(ErrorFrame {
            code: ErrorCode::TooManyProbes,
            request_id: None,
            message: BoundedString::truncating("busy"),
        });
        probe.handle_control_bytes(ClientNanos(0), &encode_frame(&refused).unwrap());
        let s = probe.summary(ClientNanos(0));
        assert_eq!(s.end.as_ref().and_then(End::code), Some(ErrorCode::TooManyProbes));
        assert!(!s.started && !s.reachable() && s.quality.is_none());

        let (mut probe, _) = Probe::start(Config::default());
        probe.handle_closed("handshake failed");
        assert_eq!(probe.end(), Some(&End::Lost("handshake failed".into())));
        assert!(!probe.summary(ClientNanos(0)).reachable());
    }

    #[test]
    fn long_or_unsteady_round_trips_lower_the_quality() {
        // 40 ms round trips: up to 20 ms of asymmetry is possible.
        let (probe, now) = run(Config::default(), 10_000, |_| 40 * MS);
        assert_eq!(probe.summary(now).quality, Some(Quality::Fair));
        // 80 ms: up to 40 ms.
        let (probe, now) = run(Config::default(), 10_000, |_| 80 * MS);
        assert_eq!(probe.summary(now).quality, Some(Quality::Poor));
        // Too few samples to count as synced.
        let (probe, now) = run(Config { duration_nanos: 200 * MS, ..Config::default() }, 10_000, |_| MS);
        let s = probe.summary(now);
        assert!(!s.synced && s.samples == 4, "{s:?}");
        assert_eq!(s.quality, Some(Quality::Poor));
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        assert_eq!(percentile(&[], 50), None);
        assert_eq!(percentile(&[7], 95), Some(7));
        let v: Vec<u64> = (1..=20).collect();
        assert_eq!((percentile(&v, 50), percentile(&v, 95)), (Some(10), Some(19)));
    }
}
