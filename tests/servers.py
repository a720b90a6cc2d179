"""Real PostgreSQL, Redis and nginx servers for tests: temporary directories, free loopback ports.

Each server is a child process of the test run, on a directory of its own that is removed when
it is cleaned up. Fixtures stop them after the tests (finalizers), and an ``atexit`` hook stops
whatever is still running when the interpreter exits, so a failing or interrupted test leaves
no server behind (short of the test process itself being killed with SIGKILL).

Readiness is an event: PostgreSQL is ready when ``psql`` runs ``SELECT 1`` against it, Redis
when it answers ``PING`` with ``PONG``. Polling is bounded by a timeout scaled like the rest of
the suite (PITCHEY_TEST_TIMEOUT_SCALE).

A fixture skips, with the reason, when the binary is missing or the server cannot start. With
PITCHEY_REQUIRE_SERVERS=1 (set by .ci/run, which installs the servers) it fails instead.

Use the fixtures from a test module with ``pytest_plugins = ["servers"]``, or for the whole
suite with the same line in tests/conftest.py:

- ``postgres_server`` (session): a started :class:`PostgresServer`.
- ``postgres_db`` (function): the URL of a fresh, empty database, dropped after the test.
- ``redis_server`` (function): the session's :class:`RedisServer`, running and flushed.
- ``fresh_redis_server`` (function): a :class:`RedisServer` of this test alone.

:class:`NginxServer` runs deploy/nginx.conf in front of a daemon; tests/test_proxy.py has
its fixture, since it needs the daemon of tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import glob
import itertools
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

SCALE = float(os.environ.get("PITCHEY_TEST_TIMEOUT_SCALE", "1"))
START_TIMEOUT = 30 * SCALE
STOP_TIMEOUT = 10 * SCALE
REQUIRE = os.environ.get("PITCHEY_REQUIRE_SERVERS", "") not in ("", "0")

_database_ids = itertools.count(1)


class ServerUnavailable(Exception):
    """The server's binary is missing or it would not start; the message says which."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 20) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# Every server started and not yet cleaned up, for the atexit hook.
_live: set[_Server] = set()


def _stop_all() -> None:
    # Gracefully first (PostgreSQL then reaps its own backends); stop() escalates to SIGKILL.
    for server in list(_live):
        with contextlib.suppress(Exception):
            server.cleanup()


atexit.register(_stop_all)


