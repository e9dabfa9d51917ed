// The teacher's page: sign in, start a class (or rejoin one by its code), show the join code,
// run the music and see who is in time, mute and assign parts, ask a reflection question and
// watch the SEL feed.

import {
  $, h, MOODS, BeatLights, Metronome, NameBook, Sound,
  bootPage, clearError, flash, formatCode, isValidCode, normalizeCode, openAudio, scheduleNote, setStatus,
  showError, sessionToken, signInAndConnect, syncBadge, watchConnection,
} from '/common.js';

const trace = { beats: [], notes: [], played: [] };
/**
 * Test hooks: the classroom, the audio context (when sound is on), traces, the last ack, the
 * past session last charted.
 */
window.downbeat = { classroom: null, ctx: null, trace, lastApplied: null, applied: [], pastSession: null };

const MIN_BPM = 40;
const MAX_BPM = 240;
const METERS = [2, 3, 4, 5, 6, 7];
/** How long a student's card stays lit when their note sounds. */
const FLASH_MS = 250;
/**
 * Where this tab remembers the class it is teaching (its join code): a reload of the page
 * offers it back, filled in under "Rejoin a class". Per tab, like the sign-in token.
 */
const CLASS_KEY = 'downbeat.teacher.class';
/** What the server answers a rejoin's check with when the class is not this teacher's to rejoin. */
const REJOIN_REFUSALS = new Set([
  'room_not_found', 'room_closed', 'wrong_tenant', 'forbidden', 'unauthorized', 'token_expired', 'rate_limited',
]);

const statusEl = $('#status');
const errorEl = $('#error');

let classroom = null;
let sound = null;
let metronome = null;
let pending = null; // the last control not yet in effect: { what, beat, at }
const names = new NameBook();
const cards = new Map(); // member id -> { el, parts }
const participation = new Map(); // member id -> latest row
const reflectionIds = new Set();

function fillMeterSelect(select, value) {
  select.replaceChildren(...METERS.map((n) => h('option', { value: n, selected: n === value }, String(n))));
}

function main() {
  fillMeterSelect($('#setup-meter'), 4);
  bootPage({
    role: 'teacher',
    rows: {
      known: '#signin-known',
      demo: '#signin-demo',
      paste: '#signin-paste',
      knownName: (claims) => claims.name || claims.sub || 'teacher',
      demoName: () => $('#teacher-name').value.trim() || 'Ms. Rivera',
    },
    statusEl,
    errorEl,
    section: '#setup',
    form: '#setup-form',
    submit: ['#start-class', '#rejoin'],
    loading: 'Loading the class app…',
    ready: 'Ready',
    before: setUpRejoin,
    onSubmit: startClass,
  });
}

async function startClass(signIn) {
  clearError(errorEl);
  const tempoBpm = clampBpm(Number($('#setup-tempo').value));
  const beatsPerBar = Number($('#setup-meter').value) || 4;
  const name = $('#room-name').value.trim() || 'Music time';
  const room = { create: { name, tempoBpm, beatsPerBar } };
  const started = await connectFromSetup(signIn, room, $('#start-class'), 'Starting the class…');
  if (started) enterClass(started, tempoBpm, beatsPerBar);
}

// ---------------------------------------------------------------- rejoining

/**
 * The "Rejoin a class" form: its code is the one in the address (`/teacher?code=K7QF-M3XP`),
 * else the class this tab was teaching before it was reloaded (said above the field).
 */
function setUpRejoin(signIn) {
  const fromQuery = normalizeCode(new URLSearchParams(location.search).get('code'));
  const remembered = sessionStorage.getItem(CLASS_KEY);
  const code = fromQuery || remembered;
  if (code) $('#rejoin-code').value = formatCode(code);
  if (remembered && remembered === code) {
    const hint = $('#rejoin-hint');
    hint.replaceChildren(
      'This tab was teaching class ', h('strong', {}, formatCode(remembered)),
      '. Its code is filled in: press “Rejoin class” to go back in.',
    );
    hint.hidden = false;
    // Once the panel shows (right after this), Enter rejoins.
    queueMicrotask(() => $('#rejoin-code').focus());
  }
  $('#rejoin-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    rejoinClass(signIn);
  });
  // Someone else signing in here is not offered this teacher's class.
  $('#signout').addEventListener('click', () => {
    const kept = sessionStorage.getItem(CLASS_KEY);
    forgetClass(kept);
    if (kept && normalizeCode($('#rejoin-code').value) === kept) $('#rejoin-code').value = '';
  });
}

async function rejoinClass(signIn) {
  clearError(errorEl);
  const input = $('#rejoin-code');
  const code = normalizeCode(input.value);
  if (!isValidCode(code)) {
    showError(errorEl, { code: 'bad_code', message: 'A class code has 8 letters and numbers, like K7QF-M3XP.' });
    input.focus();
    return;
  }
  const rejoined = await connectFromSetup(signIn, { code }, $('#rejoin'), 'Rejoining the class…',
    (token) => checkRunsClass(token, code, !!signIn.config.demo));
  if (!rejoined) return;
  const tl = rejoined.timeline();
  enterClass(rejoined, clampBpm(tl?.tempoBpm ?? 120), tl?.beatsPerBar ?? 4);
}

