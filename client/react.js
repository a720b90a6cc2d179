/**
 * React hooks for pitchey-ws, with the names and return shapes of the Pitchey frontend's
 * `src/hooks/useWebSocket.ts`: `useWebSocket`, `useMessaging`, `usePitchUpdates`,
 * `useNotifications`.
 *
 * Every hook that resolves to the same endpoint and token shares one connection (one
 * `PitcheyClient` from ./pitchey-ws.js): a module-level registry keyed by URL and token,
 * counted by mounted hooks and closed a moment after the last one unmounts, so re-renders and
 * StrictMode's mount-unmount-mount never open a second socket. The client underneath
 * reconnects, refreshes the token on 4001, keeps sends until acknowledged and syncs after a
 * reconnect; this module turns its events into React state.
 *
 * Usage and options: docs/client.md. Types: react.d.ts.
 *
 * @module pitchey-ws/react
 */
import * as React from 'react';
import { PitcheyClient, PitcheyError, newRequestId } from './pitchey-ws.js';

/** Defaults for every hook; change them once at startup with `configurePitcheyWs`. */
const settings = {
  /** WebSocket endpoint; default: VITE_WS_URL, else the page's host on the page's port or 8000. */
  url: undefined,
  /** Base of the HTTP API (`/api/messages/...`); default: the endpoint's origin, http(s). */
  apiUrl: undefined,
  /** A JWT; default: `localStorage.authToken`. */
  token: undefined,
  /** Called for a fresh JWT (after 4001, or a refused handshake); default: re-read the token. */
  getToken: undefined,
  WebSocket: undefined,
  /** A send made while disconnected goes over `POST /api/messages/send` after this long. */
  httpFallbackMs: 5000,
  /** The shared connection closes this long after its last hook unmounts. */
  releaseDelayMs: 1000,
  /** Browser notifications and in-page toasts for chat events (useMessaging mounted). */
  notifications: true,
  toastMs: 6000,
  /** Extra PitcheyClient options (reconnectBaseMs, pingIntervalMs, ...). */
  clientOptions: {},
};

/** Set defaults for every hook (call before the first render). */
export function configurePitcheyWs(options) {
  for (const [key, value] of Object.entries(options ?? {})) {
    if (!(key in settings)) throw new TypeError(`unknown pitchey-ws option: ${key}`);
    settings[key] = value;
  }
}

function envUrl() {
  // Vite replaces import.meta.env at build time; elsewhere it may not exist at all.
  try {
    return import.meta.env && import.meta.env.VITE_WS_URL;
  } catch {
    return undefined;
  }
}

/** The Pitchey rule: ws(s) as the page, the page's hostname, its port or 8000. */
export function defaultUrl() {
  const fromEnv = envUrl();
  if (fromEnv) return fromEnv;
  const loc = globalThis.location;
  if (!loc || !loc.hostname) return null;
  const protocol = loc.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${protocol}//${loc.hostname}:${loc.port || '8000'}/api/messages/ws`;
}

function storedToken() {
  try {
    return globalThis.localStorage?.getItem('authToken') || null;
  } catch {
    return null; // storage disabled
  }
}

function apiBase(wsUrl) {
  const url = new URL(wsUrl, globalThis.location?.href);
  url.protocol = url.protocol === 'wss:' || url.protocol === 'https:' ? 'https:' : 'http:';
  return url.origin;
}

function tokenExpired(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const exp = JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), '='))).exp;
    if (typeof exp !== 'number') return false;
    return (exp > 1e11 ? exp : exp * 1000) <= Date.now(); // Pitchey mints exp in milliseconds
  } catch {
    return false;
  }
}

// -- browser notifications -------------------------------------------------------------------

/** Ask for permission to show system notifications (call from a user gesture). */
export function requestNotificationPermission() {
  const N = globalThis.Notification;
  if (!N || N.permission !== 'default') return Promise.resolve(N?.permission ?? 'denied');
  return N.requestPermission();
}

/**
 * As the Pitchey notification service does: a system `Notification` when the tab is hidden and
 * permission is granted, an in-page toast when it is visible. Text only: title and body are
 * text nodes, never HTML.
 */
