//! The rows the store writes and the views it reads back.
//!
//! These are database rows and read models, kept apart from the wire types in
//! `downbeat-protocol` and the engine's state ([`Tally`] converts to and from [`Counts`]).
//! Times are Unix milliseconds; student and teacher ids are pseudonymous token subjects.

use std::fmt;
use std::str::FromStr;

use downbeat_engine::sel::Tally;
use serde::Serialize;

/// One room's run, from its creation to its close.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RoomSessionRow {
    /// The tenant (school) the room belongs to.
    pub tenant_id: String,
    /// The run's id, unique within the tenant (chosen by the server).
    pub id: String,
    /// The room's join code during this run.
    pub room_code: String,
    /// The room's name as the teacher gave it.
    pub room_name: String,
    /// The teacher's pseudonymous subject.
    pub teacher_id: String,
    /// When the room was created.
    pub started_at_ms: i64,
    /// When the room closed; `None` while it is open.
    pub ended_at_ms: Option<i64>,
}

/// The end of a room session, written after its start (a retry writes the same end again).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SessionEnd {
    /// The tenant.
    pub tenant_id: String,
    /// The room session's id.
    pub id: String,
    /// When the room closed.
    pub ended_at_ms: i64,
}

/// What a participation row records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ParticipationKind {
    /// The student took a seat in the room (a reconnect within the grace period is not a
    /// new join).
    Joined,
    /// The student left the room.
    Left,
    /// Note counts played since the previous `Notes` row.
    Notes,
}

impl ParticipationKind {
    /// The stored text: `joined`, `left` or `notes`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Joined => "joined",
            Self::Left => "left",
            Self::Notes => "notes",
        }
    }
}

impl fmt::Display for ParticipationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored participation kind this version does not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownKind;

impl fmt::Display for UnknownKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("unknown participation kind")
    }
}

impl std::error::Error for UnknownKind {}

impl FromStr for ParticipationKind {
    type Err = UnknownKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "joined" => Ok(Self::Joined),
            "left" => Ok(Self::Left),
            "notes" => Ok(Self::Notes),
            _ => Err(UnknownKind),
        }
    }
}

/// Participation counters as stored: [`Tally`] in signed 64-bit columns.
///
/// SQL has no unsigned integers, so a count above `i64::MAX` saturates on the way in (and a
/// negative one, which only a hand-edited database can hold, reads as zero).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Notes played.
    pub notes: i64,
    /// Notes played while beats were sounding.
    pub timed: i64,
    /// Timed notes on the beat.
    pub on_beat: i64,
    /// Sum of |offset from the beat| of timed notes, in microseconds.
    pub offset_abs_sum_micros: i64,
    /// Sum of the signed offsets from the beat of timed notes, in microseconds (negative:
    /// early).
    pub offset_sum_micros: i64,
    /// Timed notes played while the student had assigned beats.
    pub assigned: i64,
    /// Assigned notes on the student's own beats.
    pub in_part: i64,
    /// Turns taken.
    pub turns: i64,
}

impl Counts {
    /// Adds `other` into `self` (saturating).
    pub fn add(&mut self, other: &Self) {
        self.notes = self.notes.saturating_add(other.notes);
        self.timed = self.timed.saturating_add(other.timed);
        self.on_beat = self.on_beat.saturating_add(other.on_beat);
        self.offset_abs_sum_micros = self.offset_abs_sum_micros.saturating_add(other.offset_abs_sum_micros);
        self.offset_sum_micros = self.offset_sum_micros.saturating_add(other.offset_sum_micros);
        self.assigned = self.assigned.saturating_add(other.assigned);
        self.in_part = self.in_part.saturating_add(other.in_part);
        self.turns = self.turns.saturating_add(other.turns);
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

impl From<Tally> for Counts {
    fn from(t: Tally) -> Self {
        Self {
            notes: to_i64(t.notes),
            timed: to_i64(t.timed),
            on_beat: to_i64(t.on_beat),
            offset_abs_sum_micros: to_i64(t.offset_abs_sum_micros),
            offset_sum_micros: t.offset_sum_micros,
            assigned: to_i64(t.assigned),
            in_part: to_i64(t.in_part),
            turns: to_i64(t.turns),
        }
    }
}

impl From<Counts> for Tally {
    fn from(c: Counts) -> Self {
        Self {
            notes: to_u64(c.notes),
            timed: to_u64(c.timed),
            on_beat: to_u64(c.on_beat),
            offset_abs_sum_micros: to_u64(c.offset_abs_sum_micros),
            offset_sum_micros: c.offset_sum_micros,
            assigned: to_u64(c.assigned),
            in_part: to_u64(c.in_part),
            turns: to_u64(c.turns),
        }
    }
}

/// One participation event of a student in a room session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ParticipationRow {
    /// The tenant.
    pub tenant_id: String,
    /// The room session it happened in.
    pub room_session_id: String,
    /// Its number within the room session, unique there: the idempotency key.
    pub seq: i64,
    /// The student's pseudonymous subject.
    pub student_id: String,
    /// What happened.
    pub kind: ParticipationKind,
    /// When (for `Notes`: when the counts were taken).
    pub at_ms: i64,
    /// Note counts (zero unless `kind` is `Notes`; only `Notes` rows are summed).
    pub counts: Counts,
}

/// A student's answer to a reflection prompt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReflectionRow {
    /// The tenant.
    pub tenant_id: String,
    /// The student's pseudonymous subject.
    pub student_id: String,
    /// The client's id for this answer, unique per student: the idempotency key.
    pub id: String,
    /// The room session it answers about.
    pub room_session_id: String,
    /// The prompt shown.
    pub prompt: String,
    /// A mood on the client's scale, if given.
    pub mood: Option<i64>,
    /// Free text, if given. Never logged.
    pub text: Option<String>,
    /// When it was written.
    pub created_at_ms: i64,
}