/**
 * Before a rejoin: whether this teacher runs the class `code` (started it, or was made its
 * co-teacher). The server seats any teacher of the school who has a class's code, but only
 * these may run it, and only these may read its check-in data (`/api/rooms/{code}/sel`), which
 * answers `room_not_found` or `room_closed` for a code that names no class. Failures that say
 * nothing about the class (the network, a busy database) are left to the connect to meet.
 * On a `demo` server every tab signs in as a new teacher, which the refusal says.
 */
async function checkRunsClass(token, code, demo) {
  let res;
  try {
    res = await fetch(`/api/rooms/${code}/sel`, { headers: { Authorization: `Bearer ${token}` }, cache: 'no-store' });
  } catch {
    return;
  }
  if (res.ok) return;
  const e = (await res.json().catch(() => ({}))).error || {};
  if (!REJOIN_REFUSALS.has(e.code)) return;
  // A class that is gone is not offered again.
  if (e.code === 'room_not_found' || e.code === 'room_closed') forgetClass(code);
  const err = Object.assign(new Error(e.message || `HTTP ${res.status}`), { code: e.code });
  if (e.code === 'forbidden') {
    err.friendly = "You aren't the teacher of that class: only the teacher who started it, or a co-teacher they added, can rejoin it.";
    if (demo) err.friendly += ' On this demo server each new tab signs in as a new teacher: rejoin from the tab that started the class.';
  }
  throw err;
}

/** Connects from the setup panel, its other button disabled meanwhile; null on failure (shown). */
async function connectFromSetup(signIn, room, button, connecting, check) {
  const others = [$('#start-class'), $('#rejoin')].filter((b) => b !== button);
  for (const b of others) b.disabled = true;
  const joined = await signInAndConnect(signIn, room, { button, statusEl, errorEl, connecting, check });
  if (!joined) for (const b of others) b.disabled = false;
  return joined;
}

/** Shows the class the page is now in (started or rejoined), and remembers it for a reload. */
function enterClass(joined, tempoBpm, beatsPerBar) {
  classroom = joined;
  window.downbeat.classroom = classroom;
  sessionStorage.setItem(CLASS_KEY, classroom.code);
  classroom.on('closed', (d) => {
    if ((d && (d.code || d.reason)) === 'room_closed') forgetClass(classroom.code);
  });
  $('#setup').hidden = true;
  $('#class').hidden = false;
  showClass(tempoBpm, beatsPerBar);
}

/** Forgets the class this tab remembers, if it is `code` (and stops offering it). */
function forgetClass(code) {
  if (!code || sessionStorage.getItem(CLASS_KEY) !== normalizeCode(code)) return;
  sessionStorage.removeItem(CLASS_KEY);
  $('#rejoin-hint').hidden = true;
}

function clampBpm(n) {
  if (!Number.isFinite(n)) return 120;
  return Math.min(MAX_BPM, Math.max(MIN_BPM, Math.round(n)));
}

function showClass(tempoBpm, beatsPerBar) {
  $('#join-code').textContent = formatCode(classroom.code);
  $('#join-code').setAttribute('aria-label', `Join code ${formatCode(classroom.code).split('').join(' ')}`);
  $('#join-url').textContent = `${location.host}/student`;
  $('#room-title').textContent = classroom.roomName || '';
  document.title = `${formatCode(classroom.code)} · Downbeat`;
  $('#code-size').addEventListener('click', (ev) => {
    const small = document.body.classList.toggle('code-small');
    ev.currentTarget.setAttribute('aria-pressed', String(small));
    ev.currentTarget.textContent = small ? 'Make code bigger' : 'Make code smaller';
  });

  watchConnection(classroom, statusEl, {
    onClosed: () => {
      metronome?.stop();
      for (const b of document.querySelectorAll('#class button')) b.disabled = true;
    },
  });
  classroom.on('error', (e) => showError(errorEl, e));

  // Tempo: number and slider move together; Set tempo applies.
  const tempoInput = $('#tempo-input');
  const slider = $('#tempo-slider');
  tempoInput.value = String(tempoBpm);
  slider.value = String(tempoBpm);
  slider.addEventListener('input', () => (tempoInput.value = slider.value));
  tempoInput.addEventListener('input', () => {
    const n = Number(tempoInput.value);
    if (Number.isFinite(n)) slider.value = String(clampBpm(n));
  });
  tempoInput.addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter') applyTempo();
  });
  $('#tempo-apply').addEventListener('click', applyTempo);

  fillMeterSelect($('#meter-input'), beatsPerBar);
  $('#meter-apply').addEventListener('click', () =>
    control('meter', $('#meter-apply'), () => classroom.setMeter(Number($('#meter-input').value)),
      Number($('#meter-input').value)));
  $('#start').addEventListener('click', () => control('start', $('#start'), () => classroom.start(1)));
  $('#stop').addEventListener('click', () => control('stop', $('#stop'), () => classroom.stop()));
  $('#sound-toggle').addEventListener('click', toggleSound);

  // Presence.
  const rerender = () => renderMembers(classroom.members());
  for (const type of ['members', 'member-joined', 'member-left', 'member-updated']) classroom.on(type, rerender);
  rerender();

  // Notes from students: traced (and heard when sound is on), their card flashes.
  classroom.on('note', (n) => {
    scheduleNote(classroom, sound, trace, n);
    const card = cards.get(n.from);
    // Where the note landed on the shared timeline, as the server counts it.
    const placed = card ? classroom.beatOffset(n.serverTime) : null;
    if (placed) card.parts.strip.add(placed);
    if (card) {
      const delay = Math.max(0, n.localTime - performance.now());
      setTimeout(() => flash(card.el, 'played', FLASH_MS), delay);
    }
  });

  // SEL.
  $('#prompt-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    sendPrompt($('#prompt-input').value.trim());
  });
  $('#prompt-clear').addEventListener('click', () => sendPrompt(''));
  classroom.on('prompt', showPrompt);
  showPrompt(classroom.prompt());
  classroom.on('reflection', addReflection);
  classroom.on('participation', updateParticipation);

  // Recordings.
  $('#record').addEventListener('click', () => recordingControl(() => classroom.startRecording()));
  $('#record-stop').addEventListener('click', () => recordingControl(() => classroom.stopRecording()));
  classroom.on('recording', showRecording);
  showRecording(classroom.recording());
  $('#playback-stop').addEventListener('click', () => recordingControl(() => classroom.stopPlayback()));
  classroom.on('playback', showPlayback);
  showPlayback(classroom.playback());
  listRecordings();

  // Past sessions and their charts.
  $('#past-load').addEventListener('click', listPastSessions);

  // Beat lights and the timeline line.
  new BeatLights(classroom, $('#beat-lights')).start();
  refresh();
  setInterval(refresh, 250);
  setStatus(statusEl, 'Connected · class is open', 'ok');
}

