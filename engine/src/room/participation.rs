//! A room session's participation as the SEL store will hold it: students joining and
//! leaving, and their accepted notes placed on the timeline ([`crate::sel`]), counted in
//! memory and handed over as one [`Flush`] about once a second ([`FLUSH_INTERVAL_NANOS`]).
//!
//! Nothing here waits: a flush the writer's queue cannot take comes back
//! ([`Participation::restore`]) and is folded into the counts for the next one, so a slow
//! database costs memory bounded by the number of students, not by the number of notes.
//! Records are numbered once, in one sequence per room session, which makes the store's
//! writes idempotent.

use std::collections::BTreeMap;

use downbeat_protocol::{ParticipationNotice, ServerMessage, ServerNanos};
use serde::{Deserialize, Serialize};

use crate::sel::{Tally, TurnTracker, count_note};
use crate::timeline::Timeline;

/// How often counted participation is flushed while notes are played.
pub const FLUSH_INTERVAL_NANOS: u64 = 1_000_000_000;
/// Joined/left records held while the writer's queue is full; beyond this the oldest go.
const MAX_HELD_EVENTS: usize = 4096;

/// What a participation record says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordKind {
    /// The student took a new seat.
    Joined,
    /// The student's seat was freed.
    Left,
    /// Notes counted since the last flush (in [`Record::tally`]).
    Notes,
}

/// One participation row to store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Its number in the room session (unique, increasing).
    pub seq: i64,
    /// The student's token subject.
    pub subject: String,
    /// What happened.
    pub kind: RecordKind,
    /// When, on the server clock.
    pub at: ServerNanos,
    /// The notes counted (empty for joined and left).
    pub tally: Tally,
}

/// What one flush hands the SEL writer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flush {
    /// The room session starts with this flush (its first): store its row.
    pub opens: bool,
    /// Participation records in sequence order.
    pub records: Vec<Record>,
    /// The room session ends with this flush (the room closed).
    pub closes: bool,
    /// Totals of the students whose counts changed, for the teachers' feed once committed.
    pub notices: Vec<ParticipationNotice>,
}

impl Flush {
    /// The feed message to send the teachers once this flush is committed.
    pub fn feed(&self) -> Option<ServerMessage> {
        super::output::feed_message(&self.notices)
    }
}

/// One student's participation in this room session.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Student {
    /// Their member id (the latest, should they have left and come back).
    member_id: u64,
    /// Everything this room session.
    total: Tally,
    /// Not yet handed to the writer.
    pending: Tally,
    turns: TurnTracker,
    /// Changed since the teachers' last participation update.
    changed: bool,
}

/// See the module docs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Participation {
    /// The room session's opening is still to be handed over.
    opening: bool,
    next_seq: i64,
    /// Joined/left records not yet handed over.
    events: Vec<Record>,
    /// Events dropped because `events` was full.
    events_dropped: u64,
    students: BTreeMap<String, Student>,
    flush_due: Option<ServerNanos>,
}

impl Participation {
    /// A room session starting at `now`: its opening goes out with the first flush, at once.
    pub(crate) fn new(now: ServerNanos) -> Self {
        Self {
            opening: true,
            next_seq: 1,
            events: Vec::new(),
            events_dropped: 0,
            students: BTreeMap::new(),
            flush_due: Some(now),
        }
    }

    /// When the next flush is due, if anything waits.
    pub(crate) fn flush_due(&self) -> Option<ServerNanos> {
        self.flush_due
    }

    fn dirty(&mut self, now: ServerNanos) {
        self.flush_due.get_or_insert(now.add_nanos(FLUSH_INTERVAL_NANOS));
    }

    /// A student took a new seat (not a resumed one).
    pub(crate) fn joined(&mut self, now: ServerNanos, subject: &str, member_id: u64) {
        self.students.entry(subject.to_owned()).or_default().member_id = member_id;
        self.event(now, subject, RecordKind::Joined);
    }

    /// A student's seat was freed.
    pub(crate) fn left(&mut self, now: ServerNanos, subject: &str) {
        self.event(now, subject, RecordKind::Left);
    }

