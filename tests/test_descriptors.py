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

from conftest import ROOT, SECRET, TIMEOUT, Daemon, make_token, new_user
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
