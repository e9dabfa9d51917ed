// Smoke of the peers (seconds): each server on port 0, 5 students for 3 s at 120 BPM playing
// notes, and checks on the raw JSON. It keeps the peers working; it measures nothing. The
// timesync peer's students first sync their clocks (about 4 s), then schedule ahead.
//
//   npm ci && node --test smoke.mjs

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { summarize } from './client.mjs';
import { stringifyWithBigInt } from './common.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const SERVERS = { socketio: 'socketio-server.mjs', ws: 'ws-server.mjs', timesync: 'timesync-server.mjs' };

/** Starts a peer server on port 0 and resolves with { port, stop() → exit code }. */
function startServer(peer) {
  const child = spawn(process.execPath, [join(here, SERVERS[peer]), '--host', '127.0.0.1', '--port', '0'], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve(code ?? signal)));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${peer} server printed no port`)), 10000);
    child.once('error', reject);
    exited.then((code) => reject(new Error(`${peer} server exited early (${code})`)));
    createInterface({ input: child.stdout }).once('line', (line) => {
      clearTimeout(timer);
      const { port } = JSON.parse(line);
      assert.ok(Number.isInteger(port) && port > 0, `port line: ${line}`);
      resolve({
        port,
        stop: () => {
          child.kill('SIGTERM');
          return exited;
        },
      });
    });
  });
}

function runClient(args) {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [join(here, 'client.mjs'), ...args], { stdio: ['ignore', 'ignore', 'inherit'] });
    const timer = setTimeout(() => child.kill('SIGKILL'), 30000);
    child.on('error', reject);
    child.on('exit', (code) => {
      clearTimeout(timer);
      if (code === 0) resolve();
      else reject(new Error(`client exited with ${code}`));
    });
  });
}

const isNs = (v) => typeof v === 'number' && Number.isInteger(v) && v > 0;

/** Checks the schema and the brief's expectations on one run's JSON. */
function check(result, text, { clients, minBeats }) {
  // Exact integers on the shared clock: never quoted, never in exponent form.
  assert.doesNotMatch(text, /"\d+"|\d[eE][+-]?\d/, 'ns values are plain integers');
  assert.equal(result.clients, clients);
  assert.equal(result.client_ids.length, clients);
  assert.equal(result.connect_ms.length, clients);
  assert.ok(result.connect_ms.every((ms) => typeof ms === 'number' && ms >= 0), 'every student connected');
  assert.deepEqual(result.connect_errors, []);
  assert.ok(isNs(result.started_ns) && isNs(result.stopped_ns) && result.stopped_ns > result.started_ns);

  // Beats: at least minBeats seen by every student, each arrival after the server sent it.
  const complete = result.beats.filter((b) => b.arrivals_ns.every((a) => a !== null));
  assert.ok(complete.length >= minBeats, `${complete.length} beats seen by every client, want ≥ ${minBeats}`);
  for (const b of result.beats) {
    assert.ok(Number.isInteger(b.index) && isNs(b.server_sent_ns));
    assert.equal(b.arrivals_ns.length, clients);
    for (const a of b.arrivals_ns) if (a !== null) assert.ok(isNs(a) && a >= b.server_sent_ns);
  }
  if (result.peer === 'timesync') checkScheduled(result, clients);
  assert.deepEqual(
    result.beats.map((b) => b.index),
    [...result.beats.keys()].map((i) => i + result.beats[0].index),
    'beat indices are consecutive',
  );

  // Notes: each reached the other students and not its sender, after it was sent.
  assert.ok(result.notes.length >= clients, `${result.notes.length} notes played`);
  for (const note of result.notes) {
    assert.ok(isNs(note.sent_ns), 'send instant known');
    const sender = result.client_ids.indexOf(note.from);
    assert.ok(sender >= 0);
    note.arrivals_ns.forEach((a, i) => {
      if (i === sender) assert.equal(a, null, 'a note is not echoed to its sender');
      else {
        assert.ok(isNs(a), `note ${note.from}:${note.seq} reached client ${result.client_ids[i]}`);
        assert.ok(a >= note.sent_ns);
      }
    });
  }
}

/** The timesync peer: every student synced, and scheduled every beat that sounds in the run. */
function checkScheduled(result, clients) {
  assert.equal(result.lead_ms, 1500);
  assert.ok(result.synced_ms.every((ms) => typeof ms === 'number' && ms > 0), 'every student synced');
  assert.ok(result.clock_errors_ns.every((samples) => samples.length > 0), 'clock errors sampled');
  const sounding = result.beats.filter((b) => b.at_ns <= result.stopped_ns);
  assert.ok(sounding.length >= 2, `${sounding.length} beats sound in the run`);
  for (const b of sounding) {
    assert.ok(isNs(b.at_ns) && b.at_ns > b.server_sent_ns, 'a beat is sent ahead of its instant');
    assert.equal(b.onsets_ns.length, clients);
    assert.ok(b.onsets_ns.every(isNs), `beat ${b.index} scheduled by every student`);
    assert.ok(b.decided_ns.every(isNs));
  }
  for (const note of result.notes) {
    note.arrivals_ns.forEach((a, i) => assert.equal(note.playouts_ns[i] === null, a === null, 'a note heard is scheduled'));
  }
}

async function runPeer(t, peer, { clients, seconds, processes = 1, minBeats }) {
  const dir = mkdtempSync(join(tmpdir(), `downbeat-smoke-${peer}-`));
  const server = await startServer(peer);
  try {
    const out = join(dir, 'out.json');
    await runClient([
      '--peer', peer, '--url', `http://127.0.0.1:${server.port}`, '--room', `smoke-${processes}`,
      '--clients', String(clients), '--seconds', String(seconds), '--bpm', '120',
      '--notes-per-second', '2', '--processes', String(processes), '--out', out,
    ]);
    const text = readFileSync(out, 'utf8');
    const result = JSON.parse(text);
    assert.equal(result.peer, peer);
    assert.equal(result.processes, processes);
    check(result, text, { clients, minBeats });
    t.diagnostic(JSON.stringify(summarize(result)));
  } finally {
    const code = await server.stop();
    rmSync(dir, { recursive: true, force: true });
    assert.equal(code, 0, `${peer} server exits 0 on SIGTERM`);
  }
}

