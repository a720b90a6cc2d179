"""The SQLite engine of the store (WAL): one writer thread with group commit, reads through
aiosqlite. Implements ``store.Store``; nothing outside this module sees SQL or ``sqlite3``.

One task, the write loop, owns the write connection. Each domain write becomes a ``_Write``
(a list of statements); the loop takes everything queued, runs it in one transaction and
resolves each caller's future after COMMIT (group commit). An acknowledged write is durable.
Reads use a second connection, through aiosqlite, and never wait behind the writer (WAL).

The write connection is a plain ``sqlite3`` connection on a thread of its own, and a whole
transaction (BEGIN, every statement, COMMIT) runs there as one call: one hand-off per batch
(aiosqlite has no public way to run one function on its thread, and one round trip per
statement cost the event loop a wake-up each; the benchmark measured the single hand-off at a
lower median and tail latency).

Within one batch, statements are grouped by SQL text (one executemany each). INSERTs run
first, parent tables before their children (``_PARENTS_FIRST``), so foreign keys hold at each
statement; then every other statement, in the order its SQL first appears. So a write may rely
on rows inserted by earlier writes (or by itself), but not on the order of different UPDATE
statements touching one row. (Deferring foreign keys instead would need ``PRAGMA
defer_foreign_keys`` in every transaction, and setting it expires every prepared statement:
the writer then compiled its SQL again at each commit, about 125 us of CPU per commit.)

When a batch fails (a repeated requestId is normal after a restart), it is run again as **one**
transaction with a savepoint per write: the bad write is rolled back alone and fails, the others
commit together. Message and conversation ids are assigned here, in order, before the commit;
a failed write leaves a gap that is never filled, so ids become visible in increasing order.

A failing disk: SQLite's "disk full", "read-only", I/O and "cannot open" errors become
``store.Unavailable``, and so does a database file (or its WAL) that was deleted or replaced
under the daemon: before BEGIN and after COMMIT the writer compares the path's (st_dev,
st_ino) with those of the file it opened, one ``stat`` each, so a write that went into an
unlinked file is never acknowledged. While writes fail the store says why in ``healthy()``,
logs it once at ERROR, and the first write that commits again clears it. Pages that do not
parse become ``store.Corrupt``, which stays (corruption does not heal).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import queue
import re
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite

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

SCHEMA_PATH = Path(__file__).with_name("schema.sql")
SCHEMA_VERSION = 3
# The tables schema.sql creates: a version-0 file holding only these is a first start that
# stopped before recording its version; any other table means another program's database.
_OWN_TABLES = frozenset(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", SCHEMA_PATH.read_text()))

# The health check probes with a write when no write committed for this long (seconds).
PROBE_AFTER = 5.0

Params = tuple[Any, ...]


@dataclass
class _Write:
    """Statements that commit together, in one transaction with the rest of their batch."""

    statements: list[tuple[str, Params]] = field(default_factory=list)

    def add(self, sql: str, params: Params) -> _Write:
        self.statements.append((sql, params))
        return self


class SqliteStore(WriteQueue[_Write]):
    """``store.Store`` on one SQLite file."""

    shared_with_app = False  # the daemon is the database's only writer

    def __init__(
        self,
        path: str,
        synchronous: str = "FULL",
        max_batch: int = 512,
        on_commit: Callable[[int, float], None] | None = None,
        read_connections: int = 4,
    ) -> None:
        if read_connections < 1:
            raise ValueError("read_connections: at least 1")
        super().__init__()
        self.path = path
        self.read_connections = read_connections
        self.synchronous = synchronous
        self.max_batch = max_batch
        self.on_commit = on_commit
        self._writer: sqlite3.Connection | None = None
        # The writer thread's jobs: (function, arguments, future), or None to stop.
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=_writer_thread, args=(self._jobs,),
                                        name="pitchey-writer", daemon=True)
        # The read connections (WAL: reads never wait for the writer, nor for each other),
        # the idle ones (a read takes one, so at most read_connections run at once), and the
        # slots for long reads (sync, replay, big pages), one fewer than the connections, so
        # a short read (a join's history page) always finds a connection soon.
        self._readers: list[aiosqlite.Connection] = []
        self._idle: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        self._long_reads = asyncio.Semaphore(max(1, read_connections - 1))
        self._task: asyncio.Task[None] | None = None  # the writer task (WriteQueue's queue)
        self._pairs = KeyedLock()  # direct conversations being created, by user pair
        self.next_message_id = 1
        self.next_conversation_id = 1
        self.next_comment_id = 1
        self.next_notification_id = 1
        # Committed transactions (the savepoint retry of a failed batch counts as one).
        self.transactions = 0
        # (st_dev, st_ino) of the database file and its WAL as opened, by path.
        self._identity: dict[str, tuple[int, int]] = {}
        # Corruption, once seen (kept; WriteQueue keeps why writes fail right now).
        self._corrupt: Corrupt | None = None
        # One health check of the pages, and one probe write, at a time, shared by callers.
        self._page_check: asyncio.Task[None] | None = None
        self._probe: asyncio.Future[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Open both connections, apply the schema and migrations, start the writer.

        Raises StoreError naming the file and the reason when it is not a usable database
        (not SQLite, damaged, newer schema, another program's, not writable, a directory...).
        On failure everything opened so far is closed again (no thread is left running)."""
        self._preflight()
        try:
            self._writer = await self._on_writer(self._open_writer)
            for _ in range(self.read_connections):
                reader = await aiosqlite.connect(self.path, isolation_level=None)
                self._readers.append(reader)
                await reader.execute("PRAGMA foreign_keys=ON")
                await reader.execute("PRAGMA busy_timeout=5000")
                await reader.execute("PRAGMA query_only=ON")
                self._idle.put_nowait(reader)
            rows = await self._readers[0].execute_fetchall(
                "SELECT (SELECT COALESCE(MAX(id), 0) FROM messages),"
                " (SELECT COALESCE(MAX(id), 0) FROM conversations),"
                " (SELECT COALESCE(MAX(id), 0) FROM pitch_comments),"
                " (SELECT COALESCE(MAX(id), 0) FROM notifications)"
            )
        except sqlite3.Error as exc:
            await self.close()
            raise StoreError(f"database {self.path}: {_describe(exc)}") from exc
        except BaseException:
            await self.close()
            raise
        (max_message, max_conversation, max_comment, max_notification), = rows
        self.next_message_id = max_message + 1
        self.next_conversation_id = max_conversation + 1
        self.next_comment_id = max_comment + 1
        self.next_notification_id = max_notification + 1
        self._task = asyncio.create_task(self._write_loop(), name="store-writer")

    async def _on_writer(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the writer thread (the only thread that uses ``_writer``)."""
        if not self._thread.is_alive():
            self._thread.start()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._jobs.put((fn, args, future))
        return await future

    def _preflight(self) -> None:
        """Refuse, with the reason, a path SQLite would open badly or read-only: a directory,
        a missing parent, a file this process cannot open for writing (SQLite would silently
        fall back to read-only, and every write would fail later)."""
        if self.path == ":memory:" or self.path.startswith("file:"):
            return
        path = Path(self.path)
        if path.is_dir():
            raise StoreError(f"database {path} is a directory")
        parent = path.parent
        if not parent.is_dir():
            raise StoreError(f"database {path}: directory {parent} does not exist")
        if path.exists():
            try:
                os.close(os.open(path, os.O_RDWR))
            except OSError as exc:
                raise StoreError(
                    f"database {path} cannot be opened for writing: {exc.strerror}"
                ) from exc
        elif not os.access(parent, os.W_OK | os.X_OK):
            raise StoreError(f"database {path}: directory {parent} is not writable")

    def _open_writer(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            # Refuse before changing anything: setting WAL mode already writes the header.
            version = self._check_version(db)
            _check_pages(db)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.synchronous}")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=5000")
            self._migrate(db, version)
            for name in (self.path, self.path + "-wal"):
                with contextlib.suppress(OSError):  # ":memory:", or no WAL: nothing to watch
                    st = os.stat(name)
                    self._identity[name] = (st.st_dev, st.st_ino)
        except BaseException:
            db.close()
            raise
        return db

    def _check_version(self, db: sqlite3.Connection) -> int:
        """The file's schema version; raises StoreError for a newer one, or for another
        program's database (tables, but no pitchey-ws version)."""
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"database {self.path} has schema version {version}, newer than this daemon's"
                f" {SCHEMA_VERSION}"
            )
        if version == 0:
            tables = {name for (name,) in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
                " AND name NOT LIKE 'sqlite_%' LIMIT 1000"
            )}
            foreign = sorted(tables - _OWN_TABLES)
            if foreign:
                raise StoreError(
                    f"database {self.path} has no pitchey-ws schema version but holds other"
                    f" tables ({', '.join(foreign[:5])}): another program's database?"
                    " Refusing to add pitchey-ws tables to it"
                )
        return int(version)

    def _migrate(self, db: sqlite3.Connection, version: int) -> None:
        _add_receipt_senders(db)
        db.executescript(SCHEMA_PATH.read_text())
        if version < 2:
            # Direct conversations get their own key. Existing ones: the oldest untitled,
            # pitchless non-group conversation whose active participants are the two users.
            db.execute("BEGIN IMMEDIATE")
            # receipts_unread (schema.sql) replaces version 1's undelivered-only index.
            db.execute("DROP INDEX IF EXISTS receipts_undelivered")
            db.execute(
                "INSERT OR IGNORE INTO direct_conversations (user_low, user_high,"
                " conversation_id)"
                " SELECT MIN(p.user_id), MAX(p.user_id), c.id FROM conversations c"
                " JOIN conversation_participants p ON p.conversation_id = c.id"
                "   AND p.is_active = 1"
                " WHERE c.is_group = 0 AND c.title IS NULL AND c.pitch_id IS NULL"
                " GROUP BY c.id HAVING COUNT(*) = 2 ORDER BY c.id"
            )
            db.execute("PRAGMA user_version=2")
            db.execute("COMMIT")
        # Version 3 (pitches, comments, notifications, publish keys) only adds tables and
        # indexes, which schema.sql creates above.
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    async def close(self) -> None:
        """Commit what is queued, checkpoint the WAL and close both connections. Everything
        is closed even when the last writes fail (a failing disk): their callers got the error,
        and a reader or writer thread left open would keep the process from exiting."""
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
        readers, self._readers = self._readers, []
        for _ in readers:
            # Each one once it is idle: a read in progress finishes first (reads are bounded).
            await self._idle.get()
        for reader in readers:
            await reader.close()
        if self._writer is not None:
            await self._on_writer(self._close_writer, self._writer)
            self._writer = None
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()  # its last job, the close, is done: it is exiting

    @staticmethod
    def _close_writer(db: sqlite3.Connection) -> None:
        try:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:  # a failing disk: the WAL keeps what it holds
            log.warning("WAL checkpoint at close failed: %s", exc)
        finally:
            db.close()

    async def healthy(self) -> bool:
        """True, or raise the reason: Corrupt when pages do not parse (each main table's
        first and last pages, read by a fresh connection, so no cached page hides damage),
        Unavailable when the file was deleted or replaced or writes fail. When no write
        committed for PROBE_AFTER seconds, or while writes fail, a small write (the
        ``health_probe`` setting) checks that the database takes writes; that probe is also
        how the store notices that space came back."""
        rows = await self._fetch("SELECT 1")
        if rows != [(1,)]:
            return False
        if self._corrupt is not None:
            raise self._corrupt
        try:
            self._check_file()
        except Unavailable as exc:
            self._note_failure(exc)
            raise
        if self._page_check is None or self._page_check.done():
            self._page_check = asyncio.create_task(
                asyncio.to_thread(self._read_pages), name="store-page-check"
            )
        try:
            await asyncio.shield(self._page_check)
        except sqlite3.Error as exc:
            raise self._noted(_store_error(exc)) from exc
        if self._failing is not None or time.monotonic() - self._last_commit > PROBE_AFTER:
            if self._probe is None or self._probe.done():
                self._probe = self._submit(_Write().add(
                    "INSERT INTO settings (key, value) VALUES ('health_probe', ?)"
                    " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (now_iso(),),
                ))
            await asyncio.shield(self._probe)
        if self._failing is not None:
            raise self._failing
        return True

    def _read_pages(self) -> None:
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=2)
        try:
            _check_pages(db)
        finally:
            db.close()

    def _check_file(self) -> None:
        """Raise Unavailable when the database file or its WAL is not the one opened."""
        for name, opened in self._identity.items():
            try:
                st = os.stat(name)
            except FileNotFoundError:
                raise Unavailable(f"database file {name} was deleted", 30.0) from None
            except OSError as exc:
                raise Unavailable(f"database file {name}: {exc.strerror}") from None
            if (st.st_dev, st.st_ino) != opened:
                raise Unavailable(f"database file {name} was replaced by another file", 30.0)

    def _guarded(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the writer thread, between two checks of the file: a commit that
        went into a deleted or replaced file raises instead of being acknowledged."""
        self._check_file()
        result = fn(*args)
        self._check_file()
        return result

    def _noted(self, error: StoreError) -> StoreError:
        """Remember a failing disk or a corrupt file (logged once), and return ``error``."""
        if isinstance(error, Unavailable):
            self._note_failure(error)
        elif isinstance(error, Corrupt) and self._corrupt is None:
            self._corrupt = error
            log.error("DATABASE %s IS CORRUPT: %s; restore it from a backup", self.path, error)
        return error

    def _note_failure(self, error: Unavailable) -> None:
        if self._failing is None:
            log.error("DATABASE %s CANNOT TAKE WRITES: %s; answering 'unavailable' and storing"
                      " nothing until a write succeeds", self.path, error)
        self._failing = error

    @property
    def where(self) -> str:
        return self.path

    # -- the writer ------------------------------------------------------------------------

    def _submit_later(self, write: _Write) -> None:
        """Queue a write nobody waits for (delivery records, presence); failures are logged."""
        self._submit(write).add_done_callback(_log_failure)

    async def flush(self) -> None:
        """Wait until everything queued before this call is committed."""
        await self._submit(_Write())

    async def _write_loop(self) -> None:
        assert self._writer is not None
        queue = self._queue
        while True:
            if not queue:
                self._wakeup = asyncio.get_running_loop().create_future()
                await self._wakeup
                continue
            batch = [queue.popleft() for _ in range(min(len(queue), self.max_batch))]
            started = time.perf_counter()
            try:
                wrote = await self._commit([w for w, _ in batch])
            except asyncio.CancelledError:
                _close_all(batch)
                raise
            except Exception as first:
                errors: list[Exception | None]
                failed = _store_error(first)
                if isinstance(failed, Unavailable | Corrupt):
                    # The disk, not one write: retrying each write would fail the same way.
                    errors = [failed] * len(batch)
                else:
                    # One bad write must not fail its neighbours: run the batch again in one
                    # transaction, each write in a savepoint of its own.
                    log.debug("batch of %d writes failed; retrying with savepoints", len(batch))
                    try:
                        errors = await self._on_writer(
                            self._guarded, _savepoint_transaction, self._writer,
                            [w for w, _ in batch],
                        )
                    except asyncio.CancelledError:
                        _close_all(batch)
                        raise
                    except Exception as exc:
                        if not isinstance(_store_error(exc), Unavailable | Corrupt):
                            log.exception("batch failed")
                        errors = [exc] * len(batch)
                    else:
                        self.transactions += 1
                mapped = [None if e is None else self._noted(_store_error(e)) for e in errors]
                if not any(isinstance(e, Unavailable) for e in mapped):
                    self._note_commit()
                for (_, future), error in zip(batch, mapped, strict=True):
                    if future.done():
                        continue
                    if error is None:
                        future.set_result(None)
                    else:
                        future.set_exception(error)
            else:
                self.transactions += 1
                if wrote:  # a batch of flushes only proves nothing about the disk
                    self._note_commit()
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)
            if self.on_commit is not None:
                self.on_commit(len(batch), time.perf_counter() - started)

    async def _commit(self, writes: Sequence[_Write]) -> bool:
        """Commit the writes as one transaction; False when they held no statement."""
        db = self._writer
        assert db is not None
        grouped: dict[str, list[Params]] = {}
        for write in writes:
            for sql, params in write.statements:
                grouped.setdefault(sql, []).append(params)
        if grouped:
            ordered = sorted(grouped.items(), key=_statement_rank)  # stable: ties keep order
            await self._on_writer(self._guarded, _transaction, db, ordered)
        return bool(grouped)

    @contextlib.asynccontextmanager
    async def serialized(self, *key: int | str) -> AsyncIterator[None]:
        # One daemon per SQLite database: the service's own in-flight holds suffice.
        yield

    # -- reads -----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _reading(self, long: bool = False) -> AsyncIterator[aiosqlite.Connection]:
        """An idle read connection, the caller's alone until the block ends (a read
        transaction may span statements). ``long``: also one of the long-read slots.
        Raises StoreClosed when the store is not open."""
        if not self._readers:
            raise StoreClosed("store is not open")
        async with self._long_reads if long else contextlib.nullcontext():
            reader = await self._idle.get()
            try:
                yield reader
            finally:
                self._idle.put_nowait(reader)

    async def _fetch(self, sql: str, params: Params = (), long: bool = False,
                     factory: Callable[[Any], Any] | None = None) -> list[Any]:
        """Rows of one query; ``factory`` builds each row's object on the reader's thread (a
        replay's 1,000 rows built here cost the event loop a millisecond)."""
        async with self._reading(long) as reader:
            return await self._fetch_on(reader, sql, params, long, factory)

    async def _fetch_on(self, reader: aiosqlite.Connection, sql: str, params: Params = (),
                        chunked: bool = False, factory: Callable[[Any], Any] | None = None,
                        ) -> list[Any]:
        """All rows of one query, on a reader the caller holds. ``chunked`` (long reads): in
        hand-offs of READ_CHUNK rows, so the reader's thread, which holds the GIL while it
        builds rows, lets the event loop run between them instead of for a whole 1,000-row
        replay. ``factory`` builds each row's object on the reader's thread."""
        if factory is not None:
            # aiosqlite annotates it as a class; sqlite3 takes any callable (cursor, row).
            reader.row_factory = lambda _cursor, row: factory(row)  # type: ignore[assignment]
        try:
            if not chunked:
                return list(await reader.execute_fetchall(sql, params))
            rows: list[Any] = []
            async with reader.execute(sql, params) as cursor:
                while chunk := await cursor.fetchmany(READ_CHUNK):
                    rows.extend(chunk)
            return rows
        except sqlite3.Error as exc:
            raise self._noted(_store_error(exc)) from exc
        finally:
            if factory is not None:
                reader.row_factory = None

    async def setting(self, key: str) -> str | None:
        rows = await self._fetch("SELECT value FROM settings WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    async def put_setting(self, key: str, value: str) -> None:
        await self._write(_Write().add(
            "INSERT INTO settings (key, value) VALUES (?, ?)"
            " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        ))

    async def accepts_user(self, user_id: int) -> bool:
        return True  # unknown users are created on their first handshake

    async def users(self, ids: Iterable[int]) -> dict[int, UserRow]:
        wanted = list(dict.fromkeys(ids))[:MAX_ROWS]
        out: dict[int, UserRow] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = await self._fetch(
                f"SELECT id, username, user_type, last_seen FROM users WHERE id IN ({marks})",
                tuple(chunk),
            )
            out.update((r[0], UserRow(*r)) for r in rows)
        return out

    def _profile_write(self, user_id: int, username: str | None, user_type: str | None) -> _Write:
        now = now_iso()
        if username is None and user_type is None:
            return _ensure_users(_Write(), [user_id])
        return _Write().add(_UPSERT_USER, (user_id, username, user_type, now, now))

    async def save_profile(
        self, user_id: int, username: str | None, user_type: str | None
    ) -> None:
        await self._write(self._profile_write(user_id, username, user_type))

    def save_profile_later(
        self, user_id: int, username: str | None, user_type: str | None
    ) -> None:
        self._submit_later(self._profile_write(user_id, username, user_type))

    def set_last_seen_later(self, user_id: int, last_seen: str) -> None:
        self._submit_later(_Write().add(
            "UPDATE users SET last_seen = ?, updated_at = ? WHERE id = ?",
            (last_seen, last_seen, user_id),
        ))

    async def conversation(self, conversation_id: int) -> ConversationRow | None:
        rows = await self._fetch(
            "SELECT c.id, c.title, c.is_group, c.created_by_id, c.pitch_id, p.user_id"
            " FROM conversations c LEFT JOIN conversation_participants p"
            "   ON p.conversation_id = c.id AND p.is_active = 1"
            " WHERE c.id = ? LIMIT ?",
            (conversation_id, MAX_ROWS),
        )
        if not rows:
            return None
        cid, title, is_group, created_by, pitch_id, _ = rows[0]
        members = frozenset(r[5] for r in rows if r[5] is not None)
        return ConversationRow(cid, title, bool(is_group), created_by, members, pitch_id)

    async def conversation_by_request(self, created_by: int, request_id: str) -> int | None:
        rows = await self._fetch(
            "SELECT id FROM conversations WHERE created_by_id = ? AND request_id = ?",
            (created_by, request_id),
        )
        return rows[0][0] if rows else None

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
        if conversation_id is None:
            conversation_id = self._new_conversation_id()
        else:
            # The backend's own id: later ids are assigned above it.
            self.next_conversation_id = max(self.next_conversation_id, conversation_id + 1)
        is_group = len(set(members)) > 2
        write = _create_conversation(
            _Write(), conversation_id, created_by, members, title, is_group, request_id,
            pitch_id, now,
        )
        if not is_group and len(set(members)) == 2:
            # A 1:1 (titled, about a pitch or plain) becomes the pair's direct conversation
            # if they have none yet: recipientId sends go there (PROTOCOL.md 3).
            low, high = sorted(set(members))
            write.add(_INSERT_DIRECT.replace("INSERT", "INSERT OR IGNORE", 1),
                      (low, high, conversation_id))
        await self._write(write)
        return ConversationRow(conversation_id, title, is_group, created_by, frozenset(members),
                               pitch_id)

    async def _direct_id(self, low: int, high: int) -> int | None:
        """The pair's direct conversation: the one recorded, else (a 1:1 made before every
        1:1 was recorded) the oldest non-group conversation whose active participants are
        exactly the two."""
        rows = await self._fetch(
            "SELECT conversation_id FROM direct_conversations WHERE user_low = ? AND user_high = ?",
            (low, high),
        )
        if rows:
            return int(rows[0][0])
        rows = await self._fetch(
            "SELECT p.conversation_id FROM conversation_participants p"
            " JOIN conversations c ON c.id = p.conversation_id"
            " WHERE p.user_id = ? AND p.is_active = 1 AND c.is_group = 0"
            " AND EXISTS (SELECT 1 FROM conversation_participants q"
            "   WHERE q.conversation_id = p.conversation_id AND q.user_id = ? AND q.is_active = 1)"
            " AND NOT EXISTS (SELECT 1 FROM conversation_participants r"
            "   WHERE r.conversation_id = p.conversation_id AND r.user_id NOT IN (?, ?)"
            "   AND r.is_active = 1)"
            " ORDER BY p.conversation_id LIMIT 1",
            (low, high, low, high),
        )
        return int(rows[0][0]) if rows else None

    async def find_direct(self, a: int, b: int) -> int | None:
        return await self._direct_id(min(a, b), max(a, b))

    async def direct_conversation(self, a: int, b: int, now: str) -> ConversationRow:
        low, high = min(a, b), max(a, b)
        found = await self._direct_id(low, high)
        if found is None:
            # One creation per pair at a time; a waiter finds what the first one committed.
            async with self._pairs.hold((low, high)):
                found = await self._direct_id(low, high)
                if found is None:
                    made = self._new_conversation_id()
                    write = _create_conversation(
                        _Write(), made, a, [a, b], None, False, None, None, now
                    )
                    try:
                        await self._write(write.add(_INSERT_DIRECT, (low, high, made)))
                        found = made
                    except ConstraintViolation:
                        # A create_conversation of the two committed first and became
                        # their direct conversation: use that one.
                        found = await self._direct_id(low, high)
                        if found is None:
                            raise
        row = await self.conversation(found)
        if row is None:
            raise StoreError(f"direct conversation {found} vanished")
        return row

    async def contacts(self, user_id: int) -> set[int]:
        rows = await self._fetch(
            "SELECT DISTINCT b.user_id FROM conversation_participants a"
            " JOIN conversation_participants b ON b.conversation_id = a.conversation_id"
            " WHERE a.user_id = ? AND a.is_active = 1 AND b.is_active = 1 AND b.user_id != ?"
            " LIMIT ?",
            (user_id, user_id, MAX_ROWS),
        )
        return {r[0] for r in rows}

    # -- messages --------------------------------------------------------------------------

    async def add_message(self, message: NewMessage) -> int:
        message_id = self.next_message_id
        self.next_message_id += 1
        await self._submit(_insert_message(_Write(), message_id, message))
        return message_id

    async def message_by_request(self, sender_id: int, request_id: str) -> MessageRow | None:
        rows = await self._fetch(
            _MESSAGE_SELECT + " WHERE m.sender_id = ? AND m.request_id = ?",
            (sender_id, request_id),
        )
        return _message(rows[0]) if rows else None

    async def message(self, message_id: int) -> MessageRow | None:
        rows = await self._fetch(_MESSAGE_SELECT + " WHERE m.id = ?", (message_id,))
        return _message(rows[0]) if rows else None

    async def delivered_any(self, message_id: int) -> bool:
        rows = await self._fetch(
            "SELECT 1 FROM message_read_receipts WHERE message_id = ? AND delivered_at IS NOT NULL"
            " LIMIT 1",
            (message_id,),
        )
        return bool(rows)

    async def message_for_read(
        self, message_id: int, reader_id: int
    ) -> tuple[MessageRow, str | None] | None:
        rows = await self._fetch(
            _MESSAGE_SELECT.replace("m.is_read", "r.read_at")
            + " LEFT JOIN message_read_receipts r ON r.message_id = m.id AND r.user_id = ?"
            " WHERE m.id = ? AND m.is_deleted = 0",
            (reader_id, message_id),
        )
        if not rows:
            return None
        row = rows[0]
        return _message((*row[:8], False)), row[8]

    async def mark_read(self, message_id: int, reader_id: int, now: str) -> None:
        write = _Write().add(_MARK_RECEIPT_READ, (message_id, reader_id, now, now, message_id))
        await self._write(write.add(
            "UPDATE messages SET is_read = 1, read_at = COALESCE(read_at, ?) WHERE id = ?",
            (now, message_id),
        ))

    async def history(
        self, conversation_id: int, viewer_id: int, before: int | None, limit: int
    ) -> tuple[list[MessageRow], bool]:
        rows = await self._fetch(
            _MESSAGE_SELECT.replace(
                "m.is_read",
                "CASE WHEN m.sender_id = ? THEN m.is_read ELSE r.read_at IS NOT NULL END",
            )
            + " LEFT JOIN message_read_receipts r ON r.message_id = m.id AND r.user_id = ?"
            " WHERE m.conversation_id = ? AND m.id < ? AND m.is_deleted = 0"
            " ORDER BY m.id DESC LIMIT ?",
            (viewer_id, viewer_id, conversation_id, before or 2**63 - 1, limit + 1),
            long=limit > _SHORT_PAGE,
        )
        has_more = len(rows) > limit
        return [_message(r) for r in reversed(rows[:limit])], has_more

    async def since(self, user_id: int, since: int, limit: int) -> tuple[list[MessageRow], bool]:
        # One range scan of messages_conversation per conversation, merged by SQLite in id
        # order (a compound SELECT's ORDER BY over arms that each walk the index in order:
        # no sort), and the merge stops at limit + 1 ids; then only the rows of those ids, by
        # key. The cost is the rows asked for plus one index seek per conversation, not the
        # user's whole history (one query over all the user's conversations sorted every
        # message after ``since`` first). Later groups of conversations only look below the
        # (limit + 1)-th id found so far. One read transaction, so every statement sees the
        # same snapshot (ids in order).
        async with self._reading(long=True) as reader:
            await self._fetch_on(reader, "BEGIN")
            try:
                conversations = [r[0] for r in await self._fetch_on(
                    reader,
                    "SELECT conversation_id FROM conversation_participants"
                    " WHERE user_id = ? AND is_active = 1 LIMIT ?",
                    (user_id, MAX_ROWS),
                )]
                found: list[int] = []
                below = 2**63 - 1
                for start in range(0, len(conversations), _SINCE_ARMS):
                    group = conversations[start : start + _SINCE_ARMS]
                    found.extend(r[0] for r in await self._fetch_on(
                        reader,
                        " UNION ALL ".join([_SINCE_ARM] * len(group)) + " ORDER BY 1 LIMIT ?",
                        (*(x for cid in group for x in (cid, since, below)), limit + 1),
                    ))
                    found.sort()
                    del found[limit + 1 :]
                    if len(found) > limit:
                        below = found[limit]
                rows = await self._fetch_on(
                    reader, _MESSAGE_SELECT + " WHERE m.id IN (SELECT value FROM json_each(?))"
                    " ORDER BY m.id", (dumps(found),), chunked=True, factory=_message,
                ) if found else []
            finally:
                await self._fetch_on(reader, "COMMIT")
        return rows[:limit], len(rows) > limit

    # -- durable events --------------------------------------------------------------------

    async def pending(self, user_id: int, limit: int) -> list[PendingEvent]:
        messages = await self._fetch(
            _MESSAGE_SELECT + " JOIN message_read_receipts r ON r.message_id = m.id"
            # A user removed from a conversation is owed none of its messages any more.
            " JOIN conversation_participants p ON p.conversation_id = m.conversation_id"
            "   AND p.user_id = r.user_id AND p.is_active = 1"
            # Nor a message deleted since: history and sync hide it.
            " WHERE r.user_id = ? AND (r.delivered_at IS NULL) = 1 AND r.read_at IS NULL"
            " AND m.is_deleted = 0"
            " ORDER BY r.message_id LIMIT ?",
            (user_id, limit), long=True, factory=_pending_message,
        )
        reads = await self._fetch(_OWED_READS, (user_id, limit), long=True,
                                  factory=_pending_read)
        notes = await self._fetch(
            _NOTIFICATION_SELECT + " WHERE user_id = ? AND delivered_at IS NULL"
            " ORDER BY id LIMIT ?",
            (user_id, limit), factory=_pending_notification,
        )
        events: list[PendingEvent] = messages
        if reads or notes:
            events.extend(reads)
            events.extend(notes)
            events.sort(key=pending_order)
        elif any(a.queued_at > b.queued_at for a, b in itertools.pairwise(events)):
            events.sort(key=pending_order)  # rare: ids and send times disagree
        return events[:limit]

    def record_deliveries(
        self, messages: Mapping[int, Sequence[int]], reads: Sequence[tuple[int, int]],
        notifications: Sequence[int] = (),
    ) -> asyncio.Future[None]:
        now = now_iso()
        write = _Write()
        if notifications:
            write.add(
                "UPDATE notifications SET delivered_at = ? WHERE delivered_at IS NULL"
                " AND id IN (SELECT value FROM json_each(?))",
                (now, dumps(list(notifications))),
            )
        for message_id, user_ids in messages.items():
            if len(user_ids) == 1:
                write.add(
                    "UPDATE message_read_receipts SET delivered_at = ?"
                    " WHERE message_id = ? AND user_id = ? AND delivered_at IS NULL",
                    (now, message_id, user_ids[0]),
                )
            else:  # one statement for a group fan-out's 1,000 rows
                write.add(
                    "UPDATE message_read_receipts SET delivered_at = ?"
                    " WHERE message_id = ? AND delivered_at IS NULL"
                    " AND user_id IN (SELECT value FROM json_each(?))",
                    (now, message_id, dumps(list(user_ids))),
                )
        for message_id, reader_id in reads:
            write.add(
                "UPDATE message_read_receipts SET read_notified_at = ?"
                " WHERE message_id = ? AND user_id = ? AND read_notified_at IS NULL",
                (now, message_id, reader_id),
            )
        return self._submit(write)

    # -- typing ----------------------------------------------------------------------------

    def set_typing_later(
        self, conversation_id: int, user_id: int, typing: bool, now: str
    ) -> None:
        self._submit_later(_Write().add(
            "INSERT INTO typing_indicators (conversation_id, user_id, is_typing, updated_at)"
            " VALUES (?, ?, ?, ?) ON CONFLICT(conversation_id, user_id) DO UPDATE SET"
            " is_typing = excluded.is_typing, updated_at = excluded.updated_at",
            (conversation_id, user_id, int(typing), now),
        ))

    async def clear_typing(self) -> None:
        await self._write(_Write().add("DELETE FROM typing_indicators WHERE ?", (1,)))

    # -- ids -------------------------------------------------------------------------------

    def _new_conversation_id(self) -> int:
        value = self.next_conversation_id
        self.next_conversation_id += 1
        return value

    # -- the inbox and HTTP history --------------------------------------------------------

    async def conversation_list(
        self, user_id: int, before: tuple[str, int] | None, limit: int
    ) -> tuple[list[ConversationSummary], bool]:
        # From the user's participant rows (index participants_user), each conversation by
        # key; the page is sorted by activity and cut at the cursor.
        activity = "COALESCE(c.last_message_at, c.created_at)"
        at, below = before if before is not None else ("\uffff", 2**63 - 1)
        rows = await self._fetch(
            "SELECT c.id, c.title, c.pitch_id, c.is_group, c.last_message_at, c.created_at,"
            " pt.title"
            " FROM conversation_participants p JOIN conversations c ON c.id = p.conversation_id"
            " LEFT JOIN pitches pt ON pt.id = c.pitch_id"
            f" WHERE p.user_id = ? AND p.is_active = 1 AND ({activity} < ?"
            f" OR ({activity} = ? AND c.id < ?))"
            f" ORDER BY {activity} DESC, c.id DESC LIMIT ?",
            (user_id, at, at, below, limit + 1),
        )
        has_more = len(rows) > limit
        rows = rows[:limit]
        if not rows:
            return [], has_more
        ids = dumps([r[0] for r in rows])
        last = await self._fetch(
            _MESSAGE_SELECT + " WHERE m.id IN (SELECT (SELECT id FROM messages"
            " WHERE conversation_id = j.value AND is_deleted = 0 ORDER BY id DESC LIMIT 1)"
            " FROM json_each(?) j)",
            (ids,),
        )
        last_by = {r[1]: _message(r) for r in last}
        others: dict[int, list[UserRow]] = {}
        for r in await self._fetch(
            "SELECT p.conversation_id, u.id, u.username, u.user_type, u.last_seen"
            " FROM conversation_participants p JOIN users u ON u.id = p.user_id"
            " WHERE p.conversation_id IN (SELECT value FROM json_each(?))"
            " AND p.is_active = 1 AND p.user_id != ? ORDER BY p.conversation_id, u.id LIMIT ?",
            (ids, user_id, MAX_ROWS),
        ):
            others.setdefault(r[0], []).append(UserRow(r[1], r[2], r[3], r[4]))
        # Only unread receipts are in the partial index receipts_unread.
        unread = dict(await self._fetch(
            "SELECT m.conversation_id, COUNT(*) FROM message_read_receipts r"
            " JOIN messages m ON m.id = r.message_id"
            " WHERE r.user_id = ? AND r.read_at IS NULL AND m.sender_id != ?"
            " AND m.is_deleted = 0 AND m.conversation_id IN (SELECT value FROM json_each(?))"
            " GROUP BY m.conversation_id",
            (user_id, user_id, ids),
        ))
        out = [
            ConversationSummary(
                r[0], r[1], r[2], bool(r[3]), r[4], r[5], others.get(r[0], []),
                last_by.get(r[0]), int(unread.get(r[0], 0)), r[6],
            )
            for r in rows
        ]
        return out, has_more

    async def message_details(self, message_ids: Sequence[int]) -> dict[int, MessageDetail]:
        if not message_ids:
            return {}
        ids = dumps(list(message_ids))
        receipts: dict[int, list[Receipt]] = {}
        for r in await self._fetch(
            "SELECT r.message_id, r.user_id, u.username, r.delivered_at, r.read_at"
            " FROM message_read_receipts r LEFT JOIN users u ON u.id = r.user_id"
            " WHERE r.message_id IN (SELECT value FROM json_each(?))"
            " ORDER BY r.message_id, r.user_id LIMIT ?",
            (ids, MAX_ROWS),
        ):
            receipts.setdefault(r[0], []).append(Receipt(r[1], r[2], r[3], r[4]))
        rows = await self._fetch(
            "SELECT m.id, m.receiver_id, m.parent_message_id, m.subject, m.is_edited,"
            " m.is_deleted, m.edited_at, su.user_type"
            " FROM messages m LEFT JOIN users su ON su.id = m.sender_id"
            " WHERE m.id IN (SELECT value FROM json_each(?))",
            (ids,),
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
            "SELECT m.id, m.sender_id FROM message_read_receipts r"
            " JOIN messages m ON m.id = r.message_id"
            " WHERE r.user_id = ? AND r.read_at IS NULL AND m.conversation_id = ?"
            " AND m.id <= ? AND m.sender_id != ? AND m.is_deleted = 0 ORDER BY m.id LIMIT ?",
            (reader_id, conversation_id, up_to if up_to is not None else 2**63 - 1,
             reader_id, limit),
        )
        return [(r[0], r[1]) for r in rows]

    async def mark_read_many(self, message_ids: Sequence[int], reader_id: int, now: str) -> None:
        if not message_ids:
            return
        write = _Write()
        for message_id in message_ids:
            write.add(_MARK_RECEIPT_READ, (message_id, reader_id, now, now, message_id))
            write.add(_MARK_MESSAGE_READ, (now, message_id))
        await self._write(write)

    # -- participants (the backend's API) --------------------------------------------------

    async def change_participants(
        self, conversation_id: int, add: Sequence[int], remove: Sequence[int], now: str
    ) -> ConversationRow | None:
        if await self.conversation(conversation_id) is None:
            return None
        write = _ensure_users(_Write(), add)
        for user_id in dict.fromkeys(add):
            write.add(
                "INSERT INTO conversation_participants (conversation_id, user_id, joined_at)"
                " VALUES (?, ?, ?) ON CONFLICT(conversation_id, user_id) DO UPDATE SET"
                " is_active = 1, left_at = NULL, joined_at = excluded.joined_at"
                " WHERE conversation_participants.is_active = 0",
                (conversation_id, user_id, now),
            )
        for user_id in dict.fromkeys(remove):
            write.add(
                "UPDATE conversation_participants SET is_active = 0, left_at = ?"
                " WHERE conversation_id = ? AND user_id = ? AND is_active = 1",
                (now, conversation_id, user_id),
            )
        # Its members changed: it is no longer "the" conversation of a pair.
        write.add("DELETE FROM direct_conversations WHERE conversation_id = ?",
                  (conversation_id,))
        await self._write(write)
        return await self.conversation(conversation_id)

    # -- pitches ---------------------------------------------------------------------------

    async def pitch(self, pitch_id: int) -> PitchRow | None:
        rows = await self._fetch(
            "SELECT id, owner_id, title, visibility FROM pitches WHERE id = ?", (pitch_id,)
        )
        if not rows:
            return None
        allowed = await self._fetch(
            "SELECT user_id FROM pitch_allowed WHERE pitch_id = ? LIMIT ?", (pitch_id, MAX_ROWS)
        )
        r = rows[0]
        return PitchRow(r[0], r[1], r[2], r[3], frozenset(a[0] for a in allowed))

    async def put_pitch(self, pitch: PitchRow, now: str) -> None:
        write = _Write().add(
            "INSERT INTO pitches (id, owner_id, title, visibility, updated_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET owner_id = excluded.owner_id,"
            " title = excluded.title, visibility = excluded.visibility,"
            " updated_at = excluded.updated_at",
            (pitch.id, pitch.owner_id, pitch.title, pitch.visibility, now),
        )
        # INSERTs run before every other statement of a batch (module docstring), so: add the
        # new set, then drop whoever is not in it. (The service runs one put per pitch at a
        # time.)
        allowed = dumps(sorted(pitch.allowed))
        write.add(
            "INSERT OR IGNORE INTO pitch_allowed (pitch_id, user_id)"
            " SELECT ?, value FROM json_each(?)",
            (pitch.id, allowed),
        )
        write.add(
            "DELETE FROM pitch_allowed WHERE pitch_id = ?"
            " AND user_id NOT IN (SELECT value FROM json_each(?))",
            (pitch.id, allowed),
        )
        await self._write(write)

    async def pitch_stats(self, pitch_id: int, user_id: int) -> PitchStats:
        rows = await self._fetch(
            "SELECT (SELECT COUNT(*) FROM pitch_views WHERE pitch_id = ?),"
            " (SELECT COUNT(*) FROM pitch_likes WHERE pitch_id = ?),"
            " EXISTS (SELECT 1 FROM pitch_likes WHERE pitch_id = ? AND user_id = ?),"
            " EXISTS (SELECT 1 FROM pitch_views WHERE pitch_id = ? AND user_id = ?)",
            (pitch_id, pitch_id, pitch_id, user_id, pitch_id, user_id),
        )
        views, likes, liked, _ = rows[0]
        return PitchStats(int(views), int(likes), bool(liked))

    async def has_viewed(self, pitch_id: int, user_id: int) -> bool:
        rows = await self._fetch(
            "SELECT 1 FROM pitch_views WHERE pitch_id = ? AND user_id = ?", (pitch_id, user_id)
        )
        return bool(rows)

    async def add_view(self, pitch_id: int, user_id: int, now: str) -> None:
        await self._write(_Write().add(
            "INSERT OR IGNORE INTO pitch_views (pitch_id, user_id, viewed_at) VALUES (?, ?, ?)",
            (pitch_id, user_id, now),
        ))

    async def set_like(
        self, pitch_id: int, user_id: int, liked: bool, now: str,
        notify: NewNotification | None,
    ) -> int | None:
        write = _Write()
        if liked:
            write.add(
                "INSERT OR IGNORE INTO pitch_likes (pitch_id, user_id, liked_at) VALUES (?, ?, ?)",
                (pitch_id, user_id, now),
            )
        else:
            write.add("DELETE FROM pitch_likes WHERE pitch_id = ? AND user_id = ?",
                      (pitch_id, user_id))
        ids = self._add_notifications(write, [notify] if notify else [], now)
        await self._write(write)
        return ids[0] if ids else None

    async def add_comment(
        self, pitch_id: int, user_id: int, content: str, request_id: str | None, now: str,
        notify: Callable[[int], NewNotification] | None,
    ) -> tuple[int, int | None]:
        comment_id = self.next_comment_id
        self.next_comment_id += 1
        write = _Write().add(
            "INSERT INTO pitch_comments (id, pitch_id, user_id, content, created_at, request_id)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (comment_id, pitch_id, user_id, content, now, request_id),
        )
        ids = self._add_notifications(write, [notify(comment_id)] if notify else [], now)
        await self._write(write)
        return comment_id, ids[0] if ids else None

    async def comment_by_request(self, user_id: int, request_id: str) -> CommentRow | None:
        rows = await self._fetch(
            _COMMENT_SELECT + " WHERE c.user_id = ? AND c.request_id = ?", (user_id, request_id)
        )
        return CommentRow(*rows[0]) if rows else None

    async def comments(
        self, pitch_id: int, before: int | None, limit: int
    ) -> tuple[list[CommentRow], bool]:
        rows = await self._fetch(
            _COMMENT_SELECT + " WHERE c.pitch_id = ? AND c.id < ? ORDER BY c.id DESC LIMIT ?",
            (pitch_id, before or 2**63 - 1, limit + 1),
        )
        return [CommentRow(*r) for r in reversed(rows[:limit])], len(rows) > limit

    # -- notifications ---------------------------------------------------------------------

    def _add_notifications(
        self, write: _Write, notes: Sequence[NewNotification], now: str
    ) -> list[int]:
        ids = []
        for note in notes:
            nid = self.next_notification_id
            self.next_notification_id += 1
            write.add(
                "INSERT INTO notifications (id, user_id, type, fields, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (nid, note.user_id, note.type, note.fields, now),
            )
            ids.append(nid)
        if self.notifications_per_user > 0:
            for user_id in dict.fromkeys(note.user_id for note in notes):
                write.add(_KEEP_NEWEST_NOTIFICATIONS, (user_id, self.notifications_per_user))
        return ids

    async def add_notifications(
        self, notes: Sequence[NewNotification], now: str, publish_key: str | None = None,
        answer: Callable[[list[int]], str] | None = None,
    ) -> list[int]:
        write = _Write()
        ids = self._add_notifications(write, notes, now)
        if publish_key is not None:
            assert answer is not None
            write.add(
                "INSERT INTO publish_requests (key, answer, created_at) VALUES (?, ?, ?)",
                (publish_key, answer(ids), now),
            )
        await self._write(write)
        return ids

    async def publish_answer(self, key: str) -> str | None:
        rows = await self._fetch("SELECT answer FROM publish_requests WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    async def put_publish_answer(self, key: str, answer: str, now: str) -> None:
        await self._write(_Write().add(
            "INSERT INTO publish_requests (key, answer, created_at) VALUES (?, ?, ?)"
            " ON CONFLICT(key) DO UPDATE SET answer = excluded.answer",
            (key, answer, now),
        ))

    async def release_publish(self, key: str, answer: str) -> None:
        await self._write(_Write().add(
            "DELETE FROM publish_requests WHERE key = ? AND answer = ?", (key, answer)))

    async def claim_publish(self, key: str, answer: str, now: str) -> bool:
        # One daemon per SQLite database, and the service claims a key under its in-flight
        # lock: nothing can store the key between this read and the write.
        if await self.publish_answer(key) is not None:
            return False
        await self.put_publish_answer(key, answer, now)
        return True

    async def notification_page(
        self, user_id: int, before: int | None, limit: int, unread_only: bool
    ) -> tuple[list[NotificationRow], bool]:
        unread = " AND read_at IS NULL" if unread_only else ""
        rows = await self._fetch(
            _NOTIFICATION_SELECT + f" WHERE user_id = ? AND id < ?{unread}"
            " ORDER BY id DESC LIMIT ?",
            (user_id, before or 2**63 - 1, limit + 1),
        )
        return [NotificationRow(*r) for r in rows[:limit]], len(rows) > limit

    async def unread_notifications(self, user_id: int) -> int:
        rows = await self._fetch(
            "SELECT COUNT(*) FROM notifications WHERE user_id = ? AND read_at IS NULL",
            (user_id,),
        )
        return int(rows[0][0])

    async def mark_notifications_read(
        self, user_id: int, ids: Sequence[int] | None, now: str
    ) -> list[int]:
        if ids is None:
            rows = await self._fetch(
                "SELECT id FROM notifications WHERE user_id = ? AND read_at IS NULL"
                " ORDER BY id LIMIT ?",
                (user_id, MAX_ROWS),
            )
        else:
            rows = await self._fetch(
                "SELECT id FROM notifications WHERE user_id = ? AND read_at IS NULL"
                " AND id IN (SELECT value FROM json_each(?)) ORDER BY id",
                (user_id, dumps(list(ids))),
            )
        changed = [r[0] for r in rows]
        if changed:
            await self._write(_Write().add(
                "UPDATE notifications SET read_at = ? WHERE user_id = ? AND read_at IS NULL"
                " AND id IN (SELECT value FROM json_each(?))",
                (now, user_id, dumps(changed)),
            ))
        return changed

    async def prune_notifications(self, max_per_user: int, created_before: str) -> None:
        await self._write(_Write().add(
            "DELETE FROM notifications WHERE created_at < ?", (created_before,)
        ).add(
            # Beyond max_per_user: read ones go first, oldest first (unread rank before read).
            "DELETE FROM notifications WHERE id IN (SELECT id FROM ("
            " SELECT id, ROW_NUMBER() OVER (PARTITION BY user_id"
            "   ORDER BY (read_at IS NULL) DESC, id DESC) AS rank FROM notifications"
            " WHERE user_id IN (SELECT user_id FROM notifications GROUP BY user_id"
            "   HAVING COUNT(*) > ?)) WHERE rank > ?)",
            (max_per_user, max_per_user),
        ).add("DELETE FROM publish_requests WHERE created_at < ?", (created_before,)))


_Job = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]


# Rows a long read hands over from the reader's thread at a time (see _fetch_on).
READ_CHUNK = 100


def _writer_thread(jobs: queue.SimpleQueue[_Job | None]) -> None:
    """Run jobs in order; each result or exception goes back to its future on its loop.
    A plain thread and queue rather than an executor: one hand-off per batch, no extra
    futures (the same shape as aiosqlite's worker)."""
    while (job := jobs.get()) is not None:
        fn, args, future = job
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting task, which decides
            future.get_loop().call_soon_threadsafe(_settle, future, None, exc)
        else:
            future.get_loop().call_soon_threadsafe(_settle, future, result, None)


def _close_all(batch: list[tuple[_Write, asyncio.Future[None]]]) -> None:
    """The writer was cancelled (the store is closing): every caller of the batch is told."""
    for _, future in batch:
        if not future.done():
            future.set_exception(StoreClosed("store closed"))


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():  # the awaiting task was cancelled
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


# Tables in foreign-key order: each references only tables before it.
_PARENTS_FIRST = ("users", "conversations", "conversation_participants", "direct_conversations",
                  "messages", "message_read_receipts", "typing_indicators", "pitches",
                  "pitch_allowed", "pitch_views", "pitch_likes", "pitch_comments",
                  "notifications", "publish_requests")
_INSERT_INTO = re.compile(r"INSERT (?:OR \w+ )?INTO (\w+)")


@functools.lru_cache(maxsize=256)
def _rank_of(sql: str) -> int:
    match = _INSERT_INTO.match(sql)
    if match is None:
        return len(_PARENTS_FIRST) + 1  # not an INSERT: after every INSERT
    table = match.group(1)
    return _PARENTS_FIRST.index(table) if table in _PARENTS_FIRST else len(_PARENTS_FIRST)


def _statement_rank(group: tuple[str, list[Params]]) -> int:
    return _rank_of(group[0])


def _transaction(db: sqlite3.Connection, grouped: list[tuple[str, list[Params]]]) -> None:
    """One transaction on the writer thread: all of a batch's statements, or none of them."""
    db.execute("BEGIN IMMEDIATE")
    try:
        for sql, rows in grouped:
            db.executemany(sql, rows)
        db.execute("COMMIT")
    except BaseException:
        _rollback(db)
        raise


def _rollback(db: sqlite3.Connection) -> None:
    """Roll back what is open. SQLite may have rolled back already (a full disk does), and a
    failing ROLLBACK must not replace the error that says why the transaction failed."""
    if db.in_transaction:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.warning("ROLLBACK failed: %s", exc)


def _savepoint_transaction(
    db: sqlite3.Connection, writes: list[_Write]
) -> list[Exception | None]:
    """One transaction, one savepoint per write: a failing write is rolled back alone.
    Returns each write's error (None when it committed)."""
    errors: list[Exception | None] = []
    db.execute("BEGIN IMMEDIATE")
    try:
        for write in writes:
            db.execute("SAVEPOINT w")
            try:
                for sql, params in sorted(write.statements, key=lambda s: _rank_of(s[0])):
                    db.execute(sql, params)
            except sqlite3.Error as exc:
                db.execute("ROLLBACK TO w")
                errors.append(exc)
            else:
                errors.append(None)
            db.execute("RELEASE w")
        db.execute("COMMIT")
    except BaseException:
        _rollback(db)
        raise
    return errors


# SQLite primary result codes (the low byte of an extended code) that mean the disk or the
# file, not the write: the database cannot take writes right now. (BUSY: another process
# holds the write lock past busy_timeout.)
_SQLITE_BUSY, _SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_FULL, _SQLITE_CANTOPEN = 5, 8, 10, 13, 14
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26
_UNAVAILABLE_CODES = {
    _SQLITE_BUSY: "the database is locked by another process",
    _SQLITE_READONLY: "the database is read-only (file, directory or file system)",
    _SQLITE_IOERR: "disk I/O error",
    _SQLITE_FULL: "the disk is full",
    _SQLITE_CANTOPEN: "the database file cannot be opened",
}


def _primary_code(exc: sqlite3.Error) -> int | None:
    code: int | None = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def _describe(exc: sqlite3.Error) -> str:
    code = _primary_code(exc)
    if code == _SQLITE_NOTADB:
        return "not a SQLite database (random bytes, text, or a damaged header)"
    if code == _SQLITE_CORRUPT:
        return f"the database is damaged ({exc})"
    if code in _UNAVAILABLE_CODES:
        return f"{_UNAVAILABLE_CODES[code]} ({exc})"
    return str(exc)


def _store_error(exc: BaseException) -> StoreError:
    """The store's own error for what sqlite3 raised."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, sqlite3.IntegrityError):
        text = str(exc)
        if "UNIQUE" in text and "request_id" in text:
            return DuplicateRequest(text)
        return ConstraintViolation(text)
    if isinstance(exc, sqlite3.Error):
        code = _primary_code(exc)
        if code in _UNAVAILABLE_CODES:
            return Unavailable(_describe(exc), 1.0 if code == _SQLITE_BUSY else 5.0)
        if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
            return Corrupt(_describe(exc))
    return StoreError(f"{type(exc).__name__}: {exc}")


def _add_receipt_senders(db: sqlite3.Connection) -> None:
    """Version 2's ``message_read_receipts.sender_id`` on a file made before it (version 1,
    or an early version-2 file): the column, filled from ``messages``, and the per-sender index
    of owed read notices replacing the one on ``message_id``. Runs before schema.sql, whose
    index on the column would fail on the old table; checks the columns, not the version."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(message_read_receipts)")}
    if not columns or "sender_id" in columns:
        return  # a new file (schema.sql creates the table), or done already
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("ALTER TABLE message_read_receipts ADD COLUMN sender_id INTEGER")
        db.execute(
            "UPDATE message_read_receipts SET sender_id ="
            " (SELECT m.sender_id FROM messages m WHERE m.id = message_read_receipts.message_id)"
        )
        db.execute("DROP INDEX IF EXISTS receipts_read_unnotified")
        db.execute("COMMIT")
    except BaseException:
        _rollback(db)
        raise


# The first and the last row of each table (min and max of its key): a few pages each, root
# to leaf on both edges, so a health probe reads tens of pages whatever the database's size.
# (PRAGMA quick_check reads every page: seconds on a large file, too slow for a probe.)
_EDGE_KEYS = {"direct_conversations": "user_low, user_high",
              "message_read_receipts": "message_id, user_id",
              "pitch_allowed": "pitch_id, user_id", "pitch_views": "pitch_id, user_id",
              "pitch_likes": "pitch_id, user_id", "publish_requests": "key"}


def _check_pages(db: sqlite3.Connection) -> None:
    """Read each pitchey-ws table's first and last pages; raises sqlite3.DatabaseError
    (corrupt, not a database) when one does not parse."""
    present = {name for (name,) in db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' LIMIT 1000"
    )}
    for table in sorted(_OWN_TABLES & present):
        key = _EDGE_KEYS.get(table, "rowid")
        for order in ("ASC", "DESC"):
            db.execute(f"SELECT * FROM {table} ORDER BY {key} {order} LIMIT 1").fetchall()


