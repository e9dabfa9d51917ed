//! Recording a room: takes a teacher starts and stops, holding every note the room accepted
//! and every timeline it ran on, handed to the SEL writer about once a second as
//! [`RecordingWork`] (a recording is children's data: it goes where their other data goes).
//!
//! A take's times are offsets in nanoseconds from its start, the notes' and the segments'
//! alike, so a take read back needs no server clock ([`crate::take`] places its notes in
//! beats). Rows are numbered once per take, so a retried write stores nothing twice; what the
//! writer's queue refuses comes back ([`Recorder::restore`]) and waits for the next flush,
//! up to [`MAX_HELD_ROWS`] rows (the oldest notes go first, counted).

use downbeat_protocol::{ErrorCode, MicroBpm, PartName, RecordingInfo, ServerNanos};
use serde::{Deserialize, Serialize};

use super::output::Refused;
use super::participation::FLUSH_INTERVAL_NANOS;
use crate::timeline::Timeline;

/// Takes one room session may record.
pub const MAX_TAKES: u32 = 64;
/// Notes one take holds; the take stops by itself when it is full (everyone hears it).
pub const MAX_TAKE_NOTES: u32 = 100_000;
/// Rows held while the writer's queue is full; beyond this the oldest notes are dropped.
pub const MAX_HELD_ROWS: usize = 200_000;

/// One stretch of a take's timeline ([`downbeat_protocol::Segment`] with its start as an
/// offset from the take's start, negative when it began before).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TakeSegment {
    /// Nanoseconds from the take's start to this segment's start.
    pub offset_nanos: i64,
    /// The beat that sounds at the segment's start.
    pub start_beat: i64,
    /// The tempo.
    pub tempo: MicroBpm,
    /// Beats per bar.
    pub beats_per_bar: u8,
    /// Whether beats sound.
    pub running: bool,
    /// Bars of count-in at its start.
    pub count_in_bars: u8,
}

/// A note a take holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TakeNote {
    /// The take.
    pub take: u32,
    /// Its number in the take, from 1.
    pub seq: u32,
    /// Who played it: their token subject (pseudonymous).
    pub subject: String,
    /// Their member id in the room.
    pub member: u64,
    /// Their assigned part when they played it.
    pub part: Option<PartName>,
    /// MIDI note number.
    pub midi: u8,
    /// MIDI velocity.
    pub velocity: u8,
    /// General MIDI program.
    pub instrument: u8,
    /// Nanoseconds from the take's start to the note's `played_at`.
    pub offset_nanos: i64,
    /// When the room accepted it (server clock), for the row's wall-clock time.
    pub accepted_at: ServerNanos,
}

/// One row of a take to store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TakeRow {
    /// A take started.
    Started {
        /// The take.
        take: u32,
        /// When (server clock).
        at: ServerNanos,
    },
    /// The timeline the take runs on, as it started and after every change while it runs.
    Timeline {
        /// The take.
        take: u32,
        /// The timeline's epoch (the rows' order).
        epoch: u64,
        /// Its segments.
        segments: Vec<TakeSegment>,
    },
    /// A note.
    Note(TakeNote),
    /// The take stopped.
    Stopped {
        /// The take.
        take: u32,
        /// When (server clock).
        at: ServerNanos,
        /// Its length in nanoseconds.
        length_nanos: u64,
        /// Notes it holds.
        notes: u32,
    },
}

/// What one recording flush hands the SEL writer, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordingWork {
    /// The rows.
    pub rows: Vec<TakeRow>,
}

/// The take running now.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Running {
    take: u32,
    started_at: ServerNanos,
    notes: u32,
    /// Added to each note's number: grows at each resume on another node, past any note the
    /// old node recorded after the handover was written.
    #[serde(default)]
    seq_base: u32,
}

/// How far a running take's note numbers jump at each resume: past a whole take's notes.
const SEQ_JUMP: u32 = 1 << 20;

