//! Downbeat's browser client: a thin wasm-bindgen shell over `downbeat-protocol` and
//! `downbeat-engine`, on the browser's WebTransport, or WebSocket where the network blocks QUIC.
//!
//! [`connect`] opens a WebTransport session (pinning the server's self-signed certificate
//! hashes when given) and, after a head start, a WebSocket one too; it says hello with the
//! page's signed token, keeps the first session the server welcomes (remembering which
//! transport won for next time), and resolves to a [`Classroom`]. From then on the classroom syncs its clock
//! on datagrams with the same estimator as every native client (`performance.now()` is its
//! local clock), applies every newer timeline, places classmates' notes at their shared
//! playout instant, keeps presence, and reports its sync quality to the teacher. If the
//! connection drops it reconnects with backoff, takes its seat back and syncs again.
//!
//! What a session means is decided by the engine, the same as in native clients:
//! `downbeat_engine::session::Session` (hello and welcome, presence, prompt, requests matched
//! to answers, why a session ended) over `downbeat_engine::client::Client` (clock sync,
//! timeline, notes). This crate moves bytes through a transport (`transport.rs` is the seam,
//! `webtransport.rs` the browser's WebTransport behind it), runs one session's loops, decides
//! when to reconnect, and translates the session's events into promises and page events.
//! `websocket.rs` carries the same session over a WebSocket, and `race.rs` decides which
//! transport a connect uses.
//!
//! [`probe`] is the network check (the server's `/check` page): a session on one transport that
//! needs no token and only syncs the clock for a few seconds, resolving to whether the server
//! was reached there, the round trips and the clock-sync quality.
//!
//! The timing questions a page asks: [`Classroom::server_now`], [`Classroom::beats_ahead`]
//! (what a Web Audio lookahead scheduler should queue) and [`Classroom::audio_time_of`] (a
//! shared-timeline instant as an `AudioContext` time, via `getOutputTimestamp` and
//! `outputLatency`). All times cross into JavaScript as float milliseconds: *server time* is
//! the room's shared clock, *local time* is the page's `performance.now()`.
//!
//! Everything here is compiled for `wasm32` only; on other targets the crate is empty. Build
//! the ES module package with `scripts/build-wasm` (wasm-bindgen `--target web`).
#![cfg(target_arch = "wasm32")]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

mod classroom;
mod js;
mod probe;
mod race;
mod transport;
mod view;
mod websocket;
mod webtransport;

pub use classroom::{Classroom, connect};
pub use probe::probe;

use wasm_bindgen::prelude::*;

#[wasm_bindgen(typescript_custom_section)]
const TYPES: &'static str = r#"
/** How to connect: `connect({ url, certificateHashes, token, code })`. */
export interface ConnectOptions {
  /** The server's WebTransport URL, e.g. `https://127.0.0.1:4433/` (`GET /api/client-config` gives it).
   * Needed unless `transport` is `"websocket"`. */
  url?: string;
  /** Hex SHA-256 hashes of the server's self-signed certificates (from `GET /api/client-config`
   * or `/api/cert-hashes`); omit when the server has a certificate the browser trusts. */
  certificateHashes?: string[];
  /** The server's WebSocket URL (default: `/api/ws` on this page's host, `wss:` from an HTTPS
   * page and `ws:` from an HTTP one; give it when the timing server is elsewhere). */
  webSocketUrl?: string;
  /** Which transport carries the session. `"auto"` (default): WebTransport first, WebSocket after
   * `transportHeadStartMs` (or at once if WebTransport fails sooner), and the first session the
   * server welcomes is kept; the winner is remembered per server in `localStorage`, so after a
   * WebSocket win the next connect goes straight to WebSocket (WebTransport only if WebSocket
   * fails or takes over 2 s), and a classroom on WebSocket retries
   * WebTransport in the background (5 minutes after it last failed, without taking a seat) so
   * that the next connect uses it again once the network allows. `"webtransport"` or
   * `"websocket"`: only that one, and nothing remembered. */
  transport?: "auto" | "webtransport" | "websocket";
  /** How long WebTransport is tried alone before WebSocket starts too (ms, default 500). */
  transportHeadStartMs?: number;
  /** The signed token (JWT) from the school's sign-in; the display name and role come from it. */
  token: string;
  /** The join code of the room to join (students and teachers). */
  code?: string;
  /** Teachers: create a room (instead of `code`). */
  create?: { name: string; tempoBpm?: number; beatsPerBar?: number };
  /** Reconnect with backoff after the connection drops, and sync again (default `true`). */
  reconnect?: boolean;
}

