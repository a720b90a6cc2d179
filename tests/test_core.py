"""Sections 3, 4.1 and 4.4: conversations, messages, idempotency, history, authorization."""

from __future__ import annotations

import asyncio
import json

from conftest import (
    Client,
    Connector,
    Daemon,
    conversation,
    eventually_db,
    new_user,
    write_config,
)


async def send(client: Client, frame: dict) -> dict:
    """Send a send_message and return its message_sent."""
    await client.send({"type": "send_message", **frame})
    return await client.expect("message_sent")


async def test_create_conversation_routing(daemon: Daemon, connect_to: Connector) -> None:
    """conversation_created goes to the caller with requestId and to other participants without."""
    a, b, c = await connect_to(), await connect_to(), await connect_to()
    a2 = await connect_to(a.user_id)
    reply = await a.request(
        {"type": "create_conversation", "participantIds": [b.user_id, c.user_id],
         "title": "Pitch: Night Train", "requestId": "conv-1"},
        "conversation_created",
    )
    assert reply["requestId"] == "conv-1" and reply["isGroup"] is True
    assert reply["participantIds"] == sorted([a.user_id, b.user_id, c.user_id])
    assert reply["createdBy"] == a.user_id and reply["title"] == "Pitch: Night Train"
    cid = reply["conversationId"]
    for other in (b, c, a2):
        seen = await other.expect("conversation_created", conversationId=cid)
        assert "requestId" not in seen
    rows = daemon.query(
        "SELECT user_id FROM conversation_participants WHERE conversation_id = ? ORDER BY 1",
        (cid,),
    )
    assert [r[0] for r in rows] == sorted([a.user_id, b.user_id, c.user_id])
    assert daemon.query("SELECT is_group, title FROM conversations WHERE id = ?", (cid,)) == [
        (1, "Pitch: Night Train")
    ]


async def test_create_conversation_idempotent(daemon: Daemon, connect_to: Connector) -> None:
    """A repeated requestId returns the same conversation, also after a reconnect."""
    a = await connect_to()
    other = new_user()
    frame = {"type": "create_conversation", "participantIds": [other], "requestId": "same"}
    first = await a.request(frame, "conversation_created")
    assert first["isGroup"] is False
    await a.close()
    a = await connect_to(a.user_id)
    again = await a.request(frame, "conversation_created")
    assert again["conversationId"] == first["conversationId"] and again["requestId"] == "same"
    count = daemon.query(
        "SELECT COUNT(*) FROM conversations WHERE created_by_id = ?", (a.user_id,)
    )
    assert count == [(1,)]


async def test_create_conversation_needs_another_user(connect_to: Connector) -> None:
    """Only yourself as participant is invalid_message."""
    a = await connect_to()
    err = await a.request(
        {"type": "create_conversation", "participantIds": [a.user_id], "requestId": "x"}, "error"
    )
    assert err["code"] == "invalid_message" and err["requestId"] == "x"


async def test_send_message_routing(daemon: Daemon, connect_to: Connector) -> None:
    """message_sent to the sending socket; new_message to every other connection of everyone."""
    a, b = await connect_to(username="Alice"), await connect_to()
    a2, b2 = await connect_to(a.user_id, username="Alice"), await connect_to(b.user_id)
    cid = await conversation(a, b.user_id)
    sent = await send(a, {"conversationId": cid, "content": "hello", "requestId": "m-1"})
    assert sent["requestId"] == "m-1" and sent["delivered"] is True
    assert sent["senderId"] == a.user_id and sent["senderName"] == "Alice"
    assert sent["attachments"] == [] and sent["messageType"] == "text"
    assert sent["timestamp"].endswith("Z")
    for other in (b, b2, a2):
        frame = await other.expect("new_message", messageId=sent["messageId"])
        assert "requestId" not in frame and frame["delivered"] is True
        assert {k: frame[k] for k in ("conversationId", "content", "senderId")} == {
            "conversationId": cid, "content": "hello", "senderId": a.user_id
        }
    await a.absent("new_message")
    # Delivery records are written after the frames, in the background.
    await eventually_db(
        daemon,
        "SELECT user_id, delivered_at IS NOT NULL FROM message_read_receipts"
        " WHERE message_id = ?", (sent["messageId"],), [(b.user_id, 1)],
    )


async def test_send_to_offline_not_delivered(daemon: Daemon, connect_to: Connector) -> None:
    """With no recipient connected, message_sent says delivered: false."""
    a = await connect_to()
    offline = new_user()
    cid = await conversation(a, offline)
    sent = await send(a, {"conversationId": cid, "content": "anyone?"})
    assert sent["delivered"] is False and "requestId" not in sent


