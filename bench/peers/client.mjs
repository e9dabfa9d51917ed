#!/usr/bin/env node
// Load generator and measurement client for the three peers (see README.md for the output
// schema).
//
// Simulates N students, each with its own connection, in one Node process or split over
// several (`--processes`), plus one teacher connection (not measured) that waits for the
// students, starts the metronome, optionally changes the tempo, and stops it after
// `--seconds`. Every student records, on the shared monotonic clock, the instant its beat
// handler runs (the instant a "play on arrival" client plays the beat) and the instant each
// note from another student arrives. Notes carry their sender's send instant.
//
// Against the timesync peer, students are the careful page instead (timesync-client.mjs): an
// injected local clock synced by timesync before joining, beats scheduled ahead on the synced
// clock, notes played at their `playAt`. They also record the true instant each beat and note
// is scheduled for, when it was decided, and their clock error every 100 ms.

import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { io as ioClient } from 'socket.io-client';
import { WebSocket } from 'ws';
import { LEAD_MS, nowNs, percentile, stringifyWithBigInt, timeOf } from './common.mjs';
import { InjectedClock, LOOKAHEAD_MS, PLAYOUT_DELAY_MS, TICK_MS, startTimesync } from './timesync-client.mjs';

const USAGE = `usage: node client.mjs --peer socketio|ws|timesync --url URL [options]

  --peer socketio|ws|timesync  which peer server this talks to (required)
  --url URL                 the server (http://host:port or ws://host:port; both accepted)
  --clients N               students to simulate (default 5)
  --room CODE               room code (default "bench")
  --seconds S               how long the teacher keeps the metronome running (default 10)
  --bpm B                   tempo the teacher starts with (default 120)
  --tempo-change S:B[,..]   the teacher sets tempo B at S seconds after start
  --notes-per-second R      notes each student plays while running (default 0)
  --bind-address A[,B,..]   local address(es) to bind client sockets to; client with global id
                            g uses the (g mod count)-th one; the teacher uses the first
  --processes P             split the students over P child processes (default 1)
  --no-teacher              run students only; they stop when the room is stopped
  --wait-for N              the teacher starts once N students are in the room
                            (default: all students of this run)
  --client-id-base K        global id of the first student here (default 0)
  --drain-ms MS             keep listening this long after "stopped" (default 300)
  --timeout-seconds T       give up after T s in all (default seconds + 60)
  --out FILE                write the JSON there (default: one line on stdout)
  --seed S                  seed of the timesync students' injected clocks (default 1)
  --summary                 print a human summary to stderr
`;

