// Types for client/react.js (`pitchey-ws/react`): the Pitchey frontend's hooks on one shared
// pitchey-ws connection per endpoint and token.
import type { Attachment, ConnectionState, MessageSentEvent, PitcheyClientOptions } from './pitchey-ws';

export interface PitcheyWsSettings {
  /** WebSocket endpoint. Default: `import.meta.env.VITE_WS_URL`, else ws(s) to the page's hostname on its port or 8000, path `/api/messages/ws`. */
  url?: string;
  /** Base of the HTTP API. Default: the endpoint's origin as http(s). */
  apiUrl?: string;
  /** A JWT. Default: `localStorage.authToken`; no token = no connection. */
  token?: string;
  /** A fresh JWT after 4001 or a refused handshake. Default: the token read again. */
  getToken?: () => string | null | Promise<string | null>;
  WebSocket?: new (url: string) => WebSocket;
  /** A send made while disconnected goes over `POST /api/messages/send` after this long (ms); default 5000, negative = never. */
  httpFallbackMs?: number;
  /** The shared connection closes this long after its last hook unmounts (ms); default 1000. */
  releaseDelayMs?: number;
  /** Browser notifications and toasts for chat events; default true. */
  notifications?: boolean;
  /** How long a toast stays (ms); default 6000. */
  toastMs?: number;
  /** Passed to PitcheyClient (reconnectBaseMs, pingIntervalMs, ...). */
  clientOptions?: Partial<PitcheyClientOptions>;
}

export interface HookOptions extends Omit<PitcheyWsSettings, 'notifications' | 'toastMs' | 'releaseDelayMs'> {
  /** Initial reconnect delay ceiling (ms), applied when this hook creates the connection. */
  reconnectInterval?: number;
}

export declare function configurePitcheyWs(options: PitcheyWsSettings): void;
export declare function defaultUrl(): string | null;
export declare function requestNotificationPermission(): Promise<NotificationPermission>;
/** A system notification when the tab is hidden (and permitted), else an in-page text toast. */
export declare function showNotification(title: string, body?: string): void;
export declare function connectionCount(): number;

export interface HookError {
  code: string;
  message: string;
  /** True when the connection stopped for good (expired or refused token, 1008). */
  fatal?: boolean;
}

export interface ServerFrame { type: string; [key: string]: any }

export interface UseWebSocketOptions extends HookOptions {
  onMessage?: (frame: ServerFrame) => void;
  onConnect?: (frame: ServerFrame) => void;
  onDisconnect?: (event: { code: number; reason: string; willReconnect: boolean }) => void;
}

export interface UseWebSocketResult {
  isConnected: boolean;
  lastMessage: ServerFrame | null;
  /** Any frame; `send_message` frames are kept until acknowledged. */
  sendMessage: (frame: ServerFrame) => Promise<any>;
  /** Take hold of the shared connection again after `disconnect()`. */
  connect: () => void;
  /** Let go of the shared connection (it closes when no hook holds it). */
  disconnect: () => void;
  connectionState: ConnectionState;
  error: HookError | null;
}

export declare function useWebSocket(options?: UseWebSocketOptions): UseWebSocketResult;

export interface ChatMessage {
  /** The message id; `pending:<requestId>` until the server acknowledged a send of yours. */
  id: number | string;
  messageId: number | null;
  conversationId: number;
  senderId: number;
  senderName: string;
  content: string;
  attachments: Attachment[];
  messageType: string;
  timestamp: string;
  sentAt: string;
  delivered: boolean;
  isRead: boolean;
  readAt: string | null;
  requestId?: string;
  pending?: boolean;
  failed?: boolean;
  [key: string]: any;
}

export interface Conversation {
  id: number;
  participants: { id: number; name: string; username: string; userType: string | null }[];
  participantName?: string;
  unreadCount?: number;
  lastMessage?: { id: number; [key: string]: any } | null;
  [key: string]: any;
}

type SetState<T> = (value: T | ((old: T) => T)) => void;

export interface UseMessagingResult {
  conversations: Conversation[];
  setConversations: SetState<Conversation[]>;
  /** The joined conversation's messages (all received ones before any join), by id, once each. */
  currentMessages: ChatMessage[];
  /** Replaces them; live messages newer than the given list and pending sends are kept. */
  setCurrentMessages: SetState<ChatMessage[] | any[]>;
  typingUsers: Record<number, string[]>;
  onlineUsers: Record<number, boolean>;
  unreadCounts: Record<number, number>;
  isConnected: boolean;
  connectionState: ConnectionState;
  currentConversationId: number | null;
  userId: number | null;
  error: HookError | null;
  sendChatMessage: (conversationId: number | null, content: string, recipientId?: number) => Promise<MessageSentEvent>;
  markMessageAsRead: (messageId: number) => void;
  startTyping: (conversationId: number) => void;
  stopTyping: (conversationId: number) => void;
  joinConversation: (conversationId: number) => void;
  markConversationAsRead: (conversationId: number) => void;
}

export declare function useMessaging(options?: HookOptions): UseMessagingResult;

export interface PitchComment {
  commentId?: number;
  userId?: number;
  username: string;
  comment: string;
  timestamp: string;
}

export interface UsePitchUpdatesResult {
  views: number;
  likes: number;
  comments: PitchComment[];
  typingUsers: string[];
  likedByMe: boolean;
  /** True once `pitch_activity` answered. */
  loaded: boolean;
  error: HookError | null;
  isConnected: boolean;
  trackView: () => void;
  trackLike: () => void;
  trackUnlike: () => void;
  sendComment: (comment: string) => void;
  setTyping: (isTyping: boolean) => void;
}

export declare function usePitchUpdates(pitchId: number, options?: HookOptions): UsePitchUpdatesResult;

export interface PitcheyNotification {
  type: string;
  message: string;
  timestamp: string;
  pitchId: number | null;
  notificationId: number | null;
  read: boolean;
  data: ServerFrame;
}

export interface UseNotificationsResult {
  notifications: PitcheyNotification[];
  clearNotifications: () => void;
  unreadCount: number;
  /** Marks these (or, without ids, all) read on the server. */
  markAsRead: (notificationIds?: number[]) => void;
  isConnected: boolean;
}

export declare function useNotifications(options?: HookOptions): UseNotificationsResult;
