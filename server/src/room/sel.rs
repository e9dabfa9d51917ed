//! A room's SEL work as jobs for the SEL writer: the engine's [`Flush`] and
//! [`ReflectionWork`] (what to write, decided by [`downbeat_engine::room::Room`]) become store
//! rows, and what the writer commits comes back to the room as a command.
//!
//! Only conversion lives here: the room's tenant and room session id, wall-clock times for
//! the rows (the engine counts on the server's monotonic clock), hex ids. Counting,
//! numbering, prompts and what to retry are the engine's.

use downbeat_engine::room::{Flush, RecordKind, RecordingWork, ReflectionWork, SelWork, TakeRow};
use downbeat_protocol::ServerNanos;
use tokio::sync::mpsc;

use super::handle::{Command, RoomMeta};
use crate::clock::ServerClock;
use crate::sel::store::{
    Batch, CoTeacherChange, Counts, ParticipationKind, ParticipationRow, RecordedNoteRow, RecordingRow, RecordingStop,
    RecordingTimelineRow, ReflectionRow, SessionEnd,
};
use crate::sel::{Job, OnCommit, unix_ms_now};

/// The writer's job for `work` of the room `meta`; once committed, `room` hears of it (the
/// teachers' feed, a reflection's acknowledgement).
pub(crate) fn job(meta: &RoomMeta, clock: &ServerClock, room: &mpsc::WeakSender<Command>, work: &SelWork) -> Job {
    let tell = |command: Command| -> OnCommit {
        let room = room.clone();
        Box::new(move || {
            if let Some(tx) = room.upgrade() {
                let _ = tx.try_send(command);
            }
        })
    };
    match work {
        SelWork::Flush(flush) => Job {
            batch: flush_batch(meta, clock, flush),
            on_commit: flush.feed().map(|m| tell(Command::Feed(m))),
            on_refuse: None,
        },
        SelWork::Reflection(r) => {
            let committed = Command::ReflectionCommitted {
                member_id: r.member,
                request_id: r.request_id,
                notice: r.notice.clone(),
            };
            let refused = Command::ReflectionRefused { member_id: r.member, request_id: r.request_id };
            Job { batch: reflection_batch(meta, r), on_commit: Some(tell(committed)), on_refuse: Some(tell(refused)) }
        }
        SelWork::Recording(work) => Job::rows(recording_batch(meta, clock, work)),
    }
}

/// The rows of `work`, with nothing to run once written (the room's last work as it closes).
pub(crate) fn batch(meta: &RoomMeta, clock: &ServerClock, work: &SelWork) -> Batch {
    match work {
        SelWork::Flush(flush) => flush_batch(meta, clock, flush),
        SelWork::Reflection(r) => reflection_batch(meta, r),
        SelWork::Recording(work) => recording_batch(meta, clock, work),
    }
}

/// The wall-clock time (Unix ms) of server instants at or before now.
fn wall_clock(clock: &ServerClock) -> impl Fn(ServerNanos) -> i64 {
    let now_ms = unix_ms_now();
    let now = clock.now();
    move |at: ServerNanos| {
        now_ms.saturating_sub(i64::try_from(now.0.saturating_sub(at.0) / 1_000_000).unwrap_or(i64::MAX))
    }
}

fn i64_of(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

/// The rows of a recording flush of the room `meta`.
fn recording_batch(meta: &RoomMeta, clock: &ServerClock, work: &RecordingWork) -> Batch {
    let unix_ms = wall_clock(clock);
    let (tenant_id, room_session_id) = (meta.tenant.to_string(), meta.sel_id.clone());
    let mut batch = Batch::default();
    for row in &work.rows {
        match row {
            TakeRow::Started { take, at } => batch.recordings.push(RecordingRow {
                tenant_id: tenant_id.clone(),
                room_session_id: room_session_id.clone(),
                take: i64::from(*take),
                started_at_ms: unix_ms(*at),
                stopped_at_ms: None,
                length_nanos: None,
            }),
            TakeRow::Timeline { take, epoch, segments } => batch.recording_timelines.push(RecordingTimelineRow {
                tenant_id: tenant_id.clone(),
                room_session_id: room_session_id.clone(),
                take: i64::from(*take),
                epoch: i64_of(*epoch),
                segments: crate::sel::midi::segments_json(segments),
            }),
            TakeRow::Note(n) => batch.recorded_notes.push(RecordedNoteRow {
                tenant_id: tenant_id.clone(),
                room_session_id: room_session_id.clone(),
                take: i64::from(n.take),
                seq: i64::from(n.seq),
                student_id: n.subject.clone(),
                member_id: i64_of(n.member),
                part: n.part.as_ref().map(ToString::to_string),
                midi: i64::from(n.midi),
                velocity: i64::from(n.velocity),
                instrument: i64::from(n.instrument),
                offset_nanos: n.offset_nanos,
                at_ms: unix_ms(n.accepted_at),
            }),
            TakeRow::Stopped { take, at, length_nanos, .. } => batch.recording_stops.push(RecordingStop {
                tenant_id: tenant_id.clone(),
                room_session_id: room_session_id.clone(),
                take: i64::from(*take),
                stopped_at_ms: unix_ms(*at),
                length_nanos: i64_of(*length_nanos),
            }),
        }
    }
    batch
}

/// The rows of a participation flush of the room `meta`.
pub(crate) fn flush_batch(meta: &RoomMeta, clock: &ServerClock, flush: &Flush) -> Batch {
    let unix_ms = wall_clock(clock);
    let mut batch = Batch::default();
    if flush.opens {
        batch.sessions.push(meta.session_row());
    }
    for record in &flush.records {
        batch.participation.push(ParticipationRow {
            tenant_id: meta.tenant.to_string(),
            room_session_id: meta.sel_id.clone(),
            seq: record.seq,
            student_id: record.subject.clone(),
            kind: match record.kind {
                RecordKind::Joined => ParticipationKind::Joined,
                RecordKind::Left => ParticipationKind::Left,
                RecordKind::Notes => ParticipationKind::Notes,
            },
            at_ms: unix_ms(record.at),
            counts: Counts::from(record.tally),
        });
    }
    if flush.closes {
        batch.session_ends.push(SessionEnd {
            tenant_id: meta.tenant.to_string(),
            id: meta.sel_id.clone(),
            ended_at_ms: unix_ms_now(),
        });
    }
    batch
}

/// A co-teacher of the room `meta` added (`present`) or removed.
pub(crate) fn co_teacher_batch(meta: &RoomMeta, subject: &str, present: bool) -> Batch {
    let mut batch = Batch::default();
    batch.co_teachers.push(CoTeacherChange {
        tenant_id: meta.tenant.to_string(),
        room_session_id: meta.sel_id.clone(),
        teacher_id: subject.to_owned(),
        present,
    });
    batch
}

/// The row of a checked reflection written in the room `meta`.
fn reflection_batch(meta: &RoomMeta, work: &ReflectionWork) -> Batch {
    let mut batch = Batch::default();
    batch.reflections.push(ReflectionRow {
        tenant_id: meta.tenant.to_string(),
        student_id: work.subject.clone(),
        id: hex::encode(work.id),
        room_session_id: meta.sel_id.clone(),
        prompt: work.prompt.to_string(),
        mood: work.mood.map(i64::from),
        text: work.text.as_ref().map(|t| t.to_string()),
        created_at_ms: unix_ms_now(),
    });
    batch
}
