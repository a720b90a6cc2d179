"""Reference (b) for the benchmark: the storage limit, with no network and no event loop.

One process, one ``sqlite3`` connection, the daemon's ``schema.sql`` and write PRAGMAs (WAL, the
given ``synchronous``, foreign keys on, checked statement by statement as in the daemon: parent
rows first), inserting messages in batched transactions (``executemany`` per statement, one
COMMIT per batch) for a fixed time. Three modes:

* ``minimal``: per message, the message row and one receipt row per recipient;
* ``daemon``: the statements the daemon runs per message: also ``conversations.last_message_at``,
  a group's receipt rows inserted by one statement over a JSON array of the recipients
  (``json_each``), and every receipt's ``delivered_at``, set by one UPDATE per message over the
  same array (a single-row INSERT and UPDATE for one recipient), committed with the next batch as
  the daemon's delivery marks ride in the next group commit;
* ``per-row``: as ``daemon``, but a group's receipts are inserted one ``executemany`` row per
  recipient (what the daemon did before it inserted them set-wise).

Prints one JSON object. ``python bench/sqlite_ref.py --db X --batch 64 --seconds 3``
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

INSERT_MESSAGE = (
    "INSERT INTO messages (id, conversation_id, sender_id, receiver_id, pitch_id, subject,"
    " content, message_type, attachments, sent_at, request_id)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_RECEIPT = "INSERT INTO message_read_receipts (message_id, user_id) VALUES (?, ?)"
TOUCH_CONVERSATION = "UPDATE conversations SET last_message_at = ?, updated_at = ? WHERE id = ?"
INSERT_RECEIPTS_SETWISE = (
    "INSERT INTO message_read_receipts (message_id, user_id) SELECT ?, value FROM json_each(?)"
)
MARK_DELIVERED_SETWISE = (
    "UPDATE message_read_receipts SET delivered_at = ? WHERE message_id = ?"
    " AND delivered_at IS NULL AND user_id IN (SELECT value FROM json_each(?))"
)
MARK_DELIVERED = (
    "UPDATE message_read_receipts SET delivered_at = ?"
    " WHERE message_id = ? AND user_id = ? AND delivered_at IS NULL"
)


def now_iso() -> str:
    moment = datetime.now(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def run(db_path: str, synchronous: str, batch: int, seconds: float, recipients: int,
        mode: str, content_chars: int) -> dict[str, object]:
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.execute("PRAGMA foreign_keys=ON")
    db.executescript((ROOT / "schema.sql").read_text())
    now = now_iso()
    users = list(range(1, recipients + 2))
    db.execute("BEGIN")
    db.executemany("INSERT OR IGNORE INTO users (id, created_at, updated_at) VALUES (?, ?, ?)",
                   [(u, now, now) for u in users])
    db.execute("INSERT OR IGNORE INTO conversations (id, created_by_id, is_group, created_at,"
               " updated_at) VALUES (1, 1, ?, ?, ?)", (int(recipients > 1), now, now))
    db.executemany("INSERT OR IGNORE INTO conversation_participants (conversation_id, user_id,"
                   " joined_at) VALUES (1, ?, ?)", [(u, now) for u in users])
    db.execute("COMMIT")
    (start_id,) = db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM messages").fetchone()
    sender, others = users[0], users[1:]
    receiver = others[0] if len(others) == 1 else None
    content = "x" * content_chars
    next_id = start_id
    owed: list[tuple[str, int, int]] = []  # delivery marks for the next batch (daemon mode)
    owed_sets: list[tuple[str, int, str]] = []  # the same, one UPDATE per message
    users = json.dumps(others)
    transactions = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    deadline = t0 + seconds
    while time.perf_counter() < deadline:
        now = now_iso()
        ids = range(next_id, next_id + batch)
        next_id += batch
        db.execute("BEGIN IMMEDIATE")
        db.executemany(INSERT_MESSAGE, [
            (i, 1, sender, receiver, None, None, content, "text", "[]", now, f"r{i}") for i in ids
        ])
        if mode == "daemon" and len(others) > 1:
            db.executemany(INSERT_RECEIPTS_SETWISE, [(i, users) for i in ids])
        else:
            db.executemany(INSERT_RECEIPT, [(i, u) for i in ids for u in others])
        if mode != "minimal":
            db.executemany(TOUCH_CONVERSATION, [(now, now, 1) for _ in ids])
            if owed:
                db.executemany(MARK_DELIVERED, owed)
            if owed_sets:
                db.executemany(MARK_DELIVERED_SETWISE, owed_sets)
            if len(others) == 1:
                owed = [(now, i, others[0]) for i in ids]
            else:
                owed_sets = [(now, i, users) for i in ids]
        db.execute("COMMIT")
        transactions += 1
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    db.close()
    messages = next_id - start_id
    return {
        "mode": mode,
        "batch": batch,
        "recipients": recipients,
        "synchronous": synchronous,
        "messages": messages,
        "transactions": transactions,
        "seconds": round(elapsed, 3),
        "messages_per_s": round(messages / elapsed, 1),
        "receipts_per_s": round(messages * recipients / elapsed, 1),
        "cpu": round(cpu / elapsed, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--synchronous", default="FULL")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--recipients", type=int, default=1)
    parser.add_argument("--mode", choices=("minimal", "daemon", "per-row"), default="minimal")
    parser.add_argument("--content-chars", type=int, default=64)
    args = parser.parse_args()
    print(json.dumps(run(args.db, args.synchronous.upper(), args.batch, args.seconds,
                         args.recipients, args.mode, args.content_chars)))


if __name__ == "__main__":
    main()
