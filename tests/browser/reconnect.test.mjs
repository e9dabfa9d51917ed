// Reconnection in the browser: the Wi-Fi drops (a UDP relay between Chromium and the server
// stops passing packets, and a TCP relay, through which the student's page and its WebSocket
// reach the server, stalls), the package notices, reports `reconnecting`, and once packets flow
// again it reconnects by itself with backoff, takes the same seat back and syncs again.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import {
  joinClass, launchBrowser, openUser, startBeat, startClass, startRelay, startServer, startTcpRelay, waitUntil,
  withDiagnostics,
} from './harness.mjs';

let relay = null;
let tcp = null;
let server = null;
let browser = null;
const users = [];

describe('reconnecting after the network drops', { timeout: 5 * 60_000 }, () => {
  before(async () => {
    relay = await startRelay();
    // Pages connect through the relay; a 2 s idle timeout lets both ends notice the cut soon.
    server = await startServer({
      extraArgs: [
        '--public-wt-url', `https://127.0.0.1:${relay.port}/`,
        '--idle-timeout-ms', '2000',
        '--keep-alive-ms', '500',
      ],
    });
    relay.forwardTo(server.wtPort);
    tcp = await startTcpRelay(server.port);
    browser = await launchBrowser();
  });

  after(async () => {
    if (browser) await browser.close().catch(() => {});
    if (server) await server.stop();
    if (relay) relay.close();
    if (tcp) tcp.close();
  });

  test('a student reconnects by itself, keeps its seat and syncs again', { timeout: 180_000 },
    withDiagnostics(() => server, () => users, async () => {
      const teacher = await openUser(browser, server.teacherPage(), 'teacher');
      users.push(teacher);
      const code = await startClass(teacher);

      const student = await openUser(browser, `${tcp.base}/student`, 'Eli');
      users.push(student);
      await joinClass(student, code, 'Eli');
      const before = await waitUntil(student, 'a synced clock', () => {
        const c = window.downbeat && window.downbeat.classroom;
        return c && c.synced() ? { memberId: c.memberId, code: c.code } : false;
      }, undefined, 60_000);
      // Record the package's own events from here on.
      await student.page.evaluate(() => {
        const c = window.downbeat.classroom;
        window.reconnectLog = [];
        for (const type of ['reconnecting', 'reconnected', 'closed', 'sync']) {
          c.on(type, (detail) => window.reconnectLog.push({ type, detail, at: performance.now() }));
        }
      });

      relay.cut();
      tcp.cut();
      const cutAt = Date.now();
      const reconnecting = await waitUntil(student, 'the classroom to notice and start reconnecting', () => {
        const e = window.reconnectLog.find((x) => x.type === 'reconnecting');
        return e && window.downbeat.classroom.state === 'reconnecting' ? e.detail : false;
      }, undefined, 30_000);
      console.log(`noticed the cut after ${Date.now() - cutAt} ms: ${JSON.stringify(reconnecting)}`);
      assert.ok(reconnecting.delayMs > 0 && reconnecting.delayMs <= 10_000, 'a backoff delay within bounds');
      // While cut, attempts fail and back off further.
      await waitUntil(student, 'a second attempt with a longer backoff ceiling', () =>
        window.reconnectLog.filter((x) => x.type === 'reconnecting').length >= 2, undefined, 30_000);

      relay.restore();
      tcp.restore();
      const restoredAt = Date.now();
      const after = await waitUntil(student, 'the classroom to reconnect and sync again', () => {
        const c = window.downbeat.classroom;
        const back = window.reconnectLog.find((x) => x.type === 'reconnected');
        return back && c.state === 'connected' && c.synced()
          ? { memberId: c.memberId, code: c.code, reconnected: back.detail } : false;
      }, undefined, 60_000);
      console.log(`reconnected and synced ${Date.now() - restoredAt} ms after the network came back: ${JSON.stringify(after)}`);
      assert.equal(after.memberId, before.memberId, 'the same seat (member id) within the seat grace');
      assert.equal(after.code, before.code);
      const log = await student.page.evaluate(() => window.reconnectLog.map((x) => x.type));
      assert.ok(!log.includes('closed'), `never closed for good (${log.join(', ')})`);
      const attempts = await student.page.evaluate(() =>
        window.reconnectLog.filter((x) => x.type === 'reconnecting').map((x) => x.detail.attempt));
      assert.deepEqual(attempts, attempts.map((_, i) => i + 1), 'attempts counted 1, 2, 3...');

      // The teacher still has one card for Eli, and the student still gets beats.
      await waitUntil(teacher, 'one card for Eli', () =>
        [...document.querySelectorAll('[data-testid=member-card]')].filter((c) => c.textContent.includes('Eli')).length === 1,
      undefined, 30_000);
      // The teacher's session went through the relay too: it reconnects on its own schedule.
      await waitUntil(teacher, 'the teacher connected again', () => window.downbeat.classroom.state === 'connected',
        undefined, 60_000);
      const start = await startBeat(teacher);
      await waitUntil(student, 'beats scheduled after the start', (at) =>
        window.downbeat.trace.beats.filter((b) => b.serverTime >= at).length >= 2, start.effectiveAt, 60_000);
      console.log(`relay: ${JSON.stringify(relay.counts)}`);
    }));
});
