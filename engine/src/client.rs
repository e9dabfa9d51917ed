//! The client state machine: clock sync, the newest timeline, and notes.
//!
//! Feed it every datagram and control message the server sends, ask it which datagram to
//! send next, and it answers "at what instant of my own clock does beat n sound". The same
//! code runs in native clients and, compiled to wasm, in the browser, inside a
//! [`crate::session::Session`] that gives the control stream its meaning (requests, presence,
//! the prompt); the simulation and the benchmark drive it directly.
//!
//! Notes (see [`crate::notes`]): [`Client::play_note`] stamps a note the student played with
//! the server-clock instant and a sequence number and returns the datagram to send (repeating
//! the last notes still to sound). Classmates' notes arrive as [`ServerDatagram::Notes`];
//! each new one is placed at its playout instant on the local clock and queued for
//! [`Client::poll_note`], or counted late if that instant is already (nearly) past.

use std::collections::VecDeque;

use downbeat_protocol::{
    Beat, BoundedVec, ClientDatagram, ClientNanos, ClientReport, Note, NoteFrame, ServerDatagram, ServerNanos,
    SyncQuality, SyncRequest, Timeline as WireTimeline, Welcome,
};

use crate::clock::{self, Estimate, Estimator};
use crate::notes::{self, Inbox, MAX_QUEUED_NOTES, Recent, ScheduledNote};
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
    /// A classmate's notes.
    Notes {
        /// New notes queued for [`Client::poll_note`].
        scheduled: u32,
        /// New notes whose playout instant had (nearly) passed, or that could not be placed
        /// because the clock is not estimated yet; not scheduled.
        late: u32,
        /// Copies of notes already handled, ignored.
        duplicates: u32,
    },
}

/// A beat placed on both clocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScheduledBeat {
    /// The beat number.
    pub index: i64,
    /// Its position in the bar.
    pub beat_in_bar: u8,
    /// Whether it is a count-in click.
    pub count_in: bool,
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
    /// Classmates' notes scheduled on time.
    pub notes_scheduled: u64,
    /// Classmates' notes that arrived too late to play (not scheduled).
    pub notes_late: u64,
    /// Copies of classmates' notes already handled (redundancy), ignored.
    pub notes_duplicate: u64,
    /// Notes this client played ([`Client::play_note`]).
    pub notes_sent: u64,
}

/// How old a new server's welcome may be on arrival, by a previous session's clock estimate,
/// for [`Client::carry_clock`] to keep that estimate: far more than a welcome takes to arrive
/// from a server busy with hundreds of handshakes at once (half a second on the two cores of
/// the cluster benchmark), far less than a restarted server's count lags the old one's (the
/// old one's whole run, joins and sync included, plus the restart).
pub const CARRY_MAX_AGE_NANOS: u64 = 1_000_000_000;

/// How far ahead of a previous session's estimate a new server's welcome may be stamped for
/// [`Client::carry_clock`] to keep it. A welcome is stamped before it is sent, so on the same
/// time base it can only look ahead by the estimate's own error, which is well under a
/// millisecond after a lesson's worth of samples and grows only with drift left unmodelled
/// while away.
pub const CARRY_MAX_AHEAD_NANOS: u64 = 50_000_000;

/// One client's view of its room. See the module docs.
#[derive(Clone, Debug)]
pub struct Client {
    clock: Estimator,
    timeline: Option<Timeline>,
    lead_nanos: u64,
    highest_seq: u64,
    stats: Stats,
    playout_delay_nanos: u64,
    schedule_margin_nanos: u64,
    next_note_seq: u32,
    sent_notes: Recent,
    inbox: Inbox,
    scheduled_notes: VecDeque<ScheduledNote>,
}

impl Client {
    /// A client with nothing known yet.
    pub fn new(config: clock::Config) -> Self {
        Self {
            clock: Estimator::new(config),
            timeline: None,
            lead_nanos: 0,
            highest_seq: 0,
            stats: Stats::default(),
            playout_delay_nanos: 0,
            schedule_margin_nanos: 0,
            next_note_seq: 1,
            sent_notes: Recent::default(),
            inbox: Inbox::default(),
            scheduled_notes: VecDeque::new(),
        }
    }