/// A co-teacher added to (`present`) or removed from a room session by its owner. The rows
/// left when the session ends are the teachers who co-taught it (the owner is the session's
/// `teacher_id`); both are idempotent, and changes are applied in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CoTeacherChange {
    /// The tenant.
    pub tenant_id: String,
    /// The room session.
    pub room_session_id: String,
    /// The co-teacher's pseudonymous subject.
    pub teacher_id: String,
    /// Added (`true`) or removed.
    pub present: bool,
}

/// A recording (take) of a room session started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RecordingRow {
    /// The tenant.
    pub tenant_id: String,
    /// The room session recorded.
    pub room_session_id: String,
    /// The take's number in the room session, from 1.
    pub take: i64,
    /// When it started.
    pub started_at_ms: i64,
    /// When it stopped; `None` while it runs (or if the server died before it stopped).
    pub stopped_at_ms: Option<i64>,
    /// Its length in nanoseconds, once stopped.
    pub length_nanos: Option<i64>,
}

/// A take stopped (the first stop written wins).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RecordingStop {
    /// The tenant.
    pub tenant_id: String,
    /// The room session.
    pub room_session_id: String,
    /// The take.
    pub take: i64,
    /// When it stopped.
    pub stopped_at_ms: i64,
    /// Its length in nanoseconds.
    pub length_nanos: i64,
}

/// The timeline a take ran on, at one epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RecordingTimelineRow {
    /// The tenant.
    pub tenant_id: String,
    /// The room session.
    pub room_session_id: String,
    /// The take.
    pub take: i64,
    /// The timeline's epoch.
    pub epoch: i64,
    /// Its segments as JSON (see the migration).
    pub segments: String,
}

/// A note a take holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RecordedNoteRow {
    /// The tenant.
    pub tenant_id: String,
    /// The room session.
    pub room_session_id: String,
    /// The take.
    pub take: i64,
    /// Its number in the take: the idempotency key.
    pub seq: i64,
    /// Who played it (pseudonymous subject; a teacher's too).
    pub student_id: String,
    /// Their member id in the room.
    pub member_id: i64,
    /// Their assigned part, if any.
    pub part: Option<String>,
    /// MIDI note number.
    pub midi: i64,
    /// MIDI velocity.
    pub velocity: i64,
    /// General MIDI program.
    pub instrument: i64,
    /// Nanoseconds from the take's start to when it was played.
    pub offset_nanos: i64,
    /// When the room accepted it (retention).
    pub at_ms: i64,
}

/// A take read back whole.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Take {
    /// The take.
    pub recording: RecordingRow,
    /// Its timelines, by epoch.
    pub timelines: Vec<RecordingTimelineRow>,
    /// Its notes, by number.
    pub notes: Vec<RecordedNoteRow>,
}

/// A take in a list: the row and how many notes it holds now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TakeSummary {
    /// The take.
    #[serde(flatten)]
    pub recording: RecordingRow,
    /// Notes stored.
    pub notes: i64,
}

/// Everything one [`Store::write`](super::Store::write) commits at once.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Batch {
    /// Room sessions started (inserted once).
    pub sessions: Vec<RoomSessionRow>,
    /// Room sessions ended (written after `sessions`, so a batch may start and end one).
    pub session_ends: Vec<SessionEnd>,
    /// Participation events (inserted once per `(tenant, room session, seq)`).
    pub participation: Vec<ParticipationRow>,
    /// Reflections (inserted once per `(tenant, student, id)`).
    pub reflections: Vec<ReflectionRow>,
    /// Co-teachers added and removed, applied in this order.
    pub co_teachers: Vec<CoTeacherChange>,
    /// Takes started (inserted once).
    pub recordings: Vec<RecordingRow>,
    /// Takes' timelines (inserted once per epoch).
    pub recording_timelines: Vec<RecordingTimelineRow>,
    /// Takes' notes (inserted once per `(tenant, room session, take, seq)`).
    pub recorded_notes: Vec<RecordedNoteRow>,
    /// Takes stopped (after `recordings`).
    pub recording_stops: Vec<RecordingStop>,
}

