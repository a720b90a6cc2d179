"""The hub of live connections: who is connected, presence, and fan-out.

Fan-out never awaits a client: frames are written with ``websockets.broadcast`` (a synchronous
write into each connection's buffer). A connection whose unsent bytes pass
``server.max_pending_bytes`` is a slow consumer and is closed with 1013. Frames already in
its buffer were recorded as delivered: the messages among them come back through ``sync``
(and anything sent after the close is replayed on reconnect); read notices among them are
lost, as with any frame written just before a connection dies (see docs/protocol.md).

Frames carry an optional :data:`rows.Event` tag. When a tagged frame is written to a live
connection, the hub hands the event to its :class:`Recorder` (``delivery.DeliveryLog``), which
is what keeps it out of the next offline replay. The hub itself never touches the database:
what it needs from outside (a user's contacts, where to record a delivery or a departure) is
passed in as typed callbacks. While a connection replays its backlog, live frames for it are held
back and written after the replay, skipping any message the replay already carried.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Protocol, TypeVar

from websockets.asyncio.server import ServerConnection, broadcast
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

import protocol as p
from backplane import Backplane, InProcess, Leave
from config import LimitsConfig
from limits import FloodGuard, TokenBucket
from protocol import iso_from_epoch, now_iso
from rows import Event, EventKind

log = logging.getLogger("pitchey.hub")

# An Event whose last member may be None: "the user the frame is written to".
EventTemplate = tuple[EventKind, int, int | None]


class Recorder(Protocol):
    """Where the hub reports events written to live connections (``delivery.DeliveryLog``)."""

    def record(self, event: Event, recipient: int) -> None: ...

    def record_messages(self, message_id: int, recipients: list[int]) -> None: ...


# A user's contacts, read when the user comes online.
ContactsLoader = Callable[[int], Awaitable[set[int]]]
# (user id, last seen): the user's offline grace period ended (or the daemon stopped in it).
OfflineCallback = Callable[[int, str], None]


class Background:
    """Tasks the daemon owns: kept referenced, failures logged, cancelled at shutdown."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[object, object, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    async def settle(self, prefix: str, seconds: float) -> None:
        """Wait up to ``seconds`` for the running tasks whose name starts with ``prefix``."""
        running = [t for t in self.tasks if t.get_name().startswith(prefix)]
        if running:
            await asyncio.wait(running, timeout=seconds)

    async def wait(self, seconds: float) -> None:
        """Let running tasks finish for up to ``seconds``, then cancel the rest."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=seconds)
        for task in set(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=1)


# A replay or sync writes its frames in batches: one socket write per batch (a write per frame
# cost a system call and a wake-up of the reader each), then other tasks run. A batch is sized
# to take about WRITE_SLICE_SECONDS of the loop (from how long the one before took), between
# WRITE_BATCH and WRITE_BATCH_MAX frames: the loop is held about as long whatever a frame costs,
# and cheap frames do not pay a write and a loop turn per 8 (1,000 frames took ~13 ms in
# batches of 8, ~8 ms in batches of 64).
WRITE_BATCH = 8
WRITE_BATCH_MAX = 128
WRITE_SLICE_SECONDS = 0.0002
# With other daemons, how long a connection remembers the events its replay carried: another
# daemon's frame for one of them can arrive over the backplane after the replay ended (the
# replay read the committed row first), and is then not written again. Frames that late are
# beyond any backplane delay the daemon tolerates otherwise.
REPLAYED_SECONDS = 10.0

T = TypeVar("T")
# A frame's text, and the durable event it delivers (None: nothing to record).
Framed = tuple[str, Event | None]


class Client:
    """One authenticated connection (slotted: thousands may sit idle).

    The transport is a websockets ``ServerConnection``. The in-process test harness subclasses
    this with ``ws = None`` and overrides the transport methods (``write``, ``write_batch``,
    ``drain``, ``buffered``, ``is_open``, ``_close``) to record frames instead.
    """

    __slots__ = ("closing", "expires_at", "expiry", "flood", "held", "held_bytes", "hub",
                 "replayed", "replaying", "user", "user_id", "ws")

    def __init__(
        self, ws: ServerConnection | None, user_id: int, expires_at: float | None, hub: Hub
    ) -> None:
        self.ws = ws
        self.user_id = user_id
        self.expires_at = expires_at
        self.hub = hub
        self.user: UserState | None = None
        self.flood = FloodGuard(hub.limits.flood_max_dropped, hub.limits.flood_window_seconds)
        self.expiry: asyncio.TimerHandle | None = None
        self.closing = False
        # Offline replay in progress: live frames wait here (bounded by max_pending_bytes).
        self.replaying = True
        self.held: list[tuple[str, Event | None]] = []
        self.held_bytes = 0
        # With other daemons, for REPLAYED_SECONDS after the replay: the events it carried.
        self.replayed: set[Event] | None = None

    # -- transport -------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        assert self.ws is not None
        return not self.closing and self.ws.protocol.state is State.OPEN

    def write(self, text: str) -> None:
        """Write one frame into the connection's buffer, without waiting."""
        assert self.ws is not None
        broadcast([self.ws], text)

    def write_batch(self, texts: Sequence[str]) -> None:
        """Write frames of a replay or sync now, in one socket write (a system call per
        frame made a 1,000-frame replay three times slower). Raises
        ConnectionClosed, having written nothing, when the connection is not open."""
        ws = self.ws
        assert ws is not None
        protocol = ws.protocol
        if protocol.state is not State.OPEN:
            raise ConnectionClosed(protocol.close_rcvd, protocol.close_sent)
        for text in texts:
            protocol.send_text(text.encode())
        ws.transport.write(b"".join(protocol.data_to_send()))

    async def write_events(
        self, items: Sequence[T], frame: Callable[[T], Framed],
        written: Callable[[list[Framed]], None] | None = None,
    ) -> None:
        """A replay's or a sync's frames, a batch at a time: each batch built (``frame``: its
        text and the event it delivers, if any), written in one socket write, its events
        recorded as delivered (and told to ``written``); then other tasks run (``drain``).
        Each batch is sized from the time the one before took (WRITE_SLICE_SECONDS)."""
        record = self.hub.recorder.record
        clock = time.perf_counter
        size = WRITE_BATCH
        start = 0
        while start < len(items):
            began = clock()
            batch = [frame(item) for item in items[start:start + size]]
            start += len(batch)
            self.write_batch([text for text, _ in batch])
            for _, event in batch:
                if event is not None:
                    record(event, self.user_id)
            if written is not None:
                written(batch)
            spent = clock() - began
            size = WRITE_BATCH_MAX if spent <= 0 else max(
                WRITE_BATCH, min(WRITE_BATCH_MAX, int(len(batch) * WRITE_SLICE_SECONDS / spent))
            )
            await self.drain()

    async def drain(self) -> None:
        """Wait while the connection's buffer is over its high-water mark, then let other
        tasks run: between two batches of a replay or sync, so that it neither buffers
        without bound nor holds the event loop (``send`` does not yield while the transport
        is not paused: a 1,000-frame replay held the loop ~28 ms)."""
        assert self.ws is not None
        await self.ws.drain()
        await asyncio.sleep(0)

    def buffered(self) -> int:
        """Bytes written but not yet sent."""
        transport = self.ws.transport if self.ws is not None else None
        return transport.get_write_buffer_size() if transport is not None else 0

    async def _close(self, code: int, reason: str) -> None:
        """The closing handshake, bounded by close_timeout: ``close()`` first waits for the
        write buffer to drain, which never happens for a peer that stopped reading."""
        assert self.ws is not None
        try:
            await asyncio.wait_for(self.ws.close(code, reason), self.ws.close_timeout)
        except TimeoutError:
            log.info("user %d: closing handshake timed out; dropping the connection",
                     self.user_id)
            self.ws.transport.abort()

    # -- frames ----------------------------------------------------------------------------

    def send(self, text: str, event: Event | None = None) -> bool:
        """Write one frame now (or hold it during replay). True if written."""
        if self.closing:
            return False
        if self.replaying:
            self.held.append((text, event))
            self.held_bytes += len(text.encode())
            if self.held_bytes > self.hub.max_pending_bytes:
                log.info("user %d: slow consumer during replay, closing", self.user_id)
                self.hub.slow_consumer_closes += 1
                self.close(p.SLOW_CONSUMER)
            return False
        if not self.is_open:
            return False
        self.write(text)
        if event is not None:
            self.hub.recorder.record(event, self.user_id)
        self.check_backlog()
        return True

    def check_backlog(self) -> None:
        if self.buffered() > self.hub.max_pending_bytes:
            log.info("user %d: slow consumer, closing", self.user_id)
            self.hub.slow_consumer_closes += 1
            self.close(p.SLOW_CONSUMER)

    def close(self, how: p.Disconnect) -> None:
        """Start closing this connection; nothing more is written to it."""
        if self.closing:
            return
        self.closing = True
        self.held.clear()
        self.held_bytes = 0
        self.hub.background.spawn(self._close(how.code, how.reason), name=f"close-{self.user_id}")

    def end_replay(self, carried: set[Event]) -> None:
        """Write the frames held during replay, skipping the events the replay ``carried``."""
        held, self.held, self.held_bytes = self.held, [], 0
        self.replaying = False
        for text, event in held:
            if event is not None and event in carried:
                continue
            self.send(text, event)
        if self.hub.shared and carried:
            # The replay may have read a row another daemon committed before that daemon's
            # frame for it came over the backplane: that frame, arriving now, is not written.
            self.replayed = carried
            asyncio.get_running_loop().call_later(REPLAYED_SECONDS, self._forget_replayed)

    def _forget_replayed(self) -> None:
        self.replayed = None