test('BigInt values are written as exact integers', () => {
  const big = 2n ** 60n + 1n;
  assert.equal(stringifyWithBigInt({ a_ns: big, list: [big, null], s: 'x' }), `{"a_ns":${big},"list":[${big},null],"s":"x"}`);
});

test('peers', { concurrency: true }, async (t) => {
  await Promise.all([
    t.test('socketio: 5 clients, 3 s, 120 BPM, notes', (t) => runPeer(t, 'socketio', { clients: 5, seconds: 3, minBeats: 4 })),
    t.test('ws: 5 clients, 3 s, 120 BPM, notes', (t) => runPeer(t, 'ws', { clients: 5, seconds: 3, minBeats: 4 })),
    t.test('socketio: 5 clients over 2 processes', (t) =>
      runPeer(t, 'socketio', { clients: 5, seconds: 2, processes: 2, minBeats: 3 })),
    t.test('ws: 5 clients over 2 processes', (t) => runPeer(t, 'ws', { clients: 5, seconds: 2, processes: 2, minBeats: 3 })),
    t.test('timesync: 5 clients, 3 s, 120 BPM, notes', (t) =>
      runPeer(t, 'timesync', { clients: 5, seconds: 3, minBeats: 4 })),
    // A beat sounds in the run only if it was sent at least the lead (1.5 s) before the run
    // ends: a 2 s run leaves a 0.5 s window, one beat period, so 1 or 2 beats depending on
    // where the beat grid falls. 3 s leaves three periods: at least 2 beats always sound.
    t.test('timesync: 5 clients over 2 processes', (t) =>
      runPeer(t, 'timesync', { clients: 5, seconds: 3, processes: 2, minBeats: 3 })),
  ]);
});
