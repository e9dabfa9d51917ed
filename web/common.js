// Shared helpers for the Downbeat classroom pages: booting, sign-in, connecting, friendly
// errors, the metronome scheduler, synthesized sounds and the beat lights.
//
// Plain ES module, no build step. The client package is loaded lazily from /pkg/ so a page
// can still explain what went wrong when it is missing.

/** Mood buttons, index = the mood number sent with a reflection (0..4). */
export const MOODS = [
  { emoji: '😢', label: 'Sad' },
  { emoji: '😕', label: 'Not so good' },
  { emoji: '😐', label: 'Okay' },
  { emoji: '🙂', label: 'Good' },
  { emoji: '😄', label: 'Great' },
];

/** The instruments a child can pick; the index travels with each note. */
export const INSTRUMENTS = [
  { emoji: '🎹', label: 'Marimba' },
  { emoji: '🔔', label: 'Bells' },
  { emoji: '🎸', label: 'Synth' },
  { emoji: '🥁', label: 'Drum' },
];

/** Friendly words for the stable error codes (server and client). */
const FRIENDLY = {
  room_not_found: "We couldn't find a class with that code. Check the code and try again.",
  room_closed: 'That class has ended.',
  room_full: 'This class is full. Ask your teacher for help.',
  unauthorized: "Signing in didn't work. Ask your teacher for help.",
  token_expired: 'Your sign-in has run out. Please sign in again.',
  wrong_tenant: 'That code belongs to another school.',
  rate_limited: 'Too many tries at once. Wait a moment and try again.',
  forbidden: "That isn't allowed here.",
  not_teacher: 'Only the teacher can do that.',
  muted: 'You are muted right now.',
  removed: 'The teacher took you out of the class.',
  session_replaced: 'You joined from another tab or computer, so this one stopped.',
  server_busy: 'The class server is very busy. Try again in a moment.',
  too_many_rooms: 'Too many classes are open right now.',
  too_many_sessions: 'Too many people are connected right now.',
  shutting_down: 'The class server is restarting. Try again in a moment.',
  tempo_out_of_range: 'Pick a tempo between 40 and 240.',
  meter_out_of_range: 'Pick between 2 and 7 beats in a bar.',
  already_running: 'The music is already playing.',
  not_running: 'The music is already stopped.',
  too_many_pending_changes: 'Too many changes at once. Wait a bar and try again.',
  member_not_found: 'That student has left the class.',
  store_unavailable: "We couldn't save that just now. Try again in a moment.",
  store_refused: "The school's database couldn't store that. Try writing it differently.",
  too_many_reflections: 'You already answered this question a few times. Wait for the next one.',
  already_recording: 'The class is already being recorded.',
  not_recording: 'Nothing is being recorded right now.',
  too_many_recordings: 'This class has as many recordings as it can keep. Start a new class to record more.',
  recording_not_found: "That recording isn't there any more.",
  already_playing: 'A recording is already playing. Stop it first.',
  not_playing: 'Nothing is playing back right now.',
  ended_by_operator: 'The server team ended this session. Join the class again to carry on.',
  moved: 'Your class moved to another server. Connecting there…',
  data_deleted: 'Your school removed your data from the class, so this session ended.',
  no_prompt: 'There is no question to answer right now.',
  note_out_of_range: "That note couldn't be played.",
  connect_failed: "We couldn't reach the class. Check the Wi-Fi and try again.",
  closed: 'You are not connected to the class any more.',
  timeout: 'The class took too long to answer. Try again.',
  not_synced: 'Still getting in time with the class. Try again in a second.',
  protocol: 'Something went wrong talking to the class server.',
  bad_request: 'Something in that request was not right.',
  internal: 'The class server had a problem. Try again.',
  load_failed: "The class app didn't load. Ask your teacher to check the server.",
  demo_off: 'This server needs a sign-in token from your school.',
  too_many_probes: 'Too many network checks are running right now. Try again in a minute.',
  probe_only: 'The network check was refused by the server.',
  probe_over: 'The network check has finished.',
};

/** A short, friendly message for any error (DownbeatError or otherwise). */
export function friendlyError(err) {
  if (err && typeof err.friendly === 'string') return err.friendly;
  const code = errorCode(err);
  return FRIENDLY[code] ?? (err && err.message) ?? String(err);
}

