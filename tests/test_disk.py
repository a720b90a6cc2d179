"""A failing disk under the real daemon: full, read-only, deleted, replaced, corrupted, and
startup on files that are not a usable database.

Faults are real (a 1 MiB tmpfs filled to the last byte, an ext4 loop file system forced
read-only, files unlinked or renamed under the daemon, garbage written over pages); a test
whose fault cannot be made on this machine skips and says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    ROOT,
    SECRET,
    TIMEOUT,
    Client,
    Connector,
    Daemon,
    conversation,
    eventually,
    make_token,
)
from test_http_api import call


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a disk that really fills up."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = _run("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt))
    if done.returncode != 0:
        reason = f"cannot mount a 1 MiB tmpfs here: {done.stderr.strip()}"
        print(reason)
        pytest.skip(reason)
    yield mnt
    _run("umount", "-l", str(mnt))


@pytest.fixture
def ext4_fs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """An ext4 loop file system mounted errors=remount-ro, and its trigger_fs_error switch."""
    image, mnt = tmp_path / "ext4.img", tmp_path / "ext4"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    steps = [("mkfs.ext4", "-q", "-F", str(image)),
             ("mount", "-o", "loop,errors=remount-ro", str(image), str(mnt))]
    for step in steps:
        if shutil.which(step[0]) is None:
            pytest.skip(f"{step[0]} not found")
        done = _run(*step)
        if done.returncode != 0:
            reason = f"{' '.join(step[:2])} failed here: {done.stderr.strip()}"
            print(reason)
            pytest.skip(reason)
    device = _run("findmnt", "-n", "-o", "SOURCE", str(mnt)).stdout.strip()
    trigger = Path("/sys/fs/ext4") / Path(device).name / "trigger_fs_error"
    try:
        if not trigger.exists():
            reason = f"{trigger} is missing: cannot force ext4 read-only here"
            print(reason)
            pytest.skip(reason)
        yield mnt, trigger
    finally:
        _run("umount", "-l", str(mnt))


def fill(directory: Path) -> Path:
    """Write a file until the file system is full; return it (delete it to free the space)."""
    path = directory / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):  # ENOSPC is the point
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    return path


def scribble(db: Path) -> None:
    """Garbage over every page of ``db`` but the first (the header and schema)."""
    size = db.stat().st_size
    with open(db, "r+b") as f:
        f.seek(4096)
        f.write(os.urandom(size - 4096))


def health(daemon: Daemon) -> tuple[int, dict[str, Any]]:
    status, _, body = daemon.get("/api/health")
    return status, json.loads(body)


async def unhealthy(daemon: Daemon) -> str:
    """Wait until health says 503 unhealthy; return its reason."""
    _, body = await eventually(lambda: (r := health(daemon))[0] == 503 and r)
    assert body["status"] == "unhealthy"
    return str(body["reason"])


async def reply(client: Client, request_id: str) -> dict[str, Any]:
    """The message_sent or error answering ``request_id``; other frames are kept."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            for i, frame in enumerate(client.seen):
                if (frame.get("type") in ("message_sent", "error")
                        and frame.get("requestId") == request_id):
                    return client.seen.pop(i)
            client.seen.append(json.loads(await client.ws.recv()))


async def send(client: Client, conversation_id: int, request_id: str) -> dict[str, Any]:
    await client.send({"type": "send_message", "conversationId": conversation_id,
                       "content": f"body of {request_id}", "requestId": request_id})
    return await reply(client, request_id)


def assert_unavailable(frame: dict[str, Any]) -> None:
    assert frame["type"] == "error", frame
    assert frame["code"] == "unavailable", frame
    assert isinstance(frame["retryAfterMs"], int) and frame["retryAfterMs"] > 0, frame


