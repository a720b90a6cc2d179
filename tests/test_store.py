"""The SQLite engine on a real file: group commit, statement order, bad neighbours, savepoint
retry, direct conversations, closing, and the version-1 migration."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT))
import store_sqlite as engine
from store import ConstraintViolation, DuplicateRequest, NewMessage, StoreClosed, StoreError

NOW = "2026-11-26T00:00:00.000Z"


def message(conversation_id: int, sender: int, recipients: list[int],
            request_id: str | None = None, content: str = "hi") -> NewMessage:
    return NewMessage(conversation_id, sender, None, recipients, content, "text", [], None, None,
                      request_id, NOW)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[engine.SqliteStore]:
    s = engine.SqliteStore(str(tmp_path / "t.db"))
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def test_children_before_parents_in_one_batch(store: engine.SqliteStore) -> None:
    """A batch holding a message before the conversation it belongs to commits whole."""
    # Both queued before the writer runs, so they land in one transaction, child SQL first.
    sent = asyncio.ensure_future(store.add_message(message(1, 10, [20, 21])))
    made = asyncio.ensure_future(
        store.create_conversation(10, [10, 20, 21], "t", None, None, NOW)
    )
    before = store.transactions
    (message_id, row) = await asyncio.gather(sent, made)
    assert store.transactions == before + 1
    assert (message_id, row.id) == (1, 1)
    db = sqlite3.connect(store.path)
    assert db.execute("SELECT conversation_id FROM messages").fetchall() == [(1,)]
    receipts = db.execute("SELECT user_id FROM message_read_receipts ORDER BY user_id")
    assert receipts.fetchall() == [(20,), (21,)]
    assert db.execute("PRAGMA foreign_key_check").fetchall() == []


async def test_a_broken_write_fails_alone(store: engine.SqliteStore) -> None:
    """A write breaking a foreign key fails; the writes batched with it still commit."""
    await store.create_conversation(10, [10, 20], None, None, None, NOW)
    results = await asyncio.gather(
        store.add_message(message(1, 10, [20])),
        store.add_message(message(99, 10, [20])),  # no conversation 99
        store.add_message(message(1, 20, [10])),
        return_exceptions=True,
    )
    assert results[0] == 1 and results[2] == 3
    assert isinstance(results[1], ConstraintViolation)
    db = sqlite3.connect(store.path)
    assert db.execute("SELECT id FROM messages ORDER BY id").fetchall() == [(1,), (3,)]


async def test_failed_batch_is_retried_as_one_transaction(store: engine.SqliteStore) -> None:
    """One repeated requestId in a batch of 200 costs one retry transaction, not 200."""
    row = await store.create_conversation(10, [10, 20], None, None, None, NOW)
    await store.add_message(message(row.id, 10, [20], request_id="dup"))
    before = store.transactions
    writes = [store.add_message(message(row.id, 10, [20], request_id=f"r{i}"))
              for i in range(199)]
    writes.insert(100, store.add_message(message(row.id, 10, [20], request_id="dup")))
    results = await asyncio.gather(*writes, return_exceptions=True)
    assert store.transactions == before + 1
    assert isinstance(results[100], DuplicateRequest)
    stored = [r for r in results if isinstance(r, int)]
    assert len(stored) == 199 and stored == sorted(stored)
    db = sqlite3.connect(store.path)
    assert db.execute("SELECT COUNT(*) FROM messages").fetchone() == (200,)
    assert db.execute("SELECT COUNT(*) FROM message_read_receipts").fetchone() == (200,)


async def test_writes_after_close_raise(tmp_path: Path) -> None:
    """Every write or read after close() raises StoreClosed instead of hanging."""
    store = engine.SqliteStore(str(tmp_path / "t.db"))
    await store.open()
    await store.close()
    with pytest.raises(StoreClosed):
        await asyncio.wait_for(store.put_setting("k", "v"), 5)
    with pytest.raises(StoreClosed):
        await asyncio.wait_for(store.record_deliveries({1: [2]}, []), 5)
    with pytest.raises(StoreClosed):
        await store.setting("k")


async def test_direct_conversation_is_one_per_pair(store: engine.SqliteStore) -> None:
    """Concurrent get-or-create of one pair, either way round, gives one conversation."""
    rows = await asyncio.gather(*(store.direct_conversation(*pair, NOW)
                                  for pair in [(1, 2), (2, 1)] * 10))
    assert {r.id for r in rows} == {rows[0].id}
    assert rows[0].members == frozenset({1, 2}) and not rows[0].is_group
    db = sqlite3.connect(store.path)
    assert db.execute("SELECT COUNT(*) FROM conversations").fetchone() == (1,)


async def test_direct_conversation_skips_titled_and_pitch_threads(
    store: engine.SqliteStore,
) -> None:
    """A titled or pitch-linked 1:1 is its own thread; a plain 1:1 becomes the direct one."""
    titled = await store.create_conversation(1, [1, 2], "About the pitch", None, None, NOW)
    pitched = await store.create_conversation(1, [1, 2], None, None, 7, NOW)
    direct = await store.direct_conversation(2, 1, NOW)
    assert direct.id not in (titled.id, pitched.id)
    plain = await store.create_conversation(3, [3, 4], None, None, None, NOW)
    assert (await store.direct_conversation(4, 3, NOW)).id == plain.id


async def test_version_1_database_is_migrated(tmp_path: Path) -> None:
    """A version-1 file gains direct_conversations, filled with each pair's oldest plain 1:1."""
    path = tmp_path / "v1.db"
    db = sqlite3.connect(path)
    schema = (ROOT / "schema.sql").read_text()
    db.executescript(schema.replace("CREATE TABLE IF NOT EXISTS direct_conversations",
                                    "CREATE TABLE IF NOT EXISTS unused_v2"))
    db.execute("DROP TABLE unused_v2")
    db.executescript(
        "INSERT INTO users (id, created_at, updated_at) VALUES (1, 'x', 'x'), (2, 'x', 'x');"
        "INSERT INTO conversations (id, created_by_id, title, is_group, created_at, updated_at)"
        " VALUES (1, 1, 'titled', 0, 'x', 'x'), (2, 1, NULL, 0, 'x', 'x'),"
        " (3, 2, NULL, 0, 'x', 'x');"
        "INSERT INTO conversation_participants (conversation_id, user_id, joined_at) VALUES"
        " (1, 1, 'x'), (1, 2, 'x'), (2, 1, 'x'), (2, 2, 'x'), (3, 1, 'x'), (3, 2, 'x');"
        "PRAGMA user_version = 1;"
    )
    db.close()
    store = engine.SqliteStore(str(path))
    await store.open()
    try:
        assert (await store.direct_conversation(1, 2, NOW)).id == 2
    finally:
        await store.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone() == (3,)