def _log_failure(future: asyncio.Future[None]) -> None:
    if future.cancelled():
        return
    exc = future.exception()
    # A failing disk is logged once by the store, not once per background write.
    if exc is not None and not isinstance(exc, Unavailable | Corrupt):
        log.error("background write failed", exc_info=exc)


# The read notices owed to one sender, oldest first: a range of receipts_read_owed.
_OWED_READS = (
    "SELECT r.read_at, r.message_id, m.conversation_id, r.user_id, u.username"
    " FROM message_read_receipts r"
    " JOIN messages m ON m.id = r.message_id"
    " LEFT JOIN users u ON u.id = r.user_id"
    " WHERE r.sender_id = ? AND r.read_at IS NOT NULL AND r.read_notified_at IS NULL"
    " ORDER BY r.read_at, r.message_id LIMIT ?"
)

_MESSAGE_SELECT = (
    "SELECT m.id, m.conversation_id, m.sender_id, su.username, m.content, m.attachments,"
    " m.message_type, m.sent_at, m.is_read"
    " FROM messages m LEFT JOIN users su ON su.id = m.sender_id"
)

# since(): the ids of one conversation's messages in (since, below), one arm per conversation,
# merged by id and cut at limit + 1; and how many conversations one statement covers (3
# parameters each and the LIMIT, under 999).
_SINCE_ARM = (
    "SELECT id FROM messages WHERE conversation_id = ? AND id > ? AND id < ? AND is_deleted = 0"
)
_SINCE_ARMS = 50
# A history page above this many rows is a long read (it waits for a long-read slot).
_SHORT_PAGE = 200