/** The stable code of a DownbeatError (or 'error'). */
export function errorCode(err) {
  return (err && typeof err.code === 'string' && err.code) || 'error';
}

/** Shows an error in an alert element as "friendly message (code)". */
export function showError(el, err, prefix = '') {
  if (!el) return;
  const code = errorCode(err);
  el.hidden = false;
  el.replaceChildren(
    document.createTextNode(`${prefix}${friendlyError(err)} `),
    h('code', { class: 'error-code' }, code),
  );
  if (code === 'error') console.error(err);
}

export function clearError(el) {
  if (!el) return;
  el.hidden = true;
  el.replaceChildren();
}

/** Tiny element builder: h('button', { class: 'x', onclick }, 'text', child...). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k === 'testid') el.dataset.testid = v;
    else if (v === true) el.setAttribute(k, '');
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export const $ = (sel, root = document) => root.querySelector(sel);

/** Sets a status line (an aria-live element) with a kind for its colour. */
export function setStatus(el, text, kind = 'info') {
  if (!el) return;
  el.textContent = text;
  el.dataset.kind = kind;
}

/** Replays the CSS animation `cls` on `el` (removed again after `ms`). */
export function flash(el, cls, ms) {
  el.classList.remove(cls);
  void el.offsetWidth; // restart the animation
  el.classList.add(cls);
  setTimeout(() => el.classList.remove(cls), ms);
}

// ---------------------------------------------------------------- sign-in and connecting

/**
 * `/api/client-config`: { webtransport_url, certificate_hashes, demo } and, where the server's
 * WebSocket is not at /api/ws on this page's host, websocket_url.
 */
export async function loadConfig() {
  const res = await fetch('/api/client-config', { cache: 'no-store' });
  if (!res.ok) throw Object.assign(new Error(`client-config: HTTP ${res.status}`), { code: 'load_failed' });
  return res.json();
}

/** Where this tab keeps the demo teacher secret. */
const DEMO_SECRET_KEY = 'downbeat.demoTeacherSecret';

/**
 * What the URL fragment carried, read once as the page loads: `#token=<jwt>` and `#secret=`
 * (the demo's teacher link, as the server's banner prints it). The secret is kept in
 * sessionStorage for asking the demo for a teacher token, and the fragment is removed from
 * the address bar at once, so neither is bookmarked, shared or shown on a projector.
 * (Browsers never send a fragment to the server.)
 */
const FRAGMENT = (() => {
  const params = new URLSearchParams(location.hash.replace(/^#/, ''));
  const token = params.get('token')?.trim() || null;
  const secret = params.get('secret')?.trim() || null;
  if (secret) sessionStorage.setItem(DEMO_SECRET_KEY, secret);
  if (token || secret) history.replaceState(null, '', location.pathname + location.search);
  return { token };
})();

/**
 * The page's token: from `#token=<jwt>` (stored in sessionStorage), else the one stored
 * earlier in this tab, else null.
 */
export function takeToken(page) {
  const key = `downbeat.token.${page}`;
  if (FRAGMENT.token) sessionStorage.setItem(key, FRAGMENT.token);
  FRAGMENT.token = null;
  return sessionStorage.getItem(key);
}

export function storeToken(page, token) {
  sessionStorage.setItem(`downbeat.token.${page}`, token);
}

export function forgetToken(page) {
  sessionStorage.removeItem(`downbeat.token.${page}`);
}

/** The claims of a JWT, for display only (never trusted: the server verifies). */
export function tokenClaims(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const json = decodeURIComponent(
      Array.from(atob(part), (c) => '%' + c.charCodeAt(0).toString(16).padStart(2, '0')).join(''),
    );
    return JSON.parse(json);
  } catch {
    return {};
  }
}

/**
 * On a demo server: a fresh token for a teacher or a student with this display name. A
 * teacher sends the demo teacher secret from the teacher link (see `FRAGMENT`); without the
 * right one the server answers `forbidden`.
 */
export async function mintDemoToken(role, name) {
  const request = { role, name };
  const secret = role === 'teacher' ? sessionStorage.getItem(DEMO_SECRET_KEY) : null;
  if (secret) request.secret = secret;
  const res = await fetch('/api/demo/tokens', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(request),
  });
  const body = await res.json().catch(() => ({}));
  if (!res.ok) {
    const e = body && body.error;
    const err = Object.assign(new Error((e && e.message) || `HTTP ${res.status}`), {
      code: (e && e.code) || 'unauthorized',
    });
    if (role === 'teacher' && err.code === 'forbidden') {
      err.friendly = 'Teachers sign in with the teacher link the server printed when it started. Open that link.';
    }
    throw err;
  }
  return body.token;
}