function parseOptions(argv) {
  const { values } = parseArgs({
    args: argv,
    options: {
      peer: { type: 'string' },
      url: { type: 'string' },
      clients: { type: 'string', default: '5' },
      room: { type: 'string', default: 'bench' },
      seconds: { type: 'string', default: '10' },
      bpm: { type: 'string', default: '120' },
      'tempo-change': { type: 'string', default: '' },
      'notes-per-second': { type: 'string', default: '0' },
      'bind-address': { type: 'string', default: '' },
      processes: { type: 'string', default: '1' },
      'no-teacher': { type: 'boolean', default: false },
      'wait-for': { type: 'string' },
      'client-id-base': { type: 'string', default: '0' },
      'drain-ms': { type: 'string', default: '300' },
      'timeout-seconds': { type: 'string' },
      out: { type: 'string' },
      summary: { type: 'boolean', default: false },
      seed: { type: 'string', default: '1' },
      'ns-as-strings': { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
  });
  if (values.help) {
    process.stdout.write(USAGE);
    process.exit(0);
  }
  const num = (name, { integer = false, min = 0 } = {}) => {
    const v = Number(values[name]);
    if (!Number.isFinite(v) || v < min || (integer && !Number.isInteger(v))) {
      throw new Error(`--${name}: expected ${integer ? 'an integer' : 'a number'} ≥ ${min}, got ${values[name]}`);
    }
    return v;
  };
  if (!['socketio', 'ws', 'timesync'].includes(values.peer)) throw new Error('--peer must be socketio, ws or timesync');
  if (!values.url) throw new Error('--url is required');
  const seconds = num('seconds');
  const clients = num('clients', { integer: true });
  const tempoChanges = values['tempo-change']
    ? values['tempo-change'].split(',').map((item) => {
        const [at, bpm] = item.split(':').map(Number);
        if (!Number.isFinite(at) || !Number.isFinite(bpm)) throw new Error(`--tempo-change: bad item ${item}`);
        return { at, bpm };
      })
    : [];
  return {
    peer: values.peer,
    url: values.url,
    clients,
    room: values.room,
    seconds,
    bpm: num('bpm', { min: 1 }),
    tempoChanges,
    notesPerSecond: num('notes-per-second'),
    bindAddresses: values['bind-address'] ? values['bind-address'].split(',').map((s) => s.trim()).filter(Boolean) : [],
    processes: num('processes', { integer: true, min: 1 }),
    teacher: !values['no-teacher'],
    waitFor: values['wait-for'] === undefined ? clients : num('wait-for', { integer: true }),
    clientIdBase: num('client-id-base', { integer: true }),
    drainMs: num('drain-ms'),
    timeoutSeconds: values['timeout-seconds'] === undefined ? seconds + 60 : num('timeout-seconds'),
    out: values.out,
    summary: values.summary,
    seed: num('seed', { integer: true }),
    nsAsStrings: values['ns-as-strings'],
    rawArgs: argv,
  };
}

// ---------------------------------------------------------------------------------------------
// Connections: one small interface over both peers. `onEvent(type, msg, arrivalNs)` is called
// with the arrival instant read first thing in the app-level handler, after the message is
// decoded (Socket.IO decodes before calling handlers, so the ws side parses JSON first too).

const EVENTS = ['presence', 'started', 'tempo', 'stopped', 'beat', 'note', 'timesync'];

function connectSocketIo(url, localAddress, onEvent) {
  const httpUrl = url.replace(/^ws(s?):/, 'http$1:');
  return new Promise((resolve, reject) => {
    const socket = ioClient(httpUrl, {
      // WebSocket from the first byte: no long-polling handshake and upgrade (fairness, see
      // README). forceNew: a Manager and a connection of its own for every simulated client.
      transports: ['websocket'],
      forceNew: true,
      reconnection: false,
      timeout: 10000,
      // engine.io-client hands `localAddress` to the `ws` constructor, which gives it to
      // http.request: the TCP socket binds to that address.
      ...(localAddress ? { localAddress } : {}),
    });
    for (const type of EVENTS) {
      socket.on(type, (msg) => onEvent(type, msg, nowNs()));
    }
    socket.once('connect', () => {
      resolve({
        join: (room, role, name) =>
          new Promise((res, rej) => {
            socket.timeout(10000).emit('join', { room, role, name }, (err, ack) => {
              if (err) rej(new Error('join: no answer'));
              else if (ack?.error) rej(new Error(`join: ${ack.error}`));
              else res(ack);
            });
          }),
        send: (type, payload = {}) => socket.emit(type, payload),
        close: () => socket.disconnect(),
      });
    });
    socket.once('connect_error', (err) => {
      socket.close();
      reject(err);
    });
  });
}

function connectWs(url, localAddress, onEvent) {
  const wsUrl = url.replace(/^http(s?):/, 'ws$1:');
  return new Promise((resolve, reject) => {
    // `ws` hands the options to http.request: `localAddress` binds the TCP socket.
    const ws = new WebSocket(wsUrl, localAddress ? { localAddress } : {});
    let pendingJoin = null;
    ws.on('message', (data) => {
      let msg;
      try {
        msg = JSON.parse(data.toString());
      } catch {
        return;
      }
      const arrival = nowNs();
      if (msg.type === 'joined' && pendingJoin) {
        pendingJoin.resolve(msg);
        pendingJoin = null;
      } else if (msg.type === 'error' && pendingJoin) {
        pendingJoin.reject(new Error(`join: ${msg.error}`));
        pendingJoin = null;
      } else {
        onEvent(msg.type, msg, arrival);
      }
    });
    ws.once('open', () => {
      resolve({
        join: (room, role, name) =>
          new Promise((res, rej) => {
            pendingJoin = { resolve: res, reject: rej };
            ws.send(JSON.stringify({ type: 'join', room, role, name }));
            setTimeout(() => {
              if (pendingJoin) {
                pendingJoin = null;
                rej(new Error('join: no answer'));
              }
            }, 10000).unref();
          }),
        send: (type, payload = {}) => {
          if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type, ...payload }));
        },
        close: () => ws.close(),
      });
    });
    ws.once('error', (err) => {
      if (ws.readyState !== WebSocket.OPEN) reject(err);
    });
  });
}

