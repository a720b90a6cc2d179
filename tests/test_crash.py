"""Crash safety: SIGKILL mid-stream loses no acknowledged message and half-stores nothing.

Ten clients chat in three pairs and one group of four, each keeping sends in flight. The
daemon is killed with SIGKILL once some acks have arrived, then restarted on the same port and
database. Acks are promises (PROTOCOL.md 4.1): each acked message is stored exactly once with
its receipts, reaches every other participant (replay + sync), and a resend of an unacked
requestId never duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import TIMEOUT, Client, Connector, Daemon, conversation, new_user, replay_then_sync
from websockets.exceptions import ConnectionClosed

WINDOW = 8  # sends in flight per client
PER_CLIENT = 2000  # more than can be acked before the kill
KILL_AFTER_ACKS = 200
PRESENCE = {"user_online", "user_offline"}


@dataclass
class Sender:
    client: Client
    conv: int
    sent: list[str] = field(default_factory=list)  # requestIds written to the socket
    acked: dict[str, int] = field(default_factory=dict)  # requestId -> messageId
    live: set[int] = field(default_factory=set)  # new_message ids received before the crash


def rid(user_id: int, i: int) -> str:
    return f"crash-{user_id}-{i}"


async def chat(s: Sender, acks: list[int], enough: asyncio.Event) -> None:
    """Send with WINDOW in flight until the connection dies; record acks and arrivals."""
    ws = s.client.ws
    uid = s.client.user_id
    next_i = 0

    async def send_one() -> None:
        nonlocal next_i
        r = rid(uid, next_i)
        next_i += 1
        s.sent.append(r)
        await ws.send(json.dumps({"type": "send_message", "conversationId": s.conv,
                                  "content": f"{r} body", "requestId": r}))

    with contextlib.suppress(ConnectionClosed):
        for _ in range(WINDOW):
            await send_one()
        while True:
            frame = json.loads(await ws.recv())
            kind = frame.get("type")
            if kind == "message_sent":
                assert frame["requestId"] not in s.acked, frame
                s.acked[frame["requestId"]] = frame["messageId"]
                acks[0] += 1
                if acks[0] >= KILL_AFTER_ACKS:
                    enough.set()
                if next_i < PER_CLIENT:
                    await send_one()
            elif kind == "new_message":
                s.live.add(frame["messageId"])
            elif kind == "error":
                raise AssertionError(f"user {uid} got {frame}")


async def collect_after_restart(client: Client) -> tuple[list[int], list[int]]:
    """Replay after connecting, then sync from 0 to the end: (replayed ids, synced ids)."""
    replayed, synced = await replay_then_sync(client, lambda f: f["type"] in PRESENCE)
    assert all(f["originalType"] == "new_message" for f in replayed), replayed
    return [f["messageId"] for f in replayed], synced


def messages(d: Daemon) -> str:
    """The messages table with its request_id column: on PostgreSQL the request ids are in
    ws_message_requests (the app's messages table has no such column)."""
    if d.postgresql:
        return ("(SELECT m.*, q.request_id FROM messages m"
                " LEFT JOIN ws_message_requests q ON q.message_id = m.id) AS messages")
    return "messages"


def half_stored(d: Daemon) -> list[tuple[Any, ...]]:
    """Messages lacking a receipt for some other active participant of their conversation
    (on PostgreSQL: lacking both a receipt and a ws_undelivered row)."""
    if d.postgresql:
        return d.query(
            "SELECT m.id, p.user_id FROM messages m "
            "JOIN conversation_participants p ON p.conversation_id = m.conversation_id "
            "  AND p.user_id != m.sender_id AND p.is_active "
            "LEFT JOIN message_read_receipts r ON r.message_id = m.id AND r.user_id = p.user_id "
            "LEFT JOIN ws_undelivered u ON u.message_id = m.id AND u.user_id = p.user_id "
            "WHERE r.message_id IS NULL AND u.message_id IS NULL"
        )
    return d.query(
        "SELECT m.id, p.user_id FROM messages m "
        "JOIN conversation_participants p ON p.conversation_id = m.conversation_id "
        "  AND p.user_id != m.sender_id AND p.is_active = 1 "
        "LEFT JOIN message_read_receipts r ON r.message_id = m.id AND r.user_id = p.user_id "
        "WHERE r.message_id IS NULL"
    )


async def test_sigkill_mid_stream_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    """SIGKILL while ten clients send: acked = stored once, whole, delivered; resend is safe."""
    d = Daemon(tmp_path, {"limits.frames_per_second": 100000, "limits.frames_burst": 100000})
    d.start()
    connector = Connector(d)
    try:
        users = [new_user() for _ in range(10)]
        clients = [await connector(u) for u in users]
        convs: list[int] = []  # each client's conversation, by client index
        for group in ([0, 1], [2, 3], [4, 5], [6, 7, 8, 9]):
            first, *rest = (clients[i] for i in group)
            conv = await conversation(first, *(c.user_id for c in rest))
            convs += [conv] * len(group)
            for c in rest:  # every member has seen the conversation before the traffic starts
                await c.expect("conversation_created", conversationId=conv)
        senders = [Sender(c, conv) for c, conv in zip(clients, convs, strict=True)]
        acks = [0]
        enough = asyncio.Event()
        tasks = [asyncio.create_task(chat(s, acks, enough)) for s in senders]
        await asyncio.wait_for(enough.wait(), 10 * TIMEOUT)
        assert d.proc is not None
        pid = d.proc.pid
        await asyncio.to_thread(d.kill)
        await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
        for s in senders:
            assert await s.client.closed() == 1006  # no closing handshake from a dead process
        total_acked = sum(len(s.acked) for s in senders)
        in_flight = sum(len(s.sent) - len(s.acked) for s in senders)
        assert total_acked >= KILL_AFTER_ACKS and in_flight > 0, (total_acked, in_flight)

        # -- the database as the crash left it ------------------------------------------------
        if not d.postgresql:  # PostgreSQL has no such check; its WAL replay is its own
            assert d.query("PRAGMA integrity_check") == [("ok",)]
        assert half_stored(d) == []
        dupes = d.query(f"SELECT sender_id, request_id, COUNT(*) FROM {messages(d)} "
                        "GROUP BY sender_id, request_id HAVING COUNT(*) > 1")
        assert dupes == []
        stored = {(row[0], row[1]): row[2] for row in d.query(
            f"SELECT sender_id, request_id, id FROM {messages(d)}"
            " WHERE request_id LIKE 'crash-%'")}
        for s in senders:
            for r, mid in s.acked.items():
                assert stored.get((s.client.user_id, r)) == mid, (r, mid)
        # Nothing exists that was never sent.
        sent_keys = {(s.client.user_id, r) for s in senders for r in s.sent}
        assert set(stored) <= sent_keys

        # -- restart and collect what every participant can get -------------------------------
        await connector.close_all()
        d.start()
        assert d.proc is not None and d.proc.pid != pid
        assert half_stored(d) == []
        again = [await connector(u) for u in users]
        conv_of = dict(d.query("SELECT id, conversation_id FROM messages"))
        sender_of = dict(d.query("SELECT id, sender_id FROM messages"))
        recovered_by_sync_only = 0
        for s, c in zip(senders, again, strict=True):
            replayed, synced = await collect_after_restart(c)
            assert len(replayed) == len(set(replayed)), "replay repeated an event"
            # sync from 0 is the conversation's whole stored history, each message once.
            history = {mid for mid, conv in conv_of.items() if conv == s.conv}
            assert sorted(synced) == sorted(history)
            from_others = {mid for mid in history if sender_of[mid] != c.user_id}
            assert set(replayed) <= from_others
            got = s.live | set(replayed) | set(synced)
            acked_for_me = {mid for o in senders if o.conv == s.conv and o is not s
                            for mid in o.acked.values()}
            assert acked_for_me <= got, sorted(acked_for_me - got)[:10]
            recovered_by_sync_only += len(from_others - s.live - set(replayed))
        # Without sync, live + replay may miss only frames written as the process died.
        assert recovered_by_sync_only <= 10 * WINDOW, recovered_by_sync_only

        # -- resend everything unacked with its original requestId ----------------------------
        for s, c in zip(senders, again, strict=True):
            for r in s.sent:
                if r in s.acked:
                    continue
                await c.send({"type": "send_message", "conversationId": s.conv,
                               "content": f"{r} body", "requestId": r})
            for r in s.sent:
                if r in s.acked:
                    continue
                ack = await c.expect("message_sent", timeout=TIMEOUT, requestId=r)
                before = stored.get((c.user_id, r))
                if before is not None:
                    assert ack["messageId"] == before, "resend of a stored request got a new id"
                s.acked[r] = ack["messageId"]
            # Resending an acked one is answered with the original id too.
            if s.sent and s.sent[0] in s.acked:
                first = s.sent[0]
                ack = await c.request({"type": "send_message", "conversationId": s.conv,
                                       "content": f"{first} body", "requestId": first},
                                      "message_sent", requestId=first)
                assert ack["messageId"] == s.acked[first]
        # Resends of stored requests fan out nothing; new ones reach each other member once.
        for c in again:
            await c.request({"type": "ping"}, "pong")
        for s, c in zip(senders, again, strict=True):
            fanned = [f["messageId"] for f in c.seen if f.get("type") == "new_message"]
            assert len(fanned) == len(set(fanned))
            expected = {o.acked[r] for o in senders if o.conv == s.conv and o is not s
                        for r in o.sent if (o.client.user_id, r) not in stored}
            assert set(fanned) == expected
        for s in senders:
            counts = dict(d.query(
                f"SELECT request_id, COUNT(*) FROM {messages(d)} WHERE sender_id = ? "
                "AND request_id LIKE 'crash-%' GROUP BY request_id", (s.client.user_id,)))
            assert counts == dict.fromkeys(s.sent, 1)
        assert half_stored(d) == []
    finally:
        await connector.close_all()
        if d.proc is not None:
            d.stop()