/** How to check the network: `probe({ transport, url, certificateHashes, webSocketUrl, durationMs })`.
 * No token: a check works before anyone signs in. */
export interface ProbeOptions {
  /** Which transport to check (run one probe per transport to compare them). */
  transport: "webtransport" | "websocket";
  /** The server's WebTransport URL (from `GET /api/client-config`); needed for `"webtransport"`. */
  url?: string;
  /** Hex SHA-256 hashes of the server's self-signed certificates, as for `connect()`. */
  certificateHashes?: string[];
  /** The server's WebSocket URL (default: `/api/ws` on this page's host), as for `connect()`. */
  webSocketUrl?: string;
  /** How long to sync once the server answered (ms, default 3000; the server's
   * `--probe-duration-ms` caps it). */
  durationMs?: number;
  /** How long opening the session and the server's answer may take (ms, default 10000). A
   * network that silently drops UDP makes WebTransport hang until then (or until the browser
   * gives up, about 4 s in Chromium). */
  timeoutMs?: number;
}

/** What `probe()` found. */
export interface ProbeResult {
  transport: "webtransport" | "websocket";
  /** The server answered on this transport and replied to clock sync. */
  reachable: boolean;
  /** Why not, as a stable code (null when reachable): `connect_failed` (no session: blocked,
   * refused, or a certificate problem), `timeout`, `not_synced` (the session opened but no
   * clock-sync reply came back), `closed`, `protocol`, or the server's (`too_many_probes`,
   * `server_busy`, `shutting_down`, ...). */
  code: string | null;
  /** Details, for people who read logs. */
  message: string | null;
  /** From the start of the probe to the server's answer (ms). */
  connectMs: number | null;
  /** Round trips of the clock-sync exchanges (ms). */
  rttMs: { min: number; p50: number; p95: number } | null;
  /** The clock estimate's statistical uncertainty (ms). */
  uncertaintyMs: number | null;
  /** A bound on the clock error: the uncertainty plus half the smallest round trip (ms). */
  errorBoundMs: number | null;
  /** The estimate counts as synced (enough samples, uncertainty under 1 ms). */
  synced: boolean;
  /** `"good"`: synced with an error bound up to 10 ms; `"fair"`: up to 25 ms; `"poor"`:
   * otherwise, or a 95th-percentile round trip over 500 ms. Null without any sample. */
  quality: "good" | "fair" | "poor" | null;
  /** Clock-sync replies received and requests sent. */
  samples: number;
  sent: number;
}

/** A rejected promise or thrown error of this package. */
export interface DownbeatError extends Error {
  name: "DownbeatError";
  /** Stable snake_case code: the server's codes (`room_not_found`, `forbidden`, `token_expired`,
   * `room_full`, `tempo_out_of_range`, `no_prompt`, `store_unavailable`, ... see the README) or this
   * package's: `connect_failed`, `closed`, `timeout`, `not_synced`, `protocol`, `invalid_argument`. */
  code: string;
}

/** A member of the room, as this page was last told. */
export interface Member {
  id: number;
  name: string;
  role: "teacher" | "student";
  muted: boolean;
  /** Assigned part (e.g. "drums"), or null. */
  part: string | null;
  /** Assigned positions in the bar, 0 for the downbeat; empty: any. */
  beats: number[];
  /** The member's own report of its clock sync (every couple of seconds). */
  sync: { synced: boolean; rttMs: number; uncertaintyMs: number };
  /** What carries their session: WebSocket where the school's network blocks QUIC. */
  transport: "webtransport" | "websocket";
}

/** A beat placed on both clocks. */
export interface Beat {
  /** Beat number on the shared timeline. */
  index: number;
  /** Position in the bar, 0 for the downbeat. */
  beatInBar: number;
  /** A count-in click rather than music. */
  countIn: boolean;
  /** When it sounds, server time (ms). */
  serverTime: number;
  /** When it sounds, `performance.now()` time (ms). */
  localTime: number;
}

