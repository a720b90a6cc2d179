"""The connection ceiling: the daemon fits its connection cap to its descriptor limit, refuses
beyond it with 503 at once, and keeps answering and logging little when descriptors run out."""

from __future__ import annotations

import asyncio
import contextlib
import re
import resource
import socket
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, SECRET, TIMEOUT, Daemon, free_port, make_token, new_user
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

LIMIT = 160  # soft and hard RLIMIT_NOFILE of the daemon under test


def limited() -> None:
    """In the child before exec: a hard descriptor limit the daemon cannot raise past."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT // 2, LIMIT))


def start_limited(d: Daemon) -> None:
    log = open(d.log, "ab")  # noqa: SIM115 - handed to the child, closed below
    d.proc = subprocess.Popen(
        [sys.executable, str(ROOT / "pitchey_ws.py"), "serve", "--config", str(d.config),
         "--host", "127.0.0.1", "--port", str(d.port), "--db", str(d.db)],
        stdout=log, stderr=log, env={"JWT_SECRET": SECRET, "PATH": "/usr/bin:/bin"},
        cwd=d.tmp, preexec_fn=limited,
    )
    log.close()
    d.wait_healthy()


async def test_connection_cap_follows_the_descriptor_limit(tmp_path: Path) -> None:
    """Soft limit raised to the hard one, the cap fitted below it, 503 server_full beyond the
    cap, health still answered, and a flood of raw connections at the limit logs little."""
    d = Daemon(tmp_path, {"server.log_level": "INFO", "http.header_timeout_seconds": 2})
    start_limited(d)
    sockets: list[socket.socket] = []
    clients: list[ClientConnection] = []
    try:
        text = d.log_text()
        got = re.search(r"file descriptors: (\d+) \(raised from \d+\); up to (\d+) connections",
                        text)
        assert got is not None, text
        assert int(got.group(1)) == LIMIT  # the soft limit was raised to the hard one
        cap = int(got.group(2))
        assert 0 < cap < LIMIT - 20
        for _ in range(cap):
            uid = new_user()
            clients.append(await connect(f"{d.url}?token={make_token(uid)}",
                                         open_timeout=TIMEOUT))
        started = asyncio.get_running_loop().time()
        try:
            await connect(f"{d.url}?token={make_token(new_user())}", open_timeout=TIMEOUT)
            raise AssertionError("a connection beyond the cap was accepted")
        except InvalidStatus as refused:
            assert refused.response.status_code == 503
            assert b"server_full" in refused.response.body
        assert asyncio.get_running_loop().time() - started < TIMEOUT / 2
        assert (await asyncio.to_thread(d.get, "/api/health"))[0] == 200
        # Past the descriptors: idle raw connections until accept() fails for a while.
        for _ in range(3 * LIMIT):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", d.port))
            sockets.append(s)
        # Idle connections are dropped after http.header_timeout_seconds; health comes back.
        deadline = asyncio.get_running_loop().time() + 5 * TIMEOUT
        while True:
            try:
                status = (await asyncio.to_thread(d.get, "/api/health"))[0]
            except OSError:
                status = 0
            if status == 200:
                break
            assert asyncio.get_running_loop().time() < deadline, "health never came back"
            await asyncio.sleep(0.2)  # paces the polling; health answering is the event
        assert d.log.stat().st_size < 1_000_000
        assert d.log_text().count("Traceback") <= 3, d.log_text()[-3000:]
    finally:
        for s in sockets:
            s.close()
        for c in clients:
            with contextlib.suppress(Exception):
                await c.close()
        if d.proc is not None:
            d.stop()


async def test_waiting_turns_follow_the_descriptors(tmp_path: Path) -> None:
    """Beyond http.max_in_progress, connections wait for a turn while the descriptors leave
    room for a whole in-progress set beyond every open connection: a burst far larger than
    max_in_progress is served, not refused. Past that room they are refused with 503 at once,
    and the waiting ones are answered in turn when the ones in progress end."""
    d = Daemon(tmp_path, {"server.log_level": "INFO"})
    start_limited(d)
    got = re.search(r"up to (\d+) connections .* and (\d+) requests in progress", d.log_text())
    assert got is not None, d.log_text()
    cap, in_progress = int(got.group(1)), int(got.group(2))
    # fit_descriptors leaves the cap plus two in-progress sets for clients, so about `cap`
    # may wait beside a full in-progress set (a few less: the harness's own health checks
    # may not be closed yet).
    served, extra = cap - 4, 2 * in_progress + 8
    assert served > in_progress  # more wait than "as many again"
    request = b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        # Accepted in order: these take every slot in progress, their heads unfinished.
        for _ in range(in_progress):
            streams.append(await asyncio.open_connection("127.0.0.1", d.port))
        for _ in range(served + extra):
            reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
            writer.write(request)
            streams.append((reader, writer))
        # Read everything from now on: a refused connection is dropped a second after its 503.
        answers = [asyncio.ensure_future(reader.read()) for reader, _ in streams]
        holders, waiters = answers[:in_progress], answers[in_progress:in_progress + served]
        beyond = answers[in_progress + served:]
        # Past the room for waiting: refused at once, while the slots are still held.
        refused = await asyncio.wait_for(beyond[-1], TIMEOUT / 2)
        assert refused.startswith(b"HTTP/1.1 503 ") and b'"busy"' in refused, refused[:200]
        assert not any(answer.done() for answer in waiters)
        for _, writer in streams[:in_progress]:
            writer.write(request)
        for answer in await asyncio.wait_for(asyncio.gather(*holders, *waiters), TIMEOUT):
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        # Every connection got an answer: served in turn or refused, none left hanging.
        for answer in await asyncio.wait_for(asyncio.gather(*beyond), TIMEOUT):
            assert answer.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 503 ")), answer[:200]
    finally:
        for _, writer in streams:
            writer.close()
        if d.proc is not None:
            d.stop()


async def test_both_listeners_count_against_the_descriptors(tmp_path: Path) -> None:
    """With api.port, connections open on the backend's listener hold descriptors too: once
    they fill the room for waiting, a connection to the main port past its in-progress set is
    refused with 503 at once instead of waiting for a turn the descriptors cannot give."""
    api_port = free_port()
    d = Daemon(tmp_path, {"server.log_level": "INFO", "api.port": api_port,
                          "http.header_timeout_seconds": 6 * TIMEOUT})
    start_limited(d)
    got = re.search(r"up to (\d+) connections .* and (\d+) requests in progress", d.log_text())
    assert got is not None, d.log_text()
    cap, in_progress = int(got.group(1)), int(got.group(2))
    streams: list[asyncio.StreamWriter] = []
    try:
        # Every slot in progress on the main port, heads unfinished.
        for _ in range(in_progress):
            streams.append((await asyncio.open_connection("127.0.0.1", d.port))[1])
        # As many idle connections on the API port as the room for waiting holds.
        for _ in range(cap):
            streams.append((await asyncio.open_connection("127.0.0.1", api_port))[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
        streams.append(writer)
        writer.write(b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        # Counted per listener, it would wait for a turn (6 * TIMEOUT, the header timeout).
        answer = await asyncio.wait_for(reader.read(), TIMEOUT)
        assert answer.startswith(b"HTTP/1.1 503 ") and b'"busy"' in answer, answer[:200]
    finally:
        for writer in streams:
            writer.close()
        if d.proc is not None:
            d.stop()
