"""Limits (PROTOCOL.md section 6): rate limiting, flooding, connection caps, frame and field limits.

Field limits are checked against the shared daemon, which runs with the defaults written in
``config.toml``; rate and connection limits use a module daemon with tiny, slow buckets so a
test can spend a user's whole burst and know no token refills while it looks.
"""

from __future__ import annotations

import asyncio
import json
import tomllib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from conftest import (
    ROOT,
    SCALE,
    TIMEOUT,
    Client,
    Connector,
    Daemon,
    conversation,
    make_token,
    new_user,
)
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

DEFAULTS: dict[str, Any] = tomllib.loads((ROOT / "config.toml").read_text())
LIMITS = DEFAULTS["limits"]

# One token every 10 seconds: nothing refills during a test, so counts are exact.
TIGHT = {
    "limits.frames_per_second": 0.1,
    "limits.frames_burst": 6,
    "limits.flood_max_dropped": 5,
    "limits.flood_window_seconds": 60,
    "limits.max_connections_per_user": 3,
}


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory, engine: str) -> Iterator[Daemon]:
    """A daemon with a 6-frame burst, no practical refill, and 3 connections per user."""
    d = Daemon(tmp_path_factory.mktemp("tight"), TIGHT)
    d.start()
    yield d
    if d.proc is not None:
        d.stop()


@pytest.fixture
async def connect_tight(tight: Daemon) -> AsyncIterator[Connector]:
    connector = Connector(tight)
    yield connector
    await connector.close_all()


async def still_open(client: Client) -> None:
    """The connection still answers: a ping gets its pong."""
    pong = await client.request({"type": "ping"}, "pong")
    assert pong["userId"] == client.user_id


async def expect_error(client: Client, frame: dict[str, Any] | str, code: str) -> dict[str, Any]:
    await client.send(frame)
    err = await client.expect("error")
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"]
    return err


# -- rate limit: one bucket per user, shared by all of the user's connections --------------


async def test_rate_limit_shared_by_tabs_and_excess_not_processed(
    tight: Daemon, connect_tight: Connector
) -> None:
    """Two tabs share one bucket; the frame past it gets rate_limited and is never stored."""
    a = new_user()
    tab1 = await connect_tight(a)
    tab2 = await connect_tight(a)
    b = await connect_tight()
    conv = await conversation(tab1, b.user_id)  # token 1 of 6
    for i in range(5):  # tokens 2..6, all from the first tab
        sent = await tab1.request(
            {"type": "send_message", "conversationId": conv, "content": f"m{i}",
             "requestId": f"rl-{a}-{i}"},
            "message_sent",
        )
        assert sent["requestId"] == f"rl-{a}-{i}"
    # The second tab has sent nothing, yet the user's bucket is empty.
    err = await expect_error(
        tab2,
        {"type": "send_message", "conversationId": conv, "content": "over",
         "requestId": f"rl-{a}-over"},
        "rate_limited",
    )
    assert err.get("requestId") == f"rl-{a}-over"
    retry = err.get("retryAfterMs")
    assert isinstance(retry, int) and not isinstance(retry, bool), err
    assert 0 < retry <= 10_000, err
    await tab2.quiet("message_sent")  # its bucket is empty: a ping barrier would be refused
    for i in range(5):
        await b.expect("new_message", content=f"m{i}")
    await b.absent("new_message")
    stored = tight.query(
        "SELECT q.request_id FROM ws_message_requests q WHERE q.sender_id = ?"
        " ORDER BY q.message_id" if tight.postgresql else
        "SELECT request_id FROM messages WHERE sender_id = ? ORDER BY id", (a,)
    )
    assert [r[0] for r in stored] == [f"rl-{a}-{i}" for i in range(5)]
    # A ping is a frame too: the first tab is limited as well.
    await expect_error(tab1, {"type": "ping"}, "rate_limited")
    await tab1.quiet("pong", 0.2 * SCALE)


