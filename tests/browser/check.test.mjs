// The network check page (/check) in real Chromium, before anyone signs in.
//
// 1. On a normal network the page probes both transports and says this computer will use
//    WebTransport, with good timing, and fills in the IT table with the server's real ports.
// 2. With the WebTransport UDP port silently dropped (the URL the page gets points at a UDP
//    socket that answers nothing: a filter dropping QUIC, no ICMP, no refusal) the page says
//    this computer will use WebSocket and timing is still good, within a bounded time, which
//    is measured and printed.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { launchBrowser, openUser, startBlackHole, startServer, waitUntil, withDiagnostics } from './harness.mjs';

/** The longest the page may take from loading to its verdict: the WebTransport probe's open
 * timeout (8 s) plus the 3 s of syncing and some slack for a loaded machine. */
const VERDICT_MS = 15_000;

/** Loads /check for a fresh user and waits for the verdict: what the page concluded. */
async function check(browser, server, label, users) {
  const loadedAt = Date.now();
  const user = await openUser(browser, `${server.base}/check`, label);
  users.push(user);
  const state = await waitUntil(user, 'the verdict', () => window.downbeat?.check?.done && window.downbeat.check,
    undefined, 30_000);
  const text = await user.page.getByTestId('verdict').textContent();
  const detail = await user.page.getByTestId('verdict-detail').textContent();
  const wallMs = Date.now() - loadedAt;
  const ms = (x) => (typeof x === 'number' ? `${x.toFixed(2)} ms` : '-');
  const show = (r) => {
    if (!r) return 'not run';
    if (!r.reachable) return `unreachable (${r.code}): ${r.message}`;
    return `reachable, answered after ${ms(r.connectMs)}, rtt p50 ${ms(r.rttMs?.p50)} p95 ${ms(r.rttMs?.p95)}, ` +
      `clock error bound ${ms(r.errorBoundMs)}, ${r.samples}/${r.sent} replies, ${r.quality}`;
  };
  console.log(`[${label}] verdict after ${state.elapsedMs.toFixed(0)} ms in the page (${wallMs} ms from navigation): ` +
    `"${text}" ${detail}\n  webtransport: ${show(state.results.webtransport)}\n  websocket: ${show(state.results.websocket)}\n` +
    `  audio: ${JSON.stringify(state.audio)}`);
  return { user, state, text, wallMs };
}

describe('the network check page', { timeout: 5 * 60_000 }, () => {
  let hole = null;
  let server = null;
  let blocked = null;
  let browser = null;
  const users = [];

  before(async () => {
    hole = await startBlackHole();
    server = await startServer();
    blocked = await startServer({ extraArgs: ['--public-wt-url', `https://127.0.0.1:${hole.port}/`] });
    browser = await launchBrowser();
  });

  after(async () => {
    if (browser) await browser.close().catch(() => {});
    if (server) await server.stop();
    if (blocked) await blocked.stop();
    if (hole) hole.close();
  });

  test('on a normal network the verdict is WebTransport with good timing', { timeout: 120_000 },
    withDiagnostics(() => server, () => users, async () => {
      const { user, state, text } = await check(browser, server, 'normal network', users);
      assert.equal(state.verdict, 'webtransport');
      assert.match(text, /will use WebTransport; timing is good\./);
      for (const transport of ['webtransport', 'websocket']) {
        const r = state.results[transport];
        assert.ok(r.reachable, `${transport} is reachable: ${JSON.stringify(r)}`);
        assert.equal(r.quality, 'good', `${transport}: ${JSON.stringify(r)}`);
        assert.ok(r.samples >= 20, `${transport}: ${r.samples} clock-sync replies`);
      }
      assert.equal(await user.page.getByTestId('check-secure').textContent(), 'Yes.');
      const allowlist = await user.page.getByTestId('allowlist').textContent();
      assert.ok(allowlist.includes(`UDP ${server.wtPort}`), allowlist);
      assert.ok(allowlist.includes(`TCP ${server.port}`), allowlist);
      const metrics = await (await fetch(`${server.base}/metrics`)).text();
      for (const transport of ['webtransport', 'websocket']) {
        assert.match(metrics, new RegExp(`downbeat_probes_started_total\\{transport="${transport}"\\} 1\\b`));
      }
    }));

  test('with the WebTransport UDP port silently dropped the verdict is WebSocket, in bounded time',
    { timeout: 120_000 }, withDiagnostics(() => blocked, () => users, async () => {
      const packetsBefore = hole.packets;
      const { state, text, wallMs } = await check(browser, blocked, 'UDP dropped', users);
      console.log(`  ${hole.packets - packetsBefore} QUIC packets vanished into the black hole`);
      assert.ok(hole.packets > packetsBefore, 'WebTransport was tried');
      assert.equal(state.verdict, 'websocket');
      assert.match(text, /will use WebSocket; timing is still good\./);
      const wt = state.results.webtransport;
      assert.ok(!wt.reachable && ['connect_failed', 'timeout'].includes(wt.code), JSON.stringify(wt));
      assert.ok(state.results.websocket.reachable);
      assert.ok(state.elapsedMs <= VERDICT_MS, `verdict after ${state.elapsedMs.toFixed(0)} ms (≤ ${VERDICT_MS} ms)`);
      assert.ok(wallMs <= VERDICT_MS + 5_000, `verdict ${wallMs} ms after navigating`);
    }));
});