const connect = (peer, url, localAddress, onEvent) =>
  (peer === 'ws' ? connectWs : connectSocketIo)(url, localAddress, onEvent);

// ---------------------------------------------------------------------------------------------
// One process's run: its students and, unless --no-teacher, the teacher.

async function runLocal(opts) {
  const n = opts.clients;
  // The timesync peer's students sync their clocks and schedule ahead (timesync-client.mjs).
  const scheduled = opts.peer === 'timesync';
  const ids = Array.from({ length: n }, (_, i) => opts.clientIdBase + i);
  const addressFor = (id) => (opts.bindAddresses.length ? opts.bindAddresses[id % opts.bindAddresses.length] : undefined);

  const beats = new Map(); // index → { index, server_sent_ns, arrivals_ns }
  const notes = new Map(); // "from:seq" → { from, seq, sent_ns, arrivals_ns }
  const tempoChanges = [];
  let startedNs = null;
  let startedBpm = null;
  let stoppedNs = null;
  let stoppedCount = 0;
  let onAllStopped = () => {};
  const allStopped = new Promise((resolve) => {
    onAllStopped = resolve;
  });

  const noteRecord = (from, seq) => {
    const key = `${from}:${seq}`;
    let rec = notes.get(key);
    if (!rec) {
      rec = { from, seq, sent_ns: null, arrivals_ns: new Array(n).fill(null) };
      if (scheduled) rec.playouts_ns = new Array(n).fill(null);
      notes.set(key, rec);
    }
    return rec;
  };

  const beatRecord = (index) => {
    let rec = beats.get(index);
    if (!rec) {
      rec = { index, server_sent_ns: null, arrivals_ns: new Array(n).fill(null) };
      if (scheduled) {
        rec.at_ns = null;
        rec.onsets_ns = new Array(n).fill(null);
        rec.decided_ns = new Array(n).fill(null);
      }
      beats.set(index, rec);
    }
    return rec;
  };

  const students = ids.map((id, i) => ({
    id,
    index: i,
    conn: null,
    connectMs: null,
    serverAddress: null,
    error: null,
    noteTimer: null,
    phaseTimer: null,
    seq: 0,
    stopped: false,
    // The timesync peer's page: its clock, timesync, the newest timeline, the last beat it
    // scheduled, when its socket connected and its first sync round ended, its clock errors.
    clock: scheduled ? new InjectedClock(opts.seed, id) : null,
    sync: null,
    timeline: null,
    lastScheduled: null,
    welcomedNs: null,
    syncedMs: null,
    clockErrors: [],
  }));

  const startNotes = (s) => {
    if (opts.notesPerSecond <= 0 || s.noteTimer || s.phaseTimer) return;
    const periodMs = 1000 / opts.notesPerSecond;
    const play = () => {
      const seq = s.seq++;
      const rec = noteRecord(s.id, seq);
      const sentNs = nowNs();
      rec.sent_ns = sentNs;
      const note = { from: s.id, seq, sentNs: sentNs.toString(), pitch: 60 + (seq % 12) };
      // The careful page stamps its note with the instant everyone plays it, on the server's clock.
      if (scheduled) note.playAt = s.sync.serverNowMs() + PLAYOUT_DELAY_MS;
      s.conn.send('note', note);
    };
    // A random phase per student, so the room's notes are spread over the period.
    s.phaseTimer = setTimeout(() => {
      s.phaseTimer = null;
      if (s.stopped) return;
      play();
      s.noteTimer = setInterval(play, periodMs);
    }, Math.random() * periodMs);
  };
  const stopNotes = (s) => {
    clearTimeout(s.phaseTimer);
    clearInterval(s.noteTimer);
    s.phaseTimer = null;
    s.noteTimer = null;
  };

  const onStudentEvent = (s) => (type, msg, arrival) => {
    // Every timeline the timesync peer sends is its newest (one TCP stream keeps them in order).
    if (scheduled && msg && typeof msg === 'object' && msg.timeline) s.timeline = msg.timeline;
    switch (type) {
      case 'timesync':
        s.sync?.receive(msg);
        break;
      case 'beat': {
        const rec = beatRecord(msg.index);
        if (rec.server_sent_ns === null) rec.server_sent_ns = BigInt(msg.sentNs);
        if (scheduled && rec.at_ns === null) rec.at_ns = BigInt(Math.round(msg.at * 1e6));
        if (rec.arrivals_ns[s.index] === null) rec.arrivals_ns[s.index] = arrival;
        break;
      }
      case 'note': {
        const rec = noteRecord(msg.from, msg.seq);
        if (rec.sent_ns === null && typeof msg.sentNs === 'string') rec.sent_ns = BigInt(msg.sentNs);
        if (rec.arrivals_ns[s.index] === null) {
          rec.arrivals_ns[s.index] = arrival;
          // Scheduled at its playAt, converted to this page's clock (in the past when late).
          if (scheduled && typeof msg.playAt === 'number' && s.sync?.hasOffset()) {
            rec.playouts_ns[s.index] = s.clock.trueNsAt(s.sync.localMsOf(msg.playAt));
          }
        }
        break;
      }
      case 'started':
        if (startedNs === null) {
          startedNs = BigInt(msg.startedNs);
          startedBpm = msg.bpm;
        }
        startNotes(s);
        break;
      case 'tempo':
        if (!tempoChanges.some((t) => t.at_ns === BigInt(msg.atNs))) {
          tempoChanges.push({ at_ns: BigInt(msg.atNs), bpm: msg.bpm, next_index: msg.nextIndex });
        }
        break;
      case 'stopped':
        if (stoppedNs === null) stoppedNs = BigInt(msg.stoppedNs);
        stopNotes(s);
        if (!s.stopped) {
          s.stopped = true;
          stoppedCount += 1;
          if (stoppedCount === students.filter((x) => x.conn).length) onAllStopped();
        }
        break;
      default:
        break;
    }
  };

  const stopWaiters = [];
  let timedOut = false;
  const deadline = setTimeout(() => {
    timedOut = true;
    process.stderr.write(`client: timed out after ${opts.timeoutSeconds} s\n`);
    onAllStopped();
    for (const wake of stopWaiters) wake();
  }, opts.timeoutSeconds * 1000);

  // The timesync peer's pages: every 25 ms each schedules the beats of the next 200 ms on its
  // synced clock, from the one after the last it scheduled (so a beat that fell into the past
  // meanwhile is scheduled late), as Downbeat's students do; every 100 ms its clock error
  // against the truth is sampled, as Downbeat's are.
  const scheduleBeats = () => {
    for (const s of students) {
      if (!s.conn || !s.timeline || !s.sync?.hasOffset()) continue;
      const serverNow = s.sync.serverNowMs();
      let next = s.lastScheduled === null ? s.timeline.segments[0].from : s.lastScheduled + 1;
      if (s.lastScheduled === null) {
        while (timeOf(s.timeline, next) !== null && timeOf(s.timeline, next) < serverNow) next += 1;
      }
      const decided = nowNs();
      for (;;) {
        const at = timeOf(s.timeline, next);
        if (at === null || at > serverNow + LOOKAHEAD_MS) break;
        const rec = beatRecord(next);
        rec.at_ns = BigInt(Math.round(at * 1e6));
        rec.onsets_ns[s.index] = s.clock.trueNsAt(s.sync.localMsOf(at));
        rec.decided_ns[s.index] = decided;
        s.lastScheduled = next;
        next += 1;
      }
    }
  };
  const sampleClocks = () => {
    const t = nowNs();
    for (const s of students) {
      if (!s.conn || !s.sync?.hasOffset()) continue;
      const estimate = s.clock.localMsAt(t) + s.sync.ts.offset;
      s.clockErrors.push([t, BigInt(Math.round((estimate - Number(t) / 1e6) * 1e6))]);
    }
  };
  const scheduler = scheduled ? setInterval(scheduleBeats, TICK_MS) : null;
  const sampler = scheduled ? setInterval(sampleClocks, 100) : null;

  // Students connect and join, all at once. The timesync peer's pages join once their first
  // sync round has ended; their join time leaves that wait out (it is `synced_ms`).
  await Promise.all(
    students.map(async (s) => {
      const t0 = nowNs();
      try {
        s.conn = await connect(opts.peer, opts.url, addressFor(s.id), onStudentEvent(s));
        const connected = nowNs();
        let joinFrom = t0;
        if (scheduled) {
          s.welcomedNs = connected;
          s.sync = startTimesync(s.conn, s.clock);
          await s.sync.firstRound;
          s.syncedMs = Number(nowNs() - t0) / 1e6;
          joinFrom = nowNs() - (connected - t0);
        }
        const ack = await s.conn.join(opts.room, 'student', `s-${s.id}`);
        s.connectMs = Number(nowNs() - joinFrom) / 1e6;
        s.serverAddress = ack.address ?? null;
      } catch (err) {
        s.error = String(err?.message ?? err);
        if (s.conn) s.conn.close();
        s.conn = null;
      }
    }),
  );
  const failed = students.filter((s) => s.error);
  for (const s of failed) process.stderr.write(`client ${s.id}: ${s.error}\n`);
  if (n > 0 && failed.length === n) {
    clearTimeout(deadline);
    throw new Error('no student could connect');
  }

  let teacher = null;
  let teacherStopped = Promise.resolve();
  if (opts.teacher) {
    let present = 0;
    let wake = () => {};
    let onStopped = () => {};
    teacherStopped = new Promise((resolve) => {
      onStopped = resolve;
    });
    stopWaiters.push(onStopped, () => wake());
    const onTeacherEvent = (type, msg) => {
      if (type === 'presence') {
        present = msg.students;
        wake();
      } else if (type === 'stopped') {
        onStopped();
      }
    };
    teacher = await connect(opts.peer, opts.url, opts.bindAddresses[0], onTeacherEvent);
    const ack = await teacher.join(opts.room, 'teacher', 'teacher');
    present = Math.max(present, ack.students);
    // Students of this process that could not connect will not come (they are in
    // `connect_errors`); the class starts without them rather than never.
    const expected = opts.waitFor - failed.length;
    while (present < expected) {
      if (timedOut) throw new Error(`only ${present} of ${expected} students joined in time`);
      await new Promise((resolve) => {
        wake = resolve;
      });
    }
    teacher.send('start', { bpm: opts.bpm });
    for (const change of opts.tempoChanges) {
      setTimeout(() => teacher.send('tempo', { bpm: change.bpm }), change.at * 1000);
    }
    setTimeout(() => teacher.send('stop'), opts.seconds * 1000);
  }

  if (students.some((s) => s.conn)) await allStopped;
  await teacherStopped;
  clearTimeout(deadline);
  for (const s of students) stopNotes(s);
  await new Promise((resolve) => setTimeout(resolve, opts.drainMs));
  clearInterval(scheduler);
  clearInterval(sampler);
  for (const s of students) s.sync?.stop();
  for (const s of students) s.conn?.close();
  teacher?.close();

  return {
    peer: opts.peer,
    url: opts.url,
    room: opts.room,
    clients: n,
    client_ids: ids,
    bpm: opts.bpm,
    seconds: opts.seconds,
    notes_per_second: opts.notesPerSecond,
    processes: 1,
    started_ns: startedNs,
    started_bpm: startedBpm,
    stopped_ns: stoppedNs,
    tempo_changes: tempoChanges,
    beats: [...beats.values()].sort((a, b) => a.index - b.index),
    notes: [...notes.values()].sort((a, b) => a.from - b.from || a.seq - b.seq),
    connect_ms: students.map((s) => s.connectMs),
    server_addresses: students.map((s) => s.serverAddress),
    connect_errors: failed.map((s) => ({ client: s.id, error: s.error })),
    ...(scheduled ? scheduledFields(students) : {}),
  };
}