function applyTempo() {
  const input = $('#tempo-input');
  const bpm = Number(input.value);
  if (!Number.isInteger(bpm) || bpm < MIN_BPM || bpm > MAX_BPM) {
    showError(errorEl, { code: 'tempo_out_of_range' });
    input.focus();
    return;
  }
  control('tempo', $('#tempo-apply'), () => classroom.setTempo(bpm), bpm);
}

/** Runs a timeline control, shows its outcome, records the ack for tests. */
async function control(op, button, run, value) {
  clearError(errorEl);
  button.disabled = true;
  try {
    const ack = await run();
    const applied = {
      op,
      value: value ?? null,
      epoch: ack.epoch,
      effectiveAt: ack.effectiveAt,
      effectiveBeat: ack.effectiveBeat,
    };
    window.downbeat.lastApplied = applied;
    window.downbeat.applied.push(applied);
    const what = { tempo: `Tempo ${value}`, meter: `${value} beats in a bar`, start: 'Start', stop: 'Stop' }[op];
    pending = { what, beat: ack.effectiveBeat, at: ack.effectiveAt };
    refresh();
  } catch (e) {
    showError(errorEl, e);
  } finally {
    button.disabled = false;
  }
}

function refresh() {
  if (!classroom) return;
  const tl = classroom.timeline();
  const info = $('#timeline-info');
  let text = 'Waiting for the class clock…';
  if (tl) {
    text = tl.running
      ? `▶ Playing · ${Math.round(tl.tempoBpm * 100) / 100} beats per minute · ${tl.beatsPerBar} in a bar`
      : `■ Stopped · ${Math.round(tl.tempoBpm * 100) / 100} beats per minute · ${tl.beatsPerBar} in a bar`;
    document.body.classList.toggle('running', !!tl.running);
    for (const card of cards.values()) refreshAssignBeats(card, tl.beatsPerBar);
  }
  const now = classroom.serverNow();
  if (pending && now !== undefined && now < pending.at) {
    text += ` — next: ${pending.what} on beat ${pending.beat} (in ${Math.ceil((pending.at - now) / 1000)} s)`;
  } else {
    pending = null;
  }
  if (info.textContent !== text) info.textContent = text;
}

async function toggleSound(ev) {
  const button = ev.currentTarget;
  if (!sound) {
    const ctx = openAudio();
    window.downbeat.ctx = ctx;
    sound = new Sound(ctx);
    metronome = new Metronome(classroom, sound, trace);
    metronome.start();
    button.setAttribute('aria-pressed', 'true');
    button.textContent = '🔊 Sound on';
    return;
  }
  const on = button.getAttribute('aria-pressed') !== 'true';
  button.setAttribute('aria-pressed', String(on));
  button.textContent = on ? '🔊 Sound on' : '🔈 Hear the class';
  if (on) await sound.ctx.resume();
  else await sound.ctx.suspend();
}

// ---------------------------------------------------------------- presence