async def test_attachments_and_fields(daemon: Daemon, connect_to: Connector) -> None:
    """Attachments, messageType, pitchId and subject are stored and echoed."""
    a, b = await connect_to(), await connect_to()
    cid = await conversation(a, b.user_id)
    files = [{"type": "file", "url": "https://x/deck.pdf", "filename": "deck.pdf",
              "size": 1234, "mimeType": "application/pdf"}]
    sent = await send(a, {"conversationId": cid, "content": "deck", "attachments": files,
                          "messageType": "pitch", "pitchId": 42, "subject": "Deck"})
    got = await b.expect("new_message", messageId=sent["messageId"])
    assert got["attachments"] == files and got["messageType"] == "pitch"
    row = daemon.query(
        "SELECT attachments, pitch_id, subject, receiver_id FROM messages WHERE id = ?",
        (sent["messageId"],),
    )[0]
    assert json.loads(row[0]) == files and row[1:] == (42, "Deck", b.user_id)


async def test_recipient_id_finds_or_creates(daemon: Daemon, connect_to: Connector) -> None:
    """recipientId alone creates the 1:1 conversation once and reuses it either way round."""
    a, b = await connect_to(), await connect_to()
    first = await send(a, {"recipientId": b.user_id, "content": "first"})
    got = await b.expect("new_message", messageId=first["messageId"])
    second = await send(b, {"recipientId": a.user_id, "content": "reply"})
    assert second["conversationId"] == first["conversationId"] == got["conversationId"]
    group = await conversation(a, b.user_id, new_user())
    third = await send(a, {"recipientId": b.user_id, "content": "still 1:1"})
    assert third["conversationId"] == first["conversationId"] != group


async def test_recipient_id_concurrent_first_messages(connect_to: Connector) -> None:
    """Two users messaging each other first at the same moment share one conversation."""
    a, b = await connect_to(), await connect_to()
    await asyncio.gather(
        a.send({"type": "send_message", "recipientId": b.user_id, "content": "hi b"}),
        b.send({"type": "send_message", "recipientId": a.user_id, "content": "hi a"}),
    )
    sa, sb = await a.expect("message_sent"), await b.expect("message_sent")
    assert sa["conversationId"] == sb["conversationId"]


async def test_recipient_self_is_invalid(connect_to: Connector) -> None:
    """recipientId equal to yourself is invalid_message."""
    a = await connect_to()
    err = await a.request({"type": "send_message", "recipientId": a.user_id, "content": "me"},
                          "error")
    assert err["code"] == "invalid_message"


async def test_idempotent_across_reconnect(daemon: Daemon, connect_to: Connector) -> None:
    """A repeated requestId after a reconnect stores nothing and fans out nothing."""
    a, b = await connect_to(), await connect_to()
    cid = await conversation(a, b.user_id)
    frame = {"conversationId": cid, "content": "once", "requestId": "retry-me"}
    first = await send(a, frame)
    await b.expect("new_message", messageId=first["messageId"])
    await a.close()
    a = await connect_to(a.user_id)
    again = await send(a, frame)
    assert again["messageId"] == first["messageId"] and again["requestId"] == "retry-me"
    await b.absent("new_message")
    rows = daemon.query("SELECT COUNT(*) FROM messages WHERE sender_id = ?", (a.user_id,))
    assert rows == [(1,)]


async def test_idempotent_concurrent_duplicates(daemon: Daemon, connect_to: Connector) -> None:
    """The same requestId sent from two tabs at once is stored once."""
    a, b = await connect_to(), await connect_to()
    a2 = await connect_to(a.user_id)
    cid = await conversation(a, b.user_id)
    frame = {"type": "send_message", "conversationId": cid, "content": "dup", "requestId": "d"}
    await asyncio.gather(a.send(frame), a2.send(frame))
    one, two = await a.expect("message_sent"), await a2.expect("message_sent")
    assert one["messageId"] == two["messageId"]
    assert daemon.query("SELECT COUNT(*) FROM messages WHERE sender_id = ?", (a.user_id,)) == [
        (1,)
    ]


async def test_idempotent_across_restart(fresh_daemon: Daemon) -> None:
    """requestId idempotency and stored messages survive a restart."""
    fresh_daemon.start()
    connector = Connector(fresh_daemon)
    try:
        a, b = await connector(), await connector()
        cid = await conversation(a, b.user_id)
        first = await send(a, {"conversationId": cid, "content": "durable", "requestId": "k"})
        await fresh_daemon.arestart()
        a, b = await connector(a.user_id), await connector(b.user_id)
        again = await send(a, {"conversationId": cid, "content": "durable", "requestId": "k"})
        assert again["messageId"] == first["messageId"]
        joined = await b.request({"type": "join_conversation", "conversationId": cid},
                                 "conversation_joined")
        assert [m["content"] for m in joined["messages"]] == ["durable"]
        # Ids keep growing after a restart.
        newer = await send(a, {"conversationId": cid, "content": "after"})
        assert newer["messageId"] > first["messageId"]
    finally:
        await connector.close_all()


async def test_sql_looking_content_verbatim(daemon: Daemon, connect_to: Connector) -> None:
    """Content that looks like SQL or markup is stored and returned byte for byte."""
    a, b = await connect_to(), await connect_to()
    cid = await conversation(a, b.user_id)
    nasty = "'); DROP TABLE messages; -- \" <script>alert(1)</script> \u00e9\U0001f3ac \\0"
    sent = await send(a, {"conversationId": cid, "content": nasty})
    assert (await b.expect("new_message", messageId=sent["messageId"]))["content"] == nasty
    assert daemon.query("SELECT content FROM messages WHERE id = ?", (sent["messageId"],)) == [
        (nasty,)
    ]


