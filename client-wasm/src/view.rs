//! What the package hands to JavaScript: plain objects with camelCase fields, times in float
//! milliseconds. The TypeScript shapes are declared in `lib.rs` and must match these.

use downbeat_engine::client::{Client as Engine, ScheduledBeat};
use downbeat_engine::notes::ScheduledNote;
use downbeat_protocol::{
    Applied, LeaveReason, Member, Note, ParticipationNotice, PlaybackInfo, Prompt, RecordingInfo, ReflectionNotice,
    Role, ServerNanos, SyncQuality,
};
use serde::Serialize;
use wasm_bindgen::JsValue;

use crate::js::{hex, nanos_to_ms};

/// Serializes to a plain JS object (`json_compatible`: objects, not `Map`s; numbers, not
/// `BigInt`s).
pub(crate) fn to_js<T: Serialize>(value: &T) -> JsValue {
    value.serialize(&serde_wasm_bindgen::Serializer::json_compatible()).unwrap_or(JsValue::UNDEFINED)
}

fn ms(t: ServerNanos) -> f64 {
    nanos_to_ms(t.0)
}

pub(crate) fn role(role: Role) -> &'static str {
    match role {
        Role::Teacher => "teacher",
        Role::Student => "student",
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct MemberSync {
    synced: bool,
    rtt_ms: f64,
    uncertainty_ms: f64,
}

impl From<SyncQuality> for MemberSync {
    fn from(s: SyncQuality) -> Self {
        Self {
            synced: s.synced,
            rtt_ms: f64::from(s.rtt_micros) / 1e3,
            uncertainty_ms: f64::from(s.uncertainty_micros) / 1e3,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct MemberView<'a> {
    id: u64,
    name: &'a str,
    role: &'static str,
    muted: bool,
    part: Option<&'a str>,
    beats: &'a [u8],
    sync: MemberSync,
    transport: &'static str,
}

impl<'a> From<&'a Member> for MemberView<'a> {
    fn from(m: &'a Member) -> Self {
        Self {
            id: m.id,
            name: m.name.as_str(),
            role: role(m.role),
            muted: m.muted,
            part: m.assignment.part.as_ref().map(|p| p.as_str()),
            beats: m.assignment.beats.as_slice(),
            sync: m.sync.into(),
            transport: m.transport.as_str(),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Left {
    pub(crate) id: u64,
    pub(crate) reason: &'static str,
}

pub(crate) fn leave_reason(reason: LeaveReason) -> &'static str {
    match reason {
        LeaveReason::Left => "left",
        LeaveReason::Removed => "removed",
        LeaveReason::Closed => "closed",
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct BeatView {
    index: i64,
    beat_in_bar: u8,
    count_in: bool,
    server_time: f64,
    local_time: f64,
}

impl From<&ScheduledBeat> for BeatView {
    fn from(b: &ScheduledBeat) -> Self {
        Self {
            index: b.index,
            beat_in_bar: b.beat_in_bar,
            count_in: b.count_in,
            server_time: ms(b.server_at),
            local_time: nanos_to_ms(b.local_at.0),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TimelineView {
    epoch: u64,
    running: bool,
    tempo_bpm: f64,
    beats_per_bar: u8,
    count_in: bool,
    /// A change already decided but not yet in force (tempo, meter, start or stop at the
    /// next bar).
    next: Option<NextView>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct NextView {
    at: f64,
    beat: i64,
    running: bool,
    tempo_bpm: f64,
    beats_per_bar: u8,
}

/// The timeline as of `now` (server time; the last segment when the clock is not known yet).
pub(crate) fn timeline(engine: &Engine, now: Option<ServerNanos>) -> Option<TimelineView> {
    let t = engine.timeline()?;
    let current = match now {
        Some(now) => t.segment_at(now),
        None => t.last(),
    };
    let count_in = current.running && now.and_then(|now| t.beat_at(now)).is_some_and(|b| current.is_count_in(b));
    let next = t.segments().iter().find(|s| s.start > current.start).map(|s| NextView {
        at: ms(s.start),
        beat: s.start_beat,
        running: s.running,
        tempo_bpm: s.tempo.as_bpm_f64(),
        beats_per_bar: s.beats_per_bar,
    });
    Some(TimelineView {
        epoch: t.epoch(),
        running: current.running,
        tempo_bpm: current.tempo.as_bpm_f64(),
        beats_per_bar: current.beats_per_bar,
        count_in,
        next,
    })
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SyncView {
    synced: bool,
    rtt_ms: Option<f64>,
    uncertainty_ms: Option<f64>,
    offset_ms: Option<f64>,
    drift_ppm: Option<f64>,
    samples: usize,
}

pub(crate) fn sync(engine: &Engine, now: downbeat_protocol::ClientNanos) -> SyncView {
    let estimate = engine.estimate(now);
    SyncView {
        synced: engine.is_synced(now),
        rtt_ms: estimate.map(|e| nanos_to_ms(e.rtt_nanos)),
        uncertainty_ms: estimate.map(|e| nanos_to_ms(e.uncertainty_nanos)),
        offset_ms: estimate.map(|e| e.offset_nanos as f64 / 1e6),
        drift_ppm: estimate.map(|e| e.drift_ppm),
        samples: estimate.map_or(0, |e| e.samples),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct NoteView {
    from: u64,
    seq: u32,
    midi: u8,
    velocity: u8,
    instrument: u8,
    server_time: f64,
    play_at: f64,
    local_time: f64,
}

impl From<&ScheduledNote> for NoteView {
    fn from(n: &ScheduledNote) -> Self {
        Self {
            from: n.from,
            seq: n.note.seq,
            midi: n.note.midi,
            velocity: n.note.velocity,
            instrument: n.note.instrument,
            server_time: ms(n.note.played_at),
            play_at: ms(n.server_at),
            local_time: nanos_to_ms(n.local_at.0),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PlayedView {
    seq: u32,
    midi: u8,
    velocity: u8,
    instrument: u8,
    server_time: f64,
    play_at: f64,
}

pub(crate) fn played(note: &Note, playout_delay_nanos: u64) -> PlayedView {
    PlayedView {
        seq: note.seq,
        midi: note.midi,
        velocity: note.velocity,
        instrument: note.instrument,
        server_time: ms(note.played_at),
        play_at: ms(downbeat_engine::notes::playout_instant(note, playout_delay_nanos)),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AppliedView {
    epoch: u64,
    effective_at: f64,
    effective_beat: i64,
}

impl From<Applied> for AppliedView {
    fn from(a: Applied) -> Self {
        Self { epoch: a.epoch, effective_at: ms(a.effective_at), effective_beat: a.effective_beat }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PromptView<'a> {
    id: u32,
    text: &'a str,
}

pub(crate) fn prompt(p: Option<&Prompt>) -> Option<PromptView<'_>> {
    p.map(|p| PromptView { id: p.id, text: p.text.as_str() })
}

/// Where an instant falls on the shared timeline, as the server counts a note.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct BeatOffsetView {
    /// Signed distance from the nearest sounding beat (negative: early).
    offset_ms: f64,
    /// Within 60 ms of it.
    on_beat: bool,
}

pub(crate) fn beat_offset(p: downbeat_engine::sel::Placement) -> BeatOffsetView {
    BeatOffsetView { offset_ms: p.offset_nanos as f64 / 1e6, on_beat: p.on_beat }
}

/// A recording that runs in the room.
#[derive(Serialize)]
pub(crate) struct RecordingView {
    take: u32,
}

pub(crate) fn recording(r: Option<RecordingInfo>) -> Option<RecordingView> {
    r.map(|r| RecordingView { take: r.take })
}

/// A recording playing back: its take, and server times (ms) of its start and stop.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PlaybackView {
    take: u32,
    starts_at: f64,
    stops_at: Option<f64>,
}

pub(crate) fn playback(p: Option<PlaybackInfo>) -> Option<PlaybackView> {
    p.map(|p| PlaybackView { take: p.take, starts_at: ms(p.starts_at), stops_at: p.stops_at.map(ms) })
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ReflectionView<'a> {
    member_id: u64,
    id: String,
    prompt_id: u32,
    mood: Option<u8>,
    text: Option<&'a str>,
}

impl<'a> From<&'a ReflectionNotice> for ReflectionView<'a> {
    fn from(n: &'a ReflectionNotice) -> Self {
        Self {
            member_id: n.member_id,
            id: hex(&n.id),
            prompt_id: n.prompt_id,
            mood: n.mood,
            text: n.text.as_ref().map(|t| t.as_str()),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ParticipationView {
    member_id: u64,
    notes: u32,
    timed: u32,
    on_beat: u32,
    mean_offset_ms: f64,
    assigned: u32,
    in_part: u32,
    turns: u32,
    score: Option<u8>,
}

impl From<&ParticipationNotice> for ParticipationView {
    fn from(p: &ParticipationNotice) -> Self {
        Self {
            member_id: p.member_id,
            notes: p.notes,
            timed: p.timed,
            on_beat: p.on_beat,
            mean_offset_ms: f64::from(p.mean_offset_micros) / 1e3,
            assigned: p.assigned,
            in_part: p.in_part,
            turns: p.turns,
            score: p.score,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ErrorView<'a> {
    pub(crate) code: &'a str,
    pub(crate) message: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Reconnecting<'a> {
    pub(crate) attempt: u32,
    pub(crate) delay_ms: f64,
    pub(crate) reason: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Reconnected {
    pub(crate) member_id: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Closed<'a> {
    pub(crate) reason: &'a str,
    pub(crate) code: Option<&'a str>,
}
