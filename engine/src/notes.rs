//! Notes students play, and how every classmate hears them at the same instant.
//!
//! A student's client stamps each note with `played_at`, the server-clock instant it was
//! played (from its synced clock estimate), and a per-sender sequence number from 1. Every
//! receiver sounds it at its *playout instant*, `played_at + playout delay` (the room's
//! [`RoomInfo::playout_delay_nanos`](downbeat_protocol::RoomInfo::playout_delay_nanos)), placed
//! on its own clock by the same estimate, so all classmates hear it together whatever their
//! network delay. A note that arrives after its playout instant is counted late and never
//! played out of time.
//!
//! Datagrams are unreliable, so every note datagram repeats up to [`REDUNDANT_NOTES`] earlier
//! notes whose playout instant has not yet passed: a receiver that lost one datagram still gets
//! those notes in time from the next. Copies are recognised by sequence number and ignored.
//!
//! - The client side ([`crate::client::Client::play_note`] and the note handling in
//!   [`crate::client::Client::handle_datagram`]) builds note datagrams and turns classmates'
//!   notes into [`ScheduledNote`]s.
//! - The server side ([`crate::room::Stage::handle_notes`]) validates ([`fields_in_range`],
//!   [`time_in_range`]), de-duplicates, applies mute and a per-member rate limit, and fans the
//!   new notes out with the same redundancy.

use std::collections::{BTreeMap, VecDeque};

use downbeat_protocol::{ClientNanos, Note, ServerNanos};

/// Earlier notes repeated in every note datagram, while their playout instant has not passed.
pub const REDUNDANT_NOTES: usize = 2;
/// Senders a client tracks for de-duplication at once; the least recently heard is forgotten
/// first.
pub const MAX_TRACKED_SENDERS: usize = 256;
/// A sender not heard from for this long (local time) is forgotten.
pub const SENDER_IDLE_NANOS: u64 = 60_000_000_000;
/// Scheduled notes a client holds for [`crate::client::Client::poll_note`]; beyond this the
/// oldest is discarded (nobody is polling).
pub const MAX_QUEUED_NOTES: usize = 1024;
/// How far below a sender's highest sequence number a client still recognises a note it has
/// not seen (a reordered datagram); anything older counts as already seen.
pub const SEQ_WINDOW: u32 = 64;

/// Where a note sounds: `played_at + playout_delay_nanos` on the server clock.
pub const fn playout_instant(note: &Note, playout_delay_nanos: u64) -> ServerNanos {
    note.played_at.add_nanos(playout_delay_nanos)
}

/// Whether a note's fields are in range: sequence number from 1, MIDI note 0-127, velocity
/// 1-127, instrument 0-127. Its time is checked separately ([`time_in_range`]).
pub const fn fields_in_range(note: &Note) -> bool {
    note.seq != 0 && playable(note.midi, note.velocity, note.instrument)
}

/// Whether a note with these MIDI fields can be played: note 0-127, velocity 1-127,
/// instrument 0-127. Clients check it before sending, since a refused note would otherwise
/// be repeated with the next ones.
pub const fn playable(midi: u8, velocity: u8, instrument: u8) -> bool {
    midi <= 127 && velocity >= 1 && velocity <= 127 && instrument <= 127
}

/// Whether `played_at` lies in `[now - past_window_nanos, now + future_window_nanos]`.
pub const fn time_in_range(note: &Note, now: ServerNanos, past_window_nanos: u64, future_window_nanos: u64) -> bool {
    note.played_at.0 >= now.0.saturating_sub(past_window_nanos)
        && note.played_at.0 <= now.0.saturating_add(future_window_nanos)
}

/// A classmate's note placed on both clocks: what an audio scheduler should queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScheduledNote {
    /// Who played it (their member id).
    pub from: u64,
    /// The note.
    pub note: Note,
    /// When it sounds on the server clock (its playout instant).
    pub server_at: ServerNanos,
    /// When it sounds on this client's clock.
    pub local_at: ClientNanos,
}

