/**
 * pitchey-ws client: a dependency-free ES module for browsers and Node 20+.
 *
 * It keeps one WebSocket to a pitchey-ws daemon alive and makes the protocol's delivery
 * guarantees usable from an app:
 *
 * - reconnects with full-jitter exponential backoff and obeys the close codes
 *   (4001: fresh token then reconnect; 1008: stop; 1012/1013/abnormal: back off and retry);
 * - sends `ping` on a timer and treats a missing `pong` as a dead connection;
 * - keeps every `sendMessage` until the server acknowledged it, each with one `requestId`, so
 *   a send made offline, or in flight when the socket dropped, is stored exactly once;
 * - after every reconnect asks for `sync` from the newest message id it has seen, so a frame
 *   lost with a dying connection is recovered, and drops repeats by `messageId`;
 * - unwraps `queued_message` into the ordinary `new_message` / `message_read` events.
 *
 * The wire protocol is docs/protocol.md; usage is docs/client.md.
 *
 * @module pitchey-ws
 */

/** Close codes the server uses, and the one this client uses for a dead connection. */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  POLICY: 1008,
  SERVICE_RESTART: 1012,
  TRY_AGAIN_LATER: 1013,
  TOKEN_EXPIRED: 4001,
  /** Chosen by this client when a pong or the `connected` frame did not arrive in time. */
  CLIENT_TIMEOUT: 4000,
});

/** @type {Readonly<Required<Omit<import('./pitchey-ws').PitcheyClientOptions, 'url' | 'token' | 'getToken' | 'WebSocket' | 'lastMessageId'>>>} */
export const DEFAULTS = Object.freeze({
  reconnectBaseMs: 500,
  reconnectCapMs: 30000,
  stableAfterMs: 10000,
  pingIntervalMs: 25000,
  pongTimeoutMs: 10000,
  connectTimeoutMs: 15000,
  requestTimeoutMs: 30000,
  typingThrottleMs: 3000,
  typingIdleMs: 5000,
  maxInFlightSends: 16,
  framesPerSecond: 20,
  framesBurst: 40,
});

/** Server frames that answer one client frame; the server answers a connection's frames in order. */
const REPLIES = new Set([
  'pong', 'conversation_joined', 'messages', 'online_users', 'sync_complete', 'conversations',
  'pitch_activity', 'notifications',
]);
const SEEN_LIMIT = 10000;

/** An error reported by the server (`error` frame) or by this client. */
export class PitcheyError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {{requestId?: string, retryAfterMs?: number, detail?: string}} [extra]
   */
  constructor(code, message, extra = {}) {
    super(message);
    this.name = 'PitcheyError';
    /** @type {string} */
    this.code = code;
    /** @type {string | undefined} */
    this.requestId = extra.requestId;
    /** @type {number | undefined} */
    this.retryAfterMs = extra.retryAfterMs;
    /** What exactly was wrong, when `message` is a fixed text (send_message's). @type {string | undefined} */
    this.detail = extra.detail;
  }
}

/** A random id for `requestId`; works in insecure browser contexts too (no randomUUID). */
export function newRequestId() {
  const bytes = new Uint8Array(16);
  globalThis.crypto.getRandomValues(bytes);
  return 'r-' + Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

/**
 * Milliseconds until a JWT's `exp`, or null when it cannot be read (the server decides then).
 * @param {string} token
 */
function msUntilExpiry(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const exp = JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), '='))).exp;
    return typeof exp === 'number' ? exp * 1000 - Date.now() : null;
  } catch {
    return null;
  }
}

/**
 * A reconnecting pitchey-ws connection. Create it, add listeners with `on`, then `connect()`.
 */
