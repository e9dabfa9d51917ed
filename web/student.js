// The student's page: type the class code (and name), join, hear the beat, play pads in time
// with classmates, see who is here, and answer the teacher's check-in question.

import {
  $, h, INSTRUMENTS, MOODS, BeatLights, Metronome, Sound,
  bootPage, clearError, errorCode, flash, formatCode, isValidCode, normalizeCode, openAudio,
  scheduleNote, setStatus, showError, signInAndConnect, syncBadge, watchConnection,
} from '/common.js';

const trace = { beats: [], notes: [], played: [] };
/** Test hooks: the classroom, this page's AudioContext and what it scheduled. */
window.downbeat = { classroom: null, ctx: null, trace };

/** Pads: a major pentatonic scale, one key each. */
const PADS = [
  { midi: 60, key: 'a', label: 'A' },
  { midi: 62, key: 's', label: 'S' },
  { midi: 64, key: 'd', label: 'D' },
  { midi: 67, key: 'f', label: 'F' },
  { midi: 69, key: 'j', label: 'J' },
  { midi: 72, key: 'k', label: 'K' },
  { midi: 74, key: 'l', label: 'L' },
  { midi: 76, key: ';', label: ';' },
];
/** How long a pad or a classmate's chip stays lit. */
const FLASH_MS = 200;
const NOTE_NAMES = ['C', 'C♯', 'D', 'D♯', 'E', 'F', 'F♯', 'G', 'G♯', 'A', 'A♯', 'B'];

const statusEl = $('#status');
const errorEl = $('#error');

let classroom = null;
let ctx = null;
let sound = null;
let metronome = null;
let lights = null;
let instrument = 0;
let muted = false;
let mood = null;
let promptId = null;
let errorTimer = 0;
const padButtons = [];

function main() {
  bootPage({
    role: 'student',
    rows: {
      known: '#known-row',
      demo: '#name-row',
      paste: '#paste-row',
      knownName: (claims) => claims.name || 'friend',
      demoName: () => {
        const name = $('#name-input').value.trim();
        if (!name) {
          $('#name-input').focus();
          throw Object.assign(new Error('Type your name first.'), { code: 'need_name' });
        }
        return name;
      },
    },
    statusEl,
    errorEl,
    section: '#join',
    form: '#join-form',
    submit: '#join-button',
    loading: 'Loading…',
    ready: 'Ready to join',
    before: () => {
      const fromQuery = new URLSearchParams(location.search).get('code');
      if (fromQuery) $('#code-input').value = formatCode(fromQuery);
    },
    onSubmit: join,
  });
}

async function join(signIn) {
  clearError(errorEl);
  // The click is the user gesture that lets audio start.
  ctx = openAudio(ctx);
  window.downbeat.ctx = ctx;
  const code = normalizeCode($('#code-input').value);
  if (!isValidCode(code)) {
    showError(errorEl, { code: 'bad_code', message: 'A class code has 8 letters and numbers, like K7QF-M3XP.' });
    $('#code-input').focus();
    return;
  }
  const button = $('#join-button');
  const joined = await signInAndConnect(signIn, { code }, { button, statusEl, errorEl, connecting: 'Joining…' });
  if (!joined) return;
  classroom = joined;
  window.downbeat.classroom = classroom;
  $('#join').hidden = true;
  $('#play').hidden = false;
  startPlaying();
}

function startPlaying() {
  sound = new Sound(ctx);
  metronome = new Metronome(classroom, sound, trace);
  metronome.start();
  lights = new BeatLights(classroom, $('#beat-lights'), { highlight: () => self()?.beats ?? [] });
  lights.start();

  watchConnection(classroom, statusEl, {
    onClosed: (d) => {
      metronome.stop();
      lights.stop();
      setPadsEnabled(false);
      $('#play').hidden = true;
      $('#join').hidden = false;
      $('#join-button').disabled = false;
      if (d && d.code) showError(errorEl, d);
    },
  });
  classroom.on('error', (e) => flashError(e));

  const me = self();
  $('#me').textContent = me ? me.name : 'Student';
  document.title = `${me ? me.name : 'Play'} · Downbeat`;

  sound.setClicks($('#click-toggle').checked);
  wireOnce();

  const rerender = () => renderPresence(classroom.members());
  for (const type of ['members', 'member-joined', 'member-left', 'member-updated']) classroom.on(type, rerender);
  rerender();

  classroom.on('note', (n) => {
    scheduleNote(classroom, sound, trace, n);
    const chip = document.querySelector(`#presence [data-member-id="${n.from}"]`);
    if (chip) setTimeout(() => flash(chip, 'played', FLASH_MS), Math.max(0, n.localTime - performance.now()));
  });

  promptId = null;
  classroom.on('prompt', showPrompt);
  showPrompt(classroom.prompt());

  // A recording is never silent: the class sees it run.
  const showRecording = (r) => ($('#recording-badge').hidden = !r);
  classroom.on('playback', (p) => ($('#playback-badge').hidden = !p));
  classroom.on('recording', showRecording);
  showRecording(classroom.recording());

  refreshSync();
  setStatus(statusEl, `Connected to ${formatCode(classroom.code)}`, 'ok');
}