let pkgPromise = null;

/** Loads the client package once (the module and its wasm). */
export function loadClient() {
  if (!pkgPromise) {
    pkgPromise = import('/pkg/downbeat_client.js')
      .then(async (mod) => {
        await mod.default();
        return mod;
      })
      .catch((e) => {
        pkgPromise = null;
        console.error(e);
        throw Object.assign(new Error(`loading /pkg/downbeat_client.js: ${e.message}`), { code: 'load_failed' });
      });
  }
  return pkgPromise;
}

/**
 * Connects to a room: `room` is `{ code }` or `{ create: {...} }`. The package races
 * WebTransport against WebSocket (for networks that block QUIC) and remembers the winner.
 */
export async function connectClassroom(config, token, room) {
  sessionTokenValue = token;
  const { connect } = await loadClient();
  const opts = { url: config.webtransport_url, token, reconnect: true, ...room };
  if (config.certificate_hashes && config.certificate_hashes.length) {
    opts.certificateHashes = config.certificate_hashes;
  }
  if (config.websocket_url) opts.webSocketUrl = config.websocket_url;
  return connect(opts);
}

let sessionTokenValue = null;

/** The token the page's classroom connected with, for the API calls it makes (downloads). */
export function sessionToken() {
  return sessionTokenValue;
}

/**
 * Who a page signs in as: the token kept for `role` in this tab, the rows that show the
 * signed-in name or ask for a demo name or a pasted token, and forgetting a refused token.
 * `rows` names the page's elements: `known`, `demo` and `paste` rows (selectors);
 * `knownName(claims)` says who is signed in; `demoName()` reads the name typed on a demo
 * server (it may throw an error with a `code` to show).
 */
export class SignIn {
  constructor(role, config, rows) {
    this.role = role;
    this.config = config;
    this.rows = rows;
    this.current = takeToken(role);
  }

  /** Shows the signed-in name, or the demo name field, or the token paste field. */
  show() {
    const known = this.current ? tokenClaims(this.current) : null;
    $(this.rows.known).hidden = !known;
    if (known) $('#known-name').textContent = this.rows.knownName(known);
    $(this.rows.demo).hidden = !!known || !this.config.demo;
    $(this.rows.paste).hidden = !!known || !!this.config.demo;
  }

  /** The token to connect with: the kept one, a demo token for the typed name, or the pasted one. */
  async token() {
    if (this.current) return this.current;
    if (this.config.demo) {
      this.current = await mintDemoToken(this.role, this.rows.demoName());
    } else {
      const pasted = $('#token-paste').value.trim();
      if (!pasted) throw Object.assign(new Error('Paste your sign-in token first.'), { code: 'demo_off' });
      this.current = pasted;
    }
    storeToken(this.role, this.current);
    return this.current;
  }

  /** Drops the token (signed out, or refused by the server) and asks again. */
  forget() {
    forgetToken(this.role);
    this.current = null;
    this.show();
  }
}

/**
 * Boots a page: loads the client config, shows the sign-in and the `form` section, wires its
 * submit to `onSubmit(signIn)` and `#signout`, then loads the client package and enables
 * `submit` (a selector, or a list of them) with the `ready` status. `before(signIn)` runs just
 * before the sign-in is first shown (a page with a second form wires it there). Failures are
 * shown in the status line and `errorEl`.
 */
export async function bootPage({ role, rows, statusEl, errorEl, section, form, submit, loading, ready, before, onSubmit }) {
  let config;
  try {
    config = await loadConfig();
  } catch (e) {
    setStatus(statusEl, 'Cannot reach the class server', 'error');
    showError(errorEl, e);
    return;
  }
  const signIn = new SignIn(role, config, rows);
  before?.(signIn);
  signIn.show();
  $(section).hidden = false;
  $(form).addEventListener('submit', (ev) => {
    ev.preventDefault();
    onSubmit(signIn);
  });
  $('#signout').addEventListener('click', () => signIn.forget());
  setStatus(statusEl, loading, 'info');
  try {
    await loadClient();
    setStatus(statusEl, ready, 'ok');
    for (const sel of [submit].flat()) $(sel).disabled = false;
  } catch (e) {
    setStatus(statusEl, 'The class app did not load', 'error');
    showError(errorEl, e);
  }
}

