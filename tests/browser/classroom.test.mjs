// A whole class in headless Chromium: a teacher and three students (each in their own browser
// context), the real server, the real pages in web/ and the wasm client package.
//
// Run: (cd tests/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci) && node --test tests/browser/
// Env: DOWNBEAT_BIN (server binary, default target/debug/downbeat), CHROMIUM (default
// /usr/bin/chromium).
//
// The tests run in order and share one class: each one builds on the state the one before
// left (joined, started, tempo changed, ...).

import assert from 'node:assert/strict';
import { mkdir, readFile, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import {
  OUTPUT_DIR, joinClass, launchBrowser, measureClock, openTab, openUser, printDiagnostics, startBeat, startClass,
  startServer, waitUntil, withDiagnostics,
} from './harness.mjs';

const STUDENTS = ['Ana', 'Ben', 'Chloe'];
const TEACHER = 'Ms. Rivera';
const OLD_BPM = 120;
const NEW_BPM = 90;

let server = null;
let browser = null;
let teacher = null;
const students = {}; // name -> user { label, context, page, logs, memberId, truthOffset }
let code = null;
let startAck = null;

const allUsers = () => [teacher, ...Object.values(students)].filter(Boolean);
const studentUsers = () => STUDENTS.map((n) => students[n]);
const guarded = (body) => withDiagnostics(() => server, allUsers, body);
/** A Standard MIDI File's format and tracks: each track's name and note-ons (tick, key). */
function readMidi(bytes) {
  const text = (at, n) => String.fromCharCode(...bytes.subarray(at, at + n));
  assert.equal(text(0, 4), 'MThd', 'a MIDI header');
  const format = bytes.readUInt16BE(8);
  const count = bytes.readUInt16BE(10);
  const tracks = [];
  let at = 8 + bytes.readUInt32BE(4);
  for (let i = 0; i < count; i++) {
    assert.equal(text(at, 4), 'MTrk', `track ${i}`);
    const end = at + 8 + bytes.readUInt32BE(at + 4);
    const track = { name: '', notes: [] };
    let p = at + 8;
    let tick = 0;
    let status = 0;
    const varlen = () => {
      let v = 0;
      for (;;) {
        const b = bytes[p++];
        v = (v << 7) | (b & 0x7f);
        if (!(b & 0x80)) return v;
      }
    };
    while (p < end) {
      tick += varlen();
      if (bytes[p] & 0x80) status = bytes[p++];
      if (status === 0xff) {
        const type = bytes[p++];
        const len = varlen();
        if (type === 0x03) track.name = bytes.subarray(p, p + len).toString('utf8');
        p += len;
      } else if (status === 0xf0 || status === 0xf7) {
        p += varlen();
      } else {
        const kind = status & 0xf0;
        const data = kind === 0xc0 || kind === 0xd0 ? 1 : 2;
        if (kind === 0x90 && bytes[p + 1] > 0) track.notes.push({ tick, key: bytes[p] });
        p += data;
      }
    }
    tracks.push(track);
    at = end;
  }
  return { format, tracks };
}

const fmt = (x, digits = 3) => (typeof x === 'number' ? x.toFixed(digits) : String(x));

/**
 * Has `user` play `count` notes, each `offsetMs` from one of the next beats (count-in
 * excluded), scheduled on the page's synced clock; resolves with the notes played.
 */
async function playOnBeats(user, count, offsetMs) {
  return user.page.evaluate(async ({ count, offsetMs }) => {
    const c = window.downbeat.classroom;
    const taken = new Set();
    const plays = [];
    const deadline = performance.now() + 15_000;
    while (taken.size < count && performance.now() < deadline) {
      for (const b of c.beatsAhead(1_000)) {
        const wait = b.localTime + offsetMs - performance.now();
        if (taken.size >= count || taken.has(b.index) || b.countIn || wait < 50) continue;
        taken.add(b.index);
        plays.push(new Promise((resolve) => setTimeout(() => resolve(c.playNote(64, 90, 0)), wait)));
      }
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    return (await Promise.all(plays)).length;
  }, { count, offsetMs });
}

/** The timed notes the teacher's class share counts so far (from the server's feed). */
async function classTimed(teacherUser) {
  return teacherUser.page.evaluate(() => {
    const m = /of (\d+) timed notes/.exec(document.querySelector('[data-testid=class-share]')?.textContent ?? '');
    return m ? Number(m[1]) : 0;
  });
}

describe('a class in the browser', { timeout: 15 * 60_000 }, () => {
  before(async () => {
    server = await startServer();
    console.log(`server: ${server.base} (pid ${server.pid})`);
    browser = await launchBrowser();
    console.log(`browser: Chromium ${browser.version()}`);
  });

  after(async () => {
    if (browser) await browser.close().catch(() => {});
    if (server) await server.stop();
  });

  test('0. a teacher page opened without the teacher link cannot start a class', { timeout: 120_000 }, guarded(async () => {
    const stranger = await openUser(browser, `${server.base}/teacher`, 'stranger');
    try {
      await waitUntil(stranger, 'the start-class button to be enabled',
        () => !document.querySelector('[data-testid=start-class]').disabled);
      await stranger.page.getByTestId('start-class').click();
      const error = await waitUntil(stranger, 'the sign-in to be refused', () => {
        const el = document.querySelector('[data-testid=error]');
        return el && !el.hidden && el.textContent.includes('forbidden') ? el.textContent : false;
      });
      console.log(`without the teacher link: ${error.trim()}`);
      assert.match(error, /teacher link/);
      assert.equal(await stranger.page.evaluate(() => window.downbeat?.classroom ?? null), null);
    } finally {
      await stranger.context.close();
    }
  }));

  test('1. the teacher creates a room and three students join it by code', { timeout: 180_000 }, guarded(async () => {
    teacher = await openUser(browser, server.teacherPage(), 'teacher');
    // The teacher link's secret is kept for the tab and gone from the address bar.
    const kept = await teacher.page.evaluate(() => ({
      hash: location.hash,
      href: location.href,
      secret: sessionStorage.getItem('downbeat.demoTeacherSecret'),
    }));
    assert.equal(kept.hash, '');
    assert.ok(!kept.href.includes(server.teacherSecret), kept.href);
    assert.equal(kept.secret, server.teacherSecret);
    code = await startClass(teacher);
    console.log(`join code: ${code}`);
    assert.equal(await teacher.page.evaluate(() => window.downbeat.classroom.role), 'teacher');

    for (const name of STUDENTS) {
      const u = await openUser(browser, `${server.base}/student`, name);
      students[name] = u;
      await joinClass(u, code, name);
      u.memberId = await waitUntil(u, 'the classroom to connect', () => {
        const c = window.downbeat && window.downbeat.classroom;
        return c && c.state === 'connected' ? c.memberId : false;
      }, undefined, 60_000);
      assert.equal(await u.page.evaluate(() => window.downbeat.classroom.role), 'student');
    }

    // The teacher's grid: one card per student, each with the student's member id.
    await waitUntil(teacher, 'three student cards with every name', (names) => {
      const cards = [...document.querySelectorAll('[data-testid=member-card]')];
      return cards.length === names.length && names.every((n) => cards.some((c) => c.textContent.includes(n)));
    }, STUDENTS);
    const cards = await teacher.page.$$eval('[data-testid=member-card]', (els) =>
      els.map((e) => ({ id: Number(e.dataset.memberId), name: e.querySelector('.member-name')?.textContent })));
    for (const name of STUDENTS) {
      const card = cards.find((c) => c.name === name);
      assert.ok(card, `a card for ${name}`);
      assert.equal(card.id, students[name].memberId, `${name}'s card carries their member id`);
    }
    const teacherName = await teacher.page.getByTestId('teacher-name').textContent();
    assert.ok(teacherName.includes(TEACHER), `the teacher page names the teacher (${teacherName})`);

    // Every student sees all four names.
    for (const name of STUDENTS) {
      await waitUntil(students[name], 'presence with all four names', (all) => {
        const text = document.querySelector('[data-testid=presence]')?.textContent ?? '';
        return all.every((n) => text.includes(n));
      }, [TEACHER, ...STUDENTS]);
    }
    console.log(`joined: ${STUDENTS.map((n) => `${n}=#${students[n].memberId}`).join(' ')}`);
  }));

  test('2. clocks: each tab estimates the server clock within 1 ms and hears each beat at the same instant', { timeout: 180_000 }, guarded(async () => {
    for (const u of studentUsers()) {
      await waitUntil(u, 'classroom.synced()', () => window.downbeat.classroom.synced(), undefined, 60_000);
    }
    startAck = await startBeat(teacher);
    console.log(`start: epoch ${startAck.epoch}, beat ${startAck.effectiveBeat} at server ${fmt(startAck.effectiveAt)} ms`);

    // At least 12 beats after the start scheduled in every tab.
    for (const u of studentUsers()) {
      await waitUntil(u, '12 beats scheduled after the start', (at) =>
        window.downbeat.trace.beats.filter((b) => b.serverTime >= at).length >= 12, startAck.effectiveAt, 60_000);
    }

    // Clock truth (see measureClock): both brackets are computed and the narrower one is
    // asserted.
    let maxError = 0;
    for (const u of studentUsers()) {
      const { samples, fetchWidth, fetchLo, fetchHi, width, lo, hi, truthOffset } = await measureClock(u);
      assert.equal(samples, 40);
      u.truthOffset = truthOffset;
      const sync = await u.page.evaluate(() => window.downbeat.classroom.sync());
      console.log(`${u.label}: fetch bracket ${fmt(fetchWidth)} ms wide: error in [${fmt(fetchLo)}, ${fmt(fetchHi)}] ms; ` +
        `resource-timing bracket ${fmt(width)} ms wide: error in [${fmt(lo)}, ${fmt(hi)}] ms; ` +
        `truth offset ${fmt(u.truthOffset)} ms; client: rtt ${fmt(sync.rttMs)} ms, ±${fmt(sync.uncertaintyMs)} ms, ${sync.samples} samples`);
      assert.ok(Math.abs(lo) <= 1 && Math.abs(hi) <= 1,
        `${u.label}: the estimate's error [${fmt(lo)}, ${fmt(hi)}] ms lies within ±1 ms`);
      maxError = Math.max(maxError, Math.abs(lo), Math.abs(hi));
    }

    // Beat agreement on the true (server) clock.
    const traces = {};
    for (const u of studentUsers()) {
      traces[u.label] = await u.page.evaluate(() => window.downbeat.trace.beats);
    }
    const byIndex = (beats) => new Map(beats.filter((b) => b.serverTime >= startAck.effectiveAt).map((b) => [b.index, b]));
    const maps = studentUsers().map((u) => byIndex(traces[u.label]));
    const common = [...maps[0].keys()].filter((i) => maps.every((m) => m.has(i))).sort((x, y) => x - y);
    assert.ok(common.length >= 8, `at least 8 common beats after the start (got ${common.length})`);
    let maxSpread = 0;
    let maxAbs = 0;
    for (const index of common) {
      const beats = maps.map((m) => m.get(index));
      const serverTimes = new Set(beats.map((b) => b.serverTime));
      assert.equal(serverTimes.size, 1, `beat ${index} has one server instant in every tab`);
      const trueTimes = studentUsers().map((u, k) => beats[k].localTime + u.truthOffset);
      const spread = Math.max(...trueTimes) - Math.min(...trueTimes);
      maxSpread = Math.max(maxSpread, spread);
      for (const tt of trueTimes) maxAbs = Math.max(maxAbs, Math.abs(tt - beats[0].serverTime));
      assert.ok(spread <= 1, `beat ${index}: the tabs' true instants spread ${fmt(spread)} ms (≤ 1 ms)`);
    }
    for (const u of studentUsers()) {
      const n = traces[u.label].length;
      const dup = n - new Set(traces[u.label].map((b) => `${b.index}@${b.serverTime}`)).size;
      assert.equal(dup, 0, `${u.label}: every beat scheduled once`);
    }

    // Audio: audioTime against the context's own output timestamp (logged only; headless
    // audio output is a fake device).
    for (const u of studentUsers()) {
      const audio = await u.page.evaluate(() => {
        const ctx = window.downbeat.ctx;
        const ts = ctx.getOutputTimestamp ? ctx.getOutputTimestamp() : null;
        return {
          state: ctx.state,
          sampleRate: ctx.sampleRate,
          baseLatency: ctx.baseLatency,
          outputLatency: ctx.outputLatency,
          contextTime: ts ? ts.contextTime : null,
          performanceTime: ts ? ts.performanceTime : null,
        };
      });
      let maxDiff = null;
      if (audio.contextTime !== null && audio.performanceTime) {
        for (const b of traces[u.label]) {
          if (typeof b.audioTime !== 'number') continue;
          const predicted = audio.contextTime + (b.localTime - audio.performanceTime) / 1000;
          const diff = Math.abs(b.audioTime - predicted) * 1000;
          maxDiff = maxDiff === null ? diff : Math.max(maxDiff, diff);
        }
      }
      console.log(`${u.label}: audio ${audio.state}, ${audio.sampleRate} Hz, base latency ${fmt(audio.baseLatency * 1000)} ms, ` +
        `output latency ${fmt(audio.outputLatency * 1000)} ms; max |audioTime - output-timestamp prediction| = ${fmt(maxDiff)} ms`);
    }
    console.log(`CLOCK: max estimate error ${fmt(maxError)} ms; max spread of a beat across tabs ${fmt(maxSpread)} ms ` +
      `(${common.length} beats); max |true instant - beat's server time| ${fmt(maxAbs)} ms`);
  }));

  test('3. a tempo change takes effect on the same beat in every tab', { timeout: 180_000 }, guarded(async () => {
    assert.ok(startAck, 'the class was started');
    const prev = await teacher.page.evaluate(() => window.downbeat.lastApplied);
    await teacher.page.getByTestId('tempo-input').fill(String(NEW_BPM));
    await teacher.page.getByTestId('tempo-apply').click();
    const ack = await waitUntil(teacher, 'the tempo acknowledgement', (prevEpoch) => {
      const a = window.downbeat.lastApplied;
      return a && a.op === 'tempo' && a.epoch !== prevEpoch ? a : false;
    }, prev.epoch);
    const E = ack.effectiveBeat;
    console.log(`tempo ${NEW_BPM}: epoch ${ack.epoch}, from beat ${E} at server ${fmt(ack.effectiveAt)} ms`);

    const oldInterval = 60_000 / OLD_BPM;
    const newInterval = 60_000 / NEW_BPM;
    const instants = [];
    for (const u of studentUsers()) {
      await waitUntil(u, `beats up to ${E + 4} scheduled`, (last) =>
        window.downbeat.trace.beats.some((b) => b.index >= last), E + 4, 60_000);
      const beats = await u.page.evaluate(() => window.downbeat.trace.beats);
      const since = beats.filter((b) => b.serverTime >= startAck.effectiveAt).sort((x, y) => x.index - y.index);
      let oldPairs = 0;
      let newPairs = 0;
      for (let k = 1; k < since.length; k++) {
        const [p, q] = [since[k - 1], since[k]];
        if (q.index !== p.index + 1) continue;
        const interval = q.serverTime - p.serverTime;
        if (q.index <= E) {
          oldPairs++;
          assert.ok(Math.abs(interval - oldInterval) <= 0.01,
            `${u.label}: beats ${p.index}→${q.index} (before ${E}) are ${fmt(interval)} ms apart, expected ${fmt(oldInterval)}`);
        } else {
          newPairs++;
          assert.ok(Math.abs(interval - newInterval) <= 0.01,
            `${u.label}: beats ${p.index}→${q.index} (from ${E}) are ${fmt(interval)} ms apart, expected ${fmt(newInterval)}`);
        }
      }
      assert.ok(oldPairs >= 3, `${u.label}: at least 3 beat intervals before the change (got ${oldPairs})`);
      assert.ok(newPairs >= 3, `${u.label}: at least 3 beat intervals after the change (got ${newPairs})`);
      const beatE = since.find((b) => b.index === E);
      assert.ok(beatE, `${u.label} scheduled beat ${E}`);
      instants.push(beatE.serverTime);
      console.log(`${u.label}: beat ${E} at server ${fmt(beatE.serverTime, 6)} ms; ${oldPairs} old and ${newPairs} new intervals checked`);
    }
    assert.equal(new Set(instants).size, 1, `every tab puts beat ${E} at the same server instant (${instants.join(', ')})`);
    assert.ok(Math.abs(instants[0] - ack.effectiveAt) < 0.001,
      `beat ${E} sounds at the acknowledged instant (${fmt(instants[0], 6)} vs ${fmt(ack.effectiveAt, 6)})`);
    await waitUntil(teacher, 'the teacher page to show the new tempo', (bpm) =>
      (document.querySelector('[data-testid=timeline-info]')?.textContent ?? '').includes(`${bpm} beats per minute`), NEW_BPM);
  }));

  test('4. notes sound at the same instant everywhere; a muted student is heard by nobody', { timeout: 180_000 }, guarded(async () => {
    const [ana, ben, chloe] = studentUsers();
    for (const u of [ana, ben, chloe]) assert.equal(typeof u.truthOffset, 'number', `${u.label} has a measured clock`);

    // Ana plays.
    const anaBefore = await ana.page.evaluate(() => window.downbeat.trace.played.length);
    await ana.page.getByTestId('pad-0').click();
    const played = await waitUntil(ana, 'her note in trace.played', (n) => {
      const p = window.downbeat.trace.played;
      return p.length > n ? p[p.length - 1] : false;
    }, anaBefore);
    const heard = {};
    for (const u of [ben, chloe]) {
      heard[u.label] = await waitUntil(u, `Ana's note #${played.seq}`, ({ from, seq }) =>
        window.downbeat.trace.notes.find((n) => n.from === from && n.seq === seq) ?? false,
      { from: ana.memberId, seq: played.seq });
    }
    assert.equal(heard.Ben.playAt, heard.Chloe.playAt, 'Ben and Chloe sound it at the same server instant');
    assert.ok(Math.abs(heard.Ben.playAt - played.playAt) < 0.001, `the receivers' playAt ${heard.Ben.playAt} is Ana's ${played.playAt}`);
    assert.equal(heard.Ben.midi, played.midi);
    const trueTimes = [
      played.localTime + ana.truthOffset,
      heard.Ben.localTime + ben.truthOffset,
      heard.Chloe.localTime + chloe.truthOffset,
    ];
    const spread = Math.max(...trueTimes) - Math.min(...trueTimes);
    console.log(`NOTE: Ana's note #${played.seq} playAt ${fmt(played.playAt)} ms; true instants ` +
      `${trueTimes.map((t) => fmt(t - played.playAt)).join(' / ')} ms from playAt (Ana/Ben/Chloe); spread ${fmt(spread)} ms`);
    assert.ok(spread <= 1, `Ana, Ben and Chloe sound the note within 1 ms (spread ${fmt(spread)} ms)`);

    // The teacher mutes Ben from his card.
    const card = teacher.page.locator(`[data-testid=member-card][data-member-id="${ben.memberId}"]`);
    await card.getByTestId('mute-toggle').click();
    await ben.page.getByTestId('muted-banner').waitFor({ state: 'visible' });
    await waitUntil(ben, 'the pads to be disabled', () => document.querySelector('[data-testid=pad-0]').disabled);
    await waitUntil(teacher, "Ben's card to show muted", (id) =>
      document.querySelector(`[data-testid=member-card][data-member-id="${id}"] [data-testid=mute-toggle]`)
        ?.getAttribute('aria-pressed') === 'true', ben.memberId);
    for (const u of [ana, chloe]) {
      await waitUntil(u, 'Ben shown muted in presence', (id) =>
        !!document.querySelector(`[data-testid=presence] [data-member-id="${id}"].muted`), ben.memberId);
    }

    // Ben tries anyway: the key (the page ignores it) and then the client directly (the
    // server must drop it).
    await ben.page.keyboard.press('a');
    const benPlayed = await ben.page.evaluate(() => window.downbeat.trace.played.length);
    assert.equal(benPlayed, 0, 'a muted page plays nothing from its keys');
    const attempt = await ben.page.evaluate(() => {
      try {
        const n = window.downbeat.classroom.playNote(62, 100, 0);
        return { sent: true, seq: n.seq };
      } catch (e) {
        return { sent: false, code: e.code ?? String(e) };
      }
    });
    console.log(`muted Ben's direct playNote: ${JSON.stringify(attempt)}`);

    // A later note from Chloe reaches Ana (and the teacher): Ben's would have come first.
    await chloe.page.getByTestId('pad-1').click();
    const chloePlayed = await waitUntil(chloe, 'her note in trace.played', () => {
      const p = window.downbeat.trace.played;
      return p.length > 0 ? p[p.length - 1] : false;
    });
    for (const u of [ana, teacher]) {
      await waitUntil(u, `Chloe's note #${chloePlayed.seq}`, ({ from, seq }) =>
        window.downbeat.trace.notes.some((n) => n.from === from && n.seq === seq),
      { from: chloe.memberId, seq: chloePlayed.seq });
    }
    for (const u of [ana, chloe, teacher]) {
      const fromBen = await u.page.evaluate((id) => window.downbeat.trace.notes.filter((n) => n.from === id), ben.memberId);
      assert.deepEqual(fromBen, [], `${u.label} received no note from muted Ben`);
    }

    // Unmuted again, Ben can play.
    await card.getByTestId('mute-toggle').click();
    await ben.page.getByTestId('muted-banner').waitFor({ state: 'hidden' });
    await waitUntil(ben, 'the pads to be enabled', () => !document.querySelector('[data-testid=pad-0]').disabled);
  }));

  test('5. SEL: a prompt reaches Chloe, her reflection reaches the teacher', { timeout: 120_000 }, guarded(async () => {
    const chloe = students.Chloe;
    const prompt = 'How did you help your group today?';
    const answer = 'I counted the beats out loud for Ben';
    await teacher.page.getByTestId('prompt-input').fill(prompt);
    await teacher.page.getByTestId('prompt-send').click();
    await waitUntil(chloe, 'the prompt', (p) => document.querySelector('[data-testid=prompt-text]')?.textContent === p, prompt);
    await chloe.page.getByTestId('mood-4').click();
    await chloe.page.getByTestId('reflection-text').fill(answer);
    await chloe.page.getByTestId('reflection-send').click();
    await chloe.page.getByText('Thank you').waitFor({ state: 'visible' });
    const item = teacher.page.getByTestId('sel-feed').getByTestId('reflection-item')
      .filter({ hasText: 'Chloe' }).filter({ hasText: answer });
    await item.first().waitFor({ state: 'visible' });
    const text = await item.first().textContent();
    assert.ok(text.includes('😄'), `the reflection shows Chloe's mood (${text})`);
    console.log(`reflection in the teacher's feed: ${text.replace(/\s+/g, ' ').trim()}`);

    // Participation from the notes played in test 4 reaches the teacher's feed and cards.
    const ana = students.Ana;
    const row = await waitUntil(teacher, "Ana's participation row", (id) => {
      const tr = document.querySelector(`[data-testid=sel-feed] [data-testid=participation-row][data-member-id="${id}"]`);
      return tr ? [...tr.children].map((td) => td.textContent.trim()).join(' | ') : false;
    }, ana.memberId);
    assert.ok(row.includes('Ana'), `the participation row names Ana (${row})`);
    const stats = await teacher.page.locator(`[data-testid=member-card][data-member-id="${ana.memberId}"] [data-testid=member-stats]`).textContent();
    assert.match(stats, /[1-9]\d* notes?/, `Ana's card counts her notes (${stats})`);
    console.log(`participation row: ${row}; Ana's card: ${stats}`);
  }));

  test('5b. the teacher assigns Ana a part; her page and everyone\'s presence show it', { timeout: 120_000 }, guarded(async () => {
    const ana = students.Ana;
    const card = teacher.page.locator(`[data-testid=member-card][data-member-id="${ana.memberId}"]`);
    await card.locator('summary').click();
    await card.getByTestId('part-input').fill('drums');
    await card.getByTestId('assign-beat-0').check();
    await card.getByTestId('assign-beat-2').check();
    await card.getByTestId('assign-apply').click();
    const mine = await waitUntil(ana, 'her part on her page', () => {
      const t = document.querySelector('[data-testid=my-part]')?.textContent ?? '';
      return t.includes('drums') ? t : false;
    });
    console.log(`Ana's page: ${mine}`);
    assert.match(mine, /beats 1 and 3/);
    // Every page's presence (the package's members()) agrees on the assignment.
    for (const u of [teacher, students.Ben, students.Chloe, ana]) {
      const seen = await waitUntil(u, 'Ana\'s assignment in members()', (id) => {
        const m = window.downbeat.classroom.members().find((x) => x.id === id);
        return m && m.part === 'drums' ? { part: m.part, beats: m.beats } : false;
      }, ana.memberId);
      assert.deepEqual(seen, { part: 'drums', beats: [0, 2] }, `${u.label} sees Ana's part`);
    }
    await waitUntil(teacher, 'the card to show the part', (id) =>
      document.querySelector(`[data-testid=member-card][data-member-id="${id}"] [data-testid=member-part]`)
        ?.textContent.includes('drums'), ana.memberId);
  }));

  test('5c. the teacher records: every tab shows it, and the take downloads as a MIDI file', { timeout: 120_000 }, guarded(async () => {
    const ana = students.Ana;
    await teacher.page.getByTestId('record').click();
    for (const u of studentUsers()) {
      await u.page.getByTestId('recording-badge').waitFor({ state: 'visible' });
    }
    await teacher.page.getByTestId('recording-state').filter({ hasText: 'Recording take 1' }).waitFor();
    // Ana (on drums since 5b) plays three notes; the teacher hears all three.
    const heardBefore = await teacher.page.evaluate((id) => window.downbeat.trace.notes.filter((n) => n.from === id).length, ana.memberId);
    const playedBefore = await ana.page.evaluate(() => window.downbeat.trace.played.length);
    for (const pad of ['pad-0', 'pad-2', 'pad-4']) await ana.page.getByTestId(pad).click();
    const playedKeys = await waitUntil(ana, 'her three notes in trace.played', (n) => {
      const p = window.downbeat.trace.played;
      return p.length >= n + 3 ? p.slice(n, n + 3).map((x) => x.midi) : false;
    }, playedBefore);
    await waitUntil(teacher, "Ana's three notes", ({ id, n }) =>
      window.downbeat.trace.notes.filter((x) => x.from === id).length >= n, { id: ana.memberId, n: heardBefore + 3 });
    await teacher.page.getByTestId('record-stop').click();
    for (const u of studentUsers()) {
      await u.page.getByTestId('recording-badge').waitFor({ state: 'hidden' });
    }
    const item = teacher.page.getByTestId('recording-item').filter({ hasText: 'Take 1 · 3 notes' });
    await item.waitFor({ state: 'visible' });
    const [download] = await Promise.all([
      teacher.page.waitForEvent('download'),
      item.getByTestId('recording-download').click(),
    ]);
    const bytes = await readFile(await download.path());
    await mkdir(OUTPUT_DIR, { recursive: true });
    await writeFile(path.join(OUTPUT_DIR, 'take-1.mid'), bytes);
    const midi = readMidi(bytes);
    console.log(`take 1: ${download.suggestedFilename()}, ${bytes.length} bytes, tracks ${JSON.stringify(midi.tracks.map((t) => [t.name, t.notes.length]))}`);
    assert.equal(midi.format, 1, 'a format 1 Standard MIDI File');
    assert.deepEqual(midi.tracks.map((t) => [t.name, t.notes.length]), [['tempo and meter', 0], ['drums', 3]],
      "a tempo track, and Ana's notes in her part's track (named by the part, not by her)");
    assert.deepEqual(midi.tracks[1].notes.map((n) => n.key), playedKeys, 'the pitches Ana played, in order');
    assert.ok(midi.tracks[1].notes.every((n, i, all) => i === 0 || n.tick >= all[i - 1].tick), 'notes in time order');

    // Played back: every tab (the teacher's and the three students') hears Ana's three
    // notes, each at one true instant.
    await item.getByTestId('recording-play').click();
    for (const u of studentUsers()) await u.page.getByTestId('playback-badge').waitFor({ state: 'visible' });
    const heard = {};
    for (const u of allUsers()) {
      heard[u.label] = await waitUntil(u, 'the three played-back notes', () => {
        const back = window.downbeat.trace.notes.filter((n) => n.from === 0);
        return back.length >= 3 ? back.slice(0, 3).map((n) => ({ midi: n.midi, playAt: n.playAt, localTime: n.localTime })) : false;
      });
    }
    for (let i = 0; i < 3; i++) {
      // True instants from the students' measured clocks (test 2); the teacher's tab agrees on playAt.
      const trueTimes = studentUsers().map((u) => heard[u.label][i].localTime + u.truthOffset);
      const spread = Math.max(...trueTimes) - Math.min(...trueTimes);
      console.log(`PLAYBACK: note ${i + 1} (midi ${heard[teacher.label][i].midi}) true instants spread ${fmt(spread)} ms over ${trueTimes.length} tabs`);
      assert.ok(spread <= 1, `every tab sounds played-back note ${i + 1} within 1 ms (spread ${fmt(spread)} ms)`);
      for (const u of allUsers()) {
        assert.equal(heard[u.label][i].midi, playedKeys[i], `${u.label} hears Ana's pitch`);
        assert.equal(heard[u.label][i].playAt, heard[teacher.label][i].playAt, `${u.label} schedules it at the same server instant`);
      }
    }
    for (const u of studentUsers()) await u.page.getByTestId('playback-badge').waitFor({ state: 'hidden', timeout: 30_000 });
  }));

  test('6. screenshots of the running class', { timeout: 60_000 }, guarded(async () => {
    await mkdir(OUTPUT_DIR, { recursive: true });
    const teacherPng = path.join(OUTPUT_DIR, 'teacher.png');
    const studentPng = path.join(OUTPUT_DIR, 'student.png');
    // A student's card shows participation once the server has counted notes.
    await students.Ana.page.getByTestId('pad-2').click();
    // The teacher's pictures: Ana's card shows her recent notes against the beat (a dot per
    // note the teacher heard from her, up to 16), and the class's on-beat share from the
    // server's counts.
    const strip = await waitUntil(teacher, "Ana's timing strip", (id) => {
      const heard = window.downbeat.trace.notes.filter((n) => n.from === id).length;
      const el = document.querySelector(`[data-testid=member-card][data-member-id="${id}"] [data-testid=timing-strip]`);
      const dots = el ? el.querySelectorAll('circle').length : 0;
      return heard >= 4 && dots === Math.min(16, heard) ? { dots, label: el.getAttribute('aria-label') } : false;
    }, students.Ana.memberId);
    console.log(`Ana's timing strip: ${strip.dots} dots; "${strip.label}"`);
    assert.match(strip.label, /^Last \d+ notes: \d+ on the beat, on average /);
    const share = await waitUntil(teacher, 'the class on-beat share', () => {
      const t = document.querySelector('[data-testid=class-share]')?.textContent ?? '';
      return /Class on the beat: \d+% of [1-9]\d* timed notes/.test(t) ? t.trim() : false;
    });
    console.log(`class share: ${share}`);
    await teacher.page.locator('[data-testid=member-card]').first().scrollIntoViewIfNeeded();
    await teacher.page.screenshot({ path: teacherPng, fullPage: true });
    await students.Ana.page.screenshot({ path: studentPng, fullPage: true });
    for (const p of [teacherPng, studentPng]) assert.ok((await stat(p)).size > 10_000, `${p} is a real image`);
    console.log(`screenshots: ${teacherPng} ${studentPng}`);
  }));

  test('6b. past sessions: the teacher charts this class\'s session so far', { timeout: 60_000 }, guarded(async () => {
    await mkdir(OUTPUT_DIR, { recursive: true });
    const png = path.join(OUTPUT_DIR, 'teacher-past-session.png');
    // Two bursts on the beat some seconds apart (Chloe a little early, Ana a little late the
    // second time), counted by the server before the chart is opened.
    const before = await classTimed(teacher);
    const bursts = [[['Ana', 4, 0], ['Chloe', 4, -25]], [['Ana', 3, 30], ['Chloe', 3, 0]]];
    let played = 0;
    for (const [i, burst] of bursts.entries()) {
      if (i > 0) await new Promise((resolve) => setTimeout(resolve, 6_000));
      const counts = await Promise.all(burst.map(([name, n, offset]) => playOnBeats(students[name], n, offset)));
      played += counts.reduce((a, b) => a + b, 0);
    }
    assert.equal(played, 14, 'every planned note was played');
    await waitUntil(teacher, 'the server to count the notes', (want) => {
      const m = /of (\d+) timed notes/.exec(document.querySelector('[data-testid=class-share]')?.textContent ?? '');
      return m && Number(m[1]) >= want;
    }, before + played);
    await teacher.page.getByTestId('past-load').click();
    // This class is the teacher's only session: listed first, still open.
    const choice = teacher.page.getByTestId('past-session').first();
    await choice.waitFor({ state: 'visible' });
    const label = await choice.textContent();
    console.log(`past session: ${label}`);
    assert.match(label, /this class, still open · 3 children · \d+ notes/);
    await choice.click();
    const chart = await waitUntil(teacher, 'the session chart', () => {
      const data = window.downbeat.pastSession;
      const box = document.querySelector('[data-testid=past-chart]');
      if (!data || !box || box.hidden) return false;
      const svg = box.querySelector('[data-testid=past-chart-svg]');
      const buckets = data.timeline.buckets;
      const students = data.students.filter((s) => s.participation.timed > 0);
      return {
        bars: svg.querySelectorAll('[data-testid=past-chart-bar]').length,
        withNotes: buckets.filter((b) => b.participation.timed > 0).length,
        buckets: buckets.length,
        bucketMs: data.timeline.bucket_ms,
        timedInBuckets: buckets.reduce((n, b) => n + b.participation.timed, 0),
        timedByStudents: students.reduce((n, s) => n + s.participation.timed, 0),
        studentsPlaying: students.length,
        best: Math.max(...buckets.map((b) => b.participation.on_beat_ratio ?? 0)),
        role: svg.getAttribute('role'),
        alt: svg.getAttribute('aria-label') ?? '',
        caption: box.querySelector('[data-testid=past-chart-caption]').textContent,
        tableRows: box.querySelectorAll('[data-testid=past-chart-table] tbody tr').length,
        childBars: [...box.querySelectorAll('[data-testid=past-student-bar]')].map((b) => b.getAttribute('aria-label')),
      };
    });
    console.log(`past session chart: ${JSON.stringify(chart)}`);
    assert.ok(chart.withNotes >= 2, 'the class played with the beat in more than one stretch');
    assert.ok(chart.best >= 0.5, `the bursts on the beat show (best stretch ${chart.best})`);
    assert.equal(chart.bars, chart.withNotes, 'one bar per stretch with timed notes');
    assert.equal(chart.tableRows, chart.buckets, 'one table row per stretch');
    assert.equal(chart.timedInBuckets, chart.timedByStudents, "the stretches hold every child's timed notes");
    assert.equal(chart.role, 'img');
    assert.match(chart.alt, /^The class played on the beat \d+% of the time \(\d+ timed notes\)/, 'a text alternative');
    assert.equal(chart.caption, chart.alt, 'the caption says what the chart shows');
    assert.equal(chart.childBars.length, 3, 'a bar for each child who joined');
    assert.equal(chart.studentsPlaying >= 1, true);
    for (const alt of chart.childBars) assert.match(alt, /: (\d+% on the beat · .+|did not play|no notes while the beat played)$/);
    const panel = teacher.page.getByTestId('past-panel');
    await panel.scrollIntoViewIfNeeded();
    await panel.screenshot({ path: png });
    assert.ok((await stat(png)).size > 10_000, `${png} is a real image`);
    console.log(`screenshot: ${png}`);
  }));

  test('6c. the operators\' inspector shows the room, its sessions and live counters; a test note reaches every tab', { timeout: 120_000 }, guarded(async () => {
    assert.ok(server.operatorToken, 'the demo banner links the inspector with an operator token');
    const ops = await openUser(browser, `${server.base}/inspect#token=${server.operatorToken}`, 'operator');
    try {
      // The room with its four sessions (the teacher and three students), by member id only.
      const plain = (c) => c.replace(/-/g, '');
      const rows = await waitUntil(ops, 'the room and its four sessions', (code) => {
        const card = [...document.querySelectorAll('[data-testid=room]')].find((el) => el.dataset.code.replace(/-/g, '') === code);
        const rows = card ? [...card.querySelectorAll('[data-testid=session-row]')] : [];
        return rows.length === 4 && rows.every((r) => r.dataset.sessionId) ? rows.map((r) => r.innerText.replace(/\s+/g, ' ')) : false;
      }, plain(code));
      console.log(`inspector rows:\n  ${rows.join('\n  ')}`);
      assert.ok(rows.every((r) => / webtransport /.test(r)), 'every session shows its transport');
      const text = await ops.page.evaluate(() => document.body.innerText);
      for (const name of [...STUDENTS, TEACHER]) assert.ok(!text.includes(name), `the inspector shows no name (${name})`);
      // Live counters: the datagrams sent grow from one refresh to the next.
      const counter = () => Number(document.querySelector('[data-metric=downbeat_datagrams_sent_total] td')?.textContent) || false;
      const first = await waitUntil(ops, 'the datagram counter', counter);
      const later = await waitUntil(ops, 'the datagram counter to grow', (n) => {
        const v = Number(document.querySelector('[data-metric=downbeat_datagrams_sent_total] td')?.textContent);
        return v > n ? v : false;
      }, first);
      console.log(`datagrams sent: ${first} then ${later}`);

      // Observing the room, then a test note: every tab schedules it at one instant.
      const room = ops.page.locator(`[data-testid=room][data-code="${code}"]`);
      await room.getByTestId('observe').click();
      await waitUntil(ops, "the observer's first event", () => !!document.querySelector('[data-testid=events] [data-event=observing]'));
      await room.getByTestId('test-note-midi').fill('67');
      await room.getByTestId('test-note').click();
      const heard = {};
      for (const u of allUsers()) {
        heard[u.label] = await waitUntil(u, 'the test note', () =>
          window.downbeat.trace.notes.find((n) => n.from === Number.MAX_SAFE_INTEGER && n.midi === 67) ?? false);
      }
      const playAts = Object.values(heard).map((n) => n.playAt);
      assert.ok(playAts.every((p) => p === playAts[0]), `one playAt everywhere: ${playAts.join(', ')}`);
      const trueTimes = studentUsers().map((u) => heard[u.label].localTime + u.truthOffset);
      const spread = Math.max(...trueTimes) - Math.min(...trueTimes);
      console.log(`TEST NOTE: playAt ${fmt(playAts[0])} ms; true instants ${trueTimes.map((t) => fmt(t - playAts[0])).join(' / ')} ms from playAt (Ana/Ben/Chloe); spread ${fmt(spread)} ms`);
      assert.ok(spread <= 1, `the tabs sound the test note within 1 ms (spread ${fmt(spread)} ms)`);
      await waitUntil(ops, 'the test note in the observed events', () =>
        [...document.querySelectorAll('[data-testid=events] [data-event=notes]')].some((li) => li.textContent.includes('the test: 67')));
      await waitUntil(ops, 'the audit log to show the observation and the test note', () => {
        const rows = [...document.querySelectorAll('[data-testid=audit-row]')];
        return ['observe', 'test_note'].every((a) => rows.some((r) => r.dataset.action === a && r.dataset.outcome === 'ok'));
      });
      await mkdir(OUTPUT_DIR, { recursive: true });
      const png = path.join(OUTPUT_DIR, 'inspector.png');
      await ops.page.screenshot({ path: png, fullPage: true });
      assert.ok((await stat(png)).size > 10_000, `${png} is a real image`);
      console.log(`screenshot: ${png}`);
    } finally {
      await ops.context.close();
    }
  }));

  test('7. sign-in from a #token= fragment; a wrong code shows its error code', { timeout: 120_000 }, guarded(async () => {
    const res = await fetch(`${server.base}/api/demo/tokens`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ role: 'student', name: 'Dana' }),
    });
    assert.equal(res.status, 200, 'the demo server mints a student token');
    const { token } = await res.json();
    const dana = await openUser(browser, `${server.base}/student#token=${token}`, 'Dana');
    students.Dana = dana;
    await waitUntil(dana, 'the join button to be enabled', () => !document.querySelector('[data-testid=join]').disabled);
    const page = await dana.page.evaluate(() => ({
      hash: location.hash,
      stored: Object.keys(sessionStorage).length,
      nameHidden: document.querySelector('[data-testid=name-input]').closest('[hidden]') !== null,
      greeting: document.querySelector('#known-row')?.textContent ?? '',
    }));
    assert.equal(page.hash, '', 'the token is cleared from the address bar');
    assert.equal(page.stored, 1, 'the token is kept in sessionStorage');
    assert.ok(page.nameHidden, 'no name is asked for with a token');
    assert.ok(page.greeting.includes('Dana'), `the page greets Dana (${page.greeting.trim()})`);

    // A code that names no room: the page says so, with the stable code.
    await dana.page.getByTestId('code-input').fill('ZZZZ-ZZZZ');
    await dana.page.getByTestId('join').click();
    const error = await waitUntil(dana, 'the join error', () => {
      const e = document.querySelector('[data-testid=error]');
      return e && !e.hidden && e.textContent.trim() ? e.textContent.trim() : false;
    });
    assert.ok(error.includes('room_not_found'), `the error names its code (${error})`);
    console.log(`wrong code: ${error}`);

    await dana.page.getByTestId('code-input').fill(code.toLowerCase());
    await dana.page.getByTestId('join').click();
    dana.memberId = await waitUntil(dana, 'the classroom to connect', () => {
      const c = window.downbeat && window.downbeat.classroom;
      return c && c.state === 'connected' ? c.memberId : false;
    }, undefined, 60_000);
    await waitUntil(teacher, "Dana's card", (id) =>
      !!document.querySelector(`[data-testid=member-card][data-member-id="${id}"]`), dana.memberId);
  }));

  test('8. the teacher reloads the page mid-class and rejoins by the remembered code; a wrong code or another teacher is refused; a second tab takes the same seat over', { timeout: 120_000 }, guarded(async () => {
    const plain = code.replace('-', '');
    const before = await teacher.page.evaluate(() => ({
      memberId: window.downbeat.classroom.memberId,
      remembered: sessionStorage.getItem('downbeat.teacher.class'),
      token: sessionStorage.getItem('downbeat.token.teacher'),
    }));
    assert.equal(before.remembered, plain, 'the tab remembers the class it teaches');
    const cardsBefore = await teacher.page.evaluate(() => [...document.querySelectorAll('[data-testid=member-card]')]
      .map((e) => Number(e.dataset.memberId)).sort((a, b) => a - b));

    const reloaded = Date.now();
    const logsBefore = teacher.logs.length;
    await teacher.page.reload();
    await waitUntil(teacher, 'the rejoin button to be enabled', () => !document.querySelector('[data-testid=rejoin]').disabled);
    const offered = await teacher.page.evaluate(() => ({
      code: document.querySelector('[data-testid=rejoin-code]').value,
      hint: document.querySelector('[data-testid=rejoin-hint]').hidden ? null : document.querySelector('[data-testid=rejoin-hint]').textContent,
      focused: document.activeElement?.dataset.testid ?? null,
      classroom: window.downbeat.classroom,
    }));
    console.log(`after the reload: rejoin code "${offered.code}", hint "${offered.hint}"`);
    assert.equal(offered.code, code, 'the rejoin field holds the class this tab was teaching');
    assert.ok(offered.hint && offered.hint.includes(code), 'the page says which class this tab was teaching');
    assert.equal(offered.focused, 'rejoin-code', 'the rejoin field has the focus (Enter rejoins)');
    assert.equal(offered.classroom, null, 'nothing is joined before the teacher asks');

    // A code that names no class: refused with its code; both buttons work again.
    await teacher.page.getByTestId('rejoin-code').fill('ZZZZ-ZZZZ');
    await teacher.page.getByTestId('rejoin').click();
    const wrong = await waitUntil(teacher, 'the rejoin error', () => {
      const e = document.querySelector('[data-testid=error]');
      return e && !e.hidden && e.textContent.trim() ? e.textContent.trim() : false;
    });
    console.log(`rejoin with a wrong code: ${wrong}`);
    assert.ok(wrong.includes('room_not_found'), `the error names its code (${wrong})`);
    assert.equal(await teacher.page.evaluate(() => window.downbeat.classroom), null);
    assert.equal(await teacher.page.getByTestId('rejoin').isDisabled(), false, 'the rejoin button works again');
    assert.equal(await teacher.page.getByTestId('start-class').isDisabled(), false, 'so does Start class');

    // The right code (as typed: any case), and Enter in the field.
    await teacher.page.getByTestId('rejoin-code').fill(code.toLowerCase());
    await teacher.page.getByTestId('rejoin-code').press('Enter');
    const inClass = () => {
      const shown = document.querySelector('[data-testid=join-code]')?.textContent?.trim() ?? '';
      const c = window.downbeat.classroom;
      return c && c.state === 'connected' && shown && !document.querySelector('#class').hidden
        ? { shown, memberId: c.memberId, role: c.role, code: c.code, teachers: c.members().filter((m) => m.role === 'teacher').map((m) => m.id) }
        : false;
    };
    const back = await waitUntil(teacher, 'the class view with the join code', inClass, undefined, 60_000);
    console.log(`rejoined ${back.shown} as member ${back.memberId} (was ${before.memberId}), ${Date.now() - reloaded} ms after the reload`);
    assert.equal(back.shown, code, 'the class view shows the same code');
    assert.equal(back.code, plain);
    assert.equal(back.role, 'teacher');
    // The reload closed the old page's session, which the server counts as leaving: the seat is
    // a new one, and the old one is gone (one teacher in the class, no ghost).
    assert.deepEqual(back.teachers, [back.memberId], 'the class has one teacher: this page');
    assert.equal(await teacher.page.evaluate(() => document.querySelector('[data-testid=error]').hidden), true,
      "the wrong code's error is gone");
    const teacherName = await teacher.page.getByTestId('teacher-name').textContent();
    assert.equal(teacherName.trim(), TEACHER);
    await waitUntil(students.Ana, 'the teacher in her presence list once', (name) =>
      (document.querySelector('[data-testid=presence]')?.textContent ?? '').split(name).length === 2, TEACHER);
    // The same students' cards, and the controls work: a tempo change reaches the students.
    await waitUntil(teacher, 'the same student cards', (ids) => JSON.stringify([...document.querySelectorAll('[data-testid=member-card]')]
      .map((e) => Number(e.dataset.memberId)).sort((a, b) => a - b)) === JSON.stringify(ids), cardsBefore);
    await teacher.page.getByTestId('tempo-input').fill(String(OLD_BPM));
    await teacher.page.getByTestId('tempo-apply').click();
    const ack = await waitUntil(teacher, 'the tempo acknowledgement', (bpm) => {
      const a = window.downbeat.lastApplied;
      return a && a.op === 'tempo' && a.value === bpm ? a : false;
    }, OLD_BPM);
    await waitUntil(students.Ana, `Ana's page at ${OLD_BPM} BPM`, (bpm) => window.downbeat.classroom.timeline()?.tempoBpm === bpm,
      OLD_BPM, 30_000);
    console.log(`tempo ${OLD_BPM} from the rejoined page: epoch ${ack.epoch}, beat ${ack.effectiveBeat}`);
    const errors = teacher.logs.slice(logsBefore).filter((l) => l.includes('pageerror'));
    assert.deepEqual(errors, [], 'no uncaught error on the reloaded page');

    // Another teacher of the school with the code is not this class's teacher.
    const res = await fetch(`${server.base}/api/demo/tokens`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ role: 'teacher', name: 'Mr. Okafor', secret: server.teacherSecret }),
    });
    assert.equal(res.status, 200, 'the demo server mints another teacher token');
    const other = await openUser(browser, `${server.base}/teacher?code=${code}#token=${(await res.json()).token}`, 'other teacher');
    try {
      await waitUntil(other, 'the rejoin button to be enabled', () => !document.querySelector('[data-testid=rejoin]').disabled);
      const filled = await other.page.evaluate(() => ({
        code: document.querySelector('[data-testid=rejoin-code]').value,
        hint: document.querySelector('[data-testid=rejoin-hint]').hidden,
      }));
      assert.deepEqual(filled, { code, hint: true }, '?code= fills the field in; no class was taught in this tab');
      await other.page.getByTestId('rejoin').click();
      const refused = await waitUntil(other, 'the rejoin to be refused', () => {
        const e = document.querySelector('[data-testid=error]');
        return e && !e.hidden && e.textContent.trim() ? e.textContent.trim() : false;
      });
      console.log(`another teacher's rejoin: ${refused}`);
      assert.ok(refused.includes('forbidden'), `the error names its code (${refused})`);
      assert.match(refused, /teacher of that class/);
      assert.equal(await other.page.evaluate(() => window.downbeat.classroom), null, 'not seated');
    } finally {
      await other.context.close();
    }
    assert.equal(await teacher.page.getByTestId('teacher-name').textContent(), teacherName, 'no other teacher sat in the class');

    // The same teacher in a second tab (the sign-in from the link, the code from the address):
    // the rejoin takes this seat over, same member id, and the first tab says why it stopped.
    const second = await openTab(teacher.context, `${server.base}/teacher?code=${code}#token=${before.token}`, 'teacher (tab 2)');
    try {
      await waitUntil(second, 'the rejoin button to be enabled', () => !document.querySelector('[data-testid=rejoin]').disabled);
      await second.page.getByTestId('rejoin').click();
      const taken = await waitUntil(second, 'the class view in the second tab', inClass, undefined, 60_000);
      assert.equal(taken.code, plain);
      assert.equal(taken.memberId, back.memberId, 'the second tab sits in the same seat (member id)');
      assert.deepEqual(taken.teachers, [back.memberId]);
      const stopped = await waitUntil(teacher, 'the first tab to stop', () =>
        window.downbeat.classroom.state === 'closed' ? document.querySelector('[data-testid=status]').textContent : false);
      console.log(`second tab: member ${taken.memberId} (the same seat); the first tab says "${stopped}"`);
      assert.match(stopped, /another tab/);
    } finally {
      await second.page.close();
    }
  }));
});

process.on('unhandledRejection', (e) => {
  printDiagnostics(server, allUsers());
  throw e;
});
