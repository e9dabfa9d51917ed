//! A room's SEL bookkeeping: its room session row, reflection prompts, participation counted
//! per student from the notes the room accepts, and the batches it hands to the SEL writer.
//!
//! Owned by the room task and never waiting: counts accumulate in memory and are flushed as
//! one job about once a second ([`FLUSH_INTERVAL_NANOS`]) and when the room closes. A flush the
//! writer's queue cannot take is folded back into the counts and tried again next time, so a
//! slow database costs memory bounded by the number of students, not by the number of notes.

use std::collections::{BTreeMap, VecDeque};

use downbeat_engine::sel::{Tally, TurnTracker, measure};
use downbeat_engine::timeline::Timeline;
use downbeat_protocol::{
    BoundedVec, MAX_MEMBERS, MAX_MOOD, ParticipationNotice, Prompt, PromptText, Reflection, ReflectionNotice,
    ServerNanos,
};

use crate::authz::Refusal;
use crate::sel::store::{
    Batch, Counts, ParticipationKind, ParticipationRow, ReflectionRow, RoomSessionRow, SessionEnd,
};
use crate::sel::unix_ms_now;
use downbeat_protocol::ErrorCode;

/// How often counted participation is flushed while notes are played.
pub(crate) const FLUSH_INTERVAL_NANOS: u64 = 1_000_000_000;
/// Prompts a reflection may still answer after the teacher moved on.
const RECENT_PROMPTS: usize = 32;
/// Joined/left events held while the writer's queue is full; beyond this the oldest go.
const MAX_HELD_EVENTS: usize = 4096;

/// One student's participation in this room session.
#[derive(Debug, Default)]
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

/// What a flush hands over: the job's rows, and the feed update to send once they commit.
#[derive(Debug)]
pub(crate) struct Flush {
    pub(crate) batch: Batch,
    pub(crate) notices: Vec<ParticipationNotice>,
}

#[derive(Debug)]
pub(crate) struct RoomSel {
    tenant: String,
    session_id: String,
    /// The room session's row, until a flush carrying it is accepted.
    session_row: Option<RoomSessionRow>,
    prompts: VecDeque<Prompt>,
    current: Option<Prompt>,
    next_prompt_id: u32,
    next_seq: i64,
    /// Joined/left rows not yet handed over.
    events: Vec<ParticipationRow>,
    /// Events dropped because `events` was full.
    pub(crate) events_dropped: u64,
    students: BTreeMap<String, Student>,
    flush_due: Option<ServerNanos>,
}

impl RoomSel {
    pub(crate) fn new(session: RoomSessionRow) -> Self {
        Self {
            tenant: session.tenant_id.clone(),
            session_id: session.id.clone(),
            session_row: Some(session),
            prompts: VecDeque::new(),
            current: None,
            next_prompt_id: 1,
            next_seq: 1,
            events: Vec::new(),
            events_dropped: 0,
            students: BTreeMap::new(),
            // The room session's row goes out with the first flush, at once.
            flush_due: Some(ServerNanos(0)),
        }
    }

    /// When the next flush is due, if anything waits.
    pub(crate) fn flush_due(&self) -> Option<ServerNanos> {
        self.flush_due
    }

    fn dirty(&mut self, now: ServerNanos) {
        self.flush_due.get_or_insert(now.add_nanos(FLUSH_INTERVAL_NANOS));
    }

    /// The current prompt, if any.
    pub(crate) fn prompt(&self) -> Option<&Prompt> {
        self.current.as_ref()
    }

    /// Sets (or, with blank text, clears) the prompt; the new current prompt.
    pub(crate) fn set_prompt(&mut self, text: PromptText) -> Result<Option<Prompt>, Refusal> {
        if text.chars().any(char::is_control) {
            return Err(Refusal::new(ErrorCode::BadRequest, "a prompt may not hold control characters"));
        }
        if text.trim().is_empty() {
            self.current = None;
            return Ok(None);
        }
        let prompt = Prompt { id: self.next_prompt_id, text };
        self.next_prompt_id += 1;
        if self.prompts.len() == RECENT_PROMPTS {
            self.prompts.pop_front();
        }
        self.prompts.push_back(prompt.clone());
        self.current = Some(prompt.clone());
        Ok(Some(prompt))
    }

    /// A student joined (a new seat, not a resumed one).
    pub(crate) fn joined(&mut self, now: ServerNanos, subject: &str, member_id: u64) {
        self.students.entry(subject.to_owned()).or_default().member_id = member_id;
        self.event(now, subject, ParticipationKind::Joined);
    }

    /// A student's seat was freed.
    pub(crate) fn left(&mut self, now: ServerNanos, subject: &str) {
        self.event(now, subject, ParticipationKind::Left);
    }

    fn event(&mut self, now: ServerNanos, subject: &str, kind: ParticipationKind) {
        if self.events.len() >= MAX_HELD_EVENTS {
            self.events.remove(0);
            self.events_dropped += 1;
        }
        let row = self.row(subject, kind, Counts::default());
        self.events.push(row);
        self.dirty(now);
    }

