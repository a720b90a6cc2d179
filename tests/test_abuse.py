"""Abuse: what one user can make the daemon spend, and where that stops (docs/security.md,
"Limits an attacker meets"). Each test runs the real daemon and drives it over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from conftest import (
    Client,
    Connector,
    conversation,
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