function renderMembers(members) {
  names.update(members);
  const students = members.filter((m) => m.role === 'student');
  const self = members.find((m) => m.id === classroom.memberId);
  $('#teacher-self').textContent = self ? self.name : '';
  const others = members.filter((m) => m.role === 'teacher' && m.id !== classroom.memberId);
  if (others.length) $('#teacher-self').textContent += ` (with ${others.map((m) => m.name).join(', ')})`;
  $('#student-count').textContent = `(${students.length})`;
  $('#no-students').hidden = students.length > 0;

  const seen = new Set();
  const grid = $('#members');
  students
    .slice()
    .sort((a, b) => a.name.localeCompare(b.name) || a.id - b.id)
    .forEach((m, i) => {
      seen.add(m.id);
      let card = cards.get(m.id);
      if (!card) {
        card = makeCard(m);
        cards.set(m.id, card);
      }
      updateCard(card, m);
      if (grid.children[i] !== card.el) grid.insertBefore(card.el, grid.children[i] ?? null);
    });
  for (const [id, card] of cards) {
    if (!seen.has(id)) {
      card.el.remove();
      cards.delete(id);
    }
  }
}

function makeCard(m) {
  const parts = {};
  parts.name = h('h3', { class: 'member-name' });
  parts.badge = h('span', { class: 'badge', 'data-testid': 'sync-badge' });
  parts.state = h('p', { class: 'member-state', 'data-testid': 'member-state' });
  parts.part = h('p', { class: 'member-part', 'data-testid': 'member-part' });
  parts.stats = h('p', { class: 'member-stats', 'data-testid': 'member-stats' });
  parts.strip = timingStrip();
  parts.mute = h('button', { type: 'button', class: 'mute-toggle', 'data-testid': 'mute-toggle', 'aria-pressed': 'false' });
  parts.partInput = h('input', { type: 'text', maxlength: 32, 'data-testid': 'part-input', placeholder: 'drums' });
  parts.beatsBox = h('div', { class: 'assign-beats' });
  parts.assign = h('button', { type: 'button', 'data-testid': 'assign-apply' }, 'Assign');
  parts.unassign = h('button', { type: 'button', class: 'secondary', 'data-testid': 'assign-clear' }, 'Clear');
  parts.meter = 0;
  const partId = `part-${m.id}`;
  parts.partInput.id = partId;
  const el = h(
    'article',
    { class: 'member-card', 'data-testid': 'member-card', 'data-member-id': m.id },
    h('header', {}, parts.name, parts.badge),
    parts.state,
    parts.part,
    parts.stats,
    parts.strip.el,
    h('div', { class: 'card-actions' }, parts.mute),
    h(
      'details',
      { class: 'assign' },
      h('summary', {}, 'Assign part'),
      h('label', { for: partId }, 'Part name'),
      parts.partInput,
      h('fieldset', {}, h('legend', {}, 'Plays on beats'), parts.beatsBox),
      h('div', { class: 'row' }, parts.assign, parts.unassign),
    ),
  );
  const card = { el, parts, member: m };
  parts.mute.addEventListener('click', () => toggleMute(card));
  parts.assign.addEventListener('click', () => assign(card, false));
  parts.unassign.addEventListener('click', () => assign(card, true));
  refreshAssignBeats(card, classroom.timeline()?.beatsPerBar ?? 4);
  return card;
}

function refreshAssignBeats(card, meter) {
  const p = card.parts;
  if (p.meter === meter) return;
  const checked = new Set(
    [...p.beatsBox.querySelectorAll('input:checked')].map((i) => Number(i.value)),
  );
  if (p.meter === 0) for (const b of card.member.beats || []) checked.add(b);
  p.meter = meter;
  const boxes = [];
  for (let i = 0; i < meter; i++) {
    const id = `beat-${card.member.id}-${i}`;
    boxes.push(
      h('span', { class: 'beat-check' },
        h('input', { type: 'checkbox', id, value: i, checked: checked.has(i), 'data-testid': `assign-beat-${i}` }),
        h('label', { for: id }, String(i + 1))),
    );
  }
  p.beatsBox.replaceChildren(...boxes);
}

function updateCard(card, m) {
  const p = card.parts;
  card.member = m;
  card.el.setAttribute('aria-label', m.name);
  p.name.textContent = m.name;
  const badge = syncBadge(m.sync);
  p.badge.className = `badge ${badge.cls}`;
  p.badge.textContent = badge.label;
  // WebSocket: this child's network blocks WebTransport (QUIC); timing still holds, a little
  // less tightly.
  const via = m.transport === 'websocket' ? ' over WebSocket' : '';
  p.badge.title = m.sync && m.sync.synced && typeof m.sync.uncertaintyMs === 'number'
    ? `± ${m.sync.uncertaintyMs.toFixed(2)} ms, round trip ${m.sync.rttMs?.toFixed?.(1) ?? '?'} ms${via}`
    : `not in time yet${via}`;
  p.badge.dataset.transport = m.transport || 'webtransport';
  card.el.classList.toggle('muted', !!m.muted);
  p.state.textContent = m.muted ? '🔇 Muted' : '🎵 Can play';
  p.mute.textContent = m.muted ? 'Unmute' : 'Mute';
  p.mute.setAttribute('aria-pressed', String(!!m.muted));
  p.mute.setAttribute('aria-label', `${m.muted ? 'Unmute' : 'Mute'} ${m.name}`);
  p.part.textContent = m.part
    ? `Part: ${m.part}${m.beats && m.beats.length ? ` · beats ${m.beats.map((b) => b + 1).join(', ')}` : ''}`
    : 'No part yet';
  const row = participation.get(m.id);
  p.stats.textContent = row ? statsText(row) : '';
}