/// See the module docs.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Recorder {
    running: Option<Running>,
    /// Takes started this room session.
    takes: u32,
    held: Vec<TakeRow>,
    /// Notes dropped because `held` was full, not yet reported ([`Recorder::take_dropped`]).
    dropped: u64,
    flush_due: Option<ServerNanos>,
}

/// What a note handed to [`Recorder::note`] did to the take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Recorded {
    /// Nothing is recording (or the note was played before the take started).
    No,
    /// Recorded.
    Yes,
    /// Recorded, and the take is full: it stopped.
    Full,
}

impl Recorder {
    /// The take running now, as members see it.
    pub(crate) fn info(&self) -> Option<RecordingInfo> {
        self.running.as_ref().map(|r| RecordingInfo { take: r.take, started_at: r.started_at })
    }

    /// When the next flush is due, if anything waits.
    pub(crate) fn flush_due(&self) -> Option<ServerNanos> {
        self.flush_due
    }

    /// Starts a take at `now` on `timeline`.
    pub(crate) fn start(&mut self, now: ServerNanos, timeline: &Timeline) -> Result<RecordingInfo, Refused> {
        if self.running.is_some() {
            return Err(Refused::new(ErrorCode::AlreadyRecording, "the room is already recording"));
        }
        if self.takes >= MAX_TAKES {
            return Err(Refused::new(
                ErrorCode::TooManyRecordings,
                format!("a room session holds at most {MAX_TAKES} recordings"),
            ));
        }
        self.takes += 1;
        let running = Running { take: self.takes, started_at: now, notes: 0, seq_base: 0 };
        self.hold(TakeRow::Started { take: running.take, at: now });
        self.hold(timeline_row(&running, timeline));
        self.running = Some(running);
        self.dirty(now);
        Ok(RecordingInfo { take: self.takes, started_at: now })
    }

    /// Stops the take at `now`; its rows are flushed at once.
    pub(crate) fn stop(&mut self, now: ServerNanos) -> Result<(), Refused> {
        let running =
            self.running.take().ok_or_else(|| Refused::new(ErrorCode::NotRecording, "nothing is recording"))?;
        self.hold(TakeRow::Stopped {
            take: running.take,
            at: now,
            length_nanos: now.0.saturating_sub(running.started_at.0),
            notes: running.notes,
        });
        self.flush_due = Some(now);
        Ok(())
    }

    /// The timeline changed at `now`: a running take keeps the new one.
    pub(crate) fn timeline(&mut self, now: ServerNanos, timeline: &Timeline) {
        let Some(running) = &self.running else { return };
        let row = timeline_row(running, timeline);
        self.hold(row);
        self.dirty(now);
    }

    /// A note the room accepted at `now` from `member` (`subject`, playing `part`).
    pub(crate) fn note(
        &mut self,
        now: ServerNanos,
        subject: &str,
        member: u64,
        part: Option<&PartName>,
        note: &downbeat_protocol::Note,
    ) -> Recorded {
        let Some(running) = &mut self.running else { return Recorded::No };
        if note.played_at < running.started_at {
            return Recorded::No;
        }
        running.notes += 1;
        let row = TakeNote {
            take: running.take,
            seq: running.notes.saturating_add(running.seq_base),
            subject: subject.to_owned(),
            member,
            part: part.cloned(),
            midi: note.midi,
            velocity: note.velocity,
            instrument: note.instrument,
            offset_nanos: offset(note.played_at, running.started_at),
            accepted_at: now,
        };
        let full = running.notes >= MAX_TAKE_NOTES;
        self.hold(TakeRow::Note(row));
        self.dirty(now);
        if full {
            // Cannot fail: a take is running.
            let _ = self.stop(now);
            return Recorded::Full;
        }
        Recorded::Yes
    }

    /// The room is handed to another node: the rows held for the writer stay here.
    pub(crate) fn handed_over(&mut self) {
        self.held.clear();
        self.dropped = 0;
        self.flush_due = None;
    }

    /// The room resumes on another node: a running take goes on, its notes numbered past any
    /// the old node recorded.
    pub(crate) fn resumed(&mut self) {
        if let Some(running) = &mut self.running {
            running.seq_base = running.seq_base.saturating_add(SEQ_JUMP);
        }
    }