async def test_other_users_keep_their_own_bucket(connect_tight: Connector) -> None:
    """One user emptying their bucket does not limit another user."""
    greedy = await connect_tight()
    other = await connect_tight()
    for _ in range(int(TIGHT["limits.frames_burst"])):
        await greedy.request({"type": "ping"}, "pong")
    await expect_error(greedy, {"type": "ping"}, "rate_limited")
    await still_open(other)


async def test_repeated_typing_start_costs_a_fraction(connect_tight: Connector) -> None:
    """typing_start repeats within the TTL are coalesced: one broadcast, and each repeat costs
    limits.typing_repeat_cost (a tenth of a token), not a whole one and not nothing."""
    a = await connect_tight()
    b = await connect_tight()
    conv = await conversation(a, b.user_id)  # 1 token
    await a.send({"type": "typing_start", "conversationId": conv})  # 1 token
    await b.expect("user_typing", userId=a.user_id, isTyping=True)
    for _ in range(20):  # more than three times the burst, 2 tokens at a tenth each
        await a.send({"type": "typing_start", "conversationId": conv})
    # Frames on one socket are handled in order, so the pong comes after all the repeats.
    await still_open(a)
    assert not [f for f in a.seen if f.get("type") == "error"], a.seen
    await b.absent("user_typing")
    # 5 tokens spent so far (conversation, first typing_start, 20 repeats, ping): 1 left.
    await still_open(a)
    await expect_error(a, {"type": "ping"}, "rate_limited")


async def test_flooding_closes_with_1008_after_max_drops(connect_tight: Connector) -> None:
    """flood_max_dropped drops keep the connection; one more closes it with 1008."""
    c = await connect_tight()
    for _ in range(int(TIGHT["limits.frames_burst"])):
        await c.request({"type": "ping"}, "pong")
    for _ in range(int(TIGHT["limits.flood_max_dropped"])):
        await expect_error(c, {"type": "ping"}, "rate_limited")
    # Exactly flood_max_dropped drops: still connected.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(c.ws.recv(), 0.3 * SCALE)
    await c.send({"type": "ping"})
    assert await c.closed() == 1008
    assert not [f for f in c.seen if f.get("type") == "pong"], c.seen


async def test_connections_per_user_capped_with_429(
    tight: Daemon, connect_tight: Connector
) -> None:
    """The connection past max_connections_per_user is refused with HTTP 429; others live on."""
    uid = new_user()
    cap = int(TIGHT["limits.max_connections_per_user"])
    tabs = [await connect_tight(uid) for _ in range(cap)]
    token = make_token(uid, username=f"user{uid}")
    with pytest.raises(InvalidStatus) as info:
        async with connect(f"{tight.url}?token={token}", open_timeout=TIMEOUT):
            pass
    assert info.value.response.status_code == 429
    body = json.loads(info.value.response.body or b"{}")
    assert isinstance(body.get("error"), str)
    await still_open(tabs[0])
    # Another user is not affected by this user's cap.
    await still_open(await connect_tight())
    # Once a tab closes, the user may connect again (the server notices the close promptly).
    await tabs[-1].close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while True:
        try:
            again = await connect_tight(uid)
            break
        except InvalidStatus as exc:
            assert exc.response.status_code == 429
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.02)  # polling pace while the server unregisters the tab
    await still_open(again)


# -- frame limits --------------------------------------------------------------------------


async def test_frame_at_max_bytes_accepted(connect_to: Connector) -> None:
    """A text frame of exactly server.max_message_bytes is processed."""
    c = await connect_to()
    size = int(DEFAULTS["server"]["max_message_bytes"])
    head = '{"type":"ping","pad":"'
    frame = head + "x" * (size - len(head) - 2) + '"}'
    assert len(frame.encode()) == size
    await c.send(frame)
    await c.expect("pong")


async def test_frame_over_max_bytes_closes_1009(connect_to: Connector) -> None:
    """A text frame one byte over server.max_message_bytes closes the connection with 1009."""
    c = await connect_to()
    size = int(DEFAULTS["server"]["max_message_bytes"]) + 1
    head = '{"type":"ping","pad":"'
    frame = head + "x" * (size - len(head) - 2) + '"}'
    assert len(frame.encode()) == size
    with pytest.raises(ConnectionClosed):
        await c.send(frame)
        await c.expect("pong")
    assert await c.closed() == 1009


