// The client against the real daemon: restarts, offline sends, sync after a gap, heartbeats.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { PitcheyClient } from '../../client/pitchey-ws.js';
import { Daemon, Proxy, Recorder, SCALE, TIMEOUT, mintToken, rawSocket, withTimeout } from './helpers.mjs';

const EVENTS = ['connected', 'disconnected', 'state', 'new_message', 'message_sent', 'synced', 'error'];
// Short backoff so a restart costs about a second; the policy itself is the library's default.
const FAST = { reconnectBaseMs: 100, reconnectCapMs: 1000 };

let daemon;
const clients = [];
let nextUser = 100;

before(async () => {
  daemon = new Daemon();
  await daemon.start();
});

after(async () => {
  for (const c of clients) c.close();
  await daemon.stop();
});

function client(userId, url, options = {}) {
  const c = new PitcheyClient({ url: url ?? daemon.url, token: mintToken(userId), WebSocket, ...FAST, ...options });
  clients.push(c);
  return { c, rec: new Recorder(c, EVENTS) };
}

/** Every content in `contents` arrived exactly once as new_message. */
function assertOnce(rec, contents) {
  for (const content of contents) {
    const got = rec.all('new_message', (m) => m.content === content);
    assert.equal(got.length, 1, `${JSON.stringify(content)} arrived ${got.length} times`);
  }
}

/**
 * Duplicates, if any, come before a message sent after the receiver finished its sync: the
 * server writes a connection's frames in order. So wait for that message, then count.
 */
async function settle(sender, receiver, conversationId, from) {
  await receiver.rec.next('synced', () => true, { from });
  const marker = `marker ${Math.random()}`;
  await sender.c.sendMessage({ conversationId, content: marker });
  await receiver.rec.next('new_message', (m) => m.content === marker);
}

test('reconnects after a daemon restart; sends made while it is down arrive exactly once', async () => {
  const [ua, ub] = [nextUser++, nextUser++];
  const a = client(ua);
  const b = client(ub);
  await Promise.all([a.c.connect(), b.c.connect()]);
  const { conversationId } = await a.c.createConversation([ub]);
  await a.c.sendMessage({ conversationId, content: 'before the restart' });
  await b.rec.next('new_message', (m) => m.content === 'before the restart');

  const [markA, markB] = [a.rec.mark(), b.rec.mark()];
  await daemon.stop(); // SIGTERM: the daemon closes every connection with 1012
  const gone = await a.rec.next('disconnected', () => true, { from: markA });
  assert.equal(gone.code, 1012);
  assert.equal(gone.willReconnect, true);
  await b.rec.next('disconnected', (d) => d.code === 1012, { from: markB });

  const contents = ['offline 1', 'offline 2', 'offline 3'];
  const sends = contents.map((content) => a.c.sendMessage({ conversationId, content }));
  const retry = await a.rec.next('state', (s) => s.state === 'reconnecting', { from: markA });
  assert.ok(retry.retryInMs >= 0 && retry.retryInMs <= FAST.reconnectCapMs, `retryInMs ${retry.retryInMs}`);

  await daemon.start();
  const acks = await withTimeout(Promise.all(sends), TIMEOUT, 'message_sent for the offline sends');
  assert.deepEqual(acks.map((m) => m.content), contents);
  assert.equal(new Set(acks.map((m) => m.messageId)).size, 3);
  assert.ok((await a.rec.next('connected', (c) => c.reconnected, { from: markA })).reconnected);
  assert.equal(a.c.state, 'online');

  await settle(a, b, conversationId, markB);
  assertOnce(b.rec, contents);
  const history = await b.c.joinConversation(conversationId);
  for (const content of contents) {
    assert.equal(history.messages.filter((m) => m.content === content).length, 1, `stored once: ${content}`);
  }
});