# A user's notifications beyond the newest max_per_user, read ones first and oldest first (the
# order prune_notifications keeps): run after the batch's INSERTs (DELETE ranks after them).
_KEEP_NEWEST_NOTIFICATIONS = (
    "DELETE FROM notifications WHERE id IN (SELECT id FROM notifications WHERE user_id = ?"
    " ORDER BY (read_at IS NULL) DESC, id DESC LIMIT -1 OFFSET ?)"
)
_NOTIFICATION_SELECT = (
    "SELECT id, user_id, type, fields, created_at, read_at FROM notifications"
)
_COMMENT_SELECT = (
    "SELECT c.id, c.pitch_id, c.user_id, u.username, c.content, c.created_at"
    " FROM pitch_comments c LEFT JOIN users u ON u.id = c.user_id"
)


def _message(row: Sequence[Any]) -> MessageRow:
    return MessageRow(
        row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], bool(row[8])
    )


def _pending_message(row: Sequence[Any]) -> PendingMessage:
    return PendingMessage(row[7], _message(row))


def _pending_read(row: Sequence[Any]) -> PendingRead:
    return PendingRead(*row)


def _pending_notification(row: Sequence[Any]) -> PendingNotification:
    return PendingNotification(row[4], NotificationRow(*row))


# -- write builders: pure functions from values to statements -------------------------------

