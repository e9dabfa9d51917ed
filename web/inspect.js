// The operators' inspector: the server, its schools, their live rooms and sessions (by member
// id and transport figures, never a child's name or words), live counters, the audit log, and
// actions on a room (observe, test note, test prompt, close, end a session). Every action is
// audited by the server before it is done.
//
// Plain ES module. The token comes from `#token=<jwt>` (the demo's banner link) or is pasted,
// and is kept in this tab's sessionStorage only.

import { $, clearError, errorCode, forgetToken, h, setStatus, showError, storeToken, takeToken, tokenClaims } from './common.js';

const PAGE = 'inspect';
/** How often the overview, counters and audit log are read again. */
const REFRESH_MS = 2000;
/** Observed events kept on the page. */
const MAX_EVENTS = 200;
/** Counters shown in the table (when the server has them), with a rate per second. */
const KEY_COUNTERS = [
  'downbeat_sessions_active',
  'downbeat_rooms_active',
  'downbeat_datagrams_sent_total',
  'downbeat_datagrams_received_total',
  'downbeat_datagrams_send_failed_total',
  'downbeat_beat_frames_sent_total',
  'downbeat_note_frames_sent_total',
  'downbeat_controls_applied_total',
  'downbeat_slow_members_dropped_total',
];

const statusEl = $('#status');
const errorEl = $('#error');
let token = null;
let previous = null; // { at, values } of the last metrics read
let observing = null; // { tenant, code, abort }
let timer = null;

/** A request to the inspector API; throws { code, message } on an error answer. */
async function api(method, path, body) {
  const init = { method, headers: { Authorization: `Bearer ${token}` }, cache: 'no-store' };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  if (!res.ok) {
    let error = { code: 'error', message: `HTTP ${res.status}` };
    try {
      error = (await res.json()).error ?? error;
    } catch {}
    throw Object.assign(new Error(error.message), { code: error.code });
  }
  return path.endsWith('/metrics') ? res.text() : res.json();
}

/** Prometheus text as a map of series (name with labels) to value. */
function parseMetrics(text) {
  const values = new Map();
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const cut = line.lastIndexOf(' ');
    const value = Number(line.slice(cut + 1));
    if (Number.isFinite(value)) values.set(line.slice(0, cut), value);
  }
  return values;
}

const num = (x) => h('td', { class: 'num' }, x == null ? '–' : String(x));
const ms = (micros) => (micros == null ? '–' : (micros / 1000).toFixed(micros < 10_000 ? 2 : 1));

function renderNode(node, cluster) {
  const hours = Math.floor(node.uptime_secs / 3600);
  const minutes = Math.floor((node.uptime_secs % 3600) / 60);
  const facts = [
    ['Node', node.id],
    ['Version', node.version],
    ['Up', `${hours} h ${minutes} min`],
    ['Sessions', node.sessions_active],
    ['Rooms', node.rooms_active],
  ];
  if (cluster.length) {
    const clock = (c) => (c ? `, clock ${c.offset_micros >= 0 ? '+' : ''}${c.offset_micros} ± ${c.uncertainty_micros} µs` : '');
    const others = cluster.map((n) =>
      `${n.id}${n.this ? ' (this one)' : ''}: ${n.http_url}, lease ${(n.lease_left_ms / 1000).toFixed(1)} s${clock(n.clock)}`);
    facts.push(['Cluster', others.join(' · ')]);
  }
  $('#node').replaceChildren(...facts.flatMap(([k, v]) => [h('dt', {}, k), h('dd', {}, String(v))]));
}

function renderCounters(text) {
  const at = performance.now();
  const values = parseMetrics(text);
  const rows = KEY_COUNTERS.filter((name) => values.has(name)).map((name) => {
    const value = values.get(name);
    let rate = null;
    if (previous && previous.values.has(name) && name.endsWith('_total')) {
      const seconds = (at - previous.at) / 1000;
      if (seconds > 0) rate = ((value - previous.values.get(name)) / seconds).toFixed(1);
    }
    return h('tr', { dataset: { metric: name } }, h('th', { scope: 'row' }, name.replace(/^downbeat_/, '')), num(value), num(rate));
  });
  previous = { at, values };
  $('#counters').replaceChildren(...rows);
  $('#metrics').textContent = text;
}

function renderTenants(tenants) {
  $('#tenants').replaceChildren(
    ...tenants.map((t) =>
      h('tr', {}, h('td', {}, t.name), h('td', {}, h('code', {}, t.id)), num(t.rooms), num(t.sessions), h('td', {}, `${t.max_rooms} / ${t.max_sessions}`)),
    ),
  );
}

/** Runs an audited action and refreshes; errors show with their code. */
async function act(what, run) {
  clearError(errorEl);
  try {
    const answer = await run();
    setStatus(statusEl, `${what}: done`, 'ok');
    return answer;
  } catch (e) {
    showError(errorEl, e, `${what}: `);
    setStatus(statusEl, `${what}: refused (${errorCode(e)})`, 'error');
    return null;
  } finally {
    refresh();
  }
}

