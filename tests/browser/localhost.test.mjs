// The pages from http://localhost, as the README's run command prints them: `localhost` is a
// secure context without any certificate, and Chromium tries ::1 first for it, so the server
// listens dual-stack here ([::]) the way its defaults do.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import {
  joinClass, launchBrowser, openUser, startClass, startServer, waitUntil, withDiagnostics,
} from './harness.mjs';

let server = null;
let browser = null;
const users = [];

describe('the pages from http://localhost', { timeout: 5 * 60_000 }, () => {
  before(async () => {
    server = await startServer({ httpAddr: '[::]:0' });
    browser = await launchBrowser();
  });

  after(async () => {
    if (browser) await browser.close().catch(() => {});
    if (server) await server.stop();
  });

  test('a student page on localhost is secure, isolated, and joins a class', { timeout: 120_000 },
    withDiagnostics(() => server, () => users, async () => {
      const base = `http://localhost:${server.port}`;
      const teacher = await openUser(browser, server.teacherPage(base), 'teacher (localhost)');
      users.push(teacher);
      const code = await startClass(teacher);

      const student = await openUser(browser, `${base}/student`, 'Fay (localhost)');
      users.push(student);
      const context = await student.page.evaluate(() => ({
        host: location.hostname,
        secure: window.isSecureContext,
        isolated: window.crossOriginIsolated,
        webTransport: typeof WebTransport,
      }));
      console.log(`student page: ${JSON.stringify(context)}`);
      assert.deepEqual(context, { host: 'localhost', secure: true, isolated: true, webTransport: 'function' });
      const config = await student.page.evaluate(async () => (await fetch('/api/client-config')).json());
      console.log(`client config: ${config.webtransport_url}, ${config.certificate_hashes.length} pinned hashes`);
      assert.match(config.webtransport_url, /^https:\/\/localhost:\d+\/$/);

      await joinClass(student, code, 'Fay');
      await waitUntil(student, 'a synced clock', () => window.downbeat?.classroom?.synced(), undefined, 60_000);
      await waitUntil(teacher, 'a card for Fay', () =>
        [...document.querySelectorAll('[data-testid=member-card]')].some((c) => c.textContent.includes('Fay')));
    }));
});
