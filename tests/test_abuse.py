"""Abuse: what one user can make the daemon spend, and where that stops (docs/security.md,
"Limits an attacker meets"). Each test runs the real daemon and drives it over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

from conftest import (
    Client,
    Connector,
    Daemon,
    conversation,
    new_user,
    running,
    write_config,
)
from websockets.exceptions import ConnectionClosed


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
        receipts = daemon.query(
            "SELECT COUNT(*) FROM message_read_receipts r JOIN messages m ON m.id = r.message_id"
            " WHERE m.sender_id = ?", (sender.user_id,))
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
