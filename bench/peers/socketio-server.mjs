#!/usr/bin/env node
// Peer 1: a classroom metronome built the way a typical web app builds one with Socket.IO.
//
// - Rooms are joined by a code; the first join creates the room.
// - The teacher's socket starts, stops and changes the tempo.
// - Per room, a server timer (`setInterval` at 60000 / bpm ms) emits `beat` to the room.
//   Clients play each beat when it arrives.
// - A client's `note` is broadcast to the rest of the room with `socket.to(room).emit`.
//
// Events (client → server): join {room, role, name} (ack → {room, students, members, address}),
//   start {bpm}, tempo {bpm}, stop, note {...anything; relayed as is with `room` added}.
// Events (server → room): presence {room, students, members}, started {room, bpm, startedAt,
//   startedNs}, tempo {room, bpm, atNs, nextIndex}, stopped {room, stoppedNs},
//   beat {room, index, sentAt, sentNs}, note {room, ...}.
// `sentAt` is wall-clock ms (what an app would send); `sentNs` is the shared monotonic clock in
// ns as a decimal string, added only so the benchmark can measure.
//
// CLI: node socketio-server.mjs [--host 127.0.0.1] [--port 0] [--verbose]

import { nowNs, validBpm } from './common.mjs';
import { startClassroom } from './socketio-classroom.mjs';

/** A room's metronome: { bpm, running, index, timer } (the classroom adds code and members). */
const newRoom = () => ({ bpm: 120, running: false, index: 0, timer: null });

function stopRoom(room) {
  clearInterval(room.timer);
  room.timer = null;
  room.running = false;
}

const { io, log } = startClassroom({
  script: 'socketio-server.mjs',
  name: 'socketio',
  newRoom,
  stopRoom,
  onConnection: (socket, teacherRoom) => {
    socket.on('start', (msg) => {
      const room = teacherRoom();
      if (!room) return;
      if (msg && validBpm(msg.bpm)) room.bpm = msg.bpm;
      room.running = true;
      room.index = 0;
      io.to(room.code).emit('started', {
        room: room.code,
        bpm: room.bpm,
        startedAt: Date.now(),
        startedNs: nowNs().toString(),
      });
      // Beat 0 sounds at once; the timer brings the next ones.
      emitBeat(room);
      startTimer(room);
      log(`room ${room.code} started at ${room.bpm} BPM`);
    });

    socket.on('tempo', (msg) => {
      const room = teacherRoom();
      if (!room || !msg || !validBpm(msg.bpm)) return;
      room.bpm = msg.bpm;
      io.to(room.code).emit('tempo', {
        room: room.code,
        bpm: room.bpm,
        atNs: nowNs().toString(),
        nextIndex: room.index,
      });
      if (room.running) startTimer(room);
    });

    socket.on('stop', () => {
      const room = teacherRoom();
      if (!room) return;
      stopRoom(room);
      io.to(room.code).emit('stopped', { room: room.code, stoppedNs: nowNs().toString() });
      log(`room ${room.code} stopped`);
    });
  },
});

function emitBeat(room) {
  io.to(room.code).emit('beat', {
    room: room.code,
    index: room.index,
    sentAt: Date.now(),
    sentNs: nowNs().toString(),
  });
  room.index += 1;
}

function startTimer(room) {
  clearInterval(room.timer);
  room.timer = setInterval(() => emitBeat(room), 60000 / room.bpm);
}
