//! A stored take as a Standard MIDI File (format 1) and its timeline as stored JSON.
//!
//! - **Track 0** is the tempo map: a tempo at every segment of the take's timeline and a time
//!   signature at its start and at every start of the beat ([`downbeat_engine::take`] decides
//!   the ticks, [`TICKS_PER_BEAT`] per beat).
//! - **One track per part**, named by the part ("drums"), and one per member who played
//!   without one ("member 7"): never by a child's name.
//! - Notes carry no length on the wire (a student taps); each lasts a quarter of a beat, or
//!   until the same key sounds again in its track.
//! - Each track has a channel of its own (the General MIDI percussion channel, 10, is never
//!   used, so a program change picks every track's sound), and a program change wherever the
//!   instrument changes.

use std::collections::BTreeMap;

use downbeat_engine::room::{PlaybackNote, TakeSegment};
use downbeat_engine::take::{TICKS_PER_BEAT, TickMap, history};
use downbeat_protocol::MicroBpm;
use midly::num::{u4, u7, u15, u24, u28};
use midly::{Format, Header, MetaMessage, MidiMessage, Smf, Timing, TrackEvent, TrackEventKind};
use serde::{Deserialize, Serialize};

use super::store::{RecordedNoteRow, Take};

/// How a take's segment is stored (`recording_timelines.segments`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredSegment {
    offset_nanos: i64,
    start_beat: i64,
    tempo_micro_bpm: u32,
    beats_per_bar: u8,
    running: bool,
    count_in_bars: u8,
}

/// `segments` as stored.
pub(crate) fn segments_json(segments: &[TakeSegment]) -> String {
    let stored: Vec<StoredSegment> = segments
        .iter()
        .map(|s| StoredSegment {
            offset_nanos: s.offset_nanos,
            start_beat: s.start_beat,
            tempo_micro_bpm: s.tempo.0,
            beats_per_bar: s.beats_per_bar,
            running: s.running,
            count_in_bars: s.count_in_bars,
        })
        .collect();
    // Cannot fail: plain numbers and booleans.
    serde_json::to_string(&stored).unwrap_or_else(|_| "[]".to_owned())
}

/// Stored segments read back; `None` if they do not parse (a hand-edited row).
fn segments_from_json(json: &str) -> Option<Vec<TakeSegment>> {
    let stored: Vec<StoredSegment> = serde_json::from_str(json).ok()?;
    Some(
        stored
            .into_iter()
            .map(|s| TakeSegment {
                offset_nanos: s.offset_nanos,
                start_beat: s.start_beat,
                tempo: MicroBpm(s.tempo_micro_bpm),
                beats_per_bar: s.beats_per_bar,
                running: s.running,
                count_in_bars: s.count_in_bars,
            })
            .collect(),
    )
}

/// The tick map of `take`: its timelines as one history up to its end (or its last note,
/// for a take the server never stopped).
pub(crate) fn tick_map(take: &Take) -> TickMap {
    let timelines: Vec<(u64, Vec<TakeSegment>)> = take
        .timelines
        .iter()
        .filter_map(|t| Some((u64::try_from(t.epoch).ok()?, segments_from_json(&t.segments)?)))
        .collect();
    let last_note = take.notes.iter().map(|n| n.offset_nanos).max().unwrap_or(0);
    let length = take.recording.length_nanos.unwrap_or(last_note).max(last_note);
    let history = history(&timelines, u64::try_from(length).unwrap_or(0));
    TickMap::new(&history, TICKS_PER_BEAT)
}

/// The notes of `take` for a playback: ticks from the downbeat before its first note (the
/// empty bars before it left out), in time order.
pub(crate) fn playback_notes(take: &Take) -> Vec<PlaybackNote> {
    let map = tick_map(take);
    let mut notes: Vec<(u64, &RecordedNoteRow)> = take.notes.iter().map(|n| (map.tick_at(n.offset_nanos), n)).collect();
    notes.sort_by_key(|(tick, n)| (*tick, n.seq));
    let Some(&(first, _)) = notes.first() else { return Vec::new() };
    // The bar of the piece the first note falls in, counted from where that piece starts.
    let piece = map.pieces().iter().rev().find(|p| p.tick <= first).copied();
    let (origin, bar) = piece.map_or((0, u64::from(TICKS_PER_BEAT) * 4), |p| {
        (p.tick, u64::from(p.beats_per_bar.max(1)) * u64::from(TICKS_PER_BEAT))
    });
    let skip = origin + (first - origin) / bar * bar;
    notes
        .into_iter()
        .map(|(tick, n)| PlaybackNote {
            tick: tick - skip,
            midi: byte7(n.midi).as_int(),
            velocity: byte7(n.velocity).as_int().max(1),
            instrument: byte7(n.instrument).as_int(),
        })
        .collect()
}

/// What a track of the file holds: a part's notes, or those of a member without a part.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum TrackKey {
    Part(String),
    Member(i64),
}