function roomPath(room) {
  return `/api/inspect/rooms/${encodeURIComponent(room.tenant)}/${encodeURIComponent(room.code)}`;
}

function sessionRow(room, seat) {
  const s = seat.session;
  const cells = s
    ? [
        h('td', {}, String(s.id)),
        h('td', {}, s.transport),
        h('td', {}, s.synced ? 'yes' : 'no'),
        num(ms(s.rtt_micros)),
        num(s.path ? ms(s.path.rtt_micros) : null),
        num(ms(s.uncertainty_micros)),
        num(s.datagrams_sent),
        num(s.datagrams_send_failed),
        num(s.datagrams_received),
        num(s.path ? `${s.path.packets_lost} / ${s.path.packets_sent}` : null),
        num(s.notes_played),
        num(s.notes_late),
        h('td', {}, h('button', {
          type: 'button',
          class: 'small',
          testid: 'end-session',
          onclick: () => {
            if (!confirm(`End session ${s.id} (member ${seat.member_id})? The device can join again.`)) return;
            act(`End session ${s.id}`, () => api('DELETE', `${roomPath(room)}/sessions/${s.id}`));
          },
        }, 'End session')),
      ]
    : [h('td', { colspan: 13, class: 'hint' }, 'seat held for a reconnect')];
  return h('tr', { testid: 'session-row', dataset: { memberId: seat.member_id, sessionId: s ? s.id : '' } },
    h('td', {}, String(seat.member_id)),
    h('td', {}, seat.role),
    h('td', {}, seat.part ?? ''),
    h('td', {}, seat.muted ? 'muted' : ''),
    ...cells);
}