let wired = false;

/** The page's own controls, wired once (a class can be joined again after it closed). */
function wireOnce() {
  if (wired) return;
  wired = true;
  buildInstruments();
  buildPads();
  buildMoods();
  $('#click-toggle').addEventListener('change', (ev) => sound && sound.setClicks(ev.currentTarget.checked));
  $('#reflection-send').addEventListener('click', sendReflection);
  setInterval(refreshSync, 500);
}

function self() {
  return classroom ? classroom.members().find((m) => m.id === classroom.memberId) : undefined;
}

function refreshSync() {
  if (!classroom) return;
  const badge = $('#sync-state');
  const s = classroom.sync();
  badge.hidden = false;
  const b = syncBadge(s);
  badge.className = `badge ${b.cls}`;
  badge.textContent = s && s.synced ? `🎯 ${b.label}` : '⏳ getting in time…';
  if (s && s.synced && typeof s.uncertaintyMs === 'number') badge.title = `± ${s.uncertaintyMs.toFixed(2)} ms`;
  if (ctx && ctx.state === 'suspended' && !$('#play').hidden) {
    setStatus(statusEl, 'Tap anywhere to turn the sound on', 'warn');
  }
}

// ---------------------------------------------------------------- pads

function buildInstruments() {
  const box = $('#instruments');
  box.replaceChildren(
    ...INSTRUMENTS.map((inst, i) => {
      const b = h('button', {
        type: 'button', class: 'instrument', 'aria-pressed': String(i === instrument),
        'data-testid': `instrument-${i}`,
      }, h('span', { 'aria-hidden': 'true' }, inst.emoji), ` ${inst.label}`);
      b.addEventListener('click', () => {
        instrument = i;
        for (const o of box.children) o.setAttribute('aria-pressed', String(o === b));
      });
      return b;
    }),
  );
}

