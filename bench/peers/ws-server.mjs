#!/usr/bin/env node
// Peer 2: the design the original plan described. A plain WebSocket server (npm `ws`), one
// timer per room rescheduled every Math.floor(60000 / bpm) ms (a setTimeout chain in integer
// milliseconds: its rounding and the timer's lateness add up, and that drift is part of what
// the benchmark measures). Beats and notes are pushed as JSON; clients play on arrival.
//
// Messages are JSON objects with a `type`.
// Client → server: join {room, role, name}, start {bpm}, tempo {bpm}, stop,
//   note {...anything; relayed as is with `room` added to the rest of the room}.
// Server → client: joined {room, students, members, address} (to the joiner),
//   error {error}, presence {room, students, members}, started {room, bpm, startedAt,
//   startedNs}, tempo {room, bpm, atNs, nextIndex}, stopped {room, stoppedNs},
//   beat {room, index, sentAt, sentNs}, note {room, ...}.
// `sentNs`/`startedNs`/... are the shared monotonic clock in ns as decimal strings, added only
// so the benchmark can measure; `sentAt` is wall-clock ms.
//
// CLI: node ws-server.mjs [--host 127.0.0.1] [--port 0] [--verbose]

import http from 'node:http';
import { WebSocket, WebSocketServer } from 'ws';
import { listen, makeLog, nowNs, serverArgs, validBpm } from './common.mjs';

const { host, port, verbose } = serverArgs(process.argv.slice(2), 'ws-server.mjs');
const log = makeLog('ws', verbose);

const httpServer = http.createServer((req, res) => {
  if (req.url === '/health') {
    res.writeHead(200, { 'content-type': 'text/plain' }).end('ok\n');
  } else {
    res.writeHead(404).end();
  }
});
// ws defaults: no per-message compression on the server; ws turns Nagle off on every socket.
const wss = new WebSocketServer({ server: httpServer });

/** code → { code, bpm, running, index, timer, clients: Set<WebSocket>, students: number } */
const rooms = new Map();

function roomOf(code) {
  let room = rooms.get(code);
  if (!room) {
    room = { code, bpm: 120, running: false, index: 0, timer: null, clients: new Set(), students: 0 };
    rooms.set(code, room);
    log(`room ${code} created`);
  }
  return room;
}

/** Sends one serialized message to every open socket in the room except `except`. */
function broadcast(room, message, except = null) {
  const data = JSON.stringify(message);
  for (const client of room.clients) {
    if (client !== except && client.readyState === WebSocket.OPEN) client.send(data);
  }
}

function beat(room) {
  broadcast(room, {
    type: 'beat',
    room: room.code,
    index: room.index,
    sentAt: Date.now(),
    sentNs: nowNs().toString(),
  });
  room.index += 1;
}

// The plan's timer: each tick sends the beat, then schedules the next one
// Math.floor(60000 / bpm) ms later.
function tick(room) {
  beat(room);
  room.timer = setTimeout(() => tick(room), Math.floor(60000 / room.bpm));
}

function stopRoom(room) {
  clearTimeout(room.timer);
  room.timer = null;
  room.running = false;
}

function presence(room) {
  broadcast(room, { type: 'presence', room: room.code, students: room.students, members: room.clients.size });
}

wss.on('connection', (ws, req) => {
  const address = req.socket.remoteAddress;
  log(`connection from ${address}`);
  const state = { room: null, role: 'student' };

  const send = (message) => {
    if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(message));
  };

  ws.on('message', (data) => {
    let msg;
    try {
      msg = JSON.parse(data.toString());
    } catch {
      return send({ type: 'error', error: 'invalid JSON' });
    }
    if (msg === null || typeof msg !== 'object') return;

    if (msg.type === 'join') {
      const code = typeof msg.room === 'string' ? msg.room.trim() : '';
      if (!code || state.room) return send({ type: 'error', error: state.room ? 'already joined' : 'room code required' });
      const room = roomOf(code);
      state.room = room;
      state.role = msg.role === 'teacher' ? 'teacher' : 'student';
      room.clients.add(ws);
      if (state.role === 'student') room.students += 1;
      send({ type: 'joined', room: code, students: room.students, members: room.clients.size, address });
      presence(room);
      return;
    }

    const room = state.room;
    if (!room) return send({ type: 'error', error: 'join first' });

    if (msg.type === 'note') {
      broadcast(room, { ...msg, room: room.code }, ws);
      return;
    }
    if (state.role !== 'teacher') return;

    if (msg.type === 'start') {
      if (validBpm(msg.bpm)) room.bpm = msg.bpm;
      stopRoom(room);
      room.running = true;
      room.index = 0;
      broadcast(room, { type: 'started', room: room.code, bpm: room.bpm, startedAt: Date.now(), startedNs: nowNs().toString() });
      tick(room);
      log(`room ${room.code} started at ${room.bpm} BPM`);
    } else if (msg.type === 'tempo') {
      if (!validBpm(msg.bpm)) return;
      room.bpm = msg.bpm;
      // The plan: the new interval takes effect when the running timer next reschedules.
      broadcast(room, { type: 'tempo', room: room.code, bpm: room.bpm, atNs: nowNs().toString(), nextIndex: room.index });
    } else if (msg.type === 'stop') {
      stopRoom(room);
      broadcast(room, { type: 'stopped', room: room.code, stoppedNs: nowNs().toString() });
      log(`room ${room.code} stopped`);
    }
  });

  ws.on('close', () => {
    const room = state.room;
    if (!room) return;
    room.clients.delete(ws);
    if (state.role === 'student') room.students -= 1;
    if (room.clients.size === 0) {
      stopRoom(room);
      rooms.delete(room.code);
      log(`room ${room.code} closed`);
    } else {
      presence(room);
    }
  });
  ws.on('error', (err) => log(`socket error: ${err.message}`));
});

const close = () =>
  new Promise((resolve) => {
    for (const room of rooms.values()) stopRoom(room);
    for (const client of wss.clients) client.terminate();
    wss.close(() => httpServer.close(() => resolve()));
  });
listen(httpServer, host, port, close, log);