async function toggleMute(card) {
  clearError(errorEl);
  const button = card.parts.mute;
  button.disabled = true;
  try {
    await classroom.mute(card.member.id, !card.member.muted);
  } catch (e) {
    showError(errorEl, e, `${card.member.name}: `);
  } finally {
    button.disabled = false;
  }
}

async function assign(card, clear) {
  clearError(errorEl);
  const p = card.parts;
  const part = clear ? null : p.partInput.value.trim() || null;
  const beats = clear ? [] : [...p.beatsBox.querySelectorAll('input:checked')].map((i) => Number(i.value));
  if (!clear && !part) {
    showError(errorEl, { code: 'bad_request', message: 'Type a part name first.' }, `${card.member.name}: `);
    p.partInput.focus();
    return;
  }
  p.assign.disabled = true;
  try {
    await classroom.assign(card.member.id, part, beats);
    if (clear) {
      p.partInput.value = '';
      for (const i of p.beatsBox.querySelectorAll('input')) i.checked = false;
    }
  } catch (e) {
    showError(errorEl, e, `${card.member.name}: `);
  } finally {
    p.assign.disabled = false;
  }
}

// ---------------------------------------------------------------- Recordings

async function recordingControl(op) {
  clearError(errorEl);
  try {
    await op();
  } catch (e) {
    showError(errorEl, e);
  }
}

function showRecording(r) {
  $('#record').disabled = Boolean(r);
  $('#record-stop').disabled = !r;
  $('#recording-state').textContent = r ? `● Recording take ${r.take}: everyone sees it.` : 'Not recording.';
  $('#recording-state').classList.toggle('on', Boolean(r));
  if (!r) listRecordings();
}

function showPlayback(p) {
  $('#playback-state').hidden = !p;
  if (p) {
    $('#playback-text').textContent = p.stopsAt == null
      ? `▶ Playing take ${p.take} back to the class`
      : `▶ Take ${p.take} stops at the next bar`;
  }
  $('#playback-stop').disabled = !p || p.stopsAt != null;
}

/** The API with the page's token; the JSON answer, or throws its error. */
async function api(path) {
  const res = await fetch(path, { headers: { Authorization: `Bearer ${sessionToken()}` } });
  if (!res.ok) {
    const body = await res.json().catch(() => ({}));
    throw body.error || { code: 'internal' };
  }
  return res;
}

async function listRecordings() {
  if (!classroom) return;
  let list;
  try {
    list = await (await api(`/api/rooms/${classroom.code}/recordings`)).json();
  } catch (e) {
    showError(errorEl, e);
    return;
  }
  $('#no-recordings').hidden = list.recordings.length > 0;
  $('#recordings').replaceChildren(...list.recordings.map((t) => {
    const what = `Take ${t.take} · ${t.notes} notes${t.length_ms == null ? '' : ` · ${takeLength(t.length_ms)}`}`;
    const play = h('button', { type: 'button', 'data-testid': 'recording-play' }, '▶ Play');
    play.addEventListener('click', () => recordingControl(() => classroom.playRecording(t.take)));
    const download = h('button', { type: 'button', class: 'secondary', 'data-testid': 'recording-download' }, 'Download MIDI');
    download.addEventListener('click', () => downloadTake(t));
    return h('li', { class: 'recording-item', 'data-testid': 'recording-item', 'data-take': t.take },
      h('span', {}, what), h('span', { class: 'row' }, play, download));
  }));
}

/** A take's length: whole seconds, with a tenth under 10 s, and never "0 s". */
function takeLength(ms) {
  if (ms < 1000) return 'under 1 s';
  if (ms < 9_950) return `${(ms / 1000).toFixed(1)} s`;
  return `${Math.round(ms / 1000)} s`;
}

/** Fetches a take's MIDI file with the token and saves it from the page (no name leaves it). */
async function downloadTake(take) {
  clearError(errorEl);
  try {
    const blob = await (await api(take.midi)).blob();
    const url = URL.createObjectURL(blob);
    const a = h('a', { href: url, download: `${formatCode(classroom.code)}-take-${take.take}.mid` });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
  } catch (e) {
    showError(errorEl, e);
  }
}

// ---------------------------------------------------------------- SEL

async function sendPrompt(text) {
  clearError(errorEl);
  if (new TextEncoder().encode(text).length > 200) {
    showError(errorEl, { code: 'bad_request', message: 'That question is too long (200 letters at most).' });
    return;
  }
  try {
    await classroom.setPrompt(text);
    if (!text) $('#prompt-input').value = '';
  } catch (e) {
    showError(errorEl, e);
  }
}

function showPrompt(p) {
  $('#prompt-current').textContent = p && p.text ? `Asked: “${p.text}”` : 'No question asked yet.';
}