impl Batch {
    /// Appends every row of `other` (each kind after this batch's rows of that kind).
    pub fn extend_from(&mut self, other: &Self) {
        // Destructured, so a new kind of row cannot be forgotten here.
        let Self {
            sessions,
            session_ends,
            participation,
            reflections,
            co_teachers,
            recordings,
            recording_timelines,
            recorded_notes,
            recording_stops,
        } = other;
        self.sessions.extend_from_slice(sessions);
        self.session_ends.extend_from_slice(session_ends);
        self.participation.extend_from_slice(participation);
        self.reflections.extend_from_slice(reflections);
        self.co_teachers.extend_from_slice(co_teachers);
        self.recordings.extend_from_slice(recordings);
        self.recording_timelines.extend_from_slice(recording_timelines);
        self.recorded_notes.extend_from_slice(recorded_notes);
        self.recording_stops.extend_from_slice(recording_stops);
    }

    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
            && self.session_ends.is_empty()
            && self.participation.is_empty()
            && self.reflections.is_empty()
            && self.co_teachers.is_empty()
            && self.recordings.is_empty()
            && self.recording_timelines.is_empty()
            && self.recorded_notes.is_empty()
            && self.recording_stops.is_empty()
    }
}

/// One room session in a student's summary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StudentSession {
    /// The room session.
    pub room_session_id: String,
    /// Its join code.
    pub room_code: String,
    /// Its room's name.
    pub room_name: String,
    /// When it started.
    pub started_at_ms: i64,
    /// When it ended, if it has.
    pub ended_at_ms: Option<i64>,
    /// The student's note counts in it.
    pub counts: Counts,
    /// The student's reflections about it.
    pub reflections: i64,
}

/// A student's participation across room sessions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StudentSummary {
    /// The student's pseudonymous subject.
    pub student_id: String,
    /// Distinct room sessions the student joined.
    pub sessions_attended: i64,
    /// The student's reflections.
    pub reflections: i64,
    /// The student's note counts over all room sessions.
    pub counts: Counts,
    /// Every room session the student has rows in, newest first.
    pub sessions: Vec<StudentSession>,
}

/// A room session's teachers: who may read its SEL data besides the school's admins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SessionTeachers {
    /// The owner, the teacher who created the room.
    pub teacher_id: String,
    /// Its co-teachers as the session ended (or now, while it runs), by subject.
    pub co_teachers: Vec<String>,
}

/// One student in a room session's view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StudentInSession {
    /// The student's pseudonymous subject.
    pub student_id: String,
    /// The student's note counts in the session.
    pub counts: Counts,
    /// The student's reflections about the session.
    pub reflections: i64,
    /// The student's first join, if a join is stored.
    pub first_joined_at_ms: Option<i64>,
}

/// A room session with its students and reflections.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SessionSel {
    /// The room session.
    pub session: RoomSessionRow,
    /// Its co-teachers, by subject (the owner is the session's `teacher_id`).
    pub co_teachers: Vec<String>,
    /// Every student with rows in it, by student id.
    pub students: Vec<StudentInSession>,
    /// Its reflections, oldest first.
    pub reflections: Vec<ReflectionRow>,
}

/// Everything stored about one student (a data subject's access request).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StudentExport {
    /// The tenant.
    pub tenant_id: String,
    /// The student's pseudonymous subject.
    pub student_id: String,
    /// The room sessions the student has rows in, oldest first.
    pub room_sessions: Vec<RoomSessionRow>,
    /// The student's participation, by room session and sequence number.
    pub participation: Vec<ParticipationRow>,
    /// The student's reflections, oldest first.
    pub reflections: Vec<ReflectionRow>,
    /// The notes of the student's in recordings, by room session, take and number.
    pub recorded_notes: Vec<RecordedNoteRow>,
}

/// What a deletion removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Deleted {
    /// Participation rows.
    pub participation: u64,
    /// Reflections.
    pub reflections: u64,
    /// Notes in recordings.
    pub recorded_notes: u64,
}

/// A room session as the list of a teacher's (or a school's) sessions shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionListing {
    /// The session.
    pub session: RoomSessionRow,
    /// Its co-teachers, as recorded with it.
    pub co_teachers: Vec<String>,
    /// Students who joined it.
    pub students: i64,
    /// Notes they played in it.
    pub notes: i64,
}

/// A stretch of a room session in its timeline: what the students' notes counted in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimelineBucket {
    /// Where the stretch starts, in ms from the session's start.
    pub from_ms: i64,
    /// Students whose notes were counted in it.
    pub students: i64,
    /// The counts of their notes (summed over every student).
    pub counts: Counts,
}

/// A room session's participation over time: its counts in stretches of `bucket_ms` from the
/// session's start, by when they were counted (the room flushes counts about once a second,
/// so a note lands in the stretch of its flush).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionTimeline {
    /// The length of every stretch, in ms.
    pub bucket_ms: i64,
    /// Every stretch from the session's start to the last one with notes, empty ones
    /// included, in order (none before any note).
    pub buckets: Vec<TimelineBucket>,
}
