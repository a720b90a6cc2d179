"""Read receipts (PROTOCOL.md 4.3, 5) and the history isRead flag (4.4)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from conftest import (
    Client,
    Connector,
    Daemon,
    conversation,
    eventually,
    new_user,
    now_iso,
    running,
)

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
RECEIPT = (
    "SELECT delivered_at, read_at FROM message_read_receipts WHERE message_id = ? AND user_id = ?"
)





async def send(client: Client, cid: int, content: str = "hello") -> int:
    sent = await client.request(
        {"type": "send_message", "conversationId": cid, "content": content}, "message_sent"
    )
    return int(sent["messageId"])


async def replayed(client: Client) -> list[dict[str, Any]]:
    """The queued_message frames this new connection got before its first reply."""
    await client.request({"type": "ping"}, "pong")
    frames = [f for f in client.seen if f["type"] == "queued_message"]
    client.seen.clear()
    return frames


async def history(client: Client, cid: int) -> dict[int, bool]:
    joined = await client.request(
        {"type": "join_conversation", "conversationId": cid}, "conversation_joined"
    )
    return {m["messageId"]: m["isRead"] for m in joined["messages"]}


async def test_read_receipt_to_every_sender_connection(
    daemon: Daemon, connect_to: Connector
) -> None:
    """mark_read sends message_read to each of the sender's tabs and records it."""
    a_id = new_user()
    a1 = await connect_to(a_id)
    a2 = await connect_to(a_id)
    b = await connect_to(username="bob")
    cid = await conversation(a1, b.user_id)
    mid = await send(a1, cid)
    await b.expect("new_message", messageId=mid)
    before = now_iso()
    await b.send({"type": "mark_read", "messageId": mid})
    frames = [await tab.expect("message_read", messageId=mid) for tab in (a1, a2)]
    for frame in frames:
        assert frame["conversationId"] == cid
        assert frame["readBy"] == b.user_id
        assert frame["readByName"] == "bob"
        assert ISO.match(frame["readAt"]) and before <= frame["readAt"] <= now_iso()
    assert frames[0] == frames[1]
    read_at = frames[0]["readAt"]
    rows = await eventually(lambda: [r for r in daemon.query(RECEIPT, (mid, b.user_id)) if r[1]])
    (delivered_at, stored_read_at), = rows
    assert stored_read_at == read_at
    assert delivered_at is not None
    assert daemon.query("SELECT is_read FROM messages WHERE id = ?", (mid,)) == [(1,)]


async def test_read_again_or_own_notifies_no_one(daemon: Daemon, connect_to: Connector) -> None:
    """Marking a read message again, or one's own message, changes nothing and tells no one."""
    a_id = new_user()
    a1 = await connect_to(a_id)
    a2 = await connect_to(a_id)
    b = await connect_to()
    cid = await conversation(a1, b.user_id)
    mid = await send(a1, cid)
    await b.send({"type": "mark_read", "messageId": mid})
    first = await a1.expect("message_read", messageId=mid)
    await a2.expect("message_read", messageId=mid)

    await b.send({"type": "mark_read", "messageId": mid})
    await b.request({"type": "ping"}, "pong")
    await a1.absent("message_read")
    await a2.absent("message_read")
    assert daemon.query(RECEIPT, (mid, b.user_id))[0][1] == first["readAt"]

    own = await send(a1, cid, "mine")
    await b.expect("new_message", messageId=own)
    await a1.send({"type": "mark_read", "messageId": own})
    await a1.request({"type": "ping"}, "pong")
    await a1.absent("message_read")
    await a2.absent("message_read")
    await b.absent("message_read")
    assert not [f for f in a1.seen if f["type"] == "error"], a1.seen
    assert daemon.query("SELECT is_read, read_at FROM messages WHERE id = ?", (own,)) == [
        (0, None)
    ]
    assert daemon.query(RECEIPT, (own, b.user_id))[0][1] is None