/// The last [`REDUNDANT_NOTES`] notes sent, for repeating in the next datagram.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct Recent(VecDeque<Note>);

impl Recent {
    /// Remembers `note` as the newest sent, forgetting the oldest beyond the limit.
    pub(crate) fn push(&mut self, note: Note) {
        self.0.push_back(note);
        while self.0.len() > REDUNDANT_NOTES {
            self.0.pop_front();
        }
    }

    /// The remembered notes whose playout instant is still after `now`, oldest first.
    pub(crate) fn live(&self, now: ServerNanos, playout_delay_nanos: u64) -> impl Iterator<Item = Note> + '_ {
        self.0.iter().copied().filter(move |n| playout_instant(n, playout_delay_nanos) > now)
    }
}

/// Which sequence numbers of one sender have been seen: the highest, and a bitmap of the
/// [`SEQ_WINDOW`] below it (bit `k - 1` for `highest - k`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SeqWindow {
    highest: u32,
    below: u64,
}

impl SeqWindow {
    /// Marks `seq` seen; true if it had not been. Sequence number 0 (never valid) and numbers
    /// more than [`SEQ_WINDOW`] below the highest count as seen.
    pub(crate) fn first_sighting(&mut self, seq: u32) -> bool {
        if seq == 0 {
            return false;
        }
        if seq > self.highest {
            let shift = seq - self.highest;
            self.below =
                if shift > SEQ_WINDOW { 0 } else { self.below.checked_shl(shift).unwrap_or(0) | (1u64 << (shift - 1)) };
            self.highest = seq;
            return true;
        }
        let back = self.highest - seq;
        if back == 0 || back > SEQ_WINDOW {
            return false;
        }
        let bit = 1u64 << (back - 1);
        let fresh = self.below & bit == 0;
        self.below |= bit;
        fresh
    }
}

#[derive(Clone, Copy, Debug)]
struct Sender {
    generation: u32,
    seen: SeqWindow,
    last_heard: ClientNanos,
}

/// A client's de-duplication state for every classmate it hears: bounded by
/// [`MAX_TRACKED_SENDERS`] and [`SENDER_IDLE_NANOS`].
#[derive(Clone, Debug, Default)]
pub(crate) struct Inbox {
    senders: BTreeMap<u64, Sender>,
}

impl Inbox {
    /// Marks note `seq` of session `generation` of `from` seen at local time `now`; true if it
    /// had not been. A newer generation (the classmate reconnected) starts afresh; notes of an
    /// older one are late copies and never new.
    pub(crate) fn first_sighting(&mut self, now: ClientNanos, from: u64, generation: u32, seq: u32) -> bool {
        if !self.senders.contains_key(&from) {
            self.senders.retain(|_, s| now.0.saturating_sub(s.last_heard.0) < SENDER_IDLE_NANOS);
            while self.senders.len() >= MAX_TRACKED_SENDERS {
                let Some(oldest) = self.senders.iter().min_by_key(|(_, s)| s.last_heard).map(|(&id, _)| id) else {
                    break;
                };
                self.senders.remove(&oldest);
            }
        }
        let sender =
            self.senders.entry(from).or_insert(Sender { generation, seen: SeqWindow::default(), last_heard: now });
        if generation < sender.generation {
            return false;
        }
        if generation > sender.generation {
            *sender = Sender { generation, seen: SeqWindow::default(), last_heard: now };
        }
        sender.last_heard = sender.last_heard.max(now);
        sender.seen.first_sighting(seq)
    }

    /// Forgets `from` (they left; a new session of theirs numbers its notes from 1 again).
    pub(crate) fn forget(&mut self, from: u64) {
        self.senders.remove(&from);
    }

