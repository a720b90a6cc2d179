"""Test harness: the real daemon in a subprocess, real WebSocket clients, the real database.

Every wait is on an event (a frame, a health answer, a process exit) bounded by a timeout
scaled by PITCHEY_TEST_TIMEOUT_SCALE, never a fixed sleep used to synchronise.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

# Real PostgreSQL, Redis and nginx servers for the tests that need them (tests/servers.py).
pytest_plugins = ["servers"]

ENGINES = ("sqlite", "postgresql")
# Modules that start no daemon, or test what only the SQLite engine has (its file, its
# pages, its writer thread, `token --db FILE`): they run once, on SQLite.
SQLITE_ONLY = frozenset({
    "test_store",  # store_sqlite.SqliteStore itself
    "test_disk",  # a failing disk under the SQLite file
    "test_cli",  # `token --db FILE` reads the SQLite file
    "test_lifecycle",  # unusable database files at startup
    "test_protocol", "test_servers", "test_service", "test_errors", "test_config",
    "test_backplane",
    "test_browser", "test_js_client", "test_proxy", "test_smoke",
    # Browser clients of the HTTP API and the hooks: what they test is the client and the
    # routes, the same on either engine (and each run costs a Chromium).
    "test_react", "test_browser_api",
    "test_descriptors",  # starts its own process with a descriptor limit, on SQLite
    "test_uvloop",  # the event loop, not the engine
})

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-" + "0123456789abcdef" * 4
SCALE = float(os.environ.get("PITCHEY_TEST_TIMEOUT_SCALE", "1"))
TIMEOUT = 5 * SCALE

_user_ids = itertools.count(1000)
_request_ids = itertools.count(1)


# Modules about one engine's own features.
ONE_ENGINE = {"test_pitchey_schema": "postgresql", "test_store_postgres": "postgresql",
              "test_multinode": "postgresql"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--engines", default=os.environ.get("PITCHEY_TEST_ENGINES", ",".join(ENGINES)),
        help="store engines the daemon tests run against (comma-separated; default: %(default)s)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every daemon test runs once per engine (module-scoped, so a module's shared daemon is
    started once per engine)."""
    if "engine" not in metafunc.fixturenames:
        return
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    wanted = [e.strip() for e in metafunc.config.getoption("engines").split(",") if e.strip()]
    for name in wanted:
        if name not in ENGINES:
            raise pytest.UsageError(f"--engines: unknown engine {name!r} (one of {ENGINES})")
    if module in ONE_ENGINE:
        engines = [ONE_ENGINE[module]]
    else:
        engines = ["sqlite"] if module in SQLITE_ONLY else wanted
    metafunc.parametrize("engine", engines, indirect=True, scope="module")


@pytest.fixture(scope="module", autouse=True)
def engine(request: pytest.FixtureRequest) -> Iterator[str]:
    """The engine of the daemons this module's tests start (Daemon reads it): "sqlite", or
    "postgresql" on the session's PostgreSQL server with a fresh database per daemon."""
    name: str = getattr(request, "param", "sqlite")
    if name == "postgresql":
        Daemon.postgres = request.getfixturevalue("postgres_server")  # skips when it can't
    Daemon.engine = name
    try:
        yield name
    finally:
        Daemon.engine = "sqlite"
        Daemon.postgres = None


def new_user() -> int:
    """A user id no other test uses, so tests can share one daemon."""
    return next(_user_ids)


def make_token(
    user_id: int | None,
    *,
    username: str | None = None,
    exp: float | None = 3600,
    secret: str = SECRET,
    algorithm: str = "HS256",
    **claims: Any,
) -> str:
    payload: dict[str, Any] = dict(claims)
    if user_id is not None:
        payload["userId"] = user_id
    if username is not None:
        payload["username"] = username
    if exp is not None:
        payload["exp"] = int(time.time() + exp)
    return jwt.encode(payload, secret, algorithm=algorithm)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)