async def test_binary_frame_closes_1003(connect_to: Connector) -> None:
    """A binary frame closes the connection with 1003 and is not processed."""
    c = await connect_to()
    await c.ws.send(json.dumps({"type": "ping"}).encode())
    assert await c.closed() == 1003
    assert not [f for f in c.seen if f.get("type") == "pong"], c.seen


# -- field limits: each refusal is invalid_message and the connection stays open -----------


async def test_content_length_limit(daemon: Daemon, connect_to: Connector) -> None:
    """Content of max_content_chars is stored; one more character is invalid_message."""
    a = await connect_to()
    b = await connect_to()
    conv = await conversation(a, b.user_id)
    cap = int(LIMITS["max_content_chars"])
    rid = f"long-{a.user_id}"
    err = await expect_error(
        a, {"type": "send_message", "conversationId": conv, "content": "é" * (cap + 1),
            "requestId": rid}, "invalid_message",
    )
    assert err.get("requestId") == rid
    assert daemon.query("SELECT COUNT(*) FROM messages WHERE sender_id = ?", (a.user_id,)) == [(0,)]
    await still_open(a)
    ok = await a.request(
        {"type": "send_message", "conversationId": conv, "content": "é" * cap}, "message_sent"
    )
    assert len(ok["content"]) == cap
    await b.expect("new_message", messageId=ok["messageId"])


def attachment(**over: Any) -> dict[str, Any]:
    base = {"type": "file", "url": "https://example.invalid/f", "filename": "f.txt", "size": 1}
    return {**base, **over}


@pytest.mark.parametrize(
    "case",
    ["too_many_attachments", "long_url", "long_filename", "long_mime", "long_type"],
)
async def test_attachment_limits(daemon: Daemon, connect_to: Connector, case: str) -> None:
    """Too many attachments, or one over-long attachment field, is invalid_message."""
    a = await connect_to()
    b = await connect_to()
    conv = await conversation(a, b.user_id)
    too_long = "u" * (int(LIMITS["max_attachment_field_chars"]) + 1)
    attachments = {
        "too_many_attachments": [attachment() for _ in range(int(LIMITS["max_attachments"]) + 1)],
        "long_url": [attachment(url=too_long)],
        "long_filename": [attachment(filename=too_long)],
        "long_mime": [attachment(mimeType=too_long)],
        "long_type": [attachment(type=too_long)],
    }[case]
    await expect_error(
        a, {"type": "send_message", "conversationId": conv, "content": "x",
            "attachments": attachments}, "invalid_message",
    )
    await still_open(a)
    await b.absent("new_message")
    assert daemon.query("SELECT COUNT(*) FROM messages WHERE sender_id = ?", (a.user_id,)) == [(0,)]


async def test_attachments_at_limits_accepted(connect_to: Connector) -> None:
    """max_attachments attachments whose fields are max_attachment_field_chars long are kept."""
    a = await connect_to()
    b = await connect_to()
    conv = await conversation(a, b.user_id)
    full = "u" * int(LIMITS["max_attachment_field_chars"])
    # One attachment with every field at the limit (all ten that long would pass the frame cap).
    attachments = [attachment(url=full, filename=full, mimeType=full, type=full)]
    attachments += [attachment() for _ in range(int(LIMITS["max_attachments"]) - 1)]
    sent = await a.request(
        {"type": "send_message", "conversationId": conv, "content": "x",
         "attachments": attachments}, "message_sent",
    )
    assert sent["attachments"] == attachments
    got = await b.expect("new_message", messageId=sent["messageId"])
    assert got["attachments"] == attachments


