// WebSocket, for school networks that block QUIC. The package races WebTransport against
// WebSocket, keeps the first session the server welcomes and remembers the winner per server.
//
// 1. The WebTransport URL the pages get points at a UDP socket that takes every packet and
//    answers none (a filter silently dropping QUIC: no ICMP, no refusal). A student still joins,
//    over WebSocket, and hears a beat within 2 s of clicking Join; on the next visit (same
//    browser profile) the page goes straight to WebSocket: no WebTransport connection is even
//    attempted.
// 2. A tab forced onto WebSocket and a tab forced onto WebTransport in one room schedule every
//    beat within 2 ms of each other on the server's true clock.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import {
  launchBrowser, measureClock, openTab, openUser, startBeat, startBlackHole, startClass, startServer, waitUntil,
  withDiagnostics,
} from './harness.mjs';

/** The longest a child may wait from clicking Join to the first beat scheduled. */
const FIRST_BEAT_MS = 2000;
/** The widest two tabs' instants of one beat may differ on the true clock. */
const SPREAD_MS = 2;

const fmt = (x, digits = 3) => (typeof x === 'number' ? x.toFixed(digits) : String(x));

/**
 * Fills in the join form of a student page and clicks Join from inside the page, having first
 * hooked the page's test handles to record (on its `performance.now()` clock) the click, the
 * moment `connect()` resolved (the page stores the classroom) and the first beat its metronome
 * scheduled. Returns nothing; `window.marks` holds the instants.
 */
async function joinMarked(user, code, name) {
  await waitUntil(user, 'the join button to be enabled', () => !document.querySelector('[data-testid=join]').disabled);
  await user.page.getByTestId('code-input').fill(code);
  await user.page.getByTestId('name-input').fill(name);
  await user.page.evaluate(() => {
    const d = window.downbeat;
    const marks = { clickAt: null, connectedAt: null, firstBeatAt: null };
    window.marks = marks;
    let classroom = d.classroom;
    Object.defineProperty(d, 'classroom', {
      configurable: true,
      enumerable: true,
      get: () => classroom,
      set: (c) => {
        classroom = c;
        marks.connectedAt ??= performance.now();
      },
    });
    const push = d.trace.beats.push.bind(d.trace.beats);
    d.trace.beats.push = (...beats) => {
      marks.firstBeatAt ??= performance.now();
      return push(...beats);
    };
    marks.clickAt = performance.now();
    document.querySelector('[data-testid=join]').click();
  });
}

/** Waits for the first scheduled beat of a `joinMarked` page; returns its marks and transport. */
async function firstBeat(user) {
  return waitUntil(user, 'the first beat scheduled', () => {
    const m = window.marks;
    return m.firstBeatAt !== null ? { ...m, transport: window.downbeat.classroom.transport } : false;
  }, undefined, 30_000);
}

describe('a network that silently drops QUIC', { timeout: 5 * 60_000 }, () => {
  let hole = null;
  let server = null;
  let browser = null;
  const users = [];

  before(async () => {
    hole = await startBlackHole();
    server = await startServer({ extraArgs: ['--public-wt-url', `https://127.0.0.1:${hole.port}/`] });
    browser = await launchBrowser();
  });

  after(async () => {
    if (browser) await browser.close().catch(() => {});
    if (server) await server.stop();
    if (hole) hole.close();
  });

  test('a student joins over WebSocket, hears a beat within 2 s, and goes straight to WebSocket next time',
    { timeout: 180_000 }, withDiagnostics(() => server, () => users, async () => {
      const teacher = await openUser(browser, server.teacherPage(), 'teacher');
      users.push(teacher);
      const code = await startClass(teacher);
      const start = await startBeat(teacher);
      console.log(`class ${code} started; the teacher is on ${await teacher.page.evaluate(() => window.downbeat.classroom.transport)}`);

      // A visit of Gus's: what both must show; returns how many QUIC connections it attempted.
      const visit = async (user, what) => {
        const [packetsBefore, sourcesBefore] = [hole.packets, new Set(hole.sources)];
        await joinMarked(user, code, 'Gus');
        const marks = await firstBeat(user);
        const beatMs = marks.firstBeatAt - marks.clickAt;
        const attempts = [...hole.sources].filter((s) => !sourcesBefore.has(s)).length;
        console.log(`${what}: connected after ${fmt(marks.connectedAt - marks.clickAt, 1)} ms, first beat scheduled ` +
          `${fmt(beatMs, 1)} ms after the click, over ${marks.transport}; meanwhile ${attempts} new QUIC connections ` +
          `attempted and ${hole.packets - packetsBefore} QUIC packets vanished`);
        assert.equal(marks.transport, 'websocket', `${what}: the page joined over WebSocket`);
        assert.ok(beatMs <= FIRST_BEAT_MS, `${what}: the first beat was scheduled ${fmt(beatMs, 1)} ms after the click (≤ ${FIRST_BEAT_MS} ms)`);
        const beat = await user.page.evaluate(() => window.downbeat.trace.beats[0]);
        assert.ok(beat.serverTime >= start.effectiveAt, `${what}: the first beat is one of the running class`);
        return attempts;
      };

      // First visit: WebTransport is tried (its packets vanish), WebSocket wins.
      const first = await openUser(browser, `${server.base}/student`, 'Gus');
      users.push(first);
      assert.ok(await visit(first, 'first visit') > 0, 'WebTransport was tried first');
      const memory = await first.page.evaluate(() => Object.entries(localStorage).filter(([k]) => k.startsWith('downbeat.')));
      console.log(`remembered: ${JSON.stringify(memory)}`);

      // Second visit, same browser profile: straight to WebSocket, no QUIC connection at all
      // (packets of the first visit's abandoned attempt may still arrive).
      await first.page.close();
      const second = await openTab(first.context, `${server.base}/student`, 'Gus again');
      users.push(second);
      assert.equal(await visit(second, 'second visit'), 0, 'no WebTransport attempt at all on the second visit');
    }));
});