    /// Takes everything waiting. `None` if nothing does.
    pub(crate) fn take_flush(&mut self) -> Option<RecordingWork> {
        self.flush_due = None;
        (!self.held.is_empty()).then(|| RecordingWork { rows: std::mem::take(&mut self.held) })
    }

    /// Takes back work the writer could not queue: it goes out with the next flush, first.
    pub(crate) fn restore(&mut self, now: ServerNanos, work: RecordingWork) {
        let mut rows = work.rows;
        rows.append(&mut self.held);
        self.held = rows;
        self.trim();
        self.dirty(now);
    }

    /// The notes dropped because too many rows were held (the writer's queue stayed full)
    /// since the last call: the shell counts them in its metrics.
    pub(crate) fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }

    /// Forgets every note of `subject` not yet handed over (their data is being deleted).
    pub(crate) fn forget(&mut self, subject: &str) {
        self.held.retain(|row| !matches!(row, TakeRow::Note(n) if n.subject == subject));
    }

    fn hold(&mut self, row: TakeRow) {
        self.held.push(row);
        self.trim();
    }

    /// Drops the oldest held notes beyond [`MAX_HELD_ROWS`]; a take's start, timelines and
    /// stop are kept.
    fn trim(&mut self) {
        let mut excess = self.held.len().saturating_sub(MAX_HELD_ROWS);
        if excess == 0 {
            return;
        }
        let before = self.held.len();
        self.held.retain(|row| {
            if excess > 0 && matches!(row, TakeRow::Note(_)) {
                excess -= 1;
                false
            } else {
                true
            }
        });
        self.dropped += (before - self.held.len()) as u64;
    }

    fn dirty(&mut self, now: ServerNanos) {
        self.flush_due.get_or_insert(now.add_nanos(FLUSH_INTERVAL_NANOS));
    }
}

/// `at` as nanoseconds from `start`.
fn offset(at: ServerNanos, start: ServerNanos) -> i64 {
    if at >= start {
        i64::try_from(at.0 - start.0).unwrap_or(i64::MAX)
    } else {
        i64::try_from(start.0 - at.0).map_or(i64::MIN, |d| -d)
    }
}

fn timeline_row(running: &Running, timeline: &Timeline) -> TakeRow {
    let segments = timeline
        .segments()
        .iter()
        .map(|s| TakeSegment {
            offset_nanos: offset(s.start, running.started_at),
            start_beat: s.start_beat,
            tempo: s.tempo,
            beats_per_bar: s.beats_per_bar,
            running: s.running,
            count_in_bars: s.count_in_bars,
        })
        .collect();
    TakeRow::Timeline { take: running.take, epoch: timeline.epoch(), segments }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note_row(seq: u32) -> TakeRow {
        TakeRow::Note(TakeNote {
            take: 1,
            seq,
            subject: "s".to_owned(),
            member: 2,
            part: None,
            midi: 60,
            velocity: 100,
            instrument: 0,
            offset_nanos: i64::from(seq),
            accepted_at: ServerNanos(u64::from(seq)),
        })
    }

    #[test]
    fn notes_dropped_past_the_held_rows_are_counted_once() {
        let mut recorder = Recorder::default();
        assert_eq!(recorder.take_dropped(), 0);
        let mut rows = vec![TakeRow::Started { take: 1, at: ServerNanos(0) }];
        rows.extend((1..=(MAX_HELD_ROWS as u32 + 4)).map(note_row));
        recorder.restore(ServerNanos(1), RecordingWork { rows });
        // The start is kept; the five oldest notes go.
        assert_eq!(recorder.take_dropped(), 5);
        assert_eq!(recorder.take_dropped(), 0, "reported once");
        let work = recorder.take_flush().expect("rows held");
        assert_eq!(work.rows.len(), MAX_HELD_ROWS);
        assert!(matches!(work.rows[0], TakeRow::Started { .. }));
        assert!(matches!(&work.rows[1], TakeRow::Note(n) if n.seq == 6));
    }
}
