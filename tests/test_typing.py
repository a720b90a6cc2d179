"""Typing indicators (PROTOCOL.md 4.2): ephemeral, coalesced, ended exactly once."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from conftest import (
    TIMEOUT,
    Client,
    Connector,
    Daemon,
    conversation,
    eventually_db,
    new_user,
    running,
)

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
TTL = 0.6  # typing.ttl_seconds for the expiry tests
TYPING_ROWS = "SELECT is_typing FROM typing_indicators WHERE conversation_id = ? AND user_id = ?"




async def typing(client: Client, conversation_id: int, on: bool = True) -> None:
    kind = "typing_start" if on else "typing_stop"
    await client.send({"type": kind, "conversationId": conversation_id})


async def test_typing_goes_to_other_participants_only(connect_to: Connector) -> None:
    """user_typing reaches the other participants, not the typer's own tabs."""
    a_id = new_user()
    a1 = await connect_to(a_id, username="alice")
    a2 = await connect_to(a_id, username="alice")
    b = await connect_to()
    c = await connect_to()
    cid = await conversation(a1, b.user_id, c.user_id)
    await typing(a1, cid)
    for other in (b, c):
        frame = await other.expect("user_typing", userId=a_id)
        assert frame["username"] == "alice"
        assert frame["conversationId"] == cid
        assert frame["isTyping"] is True
        assert ISO.match(frame["timestamp"])
    await a1.absent("user_typing")
    await a2.absent("user_typing")


async def test_repeated_start_is_coalesced(connect_to: Connector) -> None:
    """typing_start on every keystroke within the TTL broadcasts only the first."""
    a = await connect_to()
    b = await connect_to()
    cid = await conversation(a, b.user_id)
    await typing(a, cid)
    await b.expect("user_typing", isTyping=True)
    for _ in range(20):
        await typing(a, cid)
    # A ping answered after the repeats proves the server has handled them all.
    await a.request({"type": "ping"}, "pong")
    await b.absent("user_typing")


async def test_stop_ends_typing_once(daemon: Daemon, connect_to: Connector) -> None:
    """typing_stop broadcasts isTyping false once; the table row follows the state."""
    a = await connect_to()
    b = await connect_to()
    cid = await conversation(a, b.user_id)
    await typing(a, cid)
    await b.expect("user_typing", isTyping=True, userId=a.user_id)
    await eventually_db(daemon, TYPING_ROWS, (cid, a.user_id), [(1,)])
    await typing(a, cid, on=False)
    stopped = await b.expect("user_typing", userId=a.user_id)
    assert stopped["isTyping"] is False and stopped["conversationId"] == cid
    await eventually_db(daemon, TYPING_ROWS, (cid, a.user_id), [(0,)])
    await typing(a, cid, on=False)
    await a.request({"type": "ping"}, "pong")
    await b.absent("user_typing")


async def test_sending_clears_typing(daemon: Daemon, connect_to: Connector) -> None:
    """A sent message ends the sender's typing with one isTyping false."""
    a = await connect_to()
    b = await connect_to()
    cid = await conversation(a, b.user_id)
    await typing(a, cid)
    await b.expect("user_typing", isTyping=True)
    await a.request(
        {"type": "send_message", "conversationId": cid, "content": "hi"}, "message_sent"
    )
    await b.expect("new_message", conversationId=cid)
    stopped = await b.expect("user_typing", userId=a.user_id)
    assert stopped["isTyping"] is False
    await eventually_db(daemon, TYPING_ROWS, (cid, a.user_id), [(0,)])
    await typing(a, cid, on=False)  # already ended: nothing more to announce
    await a.request({"type": "ping"}, "pong")
    await b.absent("user_typing")


async def test_last_connection_closing_clears_typing(
    daemon: Daemon, connect_to: Connector
) -> None:
    """Typing ends when the user's last tab closes, not when another tab does."""
    a_id = new_user()
    a1 = await connect_to(a_id)
    a2 = await connect_to(a_id)
    b = await connect_to()
    cid = await conversation(a1, b.user_id)
    await typing(a1, cid)
    await b.expect("user_typing", isTyping=True)
    await a1.close()
    await b.absent("user_typing")
    await a2.close()
    stopped = await b.expect("user_typing", userId=a_id)
    assert stopped["isTyping"] is False
    await b.absent("user_typing")
    await eventually_db(daemon, TYPING_ROWS, (cid, a_id), [(0,)])


