"""The PostgreSQL engine of the store, through asyncpg. Implements ``store.Store``; nothing
outside this module sees SQL or asyncpg (imported only when ``database.url`` is postgresql).

**Tables.** The Pitchey app's own tables (PROTOCOL.md section 13, ``pitchey-schema.sql``):
``users``, ``conversations``, ``conversation_participants``, ``messages``,
``message_read_receipts``, ``typing_indicators``, and for pitch activity ``pitches`` (owner
``user_id``; public when ``status = 'published'``), ``ndas`` (signers with
``access_granted`` may see a private pitch) and ``pitch_views`` (a row per first view of a
user; ``viewCount`` counts distinct viewers), with the app's names and columns. With
``pitchey_schema = "create"`` this engine creates them (a superset of what it needs; columns
the daemon cannot fill, such as ``users.email``, are nullable there). With ``"existing"`` it
uses the app's tables as they are: it adds no column or index to them and never inserts into
``users``. Everything the app's tables have no column for lives in ``ws_*`` tables of its
own, created by numbered migrations (``ws_schema_version``):

- ``ws_message_requests`` / ``ws_conversation_requests``: idempotency, one row per
  ``(sender_id, request_id)`` / ``(created_by_id, request_id)`` (their primary keys);
- ``ws_undelivered``: the messages a recipient has not been sent. The app's
  ``message_read_receipts.delivered_at`` is NOT NULL, so a receipt row is written only when
  the message was delivered (or read), with the real time: a receipt never means "not yet";
- ``ws_read_notices``: read notices owed to senders;
- ``ws_direct_conversations``, ``ws_users`` (last_seen; the profile on an existing database),
  ``ws_settings``;
- (migration 2) ``ws_pitch_allowed`` (the backend's allowed users of a private pitch; with
  ``"existing"``, ``put_pitch`` writes only these, the app's ``pitches`` row rules),
  ``ws_pitch_likes``, ``ws_pitch_comments``, ``ws_notifications``, ``ws_publish_requests``.
  Comment and notification ids are taken from their sequences before the write (the
  notification of a comment carries its id); a failed write leaves a gap.

**Writes.** One task, the write loop, owns one connection and commits everything queued in
one transaction (group commit); each caller's future resolves after COMMIT. The costs that
grow with a batch are PostgreSQL's per-row work, not statements or round trips: all the
batch's messages are one statement (``_INSERT_MESSAGES``: arrays, one per column, through
``unnest``), and a ``record_deliveries`` call is one statement (``_DELIVERED``). The send
path's usual batch, messages and delivery records only, is a single statement run on its
own (``_MESSAGES_AND_DELIVERED``), which is its own transaction: one round trip, answered
after the commit. Any other batch runs in BEGIN ... COMMIT, its statements grouped by SQL
text (one ``executemany`` each), INSERTs first in foreign-key order (``_PARENTS_FIRST``),
the messages at their rank. When a batch fails it runs again as one transaction with a
savepoint per write: the bad write fails alone.

**Ids.** Message and conversation ids come from the tables' own sequences, taken inside the
batch's transaction after ``pg_advisory_xact_lock(_ID_LOCK)`` (for messages, inside the
message statement, ahead of the first ``nextval``: ``_MESSAGE_CTES`` says how): a
transaction that takes ids waits until every earlier one that took ids has committed or
rolled back, so ids become visible in increasing order even with several daemons on one
database. (Rows the app inserts itself do not take this lock; the app does not insert
messages while pitchey-ws runs.)

**Errors.** asyncpg's errors become the store's: a repeated request id is DuplicateRequest,
other constraint failures ConstraintViolation; a lost connection, a full disk, a read-only or
shutting-down server Unavailable (the writer reconnects for the next batch); damaged data
Corrupt.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from protocol import dumps, now_iso
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
    Receipt,
    UserRow,
)
from store import (
    MAX_ROWS,
    ConstraintViolation,
    Corrupt,
    DuplicateRequest,
    KeyedLock,
    NewMessage,
    StoreClosed,
    StoreError,
    Unavailable,
    WriteQueue,
    pending_order,
)

log = logging.getLogger("pitchey.store")

# SQLSTATEs of a transaction the server aborted to resolve a conflict with another one
# (serialization failure, deadlock): running the same batch again is the cure.
TRANSIENT = frozenset({"40001", "40P01"})
TRANSIENT_RETRIES = 3

# Advisory lock keys (any constants; other programs on the database must not use them).
_ID_LOCK = 0x7069_7463_6865_7901  # held by each transaction that takes message ids
_MIGRATE_LOCK = 0x7069_7463_6865_7902  # held while the schema is checked and migrated
_SERIALIZED_LOCKS = 0x7077_7301  # the first int4 of Store.serialized's two-key locks
# The longest Store.serialized waits for its lock (or a connection to hold it) before the
# block runs without it.
SERIALIZED_WAIT_SECONDS = 2.0

PROBE_AFTER = 5.0  # the health check writes when nothing committed for this long (seconds)
INT4_MAX = 2**31 - 1  # the app's ids are integer (serial)

Params = tuple[Any, ...]


class _Id:
    """A placeholder in a statement's parameters for an id taken at commit time."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


CONVERSATION_ID = _Id("conversation id")


@dataclass
class _Write:
    """What commits together: statements, and at most one message. A statement parameter
    that is CONVERSATION_ID is replaced by an id from the conversations sequence in the
    batch's transaction. A message is not a statement of its own: the batch's messages are
    written by one statement (``_INSERT_MESSAGES``). The ids taken are left in
    ``message_id`` / ``conversation_id`` once the write committed."""

    statements: list[tuple[str, Params]] = field(default_factory=list)
    message: NewMessage | None = None
    takes_conversation_id: bool = False
    message_id: int | None = None
    conversation_id: int | None = None

    def add(self, sql: str, params: Params) -> _Write:
        self.statements.append((sql, params))
        return self

    @property
    def empty(self) -> bool:
        return not self.statements and self.message is None

    def bound(self) -> list[tuple[str, Params]]:
        if not self.takes_conversation_id:
            return self.statements
        cid = self.conversation_id
        return [
            (sql, tuple(cid if p is CONVERSATION_ID else p for p in params))
            for sql, params in self.statements
        ]


# -- schema ------------------------------------------------------------------------------

# The app's tables, for pitchey_schema = "create" (pitchey-schema.sql, less the app's enums and
# the tables pitchey-ws does not use: pitch_id columns carry no foreign key here). Columns the
# daemon cannot fill are nullable, and usernames are not unique: tokens name users, not the
# app's sign-up form.
APP_TABLES = """
CREATE TABLE IF NOT EXISTS users (
    id            serial PRIMARY KEY,
    email         varchar(255) UNIQUE,
    username      varchar(100),
    password_hash text,
    user_type     varchar(20),
    first_name    varchar(100),
    last_name     varchar(100),
    company_name  text,
    is_active     boolean DEFAULT true,
    created_at    timestamp NOT NULL DEFAULT now(),
    updated_at    timestamp NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS conversations (
    id              serial PRIMARY KEY,
    pitch_id        integer,
    created_by_id   integer NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    title           varchar(200),
    is_group        boolean DEFAULT false,
    last_message_at timestamp,
    created_at      timestamp NOT NULL DEFAULT now(),
    updated_at      timestamp NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS conversations_last_message_at_idx ON conversations (last_message_at);
CREATE TABLE IF NOT EXISTS conversation_participants (
    id                 serial PRIMARY KEY,
    conversation_id    integer NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    user_id            integer NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    is_active          boolean DEFAULT true,
    joined_at          timestamp NOT NULL DEFAULT now(),
    left_at            timestamp,
    mute_notifications boolean DEFAULT false,
    UNIQUE (conversation_id, user_id)
);
CREATE INDEX IF NOT EXISTS conversation_participants_user_id_idx
    ON conversation_participants (user_id);
CREATE TABLE IF NOT EXISTS messages (
    id                     serial PRIMARY KEY,
    conversation_id        integer REFERENCES conversations (id) ON DELETE CASCADE,
    pitch_id               integer,
    sender_id              integer NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    receiver_id            integer REFERENCES users (id) ON DELETE CASCADE,
    parent_message_id      integer REFERENCES messages (id) ON DELETE CASCADE,
    subject                varchar(200),
    content                text NOT NULL,
    message_type           varchar(50) DEFAULT 'text',
    attachments            jsonb,
    is_read                boolean DEFAULT false,
    is_edited              boolean DEFAULT false,
    is_deleted             boolean DEFAULT false,
    off_platform_requested boolean DEFAULT false,
    off_platform_approved  boolean DEFAULT false,
    sent_at                timestamp NOT NULL DEFAULT now(),
    read_at                timestamp,
    edited_at              timestamp,
    deleted_at             timestamp
);
CREATE INDEX IF NOT EXISTS messages_conversation_id_idx ON messages (conversation_id, id);
CREATE INDEX IF NOT EXISTS messages_sent_at_idx ON messages (sent_at);
CREATE TABLE IF NOT EXISTS message_read_receipts (
    id           serial PRIMARY KEY,
    message_id   integer NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    user_id      integer NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    delivered_at timestamp NOT NULL DEFAULT now(),
    read_at      timestamp,
    UNIQUE (message_id, user_id)
);
-- Each user's unread receipts (the inbox's counts). Only in a database pitchey-ws created:
-- it adds no index to an existing Pitchey database (docs/deploy.md suggests this one).
CREATE INDEX IF NOT EXISTS message_read_receipts_unread_idx
    ON message_read_receipts (user_id, message_id) WHERE read_at IS NULL;
CREATE TABLE IF NOT EXISTS typing_indicators (
    id              serial PRIMARY KEY,
    conversation_id integer NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    user_id         integer NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    is_typing       boolean DEFAULT true,
    updated_at      timestamp NOT NULL DEFAULT now(),
    UNIQUE (conversation_id, user_id)
);
-- Pitches (PROTOCOL.md 9): the app's columns, its enums as text; the ones the backend's
-- PUT /api/pitches cannot fill (logline, genre, format) nullable. status 'published' is
-- public, anything else private (the owner, NDA signers with access_granted, ws_pitch_allowed).
CREATE TABLE IF NOT EXISTS pitches (
    id           serial PRIMARY KEY,
    user_id      integer NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    title        varchar(200) NOT NULL,
    logline      text,
    genre        varchar(20),
    format       varchar(20),
    status       varchar(20) NOT NULL DEFAULT 'draft',
    published_at timestamp,
    view_count   integer DEFAULT 0,
    like_count   integer DEFAULT 0,
    nda_count    integer DEFAULT 0,
    created_at   timestamp NOT NULL DEFAULT now(),
    updated_at   timestamp NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS pitches_user_id_idx ON pitches (user_id);
CREATE TABLE IF NOT EXISTS ndas (
    id             serial PRIMARY KEY,
    pitch_id       integer NOT NULL REFERENCES pitches (id) ON DELETE CASCADE,
    signer_id      integer NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    nda_type       varchar(20),
    signed_at      timestamp NOT NULL DEFAULT now(),
    access_granted boolean DEFAULT true,
    UNIQUE (pitch_id, signer_id)
);
CREATE TABLE IF NOT EXISTS pitch_views (
    id        serial PRIMARY KEY,
    pitch_id  integer NOT NULL REFERENCES pitches (id) ON DELETE CASCADE,
    viewer_id integer REFERENCES users (id) ON DELETE SET NULL,
    view_type varchar(20),
    viewed_at timestamp NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS pitch_views_pitch_id_idx ON pitch_views (pitch_id);
"""