class _Server:
    """A child process in its own session (so a kill reaches its children) and a temp dir."""

    name = "server"

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"pitchey-{self.name}-"))
        self.log = self.dir / f"{self.name}.log"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        _live.add(self)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _spawn(self, argv: list[str], **kwargs: object) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(  # type: ignore[call-overload]
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, **kwargs,
            )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise ServerUnavailable(f"{self.name} exited {code}:\n{_tail(self.log)}")
            if self.ready():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise ServerUnavailable(
                    f"{self.name} not ready within {START_TIMEOUT:.0f}s:\n{_tail(self.log)}"
                )
            # Each probe is a real connection; the interval only paces them.
            time.sleep(0.05)

    def ready(self) -> bool:
        raise NotImplementedError

    def _signal(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Stop the server (gracefully by default) and wait for it; the directory stays."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._signal(sig)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(STOP_TIMEOUT)
        # Children of the session (PostgreSQL backends) go with the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing is flushed, the directory stays."""
        self.stop(signal.SIGKILL)

    def cleanup(self, graceful: bool = True) -> None:
        """Stop the server and remove its directory."""
        try:
            if graceful:
                self.stop()
            else:
                self.kill()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            _live.discard(self)


# -- PostgreSQL ------------------------------------------------------------------------------


def postgres_bin_dir() -> Path:
    """The directory of initdb/postgres/psql: PITCHEY_PG_BIN, then PATH, then Debian's newest."""
    if env := os.environ.get("PITCHEY_PG_BIN"):
        return Path(env)  # checked for initdb, postgres and psql by PostgresServer
    if found := shutil.which("initdb"):
        return Path(found).resolve().parent  # Debian-style symlinks lead to the real dir

    def version(path: str) -> tuple[int, ...]:
        number = Path(path).parent.parent.name
        return tuple(int(n) for n in re.findall(r"\d+", number))

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    if not candidates:
        raise ServerUnavailable(
            "not installed: no initdb on PATH or in /usr/lib/postgresql/*/bin "
            "(apt-get install postgresql, or set PITCHEY_PG_BIN)"
        )
    return Path(candidates[-1]).parent


def _unprivileged_user() -> pwd.struct_passwd | None:
    """As root, the user to run PostgreSQL as (it refuses root); None when not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise ServerUnavailable("running as root and neither a postgres nor a nobody user exists")


class PostgresServer(_Server):
    """``postgres`` on 127.0.0.1 only, trust auth, its socket and data in a temp dir."""

    name = "postgres"

    def __init__(self) -> None:
        self.bin = postgres_bin_dir()
        for tool in ("initdb", "postgres", "psql"):
            if not (self.bin / tool).exists():
                raise ServerUnavailable(f"{self.bin / tool} is missing")
        self.user = _unprivileged_user()
        super().__init__()
        self.data = self.dir / "data"
        if self.user is not None:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self.initialised = False

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    dsn = url

    def url_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _as_user(self) -> dict[str, object]:
        """Popen arguments that run a server binary as the unprivileged user (when root)."""
        env = {**os.environ, "LC_ALL": "C"}
        kwargs: dict[str, object] = {"cwd": self.dir, "env": env}
        if self.user is not None:
            env["HOME"] = str(self.dir)
            kwargs.update(user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[])
        return kwargs

    def _initdb(self) -> None:
        with open(self.log, "ab") as log:
            done = subprocess.run(  # type: ignore[call-overload]
                [str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                 "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, timeout=START_TIMEOUT,
                check=False, **self._as_user(),
            )
        if done.returncode != 0:
            raise ServerUnavailable(f"initdb exited {done.returncode}:\n{_tail(self.log)}")
        self.initialised = True

    def start(self) -> None:
        """Start (initialising the data directory the first time) and wait until it answers."""
        if self.running:
            return
        if not self.initialised:
            self._initdb()
        self._spawn(
            [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.dir}",
             "-c", "max_connections=50", "-c", "log_min_messages=warning"],
            **self._as_user(),
        )
        self._wait_ready()

    def stop(self, sig: int = signal.SIGINT) -> int | None:
        """SIGINT is PostgreSQL's fast shutdown: it disconnects clients, then exits."""
        return super().stop(sig)

    def psql(self, sql: str, database: str = "postgres", timeout: float = 10) -> str:
        done = subprocess.run(
            [str(self.bin / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", database,
             "-c", sql],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout * SCALE,
            env={**os.environ, "PGCONNECT_TIMEOUT": "2", "LC_ALL": "C"}, check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"psql {sql!r} exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout.strip()

    def ready(self) -> bool:
        try:
            return self.psql("SELECT 1", timeout=5) == "1"
        except (RuntimeError, subprocess.TimeoutExpired):
            return False

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database and return its URL."""
        name = name or f"test_{os.getpid()}_{next(_database_ids)}"
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"database name {name!r}: lowercase letters, digits, _ only")
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- Redis -----------------------------------------------------------------------------------


def redis_binary() -> str:
    """PITCHEY_REDIS_SERVER, else redis-server on PATH, else Debian's /usr/bin/redis-server."""
    if env := os.environ.get("PITCHEY_REDIS_SERVER"):
        if not os.access(env, os.X_OK):
            raise ServerUnavailable(f"PITCHEY_REDIS_SERVER={env} is not an executable")
        return env
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
    )
    if found is None:
        raise ServerUnavailable(
            "not installed: no redis-server on PATH (apt-get install redis-server)"
        )
    return found


class RedisServer(_Server):
    """``redis-server`` on 127.0.0.1 only, no persistence, its dir a temp dir.

    ``stop()`` then ``start()`` brings it back on the same port (empty: nothing is saved).
    """

    name = "redis"

    def __init__(self) -> None:
        self.binary = redis_binary()
        super().__init__()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if self.running:
            return
        self._spawn(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no",
             "--logfile", ""],
            cwd=self.dir,
        )
        self._wait_ready()

    def command(self, *words: str, timeout: float = 2) -> bytes:
        """Send one command in RESP; the reply as read up to its first CRLF, stripped."""
        payload = f"*{len(words)}\r\n" + "".join(f"${len(w)}\r\n{w}\r\n" for w in words)
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(payload.encode())
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
        return reply.strip()

    def ready(self) -> bool:
        try:
            return self.command("PING") == b"+PONG"
        except OSError:
            return False


class SlowLink:
    """A TCP relay to a Redis on 127.0.0.1 whose subscriber connections are slow: what Redis
    sends on a connection that has sent SUBSCRIBE reaches the client ``delay`` seconds late
    (changeable at any time; bytes keep their order), while commands and their replies on
    other connections pass at once. Published frames then arrive late at one daemon, whose
    heartbeats and presence still work. It runs its own event loop on a thread, so a test's
    blocking calls do not stall it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay = 0.0
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        started.wait(START_TIMEOUT)
        self.port: int = self._port

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def listen() -> asyncio.Server:
            return await asyncio.start_server(self._relay, "127.0.0.1", 0)

        self.server = self.loop.run_until_complete(listen())
        self._port = self.server.sockets[0].getsockname()[1]
        started.set()
        self.loop.run_forever()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        subscriber = False
        replies: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def up() -> None:  # client -> Redis, at once
            nonlocal subscriber
            while data := await reader.read(65536):
                subscriber = subscriber or b"SUBSCRIBE" in data.upper()
                up_writer.write(data)
            up_writer.close()

        async def take_in() -> None:  # Redis -> queue, stamped with when it arrived
            while data := await up_reader.read(65536):
                replies.put_nowait((self.loop.time(), data))
            replies.put_nowait((self.loop.time(), b""))

        async def pass_on() -> None:  # queue -> client; a subscriber's `delay` late
            while True:
                arrived, data = await replies.get()
                if subscriber:
                    # The delay is the point of this relay (an injected latency), not a
                    # wait for something to happen.
                    await asyncio.sleep(max(0.0, arrived + self.delay - self.loop.time()))
                if not data:
                    writer.close()
                    return
                writer.write(data)

        with contextlib.suppress(OSError, asyncio.CancelledError):
            await asyncio.gather(up(), take_in(), pass_on())

    def close(self) -> None:
        async def shut() -> None:
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shut(), self.loop).result(STOP_TIMEOUT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(STOP_TIMEOUT)
        self.loop.close()


# -- fixtures --------------------------------------------------------------------------------


def skip_or_fail(what: str, exc: ServerUnavailable) -> NoReturn:
    message = f"{what} unavailable: {exc}"
    if REQUIRE:
        pytest.fail(message + "\n(PITCHEY_REQUIRE_SERVERS is set)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the test session."""
    try:
        server = PostgresServer()
    except ServerUnavailable as exc:
        skip_or_fail("PostgreSQL", exc)
    try:
        server.start()
    except ServerUnavailable as exc:
        server.cleanup(graceful=False)
        skip_or_fail("PostgreSQL", exc)
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def postgres_db(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of an empty database of this test alone, dropped afterwards."""
    url = postgres_server.create_database()
    try:
        yield url
    finally:
        if postgres_server.running:
            postgres_server.drop_database(url.rsplit("/", 1)[1])


def _start_redis() -> RedisServer:
    try:
        server = RedisServer()
    except ServerUnavailable as exc:
        skip_or_fail("Redis", exc)
    try:
        server.start()
    except ServerUnavailable as exc:
        server.cleanup(graceful=False)
        skip_or_fail("Redis", exc)
    return server


@pytest.fixture(scope="session")
def _redis_session() -> Iterator[RedisServer]:
    server = _start_redis()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def redis_server(_redis_session: RedisServer) -> RedisServer:
    """The session's Redis, running (a test before may have stopped it) and empty."""
    _redis_session.start()
    assert _redis_session.command("FLUSHALL") == b"+OK"
    return _redis_session


@pytest.fixture
def fresh_redis_server() -> Iterator[RedisServer]:
    """A Redis of this test alone, started; stop/start/kill it freely."""
    server = _start_redis()
    try:
        yield server
    finally:
        server.cleanup()


# -- nginx -----------------------------------------------------------------------------------

DEPLOY_NGINX_CONF = Path(__file__).resolve().parent.parent / "deploy" / "nginx.conf"


def nginx_binary() -> str:
    """PITCHEY_NGINX, else nginx on PATH, else Debian's /usr/sbin/nginx (not on a user's PATH)."""
    if env := os.environ.get("PITCHEY_NGINX"):
        if not os.access(env, os.X_OK):
            raise ServerUnavailable(f"PITCHEY_NGINX={env} is not an executable")
        return env
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None
    )
    if found is None:
        raise ServerUnavailable(
            "not installed: no nginx on PATH or in /usr/sbin (apt-get install nginx)"
        )
    return found


def _replace_once(text: str, old: str, new: str) -> str:
    count = text.count(old)
    if count != 1:
        raise AssertionError(f"{DEPLOY_NGINX_CONF}: expected {old!r} once, found it {count} times")
    return text.replace(old, new)


class NginxServer(_Server):
    """nginx running deploy/nginx.conf itself, with only its addresses and log paths changed.

    The documented file is the tested one: the upstream points at ``upstream_port``, the
    server listens on a free loopback port, logs go to the temp dir. A main and http context
    around it give nginx a pid file, temp paths and no daemonising, as it needs without root
    or a system install.
    """

    name = "nginx"

    def __init__(self, upstream_port: int) -> None:
        self.binary = nginx_binary()
        super().__init__()
        # Worker processes run as an unprivileged user when the master is root.
        os.chmod(self.dir, 0o755)
        self.upstream_port = upstream_port
        self.access_log = self.dir / "pitchey-ws.access.log"
        self.error_log = self.dir / "pitchey-ws.error.log"
        self.conf = self.dir / "nginx.conf"
        site = DEPLOY_NGINX_CONF.read_text()
        site = _replace_once(site, "server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream_port};")
        site = _replace_once(site, "listen 80;", f"listen 127.0.0.1:{self.port};")
        site = _replace_once(site, "/var/log/nginx/pitchey-ws.access.log", str(self.access_log))
        site = _replace_once(site, "/var/log/nginx/pitchey-ws.error.log", str(self.error_log))
        (self.dir / "pitchey-ws.conf").write_text(site)
        temp = "\n".join(
            f"    {kind}_temp_path {self.dir / kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        self.conf.write_text(
            f"daemon off;\nmaster_process on;\nworker_processes 1;\n"
            f"pid {self.dir / 'nginx.pid'};\nerror_log {self.log} warn;\n"
            f"events {{ worker_connections 256; }}\n"
            f"http {{\n{temp}\n    access_log {self.dir / 'default.access.log'};\n"
            f"    include {self.dir / 'pitchey-ws.conf'};\n}}\n"
        )

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/messages/ws"

    def start(self) -> None:
        if self.running:
            return
        self._spawn(
            [self.binary, "-p", f"{self.dir}/", "-c", str(self.conf), "-e", str(self.log)],
            cwd=self.dir,
        )
        self._wait_ready()

    def ready(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """SIGTERM is nginx's fast shutdown (SIGQUIT would wait for every WebSocket)."""
        return super().stop(sig)