_UPSERT_USER = (
    "INSERT INTO users (id, username, user_type, created_at, updated_at) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT(id) DO UPDATE SET"
    " username = COALESCE(excluded.username, users.username),"
    " user_type = COALESCE(excluded.user_type, users.user_type),"
    " updated_at = excluded.updated_at"
)
_ENSURE_USER = "INSERT OR IGNORE INTO users (id, created_at, updated_at) VALUES (?, ?, ?)"
_INSERT_DIRECT = (
    "INSERT INTO direct_conversations (user_low, user_high, conversation_id) VALUES (?, ?, ?)"
)


def _ensure_users(write: _Write, user_ids: Iterable[int]) -> _Write:
    now = now_iso()
    for user_id in user_ids:
        write.add(_ENSURE_USER, (user_id, now, now))
    return write


def _create_conversation(
    write: _Write,
    conversation_id: int,
    created_by: int,
    members: Sequence[int],
    title: str | None,
    is_group: bool,
    request_id: str | None,
    pitch_id: int | None,
    now: str,
) -> _Write:
    _ensure_users(write, members)
    write.add(
        "INSERT INTO conversations (id, pitch_id, created_by_id, title, is_group, created_at,"
        " updated_at, request_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (conversation_id, pitch_id, created_by, title, int(is_group), now, now, request_id),
    )
    for user_id in dict.fromkeys(members):
        write.add(
            "INSERT INTO conversation_participants (conversation_id, user_id, joined_at)"
            " VALUES (?, ?, ?)",
            (conversation_id, user_id, now),
        )
    return write


