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

import http from 'node:http';
import { Server } from 'socket.io';
import { announceAndHandleSignals, makeLog, nowNs, serverArgs, validBpm } from './common.mjs';

const { host, port, verbose } = serverArgs(process.argv.slice(2), 'socketio-server.mjs');
const log = makeLog('socketio', verbose);

const httpServer = http.createServer((req, res) => {
  if (req.url === '/health') {
    res.writeHead(200, { 'content-type': 'text/plain' }).end('ok\n');
  } else {
    res.writeHead(404).end();
  }
});

// Defaults, as an app would leave them: both transports allowed (the bench clients ask for
// WebSocket only), no per-message compression (Socket.IO's default), CORS open for the pages.
const io = new Server(httpServer, { cors: { origin: '*' } });

/** code → { code, bpm, running, index, timer, students: Set<socketId>, members: number } */
const rooms = new Map();

function roomOf(code) {
  let room = rooms.get(code);
  if (!room) {
    room = { code, bpm: 120, running: false, index: 0, timer: null, students: new Set(), members: 0 };
    rooms.set(code, room);
    log(`room ${code} created`);
  }
  return room;
}

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

function stopRoom(room) {
  clearInterval(room.timer);
  room.timer = null;
  room.running = false;
}

function presence(room) {
  io.to(room.code).emit('presence', {
    room: room.code,
    students: room.students.size,
    members: room.members,
  });
}

io.on('connection', (socket) => {
  log(`connection ${socket.id} from ${socket.handshake.address}`);

  socket.on('join', (msg, ack) => {
    const code = typeof msg?.room === 'string' ? msg.room.trim() : '';
    if (!code || socket.data.room) {
      if (typeof ack === 'function') ack({ error: socket.data.room ? 'already joined' : 'room code required' });
      return;
    }
    const room = roomOf(code);
    socket.data.room = code;
    socket.data.role = msg.role === 'teacher' ? 'teacher' : 'student';
    socket.data.name = typeof msg.name === 'string' ? msg.name : '';
    socket.join(code);
    room.members += 1;
    if (socket.data.role === 'student') room.students.add(socket.id);
    if (typeof ack === 'function') {
      ack({
        room: code,
        students: room.students.size,
        members: room.members,
        address: socket.handshake.address,
      });
    }
    presence(room);
  });

  const teacherRoom = () => {
    if (socket.data.role !== 'teacher') return null;
    return rooms.get(socket.data.room) ?? null;
  };

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

  socket.on('note', (msg) => {
    const code = socket.data.room;
    if (!code || msg === null || typeof msg !== 'object') return;
    socket.to(code).emit('note', { ...msg, room: code });
  });

  socket.on('disconnect', () => {
    const code = socket.data.room;
    const room = code && rooms.get(code);
    if (!room) return;
    room.members -= 1;
    room.students.delete(socket.id);
    if (room.members <= 0) {
      stopRoom(room);
      rooms.delete(code);
      log(`room ${code} closed`);
    } else {
      presence(room);
    }
  });
});

httpServer.listen(port, host, () => {
  announceAndHandleSignals(
    httpServer,
    () =>
      new Promise((resolve) => {
        for (const room of rooms.values()) stopRoom(room);
        // Closes every socket and the HTTP server.
        io.close(() => resolve());
      }),
    log,
  );
  log(`listening on ${host}:${httpServer.address().port}`);
});