async def test_request_id_length_limit(connect_to: Connector) -> None:
    """A requestId of max_request_id_chars works; one character more is invalid_message
    where it keys a repeat (send_message), and left out where it only tags the answer."""
    a = await connect_to()
    b = await connect_to()
    conv = await conversation(a, b.user_id)
    cap = int(LIMITS["max_request_id_chars"])
    await expect_error(
        a, {"type": "send_message", "conversationId": conv, "content": "x",
            "requestId": "r" * (cap + 1)}, "invalid_message",
    )
    pong = await a.request({"type": "ping", "requestId": "r" * (cap + 1)}, "pong")
    assert "requestId" not in pong
    await still_open(a)
    sent = await a.request(
        {"type": "send_message", "conversationId": conv, "content": "x", "requestId": "r" * cap},
        "message_sent",
    )
    assert sent["requestId"] == "r" * cap


async def test_participant_limit(daemon: Daemon, connect_to: Connector) -> None:
    """max_participants members (caller included) is allowed; one more is invalid_message."""
    a = await connect_to()
    cap = int(LIMITS["max_participants"])
    base = 10_000_000 + a.user_id * 10_000
    over = list(range(base, base + cap))  # cap others + the caller = cap + 1 members
    await expect_error(a, {"type": "create_conversation", "participantIds": over},
                       "invalid_message")
    await still_open(a)
    created = await a.request(
        {"type": "create_conversation", "participantIds": over[:-1]}, "conversation_created",
        timeout=TIMEOUT * 2,
    )
    assert len(created["participantIds"]) == cap and created["isGroup"] is True
    rows = daemon.query(
        "SELECT COUNT(*) FROM conversation_participants WHERE conversation_id = ?",
        (created["conversationId"],),
    )
    assert rows == [(cap,)]


@pytest.mark.parametrize("limit", [0, -1])
async def test_get_messages_limit_below_one(connect_to: Connector, limit: int) -> None:
    """get_messages with limit below 1 is invalid_message and the connection stays open."""
    a = await connect_to()
    b = await connect_to()
    conv = await conversation(a, b.user_id)
    await expect_error(
        a, {"type": "get_messages", "conversationId": conv, "limit": limit}, "invalid_message"
    )
    await still_open(a)


async def test_get_messages_limit_capped_at_page_size(connect_to: Connector) -> None:
    """get_messages with a limit above history.page_size returns one page and hasMore."""
    a = await connect_to()
    b = await connect_to()
    conv = await conversation(a, b.user_id)
    page = int(DEFAULTS["history"]["page_size"])
    total = page + 3
    # Split the sends between both users so neither comes near its burst.
    for i in range(total):
        sender = a if i % 2 == 0 else b
        await sender.send({"type": "send_message", "conversationId": conv, "content": f"h{i}"})
    for i in range(total):
        sender = a if i % 2 == 0 else b
        await sender.expect("message_sent", content=f"h{i}")
    reply = await a.request(
        {"type": "get_messages", "conversationId": conv, "limit": page * 10}, "messages"
    )
    assert len(reply["messages"]) == page
    assert reply["hasMore"] is True
    # The newest page, oldest first.
    assert [m["content"] for m in reply["messages"]] == [f"h{i}" for i in range(3, total)]


async def test_reconnect_does_not_refill_bucket(connect_tight: Connector) -> None:
    """Going offline and reconnecting keeps the user's drained token bucket."""
    a = await connect_tight()
    b = await connect_tight()
    await conversation(b, a.user_id)
    for _ in range(6):
        await a.request({"type": "ping"}, "pong")
    await expect_error(a, {"type": "ping"}, "rate_limited")
    await a.close()
    await b.expect("user_offline", userId=a.user_id)  # the daemon has let go of the user
    again = await connect_tight(a.user_id)
    await expect_error(again, {"type": "ping"}, "rate_limited")


async def test_typing_for_unknown_conversations_is_not_free(connect_tight: Connector) -> None:
    """typing_stop for conversations the daemon would have to look up costs tokens."""
    a = await connect_tight()
    for i in range(6):
        await expect_error(a, {"type": "typing_stop", "conversationId": 10**9 + i}, "forbidden")
    await expect_error(a, {"type": "typing_stop", "conversationId": 10**9 + 6}, "rate_limited")
