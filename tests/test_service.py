"""The hub, service and handlers in process (tests/harness.py): real store, recording clients."""

from __future__ import annotations

import asyncio
from pathlib import Path

from harness import harness

import protocol as p


async def test_send_fans_out_and_acknowledges(tmp_path: Path) -> None:
    """A send: message_sent to the sending tab, new_message to the other tab and the recipient."""
    async with harness(tmp_path) as h:
        a1, a2, b = await h.connect(1, "Ann"), await h.connect(1, "Ann"), await h.connect(2)
        await h.send(a1, {"type": "create_conversation", "participantIds": [2]})
        cid = a1.only("conversation_created")["conversationId"]
        assert a2.only("conversation_created")["conversationId"] == cid
        assert b.only("conversation_created")["conversationId"] == cid
        await h.send(a1, {"type": "send_message", "conversationId": cid, "content": "hi",
                          "requestId": "r1"})
        sent = a1.only("message_sent")
        assert sent["delivered"] is True and sent["requestId"] == "r1"
        for tab in (a2, b):
            got = tab.only("new_message")
            assert got["messageId"] == sent["messageId"] and got["senderName"] == "Ann"
            assert "requestId" not in got
        assert not a1.take("new_message")


async def test_attach_keeps_contacts_added_while_it_loads(tmp_path: Path) -> None:
    """A conversation created while a user's contacts are being read still counts."""
    async with harness(tmp_path) as h:
        hub = h.app.hub
        read_done, release = asyncio.Event(), asyncio.Event()
        load = hub.load_contacts

        async def slow_load(user_id: int) -> set[int]:
            contacts = await load(user_id)  # the real read, before the conversation exists
            read_done.set()
            await release.wait()
            return contacts

        hub.load_contacts = slow_load
        ann = asyncio.create_task(h.connect(1, "Ann"))
        await read_done.wait()
        hub.load_contacts = load
        bob = await h.connect(2, "Bob")
        await h.send(bob, {"type": "create_conversation", "participantIds": [1]})
        release.set()
        a = await ann
        await h.send(a, {"type": "get_online_users"})
        assert [u["userId"] for u in a.only("online_users")["users"]] == [2]


async def test_recipient_send_uses_the_pairs_first_one_to_one(tmp_path: Path) -> None:
    """send_message by recipientId goes to the non-group conversation of exactly the two
    users (PROTOCOL.md 3), titled or about a pitch: the pair's first; a later 1:1 of the
    same pair is a conversation of its own."""
    async with harness(tmp_path) as h:
        a = await h.connect(1)
        await h.send(a, {"type": "create_conversation", "participantIds": [2],
                         "title": "The Last Lighthouse", "pitchId": 7})
        titled = a.only("conversation_created")["conversationId"]
        await h.send(a, {"type": "send_message", "recipientId": 2, "content": "hello"})
        assert a.only("message_sent")["conversationId"] == titled
        await h.send(a, {"type": "create_conversation", "participantIds": [2]})
        later = a.only("conversation_created")["conversationId"]
        await h.send(a, {"type": "send_message", "recipientId": 2, "content": "again"})
        assert later != titled and a.only("message_sent")["conversationId"] == titled


async def test_replay_hold_counts_bytes(tmp_path: Path) -> None:
    """Frames held during a replay count their UTF-8 bytes against max_pending_bytes."""
    async with harness(tmp_path, server={"max_pending_bytes": 1000}) as h:
        from harness import RecordingClient

        client = RecordingClient(1, h.app.hub)
        await h.app.hub.attach(client, "Ann", None)
        assert client.replaying
        frame = p.encode("note", text="é" * 300)  # about 330 characters, 630 bytes
        client.send(frame)
        assert client.held_bytes == len(frame.encode())
        client.send(frame)  # 1,260 bytes held: over the limit
        await h.app.background.wait(1)
        assert client.close_code == p.CLOSE_SLOW


async def test_mark_read_tells_the_sender_once(tmp_path: Path) -> None:
    """mark_read from two tabs at once sends one message_read to the sender."""
    async with harness(tmp_path) as h:
        a, b1, b2 = await h.connect(1), await h.connect(2, "Bea"), await h.connect(2, "Bea")
        await h.send(a, {"type": "send_message", "recipientId": 2, "content": "read me"})
        message_id = a.only("message_sent")["messageId"]
        read = {"type": "mark_read", "messageId": message_id}
        await asyncio.gather(h.send(b1, read), h.send(b2, read))
        notice = a.only("message_read")
        assert (notice["readBy"], notice["readByName"]) == (2, "Bea")
        await h.send(b1, read)
        assert not a.take("message_read")


async def test_typing_is_announced_once_and_cleared_by_a_send(tmp_path: Path) -> None:
    """Repeated typing_start announces once; the typist's send ends it with isTyping false."""
    async with harness(tmp_path) as h:
        a, b = await h.connect(1), await h.connect(2)
        await h.send(a, {"type": "send_message", "recipientId": 2, "content": "x"})
        cid = a.only("message_sent")["conversationId"]
        b.take("new_message")
        for _ in range(3):
            await h.send(a, {"type": "typing_start", "conversationId": cid})
        assert [t["isTyping"] for t in b.take("user_typing")] == [True]
        await h.send(a, {"type": "send_message", "conversationId": cid, "content": "y"})
        assert [t["isTyping"] for t in b.take("user_typing")] == [False]