/**
 * Signs in and connects to `room` with `button` disabled and `connecting` in the status line.
 * `check(token)`, if given, runs between signing in and connecting, and may refuse by throwing
 * an error with a `code`. On failure: shows why, enables `button` again, forgets a token the
 * server refused, and returns null.
 */
export async function signInAndConnect(signIn, room, { button, statusEl, errorEl, connecting, check }) {
  button.disabled = true;
  setStatus(statusEl, connecting, 'info');
  try {
    const token = await signIn.token();
    if (check) await check(token);
    return await connectClassroom(signIn.config, token, room);
  } catch (e) {
    button.disabled = false;
    setStatus(statusEl, 'Not connected', 'error');
    showError(errorEl, e);
    if (e && (e.code === 'unauthorized' || e.code === 'token_expired')) signIn.forget();
    return null;
  }
}

/** Join codes: 8 symbols, shown as K7QF-M3XP; case, spaces and dashes ignored. */
export function normalizeCode(text) {
  return String(text || '').toUpperCase().replace(/[\s-]+/g, '');
}

export function isValidCode(code) {
  return /^[23456789ABCDEFGHJKLMNPQRSTUVWXYZ]{8}$/.test(code);
}

export function formatCode(code) {
  const c = normalizeCode(code);
  return c.length === 8 ? `${c.slice(0, 4)}-${c.slice(4)}` : String(code || '');
}

/** A member's sync quality as a badge: { cls, label }. */
export function syncBadge(sync) {
  if (!sync || !sync.synced) return { cls: 'badge-grey', label: 'syncing…' };
  const u = sync.uncertaintyMs;
  if (typeof u === 'number' && u < 1) return { cls: 'badge-green', label: 'in time' };
  if (typeof u === 'number' && u < 5) return { cls: 'badge-amber', label: 'nearly' };
  return { cls: 'badge-red', label: 'wobbly' };
}

/** Describes the connection state for the status line. */
export function watchConnection(classroom, statusEl, { onClosed } = {}) {
  setStatus(statusEl, 'Connected', 'ok');
  classroom.on('reconnecting', (d) => {
    setStatus(statusEl, `Reconnecting… (try ${d && d.attempt ? d.attempt : 1})`, 'warn');
  });
  classroom.on('reconnected', () => setStatus(statusEl, 'Connected again', 'ok'));
  classroom.on('closed', (d) => {
    const code = d && (d.code || d.reason);
    setStatus(statusEl, `Disconnected: ${FRIENDLY[code] ?? code ?? 'the class ended'}`, 'error');
    if (onClosed) onClosed(d);
  });
}

/** Names of members by id, remembered after they leave (for the SEL feed). */
export class NameBook {
  constructor() {
    this.names = new Map();
  }
  update(members) {
    for (const m of members || []) this.names.set(m.id, m.name);
  }
  name(id) {
    return this.names.get(id) ?? `#${id}`;
  }
}

// ---------------------------------------------------------------- sound

function midiToHz(midi) {
  return 440 * Math.pow(2, (midi - 69) / 12);
}

/**
 * Synthesized sounds on one AudioContext: metronome clicks and instrument tones, all
 * scheduled at an exact AudioContext time.
 */
export class Sound {
  constructor(ctx) {
    this.ctx = ctx;
    this.master = ctx.createGain();
    this.master.gain.value = 0.8;
    const comp = ctx.createDynamicsCompressor();
    this.master.connect(comp).connect(ctx.destination);
    this.clickGain = ctx.createGain();
    this.clickGain.connect(this.master);
    this.clicksOn = true;
  }

  setClicks(on) {
    this.clicksOn = on;
    this.clickGain.gain.setValueAtTime(on ? 1 : 0, this.ctx.currentTime);
  }

  /** A short envelope: silence, quick attack to `peak`, exponential decay over `decay` s. */
  envelope(when, peak, decay) {
    const g = this.ctx.createGain();
    g.gain.setValueAtTime(0.0001, when);
    g.gain.linearRampToValueAtTime(peak, when + 0.003);
    g.gain.exponentialRampToValueAtTime(0.0001, when + decay);
    return g;
  }