export class PitcheyClient {
  /** @param {import('./pitchey-ws').PitcheyClientOptions} options */
  constructor(options) {
    if (!options || typeof options.url !== 'string') throw new TypeError('options.url is required');
    if (!options.token && typeof options.getToken !== 'function') {
      throw new TypeError('options.token or options.getToken is required');
    }
    const WS = options.WebSocket ?? globalThis.WebSocket;
    if (typeof WS !== 'function') {
      throw new TypeError('no WebSocket: pass options.WebSocket (Node 20: run with --experimental-websocket)');
    }
    /** @private */ this._WS = WS;
    /** @private */ this._opts = { ...DEFAULTS };
    for (const key of Object.keys(DEFAULTS)) {
      if (options[key] !== undefined) this._opts[key] = options[key];
    }
    /** @private */ this._url = endpoint(options.url);
    /** @private */ this._token = options.token ?? null;
    /** @private */ this._getToken = options.getToken ?? null;
    /** @private */ this._tokenStale = false;
    /** @private @type {Map<string, Set<Function>>} */ this._listeners = new Map();
    /** @private */ this._state = 'idle';
    /** @private @type {any} */ this._ws = null;
    /** @private */ this._conn = 0; // increases with every socket; tags what was sent on which
    /** @private */ this._online = false;
    /** @private */ this._stopped = false;
    /** @private */ this._started = false;
    /** @private */ this._everConnected = false;
    /** @private */ this._attempt = 0;
    /** @private */ this._timers = { retry: null, stable: null, ping: null, connect: null, pump: null };
    /** @private @type {number | null} */ this._maxSeen = options.lastMessageId ?? null;
    /** @private @type {number | null} */ this._syncFrom = null; // progress of an unfinished sync
    /** @private */ this._seen = new Set();
    /** @private */ this._seenReads = new Set();
    /** @private @type {Map<string, any>} requestId -> send waiting for message_sent */
    this._outbox = new Map();
    /** @private @type {any[]} frames to write, in order, before outbox sends */
    this._pending = [];
    /** @private @type {any[]} frames written on this socket, in order, awaiting their answer */
    this._inflight = [];
    /** @private */ this._needConfirm = false;
    /** @private */ this._bucket = { tokens: this._opts.framesBurst, at: Date.now(), pausedUntil: 0 };
    /** @private @type {Map<number, {lastSent: number, idle: any}>} */ this._typing = new Map();
    /** @private @type {{resolve: Function, reject: Function}[]} */ this._connectWaiters = [];
    /** @private @type {number | null} */ this._userId = null;
  }

  /** connecting | online | reconnecting | closed (or idle before `connect()`). */
  get state() { return this._state; }

  /** The user id from the last `connected` frame. */
  get userId() { return this._userId; }

  /** Newest message id seen: persist it and pass it back as `lastMessageId` to resume. */
  get lastMessageId() { return this._maxSeen; }

  // -- events ---------------------------------------------------------------------------------