class UserState:
    """One online user (or one inside the offline grace period) and their connections."""

    __slots__ = (
        "bucket",
        "clients",
        "contacts",
        "last_seen",
        "named_by_token",
        "offline_timer",
        "typed_by_token",
        "user_id",
        "user_type",
        "username",
    )

    def __init__(self, user_id: int, username: str, user_type: str | None, bucket: TokenBucket):
        self.user_id = user_id
        self.username = username
        self.user_type = user_type
        # Whether the latest connection's token named the user / gave the type (PROTOCOL.md
        # 12: a claim wins over the profile the backend registers, which applies otherwise).
        self.named_by_token = False
        self.typed_by_token = False
        self.clients: list[Client] = []
        self.contacts: set[int] = set()
        self.bucket = bucket
        self.offline_timer: asyncio.TimerHandle | None = None
        self.last_seen: str | None = None


class Hub:
    def __init__(
        self,
        limits: LimitsConfig,
        max_pending_bytes: int,
        grace_seconds: float,
        background: Background,
        recorder: Recorder,
        load_contacts: ContactsLoader,
        on_offline: OfflineCallback,
        backplane: Backplane | None = None,
    ) -> None:
        self.limits = limits
        self.max_pending_bytes = max_pending_bytes
        self.grace_seconds = grace_seconds
        self.background = background
        self.recorder = recorder
        self.load_contacts = load_contacts
        self.on_offline = on_offline
        # Other daemons (PROTOCOL.md 13). ``shared`` is read on every fan-out: with the
        # in-process backplane the hub never calls it on a hot path.
        self.backplane: Backplane = backplane if backplane is not None else InProcess()
        self.shared = self.backplane.shared
        self.users: dict[int, UserState] = {}
        self.connections = 0
        self.slow_consumer_closes = 0
        # Called with a user id when the user's last connection closes (typing cleanup).
        self.on_last_close: list[Callable[[int], None]] = []
        # Called with each connection that closes (pitch subscriptions).
        self.on_detach: list[Callable[[Client], None]] = []
        # Rate-limit buckets of users who went offline lately, newest last, so that
        # reconnecting does not refill a flooding user's bucket.
        self.recent_buckets: OrderedDict[int, TokenBucket] = OrderedDict()

    def _bucket(self, user_id: int) -> TokenBucket:
        bucket = self.recent_buckets.pop(user_id, None)
        if bucket is None:
            bucket = TokenBucket(self.limits.frames_per_second, self.limits.frames_burst)
        return bucket

    def bucket(self, user_id: int) -> TokenBucket:
        """The user's rate-limit bucket for a request that is not a frame (HTTP): the one of
        their live connections, else one kept for them (bounded like the buckets of users
        who went offline), so HTTP and sockets draw on the same tokens."""
        user = self.users.get(user_id)
        if user is not None:
            return user.bucket
        bucket = self.recent_buckets.pop(user_id, None)
        if bucket is None:
            bucket = TokenBucket(self.limits.frames_per_second, self.limits.frames_burst)
        self.recent_buckets[user_id] = bucket
        if len(self.recent_buckets) > self.limits.max_connections:
            self.recent_buckets.popitem(last=False)
        return bucket

    def _keep_bucket(self, user: UserState) -> None:
        self.recent_buckets[user.user_id] = user.bucket
        if len(self.recent_buckets) > self.limits.max_connections:
            self.recent_buckets.popitem(last=False)

    # -- registry --------------------------------------------------------------------------

    def count(self, user_id: int) -> int:
        user = self.users.get(user_id)
        return len(user.clients) if user else 0

    async def attach(
        self, client: Client, username: str, user_type: str | None,
        named_by_token: bool = False, typed_by_token: bool = False,
    ) -> UserState:
        """Register a connection; announce user_online to contacts when it is the first.

        The connection counts from the first line on: if this raises, the caller must still
        ``detach`` it (connection.py attaches inside its try/finally).
        """
        user = self.users.get(client.user_id)
        first = user is None
        if user is None:
            user = UserState(
                client.user_id,
                username,
                user_type,
                self._bucket(client.user_id),
            )
            self.users[client.user_id] = user
            user.named_by_token, user.typed_by_token = named_by_token, typed_by_token
            user.clients.append(client)
            self.connections += 1
            client.user = user
            # Merged, not assigned: a conversation created while this read is under way has
            # already added its members to user.contacts (add_contacts).
            user.contacts |= await self.load_contacts(client.user_id)
            if self.shared:
                # Subscribed before the replay reads the backlog; first anywhere?
                first = await self.backplane.join(client.user_id, username, user_type)
        else:
            was_empty = not user.clients
            user.clients.append(client)
            self.connections += 1
            client.user = user
            user.username = username
            user.user_type = user_type or user.user_type
            user.named_by_token, user.typed_by_token = named_by_token, typed_by_token
            if user.offline_timer is not None:
                # Back within the grace period: nobody was told we left.
                user.offline_timer.cancel()
                user.offline_timer = None
                first = False
            if self.shared and was_empty:
                # Back here while leaving (or in grace): registered again, announced by nobody.
                await self.backplane.join(client.user_id, username, user_type)
        if first and client in user.clients:
            self._announce_online(user)
        return user

    def _announce_online(self, user: UserState) -> None:
        self.send_to(self.presence_targets(user), p.user_online(user.user_id, user.username))

    def back_online(self, user_ids: Iterable[int]) -> None:
        for user_id in user_ids:
            user = self.users.get(user_id)
            if user is not None and user.clients:
                self._announce_online(user)

    def profile_changed(self, user_id: int, username: str | None, user_type: str | None) -> None:
        """The backend registered a profile: an online user whose token did not name them
        (or give their type) is shown by it from now on, in every frame."""
        user = self.users.get(user_id)
        if user is None:
            return
        if username and not user.named_by_token:
            user.username = username
        if user_type and not user.typed_by_token:
            user.user_type = user_type
        if self.shared:
            self.backplane.profile(user_id, user.username, user.user_type)

    def detach(self, client: Client) -> None:
        """Unregister a connection; after the last one, start the offline grace period."""
        user = client.user
        if user is None or client not in user.clients:
            return
        user.clients.remove(client)
        self.connections -= 1
        if client.expiry is not None:
            client.expiry.cancel()
        for on_detach in self.on_detach:
            on_detach(client)
        if user.clients:
            return
        user.last_seen = now_iso()
        for callback in self.on_last_close:
            callback(user.user_id)
        if self.shared:
            self.background.spawn(self._leave_shared(user), name=f"leave-{user.user_id}")
        elif self.grace_seconds > 0:
            user.offline_timer = asyncio.get_running_loop().call_later(
                self.grace_seconds, self._gone, user
            )
        else:
            self._gone(user)

    def _gone(self, user: UserState, announce: bool = True) -> None:
        if user.clients or self.users.get(user.user_id) is not user:
            return
        del self.users[user.user_id]
        self._keep_bucket(user)
        if self.shared:
            self.backplane.forget(user.user_id)
        if not announce:
            return  # still connected on another daemon
        last_seen = user.last_seen or now_iso()
        self.on_offline(user.user_id, last_seen)
        frame = p.user_offline(user.user_id, user.username, last_seen)
        self.send_to(self.presence_targets(user), frame)

    async def _leave_shared(self, user: UserState) -> None:
        """The last local connection closed: ask the backplane whether the user is gone
        everywhere, and start the grace period when this daemon owns it."""
        outcome = await self.backplane.leave(user.user_id, self.grace_seconds)
        if user.clients or self.users.get(user.user_id) is not user:
            return  # back on this daemon meanwhile (join registered it again)
        match outcome:
            case Leave.OFFLINE:
                self._gone(user)
            case Leave.ELSEWHERE:
                self._gone(user, announce=False)
            case Leave.GRACE:
                user.offline_timer = asyncio.get_running_loop().call_later(
                    self.grace_seconds, self._grace_over, user)

    def _grace_over(self, user: UserState) -> None:
        user.offline_timer = None
        self.background.spawn(self._settle(user), name=f"settle-{user.user_id}")

    async def _settle(self, user: UserState) -> None:
        announce = await self.backplane.settle(user.user_id)
        self._gone(user, announce)

    def presence_targets(self, user: UserState) -> list[int]:
        """Who hears of this user's presence: the contacts online here, or with other
        daemons every contact (their daemons filter by who they hold)."""
        if self.shared:
            return list(user.contacts)
        return self.online_contacts(user)

    async def settle_presence(self, seconds: float) -> None:
        """Shutdown with other daemons: let the departures of this daemon's users run their
        usual course for up to ``seconds``, so that a user who does not come back on another
        daemon within the grace period is announced offline there (nobody would be: this
        daemon's claim of itself ends its users silently), and one who does is not."""
        if not self.shared:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        await self.background.settle("leave-", seconds)
        timers = [u.offline_timer for u in self.users.values() if u.offline_timer is not None]
        if timers:
            last = max(t.when() for t in timers)
            # Just past the last one, so that its callback has run (and spawned its settle).
            await asyncio.sleep(max(0.0, min(last + 0.01, deadline) - loop.time()))
        await self.background.settle("settle-", max(0.0, deadline - loop.time()))

    def flush_presence(self) -> None:
        """Shutdown: report lastSeen of users still inside the grace period, drop timers."""
        for user in list(self.users.values()):
            if user.offline_timer is not None:
                user.offline_timer.cancel()
                self.on_offline(user.user_id, user.last_seen or now_iso())
        self.users.clear()

    def online_contacts(self, user: UserState) -> list[int]:
        return [uid for uid in user.contacts if uid in self.users]

    def add_contacts(self, members: Iterable[int]) -> None:
        """A conversation now joins these users: each becomes the others' contact."""
        ids = set(members)
        for uid in ids:
            user = self.users.get(uid)
            if user is not None:
                user.contacts |= ids - {uid}

    # -- fan-out ---------------------------------------------------------------------------

    def send_to(
        self,
        user_ids: Iterable[int],
        text: str,
        event: EventTemplate | None = None,
        skip: Client | None = None,
    ) -> set[int]:
        """Write ``text`` to every connection of these users (except ``skip``).

        Returns the users that had at least one open connection. With ``event`` = (kind, id,
        who), each user reached gets (kind, id, who) recorded as delivered, or (kind, id, that
        user) when ``who`` is None: a new_message is one event per recipient. The user of
        ``skip`` (the sender, whose other tabs get an echo) gets no event.
        """
        origin = skip.user_id if skip is not None else None
        if self.shared:
            user_ids = list(user_ids)
            reached = self._local(user_ids, text, event, skip, origin)
            # After the local write, never awaited (backplane contract 1).
            self.backplane.publish(user_ids, text, event, origin)
            return reached
        return self._local(user_ids, text, event, skip, origin)

    def deliver(self, user_id: int, text: str, event: EventTemplate | None,
                origin: int | None) -> None:
        """A frame another daemon published for ``user_id``: to its connections here."""
        self._local((user_id,), text, event, None, origin)

    def resync(self, reason: str) -> None:
        """Frames from other daemons may have been lost: every connection here is told to
        sync (docs/protocol.md, multi-node)."""
        self.send_clients(self.all_clients(), p.sync_required(reason))

    def _local(
        self,
        user_ids: Iterable[int],
        text: str,
        event: EventTemplate | None,
        skip: Client | None,
        origin: int | None,
    ) -> set[int]:
        reached: set[int] = set()
        targets: list[Client] = []
        live: list[int] = []  # tagged users written to now (not held back by a replay)
        users = self.users
        for uid in user_ids:
            user = users.get(uid)
            if user is None:
                continue
            tag = event is not None and uid != origin
            written = False
            for client in user.clients:
                if client is skip or not client.is_open:
                    continue
                reached.add(uid)
                if client.replaying:
                    tagged = None
                    if tag:
                        assert event is not None
                        tagged = (event[0], event[1], uid if event[2] is None else event[2])
                    client.send(text, tagged)
                elif (tag and client.replayed is not None and event is not None
                      and (event[0], event[1], uid if event[2] is None else event[2])
                      in client.replayed):
                    continue  # carried by the replay just before (Client.end_replay)
                else:
                    targets.append(client)
                    written = True
            if written and tag:
                live.append(uid)
        if targets:
            sockets = [c.ws for c in targets if c.ws is not None]
            if sockets:
                broadcast(sockets, text)
            for client in targets:
                if client.ws is None:
                    client.write(text)
                client.check_backlog()
        if event is not None and live:
            kind, event_id, who = event
            if kind is EventKind.MESSAGE and who is None:
                self.recorder.record_messages(event_id, live)
            else:
                for uid in live:
                    self.recorder.record((kind, event_id, uid if who is None else who), uid)
        return reached

    def send_clients(self, clients: Iterable[Client], text: str) -> int:
        """Write ``text`` (an untagged frame) to these connections, each once; return how
        many were written to (or held during their replay)."""
        count = 0
        sockets = []
        written: list[Client] = []
        for client in dict.fromkeys(clients):
            if not client.is_open:
                continue
            count += 1
            if client.replaying or client.ws is None:
                client.send(text)
            else:
                sockets.append(client.ws)
                written.append(client)
        if sockets:
            broadcast(sockets, text)
        for client in written:
            client.check_backlog()
        return count

    def all_clients(self) -> list[Client]:
        return [c for user in self.users.values() for c in user.clients]

    def pending_bytes(self) -> int:
        return sum(client.buffered() + client.held_bytes for client in self.all_clients())


def expiry_delay(expires_at: float) -> float:
    return max(0.0, expires_at - time.time())


def iso_expiry(expires_at: float | None) -> str | None:
    return iso_from_epoch(expires_at) if expires_at is not None else None
