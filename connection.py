"""One connection's life: handshake admission, then attach, expiry, replay and the read loop.

``admit`` runs before the WebSocket handshake completes (from the HTTP routes) and answers
401/429/503 or lets the handshake go on; ``handle`` is the websockets connection handler.
``dispatch`` only decodes, meters, looks up the handler table and turns protocol errors into
``error`` frames.
"""

from __future__ import annotations

import asyncio
import logging
import math
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import assert_never
from urllib.parse import parse_qs

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

import protocol as p
from auth import AuthError, Identity, Verifier
from config import Config, parser_limits
from handlers import Handlers
from http_front import LogSummary
from http_routes import json_response
from hub import Client, Framed, Hub, expiry_delay
from metrics import Metrics
from rows import (
    Event,
    EventKind,
    PendingEvent,
    PendingMessage,
    PendingNotification,
    PendingRead,
)
from service import Service, store_error_reply
from store import Corrupt, Store, StoreError, Unavailable

log = logging.getLogger("pitchey.connection")

# Per-connection INFO lines ("connected", "disconnected") a second, of each kind; the rest are
# counted in one line when the second ends.
CONNECTION_LINES = 10


class Sessions:
    """Admits handshakes and runs each connection until it closes."""

    def __init__(
        self,
        config: Config,
        store: Store,
        hub: Hub,
        service: Service,
        metrics: Metrics,
        verifier: Callable[[], Verifier],
    ) -> None:
        self.config = config
        self.store = store
        self.hub = hub
        self.service = service
        self.metrics = metrics
        self.verifier = verifier
        self.limits = parser_limits(config)
        self.handlers = Handlers(service, metrics, verifier, self.arm_expiry)
        self.identities: weakref.WeakKeyDictionary[ServerConnection, Identity] = (
            weakref.WeakKeyDictionary()
        )
        # user id -> (username, userType) as last seen, newest last.
        self.profiles: OrderedDict[int, tuple[str | None, str | None]] = OrderedDict()
        self.handshaking = 0
        self.closing = False
        # Refused handshakes come in floods (a client retrying a bad token): a few lines a
        # second per reason, with a count of the rest.
        self.refusals = LogSummary(log)
        # One line per connection opened and closed, but at most CONNECTION_LINES a second of
        # each: a reconnect storm of 15,000 clients writes a few hundred lines, not 30,000.
        self.lifecycle = LogSummary(log, per_second=CONNECTION_LINES)

    def flush_logs(self) -> None:
        self.refusals.close()
        self.lifecycle.close()

    # -- before the handshake --------------------------------------------------------------

    async def admit(
        self, ws: ServerConnection, request: Request, query: str
    ) -> Response | None:
        """Authenticate a handshake: a refusal (401/429/503), or None to go on. A valid token
        of a user the store does not accept (not in an existing Pitchey database's users)
        is 401 ``unknown_user``."""
        token = _token_from(request, query)
        try:
            identity = self.verifier().verify(token)
        except AuthError as exc:
            self.refusals.note(f"handshake refused ({exc.code})", "handshake refused: %s",
                               exc.code)
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
        try:
            accepted = await self.store.accepts_user(identity.user_id)
        except StoreError:
            return json_response(
                ws, 503, {"error": "unavailable", "message": "The database is unavailable"}
            )
        if not accepted:
            self.refusals.note("handshake refused (unknown_user)", "handshake refused: %s",
                               "unknown_user")
            return json_response(ws, 401, {"error": "unknown_user", "message": "Unknown user"})
        if not _asks_upgrade(request):
            # A plain GET of the endpoint (a browser tab, a health probe): the JSON of every
            # other refusal, not websockets' text page.
            response = json_response(ws, 426, {
                "error": "upgrade_required",
                "message": "This endpoint speaks WebSocket: connect with a WebSocket client",
            })
            response.headers["Upgrade"] = "websocket"
            return response
        self.identities[ws] = identity
        return None

    # -- the connection --------------------------------------------------------------------

    async def handle(self, ws: ServerConnection) -> None:
        identity = self.identities.pop(ws, None)
        if identity is None:  # not admitted by process_request; cannot happen
            await ws.close(*p.NOT_AUTHENTICATED)
            return
        user_id = identity.user_id
        # The handshake's headers are not read again: ~2 KB a connection for as long as it
        # lives. (websockets keeps the request itself: its parser holds it, and a request of
        # None would make it take the next frame for a handshake. Its headers are emptied.)
        if ws.request is not None:
            ws.request.headers.clear()
        ws.response = None
        self.handshaking += 1
        try:
            username, user_type = await self.profile(identity)
        finally:
            self.handshaking -= 1
        # Checked again here, with no await before attach() registers the connection: several
        # handshakes may have passed the check in admit() at once.
        if (
            self.hub.count(user_id) >= self.config.limits.max_connections_per_user
            or self.hub.connections >= self.config.limits.max_connections
        ):
            await ws.close(*p.TOO_MANY_CONNECTIONS)
            return
        client = Client(ws, user_id, identity.expires_at, self.hub)
        try:
            await self.hub.attach(client, username, user_type,
                                  named_by_token=identity.username is not None,
                                  typed_by_token=identity.user_type is not None)
            self.lifecycle.note("connections opened", "user %d connected (%d open)", user_id,
                                self.hub.connections)
            self.arm_expiry(client)
            await ws.send(p.connected(user_id, username))
            await self.catch_up(client)
            async for frame in ws:
                if isinstance(frame, bytes):
                    await ws.close(*p.BINARY_FRAME)
                    break
                await self.dispatch(client, frame)
        except ConnectionClosed:
            pass
        finally:
            self.hub.detach(client)
            self.lifecycle.note("connections closed", "user %d disconnected (code %s, %d open)",
                                user_id, ws.close_code, self.hub.connections)

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
            self.store.save_profile_later(uid, current[0], current[1])
        self.profiles[uid] = current
        self.profiles.move_to_end(uid)
        if len(self.profiles) > self.config.database.cache_users:
            self.profiles.popitem(last=False)
        return p.display_name(uid, current[0]), current[1]

    def arm_expiry(self, client: Client) -> None:
        if client.expiry is not None:
            client.expiry.cancel()
            client.expiry = None
        if client.expires_at is not None:
            client.expiry = asyncio.get_running_loop().call_later(
                expiry_delay(client.expires_at), client.close, p.TOKEN_EXPIRED
            )

    async def catch_up(self, client: Client) -> None:
        """The replay, then live frames, each durable event written once.

        A write the replay read may not have been fanned out yet: its sender resumes after
        the commit and, had the replay ended meanwhile, would write the frame live a second
        time. So the replay ends only after every write queued so far has been answered and
        its waiters have run: they write into the held frames, which end_replay filters by
        what the replay carried. (Every durable write fans out right after its commit, with
        no await in between, so one loop turn after the flush is enough.)"""
        carried = await self.replay(client)
        await self.store.flush()
        await asyncio.sleep(0)
        client.end_replay(carried)

    async def replay(self, client: Client) -> set[Event]:
        """Send the user's undelivered durable events, oldest first, bounded; return them."""
        carried: set[Event] = set()
        frames_out = self.metrics.frames_out
        user_id = client.user_id

        def written(batch: list[Framed]) -> None:
            for _, event in batch:
                assert event is not None  # every replayed frame is a durable event
                carried.add(event)
                frames_out[
                    "notification" if event[0] is EventKind.NOTIFICATION else "queued_message"
                ] += 1

        await client.write_events(await self.service.pending(user_id),
                                  lambda item: _replay_frame(item, user_id), written)
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
        service = self.service
        # No frame is free: a flood of anything empties the bucket and meets the flood guard.
        # A typing frame that changes nothing (clients repeat typing_start on every keystroke)
        # costs a fraction of a token, but only when membership is known without a database
        # read (otherwise random ids would be cheap reads).
        cheap = (
            isinstance(command, p.Typing)
            and service.typing.is_noop(command.conversation_id, client.user_id,
                                       command.is_typing)
            and service.conversations.cached_member(command.conversation_id, client.user_id)
        )
        cost = self.config.limits.typing_repeat_cost if cheap else 1.0
        if self.hub.shared:
            # One bucket across every daemon (an atomic Lua script in Redis).
            wait = await self.hub.backplane.take(client.user_id, cost, user.bucket)
        else:
            wait = user.bucket.take(cost)
        if wait > 0:
            self.metrics.errors[p.RATE_LIMITED] += 1
            request_id = command.request_id if command is not None else None
            if error is not None:
                request_id = error.request_id
            client.send(
                p.error(p.RATE_LIMITED, "Too many frames; slow down",
                        request_id, math.ceil(wait * 1000),
                        pitch_id=_pitch_of(command) if command is not None else None)
            )
            if client.flood.drop():
                log.warning("user %d flooding; closing with 1008", client.user_id)
                client.close(p.FLOODING)
            return
        if error is not None:
            self.metrics.frames_in["invalid"] += 1
            self.reply_error(client, error)
            return
        assert command is not None
        self.metrics.frames_in[p.wire_type(command)] += 1
        try:
            await self.handlers.table[type(command)](client, command)
        except p.ProtocolError as exc:
            if exc.request_id is None:
                exc.request_id = command.request_id
            exc.pitch_id = _pitch_of(command)
            self.reply_error(client, exc)
        except ConnectionClosed:
            raise
        except StoreError as exc:
            # A failing disk or a corrupt file is logged once, by the store, not per frame.
            if not isinstance(exc, Unavailable | Corrupt):
                log.exception("handler for %s failed", type(command).__name__)
            code, message, retry_after_ms = store_error_reply(exc)
            self.metrics.errors[code] += 1
            client.send(p.error(code, message, command.request_id, retry_after_ms,
                                pitch_id=_pitch_of(command)))
        except Exception:
            log.exception("handler for %s failed", type(command).__name__)
            internal = p.ProtocolError(p.INTERNAL, "Internal error", command.request_id)
            internal.pitch_id = _pitch_of(command)
            self.reply_error(client, internal)

    def reply_error(self, client: Client, exc: p.ProtocolError) -> None:
        self.metrics.errors[exc.code] += 1
        client.send(p.error(exc.code, exc.message, exc.request_id, exc.retry_after_ms,
                            exc.detail, exc.pitch_id))


