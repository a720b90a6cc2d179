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


async def test_direct_conversation_is_the_pairs_first_one_to_one(
    store: engine.SqliteStore,
) -> None:
    """The pair's first 1:1, titled, about a pitch or plain, is their direct conversation;
    one made before 1:1s were all recorded is found by its participants."""
    titled = await store.create_conversation(1, [1, 2], "About the pitch", None, None, NOW)
    await store.create_conversation(1, [1, 2], None, None, 7, NOW)
    assert (await store.direct_conversation(2, 1, NOW)).id == titled.id
    pitched = await store.create_conversation(3, [3, 4], None, None, 7, NOW)
    assert (await store.direct_conversation(4, 3, NOW)).id == pitched.id
    group = await store.create_conversation(5, [5, 6, 7], None, None, None, NOW)
    old = await store.create_conversation(5, [5, 6], "Before", None, None, NOW)
    db = sqlite3.connect(store.path)
    db.execute("DELETE FROM direct_conversations WHERE conversation_id = ?", (old.id,))
    db.commit()
    db.close()
    assert await store.find_direct(6, 5) == old.id != group.id
    assert await store.find_direct(5, 7) is None  # only a group of the two and another


async def test_a_one_to_one_made_at_once_with_the_direct_one(
    store: engine.SqliteStore,
) -> None:
    """create_conversation of two users and the same pair's first recipientId send at the
    same moment: both succeed, and the send uses the pair's direct conversation, whichever
    committed first (the one that lost the race used to fail on the pair's key)."""
    for pair in range(10):
        a, b = 100 + 2 * pair, 101 + 2 * pair
        made, direct = await asyncio.gather(
            store.create_conversation(a, [a, b], "About the pitch", None, None, NOW),
            store.direct_conversation(b, a, NOW),
        )
        assert await store.find_direct(a, b) == direct.id
        assert direct.members == made.members == frozenset({a, b})


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
    plan = await store._fetch(
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
    assert store._readers == [] and store._writer is None
    assert not store._thread.is_alive()


async def plan_of(store: engine.SqliteStore, sql: str, params: tuple[object, ...]) -> str:
    return " | ".join(row[3] for row in await store._fetch("EXPLAIN QUERY PLAN " + sql, params))


async def test_owed_read_notices_start_from_the_sender(store: engine.SqliteStore) -> None:
    """A connect's read notices are a range of receipts_read_owed for that sender, already in
    replay order: no walk of the notices owed to other senders, no temporary sort."""
    details = await plan_of(store, engine._OWED_READS, (1, 10))
    assert "USING INDEX receipts_read_owed (sender_id=?" in details, details
    assert "TEMP B-TREE" not in details, details


async def test_sync_scans_each_conversation_by_id(store: engine.SqliteStore) -> None:
    """sync's statement is one bounded range of messages_conversation per conversation,
    merged in index order (so the merge stops at the LIMIT): no read of the user's whole
    history, no temporary sort."""
    sql = " UNION ALL ".join([engine._SINCE_ARM] * 3) + " ORDER BY 1 LIMIT ?"
    details = await plan_of(store, sql, (*(1, 0, 99) * 3, 10))
    ranges = "USING INDEX messages_conversation (conversation_id=? AND id>? AND id<?)"
    assert details.count(ranges) == 3, details
    assert "MERGE (UNION ALL)" in details, details
    assert "TEMP B-TREE" not in details, details


async def test_sync_merges_conversations_in_id_order(store: engine.SqliteStore) -> None:
    """since() over several conversations returns the lowest ids after ``since``, in order,
    cut at the limit, and says whether more exist; left conversations are not included."""
    a = await store.create_conversation(1, [1, 2], None, None, None, NOW)
    b = await store.create_conversation(1, [1, 3], None, None, None, NOW)
    c = await store.create_conversation(4, [4, 5], None, None, None, NOW)
    order = [a.id, b.id, c.id, b.id, a.id, a.id, b.id]
    ids = [await store.add_message(message(cid, 4 if cid == c.id else 1,
                                           [5 if cid == c.id else 2]))
           for cid in order]
    mine = [i for i, cid in zip(ids, order, strict=True) if cid != c.id]
    rows, more = await store.since(1, 0, 4)
    assert [r.id for r in rows] == mine[:4] and more
    rows, more = await store.since(1, mine[1], 100)
    assert [r.id for r in rows] == mine[2:] and not more


async def test_sync_over_more_conversations_than_one_statement(
    store: engine.SqliteStore,
) -> None:
    """A user in more conversations than one statement's arms (engine._SINCE_ARMS) still gets
    the lowest ids after ``since`` across all of them, in order, and an honest ``more``."""
    count = engine._SINCE_ARMS * 2 + 7
    conversations = [(await store.create_conversation(1, [1, 2 + i], None, None, None, NOW)).id
                     for i in range(count)]
    # Three rounds over the conversations from the last to the first: the lowest ids are in
    # the conversations that the last statement reads.
    order = [cid for _ in range(3) for cid in reversed(conversations)]
    ids = await asyncio.gather(*(store.add_message(message(cid, 1, [2])) for cid in order))
    everything = sorted(ids)
    rows, more = await store.since(1, 0, count + 5)
    assert [r.id for r in rows] == everything[: count + 5] and more
    rows, more = await store.since(2 + count - 1, 0, 10)  # a user of one conversation
    assert [r.id for r in rows] == sorted(i for i, c in zip(ids, order, strict=True)
                                          if c == conversations[-1]) and not more
    rows, more = await store.since(1, everything[-4], 10)
    assert [r.id for r in rows] == everything[-3:] and not more


async def test_history_and_pending_use_their_indexes(store: engine.SqliteStore) -> None:
    """A history page is a range of messages_conversation read backwards; no temporary sort."""
    sql = (engine._MESSAGE_SELECT + " WHERE m.conversation_id = ? AND m.id < ?"
           " AND m.is_deleted = 0 ORDER BY m.id DESC LIMIT ?")
    details = await plan_of(store, sql, (1, 99, 10))
    assert "USING INDEX messages_conversation (conversation_id=? AND id<?)" in details, details
    assert "TEMP B-TREE" not in details, details


async def test_conversation_list_starts_from_the_user(store: engine.SqliteStore) -> None:
    """The inbox reads the user's participant rows (participants_user), each conversation by
    key; its sort covers only that user's conversations (no scan of conversations)."""
    activity = "COALESCE(c.last_message_at, c.created_at)"
    sql = ("SELECT c.id FROM conversation_participants p JOIN conversations c"
           " ON c.id = p.conversation_id WHERE p.user_id = ? AND p.is_active = 1"
           f" AND ({activity} < ? OR ({activity} = ? AND c.id < ?))"
           f" ORDER BY {activity} DESC, c.id DESC LIMIT ?")
    details = await plan_of(store, sql, (1, "z", "z", 9, 10))
    assert "SEARCH p USING INDEX participants_user (user_id=?)" in details, details
    assert "SEARCH c USING INTEGER PRIMARY KEY" in details, details
    assert "SCAN c" not in details, details


async def test_read_notices_owed_by_sender(store: engine.SqliteStore) -> None:
    """A read is owed to the message's sender (also for a reader that had no receipt), and
    only to that sender."""
    row = await store.create_conversation(1, [1, 2, 3], "g", None, None, NOW)
    first = await store.add_message(message(row.id, 1, [2, 3]))
    second = await store.add_message(message(row.id, 2, [1, 3]))
    await store.mark_read(first, 2, NOW)
    await store.mark_read(second, 3, NOW)
    await store.save_profile(4, None, None)
    await store.mark_read(second, 4, NOW)  # no receipt before: one is made, with the sender
    owed_1 = [(e.message_id, e.reader_id) for e in await store.pending(1, 10)
              if isinstance(e, engine.PendingRead)]
    owed_2 = [(e.message_id, e.reader_id) for e in await store.pending(2, 10)
              if isinstance(e, engine.PendingRead)]
    assert owed_1 == [(first, 2)] and sorted(owed_2) == [(second, 3), (second, 4)]


async def test_reads_run_side_by_side(store: engine.SqliteStore) -> None:
    """A read holding one connection does not stop another read from running."""
    async with store._reading(long=True):
        assert await asyncio.wait_for(store.setting("missing"), 5) is None


async def test_version_1_receipts_get_their_sender(tmp_path: Path) -> None:
    """A version-1 file's receipts gain sender_id from their message, and its owed read
    notices are found by sender after the migration."""
    path = tmp_path / "v1.db"
    db = sqlite3.connect(path)
    schema = (ROOT / "schema.sql").read_text()
    schema = schema.replace("    sender_id        INTEGER,\n", "")
    schema = schema[: schema.index("CREATE INDEX IF NOT EXISTS receipts_read_owed")]
    db.executescript(schema)
    db.executescript(
        "CREATE INDEX receipts_read_unnotified ON message_read_receipts(message_id)"
        " WHERE read_at IS NOT NULL AND read_notified_at IS NULL;"
        "INSERT INTO users (id, created_at, updated_at) VALUES (1, 'x', 'x'), (2, 'x', 'x');"
        "INSERT INTO conversations (id, created_by_id, created_at, updated_at)"
        " VALUES (1, 1, 'x', 'x');"
        "INSERT INTO messages (id, conversation_id, sender_id, content, sent_at)"
        " VALUES (1, 1, 1, 'hi', 'x');"
        "INSERT INTO message_read_receipts (message_id, user_id, delivered_at, read_at)"
        " VALUES (1, 2, 'x', 'y');"
        "PRAGMA user_version = 1;"
    )
    db.close()
    store = engine.SqliteStore(str(path))
    await store.open()
    try:
        owed = [e for e in await store.pending(1, 10) if isinstance(e, engine.PendingRead)]
        assert [(e.message_id, e.reader_id) for e in owed] == [(1, 2)]
    finally:
        await store.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT sender_id FROM message_read_receipts").fetchall() == [(1,)]
    indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "receipts_read_owed" in indexes and "receipts_read_unnotified" not in indexes


async def test_pending_orders_by_queue_time_when_ids_disagree(
    store: engine.SqliteStore,
) -> None:
    """The replay's order is oldest queued first (store.pending_order) even when a later id
    carries an earlier time (a backend publish with its own timestamp, another daemon's
    clock): the fast path that skips the sort for messages in id order must notice."""
    await store.create_conversation(10, [10, 20], None, None, None, NOW)
    late, early = "2026-11-26T00:00:02.000Z", "2026-11-26T00:00:01.000Z"
    first = await store.add_message(
        NewMessage(1, 10, None, [20], "late", "text", [], None, None, None, late))
    second = await store.add_message(
        NewMessage(1, 10, None, [20], "early", "text", [], None, None, None, early))
    assert first < second
    pending = await store.pending(20, 10)
    assert [(e.queued_at, e.message.id) for e in pending  # type: ignore[union-attr]
            ] == [(early, second), (late, first)]
    # In id order when the times agree: no reordering.
    third = await store.add_message(
        NewMessage(1, 10, None, [20], "later", "text", [], None, None, None, late))
    assert [e.message.id for e in await store.pending(20, 10)  # type: ignore[union-attr]
            ] == [second, first, third]


async def test_long_reads_cross_chunk_boundaries(store: engine.SqliteStore) -> None:
    """pending and since hand rows over READ_CHUNK at a time: every row arrives, in order,
    and the limit still holds."""
    await store.create_conversation(10, [10, 20], None, None, None, NOW)
    count = engine.READ_CHUNK * 2 + 7
    ids = [await store.add_message(message(1, 10, [20])) for _ in range(count)]
    pending = await store.pending(20, count + 10)
    assert [e.message.id for e in pending] == ids  # type: ignore[union-attr]
    assert len(await store.pending(20, engine.READ_CHUNK + 1)) == engine.READ_CHUNK + 1
    rows, has_more = await store.since(20, 0, count - 1)
    assert [r.id for r in rows] == ids[:-1] and has_more
