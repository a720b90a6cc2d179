"""sync (PROTOCOL.md 3, 5): messages after a cursor in the caller's conversations, paged."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from conftest import Client, Connector, conversation, running

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
MESSAGE_FIELDS = ("messageId", "conversationId", "senderId", "senderName", "content",
                  "attachments", "messageType", "timestamp")



async def send(client: Client, cid: int, content: str) -> dict[str, Any]:
    return await client.request(
        {"type": "send_message", "conversationId": cid, "content": content}, "message_sent"
    )


async def sync(client: Client, since: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The queued_message frames of one sync reply, and its sync_complete."""
    client.seen.clear()
    done = await client.request({"type": "sync", "sinceMessageId": since}, "sync_complete")
    frames = [f for f in client.seen if f["type"] == "queued_message"]
    client.seen.clear()
    return frames, done


async def test_sync_returns_callers_conversations_only(connect_to: Connector) -> None:
    """sync gives the caller's messages after the cursor, oldest first, and no one else's."""
    a = await connect_to()
    b = await connect_to()
    c = await connect_to()
    d = await connect_to()
    ab = await conversation(a, b.user_id)
    cd = await conversation(c, d.user_id)
    # B's buffer holds the conversation_created broadcast for ab, so C creates this one.
    bc = await conversation(c, b.user_id)
    cursor = (await send(a, ab, "before the cursor"))["messageId"]
    mine: list[dict[str, Any]] = []
    mine.append(await send(a, ab, "a to b"))
    await send(c, cd, "c to d, not for b")
    mine.append(await send(b, ab, "b's own"))
    await send(d, cd, "d to c, not for b")
    mine.append(await send(c, bc, "c to b"))
    await send(c, cd, "c to d again")

    frames, done = await sync(b, cursor)
    assert [f["messageId"] for f in frames] == [m["messageId"] for m in mine]
    for frame, sent in zip(frames, mine, strict=True):
        assert frame["originalType"] == "new_message"
        assert ISO.match(frame["queuedAt"])
        for field in MESSAGE_FIELDS:
            assert frame[field] == sent[field], field
    assert done["lastMessageId"] == mine[-1]["messageId"]
    assert done["hasMore"] is False

    frames, _ = await sync(d, cursor)
    assert {f["conversationId"] for f in frames} == {cd}


async def test_sync_with_nothing_newer(connect_to: Connector) -> None:
    """When nothing is newer than the cursor, sync_complete echoes the cursor."""
    a = await connect_to()
    b = await connect_to()
    cid = await conversation(a, b.user_id)
    last = (await send(a, cid, "latest"))["messageId"]
    for cursor in (last, last + 1000):
        frames, done = await sync(b, cursor)
        assert frames == []
        assert done["lastMessageId"] == cursor
        assert done["hasMore"] is False


async def test_sync_pages_cover_everything_once(tmp_path: Path) -> None:
    """With replay_limit 5, paging 12 messages gives 5, 5, 2 with hasMore, each id once."""
    async with running(tmp_path, {"delivery.replay_limit": 5}) as connect:
        a = await connect()
        b = await connect()
        cid = await conversation(a, b.user_id)
        ids = [(await send(a, cid, f"m{i}"))["messageId"] for i in range(12)]
        got: list[int] = []
        pages = []
        cursor, has_more = 0, True
        while has_more:
            frames, done = await sync(b, cursor)
            pages.append((len(frames), done["hasMore"]))
            got += [f["messageId"] for f in frames]
            assert done["lastMessageId"] == (got[-1] if frames else cursor)
            cursor, has_more = done["lastMessageId"], done["hasMore"]
        assert pages == [(5, True), (5, True), (2, False)]
        assert got == ids


async def test_sync_invalid_cursor(connect_to: Connector) -> None:
    """A missing, non-integer or negative sinceMessageId is invalid_message; the socket stays."""
    b = await connect_to()
    for frame in (
        {"type": "sync"},
        {"type": "sync", "sinceMessageId": "5"},
        {"type": "sync", "sinceMessageId": -1},
        {"type": "sync", "sinceMessageId": 1.5},
        {"type": "sync", "sinceMessageId": True},
        {"type": "sync", "sinceMessageId": None},
    ):
        error = await b.request(frame, "error")
        assert error["code"] == "invalid_message", (frame, error)
    await b.request({"type": "ping"}, "pong")
    assert not [f for f in b.seen if f["type"] == "sync_complete"]
