//! What the operators' inspector sees of a room: its seats and the sessions holding them, by
//! member id with transport figures ([`RoomInspection`]), and a live copy of its events for an
//! observer ([`Observers`]). Never a child's name, subject or anything a child wrote: members
//! are shown by id, role, part and figures; the SEL feed and reflections never reach an
//! observer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use downbeat_engine::room::SeatView;
use downbeat_protocol::{self as wire, Member, NoteFrame, ServerMessage, Transport};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::clock::ServerClock;

/// Observers of one room at once; more are refused (`server_busy`).
pub(crate) const MAX_OBSERVERS: usize = 4;

/// Events an observer may fall behind by before events are left out for it (it is told how
/// many).
pub(crate) const OBSERVER_QUEUE: usize = 256;

/// A session's datagram counts, kept by the session (received) and the room (sent), read by
/// the inspector.
#[derive(Debug, Default)]
pub(crate) struct SessionCounters {
    /// Datagrams the room handed to the transport for this session.
    pub(crate) sent: AtomicU64,
    /// Datagrams the transport refused (a full queue, a path too small).
    pub(crate) send_failed: AtomicU64,
    /// Datagrams received from the client (clock sync and notes).
    pub(crate) received: AtomicU64,
}

impl SessionCounters {
    pub(crate) fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// What the transport knows of a session's path (QUIC only).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub(crate) struct PathFigures {
    /// The transport's smoothed round-trip time, in microseconds.
    pub(crate) rtt_micros: u64,
    /// Packets sent on the path, and those declared lost.
    pub(crate) packets_sent: u64,
    pub(crate) packets_lost: u64,
}

impl PathFigures {
    pub(crate) fn of(connection: &crate::quic::Connection) -> Self {
        let stats = connection.stats();
        Self {
            rtt_micros: u64::try_from(stats.path.rtt.as_micros()).unwrap_or(u64::MAX),
            packets_sent: stats.path.sent_packets,
            packets_lost: stats.path.lost_packets,
        }
    }
}

/// One room as the inspector shows it.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct RoomInspection {
    pub(crate) running: bool,
    pub(crate) tempo_bpm: f64,
    pub(crate) beats_per_bar: u8,
    pub(crate) epoch: u64,
    /// The take recording now, if any.
    pub(crate) recording: Option<u32>,
    /// The take playing back now, if any.
    pub(crate) playback: Option<u32>,
    pub(crate) observers: usize,
    pub(crate) seats: Vec<SeatInspection>,
}

/// One seat: the member by id, and the session holding it.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct SeatInspection {
    pub(crate) member_id: u64,
    pub(crate) role: &'static str,
    /// The part the teacher assigned (a part's name, e.g. "drums"), if any.
    pub(crate) part: Option<String>,
    pub(crate) muted: bool,
    /// `None` while the seat is held for a reconnect.
    pub(crate) session: Option<SessionInspection>,
}

/// A session's figures.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct SessionInspection {
    pub(crate) id: u64,
    pub(crate) transport: &'static str,
    /// Seconds since it took the seat.
    pub(crate) seated_secs: u64,
    /// From the client's last report: whether its clock is synced, its smallest recent round
    /// trip and its estimate's uncertainty.
    pub(crate) synced: bool,
    pub(crate) rtt_micros: u32,
    pub(crate) uncertainty_micros: u32,
    /// Classmates' notes it scheduled on time, and those that came too late (reported).
    pub(crate) notes_played: u32,
    pub(crate) notes_late: u32,
    pub(crate) datagrams_sent: u64,
    pub(crate) datagrams_send_failed: u64,
    pub(crate) datagrams_received: u64,
    /// The transport's view of the path (WebTransport sessions).
    pub(crate) path: Option<PathFigures>,
}

/// What the room task knows of a session beyond the engine: when it sat down, its counters
/// and its path.
pub(crate) struct SessionExtras<'a> {
    pub(crate) seated_for: Duration,
    pub(crate) counters: &'a SessionCounters,
    pub(crate) path: Option<PathFigures>,
}

pub(crate) const fn transport_name(transport: Transport) -> &'static str {
    match transport {
        Transport::WebTransport => "webtransport",
        Transport::WebSocket => "websocket",
    }
}

const fn role_name(role: wire::Role) -> &'static str {
    match role {
        wire::Role::Teacher => "teacher",
        wire::Role::Student => "student",
    }
}

/// A seat of the engine, with what the task knows of its session.
pub(crate) fn seat<'a>(view: &SeatView<'_>, extras: impl Fn(u64) -> Option<SessionExtras<'a>>) -> SeatInspection {
    let member = view.member;
    let session = view.session.map(|(id, report)| {
        let found = extras(id);
        let load =
            |f: fn(&SessionCounters) -> &AtomicU64| found.as_ref().map_or(0, |e| f(e.counters).load(Ordering::Relaxed));
        SessionInspection {
            id,
            transport: transport_name(member.transport),
            seated_secs: found.as_ref().map_or(0, |e| e.seated_for.as_secs()),
            synced: report.sync.synced,
            rtt_micros: report.sync.rtt_micros,
            uncertainty_micros: report.sync.uncertainty_micros,
            notes_played: report.notes_played,
            notes_late: report.notes_late,
            datagrams_sent: load(|c| &c.sent),
            datagrams_send_failed: load(|c| &c.send_failed),
            datagrams_received: load(|c| &c.received),
            path: found.and_then(|e| e.path),
        }
    });
    SeatInspection {
        member_id: member.id,
        role: role_name(member.role),
        part: member.assignment.part.as_ref().map(ToString::to_string),
        muted: member.muted,
        session,
    }
}