function addReflection(r) {
  if (reflectionIds.has(r.id)) return; // a retried reflection is announced again
  reflectionIds.add(r.id);
  $('#no-reflections').hidden = true;
  const mood = typeof r.mood === 'number' ? MOODS[r.mood] : null;
  const name = names.name(r.memberId);
  const item = h(
    'li',
    { class: 'reflection-item', 'data-testid': 'reflection-item', 'data-member-id': r.memberId },
    mood ? h('span', { class: 'mood', role: 'img', 'aria-label': mood.label }, mood.emoji) : h('span', { class: 'mood', 'aria-hidden': 'true' }, '💬'),
    h('span', { class: 'reflection-body' },
      h('strong', { class: 'reflection-name' }, name),
      r.text ? h('span', { class: 'reflection-text' }, r.text) : h('span', { class: 'hint' }, mood ? mood.label : '')),
    h('time', { class: 'reflection-time' }, new Date().toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })),
  );
  $('#reflections').prepend(item);
}

function statsText(row) {
  const pct = row.timed > 0 ? `${Math.round((100 * row.onBeat) / row.timed)}% on beat` : 'no beats yet';
  const score = row.score === null || row.score === undefined ? '' : ` · score ${row.score}`;
  return `${row.notes} ${row.notes === 1 ? 'note' : 'notes'} · ${pct}${score}`;
}

// ---------------------------------------------------------------- Timing pictures

const SVG = 'http://www.w3.org/2000/svg';
/** Notes a card's strip shows, newest last. */
const STRIP_NOTES = 16;
/** Offsets shown on a strip: ±150 ms (further ones sit on the edge). */
const STRIP_RANGE_MS = 150;
/** On the beat: within 60 ms (as the server counts). */
const ON_BEAT_MS = 60;

function svg(tag, attrs = {}) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  return el;
}

/**
 * A student's recent notes against the beat: one dot per note, left to right, above the line
 * when early and below when late; the band is "on the beat".
 */
function timingStrip() {
  const width = 8 + STRIP_NOTES * 10;
  const height = 40;
  const mid = height / 2;
  const scale = (mid - 4) / STRIP_RANGE_MS;
  const el = svg('svg', {
    class: 'timing-strip', 'data-testid': 'timing-strip', viewBox: `0 0 ${width} ${height}`,
    width, height, role: 'img', 'aria-label': 'No notes yet',
  });
  el.append(
    svg('rect', { class: 'on-beat-band', x: 0, y: mid - ON_BEAT_MS * scale, width, height: 2 * ON_BEAT_MS * scale }),
    svg('line', { class: 'beat-line', x1: 0, x2: width, y1: mid, y2: mid }),
  );
  const dots = svg('g', {});
  el.append(dots);
  const offsets = [];
  return {
    el,
    add({ offsetMs, onBeat }) {
      offsets.push({ offsetMs, onBeat });
      if (offsets.length > STRIP_NOTES) offsets.shift();
      dots.replaceChildren(...offsets.map((o, i) => {
        const y = mid + Math.max(-STRIP_RANGE_MS, Math.min(STRIP_RANGE_MS, o.offsetMs)) * scale;
        return svg('circle', { cx: 8 + i * 10, cy: y, r: 3.5, class: o.onBeat ? 'dot on' : 'dot off' });
      }));
      const on = offsets.filter((o) => o.onBeat).length;
      const mean = offsets.reduce((s, o) => s + o.offsetMs, 0) / offsets.length;
      const lean = Math.abs(mean) < 10 ? 'right with the beat' : mean < 0 ? `${Math.round(-mean)} ms early` : `${Math.round(mean)} ms late`;
      el.setAttribute('aria-label', `Last ${offsets.length} notes: ${on} on the beat, on average ${lean}`);
    },
  };
}

/** The class's on-beat share this session, from the server's counts (the SEL feed). */
function showClassShare() {
  let timed = 0;
  let onBeat = 0;
  for (const row of participation.values()) {
    timed += row.timed;
    onBeat += row.onBeat;
  }
  if (timed === 0) return;
  const share = Math.round((100 * onBeat) / timed);
  $('#class-share-text').textContent = `Class on the beat: ${share}% of ${timed} timed notes`;
  $('#class-share-bar').style.width = `${share}%`;
}

function updateParticipation(rows) {
  for (const row of rows || []) participation.set(row.memberId, row);
  showClassShare();
  const body = $('#participation');
  const sorted = [...participation.values()].sort((a, b) => names.name(a.memberId).localeCompare(names.name(b.memberId)));
  body.replaceChildren(
    ...sorted.map((row) =>
      h('tr', { 'data-testid': 'participation-row', 'data-member-id': row.memberId },
        h('th', { scope: 'row' }, names.name(row.memberId)),
        h('td', {}, String(row.notes)),
        h('td', {}, row.timed > 0 ? `${Math.round((100 * row.onBeat) / row.timed)}%` : '–'),
        h('td', {}, row.score === null || row.score === undefined ? '–' : String(row.score)))),
  );
  for (const row of rows || []) {
    const card = cards.get(row.memberId);
    if (card) card.parts.stats.textContent = statsText(row);
  }
}

