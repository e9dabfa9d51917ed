//! A TCP-like link for the simulation: what a WebSocket session's timing traffic meets.
//!
//! Each direction is an ordered byte pipe (`TcpPipe`) over the same [`Path`] a datagram
//! would cross. A message (one segment: timing messages are far smaller than an MSS, and
//! both sides send with `TCP_NODELAY`) draws the path's loss, delay and jitter when it is
//! written. A lost segment is not lost: the sender retransmits it after its retransmission
//! timeout (RTO), computed as Linux does (`srtt + max(4 * rttvar, 200 ms)`, 1 s before the
//! first RTT sample, at most 120 s; RFC 6298's smoothing, Karn's rule: no samples from
//! retransmitted segments), doubled for every attempt that is lost again. A retransmission
//! comes hundreds of milliseconds after the loss, so it draws the path's mean loss rate
//! independently of the burst that took the original (an outage still takes every attempt).
//! A segment first lost while an earlier one is still being recovered is retransmitted
//! together with it, as Linux's loss recovery does after an RTO. Fast retransmit, tail loss
//! probes and RACK, which often recover sooner, are left out: the model errs on the slow
//! side. Whatever the receiver got, it hands over in order, so everything behind a missing
//! segment waits for it (head-of-line blocking) and then arrives in a burst.
//!
//! The server's side keeps datagram semantics as the real WebSocket session does
//! (`Outbox`): a message is written into the socket's send buffer when it fits
//! ([`TcpConfig::send_buffer_bytes`]: bytes written and not yet acknowledged); while the
//! buffer is full, only the newest beat frame and sync reply (and a few note frames) wait,
//! older ones are dropped, and a sync reply's `t2` is stamped when it is finally written.

use std::collections::VecDeque;

use downbeat_protocol::{ServerNanos, SyncReply, SyncRequest};

use super::{Path, PathState, Rng};

/// Note frames waiting per session before the oldest is dropped (as the server does).
const NOTE_BACKLOG: usize = 16;
/// Bytes a WebSocket frame header adds to a small binary message (2 bytes; a client's
/// messages are masked, 4 more) plus TCP/IP headers are left out: the send buffer counts
/// payload.
const WS_HEADER_BYTES: usize = 6;

/// How a client's timing traffic crosses its path.
#[derive(Clone, Debug, PartialEq)]
pub enum Carrier {
    /// Datagrams, as on WebTransport: each one arrives or is lost on its own.
    Datagrams,
    /// A TCP connection, as under a WebSocket.
    Tcp(TcpConfig),
}

/// Settings of the TCP model.
#[derive(Clone, Debug, PartialEq)]
pub struct TcpConfig {
    /// Least retransmission timeout (Linux's `TCP_RTO_MIN`).
    pub min_rto_nanos: u64,
    /// Retransmission timeout before the first RTT sample (RFC 6298).
    pub initial_rto_nanos: u64,
    /// Largest retransmission timeout (Linux's `TCP_RTO_MAX`).
    pub max_rto_nanos: u64,
    /// The server socket's send buffer: bytes written and not yet acknowledged. Linux starts
    /// a socket at 16 KiB (`tcp_wmem`) and grows it.
    pub send_buffer_bytes: usize,
}

impl Default for TcpConfig {
    fn default() -> Self {
        Self {
            min_rto_nanos: 200_000_000,
            initial_rto_nanos: 1_000_000_000,
            max_rto_nanos: 120_000_000_000,
            send_buffer_bytes: 16 * 1024,
        }
    }
}

/// Counters of one client's TCP connection (both directions).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpStats {
    /// Segments written.
    pub segments: u64,
    /// Retransmissions (each attempt after the first).
    pub retransmissions: u64,
    /// Segments delivered later than they arrived, held behind a missing one.
    pub held_back: u64,
    /// Timing messages the server replaced while its send buffer was full.
    pub dropped: u64,
}

/// One direction of a TCP connection. See the module docs.
#[derive(Clone, Debug, Default)]
pub(super) struct TcpPipe {
    /// Smoothed RTT and its variation, ns, once measured.
    srtt: Option<(f64, f64)>,
    /// When the receiver has handed over everything written so far.
    delivered_at: u64,
    /// When the retransmission that ends the current loss recovery goes out.
    recovering_until: u64,
    /// `(acknowledged at, bytes)` of every segment in the send buffer, in order.
    unacked: VecDeque<(u64, usize)>,
}

impl TcpPipe {
    fn rto(&self, config: &TcpConfig) -> u64 {
        match self.srtt {
            None => config.initial_rto_nanos,
            Some((srtt, rttvar)) => ((srtt + (4.0 * rttvar).max(config.min_rto_nanos as f64)) as u64)
                .clamp(config.min_rto_nanos, config.max_rto_nanos),
        }
    }