def write_config(path: Path, overrides: dict[str, Any]) -> None:
    """``overrides`` maps "section.key" to a value."""
    sections: dict[str, list[str]] = {}
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        sections.setdefault(section, []).append(f"{key} = {toml_value(value)}")
    text = "".join(f"[{s}]\n" + "\n".join(lines) + "\n\n" for s, lines in sections.items())
    path.write_text(text)


# The PostgreSQL engine's names for SQLite tables the Pitchey schema has no table for (the
# same columns, as far as tests read them).
PG_TABLES = {"notifications": "ws_notifications", "pitch_comments": "ws_pitch_comments",
             "pitch_likes": "ws_pitch_likes", "publish_requests": "ws_publish_requests"}


class Daemon:
    """One pitchey-ws process on a free port with its own database and config.

    On the PostgreSQL engine (the ``engine`` fixture sets the class's ``engine``) each daemon
    gets a fresh database of the session's server, named by ``database.url`` in its config,
    and ``query`` runs its SQL there."""

    engine = "sqlite"
    postgres: Any = None  # the session's servers.PostgresServer, on the PostgreSQL engine

    def __init__(self, tmp: Path, overrides: dict[str, Any] | None = None,
                 database_url: str | None = None) -> None:
        self.tmp = tmp
        self.db = tmp / "pitchey.db"
        self.config = tmp / "config.toml"
        self.log = tmp / "daemon.log"
        self.port = free_port()
        self.database_url = database_url
        if self.database_url is None and self.engine == "postgresql":
            self.database_url = self.postgres.create_database()
        # Pinned now: the class's engine changes when the next module's engine starts.
        self.engine = "postgresql" if self.database_url is not None else "sqlite"
        defaults: dict[str, Any] = {"presence.offline_grace_seconds": 0,
                                    "server.log_level": "DEBUG"}
        if self.database_url is not None:
            defaults["database.url"] = self.database_url
        write_config(self.config, {**defaults, **(overrides or {})})
        self.proc: subprocess.Popen[bytes] | None = None
        # How the daemon is started (a test may run it under another event loop).
        self.launcher: list[str] = [sys.executable, str(ROOT / "pitchey_ws.py")]

    @property
    def postgresql(self) -> bool:
        return self.engine == "postgresql"

    def table(self, name: str) -> str:
        """``name`` (a table of schema.sql) as this daemon's engine calls it."""
        return PG_TABLES.get(name, name) if self.postgresql else name

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/messages/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *extra: str, env: dict[str, str] | None = None) -> None:
        # The daemon reads PITCHEY_WS_* as configuration: none leaks in from the caller.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("PITCHEY_WS_")}
        environ = {**inherited, "JWT_SECRET": SECRET, **(env or {})}
        if self.database_url is not None:
            # Also in the environment: tests rewrite the config file between starts.
            environ.setdefault("PITCHEY_WS_DATABASE_URL", self.database_url)
        log = open(self.log, "ab")  # noqa: SIM115 - handed to the child, closed on stop
        self.proc = subprocess.Popen(
            [*self.launcher, "serve", "--config", str(self.config),
             "--host", "127.0.0.1", "--port", str(self.port),
             *(() if self.postgresql else ("--db", str(self.db))), *extra],
            stdout=log, stderr=log, env=environ, cwd=self.tmp,
        )
        log.close()
        try:
            self.wait_healthy()
        except BaseException:
            # Not left running when it never became healthy (a fixture's teardown may not run).
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
            raise

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + 10 * SCALE
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.log_text()}")
            try:
                with urllib.request.urlopen(self.http + "/api/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            # Polling the health endpoint is the readiness event; the interval only paces it.
            time.sleep(0.02)
        raise RuntimeError(f"daemon not healthy in time:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout * SCALE)
        self.proc = None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    async def arestart(self) -> None:
        """restart() off the event loop, so this process's clients can answer the close."""
        await asyncio.to_thread(self.restart)

    async def astop(self, sig: int = signal.SIGTERM) -> int:
        """stop() off the event loop, so this process's clients can answer the close."""
        return await asyncio.to_thread(self.stop, sig)

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Read the daemon's database (WAL lets us read while it runs). On PostgreSQL the
        same SQL, its ``?`` numbered, through asyncpg; booleans compare equal to SQLite's 0
        and 1, and timestamps come back in the wire format, as SQLite stores them."""
        if self.database_url is not None:
            return pg_query(self.database_url, sql, params)
        db = sqlite3.connect(self.db, timeout=5)
        try:
            return db.execute(sql, params).fetchall()
        finally:
            db.close()

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        try:
            with urllib.request.urlopen(self.http + path, timeout=5 * SCALE) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()


def pg_query(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on a PostgreSQL database from sync code (also inside a running
    loop: on a thread of its own) and return its rows as tuples."""
    import asyncpg

    numbered = iter(range(1, 1000))
    text = re.sub(r"\?", lambda _: f"${next(numbered)}", sql)

    def value(v: Any) -> Any:
        if isinstance(v, datetime):
            return v.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        return v

    async def run() -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            return [tuple(value(v) for v in r) for r in await conn.fetch(text, *params)]
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result()


class Client:
    """A test WebSocket client that reads frames into a buffer and waits for a wanted one."""

    def __init__(self, ws: ClientConnection, user_id: int) -> None:
        self.ws = ws
        self.user_id = user_id
        self.seen: list[dict[str, Any]] = []  # frames read but not yet taken by expect()

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        if self.seen:
            return self.seen.pop(0)
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        frame: dict[str, Any] = json.loads(raw)
        return frame

    async def expect(self, kind: str, timeout: float = TIMEOUT, **match: Any) -> dict[str, Any]:
        """The first frame of type ``kind`` whose fields equal ``match``; others are kept."""
        for i, frame in enumerate(self.seen):
            if frame.get("type") == kind and all(frame.get(k) == v for k, v in match.items()):
                return self.seen.pop(i)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError(f"no {kind} {match} within {timeout}s; saw {self.seen}")
            try:
                raw = await asyncio.wait_for(self.ws.recv(), left)
            except TimeoutError:
                message = f"no {kind} {match} within {timeout}s; saw {self.seen}"
                raise TimeoutError(message) from None
            frame = json.loads(raw)
            if frame.get("type") == kind and all(frame.get(k) == v for k, v in match.items()):
                return frame  # type: ignore[no-any-return]
            self.seen.append(frame)

    async def request(self, frame: dict[str, Any], reply: str, **match: Any) -> dict[str, Any]:
        await self.send(frame)
        return await self.expect(reply, **match)

    async def absent(self, kind: str) -> None:
        """Assert that no frame of ``kind`` was written to this client before now.

        A barrier, not a wait: the server writes a connection's frames in order and fans out
        synchronously, so once the frame that could have caused ``kind`` was acknowledged on
        its own socket, the pong of a ping sent now comes after any such frame.
        """
        self.seen = [f for f in self.seen if f.get("type") != "pong"]
        await self.send({"type": "ping"})
        await self.expect("pong")
        unexpected = [f for f in self.seen if f.get("type") == kind]
        assert not unexpected, f"unexpected {kind}: {unexpected}"

    async def quiet(self, kind: str, within: float = 0.3 * SCALE) -> None:
        """Assert that no frame of ``kind`` arrives within ``within`` seconds.

        Only for what a timer could cause (presence grace, typing TTL), where waiting out a
        window is the only way to observe absence; elsewhere use ``absent``.
        """
        with contextlib.suppress(TimeoutError):
            frame = await self.expect(kind, timeout=within)
            raise AssertionError(f"unexpected {kind}: {frame}")

    async def closed(self, timeout: float = TIMEOUT) -> int | None:
        """Wait for the server to close the connection; return the close code."""
        with contextlib.suppress(ConnectionClosed):
            async with asyncio.timeout(timeout):
                while True:
                    await self.ws.recv()
        return self.ws.close_code

    async def close(self) -> None:
        await self.ws.close()


class Connector:
    """Opens authenticated clients against one daemon and closes them after the test."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.clients: list[Client] = []

    async def __call__(
        self, user_id: int | None = None, *, username: str | None = None,
        token: str | None = None, wait_connected: bool = True, **kwargs: Any,
    ) -> Client:
        uid = user_id if user_id is not None else new_user()
        tok = token or make_token(uid, username=username or f"user{uid}")
        ws = await connect(f"{self.daemon.url}?token={tok}", open_timeout=TIMEOUT, **kwargs)
        client = Client(ws, uid)
        self.clients.append(client)
        if wait_connected:
            await client.expect("connected")
        return client

    async def close_all(self) -> None:
        for client in self.clients:
            with contextlib.suppress(Exception):
                await client.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, engine: str) -> Iterator[Daemon]:
    """A daemon shared by the tests of one module (tests use distinct user ids), one per
    engine."""
    d = Daemon(tmp_path_factory.mktemp("daemon"))
    d.start()
    yield d
    if d.proc is not None:
        d.stop()


@pytest.fixture
def fresh_daemon(tmp_path: Path, engine: str) -> Iterator[Daemon]:
    """A daemon of this test alone, not started: set overrides, then call start()."""
    d = Daemon(tmp_path)
    yield d
    if d.proc is not None:
        with contextlib.suppress(Exception):
            d.stop()


@pytest.fixture
async def connect_to(daemon: Daemon) -> AsyncIterator[Connector]:
    connector = Connector(daemon)
    yield connector
    await connector.close_all()


async def conversation(creator: Client, *others: int) -> int:
    """Create a conversation between creator and others; return its id."""
    request_id = f"conv-{next(_request_ids)}"
    reply = await creator.request(
        {"type": "create_conversation", "participantIds": list(others), "requestId": request_id},
        "conversation_created",
        requestId=request_id,
    )
    return int(reply["conversationId"])


@contextlib.asynccontextmanager
async def running(tmp: Path, overrides: dict[str, Any]) -> AsyncIterator[Connector]:
    """A daemon of one test with these config overrides, and a connector bound to it."""
    daemon = Daemon(tmp, overrides)
    daemon.start()
    connect = Connector(daemon)
    try:
        yield connect
    finally:
        await connect.close_all()
        if daemon.proc is not None:
            daemon.stop()


async def eventually(check: Any, timeout: float = TIMEOUT) -> Any:
    """Call ``check`` until it returns something truthy (rows the daemon writes later)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (result := check()):
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.02)  # paces the polling; the condition is what we wait on
    return result


async def eventually_db(daemon: Daemon, sql: str, params: tuple[Any, ...], want: Any) -> None:
    """Re-read the database until ``sql`` returns ``want`` (background writes commit later)."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    rows = daemon.query(sql, params)
    while rows != want:
        assert asyncio.get_running_loop().time() < deadline, f"{sql} gave {rows}, want {want}"
        await asyncio.sleep(0.02)  # paces the polling; the condition is what we wait on
        rows = daemon.query(sql, params)


def now_iso() -> str:
    """The current time in the wire format, for comparing with server timestamps."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


async def replay_then_sync(
    client: Client, skip: Any = lambda frame: False
) -> tuple[list[dict[str, Any]], list[int]]:
    """The queued_message frames replayed on connect, then the ids of a sync from 0 to the end.

    The replay is written before the server reads any frame, so everything before the pong of
    a ping is replay. Frames for which ``skip(frame)`` is true are passed over; any other frame
    must be a queued_message.
    """
    await client.send({"type": "ping"})
    replayed: list[dict[str, Any]] = []
    while (frame := await client.recv())["type"] != "pong":
        if not skip(frame):
            assert frame["type"] == "queued_message", frame
            replayed.append(frame)
    synced: list[int] = []
    since = 0
    while True:
        await client.send({"type": "sync", "sinceMessageId": since})
        while (frame := await client.recv())["type"] != "sync_complete":
            if not skip(frame):
                assert frame["type"] == "queued_message", frame
                synced.append(frame["messageId"])
        if not frame["hasMore"]:
            return replayed, synced
        assert frame["lastMessageId"] > since
        since = frame["lastMessageId"]