/** Joins from a student page's own modules with the transport forced; returns the one in use. */
async function joinForced(user, code, name, transport) {
  return user.page.evaluate(async ({ code, name, transport }) => {
    const common = await import('/common.js');
    const config = await common.loadConfig();
    const token = await common.mintDemoToken('student', name);
    const classroom = await common.connectClassroom(config, token, { code: common.normalizeCode(code), transport });
    const ctx = common.openAudio(null);
    new common.Metronome(classroom, new common.Sound(ctx), window.downbeat.trace).start();
    Object.assign(window.downbeat, { classroom, ctx });
    return classroom.transport;
  }, { code, name, transport });
}

describe('WebSocket and WebTransport in one room', { timeout: 5 * 60_000 }, () => {
  let server = null;
  let browser = null;
  const users = [];

  before(async () => {
    server = await startServer();
    browser = await launchBrowser();
  });

  after(async () => {
    if (browser) await browser.close().catch(() => {});
    if (server) await server.stop();
  });

  test('a WebSocket tab and a WebTransport tab schedule every beat within 2 ms on the true clock',
    { timeout: 180_000 }, withDiagnostics(() => server, () => users, async () => {
      const teacher = await openUser(browser, server.teacherPage(), 'teacher');
      users.push(teacher);
      const code = await startClass(teacher);
      const tabs = [];
      for (const [name, transport] of [['Wes', 'websocket'], ['Tia', 'webtransport']]) {
        const u = await openUser(browser, `${server.base}/student`, `${name} (${transport})`);
        users.push(u);
        tabs.push(u);
        assert.equal(await joinForced(u, code, name, transport), transport, `${name} is on ${transport}`);
        await waitUntil(u, 'classroom.synced()', () => window.downbeat.classroom.synced(), undefined, 60_000);
      }
      const start = await startBeat(teacher);
      for (const u of tabs) {
        await waitUntil(u, '12 beats scheduled after the start', (at) =>
          window.downbeat.trace.beats.filter((b) => b.serverTime >= at).length >= 12, start.effectiveAt, 60_000);
      }

      for (const u of tabs) {
        const clock = await measureClock(u);
        u.truthOffset = clock.truthOffset;
        const sync = await u.page.evaluate(() => window.downbeat.classroom.sync());
        console.log(`${u.label}: estimate error in [${fmt(clock.lo)}, ${fmt(clock.hi)}] ms (bracket ${fmt(clock.width)} ms); ` +
          `rtt ${fmt(sync.rttMs)} ms, ±${fmt(sync.uncertaintyMs)} ms, ${sync.samples} samples`);
      }

      const maps = [];
      for (const u of tabs) {
        const beats = await u.page.evaluate(() => window.downbeat.trace.beats);
        maps.push(new Map(beats.filter((b) => b.serverTime >= start.effectiveAt).map((b) => [b.index, b])));
      }
      const common = [...maps[0].keys()].filter((i) => maps.every((m) => m.has(i)));
      assert.ok(common.length >= 8, `at least 8 beats scheduled in both tabs (got ${common.length})`);
      let maxSpread = 0;
      for (const index of common) {
        const [ws, wt] = maps.map((m) => m.get(index));
        assert.equal(ws.serverTime, wt.serverTime, `beat ${index} has one server instant in both tabs`);
        const spread = Math.abs((ws.localTime + tabs[0].truthOffset) - (wt.localTime + tabs[1].truthOffset));
        maxSpread = Math.max(maxSpread, spread);
        assert.ok(spread <= SPREAD_MS, `beat ${index}: the tabs' true instants differ by ${fmt(spread)} ms (≤ ${SPREAD_MS} ms)`);
      }
      console.log(`WEBSOCKET vs WEBTRANSPORT: ${common.length} beats, max spread ${fmt(maxSpread)} ms on the true clock`);
    }));
});