def _insert_message(write: _Write, message_id: int, m: NewMessage) -> _Write:
    """The message, one receipt per recipient, and the conversation's last_message_at."""
    write.add(
        "INSERT INTO messages (id, conversation_id, sender_id, receiver_id, pitch_id, subject,"
        " content, message_type, attachments, sent_at, request_id)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            message_id, m.conversation_id, m.sender_id, m.receiver_id, m.pitch_id, m.subject,
            m.content, m.message_type, dumps(m.attachments) if m.attachments else "[]",
            m.sent_at, m.request_id,
        ),
    )
    recipients = m.recipients
    if len(recipients) == 1:
        write.add(
            "INSERT INTO message_read_receipts (message_id, user_id, sender_id) VALUES (?, ?, ?)",
            (message_id, recipients[0], m.sender_id),
        )
    elif recipients:
        # A group's receipts in one statement: one row to bind instead of one per member.
        write.add(
            "INSERT INTO message_read_receipts (message_id, user_id, sender_id)"
            " SELECT ?, value, ? FROM json_each(?)",
            (message_id, m.sender_id, dumps(list(recipients))),
        )
    return write.add(
        "UPDATE conversations SET last_message_at = ?, updated_at = ? WHERE id = ?",
        (m.sent_at, m.sent_at, m.conversation_id),
    )


def read_setting(path: str, key: str) -> str | None:
    """``store.read_setting`` for a SQLite file, opened read-only."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        row = db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
    except sqlite3.Error:
        return None
    finally:
        db.close()
    return row[0] if row else None


# mark_read's and mark_read_many's statements (one text, so they group in a batch). A reader
# without a receipt gets one carrying the message's sender (receipts_read_owed is by sender).
_MARK_RECEIPT_READ = (
    "INSERT INTO message_read_receipts (message_id, user_id, delivered_at, read_at, sender_id)"
    " SELECT ?, ?, ?, ?, sender_id FROM messages WHERE id = ?"
    " ON CONFLICT(message_id, user_id) DO UPDATE SET"
    " read_at = excluded.read_at,"
    " delivered_at = COALESCE(message_read_receipts.delivered_at, excluded.delivered_at)"
    " WHERE message_read_receipts.read_at IS NULL"
)
_MARK_MESSAGE_READ = (
    "UPDATE messages SET is_read = 1, read_at = COALESCE(read_at, ?) WHERE id = ?"
)