export function showNotification(title, body = '') {
  if (!settings.notifications) return;
  const doc = globalThis.document;
  if (!doc) return;
  const N = globalThis.Notification;
  if (doc.hidden) {
    if (N && N.permission === 'granted') {
      try { new N(title, { body, tag: 'pitchey-ws' }); } catch { /* not allowed here */ }
    }
    return;
  }
  if (!doc.body) return;
  let box = doc.getElementById('pitchey-ws-toasts');
  if (!box) {
    box = doc.createElement('div');
    box.id = 'pitchey-ws-toasts';
    box.setAttribute('role', 'status');
    box.setAttribute('aria-live', 'polite');
    Object.assign(box.style, {
      position: 'fixed', right: '16px', bottom: '16px', zIndex: '2147483647',
      display: 'flex', flexDirection: 'column', gap: '8px', maxWidth: '320px',
    });
    doc.body.appendChild(box);
  }
  const item = doc.createElement('div');
  item.className = 'pitchey-ws-toast';
  Object.assign(item.style, {
    background: '#1f2937', color: '#fff', padding: '10px 14px', borderRadius: '8px',
    font: '14px system-ui, sans-serif', boxShadow: '0 4px 12px rgba(0,0,0,.25)',
    overflowWrap: 'anywhere',
  });
  const head = doc.createElement('strong');
  head.className = 'pitchey-ws-toast-title';
  head.appendChild(doc.createTextNode(String(title)));
  const text = doc.createElement('div');
  text.className = 'pitchey-ws-toast-body';
  text.appendChild(doc.createTextNode(String(body)));
  item.append(head, text);
  box.appendChild(item);
  setTimeout(() => item.remove(), settings.toastMs);
}

function preview(content) {
  const text = String(content ?? '');
  return text.length > 100 ? text.slice(0, 99) + '…' : text;
}

// -- messages --------------------------------------------------------------------------------

/** One message entry, whatever it came from: a frame, a history entry, an HTTP answer. */
function toMessage(f, extra = {}) {
  const { type: _type, originalType: _orig, queued: _q, queuedAt: _qa, ...rest } = f;
  const id = f.messageId ?? f.id;
  const ts = f.timestamp ?? f.sentAt ?? null;
  return {
    ...rest,
    id,
    messageId: id,
    conversationId: f.conversationId,
    senderId: f.senderId ?? f.sender?.id,
    senderName: f.senderName ?? f.sender?.name ?? '',
    content: f.content,
    attachments: f.attachments ?? [],
    messageType: f.messageType ?? 'text',
    timestamp: ts,
    sentAt: f.sentAt ?? ts,
    delivered: f.delivered ?? true,
    isRead: f.isRead ?? false,
    readAt: f.readAt ?? null,
    ...extra,
  };
}

const isPending = (m) => typeof m.id !== 'number';

/** Sorted by id, pending sends last in send order; one entry per id (and per requestId). */
function mergeMessages(list, incoming) {
  const byId = new Map();
  const pending = [];
  const add = (m) => {
    if (isPending(m)) {
      if (!pending.some((p) => p.id === m.id)) pending.push(m);
      return;
    }
    const old = byId.get(m.id);
    byId.set(m.id, old ? { ...old, ...m, isRead: old.isRead || m.isRead, readAt: m.readAt ?? old.readAt } : m);
  };
  for (const m of list) add(m);
  for (const m of incoming) add(m);
  const acked = new Set([...byId.values()].map((m) => m.requestId).filter(Boolean));
  return [
    ...[...byId.values()].sort((a, b) => a.id - b.id),
    ...pending.filter((p) => !acked.has(p.requestId)),
  ];
}

function mapSet(obj, key, value) {
  return { ...obj, [key]: value };
}

// -- the shared connection -------------------------------------------------------------------

const registry = new Map(); // `${url} ${token}` -> Session

const EMPTY = Object.freeze({
  connectionState: 'idle', isConnected: false, userId: null, username: null, lastMessage: null,
  error: null, conversations: [], messages: {}, current: null, typing: {}, onlineUsers: {},
  unreadCounts: {}, unreadSeed: {}, unreadLive: {}, pitches: {}, notifications: [], notificationsUnread: 0,
});

function getSession(url, token, options) {
  const key = `${url} ${token}`;
  let session = registry.get(key);
  if (!session) {
    session = new Session(key, url, token, options);
    registry.set(key, session);
  }
  return session;
}