  /**
   * Listen for an event; returns a function that removes the listener.
   * @param {string} type
   * @param {(data: any) => void} fn
   */
  on(type, fn) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(fn);
    return () => this.off(type, fn);
  }

  /** @param {string} type @param {(data: any) => void} fn */
  off(type, fn) {
    this._listeners.get(type)?.delete(fn);
  }

  /** @param {string} type @param {(data: any) => void} fn */
  once(type, fn) {
    const off = this.on(type, (data) => { off(); fn(data); });
    return off;
  }

  /** @private */
  _emit(type, data) {
    for (const fn of [...(this._listeners.get(type) ?? [])]) {
      try {
        fn(data);
      } catch (err) {
        // A broken listener must not break delivery; surface it like EventTarget does.
        queueMicrotask(() => { throw err; });
      }
    }
  }

  // -- lifecycle ------------------------------------------------------------------------------

  /** Start (or keep) connecting; resolves at the next `connected`, rejects if the client stops. */
  connect() {
    if (this._stopped) return Promise.reject(new PitcheyError('closed', 'client is closed'));
    if (this._online) return Promise.resolve();
    const waiting = new Promise((resolve, reject) => this._connectWaiters.push({ resolve, reject }));
    if (!this._started) {
      this._started = true;
      this._open();
    }
    return waiting;
  }

  /** Close for good: the socket with 1000, every pending promise rejected, no reconnect. */
  close() {
    if (this._stopped) return;
    this._stop(new PitcheyError('closed', 'client was closed'));
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      try { ws.close(CloseCode.NORMAL, 'client closed'); } catch { /* already closing */ }
      this._emit('disconnected', { code: CloseCode.NORMAL, reason: 'client closed', willReconnect: false });
    }
  }

  /** @private */
  _stop(error) {
    this._stopped = true;
    this._online = false;
    this._clearTimers();
    this._clearTyping();
    for (const entry of [...this._pending, ...this._inflight]) this._settle(entry, error);
    for (const entry of this._outbox.values()) this._settle(entry, error);
    this._pending = [];
    this._inflight = [];
    this._outbox.clear();
    for (const w of this._connectWaiters.splice(0)) w.reject(error);
    this._setState('closed');
  }

  /** @private */
  _setState(state, extra = {}) {
    this._state = state;
    this._emit('state', { state, ...extra });
  }

  /** @private */
  _clearTimers() {
    for (const key of Object.keys(this._timers)) {
      clearTimeout(this._timers[key]);
      this._timers[key] = null;
    }
  }

  /** @private */
  async _open() {
    const conn = ++this._conn;
    this._setState('connecting', { attempt: this._attempt });
    try {
      await this._freshToken();
    } catch (err) {
      if (conn !== this._conn || this._stopped) return;
      this._emit('error', { code: 'token_unavailable', message: String(err?.message ?? err) });
      this._reconnectLater(false);
      return;
    }
    if (conn !== this._conn || this._stopped) return;
    const url = new URL(this._url);
    url.searchParams.set('token', this._token);
    let ws;
    try {
      ws = new this._WS(url.toString());
    } catch (err) {
      this._emit('error', { code: 'connect_failed', message: String(err?.message ?? err) });
      this._reconnectLater(false);
      return;
    }
    this._ws = ws;
    this._online = false;
    this._timers.connect = setTimeout(
      () => this._lost(ws, CloseCode.CLIENT_TIMEOUT, 'no connected frame in time'),
      this._opts.connectTimeoutMs,
    );
    ws.onmessage = (event) => { if (ws === this._ws) this._onFrame(event.data); };
    ws.onclose = (event) => this._lost(ws, event.code, event.reason);
    // Browsers follow an error with close; Node 20's WebSocket may not (refused connection).
    ws.onerror = () => this._lost(ws, 1006, 'connection error');
  }

  /** @private */
  async _freshToken() {
    const left = this._token ? msUntilExpiry(this._token) : 0;
    const stale = !this._token || this._tokenStale || (left !== null && left < 1000);
    if (stale && this._getToken) {
      const token = await this._getToken();
      if (typeof token !== 'string' || !token) throw new Error('getToken() gave no token');
      this._token = token;
      this._tokenStale = false;
    }
  }

  /**
   * The socket is gone (closed, failed, or given up on). Decide what happens next.
   * @private
   */
  _lost(ws, code, reason) {
    if (ws !== this._ws) return; // an old socket, already handled
    this._ws = null;
    try { ws.close(CloseCode.CLIENT_TIMEOUT, 'gone'); } catch { /* already closed */ }
    const wasOnline = this._online;
    this._online = false;
    this._clearTimers();
    this._clearTyping();
    this._requeueInflight();
    if (this._stopped) return;
    const fatal = code === CloseCode.POLICY || (code === CloseCode.TOKEN_EXPIRED && !this._getToken);
    this._emit('disconnected', { code, reason, willReconnect: !fatal });
    if (code === CloseCode.POLICY) {
      const error = new PitcheyError('policy', `server closed the connection (1008 ${reason}); not reconnecting`);
      this._emit('error', { code: 'policy', message: error.message, fatal: true });
      this._stop(error);
      return;
    }
    if (code === CloseCode.TOKEN_EXPIRED) {
      if (!this._getToken) {
        const error = new PitcheyError('token_expired', 'token expired and no getToken() was given');
        this._emit('error', { code: 'token_expired', message: error.message, fatal: true });
        this._stop(error);
        return;
      }
      this._tokenStale = true;
      this._reconnectLater(this._attempt === 0);
      return;
    }
    // A refused handshake (401 for an expired or revoked token) looks like a plain failure.
    if (!wasOnline && this._getToken) this._tokenStale = true;
    this._reconnectLater(false);
  }

  /** Full jitter: a uniform delay in [0, min(cap, base * 2^attempt)). @private */
  _reconnectLater(immediate) {
    const { reconnectBaseMs: base, reconnectCapMs: cap } = this._opts;
    const ceiling = Math.min(cap, base * 2 ** Math.min(this._attempt, 30));
    const delay = immediate ? 0 : Math.floor(Math.random() * ceiling);
    this._attempt += 1;
    this._setState('reconnecting', { retryInMs: delay, attempt: this._attempt });
    this._timers.retry = setTimeout(() => this._open(), delay);
  }

  /** Frames written on the dead socket: retry reads and marks there, drop the rest. @private */
  _requeueInflight() {
    const again = [];
    for (const entry of this._inflight) {
      if (entry.settled) continue;
      if (entry.retry) again.push(entry);
      else this._settle(entry, null);
    }
    this._inflight = [];
    this._needConfirm = false;
    for (const entry of this._pending) if (!entry.retry) this._settle(entry, null);
    this._pending = [...again, ...this._pending.filter((e) => e.retry && !e.settled)];
    for (const entry of this._outbox.values()) entry.sentOn = 0;
  }

  // -- incoming -------------------------------------------------------------------------------

  /** @private */
  _onFrame(raw) {
    let frame;
    try {
      frame = JSON.parse(raw);
    } catch {
      this._emit('error', { code: 'bad_frame', message: 'server sent a frame that is not JSON' });
      return;
    }
    if (!frame || typeof frame !== 'object' || typeof frame.type !== 'string') return;
    if (frame.type !== 'pong') this._emit('frame', frame);
    switch (frame.type) {
      case 'connected': return this._onConnected(frame);
      case 'queued_message': return this._onQueued(frame);
      case 'new_message': return this._onNewMessage(frame);
      case 'message_read': return this._onRead(frame);
      case 'message_sent': return this._onSent(frame);
      case 'error': return this._onError(frame);
      case 'sync_required':
        // Several daemons lost touch (docs/protocol.md): catch up on this connection.
        if (this._syncFrom === null && this._maxSeen !== null) {
          this._startSync(this._maxSeen);
          this._pump();
        }
        this._emit('sync_required', frame);
        return;
      default:
        if (REPLIES.has(frame.type) || (frame.type === 'conversation_created' && frame.requestId)) {
          this._onReply(frame);
        }
        if (frame.type !== 'pong' && frame.type !== 'sync_complete') this._emit(frame.type, frame);
    }
  }

  /** @private */
  _onConnected(frame) {
    clearTimeout(this._timers.connect);
    this._online = true;
    this._userId = frame.userId;
    const reconnected = this._everConnected;
    this._everConnected = true;
    this._timers.stable = setTimeout(() => { this._attempt = 0; }, this._opts.stableAfterMs);
    this._schedulePing();
    this._setState('online');
    this._emit('connected', { ...frame, reconnected });
    for (const w of this._connectWaiters.splice(0)) w.resolve();
    const since = this._syncFrom ?? this._maxSeen;
    if (since !== null) this._startSync(since);
    else this._emit('synced', { lastMessageId: null });
    this._pump();
  }

  /** @private */
  _startSync(since) {
    this._syncFrom = since;
    const frame = { type: 'sync', sinceMessageId: since, requestId: newRequestId() };
    this._pending.unshift(this._entry(frame, {
      reply: 'sync_complete', internal: true, retry: false,
      resolve: (done) => {
        this._syncFrom = done.lastMessageId;
        if (done.hasMore) {
          this._startSync(done.lastMessageId);
          this._pump();
        } else {
          this._syncFrom = null;
          this._emit('synced', { lastMessageId: done.lastMessageId });
        }
      },
      reject: () => { /* stays unfinished: the next connection syncs from _syncFrom */ },
    }));
  }

  /** @private */
  _onQueued(frame) {
    const { originalType, ...rest } = frame;
    const unwrapped = { ...rest, type: originalType, queued: true };
    if (originalType === 'new_message') this._onNewMessage(unwrapped);
    else if (originalType === 'message_read') this._onRead(unwrapped);
    else if (originalType) this._emit(originalType, unwrapped);
  }

  /** @private */
  _see(id) {
    if (typeof id !== 'number') return true;
    if (this._maxSeen === null || id > this._maxSeen) this._maxSeen = id;
    if (this._seen.has(id)) return false;
    this._seen.add(id);
    if (this._seen.size > SEEN_LIMIT) this._seen.delete(this._seen.values().next().value);
    return true;
  }

  /** @private */
  _onNewMessage(frame) {
    if (this._see(frame.messageId)) this._emit('new_message', frame);
  }

  /** @private */
  _onRead(frame) {
    const key = `${frame.messageId}:${frame.readBy}`;
    if (this._seenReads.has(key)) return;
    this._seenReads.add(key);
    if (this._seenReads.size > SEEN_LIMIT) this._seenReads.delete(this._seenReads.values().next().value);
    this._emit('message_read', frame);
  }

  /** @private */
  _onSent(frame) {
    this._see(frame.messageId);
    const typing = this._typing.get(frame.conversationId);
    if (typing) { // the server ended our typing state with the message
      clearTimeout(typing.idle);
      this._typing.delete(frame.conversationId);
    }
    const entry = frame.requestId ? this._outbox.get(frame.requestId) : undefined;
    if (entry) {
      this._outbox.delete(frame.requestId);
      this._settle(entry, null, frame);
    }
    this._emit('message_sent', frame);
    this._pump();
  }

  /** A reply answers the oldest unanswered frame; silent frames before it succeeded. @private */
  _onReply(frame) {
    while (this._inflight.length && this._inflight[0].reply === null) {
      this._settle(this._inflight.shift(), null);
    }
    const head = this._inflight[0];
    if (!head || head.reply !== frame.type) return; // unsolicited or after a timeout: ignore
    this._inflight.shift();
    this._settle(head, null, frame);
  }

  /** @private */
  _onError(frame) {
    const error = new PitcheyError(frame.code, frame.message, frame);
    const rid = frame.requestId;
    const send = rid ? this._outbox.get(rid) : undefined;
    if (send) {
      if (frame.code === 'rate_limited') return this._backOffServer(frame, () => { send.sentOn = 0; });
      this._outbox.delete(rid);
      this._settle(send, error);
      this._pump();
      return;
    }
    let index = rid ? this._inflight.findIndex((e) => e.frame.requestId === rid) : 0;
    if (index >= 0 && index < this._inflight.length) {
      // Frames before the one this error answers were handled without an answer: they succeeded.
      for (const done of this._inflight.splice(0, index)) this._settle(done, null);
      const entry = this._inflight.shift();
      if (frame.code === 'rate_limited' && !entry.settled) {
        if (entry.ping) this._settle(entry, null);
        return this._backOffServer(frame, () => { if (!entry.ping) this._pending.unshift(entry); });
      }
      if (!entry.settled) {
        this._settle(entry, error);
        if (!entry.userFacing) this._emit('error', { ...frame, fatal: false });
      }
      return;
    }
    this._emit('error', { ...frame, fatal: false });
  }

  /** The server dropped a frame for rate: pause writing as told, then write it again. @private */
  _backOffServer(frame, requeue) {
    requeue();
    // Wait as told, then restart from an empty bucket so the retries are paced too.
    this._bucket.pausedUntil = Date.now() + (frame.retryAfterMs ?? 1000);
    this._bucket.tokens = 0;
    this._pump();
  }

  // -- outgoing -------------------------------------------------------------------------------

  /** @private */
  _entry(frame, options = {}) {
    return {
      frame, reply: null, retry: true, internal: false, ping: false, userFacing: false,
      settled: false, timer: null, resolve: () => {}, reject: () => {}, ...options,
    };
  }

  /** @private */
  _settle(entry, error, value) {
    if (entry.settled) return;
    entry.settled = true;
    clearTimeout(entry.timer);
    if (error) entry.reject(error);
    else entry.resolve(value);
  }

  /** A frame that gets one reply of type `reply` (or, with reply null, none). @private */
  _request(frame, reply, pick = (f) => f, retry = true) {
    if (this._stopped) return Promise.reject(new PitcheyError('closed', 'client is closed'));
    return new Promise((resolve, reject) => {
      const entry = this._entry({ ...frame, requestId: frame.requestId ?? newRequestId() }, {
        reply, retry, userFacing: true, resolve: (f) => resolve(pick(f)), reject,
      });
      entry.timer = setTimeout(() => {
        this._settle(entry, new PitcheyError('timeout', `no answer to ${frame.type} in time`));
        this._pending = this._pending.filter((e) => e !== entry);
      }, this._opts.requestTimeoutMs);
      this._pending.push(entry);
      this._pump();
    });
  }

  /** Write what is due, within the client-side rate so the server never has to drop. @private */
  _pump() {
    if (!this._online || this._timers.pump) return;
    for (;;) {
      const next = this._nextToWrite();
      if (!next) return;
      const wait = this._takeToken();
      if (wait > 0) {
        this._timers.pump = setTimeout(() => { this._timers.pump = null; this._pump(); }, wait);
        return;
      }
      if (next === this._pending[0]) this._pending.shift();
      this._write(next);
    }
  }

  /** The next entry to write, left in place (the rate may make it wait). @private */
  _nextToWrite() {
    while (this._pending.length && this._pending[0].settled) this._pending.shift();
    const head = this._pending[0];
    // Silent frames are followed by a ping, so an error without requestId is attributable.
    if (this._needConfirm && (!head || head.reply !== null)) {
      this._needConfirm = false;
      this._pending.unshift(this._pingEntry());
      return this._pending[0];
    }
    if (head) return head;
    let inFlight = 0;
    for (const entry of this._outbox.values()) {
      if (entry.sentOn === this._conn) {
        inFlight += 1;
      } else if (inFlight < this._opts.maxInFlightSends) {
        return entry;
      }
    }
    return null;
  }

  /** @private */
  _takeToken() {
    const b = this._bucket;
    const now = Date.now();
    if (now < b.pausedUntil) return b.pausedUntil - now;
    const rate = this._opts.framesPerSecond;
    b.tokens = Math.min(this._opts.framesBurst, b.tokens + ((now - b.at) / 1000) * rate);
    b.at = now;
    if (b.tokens >= 1) {
      b.tokens -= 1;
      return 0;
    }
    return Math.ceil(((1 - b.tokens) / rate) * 1000);
  }

  /** @private */
  _write(entry) {
    const isSend = entry.frame.type === 'send_message';
    try {
      this._ws.send(JSON.stringify(entry.frame));
    } catch {
      return; // the socket is going away; its close handler requeues
    }
    if (isSend) {
      entry.sentOn = this._conn;
      return;
    }
    this._inflight.push(entry);
    if (entry.ping) {
      const ws = this._ws;
      entry.timer = setTimeout(
        () => this._lost(ws, CloseCode.CLIENT_TIMEOUT, 'no pong in time'),
        this._opts.pongTimeoutMs,
      );
    }
    this._needConfirm = entry.reply === null;
  }

  /** @private */
  _pingEntry() {
    const frame = { type: 'ping', requestId: newRequestId() };
    return this._entry(frame, { reply: 'pong', ping: true, retry: false, internal: true });
  }

  /** @private */
  _schedulePing() {
    this._timers.ping = setTimeout(() => {
      this._pending.unshift(this._pingEntry());
      this._pump();
      this._schedulePing();
    }, this._opts.pingIntervalMs);
  }

  // -- public helpers -------------------------------------------------------------------------

  /**
   * Send any frame (a `requestId` is added). With `reply`, resolves with the first frame of that
   * type answering it; without, once the server handled it silently. Rejects with the server's
   * `error`. With `retry: false` it is dropped, not resent, when the connection is lost first.
   * @param {{type: string, [key: string]: any}} frame
   * @param {string | null} [reply]
   * @param {{retry?: boolean}} [options]
   */
  request(frame, reply = null, options = {}) {
    if (!frame || typeof frame.type !== 'string') return Promise.reject(new TypeError('frame.type is required'));
    if (frame.type === 'send_message') return this.sendMessage(frame);
    return this._request(frame, reply, undefined, options.retry ?? true);
  }

  /**
   * Send a message. Kept until the server acknowledges it, across reconnects, under one
   * `requestId`, so it is stored once. Resolves with the `message_sent` frame.
   * @param {import('./pitchey-ws').SendMessageInput} message
   */
  sendMessage(message) {
    if (this._stopped) return Promise.reject(new PitcheyError('closed', 'client is closed'));
    const { conversationId, recipientId, content } = message ?? {};
    if (typeof content !== 'string' || content.length === 0) {
      return Promise.reject(new TypeError('content must be a non-empty string'));
    }
    if (!Number.isInteger(conversationId) && !Number.isInteger(recipientId)) {
      return Promise.reject(new TypeError('conversationId or recipientId is required'));
    }
    const requestId = message.requestId ?? newRequestId();
    if (this._outbox.has(requestId)) {
      return Promise.reject(new TypeError(`a send with requestId ${requestId} is already pending`));
    }
    const frame = { type: 'send_message', requestId };
    for (const key of ['conversationId', 'recipientId', 'content', 'attachments', 'messageType', 'pitchId', 'subject']) {
      if (message[key] !== undefined) frame[key] = message[key];
    }
    return new Promise((resolve, reject) => {
      this._outbox.set(requestId, this._entry(frame, { resolve, reject, sentOn: 0 }));
      this._pump();
    });
  }

  /**
   * The newest page of a conversation's history; resolves with `conversation_joined`.
   * Message ids in it count as seen: `sync` and replays will not repeat them as `new_message`.
   * @param {number} conversationId
   */
  joinConversation(conversationId) {
    return this._request({ type: 'join_conversation', conversationId }, 'conversation_joined', (f) => {
      for (const m of f.messages ?? []) this._see(m.messageId);
      return f;
    });
  }

  /**
   * An older page of history; resolves with the `messages` frame.
   * @param {number} conversationId
   * @param {{beforeMessageId?: number, limit?: number}} [page]
   */
  getMessages(conversationId, page = {}) {
    const frame = { type: 'get_messages', conversationId };
    if (page.beforeMessageId !== undefined) frame.beforeMessageId = page.beforeMessageId;
    if (page.limit !== undefined) frame.limit = page.limit;
    return this._request(frame, 'messages', (f) => {
      for (const m of f.messages ?? []) this._see(m.messageId);
      return f;
    });
  }

  /** The caller's online contacts (the `users` of `online_users`). */
  getOnlineUsers() {
    return this._request({ type: 'get_online_users' }, 'online_users', (f) => f.users);
  }

  /**
   * Create a conversation; resolves with `conversation_created`.
   * @param {number[]} participantIds
   * @param {{title?: string}} [options]
   */
  createConversation(participantIds, options = {}) {
    const frame = { type: 'create_conversation', participantIds };
    if (options.title !== undefined) frame.title = options.title;
    return this._request(frame, 'conversation_created');
  }

  /**
   * Mark a message read. Resolves once the server has handled it (it answers nothing on
   * success); rejects with the server's error. Retried after a reconnect (it is idempotent).
   * @param {number} messageId
   */
  markRead(messageId) {
    return this._request({ type: 'mark_read', messageId }, null, () => undefined);
  }

  /**
   * Call on every keystroke: sends `typing_start` at most once per `typingThrottleMs` per
   * conversation, and `typing_stop` after `typingIdleMs` without a call. Nothing is sent offline.
   * @param {number} conversationId
   */
  startTyping(conversationId) {
    if (!this._online) return;
    const now = Date.now();
    let state = this._typing.get(conversationId);
    if (!state) {
      state = { lastSent: 0, idle: null };
      this._typing.set(conversationId, state);
    }
    clearTimeout(state.idle);
    state.idle = setTimeout(() => this.stopTyping(conversationId), this._opts.typingIdleMs);
    if (now - state.lastSent >= this._opts.typingThrottleMs) {
      state.lastSent = now;
      this._typingFrame('typing_start', conversationId);
    }
  }

  /** Send `typing_stop` if `startTyping` announced typing in this conversation. @param {number} conversationId */
  stopTyping(conversationId) {
    const state = this._typing.get(conversationId);
    if (!state) return;
    clearTimeout(state.idle);
    this._typing.delete(conversationId);
    if (this._online) this._typingFrame('typing_stop', conversationId);
  }

  /** @private */
  _typingFrame(type, conversationId) {
    // Ephemeral: not retried after a reconnect; errors go to the 'error' event.
    this._pending.push(this._entry({ type, conversationId, requestId: newRequestId() }, { retry: false }));
    this._pump();
  }

  /** @private */
  _clearTyping() {
    for (const state of this._typing.values()) clearTimeout(state.idle);
    this._typing.clear();
  }
}

/**
 * The endpoint as a ws(s) URL; a relative URL resolves against the page in a browser.
 * @param {string} url
 */
function endpoint(url) {
  const base = globalThis.location?.href;
  const parsed = base ? new URL(url, base) : new URL(url);
  if (parsed.protocol === 'http:') parsed.protocol = 'ws:';
  if (parsed.protocol === 'https:') parsed.protocol = 'wss:';
  return parsed.toString();
}
