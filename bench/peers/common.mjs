// Small helpers shared by the peer servers and the client. Nothing here takes part in the
// timing path except `nowNs`, which is what every timestamp is read from.

import { parseArgs } from 'node:util';

/** The shared clock: CLOCK_MONOTONIC on Linux (libuv's uv_hrtime), the clock Rust's `Instant` reads. */
export const nowNs = () => process.hrtime.bigint();

/** Parses `--host`/`--port` for a peer server. Port 0 lets the OS choose. */
export function serverArgs(argv, name) {
  const { values } = parseArgs({
    args: argv,
    options: {
      host: { type: 'string', default: '127.0.0.1' },
      port: { type: 'string', default: '0' },
      verbose: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
  });
  if (values.help) {
    process.stdout.write(
      `usage: node ${name} [--host 127.0.0.1] [--port 0] [--verbose]\n` +
        'Prints {"port": N} as the first line on stdout once listening. SIGINT/SIGTERM stop it.\n',
    );
    process.exit(0);
  }
  const port = Number(values.port);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new Error(`--port must be an integer in 0..65535, got ${values.port}`);
  }
  return { host: values.host, port, verbose: values.verbose };
}

/** Logs to stderr (stdout belongs to the `{"port": N}` line and is otherwise quiet). */
export function makeLog(name, verbose) {
  return (...parts) => {
    if (verbose) process.stderr.write(`[${name}] ${parts.join(' ')}\n`);
  };
}

/** A tempo a teacher may ask for. Same bounds for both peers. */
export function validBpm(bpm) {
  return typeof bpm === 'number' && Number.isFinite(bpm) && bpm >= 20 && bpm <= 400;
}

/** Prints the chosen port and wires SIGINT/SIGTERM to `close`, exiting 0 once it resolves. */
export function announceAndHandleSignals(httpServer, close, log) {
  const { port } = httpServer.address();
  process.stdout.write(`${JSON.stringify({ port })}\n`);
  let closing = false;
  const stop = (signal) => {
    if (closing) return;
    closing = true;
    log(`${signal}: closing`);
    // Do not hang on a slow peer: leave after 2 s whatever happens.
    setTimeout(() => process.exit(0), 2000).unref();
    Promise.resolve()
      .then(close)
      .then(
        () => process.exit(0),
        (err) => {
          process.stderr.write(`close failed: ${err?.stack ?? err}\n`);
          process.exit(1);
        },
      );
  };
  process.on('SIGINT', () => stop('SIGINT'));
  process.on('SIGTERM', () => stop('SIGTERM'));
}

/**
 * Listens on `host:port`, then prints the port and wires SIGINT/SIGTERM to `close` (see
 * `announceAndHandleSignals`).
 */
export function listen(httpServer, host, port, close, log) {
  httpServer.listen(port, host, () => {
    announceAndHandleSignals(httpServer, close, log);
    log(`listening on ${host}:${httpServer.address().port}`);
  });
}

/**
 * JSON with BigInt values written as plain integer literals (exact, unlike Number past 2^53),
 * so that serde_json reads them as u64/i64.
 */
export function stringifyWithBigInt(value, space) {
  const json = JSON.stringify(
    value,
    (_key, v) => (typeof v === 'bigint' ? `@@bigint:${v.toString()}@@` : v),
    space,
  );
  return json.replace(/"@@bigint:(-?\d+)@@"/g, '$1');
}

/** Percentile by nearest rank over a sorted numeric array (empty → null). */
export function percentile(sorted, p) {
  if (sorted.length === 0) return null;
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(sorted.length - 1, Math.max(0, rank - 1))];
}

/**
 * How far ahead the timesync peer's server sends beats and places changes, in ms: Downbeat's
 * lead (`engine::room::Config::lead_nanos`, 1.5 s).
 */
export const LEAD_MS = 1500;

/**
 * Beat n's instant in ms on the clock of a timesync peer's timeline, or null before it starts
 * or from its end on. A timeline is `{segments: [{from, at, bpm}] sorted by from, end}`: beat
 * n of a segment sounds at `at + (n - from) · 60000 / bpm`, and `end` (or null) is the first
 * beat that does not sound.
 */
export function timeOf(timeline, n) {
  let seg = null;
  for (const s of timeline.segments) if (s.from <= n) seg = s;
  if (!seg || (timeline.end !== null && n >= timeline.end)) return null;
  return seg.at + ((n - seg.from) * 60000) / seg.bpm;
}
