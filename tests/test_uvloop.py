"""The daemon under uvloop's event loop (a common choice for asyncio services): its
transports are not asyncio.Transport subclasses, which the HTTP front once asserted, and every
connection failed."""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, Connector, Daemon, make_token, new_user

uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed (requirements-dev.txt)")

BOOT = (
    "import runpy, sys, uvloop; uvloop.install(); sys.argv[0] = {path!r};"
    " sys.path.insert(0, {root!r});"
    " runpy.run_path({path!r}, run_name='__main__')"
)


@pytest.fixture
def uvloop_daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    boot = BOOT.format(path=str(ROOT / "pitchey_ws.py"), root=str(ROOT))
    d.launcher = [sys.executable, "-c", boot]
    try:
        d.start()
        yield d
    finally:
        if d.proc is not None:  # also when it never became healthy
            d.stop()


async def test_http_and_websocket_under_uvloop(uvloop_daemon: Daemon) -> None:
    """Health, an HTTP API call and a WebSocket chat all work on uvloop."""
    d = uvloop_daemon
    status, _, body = d.get("/api/health")
    assert status == 200 and json.loads(body)["status"] == "healthy"
    alice, bob = new_user(), new_user()
    request = urllib.request.Request(d.http + "/api/messages/conversations",
                                     headers={"Authorization": f"Bearer {make_token(alice)}"})

    def inbox() -> tuple[int, dict[str, object]]:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, json.loads(r.read())

    status, listed = await asyncio.to_thread(inbox)
    assert status == 200 and "conversations" in listed
    connect = Connector(d)
    try:
        a, b = await connect(alice), await connect(bob)
        sent = await a.request({"type": "send_message", "recipientId": bob, "content": "uv"},
                               "message_sent")
        got = await b.expect("new_message")
        assert got["messageId"] == sent["messageId"] and got["content"] == "uv"
    finally:
        await connect.close_all()