def stored_requests(db: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return {r for (r,) in conn.execute("SELECT request_id FROM messages"
                                           " WHERE request_id IS NOT NULL")}


async def chat(daemon: Daemon) -> tuple[Connector, Client, int]:
    connect = Connector(daemon)
    alice = await connect()
    bob = await connect()
    return connect, alice, await conversation(alice, bob.user_id)


@contextlib.contextmanager
def started(tmp_path: Path, db_dir: Path) -> Iterator[Daemon]:
    """A daemon whose database is in ``db_dir``; killed at the end if a stop failed."""
    daemon = Daemon(tmp_path)
    daemon.db = db_dir / "pitchey.db"
    daemon.start()
    try:
        yield daemon
    finally:
        if daemon.proc is not None:
            daemon.proc.kill()
            daemon.proc.wait()


async def test_disk_full_answers_unavailable_and_recovers(tmp_path: Path, small_fs: Path) -> None:
    """A full disk: sends answer unavailable and store nothing, health is 503 with the reason;
    once space is freed health is 200 again and sends are acknowledged (and kept)."""
    with started(tmp_path, small_fs) as daemon:
        connect, alice, cid = await chat(daemon)
        try:
            assert (await send(alice, cid, "before"))["type"] == "message_sent"
            filler = fill(small_fs)
            refused = [f"full-{i}" for i in range(10)]
            for request_id in refused:
                assert_unavailable(await send(alice, cid, request_id))
            assert "full" in await unhealthy(daemon)
            filler.unlink()
            await eventually(lambda: health(daemon)[0] == 200)
            assert (await send(alice, cid, "after"))["type"] == "message_sent"
        finally:
            await connect.close_all()
            assert daemon.stop() == 0
        assert stored_requests(daemon.db) == {"before", "after"}
        assert daemon.log_text().count("CANNOT TAKE WRITES") == 1


async def test_read_only_file_system_answers_unavailable(
    tmp_path: Path, ext4_fs: tuple[Path, Path]
) -> None:
    """The file system goes read-only under the daemon (ext4 errors=remount-ro): sends answer
    unavailable, nothing is acknowledged, health is 503."""
    mnt, trigger = ext4_fs
    with started(tmp_path, mnt) as daemon:
        connect, alice, cid = await chat(daemon)
        try:
            assert (await send(alice, cid, "before"))["type"] == "message_sent"
            trigger.write_text("pitchey-ws test: force read-only\n")
            for i in range(5):
                assert_unavailable(await send(alice, cid, f"ro-{i}"))
            await unhealthy(daemon)
        finally:
            await connect.close_all()
            daemon.stop()
        assert stored_requests(daemon.db) == {"before"}


async def test_deleted_database_acknowledges_nothing(tmp_path: Path) -> None:
    """The database, its WAL and shm unlinked under the daemon: 20 sends all answer
    unavailable (none message_sent), health says deleted, one ERROR line; after a restart
    none of them is in the database."""
    with started(tmp_path, tmp_path) as daemon:
        connect, alice, cid = await chat(daemon)
        try:
            assert (await send(alice, cid, "before"))["type"] == "message_sent"
            for suffix in ("", "-wal", "-shm"):
                os.unlink(f"{daemon.db}{suffix}")
            answers = [await send(alice, cid, f"gone-{i}") for i in range(20)]
            assert [a["type"] for a in answers] == ["error"] * 20, answers
            for answer in answers:
                assert_unavailable(answer)
            assert "deleted" in await unhealthy(daemon)
            assert daemon.log_text().count("CANNOT TAKE WRITES") == 1
            # The HTTP door says the same: 503 unavailable with Retry-After, nothing stored.
            status, headers, body = await asyncio.to_thread(
                call, daemon.port, "POST", "/api/messages/send",
                {"conversationId": cid, "content": "over http", "requestId": "gone-http"},
                token=make_token(alice.user_id),
            )
            assert (status, body["error"]) == (503, "unavailable"), body
            assert int(headers["retry-after"]) >= 1
        finally:
            await connect.close_all()
        await daemon.arestart()
        gone = {f"gone-{i}" for i in range(20)} | {"gone-http"}
        assert stored_requests(daemon.db) & gone == set()
        daemon.stop()


async def test_deleted_wal_alone_is_noticed(tmp_path: Path) -> None:
    """Only the WAL unlinked (commits would land in a file gone at restart): unavailable."""
    with started(tmp_path, tmp_path) as daemon:
        connect, alice, cid = await chat(daemon)
        try:
            os.unlink(f"{daemon.db}-wal")
            assert_unavailable(await send(alice, cid, "wal-gone"))
            assert "deleted" in await unhealthy(daemon)
        finally:
            await connect.close_all()
            daemon.stop()


async def test_replaced_database_answers_unavailable(tmp_path: Path) -> None:
    """Another file renamed over the database: sends answer unavailable, health says
    replaced, and the file put in its place is left as it was."""
    with started(tmp_path, tmp_path) as daemon:
        connect, alice, cid = await chat(daemon)
        other = tmp_path / "other.db"
        with contextlib.closing(sqlite3.connect(other)) as conn:
            conn.execute("CREATE TABLE keep (x)")
            conn.commit()
        try:
            os.replace(other, daemon.db)
            assert_unavailable(await send(alice, cid, "replaced"))
            assert "replaced" in await unhealthy(daemon)
        finally:
            await connect.close_all()
            daemon.stop()
        with contextlib.closing(sqlite3.connect(daemon.db)) as conn:
            tables = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        assert tables == [("keep",)]


async def test_corrupted_pages_make_health_unhealthy(tmp_path: Path) -> None:
    """Garbage over the database's pages (after a checkpoint) under the running daemon:
    health is 503 and says the database is damaged."""
    with started(tmp_path, tmp_path) as daemon:
        connect, alice, cid = await chat(daemon)
        try:
            for i in range(20):
                assert (await send(alice, cid, f"c-{i}"))["type"] == "message_sent"
            assert health(daemon)[0] == 200
            with contextlib.closing(sqlite3.connect(daemon.db)) as conn:
                busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            assert busy == 0
            scribble(daemon.db)
            assert "damaged" in await unhealthy(daemon)
        finally:
            await connect.close_all()
            daemon.stop()


def _serve(db: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PITCHEY_WS_")}
    return subprocess.run(
        [sys.executable, str(ROOT / "pitchey_ws.py"), "serve", "--port", "0", "--db", str(db)],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
        env={**env, "JWT_SECRET": SECRET},
    )


def _pitchey_db(path: Path) -> None:
    """A real pitchey-ws database with some rows, closed cleanly."""
    sys.path.insert(0, str(ROOT))
    import store_sqlite
    from store import NewMessage

    async def make() -> None:
        store = store_sqlite.SqliteStore(str(path))
        await store.open()
        try:
            row = await store.create_conversation(1, [1, 2], None, None, None, "x")
            for i in range(50):
                await store.add_message(NewMessage(row.id, 1, 2, [2], "m" * 200, "text", [],
                                                   None, None, f"r{i}", "x"))
        finally:
            await store.close()

    asyncio.run(make())


def _bad(kind: str, tmp_path: Path) -> tuple[Path, str]:
    """A path that is not a usable database, and a word the refusal must contain."""
    db = tmp_path / "bad.db"
    match kind:
        case "random":
            db.write_bytes(os.urandom(20_000))
            return db, "not a SQLite database"
        case "text":
            db.write_text("name,email\nada,ada@example.com\n")
            return db, "not a SQLite database"
        case "truncated":
            _pitchey_db(db)
            with open(db, "r+b") as f:
                f.truncate(3 * 4096)
            return db, "damaged"
        case "newer":
            with contextlib.closing(sqlite3.connect(db)) as conn:
                conn.execute("PRAGMA user_version = 99")
            return db, "newer"
        case "directory":
            db.mkdir()
            return db, "directory"
        case "no-parent":
            return tmp_path / "missing" / "bad.db", "does not exist"
        case "foreign":
            with contextlib.closing(sqlite3.connect(db)) as conn:
                conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
                conn.commit()
            return db, "another program"
        case "immutable":
            db.touch()
            done = _run("chattr", "+i", str(db))
            if done.returncode != 0:
                reason = f"chattr +i not supported here: {done.stderr.strip()}"
                print(reason)
                pytest.skip(reason)
            return db, "Operation not permitted"
        case "unreadable":
            if os.geteuid() == 0:
                reason = "running as root: file permissions do not stop root"
                print(reason)
                pytest.skip(reason)
            db.touch()
            db.chmod(0)
            return db, "Permission denied"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["random", "text", "truncated", "newer", "directory",
                                  "no-parent", "foreign", "immutable", "unreadable"])
def test_unusable_database_refused_at_startup(kind: str, tmp_path: Path) -> None:
    """serve on a file that is not a usable database: exit 2, one line naming the file and
    the reason, no traceback, and the file left as it was."""
    db, reason = _bad(kind, tmp_path)
    before = db.read_bytes() if db.is_file() else None
    try:
        done = _serve(db, tmp_path)
    finally:
        if kind == "immutable":
            _run("chattr", "-i", str(db))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert str(db) in lines[0] and reason in lines[0], lines[0]
    if before is not None:
        assert db.read_bytes() == before