    fn event(&mut self, now: ServerNanos, subject: &str, kind: RecordKind) {
        if self.events.len() >= MAX_HELD_EVENTS {
            self.events.remove(0);
            self.events_dropped += 1;
        }
        let record = self.record(now, subject, kind, Tally::default());
        self.events.push(record);
        self.dirty(now);
    }

    fn record(&mut self, now: ServerNanos, subject: &str, kind: RecordKind, tally: Tally) -> Record {
        let seq = self.next_seq;
        self.next_seq += 1;
        Record { seq, subject: subject.to_owned(), kind, at: now, tally }
    }

    /// Counts a note a student played at `played_at` (server time) while holding `assigned`
    /// beats of the bar.
    pub(crate) fn note(
        &mut self,
        now: ServerNanos,
        subject: &str,
        member_id: u64,
        timeline: &Timeline,
        played_at: ServerNanos,
        assigned: &[u8],
    ) {
        let student = self.students.entry(subject.to_owned()).or_default();
        student.member_id = member_id;
        let mut counted = Tally::default();
        count_note(&mut counted, &mut student.turns, timeline, played_at, assigned);
        student.total.add(&counted);
        student.pending.add(&counted);
        student.changed = true;
        self.dirty(now);
    }

    /// Takes everything waiting into one flush (`closing`: also ends the room session).
    /// `None` if there is nothing to write.
    pub(crate) fn take_flush(&mut self, now: ServerNanos, closing: bool) -> Option<Flush> {
        self.flush_due = None;
        let opens = std::mem::take(&mut self.opening);
        let mut records = std::mem::take(&mut self.events);
        let pending: Vec<(String, Tally)> = self
            .students
            .iter_mut()
            .filter(|(_, s)| !s.pending.is_empty())
            .map(|(subject, s)| (subject.clone(), std::mem::take(&mut s.pending)))
            .collect();
        for (subject, tally) in pending {
            records.push(self.record(now, &subject, RecordKind::Notes, tally));
        }
        let mut notices = Vec::new();
        for student in self.students.values_mut().filter(|s| s.changed) {
            student.changed = false;
            notices.push(notice(student.member_id, &student.total));
        }
        (opens || closing || !records.is_empty()).then_some(Flush { opens, records, closes: closing, notices })
    }

    /// Takes back a flush the writer could not queue: its records wait for the next one.
    pub(crate) fn restore(&mut self, now: ServerNanos, flush: Flush) {
        self.opening |= flush.opens;
        let mut events = Vec::new();
        for record in flush.records {
            match record.kind {
                RecordKind::Notes => {
                    if let Some(student) = self.students.get_mut(&record.subject) {
                        student.pending.add(&record.tally);
                    }
                }
                RecordKind::Joined | RecordKind::Left => events.push(record),
            }
        }
        events.append(&mut self.events);
        self.events = events;
        for notice in flush.notices {
            if let Some(student) = self.students.values_mut().find(|s| s.member_id == notice.member_id) {
                student.changed = true;
            }
        }
        self.dirty(now);
    }

    /// The room is handed to another node: what is not yet handed to the writer stays here
    /// (this node may still write it; the other must not write it again).
    pub(crate) fn handed_over(&mut self) {
        self.events.clear();
        for student in self.students.values_mut() {
            student.pending = Tally::default();
        }
        self.flush_due = None;
    }

    /// The room resumes on another node: its records are numbered from `jump` further on,
    /// past any the old node wrote since the handover was written.
    pub(crate) fn resumed(&mut self, jump: i64) {
        self.next_seq = self.next_seq.saturating_add(jump);
    }

    /// Forgets everything held about `subject` (their data is being deleted).
    pub(crate) fn forget(&mut self, subject: &str) {
        self.students.remove(subject);
        self.events.retain(|record| record.subject != subject);
    }
}

/// The feed's view of a tally, saturating into the wire's widths.
fn notice(member_id: u64, t: &Tally) -> ParticipationNotice {
    let n = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    ParticipationNotice {
        member_id,
        notes: n(t.notes),
        timed: n(t.timed),
        on_beat: n(t.on_beat),
        mean_offset_micros: n(t.mean_offset_micros().unwrap_or(0)),
        assigned: n(t.assigned),
        in_part: n(t.in_part),
        turns: n(t.turns),
        score: t.collaboration_score(),
    }
}