test('sync after a reconnect closes the gap: messages another tab took arrive, once each', async () => {
  const [ua, ub] = [nextUser++, nextUser++];
  const proxy = await new Proxy(daemon.port).listen();
  try {
    const a = client(ua);
    const x = client(ub, proxy.url); // the client under test, through a proxy we can cut
    await Promise.all([a.c.connect(), x.c.connect()]);
    const tab = await rawSocket(daemon.url, mintToken(ub)); // the same user's other tab
    const { conversationId } = await a.c.createConversation([ub]);
    await a.c.sendMessage({ conversationId, content: 'seen before the gap' });
    await x.rec.next('new_message', (m) => m.content === 'seen before the gap');

    const markX = x.rec.mark();
    proxy.refuse = true;
    proxy.cut();
    assert.equal((await x.rec.next('disconnected', () => true, { from: markX })).code, 1006);

    const contents = ['gap 1', 'gap 2', 'gap 3'];
    for (const content of contents) await a.c.sendMessage({ conversationId, content });
    // The other tab took them live, so nothing is queued for this user: only sync can bring them.
    for (const content of contents) await tab.next((f) => f.type === 'new_message' && f.content === content);

    proxy.refuse = false;
    await x.rec.next('connected', (c) => c.reconnected, { from: markX });
    await settle(a, x, conversationId, markX);
    assertOnce(x.rec, contents);
    for (const content of contents) {
      const [event] = x.rec.all('new_message', (m) => m.content === content);
      assert.equal(event.queued, true, 'recovered by sync, not live');
    }
    assertOnce(x.rec, ['seen before the gap']);
    tab.close();
  } finally {
    await proxy.close();
  }
});

test('a dead connection is detected by the heartbeat; a send in flight is stored once', async () => {
  const [ua, ub] = [nextUser++, nextUser++];
  const proxy = await new Proxy(daemon.port).listen();
  try {
    const a = client(ua, proxy.url, { pingIntervalMs: 300, pongTimeoutMs: 1000 * SCALE });
    const b = client(ub);
    await Promise.all([a.c.connect(), b.c.connect()]);
    const { conversationId } = await a.c.createConversation([ub]);

    const markA = a.rec.mark();
    proxy.stall({ up: false, down: true }); // the send reaches the server; its answer is lost
    const sending = a.c.sendMessage({ conversationId, content: 'in flight' });
    const delivered = await b.rec.next('new_message', (m) => m.content === 'in flight');

    const dead = await a.rec.next('disconnected', () => true, { from: markA });
    assert.equal(dead.code, 4000, 'closed by the client for a missing pong');
    assert.equal(dead.willReconnect, true);
    const ack = await withTimeout(sending, TIMEOUT, 'message_sent after the reconnect');
    assert.equal(ack.messageId, delivered.messageId, 'the retry got the original message');
    await a.rec.next('connected', (c) => c.reconnected, { from: markA });

    await settle(a, b, conversationId, 0);
    assertOnce(b.rec, ['in flight']);
    const history = await b.c.joinConversation(conversationId);
    assert.equal(history.messages.filter((m) => m.content === 'in flight').length, 1);
  } finally {
    await proxy.close();
  }
});

test('messages queued while offline are replayed once; the sync that follows repeats none', async () => {
  const [ua, ub] = [nextUser++, nextUser++];
  const proxy = await new Proxy(daemon.port).listen();
  try {
    const a = client(ua);
    const x = client(ub, proxy.url);
    await Promise.all([a.c.connect(), x.c.connect()]);
    const { conversationId } = await a.c.createConversation([ub]);
    await a.c.sendMessage({ conversationId, content: 'hello' });
    await x.rec.next('new_message', (m) => m.content === 'hello');

    const markX = x.rec.mark();
    proxy.refuse = true;
    proxy.cut();
    await x.rec.next('disconnected', () => true, { from: markX });
    const contents = ['queued 1', 'queued 2'];
    const acks = [];
    for (const content of contents) acks.push(await a.c.sendMessage({ conversationId, content }));
    assert.deepEqual(acks.map((m) => m.delivered), [false, false], 'nobody was there to take them');

    // The server replays them after `connected`, and the sync from the old cursor carries them
    // again: the client must show each once.
    proxy.refuse = false;
    await x.rec.next('connected', (c) => c.reconnected, { from: markX });
    await settle(a, x, conversationId, markX);
    assertOnce(x.rec, contents);
  } finally {
    await proxy.close();
  }
});