APP_TABLE_NAMES = ("users", "conversations", "conversation_participants", "messages",
                   "message_read_receipts", "typing_indicators", "pitches", "ndas",
                   "pitch_views")

# pitchey-ws's own tables: migration n brings the schema from version n - 1 to n.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE ws_settings (
        key   text PRIMARY KEY,
        value text NOT NULL
    );
    CREATE TABLE ws_users (
        user_id   integer PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
        last_seen timestamp
    );
    CREATE TABLE ws_conversation_requests (
        created_by_id   integer NOT NULL,
        request_id      text NOT NULL,
        conversation_id integer NOT NULL UNIQUE REFERENCES conversations (id) ON DELETE CASCADE,
        PRIMARY KEY (created_by_id, request_id)
    );
    CREATE TABLE ws_direct_conversations (
        user_low        integer NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        user_high       integer NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        conversation_id integer NOT NULL UNIQUE REFERENCES conversations (id) ON DELETE CASCADE,
        PRIMARY KEY (user_low, user_high),
        CHECK (user_low < user_high)
    );
    CREATE TABLE ws_message_requests (
        sender_id  integer NOT NULL,
        request_id text NOT NULL,
        message_id integer NOT NULL UNIQUE REFERENCES messages (id) ON DELETE CASCADE,
        PRIMARY KEY (sender_id, request_id)
    );
    CREATE TABLE ws_undelivered (
        user_id    integer NOT NULL REFERENCES users (id) ON DELETE CASCADE,
        message_id integer NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        PRIMARY KEY (user_id, message_id)
    );
    CREATE INDEX ws_undelivered_message ON ws_undelivered (message_id);
    CREATE TABLE ws_read_notices (
        message_id integer NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        reader_id  integer NOT NULL,
        sender_id  integer NOT NULL,
        PRIMARY KEY (message_id, reader_id)
    );
    CREATE INDEX ws_read_notices_sender ON ws_read_notices (sender_id);
    """,
    # 2: pitch activity and notifications (PROTOCOL.md 9-11). Pitches and their views are
    # the app's pitches / ndas / pitch_views; what the app has no table for is here.
    """
    CREATE TABLE ws_pitch_allowed (
        pitch_id integer NOT NULL REFERENCES pitches (id) ON DELETE CASCADE,
        user_id  bigint NOT NULL,
        PRIMARY KEY (pitch_id, user_id)
    );
    CREATE TABLE ws_pitch_likes (
        pitch_id integer NOT NULL REFERENCES pitches (id) ON DELETE CASCADE,
        user_id  bigint NOT NULL,
        liked_at timestamp NOT NULL,
        PRIMARY KEY (pitch_id, user_id)
    );
    CREATE TABLE ws_pitch_comments (
        id         bigserial PRIMARY KEY,
        pitch_id   integer NOT NULL REFERENCES pitches (id) ON DELETE CASCADE,
        user_id    bigint NOT NULL,
        content    text NOT NULL,
        created_at timestamp NOT NULL,
        request_id text,
        CONSTRAINT ws_pitch_comments_request UNIQUE (user_id, request_id)
    );
    CREATE INDEX ws_pitch_comments_pitch ON ws_pitch_comments (pitch_id, id);
    CREATE TABLE ws_notifications (
        id           bigserial PRIMARY KEY,
        user_id      bigint NOT NULL,
        type         text NOT NULL,
        fields       json NOT NULL,
        created_at   timestamp NOT NULL,
        delivered_at timestamp,
        read_at      timestamp
    );
    CREATE INDEX ws_notifications_user ON ws_notifications (user_id, id);
    CREATE INDEX ws_notifications_undelivered ON ws_notifications (user_id, id)
        WHERE delivered_at IS NULL;
    CREATE INDEX ws_notifications_unread ON ws_notifications (user_id, id)
        WHERE read_at IS NULL;
    CREATE INDEX ws_notifications_created ON ws_notifications (created_at);
    CREATE TABLE ws_publish_requests (
        key        text PRIMARY KEY,
        answer     json NOT NULL,
        created_at timestamp NOT NULL
    );
    CREATE INDEX ws_publish_requests_created ON ws_publish_requests (created_at);
    """,
    # 3: on an existing Pitchey database the profile from the tokens' claims and the
    # backend's PUT /api/users (the app's users row is never changed; these win over it).
    """
    ALTER TABLE ws_users ADD COLUMN username varchar(100), ADD COLUMN user_type text;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

# Unique indexes that mean "this request was stored before".
_REQUEST_KEYS = frozenset({"ws_message_requests_pkey", "ws_conversation_requests_pkey",
                           "ws_pitch_comments_request", "ws_publish_requests_pkey"})


def _below(before: int | None) -> int:
    """A page's exclusive upper id bound as a bigint: none (or 0), or past the largest, is
    every id (a client's cursor may be any integer)."""
    return INT8_MAX if not before or before > INT8_MAX else before


def _timestamp_out(text: str) -> str:
    """PostgreSQL's text form of a timestamp ('2024-05-01 12:00:00.12') in the wire format
    ('2024-05-01T12:00:00.120Z'). Infinite values pass through."""
    day, _, clock = text.partition(" ")
    if not clock:
        return text
    whole, _, fraction = clock.partition(".")
    return f"{day}T{whole}.{(fraction + '000')[:3]}Z"


async def _init_connection(conn: asyncpg.Connection) -> None:
    # Timestamps cross as the wire format's text: PostgreSQL parses '...T...Z' itself (the
    # zone is ignored for timestamp without time zone, which holds UTC as the app's does).
    await conn.set_type_codec(
        "timestamp", schema="pg_catalog", encoder=str, decoder=_timestamp_out, format="text"
    )


