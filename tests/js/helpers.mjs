// Helpers for the Node tests of client/pitchey-ws.js: the real daemon in a subprocess, tokens,
// a TCP proxy that can cut or stall connections, and event waits with timeouts (no sleeps).
import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdtempSync, openSync, readFileSync, writeFileSync, closeSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const SECRET = process.env.PITCHEY_TEST_SECRET ?? 'node-test-secret-0123456789abcdef01234';
export const SCALE = Number(process.env.PITCHEY_TEST_TIMEOUT_SCALE ?? '1');
export const TIMEOUT = 10000 * SCALE;
const PYTHON = process.env.PITCHEY_PYTHON ?? path.join(ROOT, '.venv', 'bin', 'python');

/** An HS256 JWT for `userId`, expiring in `exp` seconds. */
export function mintToken(userId, { exp = 3600, username = `user${userId}`, secret = SECRET } = {}) {
  const b64 = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({
    userId, username, exp: Math.floor(Date.now() / 1000 + exp),
  })}`;
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`;
}

/** A free TCP port on 127.0.0.1. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** One pitchey-ws daemon with its own temp dir, database and config; same port on restart. */
export class Daemon {
  constructor(overrides = {}) {
    this.dir = mkdtempSync(path.join(process.env.PITCHEY_TMP ?? tmpdir(), 'pitchey-js-'));
    this.db = path.join(this.dir, 'pitchey.db');
    this.config = path.join(this.dir, 'config.toml');
    this.log = path.join(this.dir, 'daemon.log');
    const settings = { 'presence.offline_grace_seconds': 0, 'server.log_level': 'DEBUG', ...overrides };
    const sections = {};
    for (const [dotted, value] of Object.entries(settings)) {
      const [section, key] = dotted.split('.');
      (sections[section] ??= []).push(`${key} = ${JSON.stringify(value)}`);
    }
    writeFileSync(this.config, Object.entries(sections)
      .map(([s, lines]) => `[${s}]\n${lines.join('\n')}\n`).join('\n'));
    this.proc = null;
    this.port = null;
  }

  get url() { return `ws://127.0.0.1:${this.port}/api/messages/ws`; }
  get http() { return `http://127.0.0.1:${this.port}`; }

  async start() {
    this.port ??= await freePort();
    const log = openSync(this.log, 'a');
    this.proc = spawn(PYTHON, [
      path.join(ROOT, 'pitchey_ws.py'), 'serve', '--config', this.config, '--host', '127.0.0.1',
      '--port', String(this.port), '--db', this.db,
    ], { cwd: this.dir, env: { ...process.env, JWT_SECRET: SECRET }, stdio: ['ignore', log, log] });
    closeSync(log);
    const exited = new Promise((resolve) => this.proc.once('exit', resolve));
    this.exited = exited;
    const deadline = Date.now() + TIMEOUT;
    while (Date.now() < deadline) {
      const early = await Promise.race([exited.then((code) => ({ code })), this._healthy()]);
      if (early && typeof early === 'object') {
        throw new Error(`daemon exited ${early.code}:\n${this.logText()}`);
      }
      if (early === true) return;
      // The health answer is the readiness event; this pause only paces the polling.
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
    throw new Error(`daemon not healthy in time:\n${this.logText()}`);
  }

  async _healthy() {
    try {
      const response = await fetch(`${this.http}/api/health`, { signal: AbortSignal.timeout(1000) });
      return response.status === 200;
    } catch {
      return false;
    }
  }

  /** SIGTERM (the daemon closes clients with 1012) and wait for the exit code. */
  async stop(signal = 'SIGTERM') {
    if (!this.proc) return null;
    const proc = this.proc;
    this.proc = null;
    if (proc.exitCode === null) proc.kill(signal);
    return withTimeout(this.exited, TIMEOUT, 'daemon exit');
  }

  async restart() {
    await this.stop();
    await this.start();
  }

  logText() {
    try { return readFileSync(this.log, 'utf8'); } catch { return ''; }
  }
}

/** Reject with a clear message if `promise` has not settled within `ms`. */
export function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/**
 * Records a client's events so a test can wait for one that already happened or is yet to come.
 */
export class Recorder {
  constructor(client, types) {
    this.events = [];
    this.waiters = [];
    for (const type of types) {
      client.on(type, (data) => {
        this.events.push({ type, data });
        for (const w of [...this.waiters]) {
          if (w.type === type && w.match(data)) {
            this.waiters.splice(this.waiters.indexOf(w), 1);
            w.resolve(data);
          }
        }
      });
    }
  }

