"""Offline delivery (PROTOCOL.md 5): durable backlog, replayed once, oldest first, bounded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from pathlib import Path
from typing import Any

from conftest import (
    TIMEOUT,
    Client,
    Connector,
    Daemon,
    conversation,
    eventually_db,
    make_token,
    new_user,
    pg_query,
    running,
)
from websockets.client import ClientProtocol
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
MESSAGE_FIELDS = ("messageId", "conversationId", "senderId", "senderName", "content",
                  "attachments", "messageType", "timestamp")
UNDELIVERED = (
    "SELECT r.message_id FROM message_read_receipts r JOIN messages m ON m.id = r.message_id"
    " WHERE r.user_id = ? AND m.conversation_id = ? AND r.delivered_at IS NULL"
    " ORDER BY r.message_id"
)
# On PostgreSQL undelivered is a ws_* table's row: the app's receipts have delivered_at NOT NULL.
UNDELIVERED_PG = (
    "SELECT u.message_id FROM ws_undelivered u JOIN messages m ON m.id = u.message_id"
    " WHERE u.user_id = ? AND m.conversation_id = ? ORDER BY u.message_id"
)


def undelivered(daemon: Daemon) -> str:
    return UNDELIVERED_PG if daemon.postgresql else UNDELIVERED


MESSAGE_TYPES = ("queued_message", "new_message")
# No rate limit in the way of the race test's sender.
FAST = {"limits.frames_per_second": 100000, "limits.frames_burst": 100000}




async def send_many(client: Client, cid: int, count: int, tag: str = "m") -> list[dict[str, Any]]:
    """Send ``count`` messages without waiting in between; their message_sent, in order."""
    for i in range(count):
        await client.send({"type": "send_message", "conversationId": cid, "content": f"{tag}{i}"})
    return [await client.expect("message_sent") for _ in range(count)]


async def replayed(client: Client) -> list[dict[str, Any]]:
    """The queued_message frames a new connection got before its first reply (the replay)."""
    await client.request({"type": "ping"}, "pong")
    frames = [f for f in client.seen if f["type"] == "queued_message"]
    client.seen.clear()
    return frames


async def test_backlog_replayed_once_then_live(daemon: Daemon, connect_to: Connector) -> None:
    """An offline user's messages come after connected, oldest first, once, then live ones."""
    a = await connect_to(username="alice")
    b_id = new_user()
    cid = await conversation(a, b_id)
    attachment = {"type": "file", "url": "https://x.test/f", "filename": "f.txt", "size": 3}
    await a.send({"type": "send_message", "conversationId": cid, "content": "first",
                  "attachments": [attachment]})
    sent = [await a.expect("message_sent")]
    sent += await send_many(a, cid, 2)
    assert [s["delivered"] for s in sent] == [False, False, False]
    ids = [s["messageId"] for s in sent]
    assert ids == sorted(ids)
    assert daemon.query(undelivered(daemon), (b_id, cid)) == [(i,) for i in ids]

    b = await connect_to(b_id, wait_connected=False)
    first = await b.recv()
    assert first["type"] == "connected" and first["userId"] == b_id
    queued = [await b.recv() for _ in ids]
    for frame, original in zip(queued, sent, strict=True):
        assert frame["type"] == "queued_message"
        assert frame["originalType"] == "new_message"
        assert ISO.match(frame["queuedAt"])
        for field in MESSAGE_FIELDS:
            assert frame[field] == original[field], field
        assert frame["delivered"] is True
    assert queued[0]["attachments"] == [attachment]
    assert queued[0]["senderName"] == "alice"

    live = (await send_many(a, cid, 1))[0]
    frame = await b.expect("new_message", messageId=live["messageId"])
    assert frame["content"] == live["content"]
    assert [f for f in b.seen if f["type"] == "queued_message"] == []
    await eventually_db(daemon, undelivered(daemon), (b_id, cid), [])

    await b.close()
    again = await connect_to(b_id)
    assert await replayed(again) == []