class PostgresStore(WriteQueue[_Write]):
    """``store.Store`` on a PostgreSQL database."""

    shared_with_app = True  # the Pitchey app reads and writes the same tables

    def __init__(
        self,
        url: str,
        *,
        pitchey_schema: str = "create",
        pool_size: int = 4,
        max_batch: int = 512,
        on_commit: Callable[[int, float], None] | None = None,
    ) -> None:
        if pitchey_schema not in ("create", "existing"):
            raise ValueError(f"pitchey_schema: create or existing, got {pitchey_schema!r}")
        super().__init__()
        self.url = url
        self.existing = pitchey_schema == "existing"
        self.pool_size = pool_size
        self.max_batch = max_batch
        self.on_commit = on_commit
        self._pool: asyncpg.Pool | None = None
        # Connections that hold Store.serialized's locks, apart from the reads' pool: a block
        # holding a lock reads too, and a pool of lock holders alone could leave it none.
        self._lock_pool: asyncpg.Pool | None = None
        self._writer: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._pairs = KeyedLock()
        self._message_seq = "messages_id_seq"
        self._conversation_seq = "conversations_id_seq"
        # With pitchey_schema = "create", the app's own inserts take ids from these sequences:
        # rows written here with the id a token or the backend gave move them past it.
        # (None: the table has no sequence, so nothing to move.)
        self._user_seq: str | None = None
        self._pitch_seq: str | None = None
        self.transactions = 0
        self._corrupt: Corrupt | None = None
        self._probe: asyncio.Future[None] | None = None

    @property
    def where(self) -> str:
        """The database for messages: the URL without a password."""
        return re.sub(r"://([^:@/]*):[^@/]*@", r"://\1@", self.url)

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, check or create the tables, migrate, start the writer. Raises StoreError
        naming the database and the reason; everything opened so far is closed again."""
        try:
            self._writer = await self._connect()
            await self._migrate(self._writer)
            self._pool = await asyncpg.create_pool(
                self.url, min_size=1, max_size=self.pool_size, init=_init_connection,
                command_timeout=30,
            )
            self._lock_pool = await asyncpg.create_pool(
                self.url, min_size=0, max_size=self.pool_size, command_timeout=30,
            )
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            await self.close()
            raise StoreError(f"database {self.where}: {_describe(exc)}") from exc
        except BaseException:
            await self.close()
            raise
        self._task = asyncio.create_task(self._write_loop(), name="store-writer")

    async def _connect(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(self.url, timeout=10, command_timeout=30)
        await _init_connection(conn)
        return conn

    async def _migrate(self, conn: asyncpg.Connection) -> None:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATE_LOCK)
            if self.existing:
                missing = [t for t in APP_TABLE_NAMES
                           if await conn.fetchval("SELECT to_regclass($1)", t) is None]
                if missing:
                    raise StoreError(
                        f"database {self.where} has no Pitchey table {', '.join(missing)}"
                        ' (database.pitchey_schema = "existing" uses the app\'s tables)'
                    )
            else:
                await conn.execute(APP_TABLES)
            if await conn.fetchval("SELECT to_regclass('ws_schema_version')") is None:
                await conn.execute("CREATE TABLE ws_schema_version (version integer NOT NULL)")
                await conn.execute("INSERT INTO ws_schema_version VALUES (0)")
            version = await conn.fetchval("SELECT version FROM ws_schema_version")
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"database {self.where} has pitchey-ws schema version {version}, newer"
                    f" than this daemon's {SCHEMA_VERSION}"
                )
            for number in range(version + 1, SCHEMA_VERSION + 1):
                await conn.execute(MIGRATIONS[number - 1])
                await conn.execute("UPDATE ws_schema_version SET version = $1", number)
            self._message_seq = await conn.fetchval(
                "SELECT pg_get_serial_sequence('messages', 'id')")
            self._conversation_seq = await conn.fetchval(
                "SELECT pg_get_serial_sequence('conversations', 'id')")
            if not self.existing:
                self._user_seq = await conn.fetchval(
                    "SELECT pg_get_serial_sequence('users', 'id')")
                self._pitch_seq = await conn.fetchval(
                    "SELECT pg_get_serial_sequence('pitches', 'id')")
            if self._message_seq is None or self._conversation_seq is None:
                raise StoreError(f"database {self.where}: messages.id and conversations.id"
                                 " must take their default from a sequence (serial)")
            if self.existing:
                await self._check_indexes(conn)

    async def _check_indexes(self, conn: asyncpg.Connection) -> None:
        """On the app's tables, warn of each index the daemon's reads need that is missing
        (pitchey-ws adds none there): without them every inbox and history page walks other
        users' messages (5-6 s an inbox at 1M messages), and unread counts scan every
        receipt."""
        defs = [r[0] for r in await conn.fetch(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = current_schema()"
            " AND tablename IN ('messages', 'message_read_receipts')"
        )]
        for table, columns, suggestion in _WANTED_INDEXES:
            pattern = re.compile(rf" ON (\S+\.)?{table} USING btree \({columns}[,)]")
            if not any(pattern.search(d) for d in defs):
                log.warning("database %s: no index on %s (%s): inbox and history reads grow"
                            " with the whole table; add it: %s", self.where, table, columns,
                            suggestion)

    async def close(self) -> None:
        """Commit what is queued, then close the writer and the pool (also when the last
        writes fail: their callers got the error)."""
        if self._task is not None:
            try:
                await self.flush()
            except StoreError as exc:
                log.error("closing with writes that failed: %s", exc)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._closed = True
        for _, future in self._queue:
            if not future.done():
                future.set_exception(StoreClosed("store closed"))
        self._queue.clear()
        pools = (self._lock_pool, self._pool)
        self._pool = self._lock_pool = None
        for pool in pools:
            if pool is None:
                continue
            try:
                await asyncio.wait_for(pool.close(), 5)
            except (TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                pool.terminate()
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                await asyncio.wait_for(writer.close(), 5)
            except (TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                writer.terminate()

    async def healthy(self) -> bool:
        """True, or raise the reason: a read must answer, and when nothing committed for
        PROBE_AFTER seconds, or while writes fail, a small write must commit."""
        rows = await self._fetch("SELECT 1")
        if [tuple(r) for r in rows] != [(1,)]:
            return False
        if self._corrupt is not None:
            raise self._corrupt
        if self._failing is not None or time.monotonic() - self._last_commit > PROBE_AFTER:
            if self._probe is None or self._probe.done():
                self._probe = self._submit(_Write().add(_PUT_SETTING, ("health_probe", now_iso())))
            await asyncio.shield(self._probe)
        if self._failing is not None:
            raise self._failing
        return True

    def _noted(self, error: StoreError) -> StoreError:
        if isinstance(error, Unavailable):
            if self._failing is None:
                log.error("DATABASE %s CANNOT TAKE WRITES: %s; answering 'unavailable' until a"
                          " write succeeds", self.where, error)
            self._failing = error
        elif isinstance(error, Corrupt) and self._corrupt is None:
            self._corrupt = error
            log.error("DATABASE %s IS CORRUPT: %s", self.where, error)
        return error

    # -- the writer ------------------------------------------------------------------------

    def _submit_later(self, write: _Write) -> None:
        if write.statements:
            self._submit(write).add_done_callback(_log_failure)

    async def flush(self) -> None:
        """Wait until everything queued before this call is committed."""
        await self._submit(_Write())

    async def _write_loop(self) -> None:
        queue = self._queue
        while True:
            if not queue:
                self._wakeup = asyncio.get_running_loop().create_future()
                await self._wakeup
                continue
            batch = [queue.popleft() for _ in range(min(len(queue), self.max_batch))]
            writes = [w for w, _ in batch]
            started = time.perf_counter()
            errors: list[StoreError | None]
            try:
                wrote = await self._commit_retrying(writes)
            except asyncio.CancelledError:
                _fail_all(batch, StoreClosed("store closed"))
                raise
            except Exception as first:
                failed = _store_error(first)
                if isinstance(failed, Unavailable | Corrupt) or not isinstance(
                    first, asyncpg.PostgresError
                ):
                    errors = [failed] * len(batch)  # the server or the link, not one write
                else:
                    log.debug("batch of %d writes failed; retrying with savepoints", len(batch))
                    try:
                        raw = await self._savepoint_commit(writes)
                    except asyncio.CancelledError:
                        _fail_all(batch, StoreClosed("store closed"))
                        raise
                    except Exception as exc:
                        errors = [_store_error(exc)] * len(batch)
                    else:
                        self.transactions += 1
                        errors = [None if e is None else _store_error(e) for e in raw]
                errors = [None if e is None else self._noted(e) for e in errors]
                if not any(isinstance(e, Unavailable) for e in errors):
                    self._note_commit()
                for (_, future), error in zip(batch, errors, strict=True):
                    if future.done():
                        continue
                    if error is None:
                        future.set_result(None)
                    else:
                        future.set_exception(error)
            else:
                self.transactions += 1
                if wrote:
                    self._note_commit()
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)
            if self.on_commit is not None:
                self.on_commit(len(batch), time.perf_counter() - started)

    async def _commit_retrying(self, writes: list[_Write]) -> bool:
        """``_commit``, run again (at most ``TRANSIENT_RETRIES`` times) when PostgreSQL broke a
        deadlock or a serialization conflict with another daemon's transaction by aborting
        this one: the batch is fine, only its timing was not."""
        for attempt in range(TRANSIENT_RETRIES + 1):
            try:
                return await self._commit(writes)
            except asyncpg.PostgresError as exc:
                if getattr(exc, "sqlstate", None) not in TRANSIENT or attempt == TRANSIENT_RETRIES:
                    raise
                log.debug("batch aborted by the server (%s); running it again", exc.sqlstate)
        raise AssertionError("unreachable")

    async def _connection(self) -> asyncpg.Connection:
        """The writer's connection, connected again after a loss (or when a failure left it
        inside a transaction: a batch may run as one statement outside any)."""
        if self._writer is not None and not self._writer.is_closed() and (
            self._writer.is_in_transaction()
        ):
            self._writer.terminate()
        if self._writer is None or self._writer.is_closed():
            if self._writer is not None:
                self._writer.terminate()
                self._writer = None
            self._writer = await self._connect()
        return self._writer

    async def _take_conversation_ids(
        self, conn: asyncpg.Connection, writes: Sequence[_Write]
    ) -> None:
        """Give each write that takes a conversation id one, ascending in batch order."""
        takers = [w for w in writes if w.takes_conversation_id]
        if not takers:
            return
        ids = sorted(r[0] for r in await conn.fetch(
            "SELECT nextval($1::regclass) FROM generate_series(1, $2)",
            self._conversation_seq, len(takers),
        ))
        for write, value in zip(takers, ids, strict=True):
            write.conversation_id = value

    async def _insert_messages(self, conn: asyncpg.Connection, writes: Sequence[_Write]) -> None:
        """The writes' messages, one statement for all of them; each write's message_id."""
        messages = [w.message for w in writes if w.message is not None]
        ids = await conn.fetchval(_INSERT_MESSAGES, *_message_columns(messages),
                                  self._message_seq)
        for write, message_id in zip(writes, ids, strict=True):
            write.message_id = message_id

    async def _run(self, conn: asyncpg.Connection, writes: Sequence[_Write]) -> None:
        """The writes' statements in foreign-key order (``_rank_of``): each SQL text once,
        as ``executemany`` when several writes share it, and the messages at their rank."""
        await self._take_conversation_ids(conn, writes)
        grouped: dict[str, list[Params]] = {}
        for write in writes:
            for sql, params in write.bound():
                grouped.setdefault(sql, []).append(params)
        messages = [w for w in writes if w.message is not None]
        for sql, rows in sorted(grouped.items(), key=lambda g: _rank_of(g[0])):
            if messages and _rank_of(sql) > _MESSAGES_RANK:
                await self._insert_messages(conn, messages)
                messages = []
            if len(rows) == 1:
                await conn.execute(sql, *rows[0])
            else:
                await conn.executemany(sql, rows)
        if messages:
            await self._insert_messages(conn, messages)

    async def _commit(self, writes: Sequence[_Write]) -> bool:
        """Commit the writes as one transaction; False when they held nothing to write."""
        if all(w.empty for w in writes):
            return False
        conn = await self._connection()
        if all(sql == _DELIVERED for w in writes for sql, _ in w.statements):
            await self._commit_alone(conn, writes)
        else:
            async with conn.transaction():
                await self._run(conn, writes)
        return True

    async def _commit_alone(self, conn: asyncpg.Connection, writes: Sequence[_Write]) -> None:
        """A batch of messages and delivery records only, the send path's usual batch: one
        statement, which is its own transaction (no BEGIN, no COMMIT: one round trip, and
        its answer comes after the commit)."""
        message_ids: list[int] = []
        user_ids: list[int] = []
        times: list[str] = []
        for write in writes:
            for _, (mids, uids, ats) in write.statements:
                message_ids.extend(mids)
                user_ids.extend(uids)
                times.extend(ats)
        takers = [w for w in writes if w.message is not None]
        if not takers:
            await conn.execute(_DELIVERED, message_ids, user_ids, times)
            return
        params = [*_message_columns([w.message for w in takers if w.message is not None]),
                  self._message_seq]
        if message_ids:
            ids = await conn.fetchval(_MESSAGES_AND_DELIVERED, *params, message_ids, user_ids,
                                      times)
        else:
            ids = await conn.fetchval(_INSERT_MESSAGES, *params)
        for write, message_id in zip(takers, ids, strict=True):
            write.message_id = message_id

    async def _savepoint_commit(self, writes: Sequence[_Write]) -> list[Exception | None]:
        """One transaction, one savepoint per write; each write's error (None: committed)."""
        errors: list[Exception | None] = []
        conn = await self._connection()
        async with conn.transaction():
            if any(w.message is not None for w in writes):
                # Before any write's ids (each message statement takes it again, a no-op).
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _ID_LOCK)
            for write in writes:
                try:
                    async with conn.transaction():
                        await self._run(conn, [write])
                except asyncpg.PostgresError as exc:
                    if isinstance(_store_error(exc), Unavailable | Corrupt):
                        raise
                    errors.append(exc)
                else:
                    errors.append(None)
        return errors

    @contextlib.asynccontextmanager
    async def serialized(self, *key: int | str) -> AsyncIterator[None]:
        # A session advisory lock on a pooled connection of its own, held for the block (a
        # daemon that dies holding it loses its connection, and with it the lock). Two int4
        # keys: a namespace and a stable hash of the key (never Python's hash(), which
        # differs between processes); that key space is apart from the one-bigint locks.
        #
        # The lock only keeps a notice from being sent twice, so it never stalls anyone: when
        # it cannot be had within SERIALIZED_WAIT_SECONDS (another daemon frozen holding it,
        # every lock connection busy, the server slow), the block runs without it, with a
        # warning; a failure to take or give it back ends its connection, which releases it.
        pool = self._lock_pool
        if pool is None:
            raise StoreClosed("store is not open")
        digest = hashlib.blake2b(repr(key).encode(), digest_size=4).digest()
        lock = (_SERIALIZED_LOCKS, int.from_bytes(digest, "big", signed=True))
        conn: asyncpg.Connection | None = None
        try:
            conn = await pool.acquire(timeout=SERIALIZED_WAIT_SECONDS)
            await conn.execute("SELECT pg_advisory_lock($1, $2)", *lock,
                               timeout=SERIALIZED_WAIT_SECONDS)
        except (TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            log.warning("serialized %r: lock not taken (%s); going on without it", key,
                        _describe(exc))
            if conn is not None:
                conn.terminate()
                await pool.release(conn)
                conn = None
        try:
            yield
        finally:
            if conn is not None:
                try:
                    await conn.execute("SELECT pg_advisory_unlock($1, $2)", *lock,
                                       timeout=SERIALIZED_WAIT_SECONDS)
                except (TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                    conn.terminate()  # the server releases a closed session's locks
                await pool.release(conn)

    # -- reads -----------------------------------------------------------------------------

    async def _fetch(self, sql: str, *params: Any) -> list[Any]:
        pool = self._pool
        if pool is None:
            raise StoreClosed("store is not open")
        try:
            return list(await pool.fetch(sql, *params))
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            if self._pool is None:
                raise StoreClosed("store closed") from exc
            raise self._noted(_store_error(exc)) from exc

    async def setting(self, key: str) -> str | None:
        rows = await self._fetch("SELECT value FROM ws_settings WHERE key = $1", key)
        return rows[0][0] if rows else None

    async def put_setting(self, key: str, value: str) -> None:
        await self._write(_Write().add(_PUT_SETTING, (key, value)))

    async def accepts_user(self, user_id: int) -> bool:
        if not self.existing:
            return 0 < user_id <= INT4_MAX
        if not 0 < user_id <= INT4_MAX:
            return False
        # A user the app deactivated (users.is_active false) is refused like an unknown one.
        rows = await self._fetch(
            "SELECT 1 FROM users WHERE id = $1 AND is_active IS NOT FALSE", user_id)
        return bool(rows)

    async def users(self, ids: Iterable[int]) -> dict[int, UserRow]:
        wanted = [i for i in dict.fromkeys(ids) if 0 < i <= INT4_MAX][:MAX_ROWS]
        if not wanted:
            return {}
        rows = await self._fetch(
            "SELECT u.id, COALESCE(w.username, u.username),"
            " COALESCE(w.user_type, u.user_type::text), w.last_seen FROM users u"
            " LEFT JOIN ws_users w ON w.user_id = u.id WHERE u.id = ANY($1::integer[])",
            wanted,
        )
        return {r[0]: UserRow(r[0], r[1], r[2], r[3]) for r in rows}

    def _profile_write(self, user_id: int, username: str | None, user_type: str | None) -> _Write:
        if self.existing:
            # The app owns its users: never inserted or changed here. The profile goes to
            # ws_users, for a user the app has (others are not kept).
            if username is None and user_type is None:
                return _Write()
            return _Write().add(_UPSERT_WS_PROFILE, (user_id, username, user_type))
        now = now_iso()
        if username is None and user_type is None:
            return self._ensure_users(_Write(), [user_id])
        return _sequence_past(_Write().add(_UPSERT_USER, (user_id, username, user_type, now)),
                              self._user_seq, user_id)

    async def save_profile(
        self, user_id: int, username: str | None, user_type: str | None
    ) -> None:
        write = self._profile_write(user_id, username, user_type)
        if write.statements:
            await self._write(write)

    def save_profile_later(
        self, user_id: int, username: str | None, user_type: str | None
    ) -> None:
        self._submit_later(self._profile_write(user_id, username, user_type))

    def set_last_seen_later(self, user_id: int, last_seen: str) -> None:
        self._submit_later(_Write().add(
            "INSERT INTO ws_users (user_id, last_seen) VALUES ($1, $2)"
            " ON CONFLICT (user_id) DO UPDATE SET last_seen = EXCLUDED.last_seen",
            (user_id, last_seen),
        ))

    def _ensure_users(self, write: _Write, user_ids: Iterable[int]) -> _Write:
        if self.existing:
            return write  # an unknown user fails the write's foreign keys instead
        now = now_iso()
        # In id order, so two transactions ensuring the same users lock them in one order.
        for user_id in sorted(set(user_ids)):
            _sequence_past(write.add(_ENSURE_USER, (user_id, now)), self._user_seq, user_id)
        return write

    # -- conversations ---------------------------------------------------------------------

    async def conversation(self, conversation_id: int) -> ConversationRow | None:
        if not 0 < conversation_id <= INT4_MAX:
            return None
        rows = await self._fetch(
            "SELECT c.id, c.title, COALESCE(c.is_group, false), c.created_by_id, c.pitch_id,"
            " p.user_id FROM conversations c LEFT JOIN conversation_participants p"
            "   ON p.conversation_id = c.id AND p.is_active IS NOT FALSE AND p.left_at IS NULL"
            " WHERE c.id = $1 LIMIT $2",
            conversation_id, MAX_ROWS,
        )
        if not rows:
            return None
        cid, title, is_group, created_by, pitch_id, _ = rows[0]
        members = frozenset(r[5] for r in rows if r[5] is not None)
        return ConversationRow(cid, title, bool(is_group), created_by, members, pitch_id)

    async def conversation_by_request(self, created_by: int, request_id: str) -> int | None:
        rows = await self._fetch(
            "SELECT conversation_id FROM ws_conversation_requests"
            " WHERE created_by_id = $1 AND request_id = $2",
            created_by, request_id,
        )
        return rows[0][0] if rows else None

    def _create_conversation(
        self, created_by: int, members: Sequence[int], title: str | None, is_group: bool,
        request_id: str | None, pitch_id: int | None, now: str,
        conversation_id: int | None = None,
    ) -> _Write:
        """The conversation's rows; its id from the sequence at commit time, or the one
        given (then the sequence is moved past it, so later ids are assigned above it)."""
        cid: int | _Id = CONVERSATION_ID if conversation_id is None else conversation_id
        write = self._ensure_users(_Write(takes_conversation_id=conversation_id is None),
                                   members)
        if conversation_id is not None:
            write.conversation_id = conversation_id
        write.add(
            "INSERT INTO conversations (id, pitch_id, created_by_id, title, is_group,"
            " created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $6)",
            (cid, pitch_id, created_by, title, is_group, now),
        )
        for user_id in dict.fromkeys(members):
            write.add(
                "INSERT INTO conversation_participants (conversation_id, user_id, is_active,"
                " joined_at, mute_notifications) VALUES ($1, $2, true, $3, false)",
                (cid, user_id, now),
            )
        if request_id is not None:
            write.add(
                "INSERT INTO ws_conversation_requests (created_by_id, request_id,"
                " conversation_id) VALUES ($1, $2, $3)",
                (created_by, request_id, cid),
            )
        if conversation_id is not None:
            _sequence_past(write, self._conversation_seq, conversation_id)
        return write

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
        distinct = set(members)
        is_group = len(distinct) > 2
        write = self._create_conversation(
            created_by, members, title, is_group, request_id, pitch_id, now, conversation_id
        )
        if not is_group and len(distinct) == 2:
            # A 1:1 (titled, about a pitch or plain) becomes the pair's direct conversation
            # if they have none yet: recipientId sends go there (PROTOCOL.md 3).
            low, high = sorted(distinct)
            write.add(_INSERT_DIRECT + " ON CONFLICT DO NOTHING",
                      (low, high, write.conversation_id or CONVERSATION_ID))
        await self._write(write)
        assert write.conversation_id is not None
        return ConversationRow(write.conversation_id, title, is_group, created_by,
                               frozenset(members), pitch_id)

    async def _direct_id(self, low: int, high: int) -> int | None:
        """The pair's direct conversation: the one pitchey-ws recorded while it still is one
        (the app may since have added a participant, removed one of the two or made it a
        group), else one the app made (rows inserted by the app: a non-group conversation
        whose active participants are exactly the two, the oldest if there are several)."""
        rows = await self._fetch(
            "SELECT d.conversation_id FROM ws_direct_conversations d"
            " WHERE d.user_low = $1 AND d.user_high = $2 AND " + _STILL_DIRECT,
            low, high,
        )
        if rows:
            return int(rows[0][0])
        rows = await self._fetch(
            "SELECT p.conversation_id FROM conversation_participants p"
            " JOIN conversations c ON c.id = p.conversation_id"
            " WHERE p.user_id = $1 AND p.is_active IS NOT FALSE AND p.left_at IS NULL"
            " AND c.is_group IS NOT TRUE"
            " AND EXISTS (SELECT 1 FROM conversation_participants q"
            "   WHERE q.conversation_id = p.conversation_id AND q.user_id = $2"
            "   AND q.is_active IS NOT FALSE AND q.left_at IS NULL)"
            " AND NOT EXISTS (SELECT 1 FROM conversation_participants r"
            "   WHERE r.conversation_id = p.conversation_id AND r.user_id <> $1"
            "   AND r.user_id <> $2 AND r.is_active IS NOT FALSE AND r.left_at IS NULL)"
            " ORDER BY p.conversation_id LIMIT 1",
            low, high,
        )
        return int(rows[0][0]) if rows else None

    async def find_direct(self, a: int, b: int) -> int | None:
        return await self._direct_id(min(a, b), max(a, b))

    async def direct_conversation(self, a: int, b: int, now: str) -> ConversationRow:
        low, high = min(a, b), max(a, b)
        found = await self._direct_id(low, high)
        if found is None:
            async with self._pairs.hold((low, high)):
                found = await self._direct_id(low, high)
                if found is None:
                    # A recorded conversation that is no longer the pair's gives way (its
                    # key would refuse the new one's).
                    await self._write(_Write().add(_FORGET_STALE_DIRECT, (low, high)))
                    write = self._create_conversation(a, [a, b], None, False, None, None, now)
                    write.add(_INSERT_DIRECT, (low, high, CONVERSATION_ID))
                    try:
                        await self._write(write)
                        found = write.conversation_id
                    except ConstraintViolation:
                        # Another daemon made the pair's conversation first: use that one.
                        found = await self._direct_id(low, high)
                        if found is None:
                            raise
        assert found is not None
        row = await self.conversation(found)
        if row is None:
            raise StoreError(f"direct conversation {found} vanished")
        return row

    async def contacts(self, user_id: int) -> set[int]:
        rows = await self._fetch(
            "SELECT DISTINCT b.user_id FROM conversation_participants a"
            " JOIN conversation_participants b ON b.conversation_id = a.conversation_id"
            " WHERE a.user_id = $1 AND a.is_active IS NOT FALSE AND a.left_at IS NULL"
            " AND b.is_active IS NOT FALSE AND b.left_at IS NULL"
            " AND b.user_id != $1 LIMIT $2",
            user_id, MAX_ROWS,
        )
        return {r[0] for r in rows}

    # -- messages --------------------------------------------------------------------------

    async def add_message(self, message: NewMessage) -> int:
        write = _Write(message=message)
        await self._submit(write)
        assert write.message_id is not None
        return write.message_id

    async def message_by_request(self, sender_id: int, request_id: str) -> MessageRow | None:
        rows = await self._fetch(
            _MESSAGE_SELECT + " JOIN ws_message_requests q ON q.message_id = m.id"
            " WHERE q.sender_id = $1 AND q.request_id = $2",
            sender_id, request_id,
        )
        return _message(rows[0]) if rows else None

    async def message(self, message_id: int) -> MessageRow | None:
        if not 0 < message_id <= INT4_MAX:
            return None
        rows = await self._fetch(_MESSAGE_SELECT + " WHERE m.id = $1", message_id)
        return _message(rows[0]) if rows else None

    async def delivered_any(self, message_id: int) -> bool:
        # A receipt row exists only once the message was delivered (or read).
        rows = await self._fetch(
            "SELECT 1 FROM message_read_receipts WHERE message_id = $1 LIMIT 1", message_id
        )
        return bool(rows)

    async def message_for_read(
        self, message_id: int, reader_id: int
    ) -> tuple[MessageRow, str | None] | None:
        if not 0 < message_id <= INT4_MAX:
            return None
        rows = await self._fetch(
            _MESSAGE_SELECT.replace("COALESCE(m.is_read, false)", "r.read_at")
            + " LEFT JOIN message_read_receipts r ON r.message_id = m.id AND r.user_id = $1"
            " WHERE m.id = $2 AND m.is_deleted IS NOT TRUE",
            reader_id, message_id,
        )
        if not rows:
            return None
        row = rows[0]
        return _message((*row[:8], False)), row[8]

    async def mark_read(self, message_id: int, reader_id: int, now: str) -> None:
        write = _Write().add(_MARK_RECEIPT_READ, (message_id, reader_id, now))
        await self._write(write.add(_MARK_MESSAGE_READ, (now, message_id)))

    async def history(
        self, conversation_id: int, viewer_id: int, before: int | None, limit: int
    ) -> tuple[list[MessageRow], bool]:
        rows = await self._fetch(
            _MESSAGE_SELECT.replace(
                "COALESCE(m.is_read, false)",
                "CASE WHEN m.sender_id = $1 THEN COALESCE(m.is_read, false)"
                " ELSE r.read_at IS NOT NULL END",
            )
            + " LEFT JOIN message_read_receipts r ON r.message_id = m.id AND r.user_id = $1"
            " WHERE m.conversation_id = $2 AND m.id < $3::bigint AND m.is_deleted IS NOT TRUE"
            " ORDER BY m.id DESC LIMIT $4",
            viewer_id, conversation_id, before or INT4_MAX + 1, limit + 1,
        )
        has_more = len(rows) > limit
        return [_message(r) for r in reversed(rows[:limit])], has_more

    async def since(self, user_id: int, since: int, limit: int) -> tuple[list[MessageRow], bool]:
        # One arm per conversation of the user (LATERAL), each at most limit + 1 ids from the
        # (conversation_id, id) index, then the page's rows by key: what the user's own
        # conversations hold after the cursor, never a walk of every user's messages after it
        # (the plain join did that until it had limit + 1 rows: 426 ms at 1M messages for a
        # user with 1,000) nor a sort of all of the user's messages.
        rows = await self._fetch(
            _MESSAGE_SELECT
            + " JOIN (SELECT x.id FROM conversation_participants p"
            "   CROSS JOIN LATERAL (SELECT id FROM messages"
            "     WHERE conversation_id = p.conversation_id AND id > $2::bigint"
            "     AND is_deleted IS NOT TRUE ORDER BY id LIMIT $3) x"
            "   WHERE p.user_id = $1 AND p.is_active IS NOT FALSE AND p.left_at IS NULL"
            "   ORDER BY x.id LIMIT $3) page"
            " ON page.id = m.id ORDER BY m.id",
            user_id, since, limit + 1,
        )
        return [_message(r) for r in rows[:limit]], len(rows) > limit

    # -- durable events --------------------------------------------------------------------

    async def pending(self, user_id: int, limit: int) -> list[PendingEvent]:
        messages = await self._fetch(
            _MESSAGE_SELECT + " JOIN ws_undelivered u ON u.message_id = m.id"
            # A user removed from a conversation is owed none of its messages any more.
            " JOIN conversation_participants p ON p.conversation_id = m.conversation_id"
            "   AND p.user_id = u.user_id AND p.is_active IS NOT FALSE AND p.left_at IS NULL"
            # Nor a message deleted since (the app's soft delete): history and sync hide it.
            " WHERE u.user_id = $1 AND m.is_deleted IS NOT TRUE ORDER BY u.message_id LIMIT $2",
            user_id, limit,
        )
        reads = await self._fetch(
            "SELECT r.read_at, m.id, m.conversation_id, n.reader_id,"
            " COALESCE(w.username, u.username)"
            " FROM ws_read_notices n"
            " JOIN messages m ON m.id = n.message_id"
            " JOIN message_read_receipts r ON r.message_id = n.message_id"
            "   AND r.user_id = n.reader_id"
            " LEFT JOIN users u ON u.id = n.reader_id"
            " LEFT JOIN ws_users w ON w.user_id = n.reader_id"
            " WHERE n.sender_id = $1 AND r.read_at IS NOT NULL"
            " ORDER BY r.read_at, n.message_id LIMIT $2",
            user_id, limit,
        )
        events: list[PendingEvent] = [PendingMessage(r[7], _message(r)) for r in messages]
        events.extend(PendingRead(r[0], r[1], r[2], r[3], r[4]) for r in reads)
        notes = await self._fetch(
            _NOTIFICATION_SELECT + " WHERE user_id = $1 AND delivered_at IS NULL"
            " ORDER BY id LIMIT $2",
            user_id, limit,
        )
        events.extend(PendingNotification(r[4], _notification(r)) for r in notes)
        events.sort(key=pending_order)
        return events[:limit]

    def record_deliveries(
        self, messages: Mapping[int, Sequence[int]], reads: Sequence[tuple[int, int]],
        notifications: Sequence[int] = (),
    ) -> asyncio.Future[None]:
        now = now_iso()
        write = _Write()
        if notifications:
            write.add(
                "UPDATE ws_notifications SET delivered_at = $1 WHERE delivered_at IS NULL"
                " AND id = ANY($2::bigint[])",
                (now, list(notifications)),
            )
        delivered = [(m, u) for m, user_ids in messages.items() for u in user_ids]
        if delivered:
            message_ids, user_ids = zip(*delivered, strict=True)
            write.add(_DELIVERED, (message_ids, user_ids, [now] * len(delivered)))
        if reads:
            write.add(_READ_NOTICES_SENT, tuple(zip(*reads, strict=True)))
        return self._submit(write)

    # -- typing ----------------------------------------------------------------------------

    def set_typing_later(
        self, conversation_id: int, user_id: int, typing: bool, now: str
    ) -> None:
        self._submit_later(_Write().add(
            "INSERT INTO typing_indicators (conversation_id, user_id, is_typing, updated_at)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (conversation_id, user_id) DO UPDATE SET"
            " is_typing = EXCLUDED.is_typing, updated_at = EXCLUDED.updated_at",
            (conversation_id, user_id, typing, now),
        ))

    async def clear_typing(self) -> None:
        await self._write(_Write().add("DELETE FROM typing_indicators WHERE $1", (True,)))

    # -- the inbox and HTTP history --------------------------------------------------------

    async def conversation_list(
        self, user_id: int, before: tuple[str, int] | None, limit: int
    ) -> tuple[list[ConversationSummary], bool]:
        # To the millisecond, as the cursor carries it (_timestamp_out): the app's own rows
        # have microseconds, and conversations it made in one transaction share a time.
        activity = "date_trunc('milliseconds', COALESCE(c.last_message_at, c.created_at))"
        at, below = before if before is not None else ("infinity", INT4_MAX + 1)
        rows = await self._fetch(
            "SELECT c.id, c.title, c.pitch_id, COALESCE(c.is_group, false), c.last_message_at,"
            " c.created_at, pt.title"
            " FROM conversation_participants p JOIN conversations c ON c.id = p.conversation_id"
            " LEFT JOIN pitches pt ON pt.id = c.pitch_id"
            " WHERE p.user_id = $1 AND p.is_active IS NOT FALSE AND p.left_at IS NULL"
            f" AND ({activity} < $2"
            f" OR ({activity} = $2 AND c.id < $3::bigint))"
            f" ORDER BY {activity} DESC, c.id DESC LIMIT $4",
            user_id, at, below, limit + 1,
        )
        has_more = len(rows) > limit
        rows = rows[:limit]
        if not rows:
            return [], has_more
        ids = [r[0] for r in rows]
        last = await self._fetch(
            _MESSAGE_SELECT + " WHERE m.id IN (SELECT (SELECT id FROM messages"
            " WHERE conversation_id = c AND is_deleted IS NOT TRUE ORDER BY id DESC LIMIT 1)"
            " FROM unnest($1::integer[]) c)",
            ids,
        )
        last_by = {r[1]: _message(r) for r in last}
        others: dict[int, list[UserRow]] = {}
        for r in await self._fetch(
            "SELECT p.conversation_id, u.id, COALESCE(w.username, u.username),"
            " COALESCE(w.user_type, u.user_type::text), w.last_seen"
            " FROM conversation_participants p JOIN users u ON u.id = p.user_id"
            " LEFT JOIN ws_users w ON w.user_id = u.id"
            " WHERE p.conversation_id = ANY($1::integer[])"
            " AND p.is_active IS NOT FALSE AND p.left_at IS NULL AND p.user_id != $2"
            " ORDER BY p.conversation_id, u.id LIMIT $3",
            ids, user_id, MAX_ROWS,
        ):
            others.setdefault(r[0], []).append(UserRow(r[1], r[2], r[3], r[4]))
        unread = {r[0]: r[1] for r in await self._fetch(
            "SELECT m.conversation_id, COUNT(*) FROM (" + _UNREAD_OF_USER + ") x"
            " JOIN messages m ON m.id = x.message_id"
            " WHERE m.sender_id != $1 AND m.is_deleted IS NOT TRUE"
            " AND m.conversation_id = ANY($2::integer[]) GROUP BY m.conversation_id",
            user_id, ids,
        )}
        out = [
            ConversationSummary(
                r[0], r[1], r[2], bool(r[3]), r[4], r[5], others.get(r[0], []),
                last_by.get(r[0]), int(unread.get(r[0], 0)), r[6],
            )
            for r in rows
        ]
        return out, has_more

    async def message_details(self, message_ids: Sequence[int]) -> dict[int, MessageDetail]:
        ids = [i for i in message_ids if 0 < i <= INT4_MAX]
        if not ids:
            return {}
        receipts: dict[int, list[Receipt]] = {}
        for r in await self._fetch(
            "SELECT r.message_id, r.user_id, COALESCE(w.username, u.username),"
            " r.delivered_at, r.read_at"
            " FROM message_read_receipts r LEFT JOIN users u ON u.id = r.user_id"
            " LEFT JOIN ws_users w ON w.user_id = r.user_id"
            " WHERE r.message_id = ANY($1::integer[])"
            " ORDER BY r.message_id, r.user_id LIMIT $2",
            ids, MAX_ROWS,
        ):
            receipts.setdefault(r[0], []).append(Receipt(r[1], r[2], r[3], r[4]))
        rows = await self._fetch(
            "SELECT m.id, m.receiver_id, m.parent_message_id, m.subject,"
            " COALESCE(m.is_edited, false), COALESCE(m.is_deleted, false), m.edited_at,"
            " su.user_type::text"
            " FROM messages m LEFT JOIN users su ON su.id = m.sender_id"
            " WHERE m.id = ANY($1::integer[])",
            ids,
        )
        return {
            r[0]: MessageDetail(r[1], r[2], r[3], bool(r[4]), bool(r[5]), r[6], r[7],
                                receipts.get(r[0], []))
            for r in rows
        }

    async def unread_ids(
        self, conversation_id: int, reader_id: int, up_to: int | None, limit: int
    ) -> list[tuple[int, int]]:
        rows = await self._fetch(
            "SELECT m.id, m.sender_id FROM (" + _UNREAD_OF_USER + ") x"
            " JOIN messages m ON m.id = x.message_id"
            " WHERE m.conversation_id = $2 AND m.id <= $3::bigint AND m.sender_id != $1"
            " AND m.is_deleted IS NOT TRUE ORDER BY m.id LIMIT $4",
            reader_id, conversation_id,
            up_to if up_to is not None else INT4_MAX, limit,
        )
        return [(r[0], r[1]) for r in rows]

    async def mark_read_many(self, message_ids: Sequence[int], reader_id: int, now: str) -> None:
        if not message_ids:
            return
        write = _Write()
        for message_id in message_ids:
            write.add(_MARK_RECEIPT_READ, (message_id, reader_id, now))
            write.add(_MARK_MESSAGE_READ, (now, message_id))
        await self._write(write)

    # -- participants (the backend's API) --------------------------------------------------

    async def change_participants(
        self, conversation_id: int, add: Sequence[int], remove: Sequence[int], now: str
    ) -> ConversationRow | None:
        if await self.conversation(conversation_id) is None:
            return None
        write = self._ensure_users(_Write(), add)
        for user_id in dict.fromkeys(add):
            write.add(
                "INSERT INTO conversation_participants (conversation_id, user_id, is_active,"
                " joined_at, mute_notifications) VALUES ($1, $2, true, $3, false)"
                " ON CONFLICT (conversation_id, user_id) DO UPDATE SET is_active = true,"
                " left_at = NULL, joined_at = EXCLUDED.joined_at"
                " WHERE conversation_participants.is_active IS FALSE"
                " OR conversation_participants.left_at IS NOT NULL",
                (conversation_id, user_id, now),
            )
        for user_id in dict.fromkeys(remove):
            write.add(
                "UPDATE conversation_participants SET is_active = false, left_at = $1"
                " WHERE conversation_id = $2 AND user_id = $3"
                " AND (is_active IS NOT FALSE OR left_at IS NULL)",
                (now, conversation_id, user_id),
            )
        # Its members changed: it is no longer "the" conversation of a pair.
        write.add("DELETE FROM ws_direct_conversations WHERE conversation_id = $1",
                  (conversation_id,))
        await self._write(write)
        return await self.conversation(conversation_id)

    # -- pitches: the app's pitches, ndas and pitch_views, and ws_pitch_* -------------------

    async def pitch(self, pitch_id: int) -> PitchRow | None:
        if not 0 < pitch_id <= INT4_MAX:
            return None
        rows = await self._fetch(
            "SELECT id, user_id, title, status::text FROM pitches WHERE id = $1", pitch_id
        )
        if not rows:
            return None
        # Besides the owner: NDA signers the app granted access, and whom the backend allowed.
        allowed = await self._fetch(
            "SELECT signer_id::bigint FROM ndas WHERE pitch_id = $1 AND access_granted IS TRUE"
            " UNION SELECT user_id FROM ws_pitch_allowed WHERE pitch_id = $1 LIMIT $2",
            pitch_id, MAX_ROWS,
        )
        r = rows[0]
        visibility = "public" if r[3] == "published" else "private"
        return PitchRow(r[0], r[1], r[2], visibility, frozenset(a[0] for a in allowed))

    async def put_pitch(self, pitch: PitchRow, now: str) -> None:
        """With ``pitchey_schema = "create"``: the ``pitches`` row (public = 'published',
        private = 'hidden') and the allowed set. With ``"existing"`` the app's row is left as
        it is (its owner, title and status rule): only the allowed set is stored, and a pitch
        the app does not have is ConstraintViolation."""
        write = _Write()
        if self.existing:
            if await self.pitch(pitch.id) is None:
                raise ConstraintViolation(
                    f"pitch {pitch.id} is not in the app's pitches table"
                    ' (database.pitchey_schema = "existing": the app owns its pitches)'
                )
        else:
            self._ensure_users(write, [pitch.owner_id])
            status = "published" if pitch.visibility == "public" else "hidden"
            write.add(
                "INSERT INTO pitches (id, user_id, title, status, published_at, created_at,"
                " updated_at) VALUES ($1, $2, $3, $4::varchar,"
                " CASE WHEN $4::varchar = 'published' THEN $5::timestamp END, $5, $5)"
                " ON CONFLICT (id) DO UPDATE SET user_id = EXCLUDED.user_id,"
                " title = EXCLUDED.title, status = EXCLUDED.status,"
                " published_at = COALESCE(pitches.published_at, EXCLUDED.published_at),"
                " updated_at = EXCLUDED.updated_at",
                (pitch.id, pitch.owner_id, pitch.title, status, now),
            )
            _sequence_past(write, self._pitch_seq, pitch.id)
        # INSERTs run before every other statement of a batch: add the new set, then drop
        # whoever is not in it.
        allowed = sorted(pitch.allowed)
        write.add(
            "INSERT INTO ws_pitch_allowed (pitch_id, user_id)"
            " SELECT $1, unnest($2::bigint[]) ON CONFLICT DO NOTHING",
            (pitch.id, allowed),
        )
        write.add(
            "DELETE FROM ws_pitch_allowed WHERE pitch_id = $1 AND user_id <> ALL($2::bigint[])",
            (pitch.id, allowed),
        )
        await self._write(write)

    async def pitch_stats(self, pitch_id: int, user_id: int) -> PitchStats:
        if not 0 < pitch_id <= INT4_MAX:
            return PitchStats(0, 0, False)
        rows = await self._fetch(
            # pitch_views is the app's log (a row per view, maybe anonymous): distinct viewers.
            "SELECT (SELECT COUNT(DISTINCT viewer_id) FROM pitch_views WHERE pitch_id = $1),"
            " (SELECT COUNT(*) FROM ws_pitch_likes WHERE pitch_id = $1),"
            " EXISTS (SELECT 1 FROM ws_pitch_likes WHERE pitch_id = $1 AND user_id = $2)",
            pitch_id, user_id,
        )
        views, likes, liked = rows[0]
        return PitchStats(int(views), int(likes), bool(liked))

    async def has_viewed(self, pitch_id: int, user_id: int) -> bool:
        if not (0 < pitch_id <= INT4_MAX and 0 < user_id <= INT4_MAX):
            return False
        rows = await self._fetch(
            "SELECT 1 FROM pitch_views WHERE pitch_id = $1 AND viewer_id = $2 LIMIT 1",
            pitch_id, user_id,
        )
        return bool(rows)

    async def add_view(self, pitch_id: int, user_id: int, now: str) -> None:
        write = self._ensure_users(_Write(), [user_id])
        await self._write(write.add(
            "INSERT INTO pitch_views (pitch_id, viewer_id, viewed_at)"
            " SELECT $1::integer, $2::integer, $3::timestamp WHERE NOT EXISTS"
            " (SELECT 1 FROM pitch_views WHERE pitch_id = $1 AND viewer_id = $2)",
            (pitch_id, user_id, now),
        ))

    async def set_like(
        self, pitch_id: int, user_id: int, liked: bool, now: str,
        notify: NewNotification | None,
    ) -> int | None:
        write = _Write()
        if liked:
            write.add(
                "INSERT INTO ws_pitch_likes (pitch_id, user_id, liked_at) VALUES ($1, $2, $3)"
                " ON CONFLICT DO NOTHING",
                (pitch_id, user_id, now),
            )
        else:
            write.add("DELETE FROM ws_pitch_likes WHERE pitch_id = $1 AND user_id = $2",
                      (pitch_id, user_id))
        ids = await self._add_notifications(write, [notify] if notify else [], now)
        await self._write(write)
        return ids[0] if ids else None

    async def add_comment(
        self, pitch_id: int, user_id: int, content: str, request_id: str | None, now: str,
        notify: Callable[[int], NewNotification] | None,
    ) -> tuple[int, int | None]:
        # The id first: the owner's notification carries it. (A failed write leaves a gap.)
        (comment_id,), = await self._next_ids("ws_pitch_comments_id_seq", 1)
        write = _Write().add(
            "INSERT INTO ws_pitch_comments (id, pitch_id, user_id, content, created_at,"
            " request_id) VALUES ($1, $2, $3, $4, $5, $6)",
            (comment_id, pitch_id, user_id, content, now, request_id),
        )
        ids = await self._add_notifications(
            write, [notify(comment_id)] if notify else [], now
        )
        await self._write(write)
        return comment_id, ids[0] if ids else None

    async def comment_by_request(self, user_id: int, request_id: str) -> CommentRow | None:
        rows = await self._fetch(
            _COMMENT_SELECT + " WHERE c.user_id = $1 AND c.request_id = $2", user_id, request_id
        )
        return _comment(rows[0]) if rows else None

    async def comments(
        self, pitch_id: int, before: int | None, limit: int
    ) -> tuple[list[CommentRow], bool]:
        if not 0 < pitch_id <= INT4_MAX:
            return [], False
        rows = await self._fetch(
            # A bigint bound, clamped here: compared as numeric, the id was a filter over
            # every newer row instead of where the index scan starts.
            _COMMENT_SELECT + " WHERE c.pitch_id = $1 AND c.id < $2::bigint"
            " ORDER BY c.id DESC LIMIT $3",
            pitch_id, _below(before), limit + 1,
        )
        return [_comment(r) for r in reversed(rows[:limit])], len(rows) > limit

    # -- notifications: ws_notifications, ws_publish_requests ------------------------------

    async def _next_ids(self, sequence: str, count: int) -> list[tuple[int]]:
        """``count`` values of one of the ws_* tables' sequences, ascending."""
        rows = await self._fetch(
            "SELECT nextval($1::regclass) AS id FROM generate_series(1, $2) ORDER BY id",
            sequence, count,
        )
        return [(r[0],) for r in rows]

    async def _add_notifications(
        self, write: _Write, notes: Sequence[NewNotification], now: str
    ) -> list[int]:
        if not notes:
            return []
        ids = [r[0] for r in await self._next_ids("ws_notifications_id_seq", len(notes))]
        for nid, note in zip(ids, notes, strict=True):
            write.add(
                "INSERT INTO ws_notifications (id, user_id, type, fields, created_at)"
                " VALUES ($1, $2, $3, $4, $5)",
                (nid, note.user_id, note.type, note.fields, now),
            )
        if self.notifications_per_user > 0:
            for user_id in dict.fromkeys(note.user_id for note in notes):
                write.add(_KEEP_NEWEST_NOTIFICATIONS, (user_id, self.notifications_per_user))
        return ids

    async def add_notifications(
        self, notes: Sequence[NewNotification], now: str, publish_key: str | None = None,
        answer: Callable[[list[int]], str] | None = None,
    ) -> list[int]:
        write = _Write()
        ids = await self._add_notifications(write, notes, now)
        if publish_key is not None:
            assert answer is not None
            write.add(
                "INSERT INTO ws_publish_requests (key, answer, created_at) VALUES ($1, $2, $3)",
                (publish_key, answer(ids), now),
            )
        await self._write(write)
        return ids

    async def publish_answer(self, key: str) -> str | None:
        rows = await self._fetch(
            "SELECT answer::text FROM ws_publish_requests WHERE key = $1", key
        )
        return rows[0][0] if rows else None

    async def put_publish_answer(self, key: str, answer: str, now: str) -> None:
        await self._write(_Write().add(
            "INSERT INTO ws_publish_requests (key, answer, created_at) VALUES ($1, $2, $3)"
            " ON CONFLICT (key) DO UPDATE SET answer = EXCLUDED.answer",
            (key, answer, now),
        ))

    async def release_publish(self, key: str, answer: str) -> None:
        await self._write(_Write().add(
            "DELETE FROM ws_publish_requests WHERE key = $1 AND answer::text = $2",
            (key, answer)))

    async def claim_publish(self, key: str, answer: str, now: str) -> bool:
        # Outside the write loop: one autocommitted statement on a pooled connection, whose
        # answer says whether this daemon or another one claimed the key (the table takes
        # no ids, so the write loop's ordering does not concern it).
        rows = await self._fetch(
            "INSERT INTO ws_publish_requests (key, answer, created_at)"
            " VALUES ($1, $2, $3) ON CONFLICT (key) DO NOTHING RETURNING 1",
            key, answer, now,
        )
        return bool(rows)

    async def notification_page(
        self, user_id: int, before: int | None, limit: int, unread_only: bool
    ) -> tuple[list[NotificationRow], bool]:
        unread = " AND read_at IS NULL" if unread_only else ""
        rows = await self._fetch(
            _NOTIFICATION_SELECT + f" WHERE user_id = $1 AND id < $2::bigint{unread}"
            " ORDER BY id DESC LIMIT $3",
            user_id, _below(before), limit + 1,
        )
        return [_notification(r) for r in rows[:limit]], len(rows) > limit

    async def unread_notifications(self, user_id: int) -> int:
        rows = await self._fetch(
            "SELECT COUNT(*) FROM ws_notifications WHERE user_id = $1 AND read_at IS NULL",
            user_id,
        )
        return int(rows[0][0])

    async def mark_notifications_read(
        self, user_id: int, ids: Sequence[int] | None, now: str
    ) -> list[int]:
        if ids is None:
            rows = await self._fetch(
                "SELECT id FROM ws_notifications WHERE user_id = $1 AND read_at IS NULL"
                " ORDER BY id LIMIT $2",
                user_id, MAX_ROWS,
            )
        else:
            wanted = [i for i in ids if 0 < i <= INT8_MAX]
            rows = await self._fetch(
                "SELECT id FROM ws_notifications WHERE user_id = $1 AND read_at IS NULL"
                " AND id = ANY($2::bigint[]) ORDER BY id",
                user_id, wanted,
            )
        changed = [r[0] for r in rows]
        if changed:
            await self._write(_Write().add(
                "UPDATE ws_notifications SET read_at = $1 WHERE user_id = $2"
                " AND read_at IS NULL AND id = ANY($3::bigint[])",
                (now, user_id, changed),
            ))
        return changed

    async def prune_notifications(self, max_per_user: int, created_before: str) -> None:
        await self._write(_Write().add(
            "DELETE FROM ws_notifications WHERE created_at < $1", (created_before,)
        ).add(
            # Beyond max_per_user: read ones go first, oldest first (unread rank before read).
            "DELETE FROM ws_notifications WHERE id IN (SELECT id FROM ("
            " SELECT id, ROW_NUMBER() OVER (PARTITION BY user_id"
            "   ORDER BY (read_at IS NULL) DESC, id DESC) AS rank FROM ws_notifications"
            " WHERE user_id IN (SELECT user_id FROM ws_notifications GROUP BY user_id"
            "   HAVING COUNT(*) > $1)) ranked WHERE rank > $1)",
            (max_per_user,),
        ).add("DELETE FROM ws_publish_requests WHERE created_at < $1", (created_before,)))


def _fail_all(batch: Sequence[tuple[_Write, asyncio.Future[None]]], error: StoreError) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(error)


# Tables in foreign-key order: each references only tables before it.
_PARENTS_FIRST = ("users", "ws_users", "conversations", "conversation_participants",
                  "ws_conversation_requests", "ws_direct_conversations", "messages",
                  "ws_message_requests", "ws_undelivered", "message_read_receipts",
                  "ws_read_notices", "typing_indicators", "pitches", "ws_pitch_allowed",
                  "pitch_views", "ws_pitch_likes", "ws_pitch_comments", "ws_notifications",
                  "ws_publish_requests")
_INSERT_INTO = re.compile(r"INSERT INTO (\w+)")
_MESSAGES_RANK = _PARENTS_FIRST.index("messages")  # where a batch's messages are written


@functools.lru_cache(maxsize=256)
def _rank_of(sql: str) -> int:
    match = _INSERT_INTO.match(sql)
    if match is None:
        return len(_PARENTS_FIRST) + 1  # not an INSERT: after every INSERT
    table = match.group(1)
    return _PARENTS_FIRST.index(table) if table in _PARENTS_FIRST else len(_PARENTS_FIRST)


# SQLSTATE classes and codes that mean the server or the link, not the write.
_UNAVAILABLE_STATES = {
    "53100": "the database server's disk is full",
    "53200": "the database server is out of memory",
    "53300": "the database server has too many connections",
    "25006": "the database is read-only (a standby, or default_transaction_read_only)",
    "57P01": "the database server is shutting down",
    "57P02": "the database server is shutting down",
    "57P03": "the database server is starting up or cannot take connections now",
    "58030": "the database server has an I/O error",
    "40001": "a serialization failure (retry)",
    "40P01": "a deadlock (retry)",
}
_CORRUPT_STATES = {"XX001", "XX002"}


def _describe(exc: BaseException) -> str:
    state = getattr(exc, "sqlstate", None)
    if state in _UNAVAILABLE_STATES:
        return f"{_UNAVAILABLE_STATES[state]} ({exc})"
    if isinstance(exc, OSError | asyncpg.InterfaceError | asyncpg.PostgresConnectionError):
        return f"cannot reach the database server ({type(exc).__name__}: {exc})"
    return f"{type(exc).__name__}: {exc}"


def _store_error(exc: BaseException) -> StoreError:
    """The store's own error for what asyncpg raised."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, asyncpg.UniqueViolationError):
        if exc.constraint_name in _REQUEST_KEYS:
            return DuplicateRequest(str(exc))
        return ConstraintViolation(str(exc))
    if isinstance(exc, asyncpg.IntegrityConstraintViolationError | asyncpg.DataError):
        return ConstraintViolation(str(exc))
    state = getattr(exc, "sqlstate", None)
    if state in _CORRUPT_STATES:
        return Corrupt(_describe(exc))
    if state in _UNAVAILABLE_STATES or isinstance(
        exc, OSError | asyncpg.InterfaceError | asyncpg.PostgresConnectionError
        | asyncpg.InsufficientResourcesError | TimeoutError
    ):
        return Unavailable(_describe(exc), 1.0 if state in ("40001", "40P01") else 5.0)
    return StoreError(f"{type(exc).__name__}: {exc}")


def _log_failure(future: asyncio.Future[None]) -> None:
    if future.cancelled():
        return
    exc = future.exception()
    if exc is not None and not isinstance(exc, Unavailable | Corrupt | StoreClosed):
        log.error("background write failed", exc_info=exc)


# A message as MessageRow, with the app's nullable columns given the daemon's defaults.
_MESSAGE_SELECT = (
    "SELECT m.id, m.conversation_id, m.sender_id, COALESCE(sw.username, su.username),"
    " m.content,"
    " COALESCE(NULLIF(m.attachments, 'null'::jsonb)::text, '[]'),"
    " COALESCE(m.message_type, 'text'), m.sent_at,"
    " COALESCE(m.is_read, false)"
    " FROM messages m LEFT JOIN users su ON su.id = m.sender_id"
    " LEFT JOIN ws_users sw ON sw.user_id = m.sender_id"
)

# A user's notifications beyond the newest max_per_user, read ones first and oldest first (the
# order prune_notifications keeps): run after the batch's INSERTs (DELETE ranks after them).
_KEEP_NEWEST_NOTIFICATIONS = (
    "DELETE FROM ws_notifications WHERE id IN (SELECT id FROM ws_notifications"
    " WHERE user_id = $1 ORDER BY (read_at IS NULL) DESC, id DESC OFFSET $2)"
)
_NOTIFICATION_SELECT = (
    "SELECT id, user_id, type, fields::text, created_at, read_at FROM ws_notifications"
)
_COMMENT_SELECT = (
    "SELECT c.id, c.pitch_id, c.user_id, COALESCE(w.username, u.username), c.content,"
    " c.created_at"
    " FROM ws_pitch_comments c LEFT JOIN users u ON u.id = c.user_id"
    " LEFT JOIN ws_users w ON w.user_id = c.user_id"
)
# Largest values of the ws_* tables' bigint ids (a cursor past every row).
INT8_MAX = 2**63 - 1


def _notification(row: Sequence[Any]) -> NotificationRow:
    return NotificationRow(row[0], row[1], row[2], row[3], row[4], row[5])


def _comment(row: Sequence[Any]) -> CommentRow:
    return CommentRow(row[0], row[1], row[2], row[3], row[4], row[5])


# Indexes the reads need on an existing Pitchey database: (table, leading columns as
# pg_indexes writes them, the statement docs/deploy.md suggests).
_WANTED_INDEXES = (
    ("messages", "conversation_id, id",
     "CREATE INDEX messages_conversation_id_id_idx ON messages (conversation_id, id);"),
    ("message_read_receipts", "user_id",
     "CREATE INDEX message_read_receipts_unread_idx ON message_read_receipts"
     " (user_id, message_id) WHERE read_at IS NULL;"),
)
# The message ids $1 has not read: not yet delivered, or delivered and unread. Disjoint for
# pitchey-ws's own writes (a delivery or a read removes the ws_undelivered row as it writes
# the receipt); an undelivered message that has a receipt anyway (the app wrote it: delivered,
# or read through its own routes) counts by its receipt alone.
_UNREAD_OF_USER = (
    "SELECT u.message_id FROM ws_undelivered u WHERE u.user_id = $1"
    " AND NOT EXISTS (SELECT 1 FROM message_read_receipts r"
    "   WHERE r.message_id = u.message_id AND r.user_id = $1)"
    " UNION ALL SELECT message_id FROM message_read_receipts"
    " WHERE user_id = $1 AND read_at IS NULL"
)


def _message(row: Sequence[Any]) -> MessageRow:
    return MessageRow(
        row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], bool(row[8])
    )


_PUT_SETTING = (
    "INSERT INTO ws_settings (key, value) VALUES ($1, $2)"
    " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
)
_UPSERT_WS_PROFILE = (
    "INSERT INTO ws_users (user_id, username, user_type)"
    " SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM users WHERE id = $1)"
    " ON CONFLICT (user_id) DO UPDATE SET"
    " username = COALESCE(EXCLUDED.username, ws_users.username),"
    " user_type = COALESCE(EXCLUDED.user_type, ws_users.user_type)"
)
_UPSERT_USER = (
    "INSERT INTO users (id, username, user_type, created_at, updated_at)"
    " VALUES ($1, $2, $3, $4, $4) ON CONFLICT (id) DO UPDATE SET"
    " username = COALESCE(EXCLUDED.username, users.username),"
    " user_type = COALESCE(EXCLUDED.user_type, users.user_type),"
    " updated_at = EXCLUDED.updated_at"
)
_ENSURE_USER = (
    "INSERT INTO users (id, created_at, updated_at) VALUES ($1, $2, $2)"
    " ON CONFLICT (id) DO NOTHING"
)
# Sequence $1 moved past the id $2 written explicitly (never backwards), so that the app's
# next insert into that table does not take the same id.
_SEQUENCE_PAST = (
    "SELECT setval($1::regclass, GREATEST($2::bigint,"
    " COALESCE(pg_sequence_last_value($1::regclass), 0)))"
    " WHERE $2::bigint > COALESCE(pg_sequence_last_value($1::regclass), 0)"
)


def _sequence_past(write: _Write, sequence: str | None, row_id: int) -> _Write:
    """``write`` also moves ``sequence`` (if the table has one) past ``row_id``."""
    return write if sequence is None else write.add(_SEQUENCE_PAST, (sequence, row_id))


_INSERT_DIRECT = (
    "INSERT INTO ws_direct_conversations (user_low, user_high, conversation_id)"
    " VALUES ($1, $2, $3)"
)
# The recorded conversation d of the pair ($1 < $2) still is their direct one: not a group,
# and its active participants are exactly the two.
_STILL_DIRECT = (
    "EXISTS (SELECT 1 FROM conversations c WHERE c.id = d.conversation_id"
    "   AND c.is_group IS NOT TRUE)"
    " AND ARRAY(SELECT p.user_id FROM conversation_participants p"
    "   WHERE p.conversation_id = d.conversation_id AND p.is_active IS NOT FALSE"
    "   AND p.left_at IS NULL ORDER BY p.user_id LIMIT 3) = ARRAY[$1, $2]::integer[]"
)
_FORGET_STALE_DIRECT = (
    "DELETE FROM ws_direct_conversations d WHERE d.user_low = $1 AND d.user_high = $2"
    " AND NOT (" + _STILL_DIRECT + ")"
)
# Delivered: the ws_undelivered rows of ($1[i], $2[i]) (message, recipient) go, and the
# receipts are written with the real time $3[i]: one statement for a record_deliveries call.
# The CTE is numbered from its first parameter (it follows the messages' in
# _MESSAGES_AND_DELIVERED).
_GONE = (
    "gone AS (DELETE FROM ws_undelivered u"
    " USING unnest(${0}::integer[], ${1}::integer[], ${2}::text[]) AS x(message_id, user_id, at)"
    " WHERE u.message_id = x.message_id AND u.user_id = x.user_id"
    " RETURNING u.message_id, u.user_id, x.at)"
)
_RECEIPTS = (
    "INSERT INTO message_read_receipts (message_id, user_id, delivered_at)"
    " SELECT message_id, user_id, at::timestamp FROM gone"
    " ON CONFLICT (message_id, user_id) DO NOTHING"
)
_DELIVERED = f"WITH {_GONE.format(1, 2, 3)} {_RECEIPTS}"
_READ_NOTICES_SENT = (
    "DELETE FROM ws_read_notices n"
    " USING unnest($1::integer[], $2::integer[]) AS x(message_id, reader_id)"
    " WHERE n.message_id = x.message_id AND n.reader_id = x.reader_id"
)
# Read: the receipt (written now if the message was never delivered), the undelivered row
# gone, and a read notice owed to the sender, unless it was read before. One statement, so
# "read before" is decided by the receipt as it was.
_MARK_RECEIPT_READ = (
    "WITH r AS (INSERT INTO message_read_receipts (message_id, user_id, delivered_at, read_at)"
    " VALUES ($1, $2, $3, $3) ON CONFLICT (message_id, user_id) DO UPDATE SET"
    " read_at = EXCLUDED.read_at WHERE message_read_receipts.read_at IS NULL"
    " RETURNING message_id, user_id),"
    " d AS (DELETE FROM ws_undelivered WHERE user_id = $2 AND message_id = $1)"
    " INSERT INTO ws_read_notices (message_id, reader_id, sender_id)"
    " SELECT r.message_id, r.user_id, m.sender_id FROM r JOIN messages m ON m.id = r.message_id"
    " ON CONFLICT DO NOTHING"
)
_MARK_MESSAGE_READ = (
    "UPDATE messages SET is_read = true, read_at = COALESCE(read_at, $1) WHERE id = $2"
)


# A batch's messages, one statement whatever their number ($1..$10: a column each, in batch
# order; $11/$12 one (message's position, user) per recipient; $13 the messages sequence):
# the id lock, then the ids, ascending in batch order; the rows; their request ids; one
# undelivered row per recipient; and each conversation's last_message_at, from its last
# message in the batch. Returns the ids in batch order, as one array.
#
# The lock comes before the first id whatever the plan: nextval's argument reads the row of
# "locked" (its one column is always false, so the argument is always $13), and that row
# exists only once pg_advisory_xact_lock has returned. The lock is held until the transaction
# ends, so ids become visible in increasing order across daemons (taking it again in a
# transaction that holds it is a no-op).
_MESSAGE_CTES = f"""
given AS MATERIALIZED (
    SELECT * FROM unnest($1::integer[], $2::integer[], $3::integer[], $4::integer[],
                         $5::text[], $6::text[], $7::text[], $8::text[], $9::text[],
                         $10::text[])
        WITH ORDINALITY AS g(conversation_id, sender_id, receiver_id, pitch_id, subject,
                             content, message_type, attachments, sent_at, request_id, n)
), locked AS MATERIALIZED (
    SELECT pg_advisory_xact_lock({_ID_LOCK}) IS NULL AS never
), ids AS MATERIALIZED (
    SELECT row_number() OVER (ORDER BY id) AS n, id
    FROM (SELECT nextval(CASE WHEN locked.never THEN NULL ELSE $13::regclass END) AS id
          FROM given CROSS JOIN locked) taken
), stored AS (
    INSERT INTO messages (id, conversation_id, sender_id, receiver_id, pitch_id, subject,
                          content, message_type, attachments, sent_at, is_read, is_edited,
                          is_deleted)
    SELECT ids.id, g.conversation_id, g.sender_id, g.receiver_id, g.pitch_id, g.subject,
           g.content, g.message_type, g.attachments::jsonb, g.sent_at::timestamp, false,
           false, false
    FROM given g JOIN ids USING (n)
), requests AS (
    INSERT INTO ws_message_requests (sender_id, request_id, message_id)
    SELECT g.sender_id, g.request_id, ids.id FROM given g JOIN ids USING (n)
    WHERE g.request_id IS NOT NULL
), undelivered AS (
    INSERT INTO ws_undelivered (user_id, message_id)
    SELECT r.user_id, ids.id
    FROM unnest($11::bigint[], $12::integer[]) AS r(n, user_id) JOIN ids USING (n)
), touched AS (
    UPDATE conversations c SET last_message_at = l.sent_at, updated_at = l.sent_at
    FROM (SELECT DISTINCT ON (conversation_id) conversation_id, sent_at::timestamp AS sent_at
          FROM given ORDER BY conversation_id, n DESC) l
    WHERE c.id = l.conversation_id
)"""
_INSERT_MESSAGES = f"WITH {_MESSAGE_CTES} SELECT array_agg(id ORDER BY n) FROM ids"
# The send path's usual batch: its messages and the delivery records of earlier ones
# ($14..$16, as _DELIVERED's $1..$3). A delivery concerns a committed message, never one of
# this statement's, so the two parts touch different rows.
_MESSAGES_AND_DELIVERED = (
    f"WITH {_MESSAGE_CTES}, {_GONE.format(14, 15, 16)}, receipts AS ({_RECEIPTS})"
    " SELECT array_agg(id ORDER BY n) FROM ids"
)


def _message_columns(messages: Sequence[NewMessage]) -> list[Sequence[Any]]:
    """``_INSERT_MESSAGES``'s $1..$12 for ``messages`` ($13 is the caller's)."""
    (conversations, senders, receivers, recipients, contents, types, attachments, pitches,
     subjects, requests, sent_at) = zip(*messages, strict=True)
    owners: list[int] = []
    users: list[int] = []
    for position, who in enumerate(recipients, 1):
        owners.extend([position] * len(who))
        users.extend(who)
    return [conversations, senders, receivers, pitches, subjects, contents, types,
            [_json(a) for a in attachments], sent_at, requests, owners, users]


def _json(attachments: list[dict[str, Any]]) -> str:
    return dumps(attachments) if attachments else "[]"
