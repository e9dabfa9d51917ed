// Helpers for the browser end-to-end tests: the server as a child process, headless
// Chromium through playwright-core (never a downloaded browser), one context per user, and
// diagnostics printed when a test fails.

import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import dgram from 'node:dgram';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

export const REPO_ROOT = fileURLToPath(new URL('../../', import.meta.url));
export const OUTPUT_DIR = fileURLToPath(new URL('./output/', import.meta.url));

const MAX_LOG = 4 * 1024 * 1024;

/** Keeps the last `MAX_LOG` characters of a stream. */
class LogBuffer {
  constructor() {
    this.text = '';
  }
  push(chunk) {
    this.text += chunk;
    if (this.text.length > MAX_LOG) this.text = this.text.slice(-MAX_LOG);
  }
}

/**
 * Starts the server binary (`DOWNBEAT_BIN`, default `target/debug/downbeat` of the repo) on
 * ephemeral ports with a fresh data directory, and waits for its banner's HTTP port.
 */
export async function startServer({ timeoutMs = 60_000, https = false, httpAddr = '127.0.0.1:0', extraArgs = [] } = {}) {
  const bin = path.resolve(REPO_ROOT, process.env.DOWNBEAT_BIN ?? 'target/debug/downbeat');
  if (!existsSync(bin)) {
    throw new Error(`server binary ${bin} not found: build it (cargo build -p downbeat-server) or set DOWNBEAT_BIN`);
  }
  const dataDir = await mkdtemp(path.join(os.tmpdir(), 'downbeat-browser-'));
  const args = ['--data-dir', dataDir, '--http-addr', httpAddr, '--wt-port', '0'];
  if (https) args.push('--https-addr', '127.0.0.1:0');
  args.push(...extraArgs);
  const child = spawn(bin, args, {
    cwd: REPO_ROOT,
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'info', NO_COLOR: '1' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const stdout = new LogBuffer();
  const stderr = new LogBuffer();
  child.stdout.setEncoding('utf8');
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (d) => stderr.push(d));
  const killOnExit = () => child.kill('SIGKILL');
  process.on('exit', killOnExit);
  let exited = false;
  const exitPromise = new Promise((resolve) => {
    child.on('exit', (code, signal) => {
      exited = true;
      resolve({ code, signal });
    });
  });

  // A host in a banner URL: a name, an IPv4 address or a bracketed IPv6 address.
  const host = String.raw`(?:\[[^\]\s]*\]|[^\s:/]+)`;
  const ports = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      reject(new Error(`no complete banner from the server within ${timeoutMs} ms\nstdout:\n${stdout.text}\nstderr:\n${stderr.text}`));
    }, timeoutMs);
    child.stdout.on('data', (d) => {
      stdout.push(d);
      if (!stdout.text.includes('Press Ctrl-C to stop.')) return;
      const m = new RegExp(String.raw`HTTP API:\s+http://${host}:(\d+)`).exec(stdout.text);
      const s = new RegExp(String.raw`Teacher page:\s+https://${host}:(\d+)`).exec(stdout.text);
      const w = /WebTransport:\s+https:\/\/localhost:(\d+)/.exec(stdout.text);
      // The demo's teacher link carries the teacher secret in its fragment.
      const secret = /Teacher page:\s+http:\/\/\S+\/teacher#secret=([A-Za-z0-9._~-]+)/.exec(stdout.text);
      // The demo's inspector link carries an operator's token in its fragment.
      const inspector = /Inspector:\s+http:\/\/\S+\/inspect#token=([A-Za-z0-9._-]+)/.exec(stdout.text);
      clearTimeout(timer);
      if (m && w && (!https || s)) {
        resolve({
          http: Number(m[1]),
          https: s ? Number(s[1]) : null,
          wt: Number(w[1]),
          secret: secret ? secret[1] : null,
          operatorToken: inspector ? inspector[1] : null,
        });
      } else {
        reject(new Error(`the banner lacks a port (http ${!!m}, https ${!!s}, webtransport ${!!w}):\n${stdout.text}`));
      }
    });
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    exitPromise.then(({ code, signal }) => {
      clearTimeout(timer);
      reject(new Error(`the server exited (code ${code}, signal ${signal}) before its banner\nstderr:\n${stderr.text}`));
    });
  });

  return {
    port: ports.http,
    base: `http://127.0.0.1:${ports.http}`,
    httpsBase: ports.https === null ? null : `https://127.0.0.1:${ports.https}`,
    httpsPort: ports.https,
    wtPort: ports.wt,
    /** The demo teacher secret from the banner's teacher link (null for configured schools). */
    teacherSecret: ports.secret,
    /** The demo operator's token from the banner's inspector link (null for configured schools). */
    operatorToken: ports.operatorToken,
    /** The teacher page at `base` as the banner links it: with the teacher secret, if any. */
    teacherPage(base = this.base) {
      return ports.secret === null ? `${base}/teacher` : `${base}/teacher#secret=${ports.secret}`;
    },
    pid: child.pid,
    stdout: () => stdout.text,
    stderr: () => stderr.text,
    /**
     * kill -9: the process ends at once and says goodbye to nobody (its host, still up, refuses
     * what arrives at its ports from then on). Resolves with how it exited; `stop()` still
     * removes its data directory.
     */
    async kill() {
      if (!exited) child.kill('SIGKILL');
      return exitPromise;
    },
    async stop() {
      if (!exited) {
        child.kill('SIGINT');
        const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
        await exitPromise;
        clearTimeout(timer);
      }
      process.off('exit', killOnExit);
      await rm(dataDir, { recursive: true, force: true });
    },
  };
}