// ---------------------------------------------------------------- Past sessions

/** The class chart's size and margins (axis labels sit in the margins). */
const CHART = { width: 640, height: 230, left: 46, right: 14, top: 14, bottom: 42 };
/** A child's early/late scale: ±100 ms (further sits on the edge). */
const LEAN_RANGE_MS = 100;
/** Closer to the beat than this on average counts as "right with the beat" (as on the strips). */
const LEAN_EVEN_MS = 10;

/** `ms` from a session's start as m:ss. */
function clock(ms) {
  const s = Math.round(ms / 1000);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, '0')}`;
}

/** A length in words: "25 min", "40 s". */
function duration(ms) {
  return ms >= 60_000 ? `${Math.round(ms / 60_000)} min` : `${Math.max(1, Math.round(ms / 1000))} s`;
}

function percent(ratio) {
  return `${Math.round(100 * ratio)}%`;
}

/** Which way a child leans on average, in words. */
function leanText(ms) {
  if (ms === null || ms === undefined) return 'no timed notes';
  if (Math.abs(ms) < LEAN_EVEN_MS) return 'right with the beat on average';
  return ms < 0 ? `${Math.round(-ms)} ms early on average` : `${Math.round(ms)} ms late on average`;
}

function isThisClass(s) {
  return s.ended_at_ms == null && classroom && formatCode(s.room_code) === formatCode(classroom.code);
}

function sessionLabel(s) {
  const when = new Date(s.started_at_ms).toLocaleString([], {
    weekday: 'short', day: 'numeric', month: 'short', hour: '2-digit', minute: '2-digit',
  });
  const length = s.ended_at_ms == null
    ? (isThisClass(s) ? 'this class, still open' : 'still open')
    : duration(s.ended_at_ms - s.started_at_ms);
  const children = `${s.students} ${s.students === 1 ? 'child' : 'children'}`;
  return `${s.room_name || formatCode(s.room_code)} · ${when} · ${length} · ${children} · ${s.notes} ${s.notes === 1 ? 'note' : 'notes'}`;
}

/** Lists the sessions this teacher ran (newest first), each a button that charts it. */
async function listPastSessions() {
  clearError(errorEl);
  let list;
  try {
    list = await (await api('/api/sessions')).json();
  } catch (e) {
    showError(errorEl, e);
    return;
  }
  $('#past-load').textContent = 'Refresh the list';
  $('#no-past').hidden = list.sessions.length > 0;
  $('#past-sessions').replaceChildren(...list.sessions.map((s) => {
    const button = h('button', {
      type: 'button', class: 'past-choice secondary', 'data-testid': 'past-session', 'data-session-id': s.id,
      'aria-pressed': 'false',
    }, sessionLabel(s));
    button.addEventListener('click', () => showPastSession(s, button));
    return h('li', { class: 'past-item' }, button);
  }));
}

/** Charts one session: the class's on-beat share over time and each child's. */
async function showPastSession(s, button) {
  clearError(errorEl);
  let data;
  try {
    data = await (await api(`/api/sessions/${encodeURIComponent(s.id)}/sel`)).json();
  } catch (e) {
    showError(errorEl, e);
    return;
  }
  window.downbeat.pastSession = data;
  for (const b of document.querySelectorAll('[data-testid=past-session]')) b.setAttribute('aria-pressed', String(b === button));
  $('#past-chart-title').textContent = sessionLabel(s);
  const summary = timelineSummary(data.timeline);
  $('#past-chart-plot').replaceChildren(classChart(data.timeline, summary));
  $('#past-chart-caption').textContent = summary;
  $('#past-chart-rows').replaceChildren(...data.timeline.buckets.map((b) => {
    const p = b.participation;
    return h('tr', {},
      h('th', { scope: 'row' }, `${clock(b.from_ms)}–${clock(b.to_ms)}`),
      h('td', {}, p.timed > 0 ? percent(p.on_beat_ratio) : '–'),
      h('td', {}, String(p.timed)),
      h('td', {}, String(b.students)));
  }));
  const students = data.students.filter((st) => st.participation.notes > 0 || st.first_joined_at_ms != null)
    .sort((a, b) => a.student_id.localeCompare(b.student_id));
  $('#past-students').replaceChildren(...students.map(childRow));
  if (!students.length) $('#past-students').append(h('li', { class: 'hint' }, 'No children joined this session.'));
  $('#past-chart').hidden = false;
}

/** The chart in words, for screen readers and the caption. */
function timelineSummary(timeline) {
  const played = timeline.buckets.filter((b) => b.participation.timed > 0);
  if (!played.length) return 'No notes were played with the beat in this session.';
  let timed = 0;
  let onBeat = 0;
  for (const b of played) {
    timed += b.participation.timed;
    onBeat += b.participation.on_beat;
  }
  const best = played.reduce((a, b) => (b.participation.on_beat_ratio > a.participation.on_beat_ratio ? b : a));
  const worst = played.reduce((a, b) => (b.participation.on_beat_ratio < a.participation.on_beat_ratio ? b : a));
  const span = timeline.buckets.length * timeline.bucket_ms;
  return `The class played on the beat ${percent(onBeat / timed)} of the time (${timed} timed notes) `
    + `in the first ${duration(span)}, in steps of ${duration(timeline.bucket_ms)}. `
    + `Best: ${percent(best.participation.on_beat_ratio)} from ${clock(best.from_ms)}; `
    + `lowest: ${percent(worst.participation.on_beat_ratio)} from ${clock(worst.from_ms)}.`;
}

/**
 * The class's on-beat share over the session: one bar per stretch with timed notes (none
 * where nobody played with the beat), 0 to 100% up, minutes from the start across.
 */
function classChart(timeline, summary) {
  const { width, height, left, right, top, bottom } = CHART;
  const plotW = width - left - right;
  const plotH = height - top - bottom;
  const buckets = timeline.buckets;
  const slot = plotW / Math.max(1, buckets.length);
  const gap = Math.min(2, slot / 6);
  const y = (share) => top + plotH * (1 - share);
  const el = svg('svg', {
    class: 'past-chart-svg', 'data-testid': 'past-chart-svg', viewBox: `0 0 ${width} ${height}`,
    role: 'img', 'aria-label': summary,
  });
  const title = svg('title', {});
  title.textContent = summary;
  el.append(title);
  for (const share of [0, 0.5, 1]) {
    el.append(svg('line', { class: share === 0 ? 'axis' : 'grid', x1: left, x2: width - right, y1: y(share), y2: y(share) }));
    const label = svg('text', { class: 'tick', x: left - 6, y: y(share) + 4, 'text-anchor': 'end' });
    label.textContent = percent(share);
    el.append(label);
  }
  const yTitle = svg('text', { class: 'axis-title', x: 12, y: top + plotH / 2, transform: `rotate(-90 12 ${top + plotH / 2})`, 'text-anchor': 'middle' });
  yTitle.textContent = 'on the beat';
  el.append(yTitle);
  buckets.forEach((b, i) => {
    const p = b.participation;
    if (!(p.timed > 0)) return;
    const share = p.on_beat_ratio;
    const barH = Math.max(1.5, plotH * share);
    const bar = svg('rect', {
      class: `bar ${share >= 0.5 ? 'good' : 'low'}`, 'data-testid': 'past-chart-bar', 'data-from-ms': b.from_ms,
      x: left + i * slot + gap, y: top + plotH - barH, width: Math.max(1, slot - 2 * gap), height: barH,
    });
    const tip = svg('title', {});
    tip.textContent = `${clock(b.from_ms)}–${clock(b.to_ms)}: ${percent(share)} of ${p.timed} timed notes on the beat`;
    bar.append(tip);
    el.append(bar);
  });
  // Time labels: at most 6, on stretch boundaries, and the end.
  const every = Math.max(1, Math.ceil(buckets.length / 6));
  for (let i = 0; i <= buckets.length; i += every) {
    const label = svg('text', { class: 'tick', x: left + i * slot, y: height - bottom + 16, 'text-anchor': 'middle' });
    label.textContent = clock(i * timeline.bucket_ms);
    el.append(label);
  }
  const xTitle = svg('text', { class: 'axis-title', x: left + plotW / 2, y: height - 6, 'text-anchor': 'middle' });
  xTitle.textContent = 'time since the class opened (min:s)';
  el.append(xTitle);
  return el;
}

/** One child: a bar of their on-beat share, and a dot for how early or late they were. */
function childRow(st) {
  const p = st.participation;
  const width = 160;
  const height = 30;
  const timed = p.timed > 0;
  const text = timed
    ? `${percent(p.on_beat_ratio)} on the beat · ${leanText(p.mean_signed_offset_ms)}`
    : p.notes > 0 ? 'no notes while the beat played' : 'did not play';
  const el = svg('svg', {
    class: 'child-bar', 'data-testid': 'past-student-bar', viewBox: `0 0 ${width} ${height}`, width, height,
    role: 'img', 'aria-label': `${st.student_id}: ${text}`,
  });
  el.append(svg('rect', { class: 'track', x: 0, y: 2, width, height: 10, rx: 3 }));
  if (timed) el.append(svg('rect', { class: 'fill', x: 0, y: 2, width: width * p.on_beat_ratio, height: 10, rx: 3 }));
  const mid = width / 2;
  el.append(
    svg('line', { class: 'lean-scale', x1: 4, x2: width - 4, y1: 22, y2: 22 }),
    svg('line', { class: 'lean-beat', x1: mid, x2: mid, y1: 16, y2: 28 }),
  );
  if (timed && p.mean_signed_offset_ms != null) {
    const lean = Math.max(-LEAN_RANGE_MS, Math.min(LEAN_RANGE_MS, p.mean_signed_offset_ms));
    el.append(svg('circle', { class: 'lean-dot', cx: mid + (lean / LEAN_RANGE_MS) * (mid - 6), cy: 22, r: 4 }));
  }
  return h('li', { class: 'past-student', 'data-testid': 'past-student', 'data-student-id': st.student_id },
    h('span', { class: 'past-student-id' }, st.student_id),
    el,
    h('span', { class: 'past-student-text' }, text));
}

main();