function roomCard(room) {
  const state = room.running ? `playing at ${room.tempo_bpm} BPM, ${room.beats_per_bar} a bar` : `stopped (${room.tempo_bpm} BPM)`;
  const extras = [
    room.recording != null ? `recording take ${room.recording}` : null,
    room.playback != null ? `playing take ${room.playback} back` : null,
    room.observers ? `${room.observers} observing` : null,
  ].filter(Boolean);
  const noteInput = h('input', { type: 'number', min: 0, max: 127, value: 72, 'aria-label': 'Test note (MIDI number)', testid: 'test-note-midi' });
  noteInput.style.width = '5rem';
  return h('article', { class: 'room-card', testid: 'room', dataset: { code: room.code, tenant: room.tenant } },
    h('header', {},
      h('h3', {}, h('code', {}, room.code), ` · ${room.name}`),
      h('span', { class: 'badge badge-grey' }, room.tenant),
      h('span', { class: room.running ? 'badge badge-green' : 'badge badge-grey' }, state),
      extras.length ? h('span', { class: 'hint' }, extras.join(' · ')) : null),
    h('div', { class: 'room-actions' },
      h('button', { type: 'button', class: 'small', testid: 'observe', onclick: () => observe(room) }, 'Observe'),
      noteInput,
      h('button', {
        type: 'button',
        class: 'small',
        testid: 'test-note',
        onclick: () => act('Test note', async () => {
          const sent = await api('POST', `${roomPath(room)}/test-note`, { midi: Number(noteInput.value) });
          const inMs = Math.round(sent.sounds_at_unix_ms - Date.now());
          setStatus(statusEl, `Test note sent: it sounds in every tab in about ${inMs} ms`, 'ok');
          return sent;
        }),
      }, 'Send test note'),
      h('button', {
        type: 'button',
        class: 'small',
        testid: 'test-prompt',
        onclick: () => act('Test prompt', () => api('POST', `${roomPath(room)}/test-prompt`, {})),
      }, 'Send test prompt'),
      h('button', {
        type: 'button',
        class: 'small',
        testid: 'close-room',
        onclick: () => {
          if (!confirm(`Close room ${room.code}? Everyone in it is told the class ended.`)) return;
          act(`Close room ${room.code}`, () => api('DELETE', roomPath(room)));
        },
      }, 'Close room')),
    h('table', { class: 'grid-table' },
      h('thead', {}, h('tr', {}, ...['Member', 'Role', 'Part', 'Mute', 'Session', 'Transport', 'Synced', 'RTT (client) ms', 'RTT (QUIC) ms',
        'Uncertainty ms', 'Datagrams sent', 'Send failed', 'Received', 'Packets lost / sent', 'Notes played', 'Notes late', ''].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, ...room.seats.map((seat) => sessionRow(room, seat)))));
}

function renderRooms(rooms) {
  $('#room-count').textContent = `(${rooms.length})`;
  $('#no-rooms').hidden = rooms.length > 0;
  $('#rooms').replaceChildren(...rooms.map(roomCard));
}

function renderAudit(entries) {
  $('#audit').replaceChildren(
    ...entries.map((e) =>
      h('tr', { testid: 'audit-row', dataset: { action: e.action, outcome: e.outcome ?? '' } },
        h('td', {}, new Date(e.at_ms).toLocaleTimeString()),
        h('td', {}, `${e.operator_name} (${e.operator_id})`),
        h('td', {}, e.action),
        h('td', {}, e.tenant_id ?? ''),
        h('td', {}, e.room_code ?? ''),
        h('td', {}, e.target ?? ''),
        h('td', {}, e.outcome ?? 'running'))),
  );
}

async function refresh() {
  clearTimeout(timer);
  try {
    const [overview, metrics, audit] = await Promise.all([
      api('GET', '/api/inspect'),
      api('GET', '/api/inspect/metrics'),
      api('GET', '/api/inspect/audit'),
    ]);
    renderNode(overview.node, overview.cluster ?? []);
    renderTenants(overview.tenants);
    renderRooms(overview.rooms);
    renderCounters(metrics);
    renderAudit(audit.entries);
    if (statusEl.dataset.kind !== 'ok' && statusEl.dataset.kind !== 'error') setStatus(statusEl, 'Live', 'info');
    $('#inspector').dataset.loaded = 'true';
  } catch (e) {
    showError(errorEl, e, 'Reading the server: ');
    if (errorCode(e) === 'unauthorized' || errorCode(e) === 'token_expired' || errorCode(e) === 'forbidden') {
      forgetToken(PAGE);
      showSignIn();
      return;
    }
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

/** One observed event as a line of the log. */
function describe(event) {
  const at = new Date(event.at_unix_ms ?? Date.now()).toLocaleTimeString();
  switch (event.event) {
    case 'observing':
      return `${at} observing: ${event.room.seats.length} seats, ${event.room.running ? 'playing' : 'stopped'}`;
    case 'timeline': {
      const last = event.segments[event.segments.length - 1];
      return `${at} timeline ${event.epoch}: ${last.running ? 'playing' : 'stopped'} at ${last.tempo_bpm} BPM, ${last.beats_per_bar} a bar`;
    }
    case 'notes':
      return `${at} notes from ${event.from === Number.MAX_SAFE_INTEGER ? 'the test' : `member ${event.from}`}: ` +
        event.notes.map((n) => `${n.midi}`).join(', ');
    case 'member_joined':
    case 'member_updated':
      return `${at} ${event.event.replace('_', ' ')}: member ${event.member_id} (${event.role}, ${event.transport}${event.muted ? ', muted' : ''})`;
    case 'member_left':
      return `${at} member left: ${event.member_id} (${event.reason})`;
    case 'recording':
      return `${at} recording: ${event.take == null ? 'stopped' : `take ${event.take}`}`;
    case 'playback':
      return `${at} playback: ${event.take == null ? 'over' : `take ${event.take}`}`;
    case 'prompt':
      return `${at} prompt: ${event.text ?? 'cleared'}`;
    case 'missed':
      return `${at} (${event.count} events left out: this page fell behind)`;
    case 'room_closed':
      return `${at} the room closed`;
    default:
      return `${at} ${event.event}`;
  }
}

function addEvent(event) {
  if (event.event === 'alive') return;
  const log = $('#events');
  log.append(h('li', { dataset: { event: event.event, from: event.from ?? '' } }, describe(event)));
  while (log.children.length > MAX_EVENTS) log.firstElementChild.remove();
  log.scrollTop = log.scrollHeight;
}

/** Streams the room's events (one JSON object a line) into the event log. */
async function observe(room) {
  stopObserving();
  const abort = new AbortController();
  observing = { room, abort };
  $('#observer').hidden = false;
  $('#observing').textContent = `${room.code} (${room.tenant})`;
  $('#events').replaceChildren();
  try {
    const res = await fetch(`${roomPath(room)}/events`, {
      headers: { Authorization: `Bearer ${token}` },
      signal: abort.signal,
      cache: 'no-store',
    });
    if (!res.ok) {
      const error = (await res.json().catch(() => ({}))).error ?? { code: 'error', message: `HTTP ${res.status}` };
      throw Object.assign(new Error(error.message), { code: error.code });
    }
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf('\n')) >= 0) {
        const line = buffer.slice(0, end);
        buffer = buffer.slice(end + 1);
        if (line) addEvent(JSON.parse(line));
      }
    }
    addEvent({ event: 'stream ended' });
  } catch (e) {
    if (e.name !== 'AbortError') showError(errorEl, e, 'Observing: ');
  } finally {
    refresh();
  }
}

function stopObserving() {
  if (observing) observing.abort.abort();
  observing = null;
}

function showSignIn() {
  clearTimeout(timer);
  $('#inspector').hidden = true;
  $('#signin').hidden = false;
  setStatus(statusEl, 'Sign in with an operator token', 'warn');
}

function start(given) {
  token = given;
  const claims = tokenClaims(token);
  $('#signin').hidden = true;
  $('#inspector').hidden = false;
  setStatus(statusEl, `Signed in as ${claims.name ?? 'an operator'}`, 'info');
  refresh();
}

$('#stop-observing').addEventListener('click', () => {
  stopObserving();
  $('#observer').hidden = true;
});
$('#signin-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const pasted = $('#token-paste').value.trim();
  if (!pasted) return;
  storeToken(PAGE, pasted);
  start(pasted);
});

const stored = takeToken(PAGE);
if (stored) start(stored);
else showSignIn();
window.downbeat = { inspector: { refresh, observe: () => observing } };