    /// Takes the server's welcome: the timeline, how far ahead beats come, and the room's
    /// playout delay for notes.
    pub fn handle_welcome(&mut self, welcome: &Welcome) {
        self.lead_nanos = welcome.lead_nanos;
        self.playout_delay_nanos = welcome.room.playout_delay_nanos;
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
            ServerDatagram::Notes(frame) => self.handle_notes(now, frame),
        }
    }

    fn handle_notes(&mut self, now: ClientNanos, frame: &NoteFrame) -> Handled {
        let (mut scheduled, mut late, mut duplicates) = (0u32, 0u32, 0u32);
        let server_now = self.server_time(now);
        for &note in frame.notes.iter() {
            if !self.inbox.first_sighting(now, frame.from, frame.generation, note.seq) {
                duplicates += 1;
                continue;
            }
            let server_at = notes::playout_instant(&note, self.playout_delay_nanos);
            let deadline = server_at.0.saturating_sub(self.schedule_margin_nanos);
            let local_at = match server_now {
                Some(server_now) if server_now.0 < deadline => self.local_time_of(server_at),
                _ => None,
            };
            let Some(local_at) = local_at else {
                late += 1;
                continue;
            };
            if self.scheduled_notes.len() >= MAX_QUEUED_NOTES {
                self.scheduled_notes.pop_front();
            }
            self.scheduled_notes.push_back(ScheduledNote { from: frame.from, note, server_at, local_at });
            scheduled += 1;
        }
        self.stats.notes_scheduled += u64::from(scheduled);
        self.stats.notes_late += u64::from(late);
        self.stats.notes_duplicate += u64::from(duplicates);
        Handled::Notes { scheduled, late, duplicates }
    }

    /// The student played a note at local time `now`: stamps it with the server-clock instant
    /// (`played_at`) and the next sequence number (from 1), and returns it with the datagram to
    /// send, which repeats up to [`notes::REDUNDANT_NOTES`] earlier notes whose playout
    /// instant has not passed (oldest first). `None` while the clock is not estimated yet.
    ///
    /// Ranges are not checked here: the server refuses a datagram holding a note out of range
    /// (MIDI note or instrument above 127, velocity 0 or above 127) with
    /// [`ErrorCode::NoteOutOfRange`](downbeat_protocol::ErrorCode::NoteOutOfRange).
    pub fn play_note(
        &mut self,
        now: ClientNanos,
        midi: u8,
        velocity: u8,
        instrument: u8,
    ) -> Option<(Note, ClientDatagram)> {
        let played_at = self.server_time(now)?;
        let seq = self.next_note_seq;
        // Wraps after four billion notes, skipping 0 (never valid).
        self.next_note_seq = seq.checked_add(1).unwrap_or(1);
        let note = Note { seq, midi, velocity, instrument, played_at };
        let mut notes: Vec<Note> = self.sent_notes.live(played_at, self.playout_delay_nanos).collect();
        notes.push(note);
        self.sent_notes.push(note);
        self.stats.notes_sent += 1;
        // Cannot fail: at most REDUNDANT_NOTES + 1 notes, within the wire cap.
        Some((note, ClientDatagram::Notes(BoundedVec::try_from_vec(notes).unwrap_or_default())))
    }

    /// The next classmate's note to sound, in arrival order. Drain it after every
    /// [`Handled::Notes`]; at most [`notes::MAX_QUEUED_NOTES`] wait, the oldest is discarded
    /// beyond that.
    pub fn poll_note(&mut self) -> Option<ScheduledNote> {
        self.scheduled_notes.pop_front()
    }

    /// How long before a note's playout instant it must arrive to be scheduled rather than
    /// counted late (default 0): the time the audio output needs to queue a sound.
    pub fn set_schedule_margin(&mut self, nanos: u64) {
        self.schedule_margin_nanos = nanos;
    }

    /// The schedule margin ([`Client::set_schedule_margin`]).
    pub fn schedule_margin_nanos(&self) -> u64 {
        self.schedule_margin_nanos
    }

    /// The room's playout delay, from the welcome (0 before it).
    pub fn playout_delay_nanos(&self) -> u64 {
        self.playout_delay_nanos
    }

    /// Forgets which of `member`'s notes were seen. Call when they leave (or rejoin in a new
    /// session): a new session numbers its notes from 1 again.
    pub fn forget_sender(&mut self, member: u64) {
        self.inbox.forget(member);
    }

    /// The next datagram to send, if one is due at `now`: a clock-sync request, naming the
    /// timeline held so that a server can repair a stale one at once.
    pub fn poll_datagram(&mut self, now: ClientNanos) -> Option<ClientDatagram> {
        let epoch = self.timeline.as_ref().map_or(0, Timeline::epoch);
        self.clock.poll_request(now).map(|request| ClientDatagram::SyncRequest(SyncRequest { epoch, ..request }))
    }

    /// When [`Client::poll_datagram`] next has something.
    pub fn poll_timeout(&self) -> ClientNanos {
        self.clock.poll_timeout()
    }

    /// Starts clock sync over (after a reconnect).
    pub fn reset_sync(&mut self) {
        self.clock.reset();
    }

    /// A new session of the same member (a reconnect, or its room moved to another node of a
    /// cluster): keeps `previous`'s clock estimate if the server it reached keeps the same
    /// time base, which the welcome tells: the server's time when it welcomed
    /// (`welcome_server_now`), seen at `arrived`, is at most [`CARRY_MAX_AGE_NANOS`] behind the
    /// estimate and at most [`CARRY_MAX_AHEAD_NANOS`] ahead of it (a welcome is stamped before
    /// it travels, so it lags by its delay). Then the beats stay exactly where they were, rather than
    /// moving by a fresh estimate's error, and new samples refine the estimate as before.
    /// Otherwise (a server that restarted counts its time anew) sync starts over. Whether it
    /// was kept.
    pub fn carry_clock(&mut self, previous: &Estimator, welcome_server_now: ServerNanos, arrived: ClientNanos) -> bool {
        let Some(expected) = previous.to_server(arrived) else { return false };
        let age = i128::from(expected.0) - i128::from(welcome_server_now.0);
        if age > i128::from(CARRY_MAX_AGE_NANOS) || age < -i128::from(CARRY_MAX_AHEAD_NANOS) {
            return false;
        }
        self.clock = previous.carried();
        true
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

    /// What to tell the server (and so the teacher) about this client at `now`: its sync
    /// quality and how many classmates' notes it scheduled or got too late. Counts saturate.
    pub fn report(&self, now: ClientNanos) -> ClientReport {
        let micros = |nanos: u64| u32::try_from(nanos / 1000).unwrap_or(u32::MAX);
        let sync = self.estimate(now).map_or(SyncQuality::default(), |e| SyncQuality {
            synced: self.is_synced(now),
            rtt_micros: micros(e.rtt_nanos),
            uncertainty_micros: micros(e.uncertainty_nanos),
        });
        ClientReport {
            sync,
            notes_played: u32::try_from(self.stats.notes_scheduled).unwrap_or(u32::MAX),
            notes_late: u32::try_from(self.stats.notes_late).unwrap_or(u32::MAX),
        }
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
            .filter_map(|Beat { index, at, beat_in_bar, count_in }| {
                Some(ScheduledBeat { index, beat_in_bar, count_in, server_at: at, local_at: self.local_time_of(at)? })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use downbeat_protocol::{BeatFrame, Change, MicroBpm, SyncReply};

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
        t.apply(ServerNanos(0), Change::Start { count_in_bars: 0 }, 1_000_000_000).unwrap();
        let mut c = Client::new(clock::Config::default());
        assert_eq!(c.handle_datagram(ClientNanos(0), &frame(2, &t)), Handled::NewTimeline);
        assert_eq!(c.handle_datagram(ClientNanos(0), &frame(1, &old)), Handled::StaleTimeline);
        assert_eq!(c.handle_datagram(ClientNanos(0), &frame(2, &t)), Handled::SameTimeline);
        assert_eq!(c.timeline().unwrap().epoch(), t.epoch());
        let s = c.stats();
        assert_eq!((s.frames, s.frames_out_of_order, s.stale_timelines), (3, 2, 1));
    }

    #[test]
    fn a_sync_request_names_the_timeline_held() {
        let mut c = Client::new(clock::Config::default());
        let Some(ClientDatagram::SyncRequest(req)) = c.poll_datagram(ClientNanos(0)) else { panic!() };
        assert_eq!(req.epoch, 0, "no timeline yet");
        let mut t = Timeline::new(ServerNanos(0), MicroBpm::from_bpm(120), 4).unwrap();
        t.apply(ServerNanos(0), Change::Start { count_in_bars: 0 }, 1_000_000_000).unwrap();
        t.apply(ServerNanos(0), Change::SetTempo(MicroBpm::from_bpm(90)), 1_000_000_000).unwrap();
        c.handle_timeline(&t.to_wire());
        let Some(ClientDatagram::SyncRequest(req)) = c.poll_datagram(ClientNanos(u64::MAX / 2)) else { panic!() };
        assert_eq!(req.epoch, t.epoch());
        assert!(req.epoch >= 2);
    }

    #[test]
    fn beats_are_placed_on_the_local_clock() {
        let mut t = Timeline::new(ServerNanos(0), MicroBpm::from_bpm(120), 4).unwrap();
        t.apply(ServerNanos(0), Change::Start { count_in_bars: 0 }, 1_000_000_000).unwrap();
        let mut c = Client::new(clock::Config::default());
        c.handle_timeline(&t.to_wire());
        // Local clock is 5 s behind the server; symmetric 1 ms paths.
        let Some(ClientDatagram::SyncRequest(req)) = c.poll_datagram(ClientNanos(10_000_000)) else { panic!() };
        let reply =
            SyncReply { id: req.id, t0: req.t0, t1: ServerNanos(5_011_000_000), t2: ServerNanos(5_011_000_000) };
        assert_eq!(c.handle_datagram(ClientNanos(12_000_000), &ServerDatagram::SyncReply(reply)), Handled::Sample);
        assert_eq!(c.local_time_of_beat(10), Some(ClientNanos(6_000_000_000 - 5_000_000_000)));
        let sched = c.schedule(ClientNanos(1_000_000_000), 1_000_000_000);
        assert_eq!(sched.iter().map(|b| b.index).collect::<Vec<_>>(), vec![10, 11]);
        assert_eq!(sched[0].local_at, ClientNanos(1_000_000_000));
    }

    const MS: u64 = 1_000_000;

    fn welcome(playout_delay_nanos: u64) -> Welcome {
        Welcome {
            version: downbeat_protocol::PROTOCOL_VERSION,
            member_id: 7,
            role: downbeat_protocol::Role::Student,
            room: downbeat_protocol::RoomInfo {
                code: downbeat_protocol::BoundedString::truncating("K7QFM3XP"),
                name: downbeat_protocol::BoundedString::truncating("Room 12"),
                playout_delay_nanos,
            },
            timeline: Timeline::new(ServerNanos(0), MicroBpm::from_bpm(120), 4).unwrap().to_wire(),
            members: BoundedVec::new(),
            lead_nanos: 1_500 * MS,
            server_now: ServerNanos(0),
            token_expires_at: 0,
        }
    }

    /// A client with an 80 ms playout delay whose clock reads exactly 5 s behind the server's.
    fn synced_client() -> Client {
        let mut c = Client::new(clock::Config::default());
        c.handle_welcome(&welcome(80 * MS));
        let Some(ClientDatagram::SyncRequest(req)) = c.poll_datagram(ClientNanos(10 * MS)) else { panic!() };
        let t = ServerNanos(5_011 * MS);
        let reply = SyncReply { id: req.id, t0: req.t0, t1: t, t2: t };
        assert_eq!(c.handle_datagram(ClientNanos(12 * MS), &ServerDatagram::SyncReply(reply)), Handled::Sample);
        c
    }

    #[test]
    fn a_new_session_keeps_the_estimate_if_its_welcome_is_on_the_same_time_base() {
        let previous = synced_client().clock().clone();
        // At local 20 s the estimate says server 25 s. A welcome stamped then is seen later,
        // by its delay: an old one (a node busy with a reconnect storm) still shares the base;
        // one stamped ahead of the estimate beyond its error, or far behind (a server that
        // restarted and counts from its start), does not.
        let arrived = ClientNanos(20_000 * MS);
        for (stamped_ms, kept) in [
            (25_000, true),
            (24_400, true),
            (24_001, true),
            (25_030, true),
            (23_900, false),
            (25_100, false),
            (3_000, false),
        ] {
            let mut c = Client::new(clock::Config::default());
            assert_eq!(
                c.carry_clock(&previous, ServerNanos(stamped_ms * MS), arrived),
                kept,
                "stamped {stamped_ms} ms"
            );
            assert_eq!(c.estimate(arrived).is_some(), kept, "stamped {stamped_ms} ms");
        }
    }

    fn notes_of(d: &ClientDatagram) -> Vec<(u32, u64)> {
        let ClientDatagram::Notes(notes) = d else { panic!("{d:?}") };
        notes.iter().map(|n| (n.seq, n.played_at.0 / MS)).collect()
    }

    #[test]
    fn played_notes_are_stamped_numbered_and_repeated_while_still_to_sound() {
        let mut c = Client::new(clock::Config::default());
        assert_eq!(c.play_note(ClientNanos(0), 60, 100, 0), None, "no clock estimate yet");
        let mut c = synced_client();
        assert_eq!(c.playout_delay_nanos(), 80 * MS);
        let (note, d) = c.play_note(ClientNanos(1_000 * MS), 60, 100, 3).unwrap();
        assert_eq!(note, Note { seq: 1, midi: 60, velocity: 100, instrument: 3, played_at: ServerNanos(6_000 * MS) });
        assert_eq!(notes_of(&d), vec![(1, 6_000)]);
        let d = c.play_note(ClientNanos(1_030 * MS), 62, 100, 3).unwrap().1;
        assert_eq!(notes_of(&d), vec![(1, 6_000), (2, 6_030)]);
        let d = c.play_note(ClientNanos(1_060 * MS), 64, 100, 3).unwrap().1;
        assert_eq!(notes_of(&d), vec![(1, 6_000), (2, 6_030), (3, 6_060)]);
        // Note 1 sounds at 6080 ms: at 6080 it is no longer repeated; two back at most.
        let d = c.play_note(ClientNanos(1_080 * MS), 65, 100, 3).unwrap().1;
        assert_eq!(notes_of(&d), vec![(2, 6_030), (3, 6_060), (4, 6_080)]);
        let d = c.play_note(ClientNanos(2_000 * MS), 67, 100, 3).unwrap().1;
        assert_eq!(notes_of(&d), vec![(5, 7_000)]);
        // Ranges are the server's to check.
        let (bad, _) = c.play_note(ClientNanos(2_000 * MS), 200, 0, 255).unwrap();
        assert_eq!((bad.seq, bad.midi, bad.velocity, bad.instrument), (6, 200, 0, 255));
        assert_eq!(c.stats().notes_sent, 6);
    }

    fn note_frame(from: u64, notes: &[(u32, u64)]) -> ServerDatagram {
        note_frame_of(from, 1, notes)
    }

    fn note_frame_of(from: u64, generation: u32, notes: &[(u32, u64)]) -> ServerDatagram {
        let notes = notes
            .iter()
            .map(|&(seq, ms)| Note { seq, midi: 60, velocity: 90, instrument: 0, played_at: ServerNanos(ms * MS) })
            .collect();
        ServerDatagram::Notes(NoteFrame { from, generation, notes: BoundedVec::try_from_vec(notes).unwrap() })
    }

    fn drain(c: &mut Client) -> Vec<(u64, u32, u64, u64)> {
        std::iter::from_fn(|| c.poll_note())
            .map(|n| (n.from, n.note.seq, n.server_at.0 / MS, n.local_at.0 / MS))
            .collect()
    }

    #[test]
    fn classmates_notes_are_scheduled_at_their_playout_instant_or_counted_late() {
        let mut c = synced_client();
        // Local 1000 ms is server 6000 ms. A note played at 5950 sounds at 6030 (local 1030).
        let h = c.handle_datagram(ClientNanos(1_000 * MS), &note_frame(3, &[(1, 5_950)]));
        assert_eq!(h, Handled::Notes { scheduled: 1, late: 0, duplicates: 0 });
        assert_eq!(drain(&mut c), vec![(3, 1, 6_030, 1_030)]);
        // Its copy plus a new note; a note whose instant is exactly now is late.
        let h = c.handle_datagram(ClientNanos(1_000 * MS), &note_frame(3, &[(1, 5_950), (2, 5_920), (3, 5_960)]));
        assert_eq!(h, Handled::Notes { scheduled: 1, late: 1, duplicates: 1 });
        assert_eq!(drain(&mut c), vec![(3, 3, 6_040, 1_040)]);
        // A reordered older note not seen before still counts; 0 is never a note.
        let h = c.handle_datagram(ClientNanos(1_000 * MS), &note_frame(5, &[(5, 5_990)]));
        assert_eq!(h, Handled::Notes { scheduled: 1, late: 0, duplicates: 0 });
        let h = c.handle_datagram(ClientNanos(1_000 * MS), &note_frame(5, &[(4, 5_985), (5, 5_990), (0, 5_990)]));
        assert_eq!(h, Handled::Notes { scheduled: 1, late: 0, duplicates: 2 });
        assert_eq!(drain(&mut c), vec![(5, 5, 6_070, 1_070), (5, 4, 6_065, 1_065)], "in arrival order");
        // Other senders number independently.
        let h = c.handle_datagram(ClientNanos(1_000 * MS), &note_frame(4, &[(1, 5_990), (2, 5_995)]));
        assert_eq!(h, Handled::Notes { scheduled: 2, late: 0, duplicates: 0 });
        assert_eq!(drain(&mut c), vec![(4, 1, 6_070, 1_070), (4, 2, 6_075, 1_075)]);
        // The schedule margin: a note must arrive that much before its instant.
        c.set_schedule_margin(10 * MS);
        assert_eq!(c.schedule_margin_nanos(), 10 * MS);
        let h = c.handle_datagram(ClientNanos(1_000 * MS), &note_frame(4, &[(3, 5_930), (4, 5_931)]));
        assert_eq!(h, Handled::Notes { scheduled: 1, late: 1, duplicates: 0 });
        assert_eq!(drain(&mut c), vec![(4, 4, 6_011, 1_011)]);
        let s = c.stats();
        assert_eq!((s.notes_scheduled, s.notes_late, s.notes_duplicate), (7, 2, 3));
        // A member who left and came back numbers from 1 again.
        c.forget_sender(4);
        let h = c.handle_datagram(ClientNanos(1_000 * MS), &note_frame(4, &[(1, 5_999)]));
        assert_eq!(h, Handled::Notes { scheduled: 1, late: 0, duplicates: 0 });
        // A classmate who reconnected (a newer generation) numbers from 1 again without any
        // leave; late copies from their previous session are ignored.
        let h = c.handle_datagram(ClientNanos(1_000 * MS), &note_frame_of(5, 2, &[(1, 5_991)]));
        assert_eq!(h, Handled::Notes { scheduled: 1, late: 0, duplicates: 0 });
        let h = c.handle_datagram(ClientNanos(1_000 * MS), &note_frame_of(5, 1, &[(6, 5_992)]));
        assert_eq!(h, Handled::Notes { scheduled: 0, late: 0, duplicates: 1 });
        let h = c.handle_datagram(ClientNanos(1_000 * MS), &note_frame_of(5, 2, &[(1, 5_991), (2, 5_993)]));
        assert_eq!(h, Handled::Notes { scheduled: 1, late: 0, duplicates: 1 });
    }

    #[test]
    fn notes_before_the_clock_is_estimated_are_late() {
        let mut c = Client::new(clock::Config::default());
        c.handle_welcome(&welcome(80 * MS));
        let h = c.handle_datagram(ClientNanos(0), &note_frame(3, &[(1, 0), (2, 1)]));
        assert_eq!(h, Handled::Notes { scheduled: 0, late: 2, duplicates: 0 });
        assert_eq!(c.poll_note(), None);
    }
}
