// The network check page (/check): can this device reach the server, on which transport, and
// how well does its clock sync there. It runs one probe per transport side by side (the
// browser package's `probe()`: no sign-in needed), reads the audio output latency the browser
// reports, and says in plain words what a class on this device will use, or what the school's
// IT must allow. `window.downbeat.check` holds the results for tests.

import { $, friendlyError, loadClient, loadConfig } from '/common.js';

/** How long each transport's clock is synced (ms). */
const PROBE_MS = 3000;
/** How long opening a session may take before it counts as blocked (ms). A network that
 * silently drops UDP makes WebTransport hang until then (or until the browser gives up). */
const OPEN_TIMEOUT_MS = 8000;

const DEVICE = /\bCrOS\b/.test(navigator.userAgent) ? 'This Chromebook' : 'This computer';

/** Plain words for why a transport did not work. */
const WHY = {
  connect_failed: 'could not connect (blocked on this network, or the server is down)',
  timeout: 'no answer in time (the network may be dropping it silently)',
  not_synced: 'connected, but no timing replies came back',
  closed: 'the connection dropped during the check',
  too_many_probes: 'too many checks are running right now; try again in a minute',
  server_busy: 'the server is very busy right now; try again in a minute',
  shutting_down: 'the server is restarting; try again in a minute',
  probe_only: 'the check was refused by the server',
  protocol: 'the server answered something this page does not understand (is it up to date?)',
  unsupported_version: 'the server runs another version than this page',
};

const QUALITY = {
  good: 'timing is good',
  fair: 'timing is fair: beats stay together, notes may be a little less tight',
  poor: 'timing may be poor: the clock could not follow the server closely',
};

const state = { done: false, verdict: null, results: {}, audio: null, elapsedMs: null };
window.downbeat = { check: state };

const fmt = (ms) => (ms >= 10 ? `${Math.round(ms)} ms` : `${ms.toFixed(1)} ms`);

function setCell(id, text, kind) {
  const el = document.getElementById(id);
  el.textContent = text;
  el.dataset.kind = kind;
}

function setVerdict(text, kind, detail = '') {
  const el = $('#verdict');
  el.textContent = text;
  el.dataset.kind = kind;
  $('#verdict-detail').textContent = detail;
}

/** One probe's result in words. */
function describe(result) {
  if (!result.reachable) {
    return WHY[result.code] ?? friendlyError({ code: result.code, message: result.message });
  }
  const rtt = result.rttMs ? `round trip ${fmt(result.rttMs.p50)} (95% within ${fmt(result.rttMs.p95)})` : '';
  const sync = result.errorBoundMs != null ? `clock within ${fmt(result.errorBoundMs)}` : '';
  return `Yes: ${[rtt, sync].filter(Boolean).join(', ')}; ${result.quality ?? 'no'} sync.`;
}

/** Fills in the IT table with this server's real host names and ports. */
function fillAllowlist(config) {
  const wt = new URL(config.webtransport_url);
  const secure = location.protocol === 'https:';
  const wsUrl = config.websocket_url ?? `${secure ? 'wss' : 'ws'}://${location.host}/api/ws`;
  const ws = new URL(wsUrl);
  $('#it-ws-url').textContent = wsUrl;
  $('#it-tcp-host').textContent = ws.hostname;
  $('#it-tcp-port').textContent = `TCP ${ws.port || (ws.protocol === 'wss:' ? 443 : 80)} (${ws.protocol === 'wss:' ? 'HTTPS' : 'HTTP'})`;
  $('#it-udp-host').textContent = wt.hostname;
  $('#it-udp-port').textContent = `UDP ${wt.port || 443} (QUIC)`;
  return { wtHost: wt.hostname, udpPort: wt.port || '443', tcpHost: ws.hostname, tcpPort: ws.port || (ws.protocol === 'wss:' ? '443' : '80') };
}

/** The output latency the browser reports (`null` fields where it reports none). */
async function audioLatency() {
  const Ctx = window.AudioContext || window.webkitAudioContext;
  if (!Ctx) return null;
  const ctx = new Ctx({ latencyHint: 'interactive' });
  // outputLatency is only known while the context runs; a browser that needs a click first
  // keeps it suspended.
  await Promise.race([ctx.resume().catch(() => {}), new Promise((r) => setTimeout(r, 1000))]);
  const ms = (s) => (typeof s === 'number' && Number.isFinite(s) ? s * 1000 : null);
  const result = { running: ctx.state === 'running', baseMs: ms(ctx.baseLatency), outputMs: ms(ctx.outputLatency) };
  await ctx.close().catch(() => {});
  return result;
}

