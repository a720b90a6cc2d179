"""pitchey-ws: real-time messaging for Pitchey over WebSocket, stored in SQLite.

Run ``python pitchey_ws.py serve --help`` or ``python pitchey_ws.py token --help``.

This module wires things together: the CLI, the HTTP routes served before the WebSocket
handshake, the per-connection loop, and the handler table. Parsing lives in ``protocol``,
persistence in ``store``, live connections and presence in ``hub``.
"""

from __future__ import annotations

import argparse
import asyncio
import http
import json
import logging
import math
import os
import re
import signal
import sqlite3
import sys
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

import config as cfg
import demo
import protocol as p
import store as st
from auth import AuthError, Identity, Verifier
from conversations import Conversations
from hub import Background, Client, Event, Hub, expiry_delay, iso_expiry
from metrics import Metrics
from typing_indicators import TypingTracker

log = logging.getLogger("pitchey.server")
HERE = Path(__file__).resolve().parent
WS_PATH = "/api/messages/ws"
STATIC = {
    "/client/pitchey-ws.js": ("client/pitchey-ws.js", "text/javascript; charset=utf-8"),
    "/client/pitchey-ws.d.ts": ("client/pitchey-ws.d.ts", "text/plain; charset=utf-8"),
}
DEMO_STATIC = {
    "/": ("client/demo.html", "text/html; charset=utf-8"),
}

Handler = Callable[[Client, Any], Awaitable[None]]


class InFlight:
    """Requests being handled, by key: a repeat of one waits until the first is done."""

    def __init__(self) -> None:
        self._waiting: dict[tuple[str, int, str], list[asyncio.Future[None]]] = {}

    async def claim(self, key: tuple[str, int, str]) -> None:
        """Return once the caller holds ``key``; the caller must ``release`` it."""
        while (waiting := self._waiting.get(key)) is not None:
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiting.append(turn)
            await turn
        self._waiting[key] = []

    def release(self, key: tuple[str, int, str]) -> None:
        for turn in self._waiting.pop(key):
            if not turn.done():
                turn.set_result(None)


