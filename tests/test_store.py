"""store.py's group commit on a real SQLite file: statement order, foreign keys, bad neighbours."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from pathlib import Path

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT))
import store as st

NOW = "2026-11-26T00:00:00.000Z"


def message(write: st.Write, message_id: int, conversation_id: int, sender: int,
            recipients: list[int]) -> st.Write:
    return st.insert_message(write, message_id, conversation_id, sender, None, recipients,
                             f"m{message_id}", "text", [], None, None, None, NOW)


async def test_children_before_parents_in_one_batch(tmp_path: Path) -> None:
    """A batch holding a message before the conversation it belongs to commits whole."""
    store = st.Store(str(tmp_path / "t.db"))
    await store.open()
    try:
        # Queued before the writer runs, so both land in one transaction, child SQL first.
        sent = store.submit(message(st.Write(), 1, 1, 10, [20, 21]))
        made = store.submit(st.create_conversation(st.Write(), 1, 10, [10, 20, 21], "t",
                                                   True, None, None, NOW))
        await asyncio.gather(sent, made)
    finally:
        await store.close()
    db = sqlite3.connect(tmp_path / "t.db")
    assert db.execute("SELECT conversation_id FROM messages").fetchall() == [(1,)]
    receipts = db.execute("SELECT user_id FROM message_read_receipts ORDER BY user_id")
    assert receipts.fetchall() == [(20,), (21,)]
    assert db.execute("PRAGMA foreign_key_check").fetchall() == []


async def test_a_broken_write_fails_alone(tmp_path: Path) -> None:
    """A write breaking a foreign key fails; the writes batched with it still commit."""
    store = st.Store(str(tmp_path / "t.db"))
    await store.open()
    try:
        await store.submit(st.create_conversation(st.Write(), 1, 10, [10, 20], None, False,
                                                  None, None, NOW))
        good = store.submit(message(st.Write(), 1, 1, 10, [20]))
        orphan = store.submit(message(st.Write(), 2, 99, 10, [20]))  # no conversation 99
        also_good = store.submit(message(st.Write(), 3, 1, 20, [10]))
        results = await asyncio.gather(good, orphan, also_good, return_exceptions=True)
    finally:
        await store.close()
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], sqlite3.IntegrityError)
    db = sqlite3.connect(tmp_path / "t.db")
    assert db.execute("SELECT id FROM messages ORDER BY id").fetchall() == [(1,), (3,)]


@pytest.mark.parametrize("sql, rank", [
    ("INSERT OR IGNORE INTO users (id) VALUES (?)", 0),
    ("INSERT INTO message_read_receipts (message_id, user_id) SELECT ?, value FROM json_each(?)",
     4),
    ("INSERT INTO settings (key, value) VALUES (?, ?)", 6),
    ("UPDATE conversations SET last_message_at = ? WHERE id = ?", 7),
])
def test_statement_rank(sql: str, rank: int) -> None:
    """INSERTs rank by table in foreign-key order, other tables after, everything else last."""
    assert st._rank_of(sql) == rank