function showAudio(audio) {
  if (!audio) {
    setCell('check-audio', 'This browser has no Web Audio.', 'error');
    return;
  }
  const parts = [];
  if (audio.outputMs) parts.push(`output ${fmt(audio.outputMs)}`);
  if (audio.baseMs != null) parts.push(`processing ${fmt(audio.baseMs)}`);
  const text = parts.length ? `${parts.join(', ')}. Downbeat allows for it, so beats still sound together.` :
    'Not reported until sound has played once; Downbeat measures it when the class starts.';
  setCell('check-audio', text, audio.outputMs || audio.baseMs != null ? 'ok' : 'info');
}

function verdict(secure, wtApi, wt, ws, allow) {
  if (wt?.reachable) {
    const kind = wt.quality === 'good' ? 'ok' : 'warn';
    setVerdict(`${DEVICE} will use WebTransport; ${QUALITY[wt.quality] ?? QUALITY.poor}.`, kind,
      ws?.reachable ? 'WebSocket works here too, as a fallback.' : '');
    return 'webtransport';
  }
  if (ws?.reachable) {
    const quality = ws.quality === 'good' ? 'timing is still good' : QUALITY[ws.quality] ?? QUALITY.poor;
    let why = `WebTransport does not get through this network (UDP port ${allow.udpPort} to ${allow.wtHost} looks blocked). ` +
      'Asking IT to allow it gives the tightest timing.';
    if (!secure) why = 'This page is not opened over https, so the browser does not offer WebTransport here.';
    else if (!wtApi) why = 'This browser does not offer WebTransport; Chrome, Edge and Firefox do.';
    setVerdict(`${DEVICE} will use WebSocket; ${quality}.`, ws.quality === 'good' ? 'ok' : 'warn', why);
    return 'websocket';
  }
  setVerdict(`${DEVICE} cannot reach the music server from this network.`, 'error',
    `Ask your school's IT to allow ${allow.tcpHost} on TCP port ${allow.tcpPort} ` +
    `(and, for the best timing, UDP port ${allow.udpPort}): see the table below.`);
  return 'none';
}

async function run() {
  const started = performance.now();
  Object.assign(state, { done: false, verdict: null, results: {}, audio: null, elapsedMs: null });
  $('#again').disabled = true;
  setVerdict('Checking… (about ten seconds)', 'info');
  for (const id of ['check-webtransport', 'check-websocket', 'check-audio']) setCell(id, 'Checking…', 'info');

  const secure = window.isSecureContext;
  setCell('check-secure', secure ? 'Yes.' : `No: open this page over https (WebTransport needs it).`, secure ? 'ok' : 'warn');
  const wtApi = typeof window.WebTransport === 'function';
  setCell('check-webtransport-api', wtApi ? 'Yes.' : 'No: this browser will use WebSocket.', wtApi ? 'ok' : 'warn');

  let config;
  let pkg;
  try {
    [config, pkg] = await Promise.all([loadConfig(), loadClient()]);
  } catch (e) {
    setVerdict(`${DEVICE} cannot load the check from the music server.`, 'error', friendlyError(e));
    state.done = true;
    $('#again').disabled = false;
    return;
  }
  const allow = fillAllowlist(config);
  const common = { durationMs: PROBE_MS, timeoutMs: OPEN_TIMEOUT_MS };
  const hashes = config.certificate_hashes?.length ? { certificateHashes: config.certificate_hashes } : {};
  const show = (id, transport) => (result) => {
    state.results[transport] = result;
    setCell(id, describe(result), result.reachable ? (result.quality === 'good' ? 'ok' : 'warn') : 'error');
    return result;
  };
  const wtProbe = wtApi ?
    pkg.probe({ transport: 'webtransport', url: config.webtransport_url, ...hashes, ...common })
      .then(show('check-webtransport', 'webtransport')) :
    Promise.resolve(null).then(() => setCell('check-webtransport', 'Not offered by this browser.', 'warn'));
  const wsProbe = pkg.probe({
    transport: 'websocket', ...(config.websocket_url ? { webSocketUrl: config.websocket_url } : {}), ...common,
  }).then(show('check-websocket', 'websocket'));
  const [wt, ws, audio] = await Promise.all([wtProbe, wsProbe, audioLatency().catch(() => null)]);
  state.audio = audio;
  showAudio(audio);
  state.verdict = verdict(secure, wtApi, wt, ws, allow);
  state.elapsedMs = performance.now() - started;
  state.done = true;
  $('#again').disabled = false;
}

$('#again').addEventListener('click', run);
run();