def _pitch_of(command: p.Command) -> int | None:
    return command.pitch_id if isinstance(command, p.PITCH_FRAMES) else None


def _asks_upgrade(request: Request) -> bool:
    """Whether the request asks for a WebSocket (RFC 6455 4.2.1: Upgrade and Connection)."""
    upgrade = ",".join(request.headers.get_all("Upgrade")).lower()
    connection = ",".join(request.headers.get_all("Connection")).lower()
    return ("websocket" in {v.strip() for v in upgrade.split(",")}
            and "upgrade" in {v.strip() for v in connection.split(",")})


def _token_from(request: Request, query: str) -> str | None:
    tokens = parse_qs(query).get("token")
    if tokens:
        return tokens[0]
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def _replay_frame(item: PendingEvent, user_id: int) -> tuple[str, Event]:
    """One pending durable event's replay frame, and the event it records as delivered."""
    match item:
        case PendingMessage(queued_at=queued_at, message=message):
            return (p.queued_new_message(message, queued_at),
                    (EventKind.MESSAGE, message.id, user_id))
        case PendingRead():
            fields = p.read_fields(item.message_id, item.conversation_id, item.reader_id,
                                   item.reader_name, item.queued_at)
            return (p.queued_message("message_read", item.queued_at, fields),
                    (EventKind.READ, item.message_id, item.reader_id))
        case PendingNotification(queued_at=queued_at, notification=notification):
            # Its own type with queuedAt, not a queued_message (PROTOCOL.md 10).
            return (p.notification_frame(notification, queued_at),
                    (EventKind.NOTIFICATION, notification.id, user_id))
        case _:
            assert_never(item)