class Session {
  constructor(key, url, token, options) {
    this.keys = new Set([key]);
    this.url = url;
    this.token = token;
    this.options = options ?? {};
    this.api = this.options.apiUrl ?? settings.apiUrl ?? apiBase(url);
    this.state = EMPTY;
    this.listeners = new Set();
    this.hooks = new Set(); // useWebSocket callbacks
    this.refs = 0;
    this.messagingRefs = 0;
    this.client = null;
    this.closeTimer = null;
    this.fallbackTimer = null;
    this.pitchWatch = new Map(); // pitchId -> mounted usePitchUpdates count
    this.subscribe = (fn) => {
      this.listeners.add(fn);
      return () => this.listeners.delete(fn);
    };
    this.getSnapshot = () => this.state;
  }

  set(patch) {
    const next = typeof patch === 'function' ? patch(this.state) : patch;
    if (!next) return;
    this.state = { ...this.state, ...next };
    for (const fn of [...this.listeners]) fn();
  }

  acquire() {
    this.refs += 1;
    clearTimeout(this.closeTimer);
    this.closeTimer = null;
    for (const key of this.keys) if (!registry.has(key)) registry.set(key, this);
    if (!this.client) this.start();
  }

  release() {
    this.refs -= 1;
    if (this.refs > 0) return;
    clearTimeout(this.closeTimer);
    // Later, not now: StrictMode and route changes unmount and mount again at once.
    this.closeTimer = setTimeout(() => this.end(), settings.releaseDelayMs);
  }

  end() {
    if (this.refs > 0) return;
    for (const key of this.keys) if (registry.get(key) === this) registry.delete(key);
    clearTimeout(this.fallbackTimer);
    const client = this.client;
    this.client = null;
    client?.close();
    this.set({ connectionState: 'closed', isConnected: false });
  }

  fatal(code, message) {
    this.set({ error: { code, message, fatal: true }, connectionState: 'closed', isConnected: false });
    this.client?.close();
  }

  /** getToken for the client: a fresh token, or a stop when there is none worth trying. */
  async freshToken(client) {
    const getToken = this.options.getToken ?? settings.getToken;
    const token = getToken ? await getToken() : (this.options.token ?? settings.token ?? storedToken());
    if (client !== this.client) throw new Error('connection was closed');
    if (!token) {
      this.fatal('token_unavailable', 'no token to connect with');
      throw new PitcheyError('token_unavailable', 'no token');
    }
    if (tokenExpired(token)) {
      this.fatal('token_expired', 'the token has expired and no fresh one was given');
      throw new PitcheyError('token_expired', 'token expired');
    }
    if (token === this.token) {
      // Same token after a refused or failed handshake: the HTTP API tells a 401 from an outage.
      let status = 0;
      try {
        const res = await fetch(`${this.api}/api/messages/conversations?limit=1`, {
          headers: { Authorization: `Bearer ${token}` },
        });
        status = res.status;
      } catch { /* the daemon is down: keep trying */ }
      if (status === 401 && client === this.client) {
        this.fatal('unauthorized', 'the server refused the token (401)');
        throw new PitcheyError('unauthorized', 'token refused');
      }
    }
    if (token !== this.token) {
      this.token = token;
      const key = `${this.url} ${token}`;
      this.keys.add(key); // hooks that now read the new token find this connection
      if (!registry.has(key)) registry.set(key, this);
    }
    return token;
  }

