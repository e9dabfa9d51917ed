// The classroom the two Socket.IO peers share (socketio-server.mjs, timesync-server.mjs): the
// command line, an HTTP server answering `GET /health`, the Socket.IO server with its defaults,
// rooms joined by a code (the first join creates the room), presence, the teacher's checks,
// notes relayed to the rest of the room with `socket.to(room).emit`, and a room closed when its
// last member leaves. Each peer adds only its metronome.

import http from 'node:http';
import { Server } from 'socket.io';
import { listen, makeLog, serverArgs } from './common.mjs';

/**
 * Starts a Socket.IO classroom server from the command line (`--host`, `--port`, `--verbose`).
 *
 * - `newRoom(code)` returns the peer's own state for a new room; the classroom adds `code`,
 *   `students` (a Set of socket ids) and `members` (a count) to it.
 * - `stopRoom(room)` stops the room's timers (when it closes, and on shutdown).
 * - `onConnection(socket, teacherRoom)` adds the peer's events to a connection;
 *   `teacherRoom()` is the socket's room when it joined as its teacher, else null.
 *
 * Returns `{ io, rooms, log }`.
 */
export function startClassroom({ script, name, newRoom, stopRoom, onConnection }) {
  const { host, port, verbose } = serverArgs(process.argv.slice(2), script);
  const log = makeLog(name, verbose);

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

  /** code → the room */
  const rooms = new Map();

  function roomOf(code) {
    let room = rooms.get(code);
    if (!room) {
      room = { ...newRoom(code), code, students: new Set(), members: 0 };
      rooms.set(code, room);
      log(`room ${code} created`);
    }
    return room;
  }

  function presence(room) {
    io.to(room.code).emit('presence', { room: room.code, students: room.students.size, members: room.members });
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
        ack({ room: code, students: room.students.size, members: room.members, address: socket.handshake.address });
      }
      presence(room);
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

    socket.on('note', (msg) => {
      const code = socket.data.room;
      if (!code || msg === null || typeof msg !== 'object') return;
      socket.to(code).emit('note', { ...msg, room: code });
    });

    const teacherRoom = () => (socket.data.role === 'teacher' ? (rooms.get(socket.data.room) ?? null) : null);
    onConnection(socket, teacherRoom);
  });

  const close = () =>
    new Promise((resolve) => {
      for (const room of rooms.values()) stopRoom(room);
      // Closes every socket and the HTTP server.
      io.close(() => resolve());
    });
  listen(httpServer, host, port, close, log);

  return { io, rooms, log };
}