async def test_ttl_expiry(tmp_path: Path) -> None:
    """Without a stop, isTyping false comes once, after the TTL and not well before it."""
    async with running(tmp_path, {"typing.ttl_seconds": TTL}) as connect:
        a = await connect()
        b = await connect()
        cid = await conversation(a, b.user_id)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await typing(a, cid)
        await b.expect("user_typing", isTyping=True)
        await b.quiet("user_typing", within=TTL * 0.6)
        stopped = await b.expect("user_typing", timeout=TTL + TIMEOUT, userId=a.user_id)
        waited = loop.time() - started
        assert stopped["isTyping"] is False
        assert waited >= TTL * 0.95, f"expired after {waited:.3f}s, TTL is {TTL}s"
        await b.quiet("user_typing", within=TTL)
        await eventually_db(connect.daemon, TYPING_ROWS, (cid, a.user_id), [(0,)])


async def test_repeat_pushes_ttl_back(tmp_path: Path) -> None:
    """A repeated typing_start restarts the TTL, so the end comes a TTL after the repeat."""
    async with running(tmp_path, {"typing.ttl_seconds": TTL}) as connect:
        a = await connect()
        b = await connect()
        cid = await conversation(a, b.user_id)
        loop = asyncio.get_running_loop()
        await typing(a, cid)
        await b.expect("user_typing", isTyping=True)
        await b.quiet("user_typing", within=TTL * 0.5)  # half the TTL passes
        repeated = loop.time()
        await typing(a, cid)
        stopped = await b.expect("user_typing", timeout=TTL + TIMEOUT, userId=a.user_id)
        waited = loop.time() - repeated
        assert stopped["isTyping"] is False
        assert waited >= TTL * 0.95, f"ended {waited:.3f}s after the repeat, TTL is {TTL}s"
        await b.absent("user_typing")


async def test_stale_rows_cleared_at_startup(tmp_path: Path) -> None:
    """Typing rows left by a daemon killed with SIGKILL are gone after the restart."""
    async with running(tmp_path, {}) as connect:
        daemon = connect.daemon
        a = await connect()
        b = await connect()
        cid = await conversation(a, b.user_id)
        await typing(a, cid)
        await b.expect("user_typing", isTyping=True)
        await eventually_db(daemon, TYPING_ROWS, (cid, a.user_id), [(1,)])
        daemon.kill()
        assert daemon.query(TYPING_ROWS, (cid, a.user_id)) == [(1,)]
        daemon.start()
        assert daemon.query("SELECT conversation_id, user_id, is_typing FROM typing_indicators"
                            " WHERE is_typing") == []
        b2 = await connect(b.user_id)
        await b2.request({"type": "ping"}, "pong")
        assert not [f for f in b2.seen if f["type"] == "user_typing"], b2.seen


async def test_typing_never_queued(connect_to: Connector) -> None:
    """A user who was offline gets the queued message but none of the typing around it."""
    a = await connect_to()
    b_id = new_user()
    cid = await conversation(a, b_id)
    await typing(a, cid)
    await typing(a, cid, on=False)
    await typing(a, cid)
    sent = await a.request(
        {"type": "send_message", "conversationId": cid, "content": "while you were out"},
        "message_sent",
    )
    b = await connect_to(b_id)
    # Everything replayed precedes the answer to the first frame B sends.
    await b.request({"type": "ping"}, "pong")
    queued = [f["messageId"] for f in b.seen if f["type"] == "queued_message"]
    assert queued == [sent["messageId"]]
    assert not [f for f in b.seen if f["type"] == "user_typing"], b.seen
    await b.absent("user_typing")


async def test_non_participant_typing_forbidden(connect_to: Connector) -> None:
    """typing_start or typing_stop outside one's conversations is forbidden and silent."""
    a = await connect_to()
    b = await connect_to()
    c = await connect_to()
    cid = await conversation(a, b.user_id)
    for kind in ("typing_start", "typing_stop"):
        for target in (cid, 10**9):
            error = await c.request({"type": kind, "conversationId": target}, "error")
            assert error["code"] == "forbidden", error
    await a.absent("user_typing")
    await b.absent("user_typing")
