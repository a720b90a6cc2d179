// Types for client/pitchey-ws.js. The wire shapes follow docs/protocol.md.

export declare const CloseCode: Readonly<{
  NORMAL: 1000;
  POLICY: 1008;
  SERVICE_RESTART: 1012;
  TRY_AGAIN_LATER: 1013;
  TOKEN_EXPIRED: 4001;
  CLIENT_TIMEOUT: 4000;
}>;

export interface PitcheyClientOptions {
  /** The WebSocket endpoint, e.g. `wss://chat.example.com/api/messages/ws` (relative in a browser). */
  url: string;
  /** A JWT. Give this, or `getToken`, or both (`token` is used first). */
  token?: string;
  /** Returns a fresh JWT; called on 4001, after a refused handshake, and when `token` expired. */
  getToken?: () => string | Promise<string>;
  /** WebSocket constructor; defaults to `globalThis.WebSocket`. */
  WebSocket?: new (url: string) => WebSocket;
  /** Resume point for `sync`: the `lastMessageId` of an earlier session. */
  lastMessageId?: number | null;
  /** First reconnect delay ceiling (full jitter), default 500. */
  reconnectBaseMs?: number;
  /** Largest reconnect delay, default 30000. */
  reconnectCapMs?: number;
  /** A connection open this long resets the backoff, default 10000. */
  stableAfterMs?: number;
  /** How often to ping, default 25000. */
  pingIntervalMs?: number;
  /** A pong missing this long means a dead connection, default 10000. */
  pongTimeoutMs?: number;
  /** The `connected` frame missing this long after opening means a failed attempt, default 15000. */
  connectTimeoutMs?: number;
  /** joinConversation/getMessages/getOnlineUsers/createConversation/markRead give up after this, default 30000. */
  requestTimeoutMs?: number;
  /** At most one `typing_start` per conversation per this many ms, default 3000. */
  typingThrottleMs?: number;
  /** `typing_stop` after this long without `startTyping`, default 5000. */
  typingIdleMs?: number;
  /** Sends written but not yet acknowledged, at most, default 16. */
  maxInFlightSends?: number;
  /** Client-side pacing, below the server's per-user token bucket: rate, default 20. */
  framesPerSecond?: number;
  /** Client-side pacing: burst, default 40. */
  framesBurst?: number;
}

export declare const DEFAULTS: Readonly<Required<Omit<PitcheyClientOptions,
  'url' | 'token' | 'getToken' | 'WebSocket' | 'lastMessageId'>>>;

export interface Attachment {
  type: string;
  url: string;
  filename: string;
  size: number;
  mimeType?: string;
}

export interface SendMessageInput {
  /** Wins when both are given. */
  conversationId?: number;
  /** The direct conversation with this user (created if missing). */
  recipientId?: number;
  content: string;
  attachments?: Attachment[];
  messageType?: string;
  pitchId?: number;
  subject?: string;
  /** Generated when omitted; reuse one only to retry the very same message. */
  requestId?: string;
}

export interface Message {
  messageId: number;
  conversationId: number;
  senderId: number;
  senderName: string;
  content: string;
  attachments: Attachment[];
  messageType: string;
  timestamp: string;
  delivered: boolean;
}

export interface NewMessageEvent extends Message {
  type: 'new_message';
  /** True when it came from the offline queue or a `sync`, not live. */
  queued?: boolean;
  queuedAt?: string;
}

export interface MessageSentEvent extends Message {
  type: 'message_sent';
  requestId?: string;
}

export interface HistoryEntry {
  id: number;
  messageId: number;
  conversationId: number;
  senderId: number;
  senderName: string;
  content: string;
  attachments: Attachment[];
  messageType: string;
  sentAt: string;
  timestamp: string;
  isRead: boolean;
}

export interface ConversationJoined {
  type: 'conversation_joined';
  conversationId: number;
  messages: HistoryEntry[];
  timestamp: string;
}

export interface MessagesPage {
  type: 'messages';
  conversationId: number;
  messages: HistoryEntry[];
  hasMore: boolean;
}

export interface MessageReadEvent {
  type: 'message_read';
  messageId: number;
  conversationId: number;
  readBy: number;
  readByName: string;
  readAt: string;
  queued?: boolean;
}

export interface UserTypingEvent {
  type: 'user_typing';
  userId: number;
  username: string;
  conversationId: number;
  isTyping: boolean;
  timestamp: string;
}

export interface UserOnlineEvent { type: 'user_online'; userId: number; username: string; timestamp: string }
export interface UserOfflineEvent { type: 'user_offline'; userId: number; username: string; lastSeen: string }

