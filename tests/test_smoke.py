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


async def test_metrics(daemon: Daemon, connect_to: Connector) -> None:
    """GET /metrics is Prometheus text with connections, frames, errors and commit figures."""
    client = await connect_to()
    await client.request({"type": "ping"}, "pong")
    await client.request({"type": "nope"}, "error")
    status, headers, body = daemon.get("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    text = body.decode()
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert float(lines["pitchey_connections"]) >= 1
    assert float(lines['pitchey_frames_in_total{type="ping"}']) >= 1
    assert float(lines['pitchey_errors_total{code="unknown_type"}']) >= 1
    assert float(lines['pitchey_commit_seconds_bucket{le="+Inf"}']) >= 1
    for name in ("pitchey_users_online", "pitchey_pending_outgoing_bytes",
                 "pitchey_messages_stored_total", "pitchey_commit_batch_size_count",
                 "pitchey_slow_consumer_closes_total"):
        assert name in lines
    # Counters are typed as counters; frames are labelled by the type they had on the wire.
    assert "# TYPE pitchey_slow_consumer_closes_total counter" in text
    assert 'pitchey_frames_in_total{type="Ping"}' not in text


def test_client_library_served(daemon: Daemon) -> None:
    """The JS client is served in every mode, as JavaScript."""
    status, headers, body = daemon.get("/client/pitchey-ws.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert b"export class PitcheyClient" in body