    /// Senders tracked.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.senders.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(seq: u32, played_at: u64) -> Note {
        Note { seq, midi: 60, velocity: 100, instrument: 0, played_at: ServerNanos(played_at) }
    }

    #[test]
    fn ranges() {
        assert!(fields_in_range(&note(1, 0)));
        assert!(!fields_in_range(&note(0, 0)));
        assert!(!fields_in_range(&Note { midi: 128, ..note(1, 0) }));
        assert!(!fields_in_range(&Note { velocity: 0, ..note(1, 0) }));
        assert!(!fields_in_range(&Note { velocity: 128, ..note(1, 0) }));
        assert!(fields_in_range(&Note { velocity: 127, midi: 127, instrument: 127, ..note(1, 0) }));
        assert!(!fields_in_range(&Note { instrument: 128, ..note(1, 0) }));
        let now = ServerNanos(10_000);
        assert!(time_in_range(&note(1, 9_000), now, 1_000, 500));
        assert!(!time_in_range(&note(1, 8_999), now, 1_000, 500));
        assert!(time_in_range(&note(1, 10_500), now, 1_000, 500));
        assert!(!time_in_range(&note(1, 10_501), now, 1_000, 500));
        // Near zero and near the end of time, without overflow.
        assert!(time_in_range(&note(1, 0), ServerNanos(5), 1_000, 500));
        assert!(time_in_range(&note(1, u64::MAX), ServerNanos(u64::MAX), 1_000, 500));
    }

    #[test]
    fn recent_keeps_the_last_two_still_to_sound() {
        let mut r = Recent::default();
        for (seq, at) in [(1, 0), (2, 50), (3, 100)] {
            r.push(note(seq, at));
        }
        let live = |r: &Recent, now| r.live(ServerNanos(now), 80).map(|n| n.seq).collect::<Vec<_>>();
        assert_eq!(live(&r, 0), vec![2, 3]);
        assert_eq!(live(&r, 129), vec![2, 3]);
        assert_eq!(live(&r, 130), vec![3], "playout instant reached");
        assert_eq!(live(&r, 180), Vec::<u32>::new());
    }

    #[test]
    fn seq_window_recognises_copies_and_reordering() {
        let mut w = SeqWindow::default();
        assert!(!w.first_sighting(0));
        assert!(w.first_sighting(3));
        assert!(!w.first_sighting(3));
        assert!(w.first_sighting(1), "reordered, not seen");
        assert!(!w.first_sighting(1));
        assert!(w.first_sighting(2));
        assert!(w.first_sighting(70));
        assert!(!w.first_sighting(3));
        assert!(w.first_sighting(6), "64 below the highest");
        assert!(!w.first_sighting(5), "65 below: too old, counted seen");
        assert!(w.first_sighting(69));
        assert!(w.first_sighting(1_000));
        assert!(w.first_sighting(999));
        assert!(!w.first_sighting(70));
        assert!(w.first_sighting(u32::MAX));
        assert!(!w.first_sighting(u32::MAX));
    }

    #[test]
    fn inbox_is_bounded() {
        let mut inbox = Inbox::default();
        for from in 0..MAX_TRACKED_SENDERS as u64 {
            assert!(inbox.first_sighting(ClientNanos(from), from, 1, 1));
        }
        assert_eq!(inbox.len(), MAX_TRACKED_SENDERS);
        // A new sender evicts the least recently heard (sender 0).
        assert!(inbox.first_sighting(ClientNanos(1_000), 9_999, 1, 1));
        assert_eq!(inbox.len(), MAX_TRACKED_SENDERS);
        assert!(inbox.first_sighting(ClientNanos(1_001), 0, 1, 1), "sender 0 was forgotten");
        assert!(!inbox.first_sighting(ClientNanos(1_002), 5, 1, 1), "sender 5 still remembered");
        // A minute later everyone idle is swept when a new sender appears.
        let later = ClientNanos(1_002 + SENDER_IDLE_NANOS);
        assert!(inbox.first_sighting(later, 12_345, 1, 1));
        assert_eq!(inbox.len(), 1);
        inbox.forget(12_345);
        assert_eq!(inbox.len(), 0);
    }
}