    fn row(&mut self, subject: &str, kind: ParticipationKind, counts: Counts) -> ParticipationRow {
        let seq = self.next_seq;
        self.next_seq += 1;
        ParticipationRow {
            tenant_id: self.tenant.clone(),
            room_session_id: self.session_id.clone(),
            seq,
            student_id: subject.to_owned(),
            kind,
            at_ms: unix_ms_now(),
            counts,
        }
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
        let placement = measure(timeline, played_at, assigned);
        let new_turn = student.turns.new_turn(placement);
        student.total.count(placement, new_turn);
        student.pending.count(placement, new_turn);
        student.changed = true;
        self.dirty(now);
    }

    /// Checks a student's reflection and builds its row; the notice for the teachers' feed.
    pub(crate) fn reflection(
        &self,
        subject: &str,
        member_id: u64,
        r: &Reflection,
    ) -> Result<(ReflectionRow, ReflectionNotice), Refusal> {
        let Some(prompt) = self.prompts.iter().find(|p| p.id == r.prompt_id) else {
            return Err(Refusal::new(ErrorCode::NoPrompt, "the teacher has not asked this question in this room"));
        };
        if r.mood.is_some_and(|m| m > MAX_MOOD) {
            return Err(Refusal::new(ErrorCode::BadRequest, "a mood is 0 to 4"));
        }
        let text = r.text.as_ref().filter(|t| !t.trim().is_empty());
        if r.mood.is_none() && text.is_none() {
            return Err(Refusal::new(ErrorCode::BadRequest, "a reflection needs a mood, some words, or both"));
        }
        let row = ReflectionRow {
            tenant_id: self.tenant.clone(),
            student_id: subject.to_owned(),
            id: hex::encode(r.id),
            room_session_id: self.session_id.clone(),
            prompt: prompt.text.to_string(),
            mood: r.mood.map(i64::from),
            text: text.map(|t| t.to_string()),
            created_at_ms: unix_ms_now(),
        };
        let notice =
            ReflectionNotice { member_id, id: r.id, prompt_id: r.prompt_id, mood: r.mood, text: text.cloned() };
        Ok((row, notice))
    }

    /// Takes everything waiting into one flush (`closing`: also ends the room session).
    /// `None` if there is nothing to write.
    pub(crate) fn take_flush(&mut self, closing: bool) -> Option<Flush> {
        self.flush_due = None;
        let mut batch = Batch::default();
        batch.sessions.extend(self.session_row.take());
        batch.participation.append(&mut self.events);
        let mut notices = Vec::new();
        let subjects: Vec<String> =
            self.students.iter().filter(|(_, s)| !s.pending.is_empty()).map(|(k, _)| k.clone()).collect();
        for subject in subjects {
            let pending = self.students.get_mut(&subject).map(|s| std::mem::take(&mut s.pending)).unwrap_or_default();
            let row = self.row(&subject, ParticipationKind::Notes, Counts::from(pending));
            batch.participation.push(row);
        }
        for student in self.students.values_mut().filter(|s| s.changed) {
            student.changed = false;
            notices.push(notice(student.member_id, &student.total));
        }
        if closing {
            batch.session_ends.push(SessionEnd {
                tenant_id: self.tenant.clone(),
                id: self.session_id.clone(),
                ended_at_ms: unix_ms_now(),
            });
        }
        let empty = batch.sessions.is_empty()
            && batch.participation.is_empty()
            && batch.session_ends.is_empty()
            && batch.reflections.is_empty();
        (!empty).then_some(Flush { batch, notices })
    }

    /// Takes back a flush the writer could not queue: its rows wait for the next one.
    pub(crate) fn restore(&mut self, now: ServerNanos, flush: Flush) {
        let Batch { sessions, participation, .. } = flush.batch;
        if let Some(row) = sessions.into_iter().next() {
            self.session_row = Some(row);
        }
        let mut events = Vec::new();
        for row in participation {
            match row.kind {
                ParticipationKind::Notes => {
                    if let Some(student) = self.students.get_mut(&row.student_id) {
                        student.pending.add(&row.counts.into());
                    }
                }
                ParticipationKind::Joined | ParticipationKind::Left => events.push(row),
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

    /// Forgets everything held in memory about `subject` (their data is being deleted).
    pub(crate) fn forget(&mut self, subject: &str) {
        self.students.remove(subject);
        self.events.retain(|row| row.student_id != subject);
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

/// Notices as one feed message (at most a room's worth).
pub(crate) fn notices_message(mut notices: Vec<ParticipationNotice>) -> Option<downbeat_protocol::ServerMessage> {
    if notices.is_empty() {
        return None;
    }
    notices.truncate(MAX_MEMBERS);
    BoundedVec::try_from_vec(notices).ok().map(downbeat_protocol::ServerMessage::Participation)
}