/// A member as an observer sees it: by id, never by name.
fn member_json(member: &Member) -> Value {
    json!({
        "member_id": member.id,
        "role": role_name(member.role),
        "part": member.assignment.part.as_ref().map(ToString::to_string),
        "muted": member.muted,
        "transport": transport_name(member.transport),
        "synced": member.sync.synced,
        "rtt_micros": member.sync.rtt_micros,
    })
}

/// The observers of one room and what they were last told, so each hears an event once.
#[derive(Debug, Default)]
pub(crate) struct Observers {
    queues: Vec<Observer>,
    /// The last state event of each kind sent (timeline, recording, playback, prompt): a copy
    /// the room sends a latecomer is not news.
    last_state: HashMap<&'static str, Value>,
    /// Per note sender and generation, the highest sequence number sent.
    notes_seen: HashMap<(u64, u32), u32>,
}

#[derive(Debug)]
struct Observer {
    tx: mpsc::Sender<Value>,
    /// Events left out since the last one it got.
    missed: u64,
}

impl Observers {
    pub(crate) fn len(&self) -> usize {
        self.queues.len()
    }

    /// Adds an observer, first telling it the room as it is; false if the room has
    /// [`MAX_OBSERVERS`] already.
    pub(crate) fn add(&mut self, tx: mpsc::Sender<Value>, snapshot: Value) -> bool {
        self.queues.retain(|o| !o.tx.is_closed());
        if self.queues.len() >= MAX_OBSERVERS || tx.try_send(snapshot).is_err() {
            return false;
        }
        self.queues.push(Observer { tx, missed: 0 });
        true
    }

    /// A control message the room sent: what an observer may see of it, once.
    pub(crate) fn message(&mut self, message: &ServerMessage, clock: &ServerClock) {
        if self.queues.is_empty() {
            return;
        }
        let (kind, event) = match message {
            ServerMessage::Timeline(timeline) => ("timeline", timeline_json(timeline, clock)),
            ServerMessage::Recording(info) => ("recording", json!({ "take": info.map(|i| i.take) })),
            ServerMessage::Playback(info) => ("playback", json!({ "take": info.map(|i| i.take) })),
            ServerMessage::Prompt(prompt) => ("prompt", json!({ "text": prompt.as_ref().map(|p| p.text.to_string()) })),
            ServerMessage::MemberJoined(member) => ("member_joined", member_json(member)),
            ServerMessage::MemberUpdated(member) => ("member_updated", member_json(member)),
            ServerMessage::MemberLeft { member_id, reason } => {
                ("member_left", json!({ "member_id": member_id, "reason": format!("{reason:?}") }))
            }
            ServerMessage::RoomClosed { .. } => ("room_closed", json!({})),
            // Answers to one member, the SEL feed and reflections: never an observer's.
            _ => return,
        };
        if matches!(kind, "timeline" | "recording" | "playback" | "prompt") {
            if self.last_state.get(kind) == Some(&event) {
                return;
            }
            self.last_state.insert(kind, event.clone());
        }
        self.send(kind, event, clock);
    }

    /// A note frame the room fanned out: its notes not sent to observers before.
    pub(crate) fn notes(&mut self, frame: &NoteFrame, playout_delay_nanos: u64, clock: &ServerClock) {
        if self.queues.is_empty() {
            return;
        }
        let seen = self.notes_seen.entry((frame.from, frame.generation)).or_insert(0);
        let fresh: Vec<Value> = frame
            .notes
            .iter()
            .filter(|n| n.seq > *seen)
            .map(|n| {
                let sounds_at = downbeat_engine::notes::playout_instant(n, playout_delay_nanos);
                json!({
                    "seq": n.seq,
                    "midi": n.midi,
                    "velocity": n.velocity,
                    "instrument": n.instrument,
                    "sounds_at_unix_ms": clock.unix_ms_of(sounds_at),
                })
            })
            .collect();
        *seen = frame.notes.iter().map(|n| n.seq).max().unwrap_or(0).max(*seen);
        if self.notes_seen.len() > 1024 {
            self.notes_seen.clear();
        }
        if !fresh.is_empty() {
            self.send("notes", json!({ "from": frame.from, "generation": frame.generation, "notes": fresh }), clock);
        }
    }

    fn send(&mut self, kind: &str, mut event: Value, clock: &ServerClock) {
        event["event"] = Value::from(kind);
        event["at_unix_ms"] = Value::from(clock.unix_ms_of(clock.now()));
        self.queues.retain_mut(|o| {
            if o.missed > 0 {
                let note = json!({ "event": "missed", "count": o.missed });
                if o.tx.try_send(note).is_ok() {
                    o.missed = 0;
                }
            }
            match o.tx.try_send(event.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    o.missed += 1;
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }
}

/// A timeline as an observer sees it: its epoch and segments with wall-clock starts.
pub(crate) fn timeline_json(timeline: &wire::Timeline, clock: &ServerClock) -> Value {
    let segments: Vec<Value> = timeline
        .segments
        .iter()
        .map(|s| {
            json!({
                "start_unix_ms": clock.unix_ms_of(s.start),
                "start_beat": s.start_beat,
                "tempo_bpm": s.tempo.as_bpm_f64(),
                "beats_per_bar": s.beats_per_bar,
                "running": s.running,
            })
        })
        .collect();
    json!({ "epoch": timeline.epoch, "segments": segments })
}