async def test_backlog_survives_kill(tmp_path: Path) -> None:
    """A backlog acknowledged before a SIGKILL is replayed, once, after the restart."""
    async with running(tmp_path, {}) as connect:
        daemon = connect.daemon
        a = await connect()
        b_id = new_user()
        cid = await conversation(a, b_id)
        ids = [s["messageId"] for s in await send_many(a, cid, 3)]
        daemon.kill()
        daemon.start()
        b = await connect(b_id)
        frames = await replayed(b)
        assert [(f["type"], f["messageId"]) for f in frames] == [
            ("queued_message", i) for i in ids
        ]
        await eventually_db(daemon, undelivered(daemon), (b_id, cid), [])
        daemon.kill()
        daemon.start()
        again = await connect(b_id)
        assert await replayed(again) == []


async def test_replay_limit_bounds_one_replay(tmp_path: Path) -> None:
    """With replay_limit 5, a backlog of 12 drains 5, 5, 2 over three connections."""
    async with running(tmp_path, {"delivery.replay_limit": 5}) as connect:
        a = await connect()
        b_id = new_user()
        cid = await conversation(a, b_id)
        ids = [s["messageId"] for s in await send_many(a, cid, 12)]
        got: list[int] = []
        for size in (5, 5, 2, 0):
            b = await connect(b_id)
            frames = await replayed(b)
            assert len(frames) == size, frames
            got += [f["messageId"] for f in frames]
            await b.close()
        assert got == ids


async def test_rest_of_backlog_via_sync(tmp_path: Path) -> None:
    """What one bounded replay leaves is fetched with sync, and then not replayed again."""
    async with running(tmp_path, {"delivery.replay_limit": 5}) as connect:
        a = await connect()
        b_id = new_user()
        cid = await conversation(a, b_id)
        ids = [s["messageId"] for s in await send_many(a, cid, 12)]
        b = await connect(b_id)
        got = [f["messageId"] for f in await replayed(b)]
        assert got == ids[:5]
        has_more = True
        while has_more:
            done = await b.request({"type": "sync", "sinceMessageId": got[-1]}, "sync_complete")
            got += [f["messageId"] for f in b.seen if f["type"] == "queued_message"]
            b.seen.clear()
            assert done["lastMessageId"] == got[-1]
            has_more = done["hasMore"]
        assert got == ids
        await eventually_db(connect.daemon, undelivered(connect.daemon), (b_id, cid), [])
        await b.close()
        again = await connect(b_id)
        assert await replayed(again) == []


async def keep_sending(client: Client, cid: int, stop: asyncio.Event) -> list[int]:
    """Send small pipelined bursts until ``stop``; the ids the server acknowledged."""
    ids: list[int] = []
    while not stop.is_set():
        ids += [s["messageId"] for s in await send_many(client, cid, 4, "live")]
    return ids


async def test_replay_live_race(tmp_path: Path) -> None:
    """A user reconnecting to a big backlog while messages keep coming sees each id once."""
    backlog, rounds = 300, 4
    async with running(tmp_path, FAST) as connect:
        a = await connect()
        b_id = new_user()
        cid = await conversation(a, b_id)
        for _ in range(rounds):
            expected = [s["messageId"] for s in await send_many(a, cid, backlog)]
            stop = asyncio.Event()
            sender = asyncio.create_task(keep_sending(a, cid, stop))
            try:
                b = await connect(b_id, wait_connected=False)
                assert (await b.recv())["type"] == "connected"
                frames: list[dict[str, Any]] = []
                live = 0
                while live < 20:  # well past the replay: live traffic is flowing
                    frame = await b.recv()
                    if frame["type"] in MESSAGE_TYPES:
                        frames.append(frame)
                        live += frame["type"] == "new_message"
                stop.set()
                expected += await sender
            finally:
                sender.cancel()  # only matters when a wait above failed
            while len(frames) < len(expected):
                frame = await b.recv()
                if frame["type"] in MESSAGE_TYPES:
                    frames.append(frame)
            await b.request({"type": "ping"}, "pong")  # anything extra would be before this
            frames += [f for f in b.seen if f["type"] in MESSAGE_TYPES]
            b.seen.clear()

            kinds = [f["type"] for f in frames]
            got = [f["messageId"] for f in frames]
            assert set(kinds) == {"queued_message", "new_message"}, set(kinds)
            first_live = kinds.index("new_message")
            assert "queued_message" not in kinds[first_live:], "replay after live traffic"
            duplicates = sorted({i for i in got if got.count(i) > 1})
            missing = sorted(set(expected) - set(got))
            assert not duplicates and not missing, f"dup {duplicates[:10]} missing {missing[:10]}"
            assert got == expected
            await b.close()
            await a.expect("user_offline", userId=b_id)
        await eventually_db(connect.daemon, undelivered(connect.daemon), (b_id, cid), [])