@pytest.mark.parametrize("sql, rank", [
    ("INSERT OR IGNORE INTO users (id) VALUES (?)", 0),
    ("INSERT INTO direct_conversations (user_low, user_high, conversation_id) VALUES (?, ?, ?)",
     3),
    ("INSERT INTO message_read_receipts (message_id, user_id) SELECT ?, value FROM json_each(?)",
     5),
    ("INSERT INTO pitch_views (pitch_id, user_id, viewed_at) VALUES (?, ?, ?)", 9),
    ("INSERT INTO settings (key, value) VALUES (?, ?)", 14),
    ("UPDATE conversations SET last_message_at = ? WHERE id = ?", 15),
])
def test_statement_rank(sql: str, rank: int) -> None:
    """INSERTs rank by table in foreign-key order, other tables after, everything else last."""
    assert engine._rank_of(sql) == rank


async def test_replay_and_unread_queries_use_the_unread_index(store: engine.SqliteStore) -> None:
    """The offline replay walks receipts_unread by (user, undelivered) in message order: no
    scan of other users' receipts, no temporary sort."""
    assert store._reader is not None
    plan = await store._reader.execute_fetchall(
        "EXPLAIN QUERY PLAN SELECT r.message_id FROM message_read_receipts r"
        " WHERE r.user_id = ? AND (r.delivered_at IS NULL) = 1 AND r.read_at IS NULL"
        " ORDER BY r.message_id LIMIT ?", (1, 10),
    )
    details = " ".join(row[3] for row in plan)
    assert "USING INDEX receipts_unread (user_id=? AND <expr>=?)" in details, details
    assert "TEMP B-TREE" not in details, details


async def test_close_finishes_when_the_last_writes_fail(tmp_path: Path) -> None:
    """close() with the database deleted underneath: the queued write fails, and both
    connections and the writer thread are still closed (nothing keeps the process alive)."""
    store = engine.SqliteStore(str(tmp_path / "t.db"))
    await store.open()
    await store.put_setting("k", "v")
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{store.path}{suffix}")
    late = asyncio.ensure_future(store.put_setting("k", "w"))
    await asyncio.wait_for(store.close(), 10)
    with pytest.raises(StoreError):
        await late
    assert store._reader is None and store._writer is None
    assert not store._thread.is_alive()