impl TrackKey {
    fn of(note: &RecordedNoteRow) -> Self {
        match &note.part {
            Some(part) => Self::Part(part.clone()),
            None => Self::Member(note.member_id),
        }
    }

    fn name(&self) -> String {
        match self {
            Self::Part(part) => part.clone(),
            Self::Member(id) => format!("member {id}"),
        }
    }
}

fn byte7(v: i64) -> u7 {
    u7::new(u8::try_from(v.clamp(0, 127)).unwrap_or(0))
}

fn delta(from: u64, to: u64) -> u28 {
    u28::new(u32::try_from(to.saturating_sub(from)).unwrap_or(u32::MAX).min(u28::max_value().as_int()))
}

/// One event at an absolute tick, before deltas. Sorted: by tick, then note-offs before
/// program changes before note-ons.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct At {
    tick: u64,
    order: u8,
    key: u8,
    value: u8,
}

const OFF: u8 = 0;
const PROGRAM: u8 = 1;
const ON: u8 = 2;

/// `take` as a Standard MIDI File.
pub(crate) fn take_to_midi(take: &Take) -> Vec<u8> {
    let map = tick_map(take);
    let mut tempo_track: Vec<(u64, MetaMessage<'static>)> = Vec::new();
    for (i, piece) in map.pieces().iter().enumerate() {
        let micros_per_beat = 60_000_000_000_000_u64 / u64::from(piece.tempo.0.max(1));
        tempo_track.push((piece.tick, MetaMessage::Tempo(u24::new(micros_per_beat.min(0xFF_FFFF) as u32))));
        if i == 0 || piece.running {
            tempo_track.push((piece.tick, MetaMessage::TimeSignature(piece.beats_per_bar.max(1), 2, 24, 8)));
        }
    }

    let mut by_track: BTreeMap<TrackKey, Vec<&RecordedNoteRow>> = BTreeMap::new();
    for note in &take.notes {
        by_track.entry(TrackKey::of(note)).or_default().push(note);
    }
    let mut tracks: Vec<(String, u4, Vec<At>)> = Vec::new();
    let channels = (0..16_u8).filter(|c| *c != 9).cycle();
    for ((key, notes), channel) in by_track.into_iter().zip(channels) {
        let mut events = Vec::new();
        let mut onsets: Vec<(u64, &RecordedNoteRow)> =
            notes.iter().map(|n| (map.tick_at(n.offset_nanos), *n)).collect();
        onsets.sort_by_key(|(tick, n)| (*tick, n.seq));
        let mut program = None;
        for (i, (tick, note)) in onsets.iter().enumerate() {
            if program != Some(note.instrument) {
                program = Some(note.instrument);
                events.push(At { tick: *tick, order: PROGRAM, key: byte7(note.instrument).as_int(), value: 0 });
            }
            let next_same = onsets[i + 1..].iter().find(|(_, n)| n.midi == note.midi).map(|(t, _)| *t);
            let end = tick + u64::from(TICKS_PER_BEAT / 4);
            let end = next_same.map_or(end, |next| end.min(next)).max(tick + 1);
            let key = byte7(note.midi).as_int();
            events.push(At { tick: *tick, order: ON, key, value: byte7(note.velocity).as_int().max(1) });
            events.push(At { tick: end, order: OFF, key, value: 0 });
        }
        events.sort();
        tracks.push((key.name(), u4::new(channel), events));
    }

    let mut smf = Smf::new(Header::new(Format::Parallel, Timing::Metrical(u15::new(TICKS_PER_BEAT))));
    let mut track0 =
        vec![TrackEvent { delta: u28::new(0), kind: TrackEventKind::Meta(MetaMessage::TrackName(b"tempo and meter")) }];
    let mut last = 0;
    for (tick, message) in tempo_track {
        track0.push(TrackEvent { delta: delta(last, tick), kind: TrackEventKind::Meta(message) });
        last = tick;
    }
    track0.push(TrackEvent { delta: u28::new(0), kind: TrackEventKind::Meta(MetaMessage::EndOfTrack) });
    smf.tracks.push(track0);
    for (name, channel, events) in &tracks {
        let mut track = vec![TrackEvent {
            delta: u28::new(0),
            kind: TrackEventKind::Meta(MetaMessage::TrackName(name.as_bytes())),
        }];
        let mut last = 0;
        for at in events {
            let message = match at.order {
                OFF => MidiMessage::NoteOff { key: u7::new(at.key), vel: u7::new(0) },
                PROGRAM => MidiMessage::ProgramChange { program: u7::new(at.key) },
                _ => MidiMessage::NoteOn { key: u7::new(at.key), vel: u7::new(at.value) },
            };
            track.push(TrackEvent {
                delta: delta(last, at.tick),
                kind: TrackEventKind::Midi { channel: *channel, message },
            });
            last = at.tick;
        }
        track.push(TrackEvent { delta: u28::new(0), kind: TrackEventKind::Meta(MetaMessage::EndOfTrack) });
        smf.tracks.push(track);
    }
    let mut bytes = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = smf.write(&mut bytes);
    bytes
}
