"""Per-user costs at database scale: connect, reconnect storm, sync, replay stall, inbox.

    python bench/scale.py [--sizes 10000,100000,1000000] [--quick]

Builds (once, cached under ~/.cache/pitchey-bench/, keyed by schema.sql's hash and the size)
a database of N messages by direct SQLite inserts with the daemon's schema: a fixed set of
subject users whose own data is the same at every size, and filler conversations whose
receipts form a global backlog (30% undelivered, 20% read with the notice owed to the sender).
Each size runs the daemon (pinned like bench/run.py) on a copy. Prints a markdown table and
writes bench/out/scale.json. See docs/benchmarks.md, "Scale".
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import sqlite3
import statistics
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import run  # bench/run.py: processes, pinning, tokens, config
import wsclient

CACHE = Path(os.environ.get("PITCHEY_BENCH_CACHE", Path.home() / ".cache" / "pitchey-bench"))
BUILDER_VERSION = "1"

REPLAY_USERS = list(range(1, 7))  # 1,000 undelivered each (one connect measured per user)
STALL_USER, BYSTANDER = 7, 8  # 1,000 undelivered; a bystander pinging meanwhile
SYNC_BIG, SYNC_SMALL, JOINER = 20, 21, 22  # 100k and 1k history; a join beside the sync
INBOX_USER = 30  # 50 conversations, for the HTTP inbox
SENDER = 100  # sends every subject's messages
STORM_USERS = list(range(1001, 1301))  # 10 undelivered each
FILLER_BASE, FILLER_USERS = 10_000, 5_000
SYNC_CONVERSATIONS = 20
BIG_ENOUGH_FOR_SYNC = 500_000  # the sync subjects (101k messages) only in databases this big

STALL_ALONE_SECONDS = 0.1  # the bystander pinging alone, before the replay

QUEUED = b'{"type":"queued_message"'
PONG = b'{"type":"pong"'
SYNC_COMPLETE = b'{"type":"sync_complete"'
JOINED = b'{"type":"conversation_joined"'
BASE_TIME = datetime(2026, 1, 1, tzinfo=UTC)


def iso(n: int) -> str:
    return (BASE_TIME + timedelta(milliseconds=n)).isoformat(timespec="milliseconds")[:-6] + "Z"


def cache_path(size: int) -> Path:
    digest = hashlib.sha256((run.ROOT / "schema.sql").read_bytes() + BUILDER_VERSION.encode())
    return CACHE / f"scale-{digest.hexdigest()[:12]}-{size}.db"


class Builder:
    """Rows for one database, ids assigned in order."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.conversation = 0
        self.message = 0
        self.last: dict[int, str] = {}

    def users(self, ids: Iterator[int] | list[int]) -> None:
        self.db.executemany(
            "INSERT OR IGNORE INTO users (id, username, created_at, updated_at)"
            " VALUES (?, ?, ?, ?)", ((u, f"bench{u}", iso(0), iso(0)) for u in ids))

    def conversations(self, pairs: list[tuple[int, int]]) -> list[int]:
        ids = list(range(self.conversation + 1, self.conversation + 1 + len(pairs)))
        self.conversation += len(pairs)
        self.db.executemany(
            "INSERT INTO conversations (id, created_by_id, created_at, updated_at)"
            " VALUES (?, ?, ?, ?)",
            ((c, a, iso(0), iso(0)) for c, (a, _) in zip(ids, pairs, strict=True)))
        self.db.executemany(
            "INSERT INTO conversation_participants (conversation_id, user_id, joined_at)"
            " VALUES (?, ?, ?)",
            ((c, u, iso(0)) for c, pair in zip(ids, pairs, strict=True) for u in pair))
        return ids

    def messages(self, rows: list[tuple[int, int, int, str]]) -> None:
        """(conversation, sender, recipient, receipt state) with state one of 'new',
        'delivered', 'owed' (read, notice owed), 'done' (read, notified)."""
        start = self.message + 1
        self.message += len(rows)
        msgs = []
        receipts = []
        for i, (cid, sender, recipient, state) in enumerate(rows, start):
            at = iso(i)
            msgs.append((i, cid, sender, recipient, f"m{i} " + "x" * 40, at))
            self.last[cid] = at
            delivered = None if state == "new" else at
            read = at if state in ("owed", "done") else None
            notified = at if state == "done" else None
            receipts.append((i, recipient, delivered, read, notified, sender))
        self.db.executemany(
            "INSERT INTO messages (id, conversation_id, sender_id, receiver_id, content,"
            " sent_at) VALUES (?, ?, ?, ?, ?, ?)", msgs)
        self.db.executemany(
            "INSERT INTO message_read_receipts (message_id, user_id, delivered_at, read_at,"
            " read_notified_at, sender_id) VALUES (?, ?, ?, ?, ?, ?)", receipts)


