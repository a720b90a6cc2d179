"""Abuse: what one user can make the daemon spend, and where that stops (docs/security.md,
"Limits an attacker meets"). Each test runs the real daemon and drives it over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import (
    ROOT,
    SCALE,
    SECRET,
    Client,
    Connector,
    Daemon,
    conversation,
    new_user,
    running,
    write_config,
)
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, str(ROOT))

import config as cfg


async def flood(client: Client, frame: dict[str, Any], count: int) -> int:
    """Send ``frame`` up to ``count`` times without reading (stopping if the server closes
    the connection); return how many were written."""
    text = json.dumps(frame)
    sent = 0
    with contextlib.suppress(ConnectionClosed):
        for _ in range(count):
            await client.ws.send(text)
            sent += 1
    return sent


def retry_after(err: dict[str, Any]) -> int:
    retry = err.get("retryAfterMs")
    assert isinstance(retry, int) and not isinstance(retry, bool) and retry > 0, err
    return retry


# -- 1. no frame is free ---------------------------------------------------------------------


async def test_repeated_typing_start_is_rate_limited_then_closed(connect_to: Connector) -> None:
    """A tight loop of identical typing_start frames gets rate_limited, then close 1008; a
    bystander in the same conversation saw one user_typing and still gets its pong."""
    flooder = await connect_to()
    bystander = await connect_to()
    conv = await conversation(flooder, bystander.user_id)
    await flood(flooder, {"type": "typing_start", "conversationId": conv}, 20000)
    err = await flooder.expect("error", code="rate_limited")
    retry_after(err)
    assert await flooder.closed() == 1008
    pong = await bystander.request({"type": "ping"}, "pong")
    assert pong["userId"] == bystander.user_id
    started = await bystander.expect("user_typing", isTyping=True)
    assert started["userId"] == flooder.user_id
    await bystander.expect("user_typing", isTyping=False)  # the flooder's connection closed
    await bystander.quiet("user_typing")


async def test_typing_flood_from_many_tabs_closes_each(connect_to: Connector) -> None:
    """One user looping typing_start from several connections at once: every connection is
    rate limited and closed 1008, and another user is answered meanwhile."""
    first = await connect_to()
    tabs = [first, *[await connect_to(first.user_id) for _ in range(3)]]
    bystander = await connect_to()
    conv = await conversation(first, bystander.user_id)
    frame = {"type": "typing_start", "conversationId": conv}
    floods = [asyncio.ensure_future(flood(tab, frame, 20000)) for tab in tabs]
    pong = await bystander.request({"type": "ping"}, "pong")
    assert pong["userId"] == bystander.user_id
    await asyncio.gather(*floods)
    for tab in tabs:
        await tab.expect("error", code="rate_limited")
        assert await tab.closed() == 1008


# -- 2. fan-out is budgeted --------------------------------------------------------------------

# Ten recipients a message, a budget of 30 deliveries that does not refill during the test.
BUDGET = {
    "limits.deliveries_per_second": 0.01,
    "limits.deliveries_burst": 30,
    "limits.max_participants": 20,
}


async def test_fan_out_budget_refuses_before_storing(tmp_path: Path) -> None:
    """Sends into a group past the user's delivery budget get rate_limited with retryAfterMs,
    and nothing past the budget is stored; another user's budget is untouched."""
    async with running(tmp_path, BUDGET) as connect:
        daemon: Daemon = connect.daemon
        sender = await connect()
        members = [new_user() for _ in range(10)]
        group = await conversation(sender, *members)  # 10 deliveries: 20 left
        for i in range(2):  # 10 each: 0 left
            await sender.request(
                {"type": "send_message", "conversationId": group, "content": f"m{i}",
                 "requestId": f"fan-{i}"}, "message_sent", requestId=f"fan-{i}")
        await sender.send({"type": "send_message", "conversationId": group, "content": "over",
                           "requestId": "fan-over"})
        err = await sender.expect("error", requestId="fan-over")
        assert err["code"] == "rate_limited", err
        assert retry_after(err) > 1000  # 10 deliveries at 0.01 a second: long
        assert "deliveries" in err["message"], err
        # Creating another big conversation is a fan-out too.
        await sender.send({"type": "create_conversation", "participantIds": members,
                           "requestId": "fan-conv"})
        err = await sender.expect("error", requestId="fan-conv")
        assert err["code"] == "rate_limited", err
        await sender.quiet("message_sent")
        sent = daemon.query("SELECT content FROM messages WHERE sender_id = ? ORDER BY id",
                            (sender.user_id,))
        assert sent == [("m0",), ("m1",)]
        # One receipt per recipient (PostgreSQL: a ws_undelivered row until it is delivered).
        receipts = daemon.query(
            "SELECT COUNT(*) FROM"
            + (" (SELECT message_id FROM message_read_receipts UNION ALL"
               " SELECT message_id FROM ws_undelivered) r" if daemon.postgresql
               else " message_read_receipts r")
            + " JOIN messages m ON m.id = r.message_id WHERE m.sender_id = ?",
            (sender.user_id,))
        assert receipts == [(20,)]
        assert daemon.query("SELECT COUNT(*) FROM conversations WHERE created_by_id = ?",
                            (sender.user_id,)) == [(1,)]
        # The frame bucket is not what stopped it, and the connection stays open.
        assert (await sender.request({"type": "ping"}, "pong"))["userId"] == sender.user_id
        # Another member of the group has a budget of their own.
        other = await connect(members[0])
        reply = await other.request(
            {"type": "send_message", "conversationId": group, "content": "mine",
             "requestId": "fan-other"}, "message_sent", requestId="fan-other")
        assert reply["content"] == "mine"