/** The timeline in force now. */
export interface TimelineInfo {
  /** Increases with every change. */
  epoch: number;
  running: boolean;
  tempoBpm: number;
  beatsPerBar: number;
  /** Now is inside a count-in. */
  countIn: boolean;
  /** A decided change not yet in force (changes land on the next bar). */
  next: { at: number; beat: number; running: boolean; tempoBpm: number; beatsPerBar: number } | null;
}

/** This page's clock sync. */
export interface SyncInfo {
  /** Synced well enough to schedule by. */
  synced: boolean;
  /** Smallest round trip in the window (ms). */
  rttMs: number | null;
  /** Statistical uncertainty of the offset (ms). */
  uncertaintyMs: number | null;
  /** Server minus local clock (ms). */
  offsetMs: number | null;
  driftPpm: number | null;
  samples: number;
}

/** A classmate's note to sound. */
export interface ScheduledNote {
  /** Member id of the player. */
  from: number;
  seq: number;
  midi: number;
  velocity: number;
  instrument: number;
  /** When it was played, server time (ms). */
  serverTime: number;
  /** When everyone sounds it, server time (ms). */
  playAt: number;
  /** When to sound it, `performance.now()` time (ms). */
  localTime: number;
}

/** A note this page played. */
export interface PlayedNote {
  seq: number;
  midi: number;
  velocity: number;
  instrument: number;
  serverTime: number;
  /** When everyone (this page too) should sound it, server time (ms). */
  playAt: number;
}

/** A timeline change the server accepted. */
export interface Applied {
  epoch: number;
  /** When it takes effect, server time (ms): the next bar. */
  effectiveAt: number;
  /** The beat at which it takes effect. */
  effectiveBeat: number;
}

export interface Prompt { id: number; text: string }

/** Where a note landed: its distance from the nearest beat (negative: early) and whether that is on the beat (within 60 ms). */
export interface BeatOffset { offsetMs: number; onBeat: boolean }

/** A recording running in the room (its take number in this class). */
export interface Recording { take: number }

/** A recording playing back: server times (ms) of its first beat and, once asked, its stop. */
export interface Playback { take: number; startsAt: number; stopsAt: number | null }

export interface ReflectionNotice { memberId: number; id: string; promptId: number; mood: number | null; text: string | null }

export interface ParticipationNotice {
  memberId: number; notes: number; timed: number; onBeat: number; meanOffsetMs: number;
  assigned: number; inPart: number; turns: number; score: number | null;
}

/** Events of a classroom and what their listeners receive. */
export interface ClassroomEvents {
  /** The whole member list, after any join, leave or update. */
  "members": Member[];
  "member-joined": Member;
  "member-left": { id: number; reason: "left" | "removed" | "closed" };
  "member-updated": Member;
  /** A new timeline applied (tempo, meter, start, stop). */
  "timeline": TimelineInfo;
  /** A classmate's note, to schedule at `localTime` / `audioTimeOf(ctx, playAt)`. */
  "note": ScheduledNote;
  /** The teacher's reflection question changed (null: cleared). */
  "prompt": Prompt | null;
  /** A recording started (or stopped: null). Everyone is told; show it. */
  "recording": Recording | null;
  /** A recording plays back (its notes arrive as `note`s from member 0); null: it is over. */
  "playback": Playback | null;
  /** Teachers: a student's reflection was saved. */
  "reflection": ReflectionNotice;
  /** Teachers: participation of those who played since the last update. */
  "participation": ParticipationNotice[];
  /** `synced` flipped. */
  "sync": SyncInfo;
  /** An error not tied to a request. */
  "error": { code: string; message: string };
  "reconnecting": { attempt: number; delayMs: number; reason: string };
  "reconnected": { memberId: number };
  /** The classroom is closed for good (room closed, removed, refused, or `close()`). */
  "closed": { reason: string; code: string | null };
}

export interface Classroom {
  /** Listens to an event. */
  on<K extends keyof ClassroomEvents>(type: K, listener: (detail: ClassroomEvents[K]) => void): void;
  /** Stops listening. */
  off<K extends keyof ClassroomEvents>(type: K, listener: (detail: ClassroomEvents[K]) => void): void;
}
"#;