function buildPads() {
  const box = $('#pads');
  padButtons.length = 0;
  PADS.forEach((pad, i) => {
    const name = `${NOTE_NAMES[pad.midi % 12]}${Math.floor(pad.midi / 12) - 1}`;
    const b = h('button', {
      type: 'button', class: `pad pad-${i}`, 'data-testid': `pad-${i}`,
      'aria-keyshortcuts': pad.key === ';' ? 'Semicolon' : pad.key.toUpperCase(),
      'aria-label': `Play ${name} (key ${pad.label})`,
    }, h('span', { class: 'pad-key', 'aria-hidden': 'true' }, pad.label));
    // Pointer down sounds at once; a keyboard "click" (detail 0) also plays.
    b.addEventListener('pointerdown', (ev) => {
      if (ev.button === 0) playPad(i);
    });
    b.addEventListener('click', (ev) => {
      if (ev.detail === 0) playPad(i);
    });
    padButtons.push(b);
    box.append(b);
  });
  document.addEventListener('keydown', (ev) => {
    if (ev.repeat || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const tag = ev.target && ev.target.tagName;
    if (tag === 'INPUT' || tag === 'TEXTAREA' || tag === 'SELECT') return;
    const i = PADS.findIndex((p) => p.key === ev.key.toLowerCase());
    if (i >= 0) {
      ev.preventDefault();
      playPad(i);
    }
  });
}

function setPadsEnabled(on) {
  for (const b of padButtons) b.disabled = !on;
}

function playPad(i) {
  if (!classroom || muted || classroom.state === 'closed') return;
  if (ctx.state !== 'running') ctx.resume().catch(() => {});
  const pad = PADS[i];
  let note;
  try {
    note = classroom.playNote(pad.midi, 100, instrument);
  } catch (e) {
    flashError(e);
    return;
  }
  const audioTime = classroom.audioTimeOf(ctx, note.playAt);
  if (audioTime !== undefined && audioTime !== null) sound.tone(audioTime, note.midi, note.velocity ?? 100, instrument);
  const localTime = classroom.localTimeOf(note.playAt);
  trace.played.push({
    seq: note.seq,
    midi: note.midi,
    instrument,
    serverTime: note.serverTime,
    playAt: note.playAt,
    localTime,
    audioTime,
  });
  const b = padButtons[i];
  flash(b, 'hit', FLASH_MS);
  if (localTime !== undefined) setTimeout(() => flash(b, 'sounding', FLASH_MS), Math.max(0, localTime - performance.now()));
}

function flashError(e) {
  showError(errorEl, e);
  clearTimeout(errorTimer);
  errorTimer = setTimeout(() => clearError(errorEl), 4000);
}

// ---------------------------------------------------------------- presence

function renderPresence(members) {
  const me = members.find((m) => m.id === classroom.memberId);
  const sorted = members.slice().sort((a, b) =>
    (a.role === 'teacher' ? 0 : 1) - (b.role === 'teacher' ? 0 : 1) || a.name.localeCompare(b.name));
  $('#presence').replaceChildren(
    ...sorted.map((m) =>
      h('li', {
        class: `presence-item${m.muted ? ' muted' : ''}${m.id === classroom.memberId ? ' self' : ''}`,
        'data-member-id': m.id,
      },
      h('span', { 'aria-hidden': 'true' }, m.role === 'teacher' ? '🧑‍🏫' : '🙂'),
      h('span', { class: 'presence-name' }, m.name),
      m.id === classroom.memberId ? h('span', { class: 'hint' }, ' (you)') : null,
      m.muted ? h('span', { class: 'presence-muted', role: 'img', 'aria-label': 'muted' }, ' 🔇') : null)),
  );

  muted = !!(me && me.muted);
  $('#muted-banner').hidden = !muted;
  setPadsEnabled(!muted && classroom.state !== 'closed');
  document.body.classList.toggle('is-muted', muted);

  const part = $('#my-part');
  if (me && me.part) {
    const beats = me.beats || [];
    part.textContent = beats.length
      ? `Your part: ${me.part} · play on beat${beats.length > 1 ? 's' : ''} ${beats.map((b) => b + 1).join(' and ')}`
      : `Your part: ${me.part}`;
  } else {
    part.textContent = 'Play along with the beat!';
  }
  lights?.layout();
}

// ---------------------------------------------------------------- reflection

function buildMoods() {
  $('#moods').replaceChildren(
    ...MOODS.map((m, i) => {
      const b = h('button', {
        type: 'button', class: 'mood-button', 'data-testid': `mood-${i}`, 'aria-pressed': 'false',
        'aria-label': m.label, title: m.label,
      }, m.emoji);
      b.addEventListener('click', () => {
        mood = mood === i ? null : i;
        for (const [j, o] of [...$('#moods').children].entries()) o.setAttribute('aria-pressed', String(j === mood));
      });
      return b;
    }),
  );
}

function showPrompt(p) {
  const section = $('#reflection');
  if (!p || !p.text) {
    section.hidden = true;
    promptId = null;
    return;
  }
  section.hidden = false;
  if (p.id !== promptId) {
    promptId = p.id;
    mood = null;
    for (const o of $('#moods').children) o.setAttribute('aria-pressed', 'false');
    $('#reflection-text').value = '';
    $('#reflection-thanks').hidden = true;
    $('#reflection-send').disabled = false;
  }
  $('#prompt-text').textContent = p.text;
}

async function sendReflection() {
  clearError(errorEl);
  const text = $('#reflection-text').value.trim();
  if (mood === null && !text) {
    showError(errorEl, { code: 'need_answer', message: 'Pick a face or write something first.' });
    return;
  }
  const button = $('#reflection-send');
  button.disabled = true;
  button.textContent = 'Sending…';
  try {
    const answer = { promptId };
    if (mood !== null) answer.mood = mood;
    if (text) answer.text = text;
    await classroom.submitReflection(answer);
    $('#reflection-thanks').hidden = false;
    button.textContent = 'Sent';
  } catch (e) {
    button.disabled = false;
    button.textContent = 'Send';
    showError(errorEl, e, errorCode(e) === 'store_unavailable' ? '' : 'Not sent: ');
  }
}

main();
