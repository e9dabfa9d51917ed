//! The client state machine: clock sync plus the newest timeline.
//!
//! Feed it every datagram and control message the server sends, ask it which datagram to
//! send next, and it answers "at what instant of my own clock does beat n sound". The same
//! code runs in native clients and, compiled to wasm, in the browser.

use downbeat_protocol::{
    Beat, ClientDatagram, ClientNanos, ServerDatagram, ServerNanos, Timeline as WireTimeline, Welcome,
};

use crate::clock::{self, Estimate, Estimator};
use crate::timeline::Timeline;

/// What a datagram did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handled {
    /// A sync reply became a sample.
    Sample,
    /// A sync reply was ignored (unknown, duplicate or inconsistent).
    IgnoredReply,
    /// A beat frame brought a newer timeline.
    NewTimeline,
    /// A beat frame confirmed the timeline already held.
    SameTimeline,
    /// A beat frame carried an older timeline; it was not applied.
    StaleTimeline,
    /// A beat frame carried a timeline that did not validate.
    BadTimeline,
}

/// A beat placed on both clocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScheduledBeat {
    /// The beat number.
    pub index: i64,
    /// Its position in the bar.
    pub beat_in_bar: u8,
    /// When it sounds on the server clock.
    pub server_at: ServerNanos,
    /// When it sounds on this client's clock.
    pub local_at: ClientNanos,
}

/// Counters for what arrived.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Beat frames received.
    pub frames: u64,
    /// Frames whose sequence number was not above the highest seen (duplicated or reordered).
    pub frames_out_of_order: u64,
    /// Frames carrying an older timeline.
    pub stale_timelines: u64,
    /// Timelines applied.
    pub timelines_applied: u64,
}

/// One client's view of its room. See the module docs.
#[derive(Clone, Debug)]
pub struct Client {
    clock: Estimator,
    timeline: Option<Timeline>,
    lead_nanos: u64,
    highest_seq: u64,
    stats: Stats,
}

impl Client {
    /// A client with nothing known yet.
    pub fn new(config: clock::Config) -> Self {
        Self { clock: Estimator::new(config), timeline: None, lead_nanos: 0, highest_seq: 0, stats: Stats::default() }
    }

    /// Takes the server's welcome.
    pub fn handle_welcome(&mut self, welcome: &Welcome) {
        self.lead_nanos = welcome.lead_nanos;
        self.handle_timeline(&welcome.timeline);
    }

    /// Takes a timeline (from the control stream or a datagram); applies it only if newer.
    pub fn handle_timeline(&mut self, wire: &WireTimeline) -> Handled {
        if let Some(current) = &self.timeline {
            if wire.epoch < current.epoch() {
                self.stats.stale_timelines += 1;
                return Handled::StaleTimeline;
            }
            if wire.epoch == current.epoch() {
                return Handled::SameTimeline;
            }
        }
        match Timeline::from_wire(wire) {
            Ok(t) => {
                self.timeline = Some(t);
                self.stats.timelines_applied += 1;
                Handled::NewTimeline
            }
            Err(_) => Handled::BadTimeline,
        }
    }

    /// Takes a datagram received at local time `now`.
    pub fn handle_datagram(&mut self, now: ClientNanos, datagram: &ServerDatagram) -> Handled {
        match datagram {
            ServerDatagram::SyncReply(reply) => {
                if self.clock.handle_reply(now, reply) {
                    Handled::Sample
                } else {
                    Handled::IgnoredReply
                }
            }
            ServerDatagram::Beats(frame) => {
                self.stats.frames += 1;
                if frame.seq <= self.highest_seq {
                    self.stats.frames_out_of_order += 1;
                } else {
                    self.highest_seq = frame.seq;
                }
                self.handle_timeline(&frame.timeline)
            }
        }
    }

    /// The next datagram to send, if one is due at `now`.
    pub fn poll_datagram(&mut self, now: ClientNanos) -> Option<ClientDatagram> {
        self.clock.poll_request(now).map(ClientDatagram::SyncRequest)
    }

    /// When [`Client::poll_datagram`] next has something.
    pub fn poll_timeout(&self) -> ClientNanos {
        self.clock.poll_timeout()
    }

    /// Starts clock sync over (after a reconnect).
    pub fn reset_sync(&mut self) {
        self.clock.reset();
    }

    /// The clock estimate at `now`.
    pub fn estimate(&self, now: ClientNanos) -> Option<Estimate> {
        self.clock.estimate(now)
    }

