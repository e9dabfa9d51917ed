// The pages over HTTPS: a school serves them with a certificate its Chromebooks trust, and the
// page is then a secure context (WebTransport exists) and cross-origin isolated. Here the
// server's own development certificate stands in for that, trusted through
// --ignore-certificate-errors-spki-list (the key's hash, read off the TLS handshake) the way
// an installed school CA would be; WebTransport still pins the hashes from /api/client-config.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import {
  joinClass, launchBrowser, openUser, presentedSpkiHash, startBeat, startClass, startServer, waitUntil,
  withDiagnostics,
} from './harness.mjs';

let server = null;
let browser = null;
const users = [];

describe('the pages over HTTPS', { timeout: 5 * 60_000 }, () => {
  before(async () => {
    server = await startServer({ https: true });
    const spki = await presentedSpkiHash(server.httpsPort);
    console.log(`server: ${server.httpsBase} (certificate key sha-256 ${spki})`);
    browser = await launchBrowser({ extraArgs: [`--ignore-certificate-errors-spki-list=${spki}`] });
  });

  after(async () => {
    if (browser) await browser.close().catch(() => {});
    if (server) await server.stop();
  });

  test('a teacher and a student hold a class from https:// pages', { timeout: 180_000 },
    withDiagnostics(() => server, () => users, async () => {
      const teacher = await openUser(browser, server.teacherPage(server.httpsBase), 'teacher (https)');
      users.push(teacher);
      const context = await teacher.page.evaluate(() => ({
        protocol: location.protocol,
        secure: window.isSecureContext,
        isolated: window.crossOriginIsolated,
        webTransport: typeof WebTransport,
      }));
      console.log(`teacher page: ${JSON.stringify(context)}`);
      assert.deepEqual(context, { protocol: 'https:', secure: true, isolated: true, webTransport: 'function' });

      const code = await startClass(teacher);

      const student = await openUser(browser, `${server.httpsBase}/student`, 'Dev (https)');
      users.push(student);
      await joinClass(student, code, 'Dev');
      await waitUntil(teacher, 'a card for Dev', () =>
        [...document.querySelectorAll('[data-testid=member-card]')].some((c) => c.textContent.includes('Dev')));
      await waitUntil(student, 'a synced clock', () => window.downbeat.classroom.synced(), undefined, 60_000);

      const start = await startBeat(teacher);
      const beats = await waitUntil(student, '4 beats scheduled after the start', (at) => {
        const b = window.downbeat.trace.beats.filter((x) => x.serverTime >= at);
        return b.length >= 4 ? b : false;
      }, start.effectiveAt, 60_000);
      assert.equal(beats[0].index, start.effectiveBeat, 'the first beat scheduled is the one the start named');
      console.log(`https student scheduled beats ${beats.map((b) => b.index).join(', ')}`);
    }));
});