/** Headless Chromium from the system (`CHROMIUM`, default /usr/bin/chromium). */
export async function launchBrowser({ extraArgs = [] } = {}) {
  const executablePath = process.env.CHROMIUM ?? '/usr/bin/chromium';
  if (!existsSync(executablePath)) {
    throw new Error(`Chromium not found at ${executablePath}: install Debian's chromium or set CHROMIUM`);
  }
  return chromium.launch({
    executablePath,
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--autoplay-policy=no-user-gesture-required',
      ...extraArgs,
    ],
  });
}

/**
 * The base64 SHA-256 of the public key (SPKI) of the certificate a TLS server on 127.0.0.1
 * presents: what Chromium's `--ignore-certificate-errors-spki-list` trusts, the way a school
 * would install its own CA or a trusted certificate.
 */
export async function presentedSpkiHash(port) {
  const socket = await new Promise((resolve, reject) => {
    const s = tls.connect({ host: '127.0.0.1', port, servername: 'localhost', rejectUnauthorized: false }, () => resolve(s));
    s.on('error', reject);
  });
  const certificate = socket.getPeerX509Certificate();
  socket.end();
  const spki = certificate.publicKey.export({ type: 'spki', format: 'der' });
  return createHash('sha256').update(spki).digest('base64');
}

/**
 * A user: their own browser context (own storage, like a separate Chromebook), one page
 * opened at `url`, and the page's console and errors kept for diagnostics.
 */
export async function openUser(browser, url, label) {
  const context = await browser.newContext({ viewport: { width: 1366, height: 768 } });
  return openTab(context, url, label);
}