    fn sample_rtt(&mut self, rtt: f64) {
        self.srtt = Some(match self.srtt {
            None => (rtt, rtt / 2.0),
            Some((srtt, rttvar)) => (0.875 * srtt + 0.125 * rtt, 0.75 * rttvar + 0.25 * (srtt - rtt).abs()),
        });
    }

    /// Writes a segment of `len` bytes at `now` over `path` (acknowledgements return over
    /// `back`); returns when the receiver hands it over.
    pub(super) fn write(&mut self, link: Link<'_>, rng: &mut Rng, now: u64, len: usize) -> u64 {
        let Link { config, path, state, back, stats } = link;
        stats.segments += 1;
        let mut attempt = now;
        let mut backoff = 0u32;
        let mut arrival = state.transit(path, rng, attempt);
        while arrival.is_none() {
            stats.retransmissions += 1;
            attempt = if attempt < self.recovering_until {
                self.recovering_until
            } else {
                let rto = self.rto(config).saturating_mul(1 << backoff.min(16)).min(config.max_rto_nanos);
                backoff += 1;
                attempt + rto
            };
            arrival = state.retransmit(path, rng, attempt);
        }
        let arrived = arrival.unwrap_or(attempt);
        let ack_delay = back.base_nanos + back.jitter.sample(rng);
        if attempt == now {
            self.sample_rtt((arrived - now + ack_delay) as f64);
        } else {
            self.recovering_until = self.recovering_until.max(attempt);
        }
        if arrived < self.delivered_at {
            stats.held_back += 1;
        }
        self.delivered_at = self.delivered_at.max(arrived);
        let acked = self.unacked.back().map_or(0, |&(at, _)| at).max(self.delivered_at + ack_delay);
        self.unacked.push_back((acked, len + WS_HEADER_BYTES));
        self.delivered_at
    }

    /// Bytes in the send buffer at `now`.
    pub(super) fn buffered(&mut self, now: u64) -> usize {
        while self.unacked.front().is_some_and(|&(at, _)| at <= now) {
            self.unacked.pop_front();
        }
        self.unacked.iter().map(|&(_, len)| len).sum()
    }

    /// When the oldest segment in the send buffer is acknowledged.
    pub(super) fn next_ack(&self) -> Option<u64> {
        self.unacked.front().map(|&(at, _)| at)
    }
}

/// What one write needs besides the pipe.
pub(super) struct Link<'a> {
    pub(super) config: &'a TcpConfig,
    pub(super) path: &'a Path,
    pub(super) state: &'a mut PathState,
    pub(super) back: &'a Path,
    pub(super) stats: &'a mut TcpStats,
}

/// Timing traffic the server could not write yet: the newest beat frame, the newest sync
/// request with its `t1`, and a few note frames. See the module docs.
#[derive(Clone, Debug, Default)]
pub(super) struct Outbox {
    pub(super) sync: Option<(SyncRequest, ServerNanos)>,
    pub(super) beats: Option<Vec<u8>>,
    pub(super) notes: VecDeque<Vec<u8>>,
}

impl Outbox {
    pub(super) fn is_empty(&self) -> bool {
        self.sync.is_none() && self.beats.is_none() && self.notes.is_empty()
    }

    /// Parks a message; true if it replaced (dropped) an older one.
    pub(super) fn park(&mut self, message: Parked) -> bool {
        match message {
            Parked::Sync(request, t1) => self.sync.replace((request, t1)).is_some(),
            Parked::Beats(bytes) => self.beats.replace(bytes).is_some(),
            Parked::Notes(bytes) => {
                let full = self.notes.len() >= NOTE_BACKLOG;
                if full {
                    self.notes.pop_front();
                }
                self.notes.push_back(bytes);
                full
            }
        }
    }

    /// The next message to write, in the server writer's order: sync reply, beats, notes.
    pub(super) fn peek(&self) -> Option<Parked> {
        if let Some((request, t1)) = self.sync {
            return Some(Parked::Sync(request, t1));
        }
        if let Some(beats) = &self.beats {
            return Some(Parked::Beats(beats.clone()));
        }
        self.notes.front().map(|n| Parked::Notes(n.clone()))
    }

    /// Forgets the message [`Outbox::peek`] returned (it was written).
    pub(super) fn pop(&mut self) {
        if self.sync.take().is_none() && self.beats.take().is_none() {
            self.notes.pop_front();
        }
    }
}

/// A message from the server to a client over TCP.
#[derive(Clone, Debug)]
pub(super) enum Parked {
    /// A sync reply to this request, received at this `t1`; `t2` is stamped at the write.
    Sync(SyncRequest, ServerNanos),
    /// An encoded beat frame.
    Beats(Vec<u8>),
    /// An encoded note frame.
    Notes(Vec<u8>),
}

impl Parked {
    /// The reply to a sync request received at `t1` and stamped at `t2`.
    pub(super) fn reply(request: SyncRequest, t1: ServerNanos, t2: u64) -> SyncReply {
        SyncReply { id: request.id, t0: request.t0, t1, t2: ServerNanos(t2.max(t1.0)) }
    }
}
