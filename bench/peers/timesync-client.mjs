// The client side of peer 3 (timesync-server.mjs): what a careful web app's page would run,
// for one simulated student. `client.mjs` drives it and records what it schedules.
//
// - An `InjectedClock` stands in for the page's local clock (`performance.now()` or an
//   AudioContext's time): it is the shared monotonic clock with a known offset and drift, as
//   Downbeat's students get (`bench/src/downbeat/class.rs`), so clock sync has work to do and
//   every scheduled instant maps back to the truth.
// - `timesync` (the npm package) syncs that clock to the server's over the Socket.IO
//   connection, set up as the package's own Socket.IO example does.
// - Beats are scheduled like Downbeat's students do (and like Web Audio's "tale of two clocks"
//   scheduler): every 25 ms, each beat of the next 200 ms, at its instant converted to the
//   local clock through timesync's offset.

import { createRequire } from 'node:module';
import { nowNs } from './common.mjs';

/** How far ahead the scheduler places beats, ms (Downbeat's students: `lookahead_ms`). */
export const LOOKAHEAD_MS = 200;
/** How often the scheduler wakes, ms (Downbeat's students: `tick_ms`). */
export const TICK_MS = 25;
/** How long after it is played every receiver sounds a note, ms (Downbeat's playout delay). */
export const PLAYOUT_DELAY_MS = 80;
/** Injected clock offsets are uniform in ±this, ms; drifts in ±MAX_DRIFT_PPM (as Downbeat's). */
const MAX_OFFSET_MS = 500;
const MAX_DRIFT_PPM = 100;

/**
 * timesync's options: its Socket.IO example's (a sync round every 5 s) and the package's
 * defaults otherwise (5 requests a round, 1 s apart, each given 10 s).
 */
export const TIMESYNC_OPTIONS = { interval: 5000, repeat: 5, delay: 1000, timeout: 10000 };

/**
 * timesync 1.0.11's CommonJS build takes `window.Promise` when there is one and otherwise
 * requires the `promise` package, which it does not declare (so it fails in Node). A page has
 * `window.Promise`: give it the same native Promise while the module loads, and nothing else.
 */
function loadTimesync() {
  const require = createRequire(import.meta.url);
  const hadWindow = 'window' in globalThis;
  if (!hadWindow) globalThis.window = { Promise };
  try {
    return require('timesync');
  } finally {
    if (!hadWindow) delete globalThis.window;
  }
}
const timesync = loadTimesync();

/** A small seeded generator (mulberry32), so a run's clocks repeat. */
function random(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * A student's local clock, in ms: the shared clock (ns) from `base` on, run `driftPpm` fast
 * and shifted by `offsetNs`. `trueNsAt` maps a local reading back to the shared clock.
 */
export class InjectedClock {
  constructor(seed, id, base = nowNs()) {
    const rnd = random(seed * 1000003 + id);
    this.base = base;
    this.offsetNs = (rnd() * 2 - 1) * MAX_OFFSET_MS * 1e6;
    this.rate = 1 + ((rnd() * 2 - 1) * MAX_DRIFT_PPM) / 1e6;
  }

  /** The local reading at shared instant `t` (ns, BigInt), in ms. */
  localMsAt(t) {
    return (Number(t - this.base) * this.rate + this.offsetNs) / 1e6;
  }

  /** The local reading now, ms: what the page's clock says. */
  nowMs() {
    return this.localMsAt(nowNs());
  }

  /** The shared instant (ns, BigInt) at which the local clock reads `localMs`. */
  trueNsAt(localMs) {
    return this.base + BigInt(Math.round((localMs * 1e6 - this.offsetNs) / this.rate));
  }
}

/**
 * Starts timesync for one student over its connection `conn` (client.mjs's interface, whose
 * `timesync` events are passed to the returned `receive`). Resolves `firstRound` when the
 * first sync round ends with an offset.
 */
export function startTimesync(conn, clock) {
  const ts = timesync.create({ ...TIMESYNC_OPTIONS, server: conn, now: () => clock.nowMs() });
  ts.on('error', () => {});
  // As the package's Socket.IO example: the request goes out as a `timesync` event and the
  // reply comes back as one (see `receive`); sending resolves once the request is written.
  ts.send = (socket, data) => {
    socket.send('timesync', data);
    return Promise.resolve();
  };
  let synced = false;
  const firstRound = new Promise((resolve) => {
    ts.on('sync', (state) => {
      if (state === 'end' && !synced) {
        synced = true;
        resolve();
      }
    });
  });
  let hasOffset = false;
  ts.on('change', () => {
    hasOffset = true;
  });
  return {
    ts,
    firstRound,
    /** Whether timesync has an offset yet (its first reply applies at once). */
    hasOffset: () => hasOffset,
    receive: (msg) => ts.receive(null, msg),
    /** The server's clock now, as this student estimates it, ms. */
    serverNowMs: () => ts.now(),
    /** The local reading at which server instant `serverMs` falls. */
    localMsOf: (serverMs) => serverMs - ts.offset,
    stop: () => ts.destroy(),
  };
}