class HalfClosed:
    """A raw client that sends its close frame and then keeps the TCP connection open."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, daemon: Daemon, token: str) -> tuple[HalfClosed, list[dict[str, Any]]]:
        """Handshake, send a close frame, read up to the server's close; the frames before it."""
        proto = ClientProtocol(parse_uri(f"{daemon.url}?token={token}"))
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
        proto.send_request(proto.connect())
        writer.write(b"".join(proto.data_to_send()))
        frames: list[dict[str, Any]] = []
        closing = False
        async with asyncio.timeout(TIMEOUT):
            while True:
                data = await reader.read(65536)
                assert data, "server hung up before its close frame"
                proto.receive_data(data)
                for event in proto.events_received():
                    if isinstance(event, Response):
                        assert event.status_code == 101, event
                    elif event.opcode is Opcode.TEXT:
                        frames.append(json.loads(event.data))
                    elif event.opcode is Opcode.CLOSE:
                        return cls(reader, writer), frames
                if frames and not closing:
                    proto.send_close(1000)
                    writer.write(b"".join(d for d in proto.data_to_send() if d))
                    closing = True

    async def hang_up(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def test_message_to_closing_connection_is_not_lost(connect_to: Connector) -> None:
    """A message sent while the recipient's only socket is closing is replayed later."""
    a = await connect_to()
    b_id = new_user()
    cid = await conversation(a, b_id)
    raw, frames = await HalfClosed.open(connect_to.daemon, make_token(b_id, username="b"))
    assert frames[0]["type"] == "connected"
    try:
        await a.expect("user_online", userId=b_id)
        # B's close handshake is done on the server's side; only the TCP close is pending.
        sent = (await send_many(a, cid, 1))[0]
    finally:
        await raw.hang_up()
    await a.expect("user_offline", userId=b_id)
    b = await connect_to(b_id)
    assert [f["messageId"] for f in await replayed(b)] == [sent["messageId"]], "message lost"
    assert sent["delivered"] is False, "message_sent claims a closing socket got it"


async def test_a_message_deleted_in_the_database_is_not_replayed(
    daemon: Daemon, connect_to: Connector,
) -> None:
    """A message soft-deleted in the database (is_deleted set, as the Pitchey app does) while
    its recipient is offline is not replayed, and marking it read is refused as for an unknown
    message; the one beside it is replayed (both engines)."""
    import sqlite3

    sender_id, recipient = new_user(), new_user()
    sender = await connect_to(sender_id)
    cid = await conversation(sender, recipient)
    ids = [(await sender.request({"type": "send_message", "conversationId": cid,
                                  "content": text, "requestId": f"del-{text}"},
                                 "message_sent", requestId=f"del-{text}"))["messageId"]
           for text in ("gone", "kept")]
    delete = "UPDATE messages SET is_deleted = (1 = 1) WHERE id = ?"
    if daemon.database_url is not None:
        pg_query(daemon.database_url, delete, (ids[0],))
    else:
        db = sqlite3.connect(daemon.db, timeout=5)
        try:
            with db:
                db.execute(delete, (ids[0],))
        finally:
            db.close()
    client = await connect_to(recipient)
    replayed = await client.expect("queued_message")
    assert replayed["messageId"] == ids[1], replayed
    await client.absent("queued_message")
    error = await client.request({"type": "mark_read", "messageId": ids[0]}, "error")
    assert error["code"] == "forbidden"