export interface OnlineUser {
  userId: number;
  username: string;
  userType: string | null;
  isOnline: boolean;
  lastSeen: string | null;
}

export interface ConversationCreated {
  type: 'conversation_created';
  conversationId: number;
  title: string | null;
  isGroup: boolean;
  participantIds: number[];
  createdBy: number;
  requestId?: string;
}

export interface ConnectedEvent {
  type: 'connected';
  userId: number;
  username: string;
  timestamp: string;
  /** False for the first connection of this client, true after a reconnect. */
  reconnected: boolean;
}

export interface DisconnectedEvent {
  /** The close code: 1006 for a dropped connection, 4000 when this client gave up on it. */
  code: number;
  reason: string;
  willReconnect: boolean;
}

export type ConnectionState = 'idle' | 'connecting' | 'online' | 'reconnecting' | 'closed';

export interface StateEvent {
  state: ConnectionState;
  /** With `reconnecting`: the delay before the next attempt. */
  retryInMs?: number;
  attempt?: number;
}

export interface ErrorEvent {
  code: string;
  message: string;
  /** What exactly was wrong, when `message` is a fixed text (send_message's). */
  detail?: string;
  requestId?: string;
  retryAfterMs?: number;
  /** True when the client stopped (1008, or 4001 without getToken). */
  fatal?: boolean;
}

export interface SyncedEvent {
  /** The sync cursor after catching up; null when there was nothing to sync from. */
  lastMessageId: number | null;
}

export interface PitcheyEvents {
  /** Every frame the server sends (except `pong`), raw, before any other event it causes. */
  frame: { type: string; [key: string]: any };
  connected: ConnectedEvent;
  disconnected: DisconnectedEvent;
  state: StateEvent;
  error: ErrorEvent;
  synced: SyncedEvent;
  new_message: NewMessageEvent;
  message_sent: MessageSentEvent;
  message_read: MessageReadEvent;
  user_typing: UserTypingEvent;
  user_online: UserOnlineEvent;
  user_offline: UserOfflineEvent;
  conversation_created: ConversationCreated;
  conversation_joined: ConversationJoined;
  messages: MessagesPage;
  online_users: { type: 'online_users'; users: OnlineUser[]; timestamp: string };
}

export declare class PitcheyError extends Error {
  constructor(code: string, message: string,
              extra?: { requestId?: string; retryAfterMs?: number; detail?: string });
  /** The server's error code (`forbidden`, `invalid_message`, ...) or `closed`, `policy`, `timeout`, `token_expired`. */
  code: string;
  requestId?: string;
  retryAfterMs?: number;
  /** What exactly was wrong, when `message` is a fixed text (send_message's). */
  detail?: string;
}

export declare function newRequestId(): string;

export declare class PitcheyClient {
  constructor(options: PitcheyClientOptions);
  readonly state: ConnectionState;
  readonly userId: number | null;
  /** Newest message id seen; persist it and pass it back as `lastMessageId`. */
  readonly lastMessageId: number | null;

  on<K extends keyof PitcheyEvents>(type: K, fn: (event: PitcheyEvents[K]) => void): () => void;
  on(type: string, fn: (event: any) => void): () => void;
  once<K extends keyof PitcheyEvents>(type: K, fn: (event: PitcheyEvents[K]) => void): () => void;
  once(type: string, fn: (event: any) => void): () => void;
  off(type: string, fn: (event: any) => void): void;

  /** Starts connecting; resolves at the next `connected`; rejects if the client stops. */
  connect(): Promise<void>;
  /** Closes for good; pending promises reject with code `closed`. */
  close(): void;

  sendMessage(message: SendMessageInput): Promise<MessageSentEvent>;
  /**
   * Any frame (a `requestId` is added). With `reply`, resolves with that answer; without, once the
   * server handled it. `retry: false`: dropped rather than resent when the connection is lost first.
   */
  request(frame: { type: string; [key: string]: any }, reply?: string | null,
    options?: { retry?: boolean }): Promise<any>;
  joinConversation(conversationId: number): Promise<ConversationJoined>;
  getMessages(conversationId: number, page?: { beforeMessageId?: number; limit?: number }): Promise<MessagesPage>;
  getOnlineUsers(): Promise<OnlineUser[]>;
  createConversation(participantIds: number[], options?: { title?: string }): Promise<ConversationCreated>;
  markRead(messageId: number): Promise<void>;
  startTyping(conversationId: number): void;
  stopTyping(conversationId: number): void;
}
