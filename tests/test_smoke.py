"""Smoke: the daemon answers health and a ping over a real socket."""

import json

from conftest import Connector, Daemon


def test_health(daemon: Daemon) -> None:
    """GET /api/health answers 200 JSON with status healthy."""
    status, headers, body = daemon.get("/api/health")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    data = json.loads(body)
    assert data["status"] == "healthy" and data["timestamp"].endswith("Z")


async def test_ping(connect_to: Connector) -> None:
    """ping gets pong with the caller's userId."""
    c = await connect_to()
    pong = await c.request({"type": "ping"}, "pong")
    assert pong["userId"] == c.user_id