  start() {
    const o = this.options;
    const clientOptions = { ...settings.clientOptions, ...(o.clientOptions ?? {}) };
    if (o.reconnectInterval !== undefined) clientOptions.reconnectBaseMs = o.reconnectInterval;
    const client = new PitcheyClient({
      ...clientOptions,
      url: this.url,
      token: this.token,
      getToken: () => this.freshToken(client),
      WebSocket: o.WebSocket ?? settings.WebSocket,
    });
    this.client = client;
    this.set({ error: null });
    const on = (type, fn) => client.on(type, (f) => { if (client === this.client) fn(f); });
    on('state', ({ state }) => this.set({ connectionState: state, isConnected: state === 'online' }));
    on('connected', (f) => this.onConnected(f));
    on('disconnected', (e) => {
      for (const h of this.hooks) h.current.onDisconnect?.(e);
      this.armFallback();
    });
    on('error', (e) => this.set({ error: e }));
    on('frame', (f) => this.onFrame(f));
    on('new_message', (f) => this.onNewMessage(f));
    on('message_sent', (f) => this.onSent(f));
    on('message_read', (f) => this.onRead(f));
    on('conversation_joined', (f) => this.addMessages(f.conversationId, f.messages.map((m) => toMessage(m))));
    on('messages', (f) => this.addMessages(f.conversationId, f.messages.map((m) => toMessage(m))));
    on('user_typing', (f) => this.onTyping(f));
    on('online_users', (f) => this.set((s) => {
      const online = {};
      for (const id of Object.keys(s.onlineUsers)) online[id] = false;
      for (const u of f.users) online[u.userId] = u.isOnline !== false;
      return { onlineUsers: online };
    }));
    on('user_online', (f) => {
      this.set((s) => ({ onlineUsers: mapSet(s.onlineUsers, f.userId, true) }));
      if (this.messagingRefs > 0) showNotification(`${f.username} is now online`);
    });
    on('user_offline', (f) => this.set((s) => ({ onlineUsers: mapSet(s.onlineUsers, f.userId, false) })));
    client.connect().catch(() => { /* stopped: the state and error say why */ });
  }

  onConnected(f) {
    this.set({ userId: f.userId, username: f.username, error: null });
    // Presence is not pushed on connect: ask every time, reconnects included.
    this.client.getOnlineUsers().catch(() => {});
    for (const pitchId of this.pitchWatch.keys()) this.subscribePitch(pitchId);
    for (const h of this.hooks) h.current.onConnect?.(f);
  }

  onFrame(f) {
    this.set({ lastMessage: f });
    for (const h of this.hooks) h.current.onMessage?.(f);
    if (f.pitchId !== undefined && f.pitchId !== null) this.onPitchFrame(f);
    if (f.notificationId !== undefined || f.type === 'nda_signed') this.onNotification(f);
    if (f.type === 'notifications_read') this.set({ notificationsUnread: f.unreadCount ?? 0 });
  }

  addMessages(conversationId, messages) {
    this.set((s) => ({
      messages: mapSet(s.messages, conversationId, mergeMessages(s.messages[conversationId] ?? [], messages)),
    }));
  }

  onNewMessage(f) {
    const m = toMessage(f);
    const mine = m.senderId === this.state.userId;
    this.set((s) => {
      const patch = {
        messages: mapSet(s.messages, m.conversationId, mergeMessages(s.messages[m.conversationId] ?? [], [m])),
      };
      if (!mine) {
        const who = s.typing[m.conversationId];
        if (who && who[m.senderId] !== undefined) {
          const { [m.senderId]: _gone, ...others } = who;
          patch.typing = mapSet(s.typing, m.conversationId, others);
        }
        const hidden = globalThis.document?.hidden;
        const live = s.unreadLive[m.conversationId] ?? [];
        if ((s.current !== m.conversationId || hidden) && !live.includes(m.id)) {
          patch.unreadLive = mapSet(s.unreadLive, m.conversationId, [...live, m.id]);
          patch.unreadCounts = unreadCounts(s.unreadSeed, patch.unreadLive);
        }
      }
      return patch;
    });
    if (!mine && !f.queued && this.messagingRefs > 0) {
      showNotification(`New message from ${m.senderName || 'someone'}`, preview(m.content));
    }
  }

  onSent(f) {
    this.addMessages(f.conversationId, [toMessage(f, { requestId: f.requestId, pending: false })]);
  }

  onRead(f) {
    this.set((s) => {
      const list = s.messages[f.conversationId];
      if (!list) return null;
      return {
        messages: mapSet(s.messages, f.conversationId, list.map((m) =>
          m.id === f.messageId ? { ...m, isRead: true, readAt: f.readAt, readBy: f.readBy } : m)),
      };
    });
    if (!f.queued && this.messagingRefs > 0) showNotification(`${f.readByName} read your message`);
  }

  onTyping(f) {
    if (f.conversationId === undefined || f.conversationId === null) return;
    this.set((s) => {
      const { [f.userId]: _old, ...others } = s.typing[f.conversationId] ?? {};
      const who = f.isTyping ? { ...others, [f.userId]: f.username } : others;
      return { typing: mapSet(s.typing, f.conversationId, who) };
    });
  }

  // -- messaging actions