async def test_non_participant_forbidden_everywhere(connect_to: Connector) -> None:
    """Every conversation operation by an outsider is forbidden, same as a missing conversation."""
    a, b, outsider = await connect_to(), await connect_to(), await connect_to()
    cid = await conversation(a, b.user_id)
    sent = await send(a, {"conversationId": cid, "content": "private"})
    missing = 10**12
    for target in (cid, missing):
        frames = [
            {"type": "send_message", "conversationId": target, "content": "x", "requestId": "q"},
            {"type": "typing_start", "conversationId": target},
            {"type": "typing_stop", "conversationId": target},
            {"type": "join_conversation", "conversationId": target},
            {"type": "get_messages", "conversationId": target},
        ]
        for frame in frames:
            err = await outsider.request(frame, "error")
            assert err["code"] == "forbidden", frame
            assert err["message"] == "Not a participant of this conversation"
    for message_id in (sent["messageId"], missing):
        err = await outsider.request({"type": "mark_read", "messageId": message_id}, "error")
        assert err["code"] == "forbidden"
    await b.absent("user_typing")
    await b.expect("new_message", messageId=sent["messageId"])
    await b.absent("new_message")


async def test_history_newest_page_and_paging(fresh_daemon: Daemon) -> None:
    """join returns the newest page oldest first; get_messages pages back with hasMore."""
    write_config(fresh_daemon.config,
                 {"history.page_size": 5, "presence.offline_grace_seconds": 0})
    fresh_daemon.start()
    connector = Connector(fresh_daemon)
    try:
        a, b = await connector(), await connector()
        cid = await conversation(a, b.user_id)
        ids = [(await send(a, {"conversationId": cid, "content": f"m{i}"}))["messageId"]
               for i in range(12)]
        joined = await b.request({"type": "join_conversation", "conversationId": cid},
                                 "conversation_joined")
        assert [m["id"] for m in joined["messages"]] == ids[-5:]
        entry = joined["messages"][0]
        assert set(entry) >= {"id", "messageId", "conversationId", "senderId", "senderName",
                              "content", "attachments", "messageType", "sentAt", "timestamp",
                              "isRead"}
        assert entry["sentAt"] == entry["timestamp"] and entry["isRead"] is False
        seen: list[int] = []
        before = None
        while True:
            frame: dict = {"type": "get_messages", "conversationId": cid, "limit": 100}
            if before is not None:
                frame["beforeMessageId"] = before
            page = await b.request(frame, "messages")
            assert page["conversationId"] == cid and len(page["messages"]) <= 5  # capped
            got = [m["id"] for m in page["messages"]]
            assert got == sorted(got)
            seen = got + seen
            if not page["hasMore"]:
                break
            before = got[0]
        assert seen == ids
        small = await b.request({"type": "get_messages", "conversationId": cid, "limit": 2},
                                "messages")
        assert [m["id"] for m in small["messages"]] == ids[-2:] and small["hasMore"] is True
    finally:
        await connector.close_all()


async def test_history_is_read(connect_to: Connector) -> None:
    """isRead: own messages read by someone else; others' messages read by the caller."""
    a, b = await connect_to(), await connect_to()
    cid = await conversation(a, b.user_id)
    mine = await send(a, {"conversationId": cid, "content": "read me"})
    theirs = await send(b, {"conversationId": cid, "content": "unread by a"})
    await b.send({"type": "mark_read", "messageId": mine["messageId"]})
    await a.expect("message_read", messageId=mine["messageId"])
    joined = await a.request({"type": "join_conversation", "conversationId": cid},
                             "conversation_joined")
    flags = {m["id"]: m["isRead"] for m in joined["messages"]}
    assert flags == {mine["messageId"]: True, theirs["messageId"]: False}
    joined_b = await b.request({"type": "join_conversation", "conversationId": cid},
                               "conversation_joined")
    flags_b = {m["id"]: m["isRead"] for m in joined_b["messages"]}
    assert flags_b == {mine["messageId"]: True, theirs["messageId"]: False}


async def test_create_conversation_concurrent_same_request(
    daemon: Daemon, connect_to: Connector
) -> None:
    """The same create_conversation requestId from two tabs at once makes one conversation."""
    a = await connect_to()
    a2 = await connect_to(a.user_id)
    frame = {"type": "create_conversation", "participantIds": [new_user()], "requestId": "twice"}
    await asyncio.gather(a.send(frame), a2.send(frame))
    one = await a.expect("conversation_created", requestId="twice")
    two = await a2.expect("conversation_created", requestId="twice")
    assert one["conversationId"] == two["conversationId"]
    assert daemon.query(
        "SELECT COUNT(*) FROM conversations WHERE created_by_id = ?", (a.user_id,)
    ) == [(1,)]
