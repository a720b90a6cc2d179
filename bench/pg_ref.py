"""Reference (c) for the benchmark: PostgreSQL's storage limit through asyncpg, no WebSocket.

The PostgreSQL engine's own tables (created by opening ``store_postgres.PostgresStore`` once on a
fresh database), one asyncpg connection, messages inserted in batched transactions for a fixed
time. Two modes:

* ``minimal``: per batch, one transaction with ``executemany`` of the message rows and of one
  undelivered row per message (``ws_undelivered``), ids from the messages sequence;
* ``daemon``: what the engine does per batch on the send path: also the id lock
  (``pg_advisory_xact_lock``) that keeps ids visible in order across daemons, a request-id row per
  message (``ws_message_requests``) and the conversation's ``last_message_at``.

Prints one JSON object. ``python bench/pg_ref.py --url postgresql://... --batch 50 --seconds 3``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import store_postgres  # noqa: E402

NOW = "2026-12-01T00:00:00.000Z"


async def setup(url: str) -> int:
    """The engine's schema, two users and their conversation; its id."""
    store = store_postgres.PostgresStore(url)
    await store.open()
    try:
        row = await store.create_conversation(1, [1, 2], None, None, None, NOW)
    finally:
        await store.close()
    return row.id


async def run(
    url: str, batch: int, seconds: float, mode: str, content_chars: int
) -> dict[str, object]:
    conversation = await setup(url)
    db = await asyncpg.connect(url)
    content = "x" * content_chars
    stored = 0
    transactions = 0
    started = time.perf_counter()
    deadline = started + seconds
    try:
        while time.perf_counter() < deadline:
            async with db.transaction():
                if mode == "daemon":
                    await db.execute("SELECT pg_advisory_xact_lock($1)", store_postgres._ID_LOCK)
                ids = [r[0] for r in await db.fetch(
                    "SELECT nextval('messages_id_seq'::regclass) FROM generate_series(1, $1)",
                    batch)]
                await db.executemany(
                    "INSERT INTO messages (id, conversation_id, sender_id, receiver_id, content,"
                    " message_type, attachments, sent_at, is_read, is_edited, is_deleted)"
                    " VALUES ($1, $2, 1, 2, $3, 'text', '[]', now(), false, false, false)",
                    [(i, conversation, content) for i in ids],
                )
                await db.executemany(
                    "INSERT INTO ws_undelivered (user_id, message_id) VALUES (2, $1)",
                    [(i,) for i in ids],
                )
                if mode == "daemon":
                    await db.executemany(
                        "INSERT INTO ws_message_requests (sender_id, request_id, message_id)"
                        " VALUES (1, $1, $2)",
                        [(f"r{i}", i) for i in ids],
                    )
                    await db.execute(
                        "UPDATE conversations SET last_message_at = now(), updated_at = now()"
                        " WHERE id = $1", conversation,
                    )
            stored += batch
            transactions += 1
    finally:
        await db.close()
    elapsed = time.perf_counter() - started
    return {
        "mode": mode, "batch": batch, "recipients": 1, "seconds": round(elapsed, 3),
        "messages": stored, "transactions": transactions,
        "messages_per_s": round(stored / elapsed, 1),
        "mean_commit_ms": round(1000 * elapsed / max(transactions, 1), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="a fresh PostgreSQL database")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--mode", choices=("minimal", "daemon"), default="daemon")
    parser.add_argument("--content-chars", type=int, default=100)
    args = parser.parse_args()
    result = asyncio.run(run(args.url, args.batch, args.seconds, args.mode, args.content_chars))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