/** The timesync peer's own fields: its settings and, per student, sync and clock errors. */
function scheduledFields(students) {
  return {
    lead_ms: LEAD_MS,
    lookahead_ms: LOOKAHEAD_MS,
    tick_ms: TICK_MS,
    playout_delay_ms: PLAYOUT_DELAY_MS,
    welcomed_ns: students.map((s) => s.welcomedNs),
    synced_ms: students.map((s) => s.syncedMs),
    clock_errors_ns: students.map((s) => s.clockErrors),
  };
}

// ---------------------------------------------------------------------------------------------
// Several processes: children run the students, this process runs the teacher and merges.

function dropOptions(args, names) {
  const out = [];
  for (let i = 0; i < args.length; i++) {
    const arg = args[i];
    const name = arg.startsWith('--') ? arg.slice(2).split('=')[0] : null;
    if (name && names.includes(name)) {
      const takesValue = !arg.includes('=') && !['no-teacher', 'summary'].includes(name);
      if (takesValue) i++;
      continue;
    }
    out.push(arg);
  }
  return out;
}

async function runParent(opts) {
  const dir = mkdtempSync(join(tmpdir(), 'downbeat-peers-'));
  const script = fileURLToPath(import.meta.url);
  const base = dropOptions(opts.rawArgs, [
    'clients', 'client-id-base', 'processes', 'out', 'no-teacher', 'summary', 'wait-for', 'timeout-seconds',
  ]);
  const children = [];
  let first = opts.clientIdBase;
  for (let k = 0; k < opts.processes; k++) {
    const count = Math.floor(opts.clients / opts.processes) + (k < opts.clients % opts.processes ? 1 : 0);
    const out = join(dir, `part-${k}.json`);
    const args = [
      script, ...base,
      '--clients', String(count), '--client-id-base', String(first), '--no-teacher', '--out', out, '--ns-as-strings',
      // The children's deadline covers waiting for their siblings and the teacher.
      '--timeout-seconds', String(opts.timeoutSeconds),
    ];
    first += count;
    const child = spawn(process.execPath, args, { stdio: ['ignore', 'inherit', 'inherit'] });
    children.push({
      out,
      done: new Promise((resolve, reject) => {
        child.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`child ${k} exited with ${code}`))));
      }),
    });
  }
  // The teacher, with no students of its own, waits for all of them.
  const teacherRun = runLocal({ ...opts, clients: 0, waitFor: opts.waitFor, teacher: true });
  try {
    await Promise.all([teacherRun, ...children.map((c) => c.done)]);
    const parts = children.map((c) => JSON.parse(readFileSync(c.out, 'utf8'), bigIntReviver));
    return merge(opts, parts);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

// Children write every *_ns value as a decimal string (--ns-as-strings); read them back exact.
function bigIntReviver(key, value) {
  if (typeof value === 'string' && (key.endsWith('_ns') || /^\d+$/.test(key)) && /^-?\d+$/.test(value)) {
    return BigInt(value);
  }
  return value;
}

function merge(opts, parts) {
  const total = parts.reduce((acc, p) => acc + p.clients, 0);
  const beats = new Map();
  const notes = new Map();
  let offset = 0;
  // Per-student arrays (the timesync peer has more of them) are placed at each part's offset.
  const place = (rec, from, fields) => {
    for (const field of fields) {
      if (!from[field]) continue;
      rec[field] ??= new Array(total).fill(null);
      from[field].forEach((a, i) => (rec[field][offset + i] = a));
    }
  };
  for (const p of parts) {
    for (const b of p.beats) {
      let rec = beats.get(b.index);
      if (!rec) {
        rec = { index: b.index, server_sent_ns: b.server_sent_ns, arrivals_ns: new Array(total).fill(null) };
        if (b.at_ns !== undefined) rec.at_ns = b.at_ns;
        beats.set(b.index, rec);
      }
      rec.server_sent_ns ??= b.server_sent_ns;
      if (rec.at_ns === null) rec.at_ns = b.at_ns;
      place(rec, b, ['arrivals_ns', 'onsets_ns', 'decided_ns']);
    }
    for (const note of p.notes) {
      const key = `${note.from}:${note.seq}`;
      let rec = notes.get(key);
      if (!rec) {
        rec = { from: note.from, seq: note.seq, sent_ns: note.sent_ns, arrivals_ns: new Array(total).fill(null) };
        notes.set(key, rec);
      }
      if (rec.sent_ns === null) rec.sent_ns = note.sent_ns;
      place(rec, note, ['arrivals_ns', 'playouts_ns']);
    }
    offset += p.clients;
  }
  const scheduled = parts.some((p) => p.clock_errors_ns);
  const pick = (field) => parts.map((p) => p[field]).find((v) => v !== null && v !== undefined) ?? null;
  return {
    peer: opts.peer,
    url: opts.url,
    room: opts.room,
    clients: total,
    client_ids: parts.flatMap((p) => p.client_ids),
    bpm: opts.bpm,
    seconds: opts.seconds,
    notes_per_second: opts.notesPerSecond,
    processes: parts.length,
    started_ns: pick('started_ns'),
    started_bpm: pick('started_bpm'),
    stopped_ns: pick('stopped_ns'),
    tempo_changes: parts.find((p) => p.tempo_changes.length)?.tempo_changes ?? [],
    beats: [...beats.values()].sort((a, b) => a.index - b.index),
    notes: [...notes.values()].sort((a, b) => a.from - b.from || a.seq - b.seq),
    connect_ms: parts.flatMap((p) => p.connect_ms),
    server_addresses: parts.flatMap((p) => p.server_addresses),
    connect_errors: parts.flatMap((p) => p.connect_errors),
    ...(scheduled
      ? {
          lead_ms: parts[0].lead_ms,
          lookahead_ms: parts[0].lookahead_ms,
          tick_ms: parts[0].tick_ms,
          playout_delay_ms: parts[0].playout_delay_ms,
          welcomed_ns: parts.flatMap((p) => p.welcomed_ns),
          synced_ms: parts.flatMap((p) => p.synced_ms),
          clock_errors_ns: parts.flatMap((p) => p.clock_errors_ns),
        }
      : {}),
  };
}

// ---------------------------------------------------------------------------------------------
// A convenience summary (the Rust harness computes its own figures from the raw samples).

export function summarize(result) {
  const stats = (values) => {
    const sorted = [...values].sort((a, b) => a - b);
    const r = (v) => (v === null ? null : Math.round(v * 10) / 10);
    return { n: sorted.length, p50: r(percentile(sorted, 50)), p99: r(percentile(sorted, 99)), max: r(sorted.at(-1) ?? null) };
  };
  const us = (a, b) => Number(BigInt(a) - BigInt(b)) / 1e3;
  const spreads = [];
  const latencies = [];
  let missing = 0;
  for (const b of result.beats) {
    const got = b.arrivals_ns.filter((a) => a !== null).map(BigInt);
    missing += b.arrivals_ns.length - got.length;
    for (const a of got) latencies.push(us(a, b.server_sent_ns));
    if (got.length >= 2) {
      const min = got.reduce((x, y) => (y < x ? y : x));
      const max = got.reduce((x, y) => (y > x ? y : x));
      spreads.push(Number(max - min) / 1e3);
    }
  }
  // How far the server's sends wander from the ideal grid of beat 0 + n · 60/bpm
  // (meaningful only without tempo changes).
  let lastDriftMs = null;
  const first = result.beats[0];
  const last = result.beats.at(-1);
  if (first && last && result.tempo_changes.length === 0) {
    const ideal = ((last.index - first.index) * 60e9) / result.bpm;
    lastDriftMs = Math.round((Number(BigInt(last.server_sent_ns) - BigInt(first.server_sent_ns)) - ideal) / 1e3) / 1e3;
  }
  const fanout = [];
  let deliveries = 0;
  let expected = 0;
  const local = new Set(result.client_ids);
  for (const note of result.notes) {
    for (const a of note.arrivals_ns) {
      if (a === null) continue;
      deliveries += 1;
      if (note.sent_ns !== null) fanout.push(us(a, note.sent_ns));
    }
    if (local.has(note.from)) expected += result.clients - 1;
  }
  // The timesync peer: where its students scheduled each beat, and their clock errors.
  const scheduledFigures = {};
  if (result.clock_errors_ns) {
    const onsetSpreads = [];
    for (const b of result.beats) {
      const on = b.onsets_ns.filter((o) => o !== null).map(BigInt);
      if (on.length < 2 || BigInt(b.at_ns) > BigInt(result.stopped_ns ?? b.at_ns)) continue;
      onsetSpreads.push(Number(on.reduce((x, y) => (y > x ? y : x)) - on.reduce((x, y) => (y < x ? y : x))) / 1e3);
    }
    scheduledFigures.beat_onset_spread_us = stats(onsetSpreads);
    scheduledFigures.clock_error_us = stats(result.clock_errors_ns.flat().map(([, e]) => Math.abs(Number(e)) / 1e3));
    scheduledFigures.synced_ms = stats(result.synced_ms.filter((v) => v !== null));
  }
  return {
    ...scheduledFigures,
    beats: result.beats.length,
    beat_missing_arrivals: missing,
    beat_arrival_spread_us: stats(spreads),
    beat_arrival_after_send_us: stats(latencies),
    server_drift_at_last_beat_ms: lastDriftMs,
    notes_sent: result.notes.filter((note) => local.has(note.from)).length,
    note_deliveries: deliveries,
    note_deliveries_expected: expected,
    note_fanout_latency_us: stats(fanout),
    connect_ms: stats(result.connect_ms.filter((v) => v !== null)),
  };
}

// ---------------------------------------------------------------------------------------------

async function main() {
  let opts;
  try {
    opts = parseOptions(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`${err.message}\n\n${USAGE}`);
    process.exit(2);
  }
  const result = opts.processes > 1 ? await runParent(opts) : await runLocal(opts);
  if (!opts.nsAsStrings) {
    // The timesync peer's students schedule beats from the timeline, before the beat's own
    // message arrives; a beat whose message reached none of them (the run ended first) has no
    // send instant and is left out. Parts written for a parent keep them: a sibling may have it.
    result.beats = result.beats.filter((b) => b.server_sent_ns !== null);
  }
  const json = opts.nsAsStrings
    ? JSON.stringify(result, (_k, v) => (typeof v === 'bigint' ? v.toString() : v))
    : stringifyWithBigInt(result);
  if (opts.out) writeFileSync(opts.out, `${json}\n`);
  else process.stdout.write(`${json}\n`);
  if (opts.summary) process.stderr.write(`${JSON.stringify({ peer: opts.peer, clients: result.clients, ...summarize(result) })}\n`);
  // Socket.IO's and ws's sockets are closed; leave without waiting on stray timers.
  process.exit(0);
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  main().catch((err) => {
    process.stderr.write(`client: ${err?.stack ?? err}\n`);
    process.exit(1);
  });
}