  sendChatMessage(conversationId, content, recipientId) {
    const requestId = newRequestId();
    const now = new Date().toISOString();
    const cid = Number.isInteger(conversationId) ? conversationId : undefined;
    if (cid !== undefined) {
      this.addMessages(cid, [{
        id: `pending:${requestId}`, messageId: null, requestId, pending: true, conversationId: cid,
        senderId: this.state.userId, senderName: this.state.username ?? '', content,
        attachments: [], messageType: 'text', timestamp: now, sentAt: now,
        delivered: false, isRead: false, readAt: null,
      }]);
    }
    const frame = { content, requestId };
    if (cid !== undefined) frame.conversationId = cid;
    if (recipientId !== undefined && recipientId !== null) frame.recipientId = recipientId;
    this.outbox ??= new Map();
    this.outbox.set(requestId, frame);
    const sent = this.client.sendMessage(frame).then(
      (ack) => { this.outbox.delete(requestId); return ack; },
      (err) => {
        this.outbox.delete(requestId);
        this.markFailed(cid, requestId, err);
        throw err;
      },
    );
    if (!this.state.isConnected) this.armFallback();
    sent.catch(() => {});
    return sent;
  }

  markFailed(cid, requestId, err) {
    if (cid === undefined) return;
    this.set((s) => ({
      error: { code: err?.code ?? 'send_failed', message: String(err?.message ?? err) },
      messages: mapSet(s.messages, cid, (s.messages[cid] ?? []).map((m) =>
        m.requestId === requestId && m.pending ? { ...m, failed: true } : m)),
    }));
  }

  /** Sends still waiting while the socket is down go over HTTP after `httpFallbackMs`. */
  armFallback() {
    if (this.fallbackTimer || !this.outbox?.size) return;
    const delay = this.options.httpFallbackMs ?? settings.httpFallbackMs;
    if (delay === null || delay === undefined || delay < 0) return;
    this.fallbackTimer = setTimeout(() => {
      this.fallbackTimer = null;
      if (this.state.isConnected || !this.client) return;
      // The same requestId as the queued socket send: the server stores it once either way.
      for (const [requestId, frame] of this.outbox) this.postMessage(requestId, frame);
    }, delay);
  }

  async postMessage(requestId, frame) {
    let res;
    try {
      res = await fetch(`${this.api}/api/messages/send`, {
        method: 'POST',
        headers: { Authorization: `Bearer ${this.token}`, 'Content-Type': 'application/json' },
        body: JSON.stringify(frame),
      });
    } catch {
      return; // down too: the socket's outbox sends it on reconnect
    }
    if (!res.ok) return;
    const body = await res.json().catch(() => null);
    if (!body?.message || !this.outbox?.has(requestId)) return;
    const m = toMessage(body.message, { requestId, pending: false });
    this.addMessages(m.conversationId, [m]);
  }

  markMessageAsRead(messageId) {
    this.client?.markRead(messageId).catch((err) => this.set({ error: { code: err.code, message: err.message } }));
    this.set((s) => {
      for (const [cid, list] of Object.entries(s.messages)) {
        if (list.some((m) => m.id === messageId)) {
          return {
            messages: mapSet(s.messages, cid, list.map((m) =>
              m.id === messageId && !m.isRead ? { ...m, isRead: true, readAt: new Date().toISOString() } : m)),
          };
        }
      }
      return null;
    });
  }

  joinConversation(conversationId) {
    this.set({ current: conversationId });
    this.client?.joinConversation(conversationId).catch((err) =>
      this.set({ error: { code: err.code, message: err.message } }));
  }