  /** Events of `type` recorded so far (optionally matching). */
  all(type, match = () => true) {
    return this.events.filter((e) => e.type === type && match(e.data)).map((e) => e.data);
  }

  /** The first event of `type` after index `from` that matches; waits up to TIMEOUT. */
  next(type, match = () => true, { from = 0, timeout = TIMEOUT } = {}) {
    const found = this.events.slice(from).find((e) => e.type === type && match(e.data));
    if (found) return Promise.resolve(found.data);
    return withTimeout(new Promise((resolve) => this.waiters.push({ type, match, resolve })),
      timeout, `event ${type}`);
  }

  /** Index to pass as `from` to wait only for events after this moment. */
  mark() { return this.events.length; }
}

/**
 * A TCP proxy in front of the daemon: `cut()` drops every live connection, `refuse` turns new
 * ones away, `stall()` keeps sockets open but stops forwarding (a dead network path).
 */
export class Proxy {
  constructor(targetPort) {
    this.targetPort = targetPort;
    this.pairs = new Set();
    this.refuse = false;
    this.stalled = false;
    this.accepted = 0;
    this.server = net.createServer((socket) => this._accept(socket));
  }

  async listen() {
    this.port = await new Promise((resolve) => {
      this.server.listen(0, '127.0.0.1', () => resolve(this.server.address().port));
    });
    return this;
  }

  get url() { return `ws://127.0.0.1:${this.port}/api/messages/ws`; }

  _accept(socket) {
    if (this.refuse) {
      socket.destroy();
      return;
    }
    this.accepted += 1;
    const upstream = net.connect(this.targetPort, '127.0.0.1');
    const pair = { socket, upstream };
    this.pairs.add(pair);
    const forward = (from, to, dir) => from.on('data', (chunk) => { if (!pair[dir]) to.write(chunk); });
    forward(socket, upstream, 'upStalled');
    forward(upstream, socket, 'downStalled');
    const drop = () => {
      this.pairs.delete(pair);
      socket.destroy();
      upstream.destroy();
    };
    socket.on('close', drop);
    upstream.on('close', drop);
    socket.on('error', drop);
    upstream.on('error', drop);
  }

  /** Drop every connection abruptly (no close frame: the client sees 1006). */
  cut() {
    for (const { socket, upstream } of this.pairs) {
      socket.destroy();
      upstream.destroy();
    }
    this.pairs.clear();
  }

  /**
   * Keep the current connections open but stop forwarding on them: `down` (server to client),
   * `up` (client to server), or both. New connections forward normally.
   */
  stall({ up = true, down = true } = {}) {
    for (const pair of this.pairs) {
      pair.upStalled ||= up;
      pair.downStalled ||= down;
    }
  }

  async close() {
    this.cut();
    await new Promise((resolve) => this.server.close(resolve));
  }
}

/** A plain WebSocket (a second tab) that collects frames. */
export async function rawSocket(url, token) {
  const ws = new WebSocket(`${url}?token=${token}`);
  const frames = [];
  const waiters = [];
  ws.onmessage = (event) => {
    const frame = JSON.parse(event.data);
    frames.push(frame);
    for (const w of [...waiters]) {
      if (w.match(frame)) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve(frame);
      }
    }
  };
  const next = (match, timeout = TIMEOUT) => {
    const found = frames.find(match);
    if (found) return Promise.resolve(found);
    return withTimeout(new Promise((resolve) => waiters.push({ match, resolve })), timeout, 'frame');
  };
  await next((f) => f.type === 'connected');
  return {
    ws, frames, next,
    send: (frame) => ws.send(JSON.stringify(frame)),
    close: () => ws.close(),
  };
}