  /** A metronome click: 'count' (count-in), 'down' (accented downbeat) or 'beat'. */
  click(when, kind) {
    const ctx = this.ctx;
    const t = Math.max(when, ctx.currentTime);
    const osc = ctx.createOscillator();
    const freq = kind === 'count' ? 1760 : kind === 'down' ? 1320 : 880;
    osc.type = kind === 'count' ? 'square' : 'triangle';
    osc.frequency.setValueAtTime(freq, t);
    const g = this.envelope(t, kind === 'down' ? 0.9 : kind === 'count' ? 0.35 : 0.5, 0.05);
    osc.connect(g).connect(this.clickGain);
    osc.start(t);
    osc.stop(t + 0.07);
  }

  /** A note with the instrument's timbre. */
  tone(when, midi, velocity = 100, instrument = 0) {
    const ctx = this.ctx;
    const t = Math.max(when, ctx.currentTime);
    const f = midiToHz(midi);
    const v = Math.max(0.05, Math.min(1, velocity / 127)) * 0.5;
    const kind = ((instrument % INSTRUMENTS.length) + INSTRUMENTS.length) % INSTRUMENTS.length;
    const voices = [];
    if (kind === 0) {
      // Marimba: a sine with a quiet, quickly fading fourth harmonic.
      voices.push(['sine', f, v, 0.6], ['sine', f * 4, v * 0.25, 0.08]);
    } else if (kind === 1) {
      // Bells: inharmonic partials that ring.
      voices.push(['sine', f, v * 0.8, 1.4], ['sine', f * 2.76, v * 0.35, 0.9], ['sine', f * 5.4, v * 0.15, 0.4]);
    } else if (kind === 2) {
      // Synth: a sawtooth through a low-pass filter.
      const osc = ctx.createOscillator();
      osc.type = 'sawtooth';
      osc.frequency.setValueAtTime(f, t);
      const lp = ctx.createBiquadFilter();
      lp.type = 'lowpass';
      lp.frequency.setValueAtTime(Math.min(6000, f * 6), t);
      lp.frequency.exponentialRampToValueAtTime(Math.max(200, f * 1.5), t + 0.3);
      const g = this.envelope(t, v * 0.6, 0.4);
      osc.connect(lp).connect(g).connect(this.master);
      osc.start(t);
      osc.stop(t + 0.45);
      return;
    } else {
      // Drum: a tom whose pitch drops.
      const osc = ctx.createOscillator();
      osc.type = 'sine';
      const base = Math.max(60, f / 4);
      osc.frequency.setValueAtTime(base * 2.5, t);
      osc.frequency.exponentialRampToValueAtTime(base, t + 0.12);
      const g = this.envelope(t, v * 1.2, 0.3);
      osc.connect(g).connect(this.master);
      osc.start(t);
      osc.stop(t + 0.35);
      return;
    }
    for (const [type, freq, peak, decay] of voices) {
      const osc = ctx.createOscillator();
      osc.type = type;
      osc.frequency.setValueAtTime(freq, t);
      const g = this.envelope(t, peak, decay);
      osc.connect(g).connect(this.master);
      osc.start(t);
      osc.stop(t + decay + 0.05);
    }
  }
}

/** Creates (or resumes) an AudioContext; call from a user gesture. */
export function openAudio(existing) {
  const ctx = existing ?? new AudioContext({ latencyHint: 'interactive' });
  if (ctx.state !== 'running') ctx.resume().catch(() => {});
  return ctx;
}

// ---------------------------------------------------------------- scheduling

/**
 * The lookahead metronome: every `intervalMs` it asks the classroom for the beats of the
 * next `lookaheadMs` and schedules each one once, at its AudioContext time. Every scheduled
 * beat goes to `trace.beats`. Without a Sound (no audio yet) nothing is recorded.
 */
export class Metronome {
  constructor(classroom, sound, trace, { lookaheadMs = 200, intervalMs = 25 } = {}) {
    this.classroom = classroom;
    this.sound = sound;
    this.trace = trace;
    this.lookaheadMs = lookaheadMs;
    this.intervalMs = intervalMs;
    this.done = new Map(); // key -> serverTime
    this.timer = null;
  }

  start() {
    if (this.timer !== null) return;
    this.timer = setInterval(() => this.tick(), this.intervalMs);
    this.tick();
  }

  stop() {
    if (this.timer !== null) clearInterval(this.timer);
    this.timer = null;
  }