  markConversationAsRead(conversationId) {
    this.set((s) => {
      const unreadSeed = mapSet(s.unreadSeed, conversationId, { count: 0, lastId: 0 });
      const unreadLive = mapSet(s.unreadLive, conversationId, []);
      return { unreadSeed, unreadLive, unreadCounts: unreadCounts(unreadSeed, unreadLive) };
    });
    fetch(`${this.api}/api/creator/conversations/${encodeURIComponent(conversationId)}/read`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${this.token}`, 'Content-Type': 'application/json' },
      body: '{}',
    }).catch(() => {});
  }

  setConversations(value) {
    this.set((s) => {
      const given = typeof value === 'function' ? value(s.conversations) : value;
      const conversations = Array.isArray(given) ? given : [];
      // The server's count covers its messages up to lastMessage; live ones after it add on.
      const unreadSeed = { ...s.unreadSeed };
      for (const c of conversations) {
        if (typeof c.unreadCount === 'number') {
          unreadSeed[c.id] = { count: c.unreadCount, lastId: c.lastMessage?.id ?? 0 };
        }
      }
      return { conversations, unreadSeed, unreadCounts: unreadCounts(unreadSeed, s.unreadLive) };
    });
  }

  /** Replace the open conversation's messages; live ones newer than the given list stay. */
  setCurrentMessages(value) {
    this.set((s) => {
      const cid = s.current;
      const old = currentOf(s);
      const given = (typeof value === 'function' ? value(old) : value) ?? [];
      const list = given.map((m) => toMessage(m));
      const newest = Math.max(0, ...list.filter((m) => !isPending(m)).map((m) => m.id));
      const keep = old.filter((m) => isPending(m) || m.id > newest);
      if (cid === null) {
        const messages = {};
        for (const m of list) (messages[m.conversationId] ??= []).push(m);
        for (const k of Object.keys(messages)) messages[k] = mergeMessages(messages[k], []);
        return { messages };
      }
      return { messages: mapSet(s.messages, cid, mergeMessages(list, keep)) };
    });
  }

  // -- pitches

  watchPitch(pitchId) {
    const n = this.pitchWatch.get(pitchId) ?? 0;
    this.pitchWatch.set(pitchId, n + 1);
    if (n === 0 && this.state.isConnected) this.subscribePitch(pitchId);
  }

  unwatchPitch(pitchId) {
    const n = (this.pitchWatch.get(pitchId) ?? 1) - 1;
    if (n > 0) {
      this.pitchWatch.set(pitchId, n);
      return;
    }
    this.pitchWatch.delete(pitchId);
    if (this.state.isConnected) this.pitchRequest({ type: 'pitch_leave', pitchId });
  }

  pitchRequest(frame, reply = null, retry = false) {
    if (!this.client) return Promise.resolve(null);
    return this.client.request(frame, reply, { retry }).catch((err) => {
      this.setPitch(frame.pitchId, { error: { code: err.code, message: err.message } });
      return null;
    });
  }

  subscribePitch(pitchId) {
    // Subscriptions belong to a connection: made again after every reconnect.
    this.pitchRequest({ type: 'pitch_view', pitchId });
    this.pitchRequest({ type: 'get_pitch_activity', pitchId }, 'pitch_activity');
  }

  setPitch(pitchId, patch) {
    this.set((s) => {
      const old = s.pitches[pitchId] ?? PITCH_EMPTY;
      const next = typeof patch === 'function' ? patch(old) : patch;
      return next ? { pitches: mapSet(s.pitches, pitchId, { ...old, ...next }) } : null;
    });
  }

  onPitchFrame(f) {
    const comment = (c) => ({
      commentId: c.commentId, userId: c.userId, username: c.username, comment: c.comment, timestamp: c.timestamp,
    });
    switch (f.type) {
      case 'pitch_activity':
        return this.setPitch(f.pitchId, {
          loaded: true, title: f.title, ownerId: f.ownerId, views: f.viewCount ?? 0,
          likes: f.likeCount ?? 0, likedByMe: !!f.likedByMe, error: null,
          comments: (f.comments ?? []).map(comment),
        });
      case 'pitch_viewed':
        return this.setPitch(f.pitchId, { views: f.viewCount });
      case 'pitch_liked':
      case 'pitch_unliked':
        return this.setPitch(f.pitchId, f.userId === this.state.userId
          ? { likes: f.likeCount, likedByMe: f.type === 'pitch_liked' }
          : { likes: f.likeCount });
      case 'new_comment':
      case 'comment_sent':
        return this.setPitch(f.pitchId, (p) => (p.comments.some((c) => c.commentId === f.commentId)
          ? null : { comments: [...p.comments, comment(f)] }));
      case 'user_typing':
        return this.setPitch(f.pitchId, (p) => {
          const { [f.userId]: _old, ...others } = p.typing;
          return { typing: f.isTyping ? { ...others, [f.userId]: f.username } : others };
        });
      default:
        return undefined;
    }
  }

  // -- notifications

  onNotification(f) {
    if (f.notificationId !== undefined
        && this.state.notifications.some((n) => n.notificationId === f.notificationId)) return;
    const entry = {
      type: f.type,
      message: f.message ?? describe(f),
      timestamp: f.createdAt ?? f.timestamp ?? new Date().toISOString(),
      pitchId: f.pitchId ?? null,
      notificationId: f.notificationId ?? null,
      read: !!f.readAt,
      data: f,
    };
    this.set((s) => ({
      notifications: [entry, ...s.notifications],
      notificationsUnread: s.notificationsUnread + (entry.read ? 0 : 1),
    }));
  }
}

const PITCH_EMPTY = Object.freeze({
  loaded: false, views: 0, likes: 0, likedByMe: false, comments: [], typing: {}, error: null,
});

function describe(f) {
  switch (f.type) {
    case 'nda_signed':
      return `${f.signedBy ?? f.username ?? 'Someone'} signed the NDA${f.pitchTitle ? ` for ${f.pitchTitle}` : ''}`;
    case 'pitch_liked':
      return `${f.username ?? 'Someone'} liked your pitch`;
    case 'new_comment':
      return `${f.username ?? 'Someone'} commented: ${preview(f.comment)}`;
    default:
      return f.title ?? f.type;
  }
}

/** Per conversation: the server's count, plus live unread ids newer than what it counted. */
function unreadCounts(seed, live) {
  const out = {};
  for (const key of new Set([...Object.keys(seed), ...Object.keys(live)])) {
    const base = seed[key] ?? { count: 0, lastId: 0 };
    out[key] = base.count + (live[key] ?? []).filter((id) => id > base.lastId).length;
  }
  return out;
}

function currentOf(s) {
  if (s.current !== null) return s.messages[s.current] ?? [];
  return mergeMessages([], Object.values(s.messages).flat());
}

// -- hooks -----------------------------------------------------------------------------------

const noSubscribe = () => () => {};
const emptySnapshot = () => EMPTY;

/** The shared session for these options (null without a URL or token) and its state. */
function useSession(options) {
  const url = options?.url ?? settings.url ?? defaultUrl();
  const token = options?.token ?? settings.token ?? storedToken();
  const session = url && token ? getSession(url, token, options) : null;
  const holding = React.useRef(null);
  React.useEffect(() => {
    if (!session) return undefined;
    session.acquire();
    holding.current = session;
    return () => {
      if (holding.current === session) session.release();
      holding.current = null;
    };
  }, [session]);
  const state = React.useSyncExternalStore(
    session ? session.subscribe : noSubscribe,
    session ? session.getSnapshot : emptySnapshot,
    emptySnapshot,
  );
  return { session, state, holding };
}

/**
 * The raw connection: `{isConnected, lastMessage, sendMessage, connect, disconnect}` plus
 * `connectionState` and `error`. `sendMessage(frame)` sends any frame; `send_message` frames
 * are kept until acknowledged. `disconnect()` lets go of the shared connection (it closes
 * when no other hook holds it); `connect()` takes hold again.
 */
export function useWebSocket(options = {}) {
  const { session, state, holding } = useSession(options);
  const callbacks = React.useRef(options);
  callbacks.current = options;
  React.useEffect(() => {
    if (!session) return undefined;
    session.hooks.add(callbacks);
    return () => { session.hooks.delete(callbacks); };
  }, [session]);
  const sendMessage = React.useCallback((frame) => {
    if (!session?.client) return Promise.reject(new PitcheyError('closed', 'not connected'));
    const sent = session.client.request(frame, null, { retry: frame?.type === 'send_message' });
    sent.catch((err) => session.set({ error: { code: err.code, message: err.message } }));
    return sent;
  }, [session]);
  const connect = React.useCallback(() => {
    if (session && holding.current !== session) {
      session.acquire();
      holding.current = session;
    }
  }, [session, holding]);
  const disconnect = React.useCallback(() => {
    if (session && holding.current === session) {
      holding.current = null;
      session.release();
    }
  }, [session, holding]);
  return {
    isConnected: state.isConnected,
    lastMessage: state.lastMessage,
    sendMessage,
    connect,
    disconnect,
    connectionState: state.connectionState,
    error: state.error,
  };
}

/** Chat state and actions, with the Pitchey `useMessaging` names; see react.d.ts. */
export function useMessaging(options = {}) {
  const { session, state } = useSession(options);
  React.useEffect(() => {
    if (!session) return undefined;
    session.messagingRefs += 1;
    return () => { session.messagingRefs -= 1; };
  }, [session]);
  const actions = React.useMemo(() => {
    const when = (fn) => (...args) => (session?.client ? fn(...args) : undefined);
    return {
      setConversations: (v) => session?.setConversations(v),
      setCurrentMessages: (v) => session?.setCurrentMessages(v),
      sendChatMessage: (cid, content, recipientId) => (session?.client
        ? session.sendChatMessage(cid, content, recipientId)
        : Promise.reject(new PitcheyError('closed', 'not connected'))),
      markMessageAsRead: when((id) => session.markMessageAsRead(id)),
      startTyping: when((cid) => session.client.startTyping(cid)),
      stopTyping: when((cid) => session.client.stopTyping(cid)),
      joinConversation: when((cid) => session.joinConversation(cid)),
      markConversationAsRead: when((cid) => session.markConversationAsRead(cid)),
    };
  }, [session]);
  const currentMessages = React.useMemo(() => currentOf(state), [state.messages, state.current]);
  const typingUsers = React.useMemo(() => {
    const out = {};
    for (const [cid, who] of Object.entries(state.typing)) out[cid] = Object.values(who);
    return out;
  }, [state.typing]);
  return {
    conversations: state.conversations,
    currentMessages,
    typingUsers,
    onlineUsers: state.onlineUsers,
    unreadCounts: state.unreadCounts,
    isConnected: state.isConnected,
    connectionState: state.connectionState,
    currentConversationId: state.current,
    userId: state.userId,
    error: state.error,
    ...actions,
  };
}

/** Live activity of one pitch: counts start from `get_pitch_activity`. */
export function usePitchUpdates(pitchId, options = {}) {
  const { session, state } = useSession(options);
  React.useEffect(() => {
    if (!session || pitchId === undefined || pitchId === null) return undefined;
    session.watchPitch(pitchId);
    return () => session.unwatchPitch(pitchId);
  }, [session, pitchId]);
  const actions = React.useMemo(() => ({
    trackView: () => session?.pitchRequest({ type: 'pitch_view', pitchId }),
    trackLike: () => session?.pitchRequest({ type: 'pitch_like', pitchId }, null, true),
    trackUnlike: () => session?.pitchRequest({ type: 'pitch_unlike', pitchId }, null, true),
    sendComment: (comment) => session?.pitchRequest(
      { type: 'pitch_comment', pitchId, comment, requestId: newRequestId() }, null, true),
    setTyping: (isTyping) => session?.pitchRequest({ type: 'typing', pitchId, isTyping: !!isTyping }),
  }), [session, pitchId]);
  const pitch = state.pitches[pitchId] ?? PITCH_EMPTY;
  const typingUsers = React.useMemo(() => Object.values(pitch.typing), [pitch.typing]);
  return {
    views: pitch.views,
    likes: pitch.likes,
    comments: pitch.comments,
    typingUsers,
    likedByMe: pitch.likedByMe,
    loaded: pitch.loaded,
    error: pitch.error,
    isConnected: state.isConnected,
    ...actions,
  };
}

/** Notifications (`nda_signed` and any frame with a `notificationId`), newest first. */
export function useNotifications(options = {}) {
  const { session, state } = useSession(options);
  const clearNotifications = React.useCallback(() => {
    session?.set({ notifications: [] });
  }, [session]);
  const markAsRead = React.useCallback((ids) => {
    if (!session?.client) return;
    const frame = ids ? { type: 'mark_notifications_read', notificationIds: ids }
      : { type: 'mark_notifications_read', all: true };
    session.client.request(frame).catch((err) => session.set({ error: { code: err.code, message: err.message } }));
    session.set((s) => ({
      notifications: s.notifications.map((n) => (!ids || ids.includes(n.notificationId) ? { ...n, read: true } : n)),
    }));
  }, [session]);
  return {
    notifications: state.notifications,
    clearNotifications,
    unreadCount: state.notificationsUnread,
    markAsRead,
    isConnected: state.isConnected,
  };
}

/** For tests and tools: how many shared connections exist (open or closing). */
export function connectionCount() {
  return new Set(registry.values()).size;
}