    /// Whether the clock is synced well enough to schedule by.
    pub fn is_synced(&self, now: ClientNanos) -> bool {
        self.clock.is_synced(now)
    }

    /// The clock estimator.
    pub fn clock(&self) -> &Estimator {
        &self.clock
    }

    /// The newest timeline.
    pub fn timeline(&self) -> Option<&Timeline> {
        self.timeline.as_ref()
    }

    /// How far ahead the server sends beats.
    pub fn lead_nanos(&self) -> u64 {
        self.lead_nanos
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The server clock at local time `now`.
    pub fn server_time(&self, now: ClientNanos) -> Option<ServerNanos> {
        self.clock.to_server(now)
    }

    /// The local time at which the server clock reads `at`.
    pub fn local_time_of(&self, at: ServerNanos) -> Option<ClientNanos> {
        self.clock.to_local(at)
    }

    /// The local instant beat `beat` sounds, if it sounds and the clock is estimated.
    pub fn local_time_of_beat(&self, beat: i64) -> Option<ClientNanos> {
        self.local_time_of(self.timeline.as_ref()?.time_of(beat)?)
    }

    /// The beats sounding in the next `horizon_nanos` of local time after `now`, placed on both
    /// clocks: what an audio scheduler should queue.
    pub fn schedule(&self, now: ClientNanos, horizon_nanos: u64) -> Vec<ScheduledBeat> {
        let (Some(timeline), Some(from)) = (self.timeline.as_ref(), self.server_time(now)) else {
            return Vec::new();
        };
        let to = from.add_nanos(horizon_nanos);
        timeline
            .beats_in(from, to)
            .filter_map(|Beat { index, at, beat_in_bar }| {
                Some(ScheduledBeat { index, beat_in_bar, server_at: at, local_at: self.local_time_of(at)? })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use downbeat_protocol::{BeatFrame, BoundedVec, Change, MicroBpm, SyncReply};

    fn frame(seq: u64, timeline: &Timeline) -> ServerDatagram {
        ServerDatagram::Beats(BeatFrame {
            seq,
            sent_at: ServerNanos(0),
            timeline: timeline.to_wire(),
            beats: BoundedVec::new(),
        })
    }

    #[test]
    fn stale_and_reordered_frames_never_apply_an_old_timeline() {
        let mut t = Timeline::new(ServerNanos(0), MicroBpm::from_bpm(120), 4).unwrap();
        let old = t.clone();
        t.apply(ServerNanos(0), Change::Start, 1_000_000_000).unwrap();
        let mut c = Client::new(clock::Config::default());
        assert_eq!(c.handle_datagram(ClientNanos(0), &frame(2, &t)), Handled::NewTimeline);
        assert_eq!(c.handle_datagram(ClientNanos(0), &frame(1, &old)), Handled::StaleTimeline);
        assert_eq!(c.handle_datagram(ClientNanos(0), &frame(2, &t)), Handled::SameTimeline);
        assert_eq!(c.timeline().unwrap().epoch(), t.epoch());
        let s = c.stats();
        assert_eq!((s.frames, s.frames_out_of_order, s.stale_timelines), (3, 2, 1));
    }

    #[test]
    fn beats_are_placed_on_the_local_clock() {
        let mut t = Timeline::new(ServerNanos(0), MicroBpm::from_bpm(120), 4).unwrap();
        t.apply(ServerNanos(0), Change::Start, 1_000_000_000).unwrap();
        let mut c = Client::new(clock::Config::default());
        c.handle_timeline(&t.to_wire());
        // Local clock is 5 s behind the server; symmetric 1 ms paths.
        let ClientDatagram::SyncRequest(req) = c.poll_datagram(ClientNanos(10_000_000)).unwrap();
        let reply =
            SyncReply { id: req.id, t0: req.t0, t1: ServerNanos(5_011_000_000), t2: ServerNanos(5_011_000_000) };
        assert_eq!(c.handle_datagram(ClientNanos(12_000_000), &ServerDatagram::SyncReply(reply)), Handled::Sample);
        assert_eq!(c.local_time_of_beat(10), Some(ClientNanos(6_000_000_000 - 5_000_000_000)));
        let sched = c.schedule(ClientNanos(1_000_000_000), 1_000_000_000);
        assert_eq!(sched.iter().map(|b| b.index).collect::<Vec<_>>(), vec![10, 11]);
        assert_eq!(sched[0].local_at, ClientNanos(1_000_000_000));
    }
}
