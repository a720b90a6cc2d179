// Test pages for client/react.js, bundled by tests/test_react.py with esbuild and served from a
// port of their own (so the daemon's CORS is exercised). ?mode= picks the page.
import { StrictMode, useEffect, useState } from 'react';
import { createRoot } from 'react-dom/client';
import {
  configurePitcheyWs, useMessaging, useNotifications, usePitchUpdates, useWebSocket,
} from '../../client/react.js';

const params = new URLSearchParams(location.search);
const API = params.get('api');
configurePitcheyWs({
  url: params.get('ws'),
  httpFallbackMs: Number(params.get('fallback') ?? 5000),
  releaseDelayMs: Number(params.get('release') ?? 1000),
  notifications: params.get('notify') !== '0',
  clientOptions: { reconnectBaseMs: 200, reconnectCapMs: 1000 },
  // Tests hand the page its next tokens; without any, the stored one is read again.
  getToken: () => (window.__nextTokens?.length ? window.__nextTokens.shift() : localStorage.getItem('authToken')),
});

const auth = () => ({ Authorization: `Bearer ${localStorage.getItem('authToken')}` });

/** A stand-in for the Pitchey Messages page: the hooks used the way it uses them. */
function Messages() {
  const {
    conversations, setConversations, currentMessages, setCurrentMessages, typingUsers,
    onlineUsers, unreadCounts, isConnected, connectionState, userId, sendChatMessage,
    markMessageAsRead, startTyping, stopTyping, joinConversation, markConversationAsRead,
  } = useMessaging();
  const [selected, setSelected] = useState(null);
  const [text, setText] = useState('');
  const messaging = useMessaging();
  window.__messaging = messaging;

  useEffect(() => {
    fetch(`${API}/api/messages/conversations`, { headers: auth() })
      .then((r) => r.json())
      .then((body) => setConversations(body.conversations));
  }, []);

  const select = async (conversation) => {
    setSelected(conversation);
    joinConversation(conversation.id);
    markConversationAsRead(conversation.id);
    const body = await fetch(`${API}/api/messages/${conversation.id}/messages`, { headers: auth() })
      .then((r) => r.json());
    setCurrentMessages(body.messages);
  };

  // What the page does with a message from the other side in the open conversation.
  useEffect(() => {
    for (const m of currentMessages) {
      if (selected && m.conversationId === selected.id && m.senderId !== userId && !m.isRead
          && typeof m.id === 'number') {
        markMessageAsRead(m.id);
      }
    }
  }, [currentMessages, selected, userId]);

  const send = async () => {
    if (!text || !selected) return;
    const content = text;
    setText('');
    stopTyping(selected.id);
    if (isConnected) {
      sendChatMessage(selected.id, content, selected.participants[0]?.id).catch(() => {});
    } else {
      const res = await fetch(`${API}/api/messages/send`, {
        method: 'POST', headers: { ...auth(), 'Content-Type': 'application/json' },
        body: JSON.stringify({ conversationId: selected.id, content }),
      });
      const body = await res.json();
      setCurrentMessages((list) => [...list, body.message]);
    }
  };

  const online = Object.values(onlineUsers).filter(Boolean).length;
  return (
    <div>
      <span id="conn" data-connected={String(isConnected)} data-state={connectionState}>
        {isConnected ? 'Connected' : 'Disconnected'}
      </span>
      <span id="online-count">{online}</span>
      <ul id="conversations">
        {conversations.map((c) => (
          <li key={c.id} data-conversation={c.id} onClick={() => select(c)}>
            <span className={onlineUsers[c.participants[0]?.id] ? 'dot online' : 'dot'}
              data-user={c.participants[0]?.id} />
            <span className="name">{c.participantName}</span>
            <span className="badge">{unreadCounts[c.id] || ''}</span>
          </li>
        ))}
      </ul>
      <div id="typing">{selected ? (typingUsers[selected.id] ?? []).join(', ') : ''}</div>
      <ul id="messages">
        {currentMessages.map((m) => (
          <li key={m.id} data-id={m.id} data-pending={m.pending ? '1' : '0'}
            data-read={m.isRead ? '1' : '0'} data-sender={m.senderId}>
            <span className="sender">{m.senderName}</span>
            <span className="body">{m.content}</span>
            <time>{m.sentAt || m.timestamp}</time>
          </li>
        ))}
      </ul>
      <input id="text" value={text}
        onChange={(e) => { setText(e.target.value); if (selected) startTyping(selected.id); }}
        onKeyDown={(e) => { if (e.key === 'Enter') send(); }} />
    </div>
  );
}

function Status({ name }) {
  const { isConnected } = useWebSocket({});
  return <span className="status" data-name={name}>{String(isConnected)}</span>;
}

function Counter() {
  const { unreadCounts } = useMessaging();
  const { notifications } = useNotifications();
  return <span id="counter">{Object.keys(unreadCounts).length + notifications.length}</span>;
}

/** Many hooks in many components: one socket. */
function Multi() {
  const [mounted, setMounted] = useState(true);
  window.__unmount = () => setMounted(false);
  window.__mount = () => setMounted(true);
  if (!mounted) return <span id="unmounted">unmounted</span>;
  return (
    <div>
      <Status name="a" />
      <Status name="b" />
      <Counter />
      <Messages />
    </div>
  );
}

function Pitch() {
  const pitchId = Number(params.get('pitch'));
  const p = usePitchUpdates(pitchId);
  window.__pitch = p;
  return (
    <div>
      <span id="views">{p.views}</span>
      <span id="likes">{p.likes}</span>
      <span id="pitch-typing">{p.typingUsers.join(', ')}</span>
      <ul id="comments">
        {p.comments.map((c, i) => <li key={i}><b>{c.username}</b>: <span className="comment">{c.comment}</span></li>)}
      </ul>
    </div>
  );
}

function Notes() {
  const { notifications, clearNotifications } = useNotifications();
  useWebSocket({});
  window.__clear = clearNotifications;
  return (
    <ul id="notifications">
      {notifications.map((n, i) => (
        <li key={i} data-type={n.type} data-pitch={n.pitchId}>{n.message}</li>
      ))}
    </ul>
  );
}

const pages = { messages: Messages, multi: Multi, pitch: Pitch, notify: Notes };
const Page = pages[params.get('mode') ?? 'messages'];
createRoot(document.getElementById('root')).render(<StrictMode><Page /></StrictMode>);
