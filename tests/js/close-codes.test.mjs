// Close codes against the real daemon: 4001 gets a fresh token and reconnects; 1008 stops.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { PitcheyClient } from '../../client/pitchey-ws.js';
import { Daemon, Recorder, SCALE, mintToken, withTimeout } from './helpers.mjs';

const EVENTS = ['connected', 'disconnected', 'state', 'error', 'new_message'];

test('4001 token expired: getToken is called for a fresh token and the client reconnects', async () => {
  const daemon = new Daemon();
  await daemon.start();
  const issued = [];
  const getToken = async () => {
    // The first token lives 3 s (2-3 s after rounding); later ones an hour.
    const token = mintToken(7, { exp: issued.length === 0 ? 3 : 3600 });
    issued.push(token);
    return token;
  };
  const c = new PitcheyClient({ url: daemon.url, getToken, WebSocket, reconnectBaseMs: 100, reconnectCapMs: 1000 });
  const rec = new Recorder(c, EVENTS);
  try {
    await c.connect();
    assert.equal(issued.length, 1);
    const mark = rec.mark();
    const expired = await rec.next('disconnected', () => true, { from: mark });
    assert.equal(expired.code, 4001);
    assert.equal(expired.willReconnect, true);
    const again = await rec.next('connected', (f) => f.reconnected, { from: mark });
    assert.equal(again.userId, 7);
    assert.equal(issued.length, 2, 'one fresh token for the reconnect');
    // The new connection works: a request gets its answer.
    const { conversationId } = await c.createConversation([8]);
    const ack = await c.sendMessage({ conversationId, content: 'after refresh' });
    assert.equal(ack.senderId, 7);
    assert.deepEqual(rec.all('error'), []);
  } finally {
    c.close();
    await daemon.stop();
  }
});

test('1008 policy close: the client stops, reports a fatal error and never reconnects', async () => {
  const daemon = new Daemon({
    'limits.frames_per_second': 1, 'limits.frames_burst': 1,
    'limits.flood_max_dropped': 3, 'limits.flood_window_seconds': 60,
  });
  await daemon.start();
  // Client-side pacing off, so this client floods the way a broken app would.
  const c = new PitcheyClient({
    url: daemon.url, token: mintToken(9), WebSocket, framesPerSecond: 1e6, framesBurst: 1e6,
  });
  const rec = new Recorder(c, EVENTS);
  try {
    await c.connect();
    const mark = rec.mark();
    const asks = Array.from({ length: 12 }, () => c.getOnlineUsers().then(() => 'answered', (e) => e.code));
    const closed = await rec.next('disconnected', () => true, { from: mark });
    assert.equal(closed.code, 1008);
    assert.equal(closed.willReconnect, false);
    const error = await rec.next('error', (e) => e.fatal, { from: mark });
    assert.equal(error.code, 'policy');
    assert.equal(c.state, 'closed');
    const outcomes = await withTimeout(Promise.all(asks), 5000 * SCALE, 'pending requests to settle');
    assert.ok(outcomes.includes('policy'), `pending requests rejected: ${outcomes}`);
    await assert.rejects(c.sendMessage({ conversationId: 1, content: 'x' }), { code: 'closed' });

    // Absence can only be observed by waiting: nothing reconnects in the next second.
    const states = rec.mark();
    await new Promise((resolve) => setTimeout(resolve, 1000 * SCALE));
    assert.deepEqual(rec.events.slice(states).map((e) => e.type), []);
    const health = await (await fetch(`${daemon.http}/api/health`)).json();
    assert.equal(health.connections, 0);
  } finally {
    c.close();
    await daemon.stop();
  }
});