async def test_receipt_for_offline_sender_queued_once(connect_to: Connector) -> None:
    """A receipt for an offline sender is replayed as queued_message once, on reconnect."""
    a_id = new_user()
    a = await connect_to(a_id)
    b = await connect_to(username="bob")
    cid = await conversation(a, b.user_id)
    mid = await send(a, cid)
    await b.expect("new_message", messageId=mid)
    await a.close()
    await b.expect("user_offline", userId=a_id)
    before = now_iso()
    await b.send({"type": "mark_read", "messageId": mid})
    await b.request({"type": "ping"}, "pong")  # the read is stored before the pong

    a = await connect_to(a_id, wait_connected=False)
    assert (await a.recv())["type"] == "connected"
    frames = await replayed(a)
    assert len(frames) == 1, frames
    (frame,) = frames
    assert frame["originalType"] == "message_read"
    assert frame["messageId"] == mid
    assert frame["conversationId"] == cid
    assert frame["readBy"] == b.user_id
    assert frame["readByName"] == "bob"
    assert ISO.match(frame["readAt"]) and before <= frame["readAt"] <= now_iso()
    assert ISO.match(frame["queuedAt"])
    await a.close()

    again = await connect_to(a_id)
    assert await replayed(again) == []
    await again.absent("message_read")


async def test_forbidden_mark_read(daemon: Daemon, connect_to: Connector) -> None:
    """mark_read by a non-participant, or of an unknown message, is forbidden."""
    a = await connect_to()
    b = await connect_to()
    c = await connect_to()
    cid = await conversation(a, b.user_id)
    mid = await send(a, cid)
    error = await c.request({"type": "mark_read", "messageId": mid}, "error")
    assert error["code"] == "forbidden", error
    error = await b.request({"type": "mark_read", "messageId": 10**12}, "error")
    assert error["code"] == "forbidden", error
    await a.absent("message_read")
    assert daemon.query(RECEIPT, (mid, c.user_id)) == []
    assert daemon.query(RECEIPT, (mid, b.user_id))[0][1] is None
    assert daemon.query("SELECT is_read FROM messages WHERE id = ?", (mid,)) == [(0,)]


async def test_history_is_read(connect_to: Connector) -> None:
    """isRead: own messages read by anyone else; others' messages read by the caller."""
    a = await connect_to()
    b = await connect_to()
    c = await connect_to()
    cid = await conversation(a, b.user_id, c.user_id)
    m1 = await send(a, cid, "from a")
    m2 = await send(b, cid, "from b")
    await b.send({"type": "mark_read", "messageId": m1})
    await a.expect("message_read", messageId=m1)

    assert await history(a, cid) == {m1: True, m2: False}
    assert await history(b, cid) == {m1: True, m2: False}
    assert await history(c, cid) == {m1: False, m2: False}

    await c.send({"type": "mark_read", "messageId": m2})
    await b.expect("message_read", messageId=m2, readBy=c.user_id)
    assert await history(a, cid) == {m1: True, m2: False}
    assert await history(b, cid) == {m1: True, m2: True}
    assert await history(c, cid) == {m1: False, m2: True}
    page = await c.request({"type": "get_messages", "conversationId": cid}, "messages")
    assert {m["messageId"]: m["isRead"] for m in page["messages"]} == {m1: False, m2: True}


async def test_read_sets_delivered_and_stops_replay(tmp_path: Path) -> None:
    """Reading a message the replay did not carry sets delivered_at, so it is not replayed."""
    async with running(tmp_path, {"delivery.replay_limit": 1}) as connect:
        daemon = connect.daemon
        a = await connect()
        b_id = new_user()
        cid = await conversation(a, b_id)
        m1 = await send(a, cid, "one")
        m2 = await send(a, cid, "two")
        b = await connect(b_id)
        assert [f["messageId"] for f in await replayed(b)] == [m1]
        # Not delivered: a receipt without times (SQLite), no receipt yet (PostgreSQL, where
        # the app's delivered_at is NOT NULL and ws_undelivered holds the state).
        assert daemon.query(RECEIPT, (m2, b_id)) == ([] if daemon.postgresql else [(None, None)])
        await b.send({"type": "mark_read", "messageId": m2})
        read = await a.expect("message_read", messageId=m2)
        rows = await eventually(lambda: [r for r in daemon.query(RECEIPT, (m2, b_id)) if r[0]])
        (delivered_at, read_at), = rows
        assert read_at == read["readAt"] and ISO.match(delivered_at)
        await b.close()
        again = await connect(b_id)
        assert await replayed(again) == []