def build(size: int, path: Path) -> None:
    """The database of ``size`` messages (subjects included), written to ``path``."""
    sys.path.insert(0, str(run.ROOT))
    from store_sqlite import SCHEMA_VERSION

    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    db = sqlite3.connect(tmp, isolation_level=None)
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.executescript((run.ROOT / "schema.sql").read_text())
    db.execute("BEGIN")
    b = Builder(db)
    subjects = [*REPLAY_USERS, STALL_USER, BYSTANDER, SYNC_BIG, SYNC_SMALL, JOINER, INBOX_USER,
                SENDER, *STORM_USERS]
    b.users(subjects)
    b.users(range(FILLER_BASE, FILLER_BASE + FILLER_USERS))
    for user, count in [*((u, 1000) for u in [*REPLAY_USERS, STALL_USER]),
                        *((u, 10) for u in STORM_USERS)]:
        (cid,) = b.conversations([(SENDER, user)])
        b.messages([(cid, SENDER, user, "new")] * count)
    inbox = b.conversations([(SENDER, INBOX_USER)] + [(f, INBOX_USER) for f in
                            range(FILLER_BASE, FILLER_BASE + 49)])
    for cid in inbox:
        b.messages([(cid, SENDER, INBOX_USER, "delivered")] * 5)
    (joined,) = b.conversations([(SENDER, JOINER)])
    b.messages([(joined, SENDER, JOINER, "done")] * 200)
    if size >= BIG_ENOUGH_FOR_SYNC:
        for user, each in ((SYNC_BIG, 5000), (SYNC_SMALL, 50)):
            cids = b.conversations([(SENDER, user)] * SYNC_CONVERSATIONS)
            for round_ in range(0, each, 500):
                b.messages([(cid, SENDER, user, "done") for cid in cids
                            for _ in range(min(500, each - round_))])
    pairs = [(FILLER_BASE + 2 * i, FILLER_BASE + 2 * i + 1) for i in range(FILLER_USERS // 2)]
    filler = b.conversations(pairs)
    states = ["new"] * 3 + ["owed"] * 2 + ["done"] * 5
    left = size - b.message
    chunk = 50_000
    for start in range(0, max(left, 0), chunk):
        rows = []
        for i in range(start, min(start + chunk, left)):
            k = i % len(filler)
            a, z = pairs[k]
            sender, recipient = (a, z) if i % 2 else (z, a)
            rows.append((filler[k], sender, recipient, states[(i // len(filler)) % 10]))
        b.messages(rows)
    db.executemany("UPDATE conversations SET last_message_at = ?, updated_at = ? WHERE id = ?",
                   ((at, at, cid) for cid, at in b.last.items()))
    db.execute("COMMIT")
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    db.execute("PRAGMA journal_mode=WAL")
    db.close()
    tmp.rename(path)


def database(size: int) -> Path:
    path = cache_path(size)
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        build(size, path)
        run.log(f"built {path} ({size} messages) in {time.perf_counter() - started:.1f}s")
    return path


class Daemon:
    """The daemon (or the checkout in $PITCHEY_BENCH_BASE) on a copy of a scale database."""

    def __init__(self, size: int, target: str) -> None:
        work = run.OUT / "work"
        work.mkdir(parents=True, exist_ok=True)
        self.db = work / f"scale-{target}-{size}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.db}{suffix}").unlink(missing_ok=True)
        shutil.copyfile(database(size), self.db)
        root = run.ROOT if target == "daemon" else Path(os.environ["PITCHEY_BENCH_BASE"])
        config = work / f"scale-{target}-config.toml"
        run.bench_config(config, "FULL", portable=target != "daemon")
        self.port = run.free_port()
        argv = [sys.executable, str(root / "pitchey_ws.py"), "serve", "--config", str(config),
                "--host", run.HOST, "--port", str(self.port), "--db", str(self.db)]
        env = dict(os.environ, JWT_SECRET=run.SECRET)
        self.proc = run.Proc(target, argv, run.OUT / f"scale-{target}-{size}.log",
                             run.SERVER_CORE, env)

    async def ready(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise RuntimeError(f"daemon exited; see {self.proc.log_path}")
            try:
                if (await run.http_get(self.port, "/api/health", 2))[0] == 200:
                    await asyncio.sleep(0.3)
                    return
            except OSError:
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError("daemon not healthy")

    def stop(self) -> None:
        self.proc.stop()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.db}{suffix}").unlink(missing_ok=True)

    async def connect(self, user: int) -> wsclient.Conn:
        return await wsclient.connect(run.HOST, self.port, run.ws_path(user), 60)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


class Counter:
    """Counts frames with a prefix; ``done`` resolves at ``want`` of them."""

    def __init__(self, conn: wsclient.Conn, prefix: bytes, want: int) -> None:
        self.prefix, self.want, self.n = prefix, want, 0
        self.first: float | None = None
        self.done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        conn.handler = self.on_frame

    def on_frame(self, payload: bytes) -> None:
        if payload.startswith(self.prefix):
            self.n += 1
            now = time.perf_counter()
            if self.first is None:
                self.first = now
            if self.n >= self.want and not self.done.done():
                self.done.set_result(now)


async def connect_replay(d: Daemon) -> dict[str, Any]:
    """Connect to `connected`, to the first replayed frame and to the 1,000th, per user."""
    firsts, lasts, opens = [], [], []
    for user in REPLAY_USERS:
        t0 = time.perf_counter()
        conn = wsclient.Conn(run.HOST, d.port, run.ws_path(user))
        count = Counter(conn, QUEUED, 1000)
        conn.handler = count.on_frame
        await asyncio.get_running_loop().create_connection(lambda c=conn: c, run.HOST, d.port)
        await conn.opened
        opens.append(time.perf_counter() - t0)
        end = await asyncio.wait_for(count.done, 60)
        assert count.first is not None
        firsts.append(count.first - t0)
        lasts.append(end - t0)
        conn.abort()
    return {"connected_ms": ms(statistics.median(opens)),
            "first_frame_ms": ms(statistics.median(firsts)),
            "all_1000_ms": ms(statistics.median(lasts)), "users": len(REPLAY_USERS)}


async def storm(d: Daemon) -> dict[str, Any]:
    """300 users connect at once, each replayed 10 undelivered messages."""
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()

    async def one(user: int) -> tuple[float, wsclient.Conn]:
        conn = wsclient.Conn(run.HOST, d.port, run.ws_path(user))
        count = Counter(conn, QUEUED, 10)
        await loop.create_connection(lambda: conn, run.HOST, d.port)
        await conn.opened
        return await asyncio.wait_for(count.done, 120) - t0, conn

    done = await asyncio.gather(*(one(u) for u in STORM_USERS))
    times = sorted(t for t, _ in done)
    for _, conn in done:
        conn.abort()
    return {"users": len(STORM_USERS), "all_ms": ms(times[-1]),
            "p50_ms": ms(times[len(times) // 2])}


async def rtt(conn: wsclient.Conn) -> float:
    t = time.perf_counter()
    conn.send(b'{"type":"ping"}')
    await conn.expect(PONG, 10)
    return time.perf_counter() - t


async def replay_stall(d: Daemon) -> dict[str, Any]:
    """A bystander's ping round trips, alone and while another user's 1,000-frame replay runs."""
    by = await d.connect(BYSTANDER)
    # Alone for longer than a replay takes (20-50 ms): the p50 is the target's base, and the
    # maximum is the reference for the maximum during the replay (this machine's own jitter
    # over a window that long, with no replay).
    alone: list[float] = []
    started = time.perf_counter()
    while (alone_window := time.perf_counter() - started) < STALL_ALONE_SECONDS:
        alone.append(await rtt(by))
    conn = wsclient.Conn(run.HOST, d.port, run.ws_path(STALL_USER))
    count = Counter(conn, QUEUED, 1000)
    during: list[float] = []

    async def pinging() -> None:
        while not count.done.done():
            during.append(await rtt(by))

    started = time.perf_counter()
    await asyncio.get_running_loop().create_connection(lambda: conn, run.HOST, d.port)
    await conn.opened
    pinger = asyncio.create_task(pinging())
    await asyncio.wait_for(count.done, 60)
    await pinger
    window = time.perf_counter() - started
    conn.abort()
    by.abort()
    return {"alone_p50_ms": ms(statistics.median(alone)), "during_max_ms": ms(max(during)),
            "during_p50_ms": ms(statistics.median(during)), "during_pings": len(during),
            "window_ms": ms(window), "alone_max_ms": ms(max(alone)),
            "alone_window_ms": ms(alone_window)}


async def timed(conn: wsclient.Conn, frame: bytes, prefix: bytes) -> float:
    t = time.perf_counter()
    conn.send(frame)
    await conn.expect(prefix, 60)
    return time.perf_counter() - t


async def sync(d: Daemon) -> dict[str, Any]:
    """sync from 0 (a 1,000-message page) for a 1k- and a 100k-history user; a bystander's
    join_conversation alone and sent right after the 100k user's sync (10 times)."""
    sync_frame = b'{"type":"sync","sinceMessageId":0}'
    out: dict[str, Any] = {}
    for name, user in (("small", SYNC_SMALL), ("big", SYNC_BIG)):
        conn = await d.connect(user)
        times = [await timed(conn, sync_frame, SYNC_COMPLETE) for _ in range(5)]
        out[f"sync_{name}_ms"] = ms(statistics.median(times))
        conn.abort()
    joiner = await d.connect(JOINER)
    join = b'{"type":"join_conversation","conversationId":%d}' % await joined_id(d)
    out["join_alone_ms"] = ms(statistics.median([await timed(joiner, join, JOINED)
                                                  for _ in range(20)]))
    syncer = await d.connect(SYNC_BIG)
    beside = []
    for _ in range(10):
        syncer.send(sync_frame)
        beside.append(await timed(joiner, join, JOINED))
        await syncer.expect(SYNC_COMPLETE, 60)
    out["join_during_sync_ms"] = ms(statistics.median(beside))
    for c in (syncer, joiner):
        c.abort()
    return out


async def joined_id(d: Daemon) -> int:
    db = sqlite3.connect(f"file:{d.db}?mode=ro", uri=True)
    try:
        (cid,) = db.execute("SELECT conversation_id FROM conversation_participants"
                            " WHERE user_id = ? LIMIT 1", (JOINER,)).fetchone()
    finally:
        db.close()
    return int(cid)


async def inbox(d: Daemon) -> dict[str, Any]:
    """GET /api/messages/conversations (a page of 20 of 50) for one user, median of 20."""
    times = []
    for _ in range(20):
        reader, writer = await asyncio.open_connection(run.HOST, d.port)
        t = time.perf_counter()
        writer.write(f"GET /api/messages/conversations?limit=20 HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {run.token(INBOX_USER)}\r\n"
                     "Connection: close\r\n\r\n".encode())
        body = await reader.read(-1)
        times.append(time.perf_counter() - t)
        writer.close()
        if not body.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"inbox: {body[:200]!r}")
    return {"inbox_ms": ms(statistics.median(times))}


async def one_size(size: int, target: str) -> dict[str, Any]:
    database(size)
    d = Daemon(size, target)
    try:
        t = time.perf_counter()
        await d.ready()
        res: dict[str, Any] = {"start_s": round(time.perf_counter() - t, 2)}
        res["connect"] = await connect_replay(d)
        res["storm"] = await storm(d)
        res["stall"] = await replay_stall(d)
        res["inbox"] = await inbox(d)
        if size >= BIG_ENOUGH_FOR_SYNC:
            res["sync"] = await sync(d)
        return res
    finally:
        d.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--targets", default="daemon",
                        help="daemon and/or daemon@base ($PITCHEY_BENCH_BASE)")
    parser.add_argument("--build-only", action="store_true")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    if args.build_only:
        for size in sizes:
            database(size)
        return 0
    run.setup_driver()
    results: dict[str, Any] = {}
    for target in args.targets.split(","):
        for size in sizes:
            run.log(f"scale: {target} at {size}")
            results[f"{target}@{size}"] = asyncio.run(one_size(size, target))
            print(json.dumps(results[f"{target}@{size}"]), flush=True)
    run.OUT.mkdir(exist_ok=True)
    (run.OUT / "scale.json").write_text(json.dumps(results, indent=1))
    for target in args.targets.split(","):
        print(report(results, target, sizes))
    return 0


def report(results: dict[str, Any], target: str, sizes: list[int]) -> str:
    """The issue's targets as ratios within this run: the biggest size against the smallest,
    and each bystander against itself alone."""
    small, big = results[f"{target}@{min(sizes)}"], results[f"{target}@{max(sizes)}"]
    rows: list[tuple[str, str, float, float]] = [
        ("connect to first frame, 1,000 undelivered", "<= 1.5",
         big["connect"]["first_frame_ms"], small["connect"]["first_frame_ms"]),
        ("300-user reconnect storm", "<= 1.5", big["storm"]["all_ms"], small["storm"]["all_ms"]),
        ("bystander ping: max during a 1,000-frame replay vs alone", "<= 5",
         big["stall"]["during_max_ms"], big["stall"]["alone_p50_ms"]),
    ]
    if "sync" in big:
        sync = big["sync"]
        rows += [("sync from 0, 100k vs 1k history", "<= 2", sync["sync_big_ms"],
                  sync["sync_small_ms"]),
                 ("join beside the sync vs alone", "< 2", sync["join_during_sync_ms"],
                  sync["join_alone_ms"])]
    lines = [f"\n{target}: sizes {min(sizes):,} and {max(sizes):,}",
             "| target | goal | measured | ratio | met |", "|---|---|---|---|---|"]
    for name, goal, a, b in rows:
        ratio = a / b if b else float("inf")
        bound = float(goal.split()[-1])
        met = ratio <= bound if goal.startswith("<=") else ratio < bound
        verdict = "yes" if met else "no"
        lines.append(f"| {name} | {goal}x | {a} / {b} ms | {ratio:.2f}x | {verdict} |")
    stall = big["stall"]
    if "alone_max_ms" in stall:
        lines.append(f"\nReference for the stall's maximum: the bystander alone for"
                     f" {stall['alone_window_ms']} ms (the replay took {stall['window_ms']} ms)"
                     f" had a worst ping of {stall['alone_max_ms']} ms"
                     f" ({stall['alone_max_ms'] / stall['alone_p50_ms']:.1f}x its p50).")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
