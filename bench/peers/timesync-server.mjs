#!/usr/bin/env node
// Peer 3: the strongest design a careful web developer would build without Downbeat.
// Socket.IO, plus the `timesync` package's NTP-like clock sync over the same socket, plus
// Web-Audio-style lookahead scheduling on the synced clock.
//
// - Rooms, roles and joining are those of peer 1 (socketio-server.mjs).
// - The room has a timeline on the server's clock: segments {from, at, bpm}; beat n of a
//   segment sounds at `at + (n - from) · 60000 / bpm` ms. `start` places beat 0 one lead
//   (1.5 s, Downbeat's `room::Config::lead_nanos`) ahead; a tempo change starts a new segment
//   at the first bar line (4 beats) at least one lead ahead; `stop` ends it at the first beat
//   at least one lead ahead, so no client has scheduled a beat that will not sound.
// - Every 100 ms (Downbeat's frame interval) a timer sends each beat whose instant falls
//   within the lead, once: `beat {room, index, at, timeline, sentNs}`. The timeline travels
//   with every beat, so a client that missed `started` or `tempo` still has it.
// - `timesync` requests are answered with the server's clock, as timesync's Socket.IO example.
// - Notes are relayed like peer 1's; their sender stamps them with `playAt` on the server's
//   clock (its synced estimate plus 80 ms, Downbeat's playout delay) and receivers play them
//   then.
//
// The server's clock is the host's monotonic clock in ms (a fraction, not `Date.now()`'s
// whole ms): what `performance.timeOrigin + performance.now()` gives an app, and the truth
// the benchmark measures against. `*Ns` fields are the same clock in ns as decimal strings,
// added only for the benchmark.
//
// Events (client → server): join {room, role, name} (ack → {room, students, members, address}),
//   start {bpm}, tempo {bpm}, stop, note {..., playAt}, timesync {id} (→ timesync {id, result}).
// Events (server → room): presence, started {room, bpm, timeline, startedNs},
//   tempo {room, bpm, timeline, atNs, nextIndex}, stopped {room, timeline, stopAt, stoppedNs},
//   beat {room, index, at, timeline, sentNs}, note {room, ...}.
//
// CLI: node timesync-server.mjs [--host 127.0.0.1] [--port 0] [--verbose]

import { LEAD_MS, nowNs, timeOf, validBpm } from './common.mjs';
import { startClassroom } from './socketio-classroom.mjs';

/** How often the beat sender wakes: Downbeat's per-member frame interval. */
const SEND_INTERVAL_MS = 100;
/** Beats per bar; tempo changes take effect on a bar line, as Downbeat's do. */
const BEATS_PER_BAR = 4;

/** The server's clock in ms. */
const serverMs = () => Number(nowNs()) / 1e6;

/** A room's metronome: { bpm, timeline, next (the first beat not sent yet), timer }. */
const newRoom = () => ({ bpm: 120, timeline: null, next: 0, timer: null });

function stopRoom(room) {
  clearInterval(room.timer);
  room.timer = null;
}

const { io, log } = startClassroom({
  script: 'timesync-server.mjs',
  name: 'timesync',
  newRoom,
  stopRoom,
  onConnection: (socket, teacherRoom) => {
    // timesync's request: answer with this server's clock, at once (its Socket.IO example).
    socket.on('timesync', (data) => {
      socket.emit('timesync', { id: data && 'id' in data ? data.id : null, result: serverMs() });
    });

    socket.on('start', (msg) => {
      const room = teacherRoom();
      if (!room) return;
      if (msg && validBpm(msg.bpm)) room.bpm = msg.bpm;
      room.timeline = { segments: [{ from: 0, at: serverMs() + LEAD_MS, bpm: room.bpm }], end: null };
      room.next = 0;
      io.to(room.code).emit('started', {
        room: room.code,
        bpm: room.bpm,
        timeline: room.timeline,
        startedNs: nowNs().toString(),
      });
      sendBeats(room);
      stopRoom(room);
      room.timer = setInterval(() => sendBeats(room), SEND_INTERVAL_MS);
      log(`room ${room.code} starts at ${room.bpm} BPM`);
    });

    socket.on('tempo', (msg) => {
      const room = teacherRoom();
      if (!room || !room.timeline || room.timeline.end !== null || !msg || !validBpm(msg.bpm)) return;
      // The first bar line at least one lead ahead (and after every beat already sent).
      const earliest = serverMs() + LEAD_MS;
      let from = Math.ceil(room.next / BEATS_PER_BAR) * BEATS_PER_BAR;
      while (timeOf(room.timeline, from) < earliest) from += BEATS_PER_BAR;
      const at = timeOf(room.timeline, from);
      room.bpm = msg.bpm;
      room.timeline = { segments: [...room.timeline.segments, { from, at, bpm: msg.bpm }], end: null };
      io.to(room.code).emit('tempo', {
        room: room.code,
        bpm: msg.bpm,
        timeline: room.timeline,
        atNs: nowNs().toString(),
        nextIndex: from,
      });
    });

    socket.on('stop', () => {
      const room = teacherRoom();
      if (!room || !room.timeline || room.timeline.end !== null) return;
      // Beats already sent will sound; the timeline ends after them, at least one lead ahead.
      const earliest = serverMs() + LEAD_MS;
      let end = room.next;
      while (timeOf(room.timeline, end) < earliest) end += 1;
      const stopAt = timeOf(room.timeline, end);
      room.timeline = { ...room.timeline, end };
      io.to(room.code).emit('stopped', { room: room.code, timeline: room.timeline, stopAt, stoppedNs: nowNs().toString() });
      // The timer sends the beats before the end and then has nothing left to send.
      log(`room ${room.code} stops at beat ${end}`);
    });
  },
});

/** Sends every beat not yet sent whose instant is within one lead of now, each once. */
function sendBeats(room) {
  const horizon = serverMs() + LEAD_MS;
  for (;;) {
    const at = room.timeline && timeOf(room.timeline, room.next);
    if (at === null || at > horizon) break;
    io.to(room.code).emit('beat', { room: room.code, index: room.next, at, timeline: room.timeline, sentNs: nowNs().toString() });
    room.next += 1;
  }
}