# -- 3. conversations.create_policy ----------------------------------------------------------


async def expect_forbidden(client: Client, frame: dict[str, Any]) -> dict[str, Any]:
    await client.send(frame)
    err = await client.expect("error", requestId=frame["requestId"])
    assert err["code"] == "forbidden", err
    return err


async def test_backend_policy_refuses_new_conversations(tmp_path: Path) -> None:
    """With create_policy "backend", create_conversation and a send by recipientId with no
    direct conversation are forbidden and store nothing; existing conversations still work."""
    daemon = Daemon(tmp_path)
    connect = Connector(daemon)
    try:
        daemon.start()  # the default policy, "any": make the conversations over the socket
        a = await connect()
        b, c = new_user(), new_user()
        group = await conversation(a, b, c)
        first = await a.request(
            {"type": "send_message", "recipientId": b, "content": "hi", "requestId": "d-1"},
            "message_sent", requestId="d-1")
        direct = first["conversationId"]
        await connect.close_all()
        await daemon.astop()
        write_config(daemon.config, {"presence.offline_grace_seconds": 0,
                                     "conversations.create_policy": "backend"})
        connect = Connector(daemon)
        daemon.start()
        a = await connect(a.user_id)
        err = await expect_forbidden(
            a, {"type": "create_conversation", "participantIds": [c], "requestId": "cc-1"})
        assert "backend" in err["message"], err
        err = await expect_forbidden(
            a, {"type": "send_message", "recipientId": c, "content": "new", "requestId": "d-2"})
        assert "backend" in err["message"], err
        again = await a.request(
            {"type": "send_message", "recipientId": b, "content": "again", "requestId": "d-3"},
            "message_sent", requestId="d-3")
        assert again["conversationId"] == direct
        in_group = await a.request(
            {"type": "send_message", "conversationId": group, "content": "all",
             "requestId": "g-1"}, "message_sent", requestId="g-1")
        assert in_group["conversationId"] == group
        # b may answer in the direct conversation by recipientId too.
        bee = await connect(b)
        back = await bee.request(
            {"type": "send_message", "recipientId": a.user_id, "content": "yo",
             "requestId": "d-4"}, "message_sent", requestId="d-4")
        assert back["conversationId"] == direct
        assert daemon.query("SELECT COUNT(*) FROM conversations") == [(2,)]
        assert daemon.query("SELECT content FROM messages ORDER BY id") == [
            ("hi",), ("again",), ("all",), ("yo",)]
    finally:
        await connect.close_all()
        if daemon.proc is not None:
            daemon.stop()