  tick() {
    const { classroom, sound } = this;
    if (!sound || classroom.state === 'closed') return;
    let beats;
    try {
      beats = classroom.beatsAhead(this.lookaheadMs) || [];
    } catch (e) {
      console.warn('beatsAhead', e);
      return;
    }
    for (const b of beats) {
      // The index alone could repeat after a stop and a new start; the instant cannot.
      const key = `${b.index}@${b.serverTime}`;
      if (this.done.has(key)) continue;
      const audioTime = classroom.audioTimeOf(sound.ctx, b.serverTime);
      if (audioTime === undefined || audioTime === null) continue;
      this.done.set(key, b.serverTime);
      sound.click(audioTime, b.countIn ? 'count' : b.beatInBar === 0 ? 'down' : 'beat');
      this.trace.beats.push({
        index: b.index,
        serverTime: b.serverTime,
        localTime: b.localTime,
        audioTime,
        beatInBar: b.beatInBar,
        countIn: b.countIn,
      });
    }
    if (this.done.size > 64) {
      const now = classroom.serverNow();
      for (const [k, t] of this.done) if (now !== undefined && t < now - 5000) this.done.delete(k);
    }
  }
}

/**
 * Beat lights: a row of cells, one per beat of the bar, the sounding one lit. Beats come
 * from `beatsAhead` and each is lit by requestAnimationFrame when its local time arrives
 * (`localTimeOf` of its server instant, asked again at that frame).
 */
export class BeatLights {
  constructor(classroom, container, { highlight = () => [] } = {}) {
    this.classroom = classroom;
    this.container = container;
    this.highlight = highlight;
    this.pending = new Map(); // key -> beat
    this.cells = [];
    this.count = 0;
    this.raf = 0;
    this.offTimer = 0;
    this.frame = this.frame.bind(this);
  }

  start() {
    this.layout();
    this.raf = requestAnimationFrame(this.frame);
  }

  stop() {
    cancelAnimationFrame(this.raf);
  }

  /** Builds the cells for the current meter (and refreshes highlighted beats). */
  layout() {
    const tl = this.classroom.timeline();
    const n = (tl && tl.beatsPerBar) || 4;
    const mine = new Set(this.highlight() || []);
    if (n !== this.count) {
      this.count = n;
      this.cells = [];
      const row = [];
      for (let i = 0; i < n; i++) {
        const cell = h('div', { class: 'beat-cell', dataset: { beat: String(i) } }, String(i + 1));
        this.cells.push(cell);
        row.push(cell);
      }
      this.container.replaceChildren(...row);
    }
    this.cells.forEach((c, i) => c.classList.toggle('mine', mine.has(i)));
  }

  frame() {
    this.raf = requestAnimationFrame(this.frame);
    const c = this.classroom;
    if (c.state === 'closed') return;
    let beats = [];
    try {
      beats = c.beatsAhead(120) || [];
    } catch {
      beats = [];
    }
    for (const b of beats) {
      const key = `${b.index}@${b.serverTime}`;
      if (!this.pending.has(key)) this.pending.set(key, b);
    }
    const now = performance.now();
    for (const [key, b] of this.pending) {
      const local = c.localTimeOf(b.serverTime) ?? b.localTime;
      if (local <= now) {
        this.pending.delete(key);
        if (now - local < 150) this.light(b);
      }
    }
  }

  light(b) {
    if (b.beatInBar >= this.count) this.layout();
    this.cells.forEach((cell, i) => {
      cell.classList.toggle('lit', i === b.beatInBar);
      cell.classList.toggle('count-in', i === b.beatInBar && !!b.countIn);
    });
    clearTimeout(this.offTimer);
    this.offTimer = setTimeout(() => this.cells.forEach((cell) => cell.classList.remove('lit', 'count-in')), 140);
    if (b.beatInBar === 0) this.layout();
  }
}

/** Schedules a classmate's note: sound (when audio is on) and trace. */
export function scheduleNote(classroom, sound, trace, n) {
  let audioTime;
  if (sound) {
    audioTime = classroom.audioTimeOf(sound.ctx, n.playAt);
    if (audioTime !== undefined && audioTime !== null) sound.tone(audioTime, n.midi, n.velocity, n.instrument);
  }
  trace.notes.push({
    from: n.from,
    seq: n.seq,
    midi: n.midi,
    serverTime: n.serverTime,
    playAt: n.playAt,
    localTime: n.localTime,
    audioTime,
  });
  return audioTime;
}