class App:
    """The daemon: one config, one store, one hub. ``run()`` serves until stopped."""

    def __init__(self, config: cfg.Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.store = st.Store(
            config.database.path,
            synchronous=config.database.synchronous.upper(),
            max_batch=config.database.max_batch,
            on_commit=self._observe_commit,
        )
        self.verifier = Verifier(config.auth)
        self.limits = p.Limits(
            max_content_chars=config.limits.max_content_chars,
            max_attachments=config.limits.max_attachments,
            max_attachment_field_chars=config.limits.max_attachment_field_chars,
            max_request_id_chars=config.limits.max_request_id_chars,
            max_participants=config.limits.max_participants,
            max_title_chars=config.limits.max_title_chars,
        )
        self.background = Background()
        self.hub = Hub(
            self.store,
            config.limits,
            config.server.max_pending_bytes,
            config.presence.offline_grace_seconds,
            self.background,
        )
        self.conversations = Conversations(self.store, config.database.cache_conversations)
        self.typing = TypingTracker(self.hub, self.store, config.typing.ttl_seconds)
        self.hub.on_last_close.append(self.typing.stop_user)
        self.identities: weakref.WeakKeyDictionary[ServerConnection, Identity] = (
            weakref.WeakKeyDictionary()
        )
        # (kind, sender, requestId) of sends and creations under way: a retry waits for the
        # first.
        self.in_flight = InFlight()
        # (sender, requestId) -> messageId of messages this process stored, newest last: a
        # retry is answered without asking the database (the unique index is the backstop).
        self.recent_requests: OrderedDict[tuple[int, str], int] = OrderedDict()
        # user id -> (username, userType) as last seen, newest last.
        self.profiles: OrderedDict[int, tuple[str | None, str | None]] = OrderedDict()
        self.reads_in_flight: set[tuple[int, int]] = set()
        self.handshaking = 0
        self.closing = False
        self.server: Server | None = None
        self.demo: demo.Demo | None = None
        self.handlers: dict[type, Handler] = {
            p.Ping: self.on_ping,
            p.SendMessage: self.on_send_message,
            p.Typing: self.on_typing,
            p.MarkRead: self.on_mark_read,
            p.JoinConversation: self.on_join_conversation,
            p.GetOnlineUsers: self.on_get_online_users,
            p.CreateConversation: self.on_create_conversation,
            p.GetMessages: self.on_get_messages,
            p.Sync: self.on_sync,
            p.RefreshToken: self.on_refresh_token,
        }

    def _observe_commit(self, size: int, seconds: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.commit_seconds.observe(seconds)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> Server:
        """Open the database, clear stale typing rows, start listening."""
        await self.store.open()
        await self.store.submit(st.clear_typing(st.Write()))
        if self.config.server.demo:
            self.demo = await demo.setup(self.store, self.config)
            self.verifier = Verifier(self.demo.auth)
        ping_interval = self.config.server.ping_interval_seconds or None
        ping_timeout = self.config.server.ping_timeout_seconds or None
        self.server = await serve(
            self.connection,
            self.config.server.host,
            self.config.server.port,
            process_request=self.process_request,
            server_header="pitchey-ws",
            compression=None,
            max_size=self.config.server.max_message_bytes,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            close_timeout=self.config.server.close_timeout_seconds,
            backlog=self.config.server.backlog,
            logger=logging.getLogger("pitchey.websockets"),
        )
        for sock in self.server.sockets:
            name = sock.getsockname()
            log.info("listening on http://%s:%d (ws path %s)", name[0], name[1], WS_PATH)
        return self.server

    async def stop(self) -> None:
        """Graceful shutdown: stop accepting, close clients with 1012, commit, checkpoint."""
        self.closing = True
        timeout = self.config.server.shutdown_timeout_seconds
        if self.server is not None:
            self.server.close(close_connections=True, code=p.CLOSE_RESTART, reason="server restart")
            try:
                await asyncio.wait_for(self.server.wait_closed(), timeout)
            except TimeoutError:
                log.warning("connections still open after %.1fs; dropping them", timeout)
        self.typing.cancel_all()
        self.hub.flush_presence()
        await self.background.wait(1)
        await self.store.close()
        log.info("stopped")

    # -- HTTP, before the WebSocket handshake ----------------------------------------------

    async def process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        path = url.path
        if path == WS_PATH:
            return self.authenticate(ws, request, url.query)
        if path == "/api/health":
            return await self.health(ws)
        if path == "/metrics":
            return text_response(ws, 200, self.render_metrics(), "text/plain; version=0.0.4")
        if path in STATIC:
            return file_response(ws, *STATIC[path])
        if self.demo is not None:
            if path in DEMO_STATIC:
                return file_response(ws, *DEMO_STATIC[path])
            if path == "/demo/users":
                return json_response(ws, 200, {"users": self.demo.users_json()})
            if path == "/demo/token":
                return json_response(ws, *self.demo.token_response(parse_qs(url.query)))
        return json_response(ws, 404, {"error": "not_found", "message": "Not found"})

    def authenticate(self, ws: ServerConnection, request: Request, query: str) -> Response | None:
        token = _token_from(request, query)
        try:
            identity = self.verifier.verify(token)
        except AuthError as exc:
            log.info("handshake refused: %s", exc.code)
            return json_response(ws, 401, {"error": exc.code, "message": exc.message})
        if self.closing:
            return json_response(
                ws, 503, {"error": "shutting_down", "message": "Server is restarting"}
            )
        if self.hub.count(identity.user_id) >= self.config.limits.max_connections_per_user:
            return json_response(
                ws, 429, {"error": "too_many_connections", "message": "Too many connections"}
            )
        if self.hub.connections + self.handshaking >= self.config.limits.max_connections:
            return json_response(ws, 503, {"error": "server_full", "message": "Server is full"})
        self.identities[ws] = identity
        return None

    async def health(self, ws: ServerConnection) -> Response:
        try:
            ok = await asyncio.wait_for(self.store.healthy(), 2)
        except (TimeoutError, sqlite3.Error, AssertionError):
            ok = False
        body = {
            "status": "healthy" if ok else "unhealthy",
            "timestamp": p.now_iso(),
            "connections": self.hub.connections,
            "usersOnline": len(self.hub.users),
        }
        return json_response(ws, 200 if ok else 503, body)

    def render_metrics(self) -> str:
        gauges = {
            "pitchey_connections": ("Open WebSocket connections.", float(self.hub.connections)),
            "pitchey_users_online": (
                "Users online (including the offline grace period).",
                float(len(self.hub.users)),
            ),
            "pitchey_pending_outgoing_bytes": (
                "Bytes written but not yet sent, over all connections.",
                float(self.hub.pending_bytes()),
            ),
            "pitchey_write_queue": ("Writes waiting for the group-commit writer.",
                                    float(self.store.queued)),
            "pitchey_slow_consumer_closes": ("Connections closed as slow consumers (1013).",
                                             float(self.hub.metrics_slow_closes)),
        }
        return self.metrics.render(gauges)

    # -- one connection --------------------------------------------------------------------

    async def connection(self, ws: ServerConnection) -> None:
        identity = self.identities.pop(ws, None)
        if identity is None:  # not authenticated by process_request; cannot happen
            await ws.close(p.CLOSE_POLICY, "not authenticated")
            return
        user_id = identity.user_id
        self.handshaking += 1
        try:
            username, user_type = await self.profile(identity)
        finally:
            self.handshaking -= 1
        # Checked again here, with no await before attach() registers the connection: several
        # handshakes may have passed the check in authenticate() at once.
        if (
            self.hub.count(user_id) >= self.config.limits.max_connections_per_user
            or self.hub.connections >= self.config.limits.max_connections
        ):
            await ws.close(p.CLOSE_SLOW, "too many connections; try again later")
            return
        client = Client(ws, user_id, identity.expires_at, self.hub)
        await self.hub.attach(client, username, user_type)
        log.info("user %d connected (%d open)", user_id, self.hub.connections)
        try:
            self.arm_expiry(client)
            await ws.send(
                p.encode("connected", userId=user_id, username=username, timestamp=p.now_iso())
            )
            client.end_replay(await self.replay(client))
            async for frame in ws:
                if isinstance(frame, bytes):
                    await ws.close(p.CLOSE_BINARY, "binary frames are not accepted")
                    break
                await self.dispatch(client, frame)
        except ConnectionClosed:
            pass
        finally:
            self.hub.detach(client)
            log.info(
                "user %d disconnected (code %s, %d open)",
                user_id,
                ws.close_code,
                self.hub.connections,
            )

    async def profile(self, identity: Identity) -> tuple[str, str | None]:
        """The user's display name and type: from the token, else as last known.

        Known profiles are kept in memory (bounded), so the database is read only for a user
        this process has not seen whose token lacks a claim, and written only on a change.
        """
        uid = identity.user_id
        known = self.profiles.get(uid)
        stored = known is not None
        if known is None and (identity.username is None or identity.user_type is None):
            row = (await self.store.users([uid])).get(uid)
            if row is not None:
                known, stored = (row.username, row.user_type), True
        if known is None:
            known = (None, None)
        current = (identity.username or known[0], identity.user_type or known[1])
        if current != known or not stored:
            write = st.Write()
            if current == (None, None):
                st.ensure_users(write, [uid])
            else:
                st.upsert_user(write, uid, current[0], current[1])
            self.store.submit_background(write)
        self.profiles[uid] = current
        self.profiles.move_to_end(uid)
        if len(self.profiles) > self.config.database.cache_users:
            self.profiles.popitem(last=False)
        return current[0] or display_name(uid, None), current[1]

    def arm_expiry(self, client: Client) -> None:
        if client.expiry is not None:
            client.expiry.cancel()
            client.expiry = None
        if client.expires_at is not None:
            client.expiry = asyncio.get_running_loop().call_later(
                expiry_delay(client.expires_at),
                client.close,
                p.CLOSE_TOKEN_EXPIRED,
                "token expired",
            )

    async def replay(self, client: Client) -> set[Event]:
        """Send the user's undelivered durable events, oldest first, bounded; return them."""
        carried: set[Event] = set()
        # This user's delivery records queued before now must be visible, or an event
        # delivered a moment ago to another tab would be replayed here too.
        await self.hub.marker.settled(client.user_id)
        events = await self.store.pending(client.user_id, self.config.delivery.replay_limit)
        for event in events:
            if event.kind == "new_message":
                frame = queued(
                    "new_message",
                    event.queued_at,
                    message_fields(event.message, delivered=True),
                )
                await client.ws.send(frame)
                delivered: Event = ("m", event.message.id, client.user_id)
                carried.add(delivered)
                self.hub.marker.record(delivered, client.user_id)
            else:
                frame = queued(
                    "message_read",
                    event.queued_at,
                    read_fields(event.message, event.reader_id, event.reader_name,
                                event.read_at or event.queued_at),
                )
                await client.ws.send(frame)
                notified: Event = ("r", event.message.id, event.reader_id)
                carried.add(notified)
                self.hub.marker.record(notified, client.user_id)
            self.metrics.frames_out["queued_message"] += 1
        return carried

    async def dispatch(self, client: Client, text: str) -> None:
        """Decode, rate-limit, look up, call; protocol errors become error frames."""
        user = client.user
        assert user is not None
        try:
            command: p.Command | None = p.parse(text, self.limits)
            error: p.ProtocolError | None = None
        except p.ProtocolError as exc:
            command, error = None, exc
        # A typing frame that changes nothing is free, but only when membership is known
        # without a database read (otherwise random ids would be free reads).
        free = (
            isinstance(command, p.Typing)
            and self.typing.is_noop(command.conversation_id, client.user_id, command.is_typing)
            and self.conversations.cached_member(command.conversation_id, client.user_id)
        )
        if not free:
            wait = user.bucket.take()
            if wait > 0:
                self.metrics.errors[p.RATE_LIMITED] += 1
                request_id = command.request_id if command is not None else None
                if error is not None:
                    request_id = error.request_id
                client.send(
                    p.error(p.RATE_LIMITED, "Too many frames; slow down",
                            request_id, math.ceil(wait * 1000))
                )
                if client.flood.drop():
                    log.warning("user %d flooding; closing with 1008", client.user_id)
                    client.close(p.CLOSE_POLICY, "flooding")
                return
        if error is not None:
            self.metrics.frames_in["invalid"] += 1
            self.reply_error(client, error)
            return
        assert command is not None
        self.metrics.frames_in[type(command).__name__] += 1
        try:
            await self.handlers[type(command)](client, command)
        except p.ProtocolError as exc:
            if exc.request_id is None:
                exc.request_id = command.request_id
            self.reply_error(client, exc)
        except ConnectionClosed:
            raise
        except Exception:
            log.exception("handler for %s failed", type(command).__name__)
            self.reply_error(
                client, p.ProtocolError(p.INTERNAL, "Internal error", command.request_id)
            )

    def reply_error(self, client: Client, exc: p.ProtocolError) -> None:
        self.metrics.errors[exc.code] += 1
        client.send(p.error(exc.code, exc.message, exc.request_id))

    def reply(self, client: Client, kind: str, **fields: Any) -> None:
        self.metrics.frames_out[kind] += 1
        client.send(p.encode(kind, **fields))

    # -- handlers --------------------------------------------------------------------------

    async def on_ping(self, client: Client, _: p.Ping) -> None:
        self.reply(client, "pong", timestamp=p.now_iso(), userId=client.user_id)

    async def member_of(self, conversation_id: int, user_id: int) -> st.ConversationRow:
        """The conversation, or ``forbidden`` (dispatch adds the frame's requestId)."""
        row = await self.conversations.member_of(conversation_id, user_id)
        if row is None:
            raise p.ProtocolError(p.FORBIDDEN, "Not a participant of this conversation")
        return row

    async def on_send_message(self, client: Client, cmd: p.SendMessage) -> None:
        rid = cmd.request_id
        if rid is None:
            await self.send_message(client, cmd)
            return
        key = ("message", client.user_id, rid)
        # The same request may be under way right now (another tab, or a fast retry): wait
        # for it, then answer from what it stored (if it stored anything).
        await self.in_flight.claim(key)
        try:
            known = self.recent_requests.get((client.user_id, rid))
            if known is not None:
                await self.repeat_message(client, rid, known)
                return
            try:
                await self.send_message(client, cmd)
            except sqlite3.IntegrityError:
                # Stored before this process remembered it (e.g. before a restart): the
                # unique (sender, requestId) index refused the copy.
                if not await self.repeat_message(client, rid):
                    raise
        finally:
            self.in_flight.release(key)

    def remember_request(self, user_id: int, rid: str, message_id: int) -> None:
        self.recent_requests[(user_id, rid)] = message_id
        if len(self.recent_requests) > self.config.database.cache_request_ids:
            self.recent_requests.popitem(last=False)

    async def repeat_message(self, client: Client, rid: str, message_id: int | None = None) -> bool:
        """Answer a repeated requestId with the original message; False if there is none."""
        if message_id is not None:
            row = await self.store.message(message_id)
        else:
            row = await self.store.message_by_request(client.user_id, rid)
        if row is None:
            return False
        delivered = await self.store.delivered_any(row.id)
        self.reply(
            client, "message_sent", **message_fields(row, delivered=delivered), requestId=rid
        )
        return True

    async def send_message(self, client: Client, cmd: p.SendMessage) -> None:
        """Store, then fan out and acknowledge (PROTOCOL.md 4.1). This is the hot path: the
        conversation usually comes from memory, and the only await is the group commit."""
        sender = client.user_id
        if cmd.conversation_id is not None:
            conversation = self.conversations.cached(cmd.conversation_id)
            if conversation is None:
                conversation = await self.conversations.get(cmd.conversation_id)
            if conversation is None or sender not in conversation.members:
                raise p.ProtocolError(p.FORBIDDEN, "Not a participant of this conversation")
        else:
            assert cmd.recipient_id is not None
            if cmd.recipient_id == sender:
                raise p.ProtocolError(p.INVALID_MESSAGE, "recipientId must be another user")
            conversation = await self.direct_conversation(sender, cmd.recipient_id)
        members = conversation.members
        recipients = [m for m in members if m != sender]
        receiver = recipients[0] if not conversation.is_group and len(recipients) == 1 else None
        now = p.now_iso()
        message_id = self.store.new_message_id()
        attachments = [a.to_wire() for a in cmd.attachments] if cmd.attachments else []
        write = st.insert_message(
            st.Write(), message_id, conversation.id, sender, receiver, recipients, cmd.content,
            cmd.message_type, attachments, cmd.pitch_id, cmd.subject, cmd.request_id, now,
        )
        await self.store.submit(write)
        self.metrics.messages_stored += 1
        if cmd.request_id is not None:
            self.remember_request(sender, cmd.request_id, message_id)
        user = client.user
        assert user is not None
        fields = {
            "messageId": message_id,
            "conversationId": conversation.id,
            "senderId": sender,
            "senderName": user.username,
            "content": cmd.content,
            "attachments": attachments,
            "messageType": cmd.message_type,
            "timestamp": now,
        }
        frame = p.encode("new_message", **fields, delivered=True)
        reached = self.hub.send_to(members, frame, ("m", message_id, None), skip=client)
        self.metrics.frames_out["new_message"] += len(reached)
        fields["delivered"] = len(reached) > (sender in reached)  # a recipient was reached
        if cmd.request_id is not None:
            fields["requestId"] = cmd.request_id
        self.reply(client, "message_sent", **fields)
        self.typing.stop(conversation.id, sender)

    async def direct_conversation(self, a: int, b: int) -> st.ConversationRow:
        """The 1:1 conversation of a and b, created (and committed) if missing."""
        found = await self.conversations.find_pair(a, b)
        if found is None:
            lock = self.conversations.pair_lock(a, b)
            try:
                async with lock:
                    found = await self.conversations.find_pair(a, b)
                    if found is None:
                        await self.create(a, [a, b], None, None, None)
                        found = await self.conversations.find_pair(a, b)
            finally:
                self.conversations.release_pair_lock(a, b, lock)
            if found is None:
                raise p.ProtocolError(p.INTERNAL, "conversation vanished")
        conversation = await self.conversations.get(found)
        if conversation is None or a not in conversation.members:
            raise p.ProtocolError(p.INTERNAL, "conversation vanished")
        return conversation

    async def create(
        self,
        creator: int,
        members: list[int],
        title: str | None,
        request_id: str | None,
        pitch_id: int | None,
    ) -> st.ConversationRow:
        conversation_id = self.store.new_conversation_id()
        is_group = len(members) > 2
        write = st.create_conversation(
            st.Write(), conversation_id, creator, members, title, is_group, request_id,
            pitch_id, p.now_iso(),
        )
        await self.store.submit(write)
        row = st.ConversationRow(conversation_id, title, is_group, creator, frozenset(members))
        self.conversations.put(row)
        self.hub.add_contacts(members)
        return row

    async def on_create_conversation(self, client: Client, cmd: p.CreateConversation) -> None:
        me = client.user_id
        others = [uid for uid in cmd.participant_ids if uid != me]
        if not others:
            raise p.ProtocolError(
                p.INVALID_MESSAGE, "participantIds must name at least one other user"
            )
        members = [me, *others]
        if len(members) > self.config.limits.max_participants:
            raise p.ProtocolError(
                p.INVALID_MESSAGE, f"at most {self.config.limits.max_participants} participants"
            )
        rid = cmd.request_id
        if rid is None:
            row = await self.create(me, members, cmd.title, None, cmd.pitch_id)
        else:
            key = ("conversation", me, rid)
            await self.in_flight.claim(key)  # the same request from another tab, or a retry
            try:
                existing = await self.store.conversation_by_request(me, rid)
                if existing is not None:
                    again = await self.conversations.get(existing)
                    if again is None:
                        raise p.ProtocolError(p.INTERNAL, "conversation vanished")
                    self.reply(client, "conversation_created", **conversation_fields(again),
                               requestId=rid)
                    return
                row = await self.create(me, members, cmd.title, rid, cmd.pitch_id)
            finally:
                self.in_flight.release(key)
        fields = conversation_fields(row)
        if rid is not None:
            self.reply(client, "conversation_created", **fields, requestId=rid)
        else:
            self.reply(client, "conversation_created", **fields)
        self.hub.send_to(row.members, p.encode("conversation_created", **fields), skip=client)

    async def on_typing(self, client: Client, cmd: p.Typing) -> None:
        row = await self.member_of(cmd.conversation_id, client.user_id)
        if cmd.is_typing:
            self.typing.start(row.id, client.user_id, row.members)
        else:
            self.typing.stop(row.id, client.user_id)

    async def on_mark_read(self, client: Client, cmd: p.MarkRead) -> None:
        reader = client.user_id
        key = (cmd.message_id, reader)
        if key in self.reads_in_flight:
            return  # another tab of this user is marking it right now; it tells the sender
        # Claimed before the first await, so two tabs cannot both see it unread.
        self.reads_in_flight.add(key)
        try:
            found = await self.store.message_for_read(cmd.message_id, reader)
            forbidden = p.ProtocolError(p.FORBIDDEN, "Not a participant of this conversation")
            if found is None:
                raise forbidden
            message, read_at = found
            if await self.conversations.member_of(message.conversation_id, reader) is None:
                raise forbidden
            if message.sender_id == reader or read_at is not None:
                return  # already read, or your own message: nothing changes, nobody is told
            now = p.now_iso()
            await self.store.submit(st.mark_read(st.Write(), message.id, reader, now))
        finally:
            self.reads_in_flight.discard(key)
        user = client.user
        assert user is not None
        frame = p.encode("message_read", **read_fields(message, reader, user.username, now))
        reached = self.hub.send_to([message.sender_id], frame, ("r", message.id, reader))
        if reached:
            self.metrics.frames_out["message_read"] += 1

    async def on_join_conversation(self, client: Client, cmd: p.JoinConversation) -> None:
        await self.member_of(cmd.conversation_id, client.user_id)
        rows, _ = await self.store.history(
            cmd.conversation_id, client.user_id, None, self.config.history.page_size
        )
        self.reply(
            client,
            "conversation_joined",
            conversationId=cmd.conversation_id,
            messages=[history_entry(r) for r in rows],
            timestamp=p.now_iso(),
        )

    async def on_get_messages(self, client: Client, cmd: p.GetMessages) -> None:
        await self.member_of(cmd.conversation_id, client.user_id)
        page = self.config.history.page_size
        limit = min(cmd.limit, page) if cmd.limit is not None else page
        rows, has_more = await self.store.history(
            cmd.conversation_id, client.user_id, cmd.before_message_id, limit
        )
        self.reply(
            client,
            "messages",
            conversationId=cmd.conversation_id,
            messages=[history_entry(r) for r in rows],
            hasMore=has_more,
        )

    async def on_get_online_users(self, client: Client, _: p.GetOnlineUsers) -> None:
        user = client.user
        assert user is not None
        users = []
        for uid in sorted(self.hub.online_contacts(user)):
            other = self.hub.users[uid]
            users.append(
                {
                    "userId": uid,
                    "username": other.username,
                    "userType": other.user_type,
                    "isOnline": True,
                    "lastSeen": other.last_seen if not other.clients else None,
                }
            )
        self.reply(client, "online_users", users=users, timestamp=p.now_iso())

    async def on_sync(self, client: Client, cmd: p.Sync) -> None:
        rows, has_more = await self.store.since(
            client.user_id, cmd.since_message_id, self.config.delivery.replay_limit
        )
        for row in rows:
            frame = queued("new_message", row.sent_at, message_fields(row, delivered=True))
            await client.ws.send(frame)
            if row.sender_id != client.user_id:
                self.hub.marker.record(("m", row.id, client.user_id), client.user_id)
        self.metrics.frames_out["queued_message"] += len(rows)
        last = rows[-1].id if rows else cmd.since_message_id
        self.reply(client, "sync_complete", lastMessageId=last, hasMore=has_more)

    async def on_refresh_token(self, client: Client, cmd: p.RefreshToken) -> None:
        try:
            identity = self.verifier.verify(cmd.token, leeway=False)
        except AuthError as exc:
            raise p.ProtocolError(p.FORBIDDEN, f"Token refused: {exc.message}") from None
        if identity.user_id != client.user_id:
            raise p.ProtocolError(p.FORBIDDEN, "Token is for another user")
        client.expires_at = identity.expires_at
        self.arm_expiry(client)
        self.reply(client, "token_refreshed", expiresAt=iso_expiry(identity.expires_at))


# -- wire shapes ----------------------------------------------------------------------------


def display_name(user_id: int, username: str | None) -> str:
    """What to show for a user whose token never gave a username."""
    return username or f"User {user_id}"


def message_fields(row: st.MessageRow, *, delivered: bool) -> dict[str, Any]:
    return {
        "messageId": row.id,
        "conversationId": row.conversation_id,
        "senderId": row.sender_id,
        "senderName": display_name(row.sender_id, row.sender_name),
        "content": row.content,
        "attachments": json.loads(row.attachments),
        "messageType": row.message_type,
        "timestamp": row.sent_at,
        "delivered": delivered,
    }


def history_entry(row: st.MessageRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "messageId": row.id,
        "conversationId": row.conversation_id,
        "senderId": row.sender_id,
        "senderName": display_name(row.sender_id, row.sender_name),
        "content": row.content,
        "attachments": json.loads(row.attachments),
        "messageType": row.message_type,
        "sentAt": row.sent_at,
        "timestamp": row.sent_at,
        "isRead": row.is_read,
    }


def read_fields(
    row: st.MessageRow, reader_id: int, reader_name: str | None, read_at: str
) -> dict[str, Any]:
    return {
        "messageId": row.id,
        "conversationId": row.conversation_id,
        "readBy": reader_id,
        "readByName": display_name(reader_id, reader_name),
        "readAt": read_at,
    }


def conversation_fields(row: st.ConversationRow) -> dict[str, Any]:
    return {
        "conversationId": row.id,
        "title": row.title,
        "isGroup": row.is_group,
        "participantIds": sorted(row.members),
        "createdBy": row.created_by,
    }


def queued(original_type: str, queued_at: str, fields: dict[str, Any]) -> str:
    return p.encode("queued_message", **fields, originalType=original_type, queuedAt=queued_at)


# -- HTTP helpers ---------------------------------------------------------------------------


def _token_from(request: Request, query: str) -> str | None:
    tokens = parse_qs(query).get("token")
    if tokens:
        return tokens[0]
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def text_response(ws: ServerConnection, status: int, body: str, content_type: str) -> Response:
    response = ws.respond(http.HTTPStatus(status), body)
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = content_type
    response.headers["Cache-Control"] = "no-store"
    return response


def json_response(ws: ServerConnection, status: int, body: Any) -> Response:
    return text_response(ws, status, json.dumps(body), "application/json")


def file_response(ws: ServerConnection, relative: str, content_type: str) -> Response:
    path = HERE / relative
    try:
        body = path.read_text(encoding="utf-8")
    except OSError:
        return json_response(ws, 404, {"error": "not_found", "message": "Not found"})
    response = text_response(ws, 200, body, content_type)
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


# -- logging --------------------------------------------------------------------------------

_SECRET_PATTERNS = (
    re.compile(r"(token=)[^&\s\"']+", re.IGNORECASE),
    re.compile(r"(authorization:\s*bearer\s+)\S+", re.IGNORECASE),
    re.compile(r"(eyJ[A-Za-z0-9_-]{4,}\.)[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"),
)


class RedactTokens(logging.Filter):
    """Remove anything that looks like a token from every log line, whoever logs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = message
        for pattern in _SECRET_PATTERNS:
            redacted = pattern.sub(r"\1[redacted]", redacted)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactTokens())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Their DEBUG lines carry frame payloads and SQL parameters (message bodies), and their
    # INFO lines repeat our own per-connection lines: keep only their warnings.
    logging.getLogger("pitchey.websockets").setLevel(logging.WARNING)
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)


# -- CLI ------------------------------------------------------------------------------------


def load_config(args: argparse.Namespace) -> cfg.Config:
    path = Path(args.config) if args.config else HERE / "config.toml"
    config = cfg.load(path if path.exists() or args.config else None)
    if getattr(args, "host", None):
        config = config.replace("server", host=args.host)
    if getattr(args, "port", None) is not None:
        config = config.replace("server", port=args.port)
    if getattr(args, "db", None):
        config = config.replace("database", path=args.db)
    if getattr(args, "demo", False):
        config = config.replace("server", demo=True)
    return config


async def serve_until_signal(config: cfg.Config) -> int:
    app = App(config)
    await app.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second signal: exiting at once")
            os._exit(1)
        log.info("signal %s: shutting down", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await stop.wait()
    await app.stop()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args)
    except cfg.ConfigError as exc:
        print(f"pitchey-ws: config error: {exc}", file=sys.stderr)
        return 2
    hmac = config.auth.algorithms[0].startswith("HS")
    if hmac and not config.auth.jwt_secret and not config.server.demo:
        print(
            "pitchey-ws: no JWT secret. Set the JWT_SECRET environment variable or"
            " auth.jwt_secret in the config file (or run `serve --demo` to try it locally).",
            file=sys.stderr,
        )
        return 2
    setup_logging(config.server.log_level)
    if hmac and config.auth.jwt_secret and len(config.auth.jwt_secret.encode()) < 32:
        log.warning("the JWT secret is shorter than 32 bytes; use a longer random secret")
    if config.server.demo:
        log.warning("demo mode: demo users, demo page and /demo/token are enabled")
    try:
        return asyncio.run(serve_until_signal(config))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1


def cmd_token(args: argparse.Namespace) -> int:
    try:
        config = load_config(args)
    except cfg.ConfigError as exc:
        print(f"pitchey-ws: config error: {exc}", file=sys.stderr)
        return 2
    auth = config.auth
    if not auth.jwt_secret:
        secret = demo.stored_secret(config.database.path)
        if secret is None:
            print(
                "pitchey-ws: no JWT secret. Set JWT_SECRET or auth.jwt_secret, or point --db at"
                " a database a `serve --demo` daemon created.",
                file=sys.stderr,
            )
            return 2
        auth = cfg.AuthConfig(jwt_secret=secret, algorithms=("HS256",))
    try:
        token = Verifier(auth).mint(args.user_id, args.username, args.user_type, args.ttl)
    except AuthError as exc:
        print(f"pitchey-ws: {exc.message}", file=sys.stderr)
        return 2
    print(token)
    return 0


def positive_int(text: str) -> int:
    value = int(text)
    if not 0 < value < 2**63:
        raise argparse.ArgumentTypeError("must be a positive 64-bit integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pitchey_ws.py", description="pitchey-ws: real-time messaging daemon for Pitchey."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the daemon", description="Run the daemon until SIGTERM.")
    s.add_argument("--config", metavar="FILE",
                   help="TOML config file (default: config.toml beside this script)")
    s.add_argument("--host", help="interface to listen on (default from config: 127.0.0.1)")
    s.add_argument("--port", type=int, help="TCP port (default from config: 8000; 0 = any free)")
    s.add_argument("--db", metavar="PATH", help="SQLite database file (default from config)")
    s.add_argument("--demo", action="store_true",
                   help="demo mode: own generated secret, demo users, demo page at /,"
                        " tokens from /demo/token. Never use in production.")
    s.set_defaults(run=cmd_serve)
    t = sub.add_parser("token", help="print a signed token for development",
                       description="Print a JWT signed with the configured secret.")
    t.add_argument("--user-id", type=positive_int, required=True, help="the userId claim")
    t.add_argument("--username", help="the username claim (display name)")
    t.add_argument("--user-type", help="the userType claim (creator, investor, production)")
    t.add_argument("--ttl", type=float, default=3600,
                   help="seconds until the token expires (default 3600)")
    t.add_argument("--config", metavar="FILE", help="TOML config file (for auth settings)")
    t.add_argument("--db", metavar="PATH",
                   help="database of a demo daemon, to sign with its generated secret")
    t.set_defaults(run=cmd_token)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
