// The promise helpers and live events against the real daemon.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { PitcheyClient } from '../../client/pitchey-ws.js';
import { Daemon, Recorder, mintToken } from './helpers.mjs';

const EVENTS = ['connected', 'new_message', 'message_read', 'user_typing', 'user_online', 'user_offline', 'error'];

let daemon;
const clients = [];
let nextUser = 300;

before(async () => {
  // A long typing TTL, so a typing stop seen here comes from the client going idle.
  daemon = new Daemon({ 'history.page_size': 5, 'typing.ttl_seconds': 120 });
  await daemon.start();
});

after(async () => {
  for (const c of clients) c.close();
  await daemon.stop();
});

/** One counter from the daemon's /metrics, e.g. 'pitchey_errors_total{code="rate_limited"}'. */
async function metric(series) {
  const text = await (await fetch(`${daemon.http}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`${series} `));
  return line ? Number(line.slice(series.length + 1)) : 0;
}
const RATE_LIMITED = 'pitchey_errors_total{code="rate_limited"}';
const typingIn = async () => (await metric('pitchey_frames_in_total{type="typing_start"}'))
  + (await metric('pitchey_frames_in_total{type="typing_stop"}'));

async function online(userId, options = {}) {
  const c = new PitcheyClient({ url: daemon.url, token: mintToken(userId), WebSocket, ...options });
  clients.push(c);
  const rec = new Recorder(c, EVENTS);
  await c.connect();
  return { c, rec };
}

test('history: joinConversation gives the newest page, getMessages pages back, oldest first', async () => {
  const [ua, ub] = [nextUser++, nextUser++];
  const a = await online(ua);
  const { conversationId } = await a.c.createConversation([ub]);
  const contents = Array.from({ length: 8 }, (_, i) => `m${i}`);
  for (const content of contents) await a.c.sendMessage({ conversationId, content });

  const joined = await a.c.joinConversation(conversationId);
  assert.equal(joined.conversationId, conversationId);
  assert.deepEqual(joined.messages.map((m) => m.content), contents.slice(3));
  const older = await a.c.getMessages(conversationId, { beforeMessageId: joined.messages[0].messageId });
  assert.deepEqual(older.messages.map((m) => m.content), contents.slice(0, 3));
  assert.equal(older.hasMore, false);
});

test('a refused request rejects with the server code and later answers still match', async () => {
  const [ua, ub, uc] = [nextUser++, nextUser++, nextUser++];
  const a = await online(ua);
  const c = await online(uc);
  const { conversationId } = await a.c.createConversation([ub]);
  // The server's forbidden error has no requestId; the client pairs it by order.
  const [refused, users, joined] = await Promise.allSettled([
    c.c.joinConversation(conversationId),
    c.c.getOnlineUsers(),
    c.c.joinConversation(conversationId + 1000),
  ]);
  assert.equal(refused.status, 'rejected');
  assert.equal(refused.reason.code, 'forbidden');
  assert.equal(users.status, 'fulfilled');
  assert.ok(Array.isArray(users.value));
  assert.equal(joined.status, 'rejected');
  await assert.rejects(c.c.sendMessage({ conversationId, content: 'not mine' }), { code: 'forbidden' });
  await assert.rejects(c.c.markRead(1), { code: 'forbidden' });
  // An invalid send: the contract's fixed text, and the reason in detail.
  await assert.rejects(c.c.sendMessage({ recipientId: uc, content: 'to myself' }), {
    code: 'invalid_message',
    message: 'Missing required fields for message',
    detail: 'recipientId must be another user',
  });
});

test('markRead tells the sender (message_read); typing is throttled and stops when idle', async () => {
  const [ua, ub] = [nextUser++, nextUser++];
  const a = await online(ua);
  const b = await online(ub, { typingIdleMs: 300 });
  const { conversationId } = await a.c.createConversation([ub]);
  const sent = await a.c.sendMessage({ conversationId, content: 'read me' });
  const got = await b.rec.next('new_message', (m) => m.content === 'read me');
  assert.equal(got.messageId, sent.messageId);

  await b.c.markRead(got.messageId);
  const read = await a.rec.next('message_read', (r) => r.messageId === sent.messageId);
  assert.equal(read.readBy, ub);

  const typingFrames = await typingIn();
  for (let i = 0; i < 5; i += 1) b.c.startTyping(conversationId); // keystrokes
  const typing = await a.rec.next('user_typing', (t) => t.isTyping);
  assert.equal(typing.userId, ub);
  assert.equal(typing.conversationId, conversationId);
  const stopped = await a.rec.next('user_typing', (t) => !t.isTyping);
  assert.equal(stopped.userId, ub);
  assert.equal(await typingIn() - typingFrames, 2, 'one typing_start, one typing_stop');
});

test('presence: getOnlineUsers lists contacts; user_online and user_offline arrive', async () => {
  const [ua, ub] = [nextUser++, nextUser++];
  const a = await online(ua);
  await a.c.createConversation([ub]);
  const from = a.rec.mark();
  const b = await online(ub);
  assert.equal((await a.rec.next('user_online', (u) => u.userId === ub, { from })).userId, ub);
  assert.deepEqual((await a.c.getOnlineUsers()).map((u) => u.userId), [ub]);
  b.c.close();
  assert.equal((await a.rec.next('user_offline', (u) => u.userId === ub, { from })).userId, ub);
  assert.deepEqual(await a.c.getOnlineUsers(), []);
});


test('a burst of requests is paced under the server rate limit: none is refused', async () => {
  const a = await online(nextUser++);
  const before = await metric(RATE_LIMITED);
  // 80 frames at once is more than the server's default burst of 60.
  const answers = await Promise.all(Array.from({ length: 80 }, () => a.c.getOnlineUsers()));
  assert.equal(answers.length, 80);
  assert.equal(await metric(RATE_LIMITED), before, 'the server had to refuse frames');
  assert.deepEqual(a.rec.all('error'), []);
});