/** Another tab of a user's browser context (same storage), opened at `url`. */
export async function openTab(context, url, label) {
  const page = await context.newPage();
  page.setDefaultTimeout(30_000);
  const logs = [];
  const stamp = () => new Date().toISOString().slice(11, 23);
  page.on('console', (m) => logs.push(`${stamp()} [${label}] console.${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => logs.push(`${stamp()} [${label}] pageerror: ${e.stack || e.message}`));
  page.on('requestfailed', (r) => logs.push(`${stamp()} [${label}] request failed: ${r.url()} ${r.failure()?.errorText ?? ''}`));
  page.on('response', (r) => {
    if (r.status() >= 400) logs.push(`${stamp()} [${label}] HTTP ${r.status()} ${r.url()}`);
  });
  await page.goto(url);
  return { label, context, page, logs };
}

/**
 * Waits until `fn(arg)` is truthy in the page (polling every 50 ms); on timeout the error
 * says what was awaited and what the page looked like.
 */
export async function waitUntil(user, what, fn, arg, timeout = 30_000) {
  try {
    const handle = await user.page.waitForFunction(fn, arg, { polling: 50, timeout });
    const value = await handle.jsonValue();
    await handle.dispose();
    return value;
  } catch (e) {
    const state = await pageState(user).catch((err) => `(page state unavailable: ${err.message})`);
    throw new Error(`[${user.label}] timed out waiting for ${what}: ${e.message.split('\n')[0]}\npage state: ${state}`);
  }
}

/**
 * Clock truth for the classroom of a page (`window.downbeat.classroom`), from `count`
 * fetches of `/api/time`. The server reads its clock at some local instant x in [b, a]
 * (before the response, after the request), so the estimate's true error lies in
 * [est(b) - t, est(b) - t + (a - b)]. Resource Timing narrows [b, a] further to
 * [requestStart, responseStart] of the same fetch (the request went out after the one, the
 * response's first byte arrived before the other; same clock as performance.now()).
 *
 * Returns the number of samples; the fetch's own narrowest bracket (`fetchWidth` ms wide, the
 * error within [`fetchLo`, `fetchHi`]); the narrowest Resource Timing bracket (`width`, [`lo`,
 * `hi`]); and `truthOffset`, what to add to a `performance.now()` time of this page to get the
 * server's true clock.
 */
export async function measureClock(user, count = 40) {
  const samples = await user.page.evaluate(async (n) => {
    const c = window.downbeat.classroom;
    const out = [];
    for (let i = 0; i < n; i++) {
      performance.clearResourceTimings();
      const url = `/api/time?sample=${i}`;
      const b = performance.now();
      const r = await fetch(url, { cache: 'no-store' });
      const a = performance.now();
      const { server_now_ms: t } = await r.json();
      const entry = performance.getEntriesByType('resource').find((e) => e.name.endsWith(url));
      const rs = entry && entry.requestStart > 0 ? entry.requestStart : null;
      const re = entry && entry.responseStart > 0 ? entry.responseStart : null;
      const lo = rs !== null && rs > b ? rs : b;
      const hi = re !== null && re < a ? re : a;
      out.push({ b, a, t, est: c.serverTimeOf(b), lo, hi, estLo: c.serverTimeOf(lo) });
    }
    return out;
  }, count);
  const best = samples.reduce((x, y) => (y.a - y.b < x.a - x.b ? y : x));
  const fetchLo = best.est - best.t;
  const tight = samples.reduce((x, y) => (y.hi - y.lo < x.hi - x.lo ? y : x));
  const lo = tight.estLo - tight.t;
  return {
    samples: samples.length,
    fetchWidth: best.a - best.b,
    fetchLo,
    fetchHi: fetchLo + (best.a - best.b),
    width: tight.hi - tight.lo,
    lo,
    hi: lo + (tight.hi - tight.lo),
    truthOffset: tight.t - (tight.lo + tight.hi) / 2,
  };
}

/** A one-line summary of a page for failure messages. */
export async function pageState(user) {
  return user.page.evaluate(() => {
    const text = (sel) => document.querySelector(sel)?.textContent?.trim() ?? null;
    const d = window.downbeat;
    const c = d && d.classroom;
    let sync = null;
    try {
      sync = c ? c.sync() : null;
    } catch (e) {
      sync = String(e);
    }
    return JSON.stringify({
      url: location.href,
      status: text('[data-testid=status]'),
      error: text('[data-testid=error]'),
      state: c ? c.state : null,
      memberId: c ? c.memberId : null,
      sync,
      beats: d ? d.trace.beats.length : null,
      notes: d ? d.trace.notes.length : null,
      played: d ? d.trace.played.length : null,
      lastApplied: d ? d.lastApplied ?? null : null,
    });
  });
}

/** Prints the server's log and every page's console when a test fails. */
export function printDiagnostics(server, users) {
  const out = [];
  out.push('==================== diagnostics ====================');
  for (const u of users) {
    out.push(`---- ${u.label} console (${u.logs.length} lines) ----`);
    out.push(...u.logs.slice(-200));
  }
  if (server) {
    out.push('---- server stderr (tail) ----');
    out.push(server.stderr().slice(-20_000));
  }
  out.push('=====================================================');
  console.log(out.join('\n'));
}

/** Runs a test body; on failure prints diagnostics, then fails the test with the error. */
export function withDiagnostics(getServer, getUsers, body) {
  return async (t) => {
    try {
      await body(t);
    } catch (e) {
      printDiagnostics(getServer(), getUsers());
      throw e;
    }
  };
}

/**
 * A UDP relay on 127.0.0.1 between the browser and the server's WebTransport port: one
 * upstream socket per browser address, so replies find their way back. `cut()` drops every
 * packet both ways (Wi-Fi gone), `restore()` lets them through again.
 */
export async function startRelay() {
  const front = dgram.createSocket('udp4');
  const upstreams = new Map(); // "address:port" of the browser -> socket towards the server
  let target = null;
  let cut = false;
  const counts = { forwarded: 0, dropped: 0 };
  front.on('message', (packet, from) => {
    if (cut || target === null) {
      counts.dropped++;
      return;
    }
    const key = `${from.address}:${from.port}`;
    let up = upstreams.get(key);
    if (!up) {
      up = dgram.createSocket('udp4');
      up.on('message', (reply) => {
        if (cut) {
          counts.dropped++;
          return;
        }
        counts.forwarded++;
        front.send(reply, from.port, from.address);
      });
      upstreams.set(key, up);
    }
    counts.forwarded++;
    up.send(packet, target, '127.0.0.1');
  });
  await new Promise((resolve) => front.bind(0, '127.0.0.1', resolve));
  return {
    port: front.address().port,
    counts,
    forwardTo(port) {
      target = port;
    },
    cut() {
      cut = true;
    },
    restore() {
      cut = false;
    },
    close() {
      for (const up of upstreams.values()) up.close();
      front.close();
    },
  };
}

/**
 * A TCP relay on 127.0.0.1 to the server's HTTP port, for a page (and the WebSocket it derives
 * from the page's address) that must lose the network together with the UDP relay. `cut()`
 * stalls every connection, new ones included, the way TCP stalls when the Wi-Fi is gone: bytes
 * and closes wait, nothing is refused; `restore()` delivers what waited and lets bytes flow.
 */
export async function startTcpRelay(targetPort) {
  let cut = false;
  const held = new Set(); // deliveries waiting for restore()
  const sockets = new Set();
  const forward = (src, dst) => {
    const deliver = (chunk) => (chunk === null ? dst.end() : dst.write(chunk));
    src.on('data', (chunk) => (cut ? held.add(() => deliver(chunk)) : deliver(chunk)));
    src.on('end', () => (cut ? held.add(() => deliver(null)) : deliver(null)));
    src.on('close', () => (cut ? held.add(() => dst.destroy()) : dst.destroy()));
    src.on('error', () => {});
  };
  const front = net.createServer((client) => {
    const upstream = net.connect(targetPort, '127.0.0.1');
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on('close', () => sockets.delete(s));
    }
    forward(client, upstream);
    forward(upstream, client);
  });
  await new Promise((resolve) => front.listen(0, '127.0.0.1', resolve));
  const port = front.address().port;
  return {
    port,
    base: `http://127.0.0.1:${port}`,
    cut() {
      cut = true;
    },
    restore() {
      cut = false;
      const waiting = [...held];
      held.clear();
      for (const deliver of waiting) deliver();
    },
    close() {
      for (const s of sockets) s.destroy();
      front.close();
    },
  };
}

/**
 * A UDP socket on 127.0.0.1 that takes every packet and answers none: a WebTransport URL
 * pointed at it behaves like a school filter that silently drops QUIC (no ICMP, no refusal).
 * `packets` counts what arrived and `sources` holds each sender's "address:port" (Chromium
 * opens every QUIC connection from a socket of its own, so a new source is a new attempt;
 * an abandoned attempt keeps retransmitting its handshake for a few seconds).
 */
export async function startBlackHole() {
  const socket = dgram.createSocket('udp4');
  const hole = { port: 0, packets: 0, sources: new Set(), close: () => socket.close() };
  socket.on('message', (_packet, from) => {
    hole.packets++;
    hole.sources.add(`${from.address}:${from.port}`);
  });
  await new Promise((resolve) => socket.bind(0, '127.0.0.1', resolve));
  hole.port = socket.address().port;
  return hole;
}

/** Clicks "Start class" on a teacher page and returns the join code it shows (`K7QF-M3XP`). */
export async function startClass(teacher) {
  await waitUntil(teacher, 'the start-class button to be enabled',
    () => !document.querySelector('[data-testid=start-class]').disabled);
  await teacher.page.getByTestId('start-class').click();
  return waitUntil(teacher, 'the join code', () => {
    const t = document.querySelector('[data-testid=join-code]')?.textContent?.trim() ?? '';
    return /^[2-9A-HJ-NP-Z]{4}-[2-9A-HJ-NP-Z]{4}$/.test(t) ? t : false;
  }, undefined, 60_000);
}

/** Types the join code and name on a student page and clicks Join. */
export async function joinClass(student, code, name) {
  await waitUntil(student, 'the join button to be enabled', () => !document.querySelector('[data-testid=join]').disabled);
  await student.page.getByTestId('code-input').fill(code);
  await student.page.getByTestId('name-input').fill(name);
  await student.page.getByTestId('join').click();
}

/** Clicks Start on a teacher page and returns the server's acknowledgement of the start. */
export async function startBeat(teacher) {
  await teacher.page.getByTestId('start').click();
  return waitUntil(teacher, 'the start acknowledgement', () => {
    const a = window.downbeat.lastApplied;
    return a && a.op === 'start' ? a : false;
  });
}
