"""The store interface: the domain operations the daemon persists, and the store's errors.

An engine implements :class:`Store` (``store_sqlite.SqliteStore`` is the default; the
interface is written so that a PostgreSQL engine can implement it too). Callers never see SQL,
statements or batching: they call these methods and get rows (``rows.py``) or the errors below.
``open_store(config)`` picks the engine.

What every engine guarantees (the daemon's delivery rules rely on each):

1. **Acknowledged means committed.** An awaited write returns only after its transaction
   committed, with the engine's durability; if it raises, nothing of it was stored.
2. **A bad write fails alone.** Writes are committed in groups (group commit), but a write that
   breaks a constraint raises its own error while the writes grouped with it commit, without
   costing them a transaction each.
3. **Message ids become visible in increasing order.** Once a reader can see message *n*, it
   can see every message with a smaller id that will ever be committed: ``since`` (and so the
   client's ``sync``) never skips a message that commits late. Ids are never reused.
4. **Idempotency lives in the database.** At most one message per ``(sender, request_id)`` and
   one conversation per ``(creator, request_id)``, across restarts; a repeat raises
   :class:`DuplicateRequest`.
5. **One direct conversation per pair of users.** ``direct_conversation(a, b)`` gets or
   creates it as one operation, so two first messages between a and b share one conversation.
6. **Delivered events stay delivered.** Once ``record_deliveries`` has committed an event, it is
   not in ``pending`` again; an event is pending until then.
7. **Every read that can grow is bounded** by its ``limit`` (or by ``MAX_ROWS``).
8. **After ``close()``** every operation raises :class:`StoreClosed`; nothing waits forever.
9. **Notifications are stored with what caused them.** ``set_like`` and ``add_comment`` store
   the owner's notification in the same transaction as the like or the comment;
   ``add_notifications`` stores a publish's notifications and its idempotency key together.
   A notification is pending (``pending``) until ``record_deliveries`` records it.
10. **At most one comment per ``(user, request_id)``** (DuplicateRequest on a repeat).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from rows import (
    CommentRow,
    ConversationRow,
    ConversationSummary,
    MessageDetail,
    MessageRow,
    NewNotification,
    NotificationRow,
    PendingEvent,
    PendingMessage,
    PendingNotification,
    PendingRead,
    PitchRow,
    PitchStats,
    UserRow,
)

_log = logging.getLogger("pitchey.store")

# Reads whose result could grow with the data are capped at this many rows.
MAX_ROWS = 100_000


class StoreError(Exception):
    """A store operation failed; nothing of that operation was stored."""


class StoreClosed(StoreError):
    """The store is closed (the daemon is shutting down)."""


class DuplicateRequest(StoreError):
    """The ``(user, request_id)`` of this write was stored before; nothing new was stored."""


class ConstraintViolation(StoreError):
    """The write contradicts the stored data (an unknown conversation, say)."""


class Unavailable(StoreError):
    """The database cannot take writes right now: the disk is full, the file or its file
    system is read-only, or the file was deleted or replaced under the daemon. Nothing of the
    write was stored. ``retry_after`` (seconds) is a hint for the client; the condition may
    clear by itself (space freed), and the engine notices when a later write succeeds."""

    def __init__(self, message: str, retry_after: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Corrupt(StoreError):
    """The database file is damaged (pages that do not parse). It does not heal by itself."""


class NewMessage(NamedTuple):
    """A message to store, with one receipt per recipient (the other active participants).
    (A named tuple: built once per message on the hot path, and cheaper to build than a
    frozen dataclass.)"""

    conversation_id: int
    sender_id: int
    receiver_id: int | None  # the other user of a 1:1, for the Pitchey schema's column
    recipients: Sequence[int]
    content: str
    message_type: str
    attachments: list[dict[str, Any]]
    pitch_id: int | None
    subject: str | None
    request_id: str | None
    sent_at: str


class Store(Protocol):
    """What the daemon needs from a database. See the module docstring for the guarantees."""

    # Called after every committed transaction with (writes in it, seconds): metrics.
    on_commit: Callable[[int, float], None] | None
    # Another program writes the same rows (the Pitchey app, on PostgreSQL): rows cached in
    # memory are read again after conversations.SHARED_ROWS_SECONDS.
    shared_with_app: bool
    # notifications.max_per_user, kept by every write that adds notifications (0: no bound
    # at insert; prune_notifications still applies one).
    notifications_per_user: int

    async def open(self) -> None:
        """Connect, apply the schema and migrations, start the writer."""

    async def close(self) -> None:
        """Commit what is queued, then close; every later call raises StoreClosed."""

    async def healthy(self) -> bool:
        """True when the database answers a read and can take writes. Otherwise False, or
        (better) a StoreError whose text is the reason: Unavailable, Corrupt."""

    @property
    def queued(self) -> int:
        """Writes waiting to be committed (a gauge)."""

    async def flush(self) -> None:
        """Return once every write queued before this call is committed and its caller told
        (writes resolve in the order they were queued)."""

    def serialized(self, *key: int | str) -> AbstractAsyncContextManager[None]:
        """Hold ``key`` against every daemon on this database for the block: a check and the
        write that depends on it (is it liked yet? then like it) run in one daemon at a time,
        and the block's writes are committed when it ends, if awaited; what was read before
        the block must be read again inside it. Holds nothing on an engine of one daemon
        (SQLite). Never waits long: past a bound the block runs without the lock (at worst a
        notice twice). Only worth it with other daemons (a backplane): Service.one_at_a_time."""

    # -- settings and users ----------------------------------------------------------------

    async def setting(self, key: str) -> str | None: ...

    async def put_setting(self, key: str, value: str) -> None: ...

    async def accepts_user(self, user_id: int) -> bool:
        """Whether this user may connect. False only where the store serves the users another
        program created (PostgreSQL with ``pitchey_schema = "existing"``: the app's ``users``)
        and this one is not among them, or where the id cannot be stored."""

    async def users(self, ids: Iterable[int]) -> dict[int, UserRow]:
        """The known users among ``ids`` (at most MAX_ROWS)."""

    async def save_profile(
        self, user_id: int, username: str | None, user_type: str | None
    ) -> None:
        """Create the user if unknown; set the fields that are not None."""

    def save_profile_later(
        self, user_id: int, username: str | None, user_type: str | None
    ) -> None:
        """``save_profile`` that nobody waits for (the handshake's path); failures are logged."""

    def set_last_seen_later(self, user_id: int, last_seen: str) -> None:
        """Record when a user went offline; nobody waits, failures are logged."""

    # -- conversations ---------------------------------------------------------------------

    async def conversation(self, conversation_id: int) -> ConversationRow | None: ...

    async def create_conversation(
        self,
        created_by: int,
        members: Sequence[int],
        title: str | None,
        request_id: str | None,
        pitch_id: int | None,
        now: str,
        *,
        conversation_id: int | None = None,
    ) -> ConversationRow:
        """A new conversation of ``members`` (the creator among them), with the id given
        (the backend's own ids: later ids are assigned above it) or a new one.

        Raises DuplicateRequest when ``(created_by, request_id)`` made one before, and
        ConstraintViolation when ``conversation_id`` exists.
        """

    async def conversation_by_request(self, created_by: int, request_id: str) -> int | None: ...

    async def direct_conversation(self, a: int, b: int, now: str) -> ConversationRow:
        """The direct (1:1) conversation of a and b, created and committed if missing."""

    async def find_direct(self, a: int, b: int) -> int | None:
        """The id of the direct conversation of a and b, if they have one (never creates)."""

    async def contacts(self, user_id: int) -> set[int]:
        """Users who share an active conversation with ``user_id`` (not the user)."""

    # -- messages --------------------------------------------------------------------------

    async def add_message(self, message: NewMessage) -> int:
        """Store the message and its receipts in one transaction; return its id.

        Raises DuplicateRequest for a repeated ``(sender_id, request_id)``, and
        ConstraintViolation when the conversation or a user does not exist.
        """

    async def message(self, message_id: int) -> MessageRow | None: ...

    async def message_by_request(self, sender_id: int, request_id: str) -> MessageRow | None: ...

    async def delivered_any(self, message_id: int) -> bool:
        """Some recipient has been sent the message."""

    async def message_for_read(
        self, message_id: int, reader_id: int
    ) -> tuple[MessageRow, str | None] | None:
        """The message and ``reader_id``'s read_at (None when unread or not a recipient)."""

    async def mark_read(self, message_id: int, reader_id: int, now: str) -> None:
        """Set the reader's read_at (and delivered_at when empty) unless already read."""

    async def history(
        self, conversation_id: int, viewer_id: int, before: int | None, limit: int
    ) -> tuple[list[MessageRow], bool]:
        """Up to ``limit`` messages before ``before`` (the newest when None), oldest first,
        and whether older ones exist. ``is_read``: for the viewer's own messages, read by
        someone; otherwise read by the viewer."""

    async def since(self, user_id: int, since: int, limit: int) -> tuple[list[MessageRow], bool]:
        """Messages with id > ``since`` in the user's active conversations, oldest first."""

    # -- durable events --------------------------------------------------------------------

    async def pending(self, user_id: int, limit: int) -> list[PendingEvent]:
        """The user's undelivered events (messages of conversations the user is still an
        active participant of, read notices, notifications), oldest first by queued time
        (ties: messages, reads, notifications, then by id), at most ``limit``."""

    def record_deliveries(
        self, messages: Mapping[int, Sequence[int]], reads: Sequence[tuple[int, int]],
        notifications: Sequence[int] = (),
    ) -> asyncio.Future[None]:
        """Record events as delivered: ``messages`` maps a message id to recipients sent it,
        ``reads`` lists (message id, reader id) notices sent to the sender, ``notifications``
        the notification ids sent to their user. Queued now; the future resolves after the
        commit."""

    # -- typing ----------------------------------------------------------------------------

    def set_typing_later(
        self, conversation_id: int, user_id: int, typing: bool, now: str
    ) -> None:
        """Mirror typing state into ``typing_indicators``; nobody waits."""

    async def clear_typing(self) -> None:
        """Startup: drop typing rows left by a previous run."""

    # -- the inbox and HTTP history (appended for the HTTP API) -----------------------------

    async def conversation_list(
        self, user_id: int, before: tuple[str, int] | None, limit: int
    ) -> tuple[list[ConversationSummary], bool]:
        """The user's active conversations, most recent activity first (activity = the last
        message's time, else the creation time; ties by id, descending), those strictly after
        the ``before`` cursor ``(activity, id)``, at most ``limit``; and whether more exist."""

    async def message_details(self, message_ids: Sequence[int]) -> dict[int, MessageDetail]:
        """Extra columns and read receipts of these messages (at most MAX_ROWS receipts)."""

    async def unread_ids(
        self, conversation_id: int, reader_id: int, up_to: int | None, limit: int
    ) -> list[tuple[int, int]]:
        """(id, sender) of messages of others in the conversation that ``reader_id`` has not read,
        up to ``up_to`` when given, oldest first, at most ``limit``."""

    async def mark_read_many(self, message_ids: Sequence[int], reader_id: int, now: str) -> None:
        """``mark_read`` for several messages, in one transaction."""

    # -- participants, pitches, notifications (appended for PROTOCOL.md 9-11) ---------------

    async def change_participants(
        self, conversation_id: int, add: Sequence[int], remove: Sequence[int], now: str
    ) -> ConversationRow | None:
        """Make ``add`` active participants (created, or re-activated) and ``remove`` inactive
        (``left_at`` set), in one transaction, and drop the conversation's direct-pair key;
        return the conversation as it is now, or None when it does not exist. The two lists
        are disjoint (the caller checks)."""

    async def pitch(self, pitch_id: int) -> PitchRow | None: ...

    async def put_pitch(self, pitch: PitchRow, now: str) -> None:
        """Register or replace a pitch (owner, title, visibility, the allowed set)."""

    async def pitch_stats(self, pitch_id: int, user_id: int) -> PitchStats:
        """Distinct viewers, likes, and whether ``user_id`` likes it."""

    async def has_viewed(self, pitch_id: int, user_id: int) -> bool: ...

    async def add_view(self, pitch_id: int, user_id: int, now: str) -> None:
        """Record a view (a repeat changes nothing)."""

    async def set_like(
        self, pitch_id: int, user_id: int, liked: bool, now: str,
        notify: NewNotification | None,
    ) -> int | None:
        """Like or unlike (idempotent), and store ``notify`` in the same transaction; return
        the notification's id (None without one)."""

    async def add_comment(
        self, pitch_id: int, user_id: int, content: str, request_id: str | None, now: str,
        notify: Callable[[int], NewNotification] | None,
    ) -> tuple[int, int | None]:
        """Store a comment and the notification ``notify(comment id)`` in one transaction:
        (comment id, notification id).
        Raises DuplicateRequest for a repeated ``(user_id, request_id)``."""

    async def comment_by_request(self, user_id: int, request_id: str) -> CommentRow | None: ...

    async def comments(
        self, pitch_id: int, before: int | None, limit: int
    ) -> tuple[list[CommentRow], bool]:
        """Up to ``limit`` comments with id < ``before`` (the newest when None), oldest
        first, and whether older ones exist."""

    async def add_notifications(
        self, notes: Sequence[NewNotification], now: str, publish_key: str | None = None,
        answer: Callable[[list[int]], str] | None = None,
    ) -> list[int]:
        """Store notifications (ids in order) and, with ``publish_key``, the publish's answer
        ``answer(ids)`` (JSON text) under that key, in one transaction. Raises
        DuplicateRequest when the key was stored before (by another daemon, say)."""

    async def publish_answer(self, key: str) -> str | None:
        """The answer stored for an idempotencyKey, if any."""

    async def put_publish_answer(self, key: str, answer: str, now: str) -> None:
        """Replace a stored answer (its ``delivered`` count, known after the fan-out)."""

    async def release_publish(self, key: str, answer: str) -> None:
        """Forget ``key`` if its stored answer is still ``answer`` (a claim whose publish
        failed before it sent anything)."""

    async def claim_publish(self, key: str, answer: str, now: str) -> bool:
        """Store ``answer`` under ``key`` unless the key is stored already; True when this
        call stored it. Committed before it returns: the claim of a publish that stores
        nothing else, made before anything is sent."""

    async def notification_page(
        self, user_id: int, before: int | None, limit: int, unread_only: bool
    ) -> tuple[list[NotificationRow], bool]:
        """Up to ``limit`` of the user's notifications with id < ``before``, newest first,
        and whether more exist."""

    async def unread_notifications(self, user_id: int) -> int: ...

    async def mark_notifications_read(
        self, user_id: int, ids: Sequence[int] | None, now: str
    ) -> list[int]:
        """Mark the user's unread notifications among ``ids`` (all of them when None) read;
        return the ids that changed, ascending (others' ids are ignored)."""

    async def prune_notifications(self, max_per_user: int, created_before: str) -> None:
        """Delete notifications (and publish keys) created before ``created_before``, and
        each user's beyond ``max_per_user``: read ones first, oldest first."""


def pending_order(event: PendingEvent) -> tuple[str, int, int]:
    """The replay's order, for every engine: oldest queued first; at one instant messages,
    then read notices, then notifications, each by id."""
    match event:
        case PendingMessage(queued_at=queued_at, message=message):
            return (queued_at, 0, message.id)
        case PendingRead(queued_at=queued_at, message_id=message_id):
            return (queued_at, 1, message_id)
        case PendingNotification(queued_at=queued_at, notification=notification):
            return (queued_at, 2, notification.id)


W = TypeVar("W")


class WriteQueue(Generic[W]):
    """The group-commit queue both engines share: writes waiting for the writer task, each
    with the future that resolves after its COMMIT (or holds its error), and whether writes
    fail right now. An engine's writer task takes batches from ``_queue`` and sleeps on
    ``_wakeup`` while it is empty; ``where`` names the database in log lines."""

    def __init__(self) -> None:
        self._queue: deque[tuple[W, asyncio.Future[None]]] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._closed = False
        # Why writes fail right now (cleared by the next commit).
        self._failing: Unavailable | None = None
        self._last_commit = time.monotonic()
        self.notifications_per_user = 0

    @property
    def where(self) -> str:
        raise NotImplementedError

    def _submit(self, write: W) -> asyncio.Future[None]:
        """Queue a write; the future resolves after its COMMIT (or holds the error)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._closed:
            future.set_exception(StoreClosed("store closed"))
            return future
        self._queue.append((write, future))
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            if not wakeup.done():
                wakeup.set_result(None)
        return future

    async def _write(self, write: W) -> None:
        await self._submit(write)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def _note_commit(self) -> None:
        self._last_commit = time.monotonic()
        if self._failing is not None:
            _log.warning("database %s takes writes again (was: %s)", self.where, self._failing)
            self._failing = None


class KeyedLock:
    """One holder per key at a time; waiters queue in order. Entries vanish when released."""

    def __init__(self) -> None:
        self._waiting: dict[Any, list[asyncio.Future[None]]] = {}

    async def claim(self, key: Any) -> None:
        """Return once the caller holds ``key``; it must ``release`` it (in a finally)."""
        while (waiting := self._waiting.get(key)) is not None:
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiting.append(turn)
            await turn
        self._waiting[key] = []

    def release(self, key: Any) -> None:
        for turn in self._waiting.pop(key):
            if not turn.done():
                turn.set_result(None)

    @asynccontextmanager
    async def hold(self, key: Any) -> AsyncIterator[None]:
        """``claim`` and ``release`` around a block (the hot path calls them directly: an
        async context manager costs a generator per use)."""
        await self.claim(key)
        try:
            yield
        finally:
            self.release(key)

    def __len__(self) -> int:
        return len(self._waiting)


def open_store(
    path: str,
    *,
    url: str = "",
    pitchey_schema: str = "create",
    pool_size: int = 4,
    synchronous: str = "FULL",
    max_batch: int = 512,
    on_commit: Callable[[int, float], None] | None = None,
    read_connections: int = 4,
) -> Store:
    """The engine for this configuration: PostgreSQL when ``url`` is a postgresql:// URL
    (asyncpg is imported only then), else SQLite at ``url``'s path or at ``path``."""
    if url.startswith(("postgresql://", "postgres://")):
        from store_postgres import PostgresStore

        return PostgresStore(url, pitchey_schema=pitchey_schema, pool_size=pool_size,
                             max_batch=max_batch, on_commit=on_commit)
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
    from store_sqlite import SqliteStore

    return SqliteStore(path, synchronous=synchronous, max_batch=max_batch, on_commit=on_commit,
                       read_connections=read_connections)


def read_setting(path: str, key: str) -> str | None:
    """A setting of a database no daemon needs to have open (``token --db``); None when the
    database or the setting is missing."""
    from store_sqlite import read_setting as sqlite_setting

    return sqlite_setting(path, key)
