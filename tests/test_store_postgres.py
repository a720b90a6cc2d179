"""The PostgreSQL engine on a real server: a bad write fails alone in its batch, idempotency in
the database, ids visible in increasing order with two engines (two daemons) on one database,
and closing."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import ROOT, pg_query

sys.path.insert(0, str(ROOT))
import store_postgres as engine
from store import ConstraintViolation, DuplicateRequest, NewMessage, StoreClosed

NOW = "2026-11-26T00:00:00.000Z"


def message(conversation_id: int, sender: int, recipients: list[int],
            request_id: str | None = None, content: str = "hi") -> NewMessage:
    return NewMessage(conversation_id, sender, None, recipients, content, "text", [], None, None,
                      request_id, NOW)


@pytest.fixture
async def store(postgres_db: str) -> AsyncIterator[engine.PostgresStore]:
    s = engine.PostgresStore(postgres_db)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def test_a_bad_write_fails_alone(store: engine.PostgresStore) -> None:
    """In one batch: a good message, one to a missing conversation, a repeated requestId."""
    row = await store.create_conversation(10, [10, 20], None, None, None, NOW)
    first = await store.add_message(message(row.id, 10, [20], "r1"))
    before = store.transactions
    results: list[Any] = await asyncio.gather(
        store.add_message(message(row.id, 10, [20], "r2")),
        store.add_message(message(999, 10, [20], "r3")),
        store.add_message(message(row.id, 10, [20], "r1")),
        store.add_message(message(row.id, 10, [20], "r4")),
        return_exceptions=True,
    )
    assert store.transactions == before + 1  # the savepoint retry, one transaction
    assert isinstance(results[1], ConstraintViolation)
    assert isinstance(results[2], DuplicateRequest)
    assert first < results[0] < results[3]
    stored = pg_query(store.url, "SELECT q.request_id FROM ws_message_requests q"
                                 " ORDER BY q.message_id")
    assert stored == [("r1",), ("r2",), ("r4",)]
    assert (await store.message_by_request(10, "r4")).id == results[3]  # type: ignore[union-attr]
    pending = await store.pending(20, 10)
    assert len(pending) == 3


async def test_messages_and_deliveries_share_one_statement(store: engine.PostgresStore) -> None:
    """The send path's batch: new messages (ids ascending in submission order, a group's
    undelivered row per recipient, last_message_at from the batch's last message) and the
    delivery records of earlier ones, committed together as one transaction."""
    pair = await store.create_conversation(10, [10, 20], None, None, None, NOW)
    group = await store.create_conversation(10, [10, 20, 30], "g", None, None, NOW)
    earlier = [await store.add_message(message(pair.id, 10, [20], f"e{i}")) for i in range(3)]
    before = store.transactions
    later = "2026-11-26T00:00:05.000Z"
    sends = [asyncio.create_task(store.add_message(m)) for m in (
        message(pair.id, 10, [20], "n1"),
        message(group.id, 10, [20, 30], None, "to the group"),
        NewMessage(pair.id, 20, None, [10], "last", "text", [], None, None, "n2", later),
    )]
    # Queued before the writer runs (the tasks queue their messages first).
    delivered = store.record_deliveries({earlier[0]: [20], earlier[1]: [20]}, [])
    ids = await asyncio.gather(*sends)
    await delivered
    assert store.transactions == before + 1
    assert list(ids) == sorted(ids) and ids[0] > earlier[-1]
    receipts = pg_query(store.url, "SELECT message_id, user_id FROM message_read_receipts"
                                   " ORDER BY message_id")
    assert receipts == [(earlier[0], 20), (earlier[1], 20)]
    undelivered = pg_query(store.url, "SELECT message_id, user_id FROM ws_undelivered"
                                      " ORDER BY message_id, user_id")
    assert undelivered == [(earlier[2], 20), (ids[0], 20), (ids[1], 20), (ids[1], 30),
                           (ids[2], 10)]
    activity = pg_query(store.url, "SELECT id, last_message_at::text FROM conversations"
                                   " ORDER BY id")
    assert activity == [(pair.id, "2026-11-26 00:00:05"), (group.id, "2026-11-26 00:00:00")]


async def test_a_bad_message_fails_alone_beside_deliveries(store: engine.PostgresStore) -> None:
    """A one-statement batch that fails is run again with a savepoint per write: the delivery
    records and the good message commit, the message to a missing conversation fails."""
    row = await store.create_conversation(10, [10, 20], None, None, None, NOW)
    first = await store.add_message(message(row.id, 10, [20], "r1"))
    before = store.transactions
    sends = [asyncio.create_task(store.add_message(m)) for m in (
        message(999, 10, [20], "bad"), message(row.id, 10, [20], "good"))]
    delivered = store.record_deliveries({first: [20]}, [])
    results: list[Any] = await asyncio.gather(*sends, return_exceptions=True)
    await delivered
    assert store.transactions == before + 1  # the savepoint retry, one transaction
    assert isinstance(results[0], ConstraintViolation)
    assert results[1] > first
    assert pg_query(store.url, "SELECT message_id FROM message_read_receipts") == [(first,)]
    assert pg_query(store.url, "SELECT message_id FROM ws_undelivered") == [(results[1],)]


async def test_ids_visible_in_order_with_two_engines(postgres_db: str) -> None:
    """Two engines (as two daemons) add messages at once; no reader ever sees a gap fill later."""
    a, b = engine.PostgresStore(postgres_db), engine.PostgresStore(postgres_db)
    await a.open()
    await b.open()
    try:
        row = await a.create_conversation(10, [10, 20], None, None, None, NOW)
        snapshots: list[list[int]] = []
        done = asyncio.Event()

        async def watch() -> None:
            while not done.is_set():
                rows = await a._fetch("SELECT id FROM messages ORDER BY id")
                snapshots.append([r[0] for r in rows])
                await asyncio.sleep(0)

        async def send(s: engine.PostgresStore, tag: str) -> None:
            for i in range(30):
                await asyncio.gather(*(s.add_message(message(row.id, 10, [20], f"{tag}{i}.{j}"))
                                       for j in range(5)))

        watcher = asyncio.create_task(watch())
        await asyncio.gather(send(a, "a"), send(b, "b"))
        done.set()
        await watcher
        final = [r[0] for r in pg_query(postgres_db, "SELECT id FROM messages ORDER BY id")]
        assert len(final) == 300
        for seen in snapshots:
            if seen:
                assert seen == [i for i in final if i <= seen[-1]]
    finally:
        await a.close()
        await b.close()


async def test_direct_conversation_once_across_engines(postgres_db: str) -> None:
    """Two engines asking for the same pair's direct conversation get the same one."""
    a, b = engine.PostgresStore(postgres_db), engine.PostgresStore(postgres_db)
    await a.open()
    await b.open()
    try:
        one, two = await asyncio.gather(a.direct_conversation(1, 2, NOW),
                                        b.direct_conversation(2, 1, NOW))
        assert one.id == two.id and one.members == frozenset({1, 2})
    finally:
        await a.close()
        await b.close()


async def test_closed_store_refuses(store: engine.PostgresStore) -> None:
    """After close() every call raises StoreClosed."""
    await store.close()
    with pytest.raises(StoreClosed):
        await store.add_message(message(1, 10, [20]))
    with pytest.raises(StoreClosed):
        await store.message(1)