# -- 5. the frame limit -----------------------------------------------------------------

EMOJI = "\U0001F600"


async def test_every_frame_over_max_message_bytes_closes_1009(connect_to: Connector) -> None:
    """PROTOCOL.md 6: a frame over server.max_message_bytes closes with 1009, whatever it is:
    a padded ping, a send_message over a field limit, and a send_message within every field
    limit (6,000 emoji sent as escaped surrogate pairs: 72 kB)."""
    small = cfg.Config().server.max_message_bytes
    a = await connect_to()
    b = await connect_to()
    conv = await conversation(a, b.user_id)
    for frame in (
        {"type": "ping", "pad": "x" * small},
        {"type": "send_message", "conversationId": conv, "content": "x" * small},
        {"type": "send_message", "conversationId": conv, "content": EMOJI * 6000},
        {"type": "join_conversation", "conversationId": 1, "pad": EMOJI * (small // 12)},
    ):
        c = await connect_to(a.user_id)
        text = json.dumps(frame)  # ASCII: an emoji is \ud83d\ude00
        assert len(text) > small
        with contextlib.suppress(ConnectionClosed):
            await c.send(text)
            await c.expect("pong", timeout=1 * SCALE)
        assert await c.closed() == 1009, frame
    await b.quiet("new_message")
    await a.request({"type": "ping"}, "pong")  # the other connections are untouched


async def test_a_larger_limit_takes_the_escaped_emoji(tmp_path: Path) -> None:
    """With server.max_message_bytes raised, the same 72 kB message is stored and delivered
    whole (content counts characters, the frame limit bytes)."""
    async with running(tmp_path, {"server.max_message_bytes": 131072}) as connect:
        a = await connect()
        b = await connect()
        conv = await conversation(a, b.user_id)
        text = json.dumps({"type": "send_message", "conversationId": conv,
                           "content": EMOJI * 6000, "requestId": "emoji"})
        assert 65536 < len(text) <= 131072
        await a.send(text)
        sent = await a.expect("message_sent", requestId="emoji")
        assert sent["content"] == EMOJI * 6000
        got = await b.expect("new_message", messageId=sent["messageId"])
        assert got["content"] == EMOJI * 6000
        assert connect.daemon.query("SELECT length(content) FROM messages WHERE id = ?",
                                    (sent["messageId"],)) == [(6000,)]


def serve(tmp_path: Path, overrides: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """Run ``serve`` with these config overrides; only for runs that must refuse to start."""
    write_config(tmp_path / "config.toml", overrides)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PITCHEY_WS_")}
    return subprocess.run(
        [sys.executable, str(ROOT / "pitchey_ws.py"), "serve", "--config",
         str(tmp_path / "config.toml"), "--port", "0", "--db", str(tmp_path / "x.db")],
        capture_output=True, text=True, timeout=30 * SCALE,
        env={**environ, "JWT_SECRET": SECRET}, cwd=tmp_path,
    )


def test_a_frame_limit_past_16_mib_refuses_to_start(tmp_path: Path) -> None:
    """server.max_message_bytes over 16 MiB (the most a frame may have) stops serve with
    exit 2, naming the key."""
    result = serve(tmp_path, {"server.max_message_bytes": 16 * 1024 * 1024 + 1})
    assert result.returncode == 2, result.stderr
    assert "server.max_message_bytes" in result.stderr, result.stderr


def test_inconsistent_budgets_and_policies_refuse_to_start(tmp_path: Path) -> None:
    """A delivery burst below one full conversation, or an unknown create_policy, exits 2
    naming the keys."""
    result = serve(tmp_path, {"limits.deliveries_burst": 10, "limits.max_participants": 50})
    assert result.returncode == 2
    assert "limits.deliveries_burst" in result.stderr
    assert "limits.max_participants" in result.stderr
    result = serve(tmp_path, {"conversations.create_policy": "nobody"})
    assert result.returncode == 2 and "conversations.create_policy" in result.stderr
    result = serve(tmp_path, {"limits.typing_repeat_cost": 0})
    assert result.returncode == 2 and "limits.typing_repeat_cost" in result.stderr
